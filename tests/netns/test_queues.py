"""A multi-queue TUN device (``--queues 2``) at both ends of an ESP-in-UDP tunnel with
offloads: four parallel TCP transfers arrive SHA-256-equal, both queues of each end are read
(the per-queue ``dev_reads_q0``/``q1`` logged on SIGUSR1; the kernel spreads the flows over
the queues by their hash, and the data plane writes each flow to the queue it hashes to so
that the flow's replies come back on it), nothing is dropped, and the kernel shows the
device's queues in ``/sys/class/net/<dev>/queues``. More queues than CPUs are refused in one
line (exit 2)."""

from __future__ import annotations

import sys

import pytest

from simpletun.config import max_queues

from .dgtunnel import DatagramPair
from .lab import TUN_A_ADDR
from .tunnel import DEV, XFER, io_counters

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

MTU = 1400
FLOWS = 4
EACH = 20 * 1024 * 1024


def _parallel_transfers(t: DatagramPair, n: int, nbytes: int, timeout: float = 120.0):
    """``n`` xfer.py connections at once, B → A, ports 5301.. from ports 40301.. (seed = port).
    Fixed ports make the flows' hashes, and so the queues the data plane writes them to
    (which the kernel then reads their replies from), the same in every run."""
    lab, py = t.lab, sys.executable
    rxs, txs = [], []
    for i in range(n):
        port = str(5301 + i)
        rx = lab.spawn(lab.ns_a, [py, XFER, "recv", TUN_A_ADDR, port, "--timeout", str(timeout)],
                       name=f"xfer-recv{i}")  # fmt: skip
        rx.wait_for_output('"listening"', 10, stream="stdout")
        rxs.append(rx)
    for i in range(n):
        port = str(5301 + i)
        argv = [py, XFER, "send", TUN_A_ADDR, port, "--bytes", str(nbytes), "--seed", port]
        argv += ["--source-port", str(40301 + i)]
        txs.append(lab.spawn(lab.ns_b, [*argv, "--timeout", str(timeout)], name=f"xfer-send{i}"))
    out = []
    for tx, rx in zip(txs, rxs, strict=True):
        tx.wait(timeout + 10)
        rx.wait(timeout + 10)
        out.append((_last_json(tx.stdout()), _last_json(rx.stdout())))
    return out


def _last_json(text: str) -> dict:
    import json

    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"no output: {text!r}"}


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) if isinstance(v, int) else v for k, v in after.items()}


def test_two_queues_carry_parallel_flows(lab_factory, keys, checked):
    if max_queues() < 2:
        pytest.skip("one CPU: --queues 2 is refused here (see the refusal test)")
    lab = lab_factory(tag="stmq")
    q = ("--queues", "2")
    t = DatagramPair(lab, transport="udp", key_a=keys[0], mtu=MTU, server_args=q, client_args=q)
    t.start(timeout=20)
    try:
        for ns in (lab.ns_a, lab.ns_b):
            queues = lab.run(ns, ["ls", f"/sys/class/net/{DEV}/queues"]).stdout.decode().split()
            assert sorted(queues) == ["rx-0", "rx-1", "tx-0", "tx-1"], queues
        snd0, rcv0 = io_counters(t.client), io_counters(t.server)
        results = _parallel_transfers(t, FLOWS, EACH)
        snd, rcv = _delta(io_counters(t.client), snd0), _delta(io_counters(t.server), rcv0)
    finally:
        t.stop()
    for tx, rx in results:
        assert "error" not in tx and "error" not in rx, (tx, rx, t.logs())
        assert tx["sha256"] == rx["sha256"] and rx["bytes"] == EACH, (tx, rx)
    assert "tso" in str(snd["offloads"]), snd
    # The sender reads its data from both queues; the receiver reads its ACKs from both.
    for end, c in (("sender", snd), ("receiver", rcv)):
        # (their sum equals dev_reads once traffic stops: rust/core/tests/dp_queues.rs; here
        # stray packets may be read between the counters' loads)
        assert c["dev_reads_q0"] > 0 and c["dev_reads_q1"] > 0, (end, c)
    drops = {k: v for k, v in (*snd.items(), *rcv.items()) if k.startswith("drop_") and v}
    assert not drops, drops
    checked.append(
        f"udp, --queues 2 both ends, offloads {snd['offloads']}: {FLOWS} parallel flows x "
        f"{EACH >> 20} MiB SHA-256 equal, no drops; sender TUN reads per queue "
        f"{snd['dev_reads_q0']}/{snd['dev_reads_q1']}, receiver "
        f"{rcv['dev_reads_q0']}/{rcv['dev_reads_q1']}"
    )


def test_more_queues_than_cpus_is_one_line(lab_factory, keys, checked):
    lab = lab_factory(tag="stmq")
    n = max_queues() + 1
    argv = [DatagramPair(lab, transport="udp").cmd, "-i", DEV, "-s", "--transport", "udp"]
    argv += ["--key", str(keys[0]), "--queues", str(n)]
    p = lab.spawn(lab.ns_a, argv, name="toomany")
    assert p.wait(15) == 2
    err = p.stderr().strip()
    assert err.count("\n") == 0, err
    assert f"--queues: queues must be 1-{max_queues()}" in err, err
    checked.append(f"--queues {n} on {max_queues()} CPUs: exit 2, {err!r}")


def test_deleted_multi_queue_device_comes_back_with_its_queues(lab_factory, keys, checked):
    if max_queues() < 2:
        pytest.skip("one CPU: --queues 2 is refused here (see the refusal test)")
    lab = lab_factory(tag="stmq")
    q = ("--queues", "2")
    t = DatagramPair(lab, transport="udp", key_a=keys[0], mtu=MTU, server_args=q, client_args=q)
    t.start(timeout=20)
    try:
        lab.run(lab.ns_a, ["ip", "link", "del", DEV])
        t.wait_up(timeout=30)
        assert "was deleted; recreating it" in t.server.stderr(), t.logs()
        queues = lab.run(lab.ns_a, ["ls", f"/sys/class/net/{DEV}/queues"]).stdout.decode().split()
        assert sorted(queues) == ["rx-0", "rx-1", "tx-0", "tx-1"], queues
        results = _parallel_transfers(t, 2, 4 * 1024 * 1024)
        after = io_counters(t.server)
    finally:
        t.stop()
    for tx, rx in results:
        assert tx["sha256"] == rx["sha256"] and rx["bytes"] == 4 * 1024 * 1024, (tx, rx)
    assert "dev_reads_q1" in after, after
    checked.append(
        f"--queues 2: {DEV} deleted -> recreated with 2 queues, 2 flows SHA-256 equal after; "
        f"server reads per queue {after['dev_reads_q0']}/{after['dev_reads_q1']}"
    )
