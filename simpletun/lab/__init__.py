"""simpletun.lab: two-namespace network labs for testing tunnels, routes and firewalls.

Namespaces, a veth pair, processes inside them, captures, and (:class:`TunnelPair`) a simpletun
end in each; everything is torn down even on errors. What simpletun's own two-namespace suite
uses; see ``examples/lab_tunnel.py`` for a runnable example. Needs root. Stdlib only.

Topology built by :class:`Lab`::

    namespace A (st-a-<pid>-<n>)                 namespace B (st-b-<pid>-<n>)
    veth-a 10.250.0.1/24  <------ veth ------>   veth-b 10.250.0.2/24

Everything a lab starts (processes, namespaces) is tracked and removed by :meth:`Lab.close`,
which also runs from ``atexit`` and on SIGTERM/SIGHUP (turned into ``KeyboardInterrupt`` so
``finally`` blocks run). Processes are ended by their PID, never by name.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

VETH_A_ADDR = "10.250.0.1"
VETH_B_ADDR = "10.250.0.2"
TUN_A_ADDR = "10.251.0.1"
TUN_B_ADDR = "10.251.0.2"
PREFIX_LEN = 24
VETH_A = "veth-a"
VETH_B = "veth-b"

_CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)
_live_labs: list[Lab] = []
_handlers_installed = False


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _sh(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: bytes | None = None
):
    proc = subprocess.run(
        list(argv), capture_output=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run a lab (empty list = all good)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not running as root (network namespaces need root)")
    if shutil.which("ip") is None:
        missing.append("`ip` (iproute2) not installed")
    if shutil.which("ping") is None:
        missing.append("`ping` (iputils-ping) not installed")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun does not exist")
    return missing


def _install_signal_handlers() -> None:
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True

    def on_signal(signum, _frame):
        # like Ctrl-C: pytest stops the run (running fixture teardown), scripts unwind
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, on_signal)
    atexit.register(close_all_labs)


def close_all_labs() -> None:
    for lab in list(_live_labs):
        lab.close()


def run_in_netns(ns: str, fn: Callable[[], object]) -> object:
    """Call ``fn`` in a fresh thread that has joined network namespace ``ns``.

    Sockets created by ``fn`` belong to ``ns`` for their whole life and may then be used from
    any thread. The calling thread's namespace is untouched.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, object] = {}

    def target():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


