"""Four peers on one server's TUN device over one UDP socket: each of three clients reaches the
server from its own prefix and gets only its own reply (the server's kernel answers; the data
plane routes each reply by longest-prefix match to the right peer); a fourth peer sending with
another peer's source address is dropped as spoofed and counted, and nobody gets a reply."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

HELPER = str(Path(__file__).with_name("multipeer.py"))


def test_three_peers_by_prefix_and_a_spoofing_fourth(lab, checked):
    srv = lab.spawn(lab.ns_a, [sys.executable, HELPER, "server"], name="mp-server")
    srv.wait_for_output(r"ready", timeout=15, stream="stdout")
    cli = lab.spawn(lab.ns_b, [sys.executable, HELPER, "clients"], name="mp-clients")
    assert cli.wait(60) == 0, cli.stderr()
    res = json.loads(cli.stdout().splitlines()[-1])
    srv.send_signal(signal.SIGTERM)
    assert srv.wait(15) == 0, srv.stderr()
    stats = json.loads(srv.stdout().splitlines()[-1])

    for k in ("1", "2", "3"):
        assert res["replies"][k] == [[f"10.9.{k}.2", 100 + int(k)]], res
    assert all(v == [] for v in res["spoof"].values()), f"a spoofed ping was answered: {res}"
    peers = stats["peers"]
    for k in ("1", "2", "3"):
        assert (peers[k]["rx_packets"], peers[k]["tx_packets"]) == (1, 1), peers[k]
        assert peers[k]["drop_spoofed"] == 0
    assert peers["4"]["drop_spoofed"] == 1 and peers["4"]["rx_packets"] == 0
    assert stats["total"]["drop_spoofed"] == 1
    assert stats["total"]["rx_packets"] == 3 and stats["total"]["tx_packets"] == 3
    assert len({tuple(e) for e in stats["endpoints"].values()}) == 4, "four distinct endpoints"
    checked.append(
        "3 UDP peers each got exactly their own echo reply (routed by prefix); the 4th "
        "peer's spoofed source was dropped (peer drop_spoofed=1, total drop_spoofed=1), "
        f"endpoints learnt by roaming: {sorted(tuple(e) for e in stats['endpoints'].values())}"
    )
