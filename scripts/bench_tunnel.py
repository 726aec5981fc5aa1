"""Tunnel benchmark: one TCP flow (iperf3) and ping RTT between two namespaces, over the bare
veth and through simpletun: ESP over TCP, ESP-in-UDP and raw ESP (tunnel MTU 1400 on the
datagram transports so that the outer packets fit the 1500-byte veth), each with offloads (TUN
TSO/GRO, and UDP GSO/GRO) and without (``SIMPLETUN_OFFLOADS=0``), and, with
``--base DIR``, the same transports run by another checkout's simpletun (e.g. main before a
change), and, with ``--peers``, other VPNs: OpenVPN (UDP, AES-256-GCM), boringtun and
wireguard-go (``scripts/bench_peers.py``; ``scripts/setup-peers.sh`` installs them).

Rounds are interleaved (every configuration once per round, in order) and every figure of a
row is the median over the rounds; ratios to the bare veth are taken within each round, so a
machine that gets busier or quieter during the run shifts all rows alike. Per row:

- Gbit/s and × veth (iperf3 single flow, B → A; ``--flows N``: N parallel flows, ``-P N``);
- CPU-s/GB: user + system CPU time of both tunnel-end processes (``/proc/PID/stat``) during the
  iperf3 run, per GB received (the noise-robust figure on a shared machine);
- B/read, B/dgram, B/write: bytes per TUN read at the sender, per datagram it sent, per TUN
  write at the receiver (the data plane's counters, logged on SIGUSR1; not for ``--base``);
- drops: the data plane's drop counters (both ends), the sending TUN device's queue drops
  (``tx_dropped``) and the receiver's UDP receive-buffer errors;
- median ping RTT at 1, 20 and 100 pings/s, and what the tunnel adds to the veth's.

"ESP/UDP offloads 2 queues" runs both ends with ``--queues 2`` (a multi-queue TUN device, one
device thread per queue; on machines with 2 or more CPUs): with ``--flows 4 --only UDP`` it
stands beside the one-queue row. The machine's load average is printed with each row. Run as
root via ``scripts/bench-tunnel.sh``; ``--plot FILE.png`` draws the table with gnuplot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "netns"))

import bench_peers  # noqa: E402
from dgtunnel import DatagramPair  # noqa: E402

from simpletun.config import max_queues  # noqa: E402
from simpletun.lab import TUN_A_ADDR, VETH_A_ADDR, Lab, missing_prerequisites  # noqa: E402
from simpletun.lab.tunnel import DEV, TunnelPair, genkey, io_counters, simpletun_cmd  # noqa: E402

IPERF_PORT = 5201
RATES = (1, 20, 100)
# Issue 9's targets: ESP single flow >= 0.30x veth, <= 4 CPU-s/GB, added RTT <= 0.15 ms.
TARGET_X_VETH = 0.30
TARGET_CPU_PER_GB = 4.0
TARGET_ADDED_RTT_MS = 0.15
OFF = {"SIMPLETUN_OFFLOADS": "0"}


def configs(
    key: Path, base_cmd: str | None, only: list[str] | None, peers: bool = False
) -> list[dict]:
    esp = {"key_a": key, "cipher": "aes-128-cbc"}
    udp = {**esp, "transport": "udp", "mtu": 1400}
    raw = {**esp, "transport": "raw", "mtu": 1400}
    rows = [
        {"name": "bare veth", "kw": None},
        {"name": "ESP/TCP offloads", "kw": esp},
        {"name": "ESP/TCP no offloads", "kw": esp, "env": OFF},
        {"name": "ESP/UDP offloads", "kw": udp},
        {"name": "ESP/UDP no offloads", "kw": udp, "env": OFF},
        {"name": "raw ESP offloads", "kw": raw},
        {"name": "raw ESP no offloads", "kw": raw, "env": OFF},
    ]
    if max_queues() >= 2:
        q2 = ("--queues", "2")
        i = next(i for i, r in enumerate(rows) if r["name"] == "ESP/UDP offloads") + 1
        kw = {**udp, "server_args": q2, "client_args": q2}
        rows.insert(i, {"name": "ESP/UDP offloads 2 queues", "kw": kw})
    if base_cmd:
        rows += [
            {"name": "base ESP/TCP", "kw": esp, "cmd": base_cmd},
            {"name": "base ESP/UDP", "kw": udp, "cmd": base_cmd},
            {"name": "base raw ESP", "kw": raw, "cmd": base_cmd},
        ]
    if peers:
        rows += peer_configs()
    if only:
        rows = [r for r in rows if r["kw"] is None or any(o in r["name"] for o in only)]
    return rows


def peer_configs() -> list[dict]:
    """One row per peer VPN; a peer that is not installed gets ``why`` (its row says so)."""
    return [
        {
            "name": bench_peers.row_name(p, bench_peers.version(p)),
            "kw": {},
            "peer": p,
            "why": bench_peers.missing(p),
        }
        for p in bench_peers.PEERS
    ]


def iperf(lab: Lab, dst: str, seconds: float, flows: int = 1) -> tuple[float, int]:
    """``flows`` parallel TCP flows from B to ``dst`` in A; returns (Gbit/s, bytes received)."""
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "-P", str(flows)]
    proc = lab.run(lab.ns_b, argv, check=False, timeout=seconds + 30)
    try:
        res = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON: {proc.stderr.decode(errors='replace')}") from None
    if "error" in res:
        raise RuntimeError(f"iperf3: {res['error']}")
    r = res["end"]["sum_received"]
    return r["bits_per_second"] / 1e9, int(r["bytes"])


def ping_median(lab: Lab, dst: str, rate: int, seconds: float) -> float:
    """Median RTT (ms) of ``rate`` pings per second for ``seconds`` (at least 5 pings), after
    3 warm-up pings."""
    interval = 1.0 / rate
    lab.ping(lab.ns_b, dst, count=3, interval=min(interval, 0.2), wait=1)
    count = max(5, int(rate * seconds))
    argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", dst]
    proc = lab.run(lab.ns_b, argv, check=False, timeout=count * (interval + 1) + 10)
    times = [float(x) for x in re.findall(r"time=([\d.]+) ms", proc.stdout.decode())]
    if not times:
        raise RuntimeError(f"no ping reply from {dst}")
    return statistics.median(times)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (/proc/PID/stat fields 14 and 15)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def read_int(lab: Lab, ns: str, path: str) -> int:
    proc = lab.run(ns, ["cat", path], check=False)
    return int(proc.stdout.decode().strip() or 0) if proc.returncode == 0 else 0


def udp_rcvbuf_errors(lab: Lab, ns: str) -> int:
    """RcvbufErrors of UDP and UDP6 in ``ns`` (/proc/net/snmp, snmp6)."""
    out = lab.run(ns, ["cat", "/proc/net/snmp", "/proc/net/snmp6"], check=False).stdout.decode()
    total = 0
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Udp: InDatagrams") and i + 1 < len(lines):
            names, values = line.split()[1:], lines[i + 1].split()[1:]
            total += int(dict(zip(names, values, strict=False)).get("RcvbufErrors", 0))
        elif line.startswith("Udp6RcvbufErrors"):
            total += int(line.split()[1])
    return total


def snapshot(lab: Lab, t, counters: bool) -> dict:
    s = {
        "cpu": cpu_seconds([t.server.pid, t.client.pid]),
        "tun_drops": read_int(
            lab, lab.ns_b, f"/sys/class/net/{getattr(t, 'dev_b', DEV)}/statistics/tx_dropped"
        ),
        "rcvbuf": udp_rcvbuf_errors(lab, lab.ns_a),
    }
    if counters:
        s["snd"], s["rcv"] = io_counters(t.client), io_counters(t.server)
    return s


def delta(a: dict, b: dict, key: str) -> int:
    return int(b.get(key, 0)) - int(a.get(key, 0))


def ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def measure(lab: Lab, cfg: dict, args) -> dict:
    t = None
    try:
        if cfg["kw"] is None:
            dst = VETH_A_ADDR
        elif "peer" in cfg:
            if cfg.get("why"):
                raise bench_peers.PeerError(cfg["why"])
            t = bench_peers.PeerPair(lab, cfg["peer"])
            t.start(timeout=30)
            dst = TUN_A_ADDR
        else:
            kw = dict(cfg["kw"], env=cfg.get("env"), cmd=cfg.get("cmd"))
            t = DatagramPair(lab, **kw) if "transport" in kw else TunnelPair(lab, **kw)
            t.start(timeout=30)
            dst = TUN_A_ADDR
        row: dict = {"config": cfg["name"], "load": os.getloadavg()[0]}
        counters = t is not None and cfg.get("cmd") is None and "peer" not in cfg
        before = snapshot(lab, t, counters) if t else None
        row["gbps"], nbytes = iperf(lab, dst, args.time, args.flows)
        if t is not None:
            after = snapshot(lab, t, counters)
            row["cpu_per_gb"] = (after["cpu"] - before["cpu"]) / (nbytes / 1e9)
            row["tun_drops"] = after["tun_drops"] - before["tun_drops"]
            row["rcvbuf_errors"] = after["rcvbuf"] - before["rcvbuf"]
            if counters:
                snd0, snd1, rcv0, rcv1 = before["snd"], after["snd"], before["rcv"], after["rcv"]
                row["b_per_read"] = ratio(
                    delta(snd0, snd1, "dev_read_bytes"), delta(snd0, snd1, "dev_reads")
                )
                row["b_per_dgram"] = ratio(
                    delta(snd0, snd1, "wire_tx_bytes"), delta(snd0, snd1, "wire_tx_packets")
                )
                row["b_per_write"] = ratio(
                    delta(rcv0, rcv1, "dev_write_bytes"), delta(rcv0, rcv1, "dev_writes")
                )
                keys = {k for d in (snd1, rcv1) for k in d if k.startswith("drop_")}
                row["dp_drops"] = sum(delta(snd0, snd1, k) + delta(rcv0, rcv1, k) for k in keys)
                row["offloads"] = snd1.get("offloads")
                qk = sorted(k for k in snd1 if k.startswith("dev_reads_q"))
                if qk:  # a multi-queue device: the sender's reads per queue
                    row["queue_reads"] = "/".join(str(delta(snd0, snd1, k)) for k in qk)
        for rate in RATES:
            row[f"rtt{rate}"] = ping_median(lab, dst, rate, args.ping_seconds)
        return row
    finally:
        if t is not None:
            t.stop()


def median(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(rounds: list[list[dict]]) -> list[dict]:
    """One row per configuration: medians over the rounds; × veth and added RTT per round."""
    out = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds if "error" not in r[i]]
        veths = [r[0] for r in rounds if "error" not in r[i]]
        s: dict = {"config": first["config"], "rounds": len(runs)}
        if not runs:
            s["error"] = first.get("error", "failed")
            out.append(s)
            continue
        s["gbps"] = median([r["gbps"] for r in runs])
        s["x_veth"] = median([r["gbps"] / v["gbps"] for r, v in zip(runs, veths, strict=True)])
        for k in ("cpu_per_gb", "b_per_read", "b_per_dgram", "b_per_write", "load"):
            s[k] = median([r.get(k) for r in runs])
        for k in ("dp_drops", "tun_drops", "rcvbuf_errors"):
            s[k] = median([r.get(k) for r in runs])
        for rate in RATES:
            s[f"rtt{rate}"] = median([r[f"rtt{rate}"] for r in runs])
            s[f"added{rate}"] = median(
                [r[f"rtt{rate}"] - v[f"rtt{rate}"] for r, v in zip(runs, veths, strict=True)]
            )
        s["offloads"] = next((r.get("offloads") for r in runs if r.get("offloads")), None)
        out.append(s)
    return out


def fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def table(summary: list[dict]) -> list[str]:
    cols = ["configuration", "Gbit/s", "x veth", "CPU-s/GB", "B/read", "B/dgram", "B/write"]
    cols += ["drops dp/tun/udp"]
    cols += [f"RTT@{r}/s (+veth)" for r in RATES]
    rows: list[list[str] | str] = []
    for s in summary:
        if "error" in s:
            rows.append(s["config"])  # a line of its own: "not run: why"
            continue
        drops = "/".join(fmt(s[k], ".0f") for k in ("dp_drops", "tun_drops", "rcvbuf_errors"))
        cells = [
            s["config"],
            f"{s['gbps']:.2f}",
            f"{s['x_veth']:.2f}",
            fmt(s["cpu_per_gb"], ".2f"),
            fmt(s["b_per_read"], ".0f"),
            fmt(s["b_per_dgram"], ".0f"),
            fmt(s["b_per_write"], ".0f"),
            drops if s["config"] != "bare veth" else "-",
        ]
        for r in RATES:
            added = "" if s["config"] == "bare veth" else f" ({s[f'added{r}']:+.3f})"
            cells.append(f"{s[f'rtt{r}']:.3f}{added}")
        rows.append(cells)
    cells_rows = [r for r in rows if isinstance(r, list)]
    widths = [max(len(c), *(len(row[i]) for row in cells_rows)) for i, c in enumerate(cols)]
    widths[0] = max(widths[0], *(len(s["config"]) for s in summary))
    errors = {s["config"]: s["error"] for s in summary if "error" in s}

    def line(cells):
        if isinstance(cells, str):
            return f"{cells.ljust(widths[0])}  not run: {errors[cells]}"
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(cols), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def peer_lines(summary: list[dict], rounds: list[list[dict]], cfgs: list[dict]) -> list[str]:
    """Ratios of simpletun's fastest row to each peer VPN's (medians of per-round ratios) and
    the note on Debian's wireguard-go."""
    ours = [
        i
        for i, c in enumerate(cfgs)
        if c["kw"] and "peer" not in c and "cmd" not in c and "error" not in summary[i]
    ]
    peers = [i for i, c in enumerate(cfgs) if "peer" in c]
    if not peers:
        return []
    out = []
    if ours:
        best = max(ours, key=lambda i: summary[i]["x_veth"])
        for i in peers:
            r = bench_peers.ratios(rounds, best, i)
            if r is None:
                continue
            cpu = f", {r[1]:.2f}x its CPU-s/GB" if r[1] is not None else ""
            out.append(
                f"simpletun {cfgs[best]['name']} vs {cfgs[i]['name']}: {r[0]:.2f}x its "
                f"throughput{cpu} (median of per-round ratios)"
            )
    out.append(
        f"peers: tunnel MTU {bench_peers.PEER_MTU}; CPU-s/GB counts both peer processes (all "
        "their threads); OpenVPN in TLS mode without DCO, boringtun with its default threads"
    )
    if any(cfgs[i]["peer"] == "wireguard-go" for i in peers):
        out.append(bench_peers.WG_GO_NOTE)
    return out


