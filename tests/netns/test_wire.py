"""What crosses the veth: tcpdump on A's veth, the pcap parsed and the tunnel's TCP streams
reassembled and split into frames. In ESP mode a marker sent through the tunnel must never
appear on the wire and every frame after the handshake must be ESP with consecutive sequence
numbers; in plaintext mode the marker must appear (the positive control that the capture
would have caught it)."""

from __future__ import annotations

import secrets
import struct

import pytest

from . import pcapwire
from .lab import TUN_A_ADDR, VETH_A, VETH_A_ADDR, VETH_B_ADDR, Capture
from .tunnel import PORT, TunnelPair

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]


def _capture_session(lab, tmp_path, t: TunnelPair, marker: str):
    cap = Capture(lab, lab.ns_a, VETH_A, tmp_path / "veth.pcap", f"tcp port {PORT}")
    t.start()
    sent, got, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=5, interval=0.05, size=200)
    assert got == sent == 5
    tx, rx = t.transfer(256 * 1024, marker=marker, timeout=20)
    assert rx["marker_seen"], "the marker did not arrive through the tunnel"
    assert tx["sha256"] == rx["sha256"]
    path = cap.stop()
    t.stop()
    assert cap.kernel_drops == 0, "tcpdump lost packets; the stream cannot be checked"
    raw = path.read_bytes()
    streams = pcapwire.tcp_streams(pcapwire.read_pcap(raw), port=PORT)
    c2s = [s for s in streams if s.src == VETH_B_ADDR and s.dst == VETH_A_ADDR and s.dport == PORT]
    s2c = [s for s in streams if s.src == VETH_A_ADDR and s.sport == PORT]
    assert len(c2s) == 1 and len(s2c) == 1, f"one tunnel connection expected: {streams}"
    for st in (c2s[0], s2c[0]):
        assert st.saw_syn and st.holes == [], f"incomplete capture: {st}"
    return raw, c2s[0], s2c[0], cap


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_esp_wire_has_no_plaintext_and_only_esp_frames(lab, keys, tmp_path, checked, tap):
    marker = "SIMPLETUN-SECRET-" + secrets.token_hex(8)
    t = TunnelPair(lab, tap=tap, key_a=keys[0])
    raw, c2s, s2c, cap = _capture_session(lab, tmp_path, t, marker)

    assert marker.encode() not in raw, "inner plaintext visible in the pcap"
    for st in (c2s, s2c):
        assert marker.encode() not in st.data
    facts = []
    for name, st, n_ctl in (("client->server", c2s, 2), ("server->client", s2c, 1)):
        frames, rest = pcapwire.split_frames(st.data)
        assert rest == b"", f"{name}: stream does not end on a frame boundary"
        s = pcapwire.esp_summary(frames)
        # handshake: ClientHello + ClientFinish one way, ServerHello the other
        assert s["control_lead"] == n_ctl, f"{name}: {s}"
        assert s["late_control"] == 0, f"{name}: control frames after the handshake: {s}"
        assert len(s["spis"]) == 1 and s["spis"][0] >= 256, f"{name}: SPIs {s['spis']}"
        assert s["seq_increasing"] and s["seq_gaps"] == 0 and s["first_seq"] == 1, s
        assert s["esp"] >= 10
        for f in frames[n_ctl:]:
            # SPI(4) seq(4) IV(16) ciphertext (n * 16) ICV(16)
            assert (len(f.payload) - 8 - 16 - 16) % 16 == 0 and len(f.payload) >= 56
        facts.append(
            f"{name}: {n_ctl} handshake control frame(s), then {s['esp']} ESP frames, "
            f"SPI 0x{s['spis'][0]:08x}, seq {s['first_seq']}..{s['last_seq']} without gaps"
        )
    spis = {pcapwire.esp_summary(pcapwire.split_frames(st.data)[0])["spis"][0] for st in (c2s, s2c)}
    assert len(spis) == 2, "both directions use the same SPI"
    checked.append(
        f"ESP {'TAP' if tap else 'TUN'}: {cap.captured} packets captured on the veth, "
        f"marker {marker!r} (256 KiB of it sent and received) absent from the pcap"
    )
    checked.extend(facts)


def test_plaintext_wire_shows_the_marker_positive_control(lab, tmp_path, checked):
    marker = "SIMPLETUN-SECRET-" + secrets.token_hex(8)
    t = TunnelPair(lab, plaintext=True)
    raw, c2s, s2c, cap = _capture_session(lab, tmp_path, t, marker)

    assert marker.encode() in raw, "positive control failed: the capture misses tunnel payload"
    assert marker.encode() in c2s.data
    n = 0
    for st in (c2s, s2c):
        frames, rest = pcapwire.split_frames(st.data)
        assert rest == b""
        for f in frames:  # simpletun.c framing: every frame is one raw IPv4 packet
            assert f.payload[0] >> 4 == 4
            assert struct.unpack_from(">H", f.payload, 2)[0] == len(f.payload)
        n += len(frames)
    checked.append(
        f"plaintext TUN: marker {marker!r} found on the wire ({raw.count(marker.encode())} "
        f"times in the pcap); all {n} frames are length-prefixed raw IPv4 packets"
    )
