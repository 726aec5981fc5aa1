"""Soak under attack (not part of CI): a tunnel carrying traffic between two namespaces while
the hostile-network attacks run against its server, for ``--seconds`` (default 600).

Running all the time, from the client's own namespace (same source address, the hardest case):
48 idle connections reopened as soon as dropped, and connections sending an 0xffff length prefix.
Every ``--delete-every`` seconds the client's device is deleted under it. Traffic: a ping every
0.1 s through the tunnel, and a 4 MiB transfer with SHA-256 check every 30 s.

Every 10 s and at the end it prints both ends' RSS, open fds and log bytes; at the end, lost
pings, transfers and the attackers' counts. Run as root: ``bash scripts/soak.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from simpletun.lab import TUN_A_ADDR, VETH_A_ADDR, Lab, missing_prerequisites, parse_ping
from simpletun.lab.tunnel import DEV, PORT, TunnelPair, genkey

ATTACK = str(Path(__file__).resolve().parent.parent / "tests" / "netns" / "attack.py")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--delete-every", type=float, default=120.0)
    args = ap.parse_args()
    missing = missing_prerequisites()
    if missing:
        print("soak: cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="simpletun-soak-") as tmp, Lab(tmp) as lab:
        key = genkey(Path(tmp) / "key")
        t = TunnelPair(lab, key_a=key)
        t.start()
        py = sys.executable
        n_pings = int(args.seconds * 10)
        pinger = lab.spawn(
            lab.ns_b,
            ["ping", "-n", "-q", "-i", "0.1", "-W", "1", "-c", str(n_pings), TUN_A_ADDR],
            name="ping",
        )
        attackers = [
            lab.spawn(lab.ns_b, [py, ATTACK, "idle", VETH_A_ADDR, str(PORT), "--conns", "48",
                                 "--seconds", str(args.seconds)], name="idle"),
            lab.spawn(lab.ns_b, [py, ATTACK, "garbage", VETH_A_ADDR, str(PORT),
                                 "--seconds", str(args.seconds)], name="garbage"),
        ]  # fmt: skip
        start = time.monotonic()
        samples = []
        transfers = {"ok": 0, "failed": 0}
        deletions = 0
        next_delete = start + args.delete_every
        next_xfer = start + 15
        next_sample = start
        seed = 1
        print(f"soak: {args.seconds:.0f} s, attacks running, pings every 0.1 s", flush=True)
        print(f"{'t(s)':>6} {'srv RSS kB':>10} {'cli RSS kB':>10} {'srv fds':>7} {'cli fds':>7} "
              f"{'srv log B':>10} {'cli log B':>10}", flush=True)  # fmt: skip
        while True:
            now = time.monotonic()
            if now >= next_sample:
                s = {
                    "t": now - start,
                    "srv_rss": rss_kb(t.server.pid),
                    "cli_rss": rss_kb(t.client.pid),
                    "srv_fds": fds(t.server.pid),
                    "cli_fds": fds(t.client.pid),
                    "srv_log": len(t.server.stderr().encode()),
                    "cli_log": len(t.client.stderr().encode()),
                }
                samples.append(s)
                cols = ("srv_rss", "cli_rss", "srv_fds", "cli_fds", "srv_log", "cli_log")
                widths = (10, 10, 7, 7, 10, 10)
                row = " ".join(f"{s[c]:{w}d}" for c, w in zip(cols, widths, strict=True))
                print(f"{s['t']:6.0f} {row}", flush=True)
                next_sample += 10
            if now - start >= args.seconds:
                break
            if now >= next_delete:
                lab.run(lab.ns_b, ["ip", "link", "del", DEV], check=False)
                deletions += 1
                next_delete += args.delete_every
            if now >= next_xfer:
                try:
                    tx, rx = t.transfer(4 << 20, seed=seed, timeout=20)
                    ok = tx["sha256"] == rx["sha256"]
                except AssertionError:
                    ok = False
                transfers["ok" if ok else "failed"] += 1
                seed += 1
                next_xfer += 30
            time.sleep(0.2)
        pinger.wait(30)
        sent, got, _ = parse_ping(pinger.stdout())
        results = [json.loads(a.stdout().splitlines()[-1]) for a in attackers if a.wait(30) == 0]
        alive = t.server.alive() and t.client.alive()
        first, last = samples[0], samples[-1]
        duration = last["t"] - first["t"] or 1.0
        print()
        print("soak summary")
        print(f"  duration            {duration:.0f} s; both ends alive at the end: {alive}")
        for side in ("srv", "cli"):
            rss = [s[f"{side}_rss"] for s in samples]
            fd = [s[f"{side}_fds"] for s in samples]
            logb = last[f"{side}_log"] - first[f"{side}_log"]
            print(f"  {side} RSS kB          start {rss[0]}, end {rss[-1]}, max {max(rss)}")
            print(f"  {side} open fds        start {fd[0]}, end {fd[-1]}, max {max(fd)}")
            print(f"  {side} log             {logb} bytes = {logb / duration:.0f} B/s")
        lost = sent - got
        share = 100 * lost / max(sent, 1)
        print(f"  pings               {got}/{sent} answered, {lost} lost ({share:.2f} %)")
        print(f"  device deletions    {deletions} (client side)")
        print(
            f"  transfers (4 MiB)   {transfers['ok']} equal SHA-256, {transfers['failed']} failed"
        )
        for r in results:
            print(f"  attacker            {json.dumps(r)}")
        return 0 if alive and transfers["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
