"""TUN offloads through a tunnel between two namespaces, over each transport: one TCP flow
carries a SHA-256-equal 50 MiB, and the data plane's counters (logged on SIGUSR1) show that
the devices really moved super-packets: the sender's TUN reads average more than the MTU (TSO
super-packets split before ESP), the receiver's writes too (segments coalesced), while every
packet on the wire stays within the MTU plus ESP overhead. The sending TUN queue drops nothing
(it holds super-packets, a few per TCP send window).

Over the TCP transport both ends announce super-packets in the handshake, so a TSO
super-packet crosses as ONE ESP packet (far more than the MTU per wire packet) and is written
whole on the far side; with SIMPLETUN_OFFLOADS=0 on one end nothing is announced and the
packets on the wire stay MTU-sized. What crosses the veth stays framed ESP either way."""

from __future__ import annotations

import secrets

import pytest

from . import pcapwire
from .dgtunnel import DatagramPair
from .lab import VETH_A, VETH_A_ADDR, VETH_B_ADDR, Capture
from .tunnel import DEV, PORT, TunnelPair, io_counters

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

MTU = 1400


def tx_dropped(lab, ns: str) -> int:
    out = lab.run(ns, ["cat", f"/sys/class/net/{DEV}/statistics/tx_dropped"]).stdout
    return int(out.decode().strip())


@pytest.mark.parametrize("transport", ["tcp", "udp", "raw"])
def test_tunnel_moves_super_packets_through_offloads(lab, keys, checked, transport):
    if transport == "tcp":
        t = TunnelPair(lab, key_a=keys[0], mtu=MTU)
    else:
        t = DatagramPair(lab, transport=transport, key_a=keys[0], mtu=MTU)
    t.start(timeout=20)
    dropped0 = tx_dropped(lab, lab.ns_b)
    snd0, rcv0 = io_counters(t.client), io_counters(t.server)
    tx, rx = t.transfer(50 * 1024 * 1024, timeout=120)
    assert tx["sha256"] == rx["sha256"] and rx["bytes"] == 50 * 1024 * 1024
    dropped = tx_dropped(lab, lab.ns_b) - dropped0
    snd1, rcv1 = io_counters(t.client), io_counters(t.server)
    t.stop()
    # What the transfer did (start-up packets such as the device's IPv6 router solicitations,
    # read before the SA is installed, are counted no_sa before it and left out).
    snd = {k: v - snd0.get(k, 0) if isinstance(v, int) else v for k, v in snd1.items()}
    rcv = {k: v - rcv0.get(k, 0) if isinstance(v, int) else v for k, v in rcv1.items()}
    assert "tso" in str(snd["offloads"]), snd
    assert snd["dev_read_super"] > 0 and snd["dev_read_bytes"] / snd["dev_reads"] > MTU, snd
    assert rcv["dev_write_super"] > 0 and rcv["dev_write_bytes"] / rcv["dev_writes"] > MTU, rcv
    per_pkt = snd["wire_tx_bytes"] / snd["wire_tx_packets"]
    if transport == "tcp":
        # Both ends announced super-packets: whole TSO super-packets, one ESP packet each.
        assert snd["wire_tx_super"] > 0 and rcv["wire_rx_super"] > 0, (snd, rcv)
        assert per_pkt > 4 * MTU, snd
    else:
        assert snd["wire_tx_super"] == 0, snd
        assert per_pkt <= MTU + 100, snd
    drops = {k: v for k, v in (*snd.items(), *rcv.items()) if k.startswith("drop_") and v}
    assert not drops, drops
    assert dropped == 0, f"the sending TUN queue dropped {dropped} packets"
    checked.append(
        f"{transport} with offloads ({snd['offloads']}): 50 MiB SHA-256 equal, no drops "
        f"(data plane, TUN queue); sender {snd['dev_read_bytes'] / snd['dev_reads']:.0f} B "
        f"per TUN read ({snd['dev_read_super']} super-packets), {per_pkt:.0f} B per ESP "
        f"packet ({snd['wire_tx_super']} super-packets sent whole); receiver "
        f"{rcv['dev_write_bytes'] / rcv['dev_writes']:.0f} B per TUN write "
        f"({rcv['dev_write_super']} super-packets written)"
    )


def _deltas(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) if isinstance(v, int) else v for k, v in after.items()}


