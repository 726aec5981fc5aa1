"""Side-by-side benchmark: bare veth, the Linux kernel's ESP (xfrm, configured by simpletun from
a manual key file) and simpletun's userspace ESP, between two namespaces, with the same cipher,
window, ESN and transport: iperf3 single-flow TCP throughput, ping RTT, and CPU time per GB.

Run as root via ``scripts/bench-kernel.sh``. The kernel and simpletun rows are keyed from one
generated manual key file (simpletun.manual_keys, written 0600 to a temporary directory): the
kernel row installs its SAs with simpletun.xfrm, the simpletun row runs the real CLI
(``simpletun --manual-keys FILE``) in both namespaces. On a kernel without ESP the output says
so and the rest is measured.
CPU time per GB is machine-wide (/proc/stat busy time over the iperf3 run divided by the bytes
moved): kernel ESP work runs in softirq context and belongs to no process. Other load on the
machine inflates it; compare rows of one run. Under software emulation (the qemu guest) every
figure is emulated: such output is for correctness only and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "netns"))
sys.path.insert(0, str(REPO))

from lab import (  # noqa: E402
    VETH_A,
    VETH_A_ADDR,
    VETH_B,
    VETH_B_ADDR,
    Lab,
    missing_prerequisites,
    run_in_netns,  # noqa: E402
)

from simpletun import manual_keys, xfrm  # noqa: E402

IPERF_PORT = 5201
INNER_A, INNER_B = "10.252.0.1", "10.252.0.2"
USER_A, USER_B = "10.253.0.1", "10.253.0.2"  # the simpletun row's tunnel addresses


def emulated() -> bool:
    """True under software emulation (qemu TCG): the CPU model says so, or no hypervisor KVM."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "QEMU" in text or "TCG" in text


def busy_seconds() -> float:
    """Machine-wide busy CPU time (user+nice+system+irq+softirq+steal), seconds."""
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def iperf(lab: Lab, dst: str, seconds: float) -> dict:
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "-P", "1"]
    c0 = busy_seconds()
    proc = lab.run(lab.ns_b, argv, check=False, timeout=seconds + 30)
    cpu = busy_seconds() - c0
    try:
        res = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON: {proc.stderr.decode(errors='replace')}") from None
    if "error" in res:
        raise RuntimeError(f"iperf3: {res['error']}")
    got = res["end"]["sum_received"]
    gb = got["bytes"] / 1e9
    return {"gbps": got["bits_per_second"] / 1e9, "cpu_s_per_gb": cpu / gb if gb else None}


def rtt(lab: Lab, dst: str, count: int, interval: float) -> dict:
    lab.ping(lab.ns_b, dst, count=3, interval=interval, wait=1)
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", dst]
    proc = lab.run(lab.ns_b, argv, check=False, timeout=count * (interval + 1) + 10)
    times = [float(x) for x in re.findall(r"time=([\d.]+) ms", proc.stdout.decode())]
    if not times:
        raise RuntimeError(f"no ping reply from {dst}")
    return {"rtt_ms": statistics.fmean(times), "pings": f"{len(times)}/{count}"}


