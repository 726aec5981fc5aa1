"""Length-prefixed framing (2-byte big-endian length, then the payload): ``encode_frame`` and the
streaming ``FrameDecoder``, checked against a model over every way of splitting a stream."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpletun import FrameDecoder, FrameError, FrameTooLargeError, encode_frame


def test_encode_frame():
    assert encode_frame(b"") == b"\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frame(bytes(300)) == b"\x01\x2c" + bytes(300)
    big = bytes(range(256)) * 255 + bytes(255)
    assert len(big) == 65535
    assert encode_frame(big) == b"\xff\xff" + big


def test_encode_frame_refuses_what_two_bytes_cannot_describe():
    with pytest.raises(FrameError) as info:
        encode_frame(bytes(65536))
    assert isinstance(info.value, ValueError)
    assert "65535" in str(info.value)


def test_decoder_bounds():
    assert FrameDecoder().max_frame == 65535
    assert FrameDecoder(max_frame=1).max_frame == 1
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            FrameDecoder(max_frame=bad)


@dataclass
class Item:
    """One frame of a test stream: good (payload within the bound) or oversized."""

    start: int  # offset of its prefix in the stream
    length: int  # announced payload length
    good: bool
    payload: bytes = b""

    @property
    def end(self) -> int:
        return self.start + 2 + self.length


def build_stream(specs: list[tuple[bool, int]], max_frame: int, seed: int):
    rnd = random.Random(seed)
    items, out = [], bytearray()
    for good, n in specs:
        length = n if good else max_frame + 1 + n
        body = rnd.randbytes(length)
        items.append(Item(len(out), length, good, body if good else b""))
        out += length.to_bytes(2, "big") + body
    return items, bytes(out)


def expected_call(items: list[Item], a: int, b: int):
    """What feeding stream[a:b] must give: (frames completed in it, whether an oversized prefix
    completes in it, bytes buffered afterwards)."""
    frames = [it.payload for it in items if it.good and a <= it.end - 1 < b]
    raises = any(not it.good and a <= it.start + 1 < b for it in items)
    buffered = 0
    for it in items:
        if it.start < b < it.end:
            # Inside a good frame everything since its prefix is held; of an oversized one at most
            # its first prefix byte (the rest is skipped as it arrives, never buffered).
            buffered = b - it.start if it.good else (1 if b - it.start == 1 else 0)
    return frames, raises, buffered


def feed_checked(dec: FrameDecoder, items, stream: bytes, a: int, b: int) -> list[bytes]:
    want_frames, want_raise, want_buffered = expected_call(items, a, b)
    if want_raise:
        with pytest.raises(FrameTooLargeError) as info:
            dec.feed(stream[a:b])
        got = list(info.value.frames)
        assert isinstance(info.value, FrameError)
    else:
        got = list(dec.feed(stream[a:b]))
    assert got == want_frames, f"feed [{a}:{b}]"
    assert dec.buffered == want_buffered, f"buffered after [{a}:{b}]"
    assert dec.buffered <= dec.max_frame + 2
    return got


frame_specs = st.lists(
    st.tuples(
        st.sampled_from([True, True, True, False]),  # good? (mostly)
        st.one_of(st.integers(0, 40), st.integers(0, 3000)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    max_frame=st.one_of(st.integers(1, 64), st.integers(1, 3000), st.just(65535)),
    specs=frame_specs,
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_any_split_of_any_stream(max_frame, specs, seed, data):
    specs = [(good or max_frame == 65535, min(n, max_frame) if good else n) for good, n in specs]
    items, stream = build_stream(specs, max_frame, seed)
    cuts = data.draw(
        st.lists(st.integers(0, len(stream)), max_size=min(len(stream), 40)).map(sorted),
        label="cuts",
    )
    bounds = [0, *cuts, len(stream)]
    dec = FrameDecoder(max_frame=max_frame)
    got = []
    for a, b in itertools.pairwise(bounds):
        got += feed_checked(dec, items, stream, a, b)
    assert got == [it.payload for it in items if it.good]
    assert dec.buffered == 0


def test_every_two_cut_split_of_a_small_stream():
    """Exhaustive: every (a, b) split of a stream with empty, short, oversized and bound-sized
    frames, fed as three chunks."""
    max_frame = 5
    specs = [(True, 0), (True, 1), (False, 3), (True, 5), (False, 0), (True, 2), (True, 0)]
    items, stream = build_stream(specs, max_frame, 7)
    for a in range(len(stream) + 1):
        for b in range(a, len(stream) + 1):
            dec = FrameDecoder(max_frame=max_frame)
            got = []
            for lo, hi in ((0, a), (a, b), (b, len(stream))):
                got += feed_checked(dec, items, stream, lo, hi)
            assert got == [b"", items[1].payload, items[3].payload, items[5].payload, b""]


def test_oversized_frame_error_holds_the_good_frames_of_the_call():
    dec = FrameDecoder(max_frame=10)
    chunk = encode_frame(b"a") + b"\x00\x20" + bytes(32) + encode_frame(b"b") + b"\x00"
    with pytest.raises(FrameTooLargeError) as info:
        dec.feed(chunk)
    assert info.value.frames == [b"a", b"b"]
    assert "32" in str(info.value) and "10" in str(info.value)
    assert dec.buffered == 1  # the first byte of the next prefix
    assert dec.feed(b"\x02xy") == [b"xy"]
    # Two oversized frames in one call: one exception, all good frames in it.
    chunk = b"\x00\x0b" + bytes(11) + encode_frame(b"c") + b"\xff\xff" + bytes(65535)
    with pytest.raises(FrameTooLargeError) as info:
        dec.feed(chunk + encode_frame(b"d"))
    assert info.value.frames == [b"c", b"d"]
    assert dec.buffered == 0


def test_oversized_frame_is_skipped_not_buffered():
    """A 65535-byte frame against max_frame 100, fed a byte at a time: at most its first prefix
    byte is ever held, and the frame after it comes out."""
    items, stream = build_stream([(False, 65535 - 101), (True, 5)], 100, 3)
    assert items[0].length == 65535
    dec = FrameDecoder(max_frame=100)
    got = []
    for i in range(len(stream)):
        got += feed_checked(dec, items, stream, i, i + 1)
    assert got == [items[1].payload]
