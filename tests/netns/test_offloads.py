"""TUN offloads through a tunnel between two namespaces, over each transport: one TCP flow
carries a SHA-256-equal 50 MiB, and the data plane's counters (logged on SIGUSR1) show that
the devices really moved super-packets: the sender's TUN reads average more than the MTU (TSO
super-packets split before ESP), the receiver's writes too (segments coalesced), while every
packet on the wire stays within the MTU plus ESP overhead. The sending TUN queue drops nothing
(it holds super-packets, a few per TCP send window)."""

from __future__ import annotations

import pytest

from .dgtunnel import DatagramPair
from .tunnel import DEV, TunnelPair, io_counters

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
    assert per_pkt <= MTU + 100, snd
    drops = {k: v for k, v in (*snd.items(), *rcv.items()) if k.startswith("drop_") and v}
    assert not drops, drops
    assert dropped == 0, f"the sending TUN queue dropped {dropped} packets"
    checked.append(
        f"{transport} with offloads ({snd['offloads']}): 50 MiB SHA-256 equal, no drops "
        f"(data plane, TUN queue); sender {snd['dev_read_bytes'] / snd['dev_reads']:.0f} B "
        f"per TUN read ({snd['dev_read_super']} super-packets), {per_pkt:.0f} B per ESP "
        f"packet; receiver {rcv['dev_write_bytes'] / rcv['dev_writes']:.0f} B per TUN write "
        f"({rcv['dev_write_super']} coalesced)"
    )