class KernelEsp:
    """Both namespaces' kernels keyed from one manual key file: A is the server, B the client;
    inner addresses on lo, routed over the veth, policies selecting them."""

    def __init__(self, lab: Lab, keys: manual_keys.ManualKeys) -> None:
        self.lab, self.keys = lab, keys
        self.encap_socks: list[socket.socket] = []

    def check(self) -> None:
        xfrm.check_esp(netns=self.lab.ns_a)

    def up(self) -> None:
        lab = self.lab
        ends = [
            (lab.ns_a, "server", VETH_A_ADDR, VETH_B_ADDR, INNER_A, INNER_B, VETH_A),
            (lab.ns_b, "client", VETH_B_ADDR, VETH_A_ADDR, INNER_B, INNER_A, VETH_B),
        ]
        for ns, role, local, remote, inner, peer_inner, dev in ends:
            lab.run(ns, ["ip", "addr", "add", f"{inner}/32", "dev", "lo"])
            lab.run(
                ns, ["ip", "route", "add", f"{peer_inner}/32", "via", remote, "dev", dev]
                + ["src", inner]
            )  # fmt: skip
            out, inn = self.keys.xfrm_sas(role, local, remote, reqid=1)
            xfrm.add_sa(out, netns=ns)
            xfrm.add_sa(inn, netns=ns)
            sel_out = xfrm.Selector.of(f"{inner}/32", f"{peer_inner}/32")
            sel_in = xfrm.Selector.of(f"{peer_inner}/32", f"{inner}/32")
            xfrm.add_policy(
                xfrm.Policy(sel_out, "out", (xfrm.Template(local, remote, reqid=1),)), netns=ns
            )
            xfrm.add_policy(
                xfrm.Policy(sel_in, "in", (xfrm.Template(remote, local, reqid=2),)), netns=ns
            )
            if self.keys.transport == "esp-in-udp":

                def encap_sock(port=self.keys.port):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind(("0.0.0.0", port))
                    s.setsockopt(socket.IPPROTO_UDP, 100, 2)  # UDP_ENCAP, ESPINUDP
                    return s

                self.encap_socks.append(run_in_netns(ns, encap_sock))

    def counters(self) -> dict:
        out, _ = self.keys.xfrm_sas("client", VETH_B_ADDR, VETH_A_ADDR)
        st = xfrm.get_sa(out.dst, out.spi, out.src, netns=self.lab.ns_b)
        return st.counters("out")

    def down(self) -> None:
        for s in self.encap_socks:
            s.close()


class UserspaceEsp:
    """simpletun's userspace data plane in both namespaces, the real CLI keyed from the same
    manual key file as the kernel row (A the server, its peer fixed at B's address)."""

    def __init__(self, lab: Lab, key_file: str, keys: manual_keys.ManualKeys) -> None:
        self.lab, self.key_file = lab, key_file
        self.transport = "udp" if keys.transport == "esp-in-udp" else "raw"
        self.procs = []

    def up(self) -> None:
        exe = shutil.which("simpletun") or str(REPO / ".venv" / "bin" / "simpletun")
        common = ["-i", "bku0", "-d", "--transport", self.transport, "--manual-keys", self.key_file]
        lab = self.lab
        for ns, mode, addr in (
            (lab.ns_a, ["-s", "--peer", VETH_B_ADDR], USER_A),
            (lab.ns_b, ["-c", VETH_A_ADDR], USER_B),
        ):
            p = lab.spawn(ns, [exe, *common, *mode, "--addr", f"{addr}/24"], name="simpletun")
            self.procs.append(p)
            p.wait_for_output(r"manual keys", timeout=120)

    def counters(self) -> dict:
        """The client's counters as it reports them on exit (``-d``)."""
        from simpletun.lab.tunnel import session_counters

        client = self.procs[1]
        client.stop()
        found = session_counters(client.stderr())
        return found[-1] if found else {}

    def down(self) -> None:
        for p in self.procs:
            p.stop()