class Proc:
    """A process started inside a namespace, with its stdout/stderr going to files."""

    def __init__(self, popen: subprocess.Popen, name: str, out_path: Path, err_path: Path):
        self.popen = popen
        self.name = name
        self.out_path = out_path
        self.err_path = err_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def send_signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 3.0) -> int:
        """Signal the process, wait up to ``timeout`` s, then SIGKILL it. Returns its status."""
        if self.alive():
            self.send_signal(sig)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
        return self.popen.wait(timeout=10)

    def wait_for_output(
        self, pattern: str, timeout: float, *, stream: str = "stderr", since: int = 0
    ) -> re.Match:
        """Wait until ``pattern`` (a regex) appears in the process's stdout/stderr file."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = (self.stderr() if stream == "stderr" else self.stdout())[since:]
            m = rx.search(text)
            if m:
                return m
            if not self.alive() or time.monotonic() > deadline:
                state = "exited" if not self.alive() else "timed out"
                raise LabError(
                    f"{self.name}: {state} waiting for /{pattern}/ on {stream}\n"
                    f"--- stdout ---\n{self.stdout()[-3000:]}\n"
                    f"--- stderr ---\n{self.stderr()[-3000:]}"
                )
            time.sleep(0.02)


class Lab:
    """Two namespaces joined by a veth pair. Use as a context manager or call :meth:`close`."""

    def __init__(self, workdir: str | os.PathLike, *, tag: str = "st", ipv6: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = next(_counter)
        pid = os.getpid()
        self.ns_a = f"{tag}-a-{pid}-{n}"
        self.ns_b = f"{tag}-b-{pid}-{n}"
        self.procs: list[Proc] = []
        self._created: list[str] = []
        self._closed = False
        _install_signal_handlers()
        _live_labs.append(self)
        try:
            self._build(ipv6)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------
    def _build(self, ipv6: bool) -> None:
        for ns in (self.ns_a, self.ns_b):
            _sh(["ip", "netns", "add", ns])
            self._created.append(ns)
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            if not ipv6:
                # No spontaneous IPv6 traffic (RS, MLD, DAD) through the tunnel devices: the
                # tests count frames and packets, and want only what they send themselves.
                for key in ("all", "default"):
                    self.sysctl(ns, f"net.ipv6.conf.{key}.disable_ipv6", "1")
        _sh(
            ["ip", "-n", self.ns_a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B]
            + ["netns", self.ns_b]
        )
        _sh(["ip", "-n", self.ns_a, "addr", "add", f"{VETH_A_ADDR}/{PREFIX_LEN}", "dev", VETH_A])
        _sh(["ip", "-n", self.ns_b, "addr", "add", f"{VETH_B_ADDR}/{PREFIX_LEN}", "dev", VETH_B])
        _sh(["ip", "-n", self.ns_a, "link", "set", VETH_A, "up"])
        _sh(["ip", "-n", self.ns_b, "link", "set", VETH_B, "up"])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        _sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])

    # -- commands and processes -----------------------------------------------------------
    def run(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess:
        return _sh(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)

    def spawn(
        self, ns: str, argv: Sequence[str], *, name: str | None = None, env: dict | None = None
    ) -> Proc:
        """Start ``argv`` inside ``ns``. `ip netns exec` execs the command, so the PID we get
        is the command's own PID and signals reach it directly."""
        name = name or Path(argv[0]).name
        idx = len(self.procs)
        out_path = self.workdir / f"{idx:02d}-{name}.out"
        err_path = self.workdir / f"{idx:02d}-{name}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a terminal Ctrl-C reaches pytest, which cleans up
                env=env,
            )
        proc = Proc(popen, name, out_path, err_path)
        self.procs.append(proc)
        return proc

    def ping(
        self,
        ns: str,
        dst: str,
        *,
        count: int = 3,
        interval: float = 0.2,
        wait: float = 1.0,
        size: int | None = None,
        deadline: float | None = None,
    ) -> tuple[int, int, float | None]:
        """Ping ``dst`` from ``ns``. Returns (sent, received, avg_rtt_ms or None)."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait)]
        if size is not None:
            argv += ["-s", str(size)]
        if deadline is not None:
            argv += ["-w", str(deadline)]
        timeout = count * (interval + wait) + 10 if deadline is None else deadline + 10
        proc = self.run(ns, argv + [dst], check=False, timeout=timeout)
        return parse_ping(proc.stdout.decode(errors="replace"))

    def wait_ping(self, ns: str, dst: str, timeout: float) -> float:
        """Ping once every ~0.2 s until a reply comes; returns the seconds it took."""
        start = time.monotonic()
        while True:
            _, received, _ = self.ping(ns, dst, count=1, wait=0.3)
            if received:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise LabError(f"no ping reply from {dst} (namespace {ns}) within {timeout} s")
            time.sleep(0.1)

    def tcp_transfer(
        self,
        src: tuple[str, str],
        dst: tuple[str, str],
        nbytes: int,
        *,
        port: int = 5201,
        timeout: float = 120.0,
        between: Sequence[Callable[[], object]] = (),
    ) -> tuple[str, str]:
        """Send ``nbytes`` of random data over one TCP connection from ``src`` = (namespace,
        address) to ``dst`` = (namespace, address); returns the SHA-256 hex digests (sent,
        received). Each callable in ``between`` runs once, at evenly spaced points inside the
        stream (e.g. a reload in the middle of a transfer)."""
        import hashlib
        import socket

        srv = run_in_netns(dst[0], lambda: socket.create_server((dst[1], port)))
        family = socket.AF_INET6 if ":" in src[1] else socket.AF_INET
        cli = run_in_netns(src[0], lambda: socket.socket(family, socket.SOCK_STREAM))
        got: dict = {}

        def serve() -> None:
            conn, _ = srv.accept()
            h = hashlib.sha256()
            while chunk := conn.recv(65536):
                h.update(chunk)
            got["rx"] = h.hexdigest()
            conn.close()

        t = threading.Thread(target=serve)
        t.start()
        sent = hashlib.sha256()
        parts = len(between) + 1
        try:
            cli.settimeout(timeout)
            cli.bind((src[1], 0))
            cli.connect((dst[1], port))
            for i in range(parts):
                left = nbytes // parts + (nbytes % parts if i == parts - 1 else 0)
                while left:
                    chunk = os.urandom(min(left, 65536))
                    sent.update(chunk)
                    cli.sendall(chunk)
                    left -= len(chunk)
                if i < parts - 1:
                    between[i]()
        finally:
            cli.close()
            t.join(timeout)
            srv.close()
        return sent.hexdigest(), got.get("rx", "")

    def links(self, ns: str) -> list[str]:
        out = _sh(["ip", "-n", ns, "-o", "link", "show"]).stdout.decode()
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line]

    def namespaces_exist(self) -> list[str]:
        return [ns for ns in (self.ns_a, self.ns_b) if os.path.exists(f"/run/netns/{ns}")]

    def socket_in(self, ns: str, family: int, type_: int):
        import socket

        return run_in_netns(ns, lambda: socket.socket(family, type_))

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(signal.SIGTERM, timeout=2.0)
        for ns in reversed(self._created):
            with contextlib.suppress(Exception):
                _sh(["ip", "netns", "del", ns], check=False)
        if self in _live_labs:
            _live_labs.remove(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_PING_RX = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT_RX = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(text: str) -> tuple[int, int, float | None]:
    m = _PING_RX.search(text)
    if not m:
        return (0, 0, None)
    rtt = _RTT_RX.search(text)
    return int(m.group(1)), int(m.group(2)), float(rtt.group(2)) if rtt else None


class Capture:
    """``tcpdump -w`` on an interface inside a namespace. Start, generate traffic, :meth:`stop`.

    :meth:`stop` returns the pcap path; ``self.kernel_drops`` tells whether the kernel dropped
    packets (then the TCP stream may have holes).
    """

    def __init__(self, lab: Lab, ns: str, iface: str, path: str | os.PathLike, bpf: str):
        self.lab = lab
        self.path = Path(path)
        self.kernel_drops: int | None = None
        self.captured: int | None = None
        argv = ["tcpdump", "-i", iface, "-n", "-s", "0", "-B", "16384", "-U", "--immediate-mode"]
        argv += ["-Z", "root"]
        argv += ["-w", str(self.path), bpf]
        self.proc = lab.spawn(ns, argv, name="tcpdump")
        self.proc.wait_for_output(r"listening on", timeout=10)

    def stop(self) -> Path:
        time.sleep(0.2)  # let the last packets through the capture buffer
        self.proc.stop(signal.SIGINT, timeout=5)
        err = self.proc.stderr()
        m = re.search(r"(\d+) packets? captured", err)
        self.captured = int(m.group(1)) if m else None
        m = re.search(r"(\d+) packets? dropped by kernel", err)
        self.kernel_drops = int(m.group(1)) if m else None
        return self.path


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.05):
    """Poll ``pred`` until it returns something truthy; returns that value or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


from simpletun.lab.tunnel import TunnelPair, genkey, simpletun_cmd  # noqa: E402

__all__ = [
    "PREFIX_LEN",
    "TUN_A_ADDR",
    "TUN_B_ADDR",
    "VETH_A",
    "VETH_A_ADDR",
    "VETH_B",
    "VETH_B_ADDR",
    "Capture",
    "Lab",
    "LabError",
    "Proc",
    "TunnelPair",
    "close_all_labs",
    "genkey",
    "missing_prerequisites",
    "parse_ping",
    "run_in_netns",
    "simpletun_cmd",
    "wait_until",
]