GNUPLOT = """set terminal pngcairo size 1200,700 noenhanced font ",10"
set output '{png}'
set title "{title}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -30 scale 0
set ylabel "x bare veth (single TCP flow)"
set y2label "CPU-s per GB (both ends)"
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set key outside top center horizontal
plot '{dat}' using 2:xtic(1) title "x veth" axes x1y1, \\
     '' using 3 title "CPU-s/GB" axes x1y2
"""


def plot(summary: list[dict], png: str, title: str) -> str | None:
    """Draw × veth and CPU-s/GB per configuration with gnuplot; None, or why not."""
    if shutil.which("gnuplot") is None:
        return "gnuplot is not installed (scripts/setup.sh installs gnuplot-nox)"
    rows = [s for s in summary if "error" not in s and s["config"] != "bare veth"]
    with tempfile.TemporaryDirectory() as tmp:
        dat = Path(tmp) / "bench.dat"
        dat.write_text(
            "".join(f'"{s["config"]}" {s["x_veth"]:.4f} {s["cpu_per_gb"] or 0:.4f}\n' for s in rows)
        )
        script = Path(tmp) / "bench.gp"
        script.write_text(GNUPLOT.format(png=png, dat=dat, title=title))
        proc = subprocess.run(["gnuplot", str(script)], capture_output=True, timeout=60)
        if proc.returncode != 0:
            return proc.stderr.decode(errors="replace").strip()
    return None