@pytest.mark.parametrize("off", ["client", "server"])
def test_tcp_one_end_without_offloads_announces_nothing(lab_factory, keys, checked, off):
    """SIMPLETUN_OFFLOADS=0 on one end: that end announces nothing, so no super-packets
    travel (even from a sender whose TUN reads are super-packets: off=server); the 50 MiB
    transfer (client -> server) still works, MTU-sized on the wire."""
    lab = lab_factory(tag="tso")
    env = {f"{off}_env": {"SIMPLETUN_OFFLOADS": "0"}}
    t = TunnelPair(lab, key_a=keys[0], mtu=MTU, **env)
    t.start(timeout=20)
    snd0, rcv0 = io_counters(t.client), io_counters(t.server)
    tx, rx = t.transfer(50 * 1024 * 1024, timeout=120)
    assert tx["sha256"] == rx["sha256"] and rx["bytes"] == 50 * 1024 * 1024
    snd, rcv = _deltas(snd0, io_counters(t.client)), _deltas(rcv0, io_counters(t.server))
    t.stop()
    assert (snd if off == "client" else rcv)["offloads"] == "off", (snd, rcv)
    if off == "server":
        assert snd["dev_read_super"] > 0, snd
    assert snd["wire_tx_super"] == rcv["wire_tx_super"] == rcv["wire_rx_super"] == 0, (snd, rcv)
    per_pkt = snd["wire_tx_bytes"] / snd["wire_tx_packets"]
    assert per_pkt <= MTU + 100, snd
    drops = {k: v for k, v in (*snd.items(), *rcv.items()) if k.startswith("drop_") and v}
    assert not drops, drops
    checked.append(
        f"tcp, {off} SIMPLETUN_OFFLOADS=0: nothing agreed, 50 MiB SHA-256 equal, "
        f"{per_pkt:.0f} B per ESP packet, 0 super-packets either way"
    )


def test_tcp_super_packets_on_the_wire_are_framed_esp(lab_factory, keys, tmp_path, checked):
    """tcpdump on A's veth while super-packets cross: a marker sent through the tunnel never
    appears, every frame after the handshake is ESP (SPI, consecutive sequence numbers, CBC
    block-aligned), and frames far larger than the MTU are among them."""
    lab = lab_factory(tag="tso")
    marker = "SIMPLETUN-SECRET-" + secrets.token_hex(8)
    t = TunnelPair(lab, key_a=keys[0], mtu=MTU)
    cap = Capture(lab, lab.ns_a, VETH_A, tmp_path / "veth.pcap", f"tcp port {PORT}")
    t.start(timeout=20)
    snd0 = io_counters(t.client)
    tx, rx = t.transfer(4 * 1024 * 1024, marker=marker, timeout=60)
    assert rx["marker_seen"] and tx["sha256"] == rx["sha256"]
    snd = _deltas(snd0, io_counters(t.client))
    path = cap.stop()
    t.stop()
    assert cap.kernel_drops == 0, "tcpdump lost packets; the stream cannot be checked"
    raw = path.read_bytes()
    assert marker.encode() not in raw, "inner plaintext visible in the pcap"
    streams = pcapwire.tcp_streams(pcapwire.read_pcap(raw), port=PORT)
    c2s = [s for s in streams if s.src == VETH_B_ADDR and s.dst == VETH_A_ADDR and s.dport == PORT]
    assert len(c2s) == 1 and c2s[0].saw_syn and c2s[0].holes == [], streams
    frames, rest = pcapwire.split_frames(c2s[0].data)
    assert rest == b""
    s = pcapwire.esp_summary(frames)
    assert s["control_lead"] == 2 and s["late_control"] == 0, s
    assert len(s["spis"]) == 1 and s["seq_increasing"] and s["seq_gaps"] == 0, s
    esp = frames[2:]
    for f in esp:
        assert (len(f.payload) - 8 - 16 - 16) % 16 == 0 and len(f.payload) >= 56
    big = [f for f in esp if len(f.payload) > MTU + 100]
    assert snd["wire_tx_super"] > 0 and big, (snd, len(esp))
    checked.append(
        f"tcp super-packets on the wire: {len(esp)} ESP frames client->server, {len(big)} "
        f"larger than the MTU (largest {max(len(f.payload) for f in esp)} B), seq "
        f"{s['first_seq']}..{s['last_seq']} without gaps, marker absent from the pcap"
    )
