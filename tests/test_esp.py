"""ESP through the extension, against the independent reference ESP (tests/esp_reference.py).

Property tests run both directions (our encap -> reference decap, reference encap -> our decap)
over random keys (AES-128/192/256), SPIs, sequence numbers, packet sizes 0-65000, with and
without ESN. Then: the kernel-trace example, byte flips, truncations, bad padding, sequence
number exhaustion, configuration errors and counters.
"""

from __future__ import annotations

import random
import struct

import pytest
from esp_reference import (
    MIN_PACKET_LEN,
    RefAuthError,
    RefSA,
    default_padding,
    encap_len,
    ipv4_packet,
    ipv6_packet,
    min_pad_len,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simpletun import (
    DROP_REASONS,
    ESP_MAX_OVERHEAD,
    AuthenticationError,
    ConfigError,
    EspError,
    MalformedPacketError,
    ReplayError,
    SecurityAssociation,
    SequenceExhaustedError,
    SimpletunError,
    esp_encap_len,
)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Sizes around the cipher block and the usual MTUs, up to the largest the tests use.
BOUNDARY_SIZES = [
    *range(0, 20),
    *range(28, 35),
    *range(44, 51),
    64,
    65,
    66,
    1279,
    1280,
    1400,
    1420,
    1500,
    8192,
    9000,
    16384,
    32768,
    64998,
    64999,
    65000,
]
#: Biased towards small and boundary sizes, but reaching 65000.
SIZES = st.one_of(st.integers(0, 100), st.sampled_from(BOUNDARY_SIZES), st.integers(0, 65000))
U32 = (1 << 32) - 1


@st.composite
def sa_params(draw, esn: bool | None = None) -> dict:
    key_len = draw(st.sampled_from([16, 24, 32]))
    return {
        "spi": draw(st.one_of(st.sampled_from([256, 257, U32]), st.integers(256, U32))),
        "enc_key": draw(st.binary(min_size=key_len, max_size=key_len)),
        "auth_key": draw(st.binary(min_size=32, max_size=32)),
        "esn": draw(st.booleans()) if esn is None else esn,
    }


@st.composite
def inner_packets(draw) -> tuple[bytes, int | None, int]:
    """(inner, next_header argument for encap, the next header it stands for)."""
    n = draw(SIZES)
    data = bytearray(random.Random(draw(st.integers(0, U32))).randbytes(n))
    kind = draw(st.sampled_from(["ipv4", "ipv6", "explicit"])) if n else "explicit"
    if kind == "ipv4":
        data[0] = 0x40 | (data[0] & 0x0F)
        nh = draw(st.sampled_from([None, 4]))
        return bytes(data), nh, 4
    if kind == "ipv6":
        data[0] = 0x60 | (data[0] & 0x0F)
        nh = draw(st.sampled_from([None, 41]))
        return bytes(data), nh, 41
    nh = draw(st.one_of(st.sampled_from([4, 41, 143, 59]), st.integers(0, 255)))
    return bytes(data), nh, nh


def ref_of(params: dict) -> RefSA:
    return RefSA(params["spi"], params["enc_key"], params["auth_key"], params["esn"])


def seqs(esn: bool):
    top = (1 << 64) - 1 if esn else U32
    edges = [1, 2, 0xFFFF, 1 << 31, U32 - 1, U32]
    if esn:
        edges += [1 << 32, (1 << 32) + 1, (1 << 63), top - 1, top]
    return st.one_of(st.sampled_from(edges), st.integers(1, top))


# --- both directions against the reference -------------------------------------------------------


@PROPERTY
@given(data=st.data(), params=sa_params(), pkt=inner_packets())
def test_our_encap_is_read_by_the_reference(data, params, pkt):
    inner, nh_arg, nh = pkt
    seq = data.draw(seqs(params["esn"]), label="seq")
    sa = SecurityAssociation(**params)
    if seq > 1:
        sa._skip_tx_seq_to(seq - 1)
    esp = sa.encap(inner, next_header=nh_arg)

    assert len(esp) == encap_len(len(inner)) == esp_encap_len(len(inner))
    assert len(esp) - len(inner) <= ESP_MAX_OVERHEAD
    assert esp[:8] == struct.pack(">II", params["spi"], seq & U32)
    ref = ref_of(params)
    d = ref.decap(esp, seq_hi=seq >> 32)
    assert (d.next_header, d.inner) == (nh, inner)
    # RFC 4303 default padding, and no more of it than the block alignment needs.
    assert d.padding == default_padding(min_pad_len(len(inner)))
    assert sa.tx_seq == seq
    assert (sa.stats["encap_packets"], sa.stats["encap_bytes"]) == (1, len(inner))
    if params["esn"]:
        # The high 32 bits are not sent but are covered by the ICV.
        with pytest.raises(RefAuthError):
            ref.decap(esp, seq_hi=((seq >> 32) + 1) & U32)


def climb_esn(rx: SecurityAssociation, ref: RefSA, hi: int) -> None:
    """Walk a fresh ESN receiver up to the 2^32 block ``hi``, as a real sender would: for each
    block, a packet from the middle of the previous block, then one just past the boundary."""
    for h in range(1, hi + 1):
        for s in ((h << 32) - (1 << 31), (h << 32) + 1):
            rx.decap(ref.encap(b"", seq=s, iv=bytes(16), next_header=59))
            assert rx.rx_highest_seq == s


@PROPERTY
@given(data=st.data(), params=sa_params(), pkt=inner_packets())
def test_reference_encap_is_read_by_us(data, params, pkt):
    inner, _, nh = pkt
    ref = ref_of(params)
    rx = SecurityAssociation(**params)
    window = rx.replay_window
    if params["esn"]:
        hi = data.draw(st.integers(0, 5), label="seq_hi")
        # Right of the top the climb leaves, and not so far right that the low bits look like
        # the left of the window (those are the edge tables' business, test_replay.py).
        lo = data.draw(st.integers(2, U32 - 2 * window) if hi else st.integers(1, U32), label="lo")
        climb_esn(rx, ref, hi)
        seq = hi << 32 | lo
    else:
        seq = data.draw(seqs(False), label="seq")
    iv = data.draw(st.binary(min_size=16, max_size=16), label="iv")
    extra = data.draw(st.integers(0, (255 - min_pad_len(len(inner))) // 16), label="extra_pad")
    esp = ref.encap(inner, seq=seq, iv=iv, next_header=nh, extra_pad_blocks=extra)
    before = rx.stats

    assert rx.decap(esp) == (nh, b"" if nh == 59 else inner)
    assert rx.rx_highest_seq == seq
    after = rx.stats
    assert after["decap_packets"] == before["decap_packets"] + 1
    assert after["decap_bytes"] == before["decap_bytes"] + (0 if nh == 59 else len(inner))
    assert all(after[f"drop_{r}"] == 0 for r in DROP_REASONS)
    with pytest.raises(ReplayError):
        rx.decap(esp)


@PROPERTY
@given(params=sa_params(), pkts=st.lists(inner_packets(), min_size=1, max_size=5))
def test_ours_to_ours(params, pkts):
    tx, rx = SecurityAssociation(**params), SecurityAssociation(**params)
    for inner, nh_arg, nh in pkts:
        assert rx.decap(tx.encap(inner, next_header=nh_arg)) == (nh, b"" if nh == 59 else inner)
    assert tx.tx_seq == rx.rx_highest_seq == len(pkts)


def test_kernel_trace_example(sa_pair):
    """A 66-byte inner IPv4 packet: 12 pad bytes, 80-byte payload, 120-byte ESP, next header 4."""
    tx, _, ref = sa_pair()
    inner = ipv4_packet(66)
    esp = tx.encap(inner)
    assert len(esp) == 120
    d = ref.decap(esp)
    assert len(d.plaintext) == 80
    assert d.padding == bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert d.plaintext[-2:] == bytes([12, 4])
    assert (d.next_header, d.inner, d.seq) == (4, inner, 1)


def test_ivs_differ_between_packets(sa_pair):
    tx, _, ref = sa_pair()
    ivs = {ref.decap(tx.encap(ipv4_packet(20))).iv for _ in range(64)}
    assert len(ivs) == 64


def test_next_header_inference_and_dummy_packets(sa_pair):
    tx, rx, ref = sa_pair()
    assert rx.decap(tx.encap(ipv4_packet(20))) == (4, ipv4_packet(20))
    assert rx.decap(tx.encap(ipv6_packet(40))) == (41, ipv6_packet(40))
    # An explicit next header wins over the version nibble.
    assert rx.decap(tx.encap(ipv4_packet(20), next_header=143)) == (143, ipv4_packet(20))
    # RFC 4303 section 2.6 dummy packet.
    esp = tx.encap(b"", next_header=59)
    assert len(esp) == MIN_PACKET_LEN
    assert ref.decap(esp, seq_hi=0).padding == bytes(range(1, 15))
    assert rx.decap(esp) == (59, b"")
    for bad in (b"", b"\x10" * 20, b"\x50" * 20):
        with pytest.raises(EspError):
            tx.encap(bad)
    assert tx.tx_seq == 4, "a refused encap must not use a sequence number"


# --- rejection of damaged packets ----------------------------------------------------------------


@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
def test_every_byte_flip_is_an_authentication_failure(sa_pair, esn):
    tx, rx, _ = sa_pair(esn=esn, replay_window=64)
    seen, seq = 0x01020300, 0x01020304  # no byte of seq is 0; x ^ 0xff is right of the window
    tx._skip_tx_seq_to(seen - 1)
    rx.decap(tx.encap(ipv4_packet(40)))
    tx._skip_tx_seq_to(seq - 1)
    esp = tx.encap(ipv4_packet(66))
    for i in range(len(esp)):
        bad = bytearray(esp)
        bad[i] ^= 0xFF
        with pytest.raises(AuthenticationError):
            rx.decap(bytes(bad))
        assert rx.rx_highest_seq == seen, f"byte {i}: the window moved"
        assert rx.stats["drop_auth"] == i + 1
    stats = rx.stats
    assert stats["decap_packets"] == 1
    assert [r for r in DROP_REASONS if r != "auth" and stats[f"drop_{r}"]] == []
    assert rx.decap(esp) == (4, ipv4_packet(66))
    assert rx.rx_highest_seq == seq


def _structurally_valid(n: int) -> bool:
    return n >= 56 and (n - 8 - 16 - 16) % 16 == 0


@pytest.mark.parametrize("inner_len", [0, 66, 1000])
def test_every_truncation_is_rejected(sa_pair, inner_len):
    """Below 56 bytes, or a ciphertext that is not whole blocks: MalformedPacketError. Otherwise
    the length is plausible and the ICV (now taken from the ciphertext) fails."""
    tx, rx, _ = sa_pair(replay_window=64)
    rx.decap(tx.encap(ipv4_packet(20)))
    esp = tx.encap(ipv4_packet(inner_len) if inner_len else b"", next_header=4)
    counts = {MalformedPacketError: 0, AuthenticationError: 0}
    for n in range(len(esp)):
        want = AuthenticationError if _structurally_valid(n) else MalformedPacketError
        with pytest.raises(EspError) as info:
            rx.decap(esp[:n])
        assert type(info.value) is want, f"length {n}: {info.value!r}"
        counts[want] += 1
        assert rx.rx_highest_seq == 1
    assert counts[AuthenticationError] == max(0, (len(esp) - 56) // 16)
    stats = rx.stats
    assert stats["drop_bad_length"] == counts[MalformedPacketError]
    assert stats["drop_auth"] == counts[AuthenticationError]
    assert rx.decap(esp) == (4, ipv4_packet(inner_len) if inner_len else b"")


def test_appended_bytes_are_rejected(sa_pair):
    tx, rx, _ = sa_pair()
    esp = tx.encap(ipv4_packet(66))
    for extra in range(1, 40):
        want = AuthenticationError if extra % 16 == 0 else MalformedPacketError
        with pytest.raises(EspError) as info:
            rx.decap(esp + bytes(extra))
        assert type(info.value) is want, f"+{extra}: {info.value!r}"
    assert rx.decap(esp) == (4, ipv4_packet(66))


def _bad_trailers():
    """(inner, pad bytes, pad length byte) whose payload is whole blocks but whose padding is
    wrong. Each is sent authentic (valid ICV), built by the reference."""
    inner = ipv4_packet(10)
    yield "zero padding", inner, bytes(4), 4
    yield "last pad byte wrong", inner, bytes([1, 2, 3, 5]), 4
    yield "first pad byte wrong", inner, bytes([2, 2, 3, 4]), 4
    yield "pad length one short", inner, bytes([1, 2, 3, 4]), 3
    yield "pad length one long", inner, bytes([1, 2, 3, 4]), 5
    yield "pad length past the payload", b"", bytes(range(1, 15)), 15
    yield "pad length 255 in 2 blocks", ipv4_packet(16), bytes(range(1, 15)), 255
    yield "long padding, one byte wrong", ipv4_packet(12), bytes([*range(1, 18), 0]), 18


@pytest.mark.parametrize(
    ("inner", "pad", "pad_len"), [pytest.param(*c[1:], id=c[0]) for c in _bad_trailers()]
)
def test_authentic_packets_with_bad_padding_are_malformed(sa_pair, inner, pad, pad_len):
    _, rx, ref = sa_pair()
    esp = ref.encap(inner, seq=5, iv=bytes(range(16)), next_header=4, pad=pad, pad_len=pad_len)
    with pytest.raises(MalformedPacketError):
        rx.decap(esp)
    assert rx.stats["drop_bad_padding"] == 1
    assert rx.stats["decap_packets"] == 0
    # The ICV verified, so (DESIGN.md: ICV, commit window, decrypt, padding) the number is used.
    assert rx.rx_highest_seq == 5
    with pytest.raises(ReplayError):
        rx.decap(esp)


@pytest.mark.parametrize("extra_blocks", [1, 2, 15])
def test_longer_than_needed_default_padding_is_accepted(sa_pair, extra_blocks):
    _, rx, ref = sa_pair()
    inner = ipv4_packet(66)
    esp = ref.encap(inner, seq=1, iv=bytes(16), next_header=4, extra_pad_blocks=extra_blocks)
    assert len(esp) == encap_len(66) + 16 * extra_blocks
    assert rx.decap(esp) == (4, inner)


def test_wrong_keys_fail_authentication(sa_pair):
    tx, _, _ = sa_pair()
    esp = tx.encap(ipv4_packet(66))
    for kw in ({"auth_key": bytes(32)}, {"enc_key": bytes(16), "auth_key": bytes(32)}):
        _, rx, _ = sa_pair(**kw)
        with pytest.raises(AuthenticationError):
            rx.decap(esp)
        assert rx.rx_highest_seq == 0


def test_spi_is_not_checked_by_the_sa(sa_pair):
    """DESIGN.md: SPI matching is the dispatcher's job; the SA relies on its keys. A packet sent
    under another SPI with the same keys is authentic (the ICV covers the SPI it carries)."""
    tx, _, _ = sa_pair(spi=0x01000001)
    _, rx, _ = sa_pair()
    assert rx.decap(tx.encap(ipv4_packet(20))) == (4, ipv4_packet(20))


def test_sequence_number_zero_is_never_accepted(sa_pair):
    _, rx, ref = sa_pair()
    with pytest.raises(ReplayError):
        rx.decap(ref.encap(ipv4_packet(20), seq=0, iv=bytes(16), next_header=4))
    assert rx.stats["drop_replay"] == 1


# --- outbound sequence numbers -------------------------------------------------------------------


@pytest.mark.parametrize(("esn", "last"), [(False, U32), (True, (1 << 64) - 1)], ids=["32", "64"])
def test_sequence_number_exhaustion(sa_pair, esn, last):
    tx, _, ref = sa_pair(esn=esn)
    tx._skip_tx_seq_to(last - 1)
    esp = tx.encap(ipv4_packet(20))
    assert esp[4:8] == b"\xff\xff\xff\xff"
    assert ref.decap(esp, seq_hi=last >> 32).seq == last
    for _ in range(2):
        with pytest.raises(SequenceExhaustedError) as info:
            tx.encap(ipv4_packet(20))
        assert isinstance(info.value, EspError)
        msg = str(info.value)
        assert "exhausted" in msg and ("2^64-1" if esn else "2^32-1") in msg
    assert tx.tx_seq == last
    assert tx.stats["encap_packets"] == 1
    assert tx.stats["drop_seq_exhausted"] == 2


def test_skip_only_moves_forward(sa_pair):
    tx, _, _ = sa_pair()
    tx._skip_tx_seq_to(100)
    assert tx.tx_seq == 100
    with pytest.raises(SimpletunError):
        tx._skip_tx_seq_to(99)
    assert tx.tx_seq == 100
    tx.encap(ipv4_packet(20))
    assert tx.tx_seq == 101


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [32, 64, 4096, 65536, 1 << 20])
def test_window_sizes_accepted(sa_pair, window):
    tx, _, _ = sa_pair(replay_window=window)
    assert tx.replay_window == window


@pytest.mark.parametrize("window", [0, 1, 31, (1 << 20) + 1])
def test_window_sizes_refused(sa_pair, window):
    with pytest.raises(ConfigError) as info:
        sa_pair(replay_window=window)
    assert isinstance(info.value, ValueError)
    assert "32" in str(info.value) and "1048576" in str(info.value)


@pytest.mark.parametrize(
    "kw", [{"replay_window": 1 << 32}, {"replay_window": -1}, {"spi": 1 << 32}, {"spi": -1}]
)
def test_out_of_range_integers_are_config_errors(sa_pair, kw):
    with pytest.raises(ConfigError):
        sa_pair(**kw)


def test_out_of_range_next_header_is_config_error(sa_pair):
    sa, _, _ = sa_pair()
    with pytest.raises(ConfigError, match="next_header must be 0-255"):
        sa.encap(b"x", next_header=256)


@pytest.mark.parametrize("n", [0, 1, 15, 17, 23, 25, 31, 33, 64])
def test_bad_encryption_key_lengths(sa_pair, n):
    with pytest.raises(ConfigError) as info:
        sa_pair(enc_key=bytes(n))
    msg = str(info.value)
    assert "16, 24 or 32" in msg and f"{n} bytes" in msg


@pytest.mark.parametrize("n", [0, 16, 31, 33, 64])
def test_bad_authentication_key_lengths(sa_pair, n):
    with pytest.raises(ConfigError) as info:
        sa_pair(auth_key=bytes(n))
    assert "32" in str(info.value) and f"{n} bytes" in str(info.value)


@pytest.mark.parametrize(("n", "bits"), [(16, 128), (24, 192), (32, 256)])
def test_key_sizes(sa_pair, n, bits):
    tx, rx, ref = sa_pair(enc_key=bytes(range(n)), esn=True)
    assert (tx.enc_key_bits, tx.esn, tx.spi) == (bits, True, 0x01000000)
    assert ref.decap(tx.encap(ipv4_packet(30))).inner == ipv4_packet(30)


@pytest.mark.parametrize("spi", [0, 1, 255])
def test_reserved_spis(sa_pair, spi):
    with pytest.raises(ConfigError, match="256"):
        sa_pair(spi=spi)


def test_stats_keys():
    sa = SecurityAssociation(spi=256, enc_key=bytes(16), auth_key=bytes(32))
    assert set(sa.stats) == {
        "encap_packets",
        "encap_bytes",
        "decap_packets",
        "decap_bytes",
        *(f"drop_{r}" for r in DROP_REASONS),
    }
    assert {"bad_length", "auth", "replay", "bad_padding"} <= set(DROP_REASONS)
    assert (sa.replay_window, sa.esn, sa.tx_seq, sa.rx_highest_seq) == (4096, False, 0, 0)
    assert issubclass(MalformedPacketError, EspError) and issubclass(AuthenticationError, EspError)
    assert issubclass(ReplayError, EspError) and issubclass(SequenceExhaustedError, EspError)
