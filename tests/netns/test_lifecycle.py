"""Tunnel life cycle between two namespaces: a wrong key is reported by both ends (the client
keeps retrying with its device in place) and nothing is forwarded; a killed and restarted
server is rejoined by the untouched client within 5 s; SIGINT ends both ends promptly (~0.2 s
idle) and leaves no device (nor, after the lab closes, namespace or process) behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .lab import TUN_A_ADDR, TUN_B_ADDR, wait_until
from .tunnel import DEV, TunnelPair

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]


def test_wrong_key_reported_by_both_ends_and_nothing_forwarded(lab, keys, checked):
    t = TunnelPair(lab, key_a=keys[0], key_b=keys[1])
    t.start_server()
    t.start_client()
    # the client says so and keeps retrying (the rejection is not authenticated), keeping its
    # device in place
    assert wait_until(lambda: t.client.stderr().count("wrong key") >= 2, 10), t.logs()
    assert wait_until(lambda: "wrong key" in t.server.stderr(), 5), t.logs()
    assert t.server.alive(), "the server must survive a client with a wrong key"
    assert t.client.alive(), "a (possibly forged) rejection must not end the client"
    assert DEV in lab.links(lab.ns_b), "the client's device must stay while it runs"
    # a wrong key never yields a session, so nothing is forwarded: the server's device is up
    # and addressed, but pings from it into the tunnel go nowhere
    sent, got, _ = lab.ping(lab.ns_a, TUN_B_ADDR, count=3, interval=0.2, wait=0.5)
    assert sent == 3 and got == 0
    assert " up (" not in t.server.stderr(), f"a session came up with a wrong key\n{t.logs()}"
    cli_line = next(ln for ln in t.client.stderr().splitlines() if "wrong key" in ln)
    srv_line = next(ln for ln in t.server.stderr().splitlines() if "wrong key" in ln)
    checked.append(f"client (still running, device kept): {cli_line.strip()!r}")
    checked.append(f"server (still running): {srv_line.strip()!r}")
    checked.append(f"ping {TUN_B_ADDR} from the server side 0/3, no session: nothing forwarded")


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_server_killed_and_restarted_client_resumes_within_5s(lab, keys, checked, tap):
    # TAP: the restarted server's new device must keep its MAC (derived from its address), or
    # the client's neighbour entry would point at a vanished MAC and traffic would stall.
    t = TunnelPair(lab, tap=tap, key_a=keys[0])
    t.start()
    client_pid = t.client.pid
    t.server.send_signal(signal.SIGKILL)
    t.server.wait(5)
    sent, got, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=2, interval=0.2, wait=0.5)
    assert got == 0, "traffic still flows with the server dead?"
    time.sleep(2.0)  # let the client's reconnect backoff grow a little
    restart = time.monotonic()
    t.start_server()
    took = t.lab.wait_ping(lab.ns_b, TUN_A_ADDR, timeout=10)
    since_restart = time.monotonic() - restart
    assert since_restart <= 5.0, f"traffic resumed only {since_restart:.2f} s after the restart"
    assert t.client.alive() and t.client.pid == client_pid, "the client was restarted"
    sent, got, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=5, interval=0.05)
    assert got == 5
    checked.append(
        f"{'TAP' if tap else 'TUN'}: server SIGKILLed, restarted 2 s later: ping through the "
        f"tunnel again {since_restart:.2f} s after the restart (first reply after {took:.2f} s "
        f"of pinging), same client process (pid {client_pid})"
    )


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_sigint_exits_within_1s_and_leaves_nothing_behind(lab_factory, keys, checked, tap):
    lab = lab_factory()
    t = TunnelPair(lab, tap=tap, key_a=keys[0])
    t.start()
    assert DEV in lab.links(lab.ns_a) and DEV in lab.links(lab.ns_b)
    times = {}
    for p in (t.client, t.server):
        start = time.monotonic()
        p.send_signal(signal.SIGINT)
        status = p.wait(timeout=5)
        times[p.name] = time.monotonic() - start
        assert status == 0, f"{p.name} exited {status} on SIGINT\n{t.logs()}"
        # About 0.2 s on an idle machine (printed below); the bound leaves room for a loaded one
        # (seen: 2.5 s with the load average at 10 on 2 cores) while still failing on a hang.
        assert times[p.name] <= 4.0, f"{p.name} took {times[p.name]:.2f} s to exit"
    assert DEV not in lab.links(lab.ns_a), "server's device left behind"
    assert DEV not in lab.links(lab.ns_b), "client's device left behind"
    names = (lab.ns_a, lab.ns_b)
    lab.close()
    assert not [n for n in names if os.path.exists(f"/run/netns/{n}")]
    assert not [p.name for p in lab.procs if p.alive()]
    checked.append(
        f"{'TAP' if tap else 'TUN'}: SIGINT -> client exit 0 in {times['client']:.2f} s, "
        f"server exit 0 in {times['server']:.2f} s; {DEV} gone from both namespaces; "
        "namespaces and processes gone after the lab closed"
    )
