"""Anti-replay window (RFC 4303 section 3.4.3, RFC 6479) and ESN inference (RFC 4303 Appendix A),
through the extension. Packets are built by the reference ESP, which takes any sequence number,
so they can be delivered in any order."""

from __future__ import annotations

import pytest
from esp_reference import ipv4_packet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simpletun import AuthenticationError, ReplayError

OK, REPLAY, AUTH = "ok", "replay", "auth"
#: Left of the window. Without ESN: a replay. With ESN the low 32 bits are read as the next 2^32
#: block (RFC 4303 Appendix A.2), so the ICV, made with the real high bits, fails instead.
TOO_OLD = "too old"
B = 1 << 32
IV = bytes(range(16))


def inner_for(seq: int) -> bytes:
    """An inner packet that names its sequence number, so a mix-up would show."""
    return ipv4_packet(20) + seq.to_bytes(8, "big")


def run_table(sa_pair, window: int, esn: bool, table: list[tuple[int, str]]) -> None:
    _, rx, ref = sa_pair(replay_window=window, esn=esn)
    top = ok = 0
    drops = {"auth": 0, "replay": 0}
    for row, (seq, want) in enumerate(table):
        if want == TOO_OLD:
            want = AUTH if esn else REPLAY
        ctx = f"window {window} esn {esn} row {row}: seq {seq:#x}"
        esp = ref.encap(inner_for(seq), seq=seq, iv=IV, next_header=4)
        if want == OK:
            assert rx.decap(esp) == (4, inner_for(seq)), ctx
            top, ok = max(top, seq), ok + 1
        else:
            with pytest.raises(ReplayError if want == REPLAY else AuthenticationError):
                rx.decap(esp)
            drops[want] += 1
        stats = rx.stats
        assert rx.rx_highest_seq == top, ctx
        assert stats["decap_packets"] == ok, ctx
        assert (stats["drop_replay"], stats["drop_auth"]) == (drops["replay"], drops["auth"]), ctx


def edge_table(w: int) -> list[tuple[int, str]]:
    t = 3 * w + 17
    far = t + 10 * w + 5
    return [
        (t, OK),
        (t, REPLAY),  # duplicate of the top
        (t - w + 1, OK),  # leftmost number inside the window
        (t - w + 1, REPLAY),  # ... and its duplicate
        (t - w, TOO_OLD),  # just outside (never seen)
        (1, TOO_OLD),  # far left
        (t - 1, OK),  # reordered within the window
        (t - 3, OK),
        (t - 2, OK),
        (t - 2, REPLAY),
        (t - 3, REPLAY),
        (t + 1, OK),  # slides by one
        (t - w + 2, OK),  # now the leftmost inside, never seen
        (t - w + 1, TOO_OLD),  # now outside (seen before)
        (far, OK),  # far ahead: the whole window slides
        (t + 2, TOO_OLD),  # never seen, but now too old
        (far - w + 1, OK),
        (far - w, TOO_OLD),
        (far - 1, OK),  # bits from before the jump were cleared
        (far - w // 2, OK),
        (far, REPLAY),
        (far + w - 1, OK),  # slides by a window less one: `far` is the leftmost now
        (far, REPLAY),
        (far + w - 2, OK),
    ]


@pytest.mark.parametrize("window", [32, 64, 4096, 65536])
@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
def test_window_edges(sa_pair, window, esn):
    run_table(sa_pair, window, esn, edge_table(window))


def test_window_at_the_top_of_the_32_bit_space(sa_pair):
    top = B - 1
    table = [(top - 64, OK), (top, OK), (top - 63, OK), (top - 64, REPLAY), (top, REPLAY)]
    run_table(sa_pair, 64, False, table)


@pytest.mark.parametrize("window", [64, 4096])
def test_esn_across_the_2_32_boundary(sa_pair, window):
    w = window
    table = [
        (B - 16, OK),
        (B + 3, OK),  # wire seq 3: the high bits 1 are inferred
        (B - 2, OK),  # late, from the previous 2^32 block, inside the window
        (B - 16, REPLAY),
        (B + 3, REPLAY),
        (B, OK),  # low 32 bits, the only ones sent, are 0
        (B, REPLAY),
        (B + 3 - w + 1, OK),  # leftmost inside the window, in the previous block
        # Just outside: its low bits are read as the next 2^32 block (RFC 4303 Appendix A), so
        # the ICV, made with high bits 0, fails. Rejected either way; the window stays put.
        (B + 3 - w, AUTH),
        (B + (1 << 31), OK),  # far ahead within the new block
        # The window now lies inside one block: its left edge, and just left of it.
        (B + (1 << 31) - w + 1, OK),
        (B + (1 << 31) - w, AUTH),
        (B + 4, AUTH),  # left of the window in the current block: read as the next block
        (2 * B + 1, OK),  # into the third block
        (2 * B - 1, OK),  # late, from the second
        (2 * B - 1, REPLAY),
    ]
    run_table(sa_pair, window, True, table)


def test_esn_icv_covers_high_bits_even_when_zero(sa_pair):
    """With ESN the ICV input ends with the high 32 bits, also when they are 0: an ESN receiver
    refuses a non-ESN packet with the same keys and low bits, and the other way round."""
    _, rx, ref = sa_pair()
    _, rx_esn, ref_esn = sa_pair(esn=True)
    plain = ref.encap(ipv4_packet(20), seq=5, iv=IV, next_header=4)
    extended = ref_esn.encap(ipv4_packet(20), seq=5, iv=IV, next_header=4)
    assert plain[:-16] == extended[:-16] and plain[-16:] != extended[-16:]
    with pytest.raises(AuthenticationError):
        rx_esn.decap(plain)
    with pytest.raises(AuthenticationError):
        rx.decap(extended)
    assert rx_esn.decap(extended)[0] == rx.decap(plain)[0] == 4


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    window=st.sampled_from([32, 64, 100, 4096]),
    moves=st.lists(
        st.tuples(st.sampled_from(["ahead", "near", "edge", "any"]), st.integers(0, 1 << 20)),
        min_size=1,
        max_size=60,
    ),
)
def test_window_matches_a_model(sa_pair, window, moves):
    """Any delivery order: accepted iff new and not left of the window (a plain set model)."""
    _, rx, ref = sa_pair(replay_window=window)
    seen: set[int] = set()
    top = 0
    for kind, r in moves:
        seq = {
            "ahead": top + 1 + r % (3 * window),
            "near": max(1, top - r % (window + 2)),
            "edge": max(1, top - window + 1 - r % 2),
            "any": 1 + r % (top + 1),
        }[kind]
        fresh = seq > top or (top - seq < window and seq not in seen)
        esp = ref.encap(b"", seq=seq, iv=IV, next_header=59)
        if fresh:
            assert rx.decap(esp) == (59, b"")
            seen.add(seq)
            top = max(top, seq)
        else:
            with pytest.raises(ReplayError):
                rx.decap(esp)
        assert rx.rx_highest_seq == top