def flows_text(n: int) -> str:
    return "single flow" if n == 1 else f"{n} parallel flows"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=float, default=5.0, help="iperf3 seconds per run (5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--ping-seconds", type=float, default=5.0, help="seconds of pings per rate (5)")
    ap.add_argument(
        "--base", metavar="DIR", help="also run another checkout's simpletun (DIR/.venv)"
    )
    ap.add_argument("--only", action="append", help="only configurations containing this")
    ap.add_argument("--flows", type=int, default=1, help="parallel TCP flows (iperf3 -P; 1)")
    ap.add_argument(
        "--peers",
        action="store_true",
        help="also OpenVPN, boringtun and wireguard-go (bench-tunnel.sh installs them)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--plot", metavar="FILE.png", help="draw x veth and CPU-s/GB (gnuplot)")
    args = ap.parse_args()

    missing = missing_prerequisites()
    if simpletun_cmd() is None:
        missing.append("the simpletun command (run scripts/setup.sh)")
    base_cmd = None
    if args.base:
        base_cmd = str(Path(args.base).resolve() / ".venv" / "bin" / "simpletun")
        if not os.access(base_cmd, os.X_OK):
            missing.append(f"{base_cmd} (run scripts/setup.sh in {args.base})")
    if missing:
        print("bench-tunnel: cannot run: " + "; ".join(missing), file=sys.stderr)
        return 1

    rounds: list[list[dict]] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="simpletun-bench-") as tmp, Lab(tmp) as lab:
        key = genkey(Path(tmp) / "key")
        srv = lab.spawn(lab.ns_a, ["iperf3", "-s", "-p", str(IPERF_PORT)], name="iperf3-server")
        time.sleep(0.3)
        if not srv.alive():
            print(f"bench-tunnel: iperf3 server failed: {srv.stderr()}", file=sys.stderr)
            return 1
        cfgs = configs(key, base_cmd, args.only, args.peers)
        print(
            f"bench-tunnel: {os.cpu_count()} CPUs, load average {load0[0]:.2f}; "
            f"{args.rounds} interleaved rounds of {len(cfgs)} configurations; iperf3 -t "
            f"{args.time:g} {flows_text(args.flows)} B->A; pings at "
            f"{'/'.join(map(str, RATES))} per s "
            f"for {args.ping_seconds:g} s each"
        )
        for n in range(args.rounds):
            this = []
            for cfg in cfgs:
                try:
                    row = measure(lab, cfg, args)
                    print(
                        f"  round {n + 1} {cfg['name']}: {row['gbps']:.2f} Gbit/s, "
                        f"{fmt(row.get('cpu_per_gb'), '.2f')} CPU-s/GB, "
                        f"load {row['load']:.2f}"
                        + (
                            f", sender reads per queue {row['queue_reads']}"
                            if "queue_reads" in row
                            else ""
                        ),
                        flush=True,
                    )
                except Exception as exc:  # report the row as failed, measure the others
                    msg = str(exc).splitlines()[0]
                    print(f"  round {n + 1} {cfg['name']}: FAILED: {msg}", file=sys.stderr)
                    if cfg["kw"] is None:
                        return 1
                    row = {"config": cfg["name"], "error": msg}
                this.append(row)
            rounds.append(this)
    load1 = os.getloadavg()

    summary = summarize(rounds)
    print()
    for line in table(summary):
        print(line)
    print()
    loads = [r["load"] for rnd in rounds for r in rnd if "load" in r]
    print(
        f"load average (1 min) during the rows: {min(loads):.2f}-{max(loads):.2f} "
        f"on {os.cpu_count()} CPUs (start {load0[0]:.2f}, end {load1[0]:.2f}); medians of "
        f"{args.rounds} rounds; x veth and added RTT within each round"
    )
    print(
        "B/read, B/dgram: sender's bytes per TUN read / per datagram sent; B/write: "
        "receiver's bytes per TUN write; drops: data plane / sending TUN queue / receiver UDP "
        "buffer"
    )
    print(
        f"targets (issue 9, not enforced): ESP >= {TARGET_X_VETH:.2f}x veth, <= "
        f"{TARGET_CPU_PER_GB:g} CPU-s/GB, added median RTT <= {TARGET_ADDED_RTT_MS:g} ms"
    )
    for line in peer_lines(summary, rounds, cfgs):
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n"
        )
    if args.plot:
        what = "simpletun and other VPNs" if args.peers else "simpletun"
        why = plot(summary, args.plot, f"{what}, {flows_text(args.flows)}, {os.cpu_count()} CPUs")
        print(f"plot: {args.plot}" if why is None else f"plot: not drawn: {why}")
    # a peer VPN that cannot run here is reported in its row, not a failure of the benchmark
    failed = [s for s, c in zip(summary, cfgs, strict=True) if "error" in s and "peer" not in c]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