def plot(rows: list[dict], path: Path) -> str:
    if shutil.which("gnuplot") is None:
        return "no PNG: gnuplot is not installed (apt-get install gnuplot-nox)"
    data = [r for r in rows if "gbps" in r]
    with tempfile.TemporaryDirectory() as d:
        dat = Path(d) / "data"
        dat.write_text(
            "".join(f'"{r["config"]}" {r["gbps"]:.4f} {r["rtt_ms"]:.4f}\n' for r in data)
        )
        script = f"""
set terminal png size 900,420
set output '{path}'
set multiplot layout 1,2 title 'simpletun bench-kernel'
set style data histograms
set style fill solid 0.6
set boxwidth 0.7
set xtics rotate by -20
set yrange [0:*]
set title 'iperf3 single flow (Gbit/s)'
plot '{dat}' using 2:xtic(1) notitle
set title 'ping RTT (ms)'
plot '{dat}' using 3:xtic(1) notitle
unset multiplot
"""
        r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        return f"no PNG: gnuplot failed: {r.stderr.strip()[:200]}"
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=float, default=5.0, help="iperf3 seconds per run (5)")
    ap.add_argument("--pings", type=int, default=50, help="pings per RTT measurement (50)")
    ap.add_argument("--interval", type=float, default=0.01, help="ping interval, s (0.01)")
    ap.add_argument("--key-bits", type=int, default=128, choices=(128, 192, 256))
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--esn", action="store_true")
    ap.add_argument("--transport", default="esp-in-udp", choices=manual_keys.TRANSPORTS)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--png", metavar="FILE", default="bench-kernel.png", help="plot (PNG)")
    ap.add_argument("--emulated", action="store_true", help="say the figures are emulated")
    args = ap.parse_args(argv)

    missing = missing_prerequisites()
    if missing:
        print("bench-kernel: cannot run: " + "; ".join(missing), file=sys.stderr)
        return 1
    key_text = manual_keys.generate(
        key_bits=args.key_bits,
        replay_window=args.window,
        esn=args.esn,
        transport=args.transport,
    )
    keys = manual_keys.parse(key_text)
    emu = args.emulated or emulated()
    setting = (
        f"aes-{args.key_bits}-cbc + hmac-sha256-128, window {args.window}, "
        f"ESN {'on' if args.esn else 'off'}, transport {args.transport}"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="simpletun-bench-") as tmp, Lab(tmp, tag="bk") as lab:
        key_file = os.path.join(tmp, "keys.toml")  # one file for both ESP rows
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_text)
        srv = lab.spawn(lab.ns_a, ["iperf3", "-s", "-p", str(IPERF_PORT)], name="iperf3-server")
        time.sleep(0.3)
        print(
            f"bench-kernel: {lab.ns_a} <-> {lab.ns_b} over veth; {os.cpu_count()} CPUs; "
            f"iperf3 -t {args.time:g}; {args.pings} pings; {setting}"
        )
        if emu:
            print("bench-kernel: SOFTWARE EMULATION: all figures are emulated, correctness only")
        if not srv.alive():
            print(f"bench-kernel: iperf3 server failed: {srv.stderr()}", file=sys.stderr)
            return 1

        def measure(name: str, dst: str, extra=None) -> None:
            print(f"  {name}: measuring...", flush=True)
            row = {"config": name} | rtt(lab, dst, args.pings, args.interval)
            row |= iperf(lab, dst, args.time)
            if extra is not None:
                row["sa_counters"] = extra()
            rows.append(row)

        measure("bare veth", VETH_A_ADDR)
        kesp = KernelEsp(lab, keys)
        try:
            kesp.check()
        except xfrm.KernelEspMissing as e:
            print(f"bench-kernel: this kernel has no ESP, the kernel row is not measured: {e}")
            print("bench-kernel: measuring the rest (bare veth, simpletun userspace ESP)")
            rows.append({"config": "kernel ESP (xfrm)", "skipped": str(e)})
        else:
            try:
                kesp.up()
                measure("kernel ESP (xfrm)", INNER_A, kesp.counters)
            finally:
                kesp.down()
        user = UserspaceEsp(lab, key_file, keys)
        try:
            user.up()
            measure("simpletun userspace ESP", USER_A, user.counters)
        finally:
            user.down()

    base = rows[0]
    cols = ["configuration", "Gbit/s", "x veth", "RTT ms", "added RTT", "CPU s/GB", "pings"]
    table = []
    for r in rows:
        if "skipped" in r:
            table.append([r["config"], "not measured"] + [""] * (len(cols) - 2))
            continue
        cpu = r["cpu_s_per_gb"]
        table.append(
            [
                r["config"],
                f"{r['gbps']:.2f}",
                f"{r['gbps'] / base['gbps']:.2f}",
                f"{r['rtt_ms']:.3f}",
                "-" if r is base else f"{r['rtt_ms'] - base['rtt_ms']:+.3f}",
                "-" if cpu is None else f"{cpu:.2f}",
                r["pings"],
            ]
        )
    print()
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    for cells in [cols, ["-" * w for w in widths], *table]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    print()
    for r in rows:
        if "skipped" in r:
            print(f"  {r['config']}: not measured: {r['skipped']}")
        if "sa_counters" in r:
            print(f"  {r['config']}: client counters {r['sa_counters']}")
    print("  CPU s/GB: machine-wide busy CPU time during iperf3 per GB moved (other load counts)")
    if emu:
        print("  SOFTWARE EMULATION: the figures above are emulated; use them for correctness only")
    print("  " + plot(rows, Path(args.png).resolve()))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"setting": setting, "emulated": emu, "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
