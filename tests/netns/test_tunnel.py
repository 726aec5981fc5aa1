"""Traffic through a real tunnel between two namespaces: ping and a 50 MiB TCP transfer whose
SHA-256 must match at both ends, for TUN and TAP, ESP and plaintext; plus the session counters
both ends log when the session ends."""

from __future__ import annotations

import time

import pytest

from .lab import TUN_A_ADDR
from .tunnel import TunnelPair, counter, drops, session_counters

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

NBYTES = 50 * 1024 * 1024


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
@pytest.mark.parametrize("plaintext", [False, True], ids=["esp", "plaintext"])
def test_ping_and_50MiB_transfer(lab, keys, checked, tap, plaintext):
    """ping 10/10, then 50 MiB B -> A through the tunnel with equal SHA-256 at both ends, then
    the counters of both ends agree with what was sent and nothing was dropped."""
    mode = f"{'plaintext' if plaintext else 'ESP'} {'TAP' if tap else 'TUN'}"
    t = TunnelPair(lab, tap=tap, plaintext=plaintext, key_a=None if plaintext else keys[0])
    up = t.start()
    sent, got, rtt = lab.ping(lab.ns_b, TUN_A_ADDR, count=10, interval=0.05)
    assert (sent, got) == (10, 10), f"ping through the tunnel: {got}/{sent}\n{t.logs()}"

    tx, rx = t.transfer(NBYTES, seed=42, timeout=30)
    assert tx["bytes"] == rx["bytes"] == NBYTES
    assert tx["sha256"] == rx["sha256"], "the data was altered in the tunnel"
    secs = max(tx["seconds"], rx["seconds"])
    assert secs < 30, f"50 MiB took {secs} s"

    time.sleep(0.2)  # let the last ACKs through before the counters are frozen
    t.stop()  # the session-end counters are logged as the ends shut down
    srv = session_counters(t.server.stderr())
    cli = session_counters(t.client.stderr())
    assert len(srv) == 1 and len(cli) == 1, f"one session expected\n{t.logs()}"
    srv, cli = srv[0], cli[0]
    # inner bytes: the 50 MiB plus TCP/IP headers (and Ethernet headers in TAP mode)
    assert counter(cli, "tx_bytes") > NBYTES and counter(srv, "rx_bytes") > NBYTES
    assert counter(srv, "rx_packets") == counter(cli, "tx_packets")
    assert counter(cli, "rx_packets") == counter(srv, "tx_packets")
    assert drops(srv) == {} and drops(cli) == {}, f"drops: server {drops(srv)} client {drops(cli)}"
    wire = counter(cli, "wire_tx_bytes")
    checked.append(
        f"{mode}: up in {up:.2f} s; ping 10/10 avg {rtt} ms; 50 MiB B->A in {secs:.2f} s "
        f"({NBYTES * 8 / secs / 1e9:.2f} Gbit/s), sha256 {rx['sha256'][:16]}… equal at both ends"
    )
    checked.append(
        f"counters: client tx_packets={counter(cli, 'tx_packets')} = server rx_packets, "
        f"client wire_tx_bytes={wire} (overhead {wire / counter(cli, 'tx_bytes') - 1:.1%}), "
        "no drops at either end"
    )
