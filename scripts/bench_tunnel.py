"""Tunnel benchmark: single-flow TCP throughput (iperf3) and ping RTT between two namespaces,
over the bare veth and through simpletun in plaintext and ESP (aes-128-cbc, aes-256-cbc) mode
over TCP, and ESP over UDP (ESP-in-UDP) and raw ESP (--transport udp|raw; tunnel MTU 1400 so
that the outer packets fit the 1500-byte veth unfragmented).

Run as root via ``scripts/bench-tunnel.sh``. One lab (two namespaces + veth) serves every
configuration, so the only thing that changes between rows is the tunnel. Prints a table; the
targets are printed for reference, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "netns"))

from dgtunnel import DatagramPair  # noqa: E402

from simpletun.lab import TUN_A_ADDR, VETH_A_ADDR, Lab, missing_prerequisites  # noqa: E402
from simpletun.lab.tunnel import TunnelPair, genkey, simpletun_cmd  # noqa: E402

IPERF_PORT = 5201
TARGET_GBPS = 1.0
TARGET_ADDED_RTT_MS = 0.2
CLASSIC = "classic simpletun.c on this machine (reference): 0.14 Gbit/s, RTT 42 ms"


def iperf(lab: Lab, dst: str, seconds: float, reverse: bool = False) -> float:
    """Single-flow TCP from B to ``dst`` in A (A to B with ``reverse``); returns Gbit/s."""
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "-P", "1"]
    if reverse:
        argv.append("-R")
    proc = lab.run(lab.ns_b, argv, check=False, timeout=seconds + 30)
    try:
        res = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON: {proc.stderr.decode(errors='replace')}") from None
    if "error" in res:
        raise RuntimeError(f"iperf3: {res['error']}")
    return res["end"]["sum_received"]["bits_per_second"] / 1e9


def rtt(lab: Lab, dst: str, count: int, interval: float) -> dict:
    """``count`` pings at ``interval`` s after 5 warm-up pings; avg/median/min/max in ms."""
    lab.ping(lab.ns_b, dst, count=5, interval=interval, wait=1)
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", dst]
    proc = lab.run(lab.ns_b, argv, check=False, timeout=count * (interval + 1) + 10)
    times = [float(x) for x in re.findall(r"time=([\d.]+) ms", proc.stdout.decode())]
    if not times:
        raise RuntimeError(f"no ping reply from {dst}")
    return {
        "avg": statistics.fmean(times),
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "got": len(times),
        "sent": count,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=float, default=5.0, help="iperf3 seconds per run (5)")
    ap.add_argument("--pings", type=int, default=50, help="pings per RTT measurement (50)")
    ap.add_argument("--interval", type=float, default=0.01, help="ping interval, s (0.01)")
    ap.add_argument("--reverse", action="store_true", help="also measure A->B (iperf3 -R)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()

    missing = missing_prerequisites()
    if simpletun_cmd() is None:
        missing.append("the simpletun command (run scripts/setup.sh)")
    if missing:
        print("bench-tunnel: cannot run: " + "; ".join(missing), file=sys.stderr)
        return 1

    results = []
    with tempfile.TemporaryDirectory(prefix="simpletun-bench-") as tmp, Lab(tmp) as lab:
        key = genkey(Path(tmp) / "key")
        srv = lab.spawn(lab.ns_a, ["iperf3", "-s", "-p", str(IPERF_PORT)], name="iperf3-server")
        time.sleep(0.3)
        if not srv.alive():
            print(f"bench-tunnel: iperf3 server failed: {srv.stderr()}", file=sys.stderr)
            return 1
        configs = [
            ("bare veth", None),
            ("simpletun plaintext", {"plaintext": True}),
            ("simpletun ESP aes-128-cbc", {"key_a": key, "cipher": "aes-128-cbc"}),
            ("simpletun ESP aes-256-cbc", {"key_a": key, "cipher": "aes-256-cbc"}),
            ("simpletun ESP-in-UDP aes-128", {"key_a": key, "transport": "udp", "mtu": 1400}),
            ("simpletun raw ESP aes-128", {"key_a": key, "transport": "raw", "mtu": 1400}),
        ]
        print(
            f"bench-tunnel: namespaces {lab.ns_a} (server) and {lab.ns_b} (client), veth "
            f"{VETH_A_ADDR}; {os.cpu_count()} CPUs; iperf3 -t {args.time:g} single flow; "
            f"{args.pings} pings at {args.interval:g} s"
        )
        for name, kw in configs:
            t = None
            try:
                if kw is None:
                    dst = VETH_A_ADDR
                else:
                    t = DatagramPair(lab, **kw) if "transport" in kw else TunnelPair(lab, **kw)
                    t.start()
                    dst = TUN_A_ADDR
                print(f"  {name}: measuring...", flush=True)
                r = rtt(lab, dst, args.pings, args.interval)
                gbps = iperf(lab, dst, args.time)
                row = {
                    "config": name,
                    "gbps": gbps,
                    "rtt_ms": r["avg"],
                    "rtt_median_ms": r["median"],
                    "rtt_max_ms": r["max"],
                    "pings": f"{r['got']}/{r['sent']}",
                }
                if args.reverse:
                    row["gbps_reverse"] = iperf(lab, dst, args.time, reverse=True)
                results.append(row)
            except Exception as exc:  # report the row as failed, measure the others
                msg = str(exc).splitlines()[0]
                print(f"  {name}: FAILED: {msg}", file=sys.stderr)
                if t is not None:
                    print(t.logs()[-1500:], file=sys.stderr)
                if kw is None:
                    return 1
                results.append({"config": name, "error": msg})
            finally:
                if t is not None:
                    t.stop()

    base = results[0]
    cols = ["configuration", "Gbit/s", "x veth", "RTT avg ms", "added RTT ms", "median", "max"]
    cols.append("pings")
    if args.reverse:
        cols.insert(2, "Gbit/s A->B")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["config"], "FAILED"] + [""] * (len(cols) - 2))
            continue
        cells = [
            r["config"],
            f"{r['gbps']:.2f}",
            f"{r['gbps'] / base['gbps']:.2f}",
            f"{r['rtt_ms']:.3f}",
            "-" if r is base else f"{r['rtt_ms'] - base['rtt_ms']:+.3f}",
            f"{r['rtt_median_ms']:.3f}",
            f"{r['rtt_max_ms']:.3f}",
            r["pings"],
        ]
        if args.reverse:
            cells.insert(2, f"{r['gbps_reverse']:.2f}")
        rows.append(cells)
    print()
    for line in _table(cols, rows):
        print(line)
    print()
    print(
        f"targets (reference, not enforced): ESP >= {TARGET_GBPS:g} Gbit/s single flow, "
        f"added RTT <= {TARGET_ADDED_RTT_MS:g} ms"
    )
    for r in results[2:]:
        if "error" in r:
            print(f"  {r['config']}: FAILED ({r['error']})")
            continue
        added = r["rtt_ms"] - base["rtt_ms"]
        ok_t = "met" if r["gbps"] >= TARGET_GBPS else "NOT met"
        ok_r = "met" if added <= TARGET_ADDED_RTT_MS else "NOT met"
        print(
            f"  {r['config']}: {r['gbps']:.2f} Gbit/s (target {ok_t}), "
            f"added RTT {added:+.3f} ms (target {ok_r})"
        )
    print("(RTT: avg of the pings after 5 warm-up ones; added RTT = avg minus the bare veth's)")
    print(CLASSIC)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [fmt(cols), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


if __name__ == "__main__":
    sys.exit(main())
