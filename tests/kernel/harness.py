"""Boot Debian's kernel (which has ESP) under qemu against a host namespace, for tests.

The host side lives in a namespace of its own holding a tap (ktap0, 10.99.0.1/24 plus one
address per scenario) that qemu attaches the guest NIC (10.99.0.2) to. In it run the real
simpletun userspace ends, one ``simpletun up --foreground`` per scenario (ready = READY=1 on a
notify socket), an echo server per scenario for the guest's transfers, and a wire tap
(AF_PACKET on ktap0) that decodes every ESP frame independently (SPI, transport, direction) and
injects one replay and one forgery of simpletun's own packets towards the guest kernel. When
the guest prints ``KESP-READY <n>`` (its kernel end of scenario n is up), the host pings it and
sends it a transfer (host-initiated traffic). Afterwards each host tunnel's ``simpletun status
--json`` is read, then it is stopped (SIGTERM) and must leave nothing behind.

The guest mounts the host root read-only over virtio-9p (initramfs built by
tests/kernel/mkinitrd.sh), so it runs the project's own .venv, and executes
tests/kernel/guest.sh, then powers off. Software emulation only (KVM does not work on these
machines): guest timings are emulated, never benchmark in it.

scripts/setup-kernel.sh (run by scripts/setup.sh) installs qemu, busybox and the unpacked kernel
into $SIMPLETUN_KESP_DIR (default /var/tmp/simpletun-kesp).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .scenarios import (
    BY_N,
    BY_SPI,
    ECHO_PORT,
    GROUPS,
    GUEST_ECHO_PORT,
    GUEST_MAC,
    HOST_OUTER,
    IKE,
    TRANSFER_BYTES,
    esp_offset,
    forge,
    recv_exact,
    replay,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KESP_DIR = Path(os.environ.get("SIMPLETUN_KESP_DIR", "/var/tmp/simpletun-kesp"))
QEMU_TIMEOUT = float(os.environ.get("SIMPLETUN_KESP_TIMEOUT", "480"))


def kernel_image() -> Path | None:
    found = sorted(glob.glob(str(KESP_DIR / "kroot" / "boot" / "vmlinuz-*")))
    return Path(found[-1]) if found else None


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("not root")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 not installed (run scripts/setup.sh)")
    if kernel_image() is None or not (KESP_DIR / "initrd.cpio.gz").exists():
        missing.append(f"no unpacked kernel/initramfs in {KESP_DIR} (run scripts/setup.sh)")
    if not (REPO / ".venv" / "bin" / "python").exists():
        missing.append("no .venv (run scripts/setup.sh)")
    if REPO.resolve().is_relative_to("/tmp"):
        # The guest sees the host's root read-only but mounts its own /tmp.
        missing.append(
            f"the checkout {REPO} is under /tmp, which the qemu guest cannot see (it has its own "
            "/tmp); clone the repository elsewhere, e.g. under /var/tmp or your home directory"
        )
    return missing


@dataclass
class BootResult:
    qemu_rc: int
    seconds: float
    guest_log: str
    host: dict
    lines: dict[str, list[dict]] = field(default_factory=dict)

    def one(self, kind: str) -> dict:
        (x,) = self.lines.get(kind, [{}])
        return x


def _parse(log: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("KESP-"):
            kind, _, rest = line.partition(" ")
            try:
                out.setdefault(kind[5:], []).append(json.loads(rest))
            except ValueError:
                pass
    return out


class WireTap:
    """AF_PACKET on the host's tap: every ESP frame decoded (SPI, transport, direction), and,
    once per scenario, simpletun's 2nd packet towards the guest re-sent verbatim (a replay)
    and with its sequence number moved (a forgery)."""

    PACKET_OUTGOING = 4

    def __init__(self, ns: str, tap: str) -> None:
        from simpletun.lab import run_in_netns

        self.tap = tap
        self.sock = run_in_netns(
            ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        )
        self.sock.bind((tap, 0))
        self.sock.settimeout(0.5)
        self.seen: dict[str, int] = {}  # "<dir> <spi> <transport>" -> frames
        self.unknown_spi = 0
        self.ike: dict[str, set[int]] = {}  # "<dir> <transport>" -> SPIs of the IKEv2 scenario
        self.injected: dict[int, dict] = {}
        self._ours: list[bytes] = []
        self._h2g: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            off = esp_offset(frame)
            if off is None:
                continue
            out = addr[2] == self.PACKET_OUTGOING
            if out and frame in self._ours:
                self._ours.remove(frame)  # our own injection, seen on the way out
                continue
            spi = struct.unpack_from("!I", frame, off)[0]
            if IKE.host_outer in (socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])):
                key = f"{'h2g' if out else 'g2h'} {'esp' if frame[23] == 50 else 'udp'}"
                self.ike.setdefault(key, set()).add(spi)  # SPIs negotiated by IKEv2
                continue
            sc = BY_SPI.get(spi)
            if sc is None:
                self.unknown_spi += 1
                continue
            via = "esp" if frame[23] == 50 else "udp"
            key = f"{'h2g' if out else 'g2h'} {spi:#x} {via}"
            self.seen[key] = self.seen.get(key, 0) + 1
            if out and spi == sc.spi_h2g:
                self._h2g[spi] = self._h2g.get(spi, 0) + 1
                if self._h2g[spi] == 2 and sc.n not in self.injected:
                    again, forged = replay(frame, off), forge(frame, off)
                    self._ours += [again, forged]
                    self.sock.send(again)
                    self.sock.send(forged)
                    seq = struct.unpack_from("!I", frame, off + 4)[0]
                    self.injected[sc.n] = {"replayed_seq": seq}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class Echo:
    """A TCP echo on each scenario's host inner address (the guest's transfers), recording
    the SHA-256 of what it received."""

    def __init__(self, ns: str, addrs: list[str]) -> None:
        from simpletun.lab import run_in_netns

        self.sha256: list[str] = []
        self.servers = [
            run_in_netns(ns, lambda a=a: socket.create_server((a, ECHO_PORT))) for a in addrs
        ]
        for srv in self.servers:
            threading.Thread(target=self._serve, args=(srv,), daemon=True).start()

    def _serve(self, srv: socket.socket) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        with c:
            c.settimeout(60)
            (n,) = struct.unpack("!I", recv_exact(c, 4))
            data = recv_exact(c, n)
            self.sha256.append(hashlib.sha256(data).hexdigest())
            c.sendall(data)

    def close(self) -> None:
        for srv in self.servers:
            srv.close()


def host_initiated(ns: str, n: int) -> dict:
    """Traffic the host starts towards the guest's kernel end of scenario ``n``: 3 pings and a
    transfer the guest echoes back."""
    from simpletun.lab import run_in_netns

    sc = BY_N[n]
    res: dict = {}
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", "3", "-W", "10", "-I", sc.host_inner]
        + [sc.guest_inner],
        capture_output=True,
        text=True,
        timeout=60,
    )
    res["ping_rc"] = r.returncode
    res["ping_tail"] = r.stdout.strip().splitlines()[-2:]
    data = hashlib.shake_256(b"simpletun kesp host transfer " + sc.name.encode()).digest(
        TRANSFER_BYTES
    )
    try:
        c = run_in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with c:
            c.settimeout(120)
            c.bind((sc.host_inner, 0))
            c.connect((sc.guest_inner, GUEST_ECHO_PORT))
            c.sendall(struct.pack("!I", len(data)) + data)
            got = recv_exact(c, len(data))
        res["sent_sha256"] = hashlib.sha256(data).hexdigest()
        res["echoed_sha256"] = hashlib.sha256(got).hexdigest()
    except OSError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def _status(name: str, run_dir: Path) -> dict:
    """``simpletun status --json NAME`` of a host tunnel."""
    env = dict(os.environ, SIMPLETUN_RUN_DIR=str(run_dir))
    st = subprocess.run(
        [str(REPO / ".venv" / "bin" / "simpletun"), "status", "--json", name],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    try:
        return json.loads(st.stdout)
    except ValueError:
        return {"error": st.stdout + st.stderr}


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _start_host_tunnels(ns: str, keys_dir: Path, run_dir: Path, scenarios, logs: Path):
    """``simpletun up --foreground`` for each scenario's host file; returns once every one
    sent READY=1 (events on one notify socket)."""
    note_path = logs / "notify.sock"
    note = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    note.bind(str(note_path))
    note.settimeout(60)
    procs = {}
    env = dict(os.environ, SIMPLETUN_RUN_DIR=str(run_dir), NOTIFY_SOCKET=str(note_path))
    try:
        for sc in scenarios:
            with open(logs / f"{sc.host_ifname}.log", "w") as log:
                procs[sc.host_ifname] = subprocess.Popen(
                    ["ip", "netns", "exec", ns, str(REPO / ".venv" / "bin" / "python"), "-m"]
                    + ["simpletun", "up", "--foreground", "-d"]
                    + [str(keys_dir / f"{sc.host_ifname}.toml")],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        ready = 0
        while ready < len(procs):
            try:
                msg = note.recv(4096).decode()
            except TimeoutError:
                logs_text = {n: (logs / f"{n}.log").read_text()[-2000:] for n in procs}
                raise RuntimeError(f"host tunnels not ready: {logs_text}") from None
            ready += "READY=1" in msg.split("\n")
    except BaseException:
        for p in procs.values():
            p.kill()
            p.wait()
        raise
    finally:
        note.close()
    return procs


def boot(group: str, workdir: Path) -> BootResult:
    """Start the host side (namespace, tap, simpletun ends), boot the guest for ``group``,
    collect both sides' results. Everything started here is stopped and removed here."""
    kimg = kernel_image()
    ns = f"stkesp-{os.getpid()}-{group}"
    tap = "ktap0"
    guest_log = workdir / f"guest-{group}.log"
    run_dir = workdir / "run"
    scenarios = GROUPS[group]
    # Key and tunnel files, fresh per boot, where the guest sees them too (its /tmp is its own).
    keys_dir = KESP_DIR / f"keys-{os.getpid()}-{group}"
    shutil.rmtree(keys_dir, ignore_errors=True)
    keys_dir.mkdir(mode=0o700, parents=True)
    for sc in scenarios:
        _write_private(keys_dir / sc.key_path, sc.key_file())
        _write_private(keys_dir / f"{sc.host_ifname}.toml", sc.tunnel_file("host"))
        _write_private(keys_dir / f"{sc.guest_ifname}.toml", sc.tunnel_file("guest"))
    run = subprocess.run
    run(["ip", "netns", "add", ns], check=True)
    procs: dict[str, subprocess.Popen] = {}
    wire = echo = q = None
    try:
        for cmd in (
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"],
            ["ip", "-n", ns, "addr", "add", f"{HOST_OUTER}/24", "dev", tap],
            *(
                ["ip", "-n", ns, "addr", "add", f"{sc.host_outer}/24", "dev", tap]
                for sc in scenarios
            ),
            ["ip", "-n", ns, "link", "set", tap, "up"],
            ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        ):
            run(cmd, check=True)
        procs = _start_host_tunnels(ns, keys_dir, run_dir, scenarios, workdir)
        wire = WireTap(ns, tap)
        echo = Echo(ns, [sc.host_inner for sc in scenarios])
        append = (
            "console=ttyS0 quiet loglevel=1 panic=-1 cryptomgr.notests=1 "
            f"kesp.run={HERE / 'guest.sh'} kesp.kroot={KESP_DIR / 'kroot'} kesp.group={group} "
            f"kesp.keys={keys_dir}"
        )
        host_side: dict[int, dict] = {}
        t0 = time.monotonic()
        q = subprocess.Popen(
            ["ip", "netns", "exec", ns, "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"]
            + ["-smp", "1", "-m", "1G", "-nodefaults", "-no-user-config"]
            + ["-display", "none", "-serial", "stdio", "-no-reboot"]
            + ["-kernel", str(kimg), "-initrd", str(KESP_DIR / "initrd.cpio.gz")]
            + ["-append", append]
            + ["-fsdev", "local,id=hr,path=/,security_model=none,readonly=on,multidevs=remap"]
            + ["-device", "virtio-9p-pci,fsdev=hr,mount_tag=hostroot"]
            + ["-netdev", f"tap,id=kn0,ifname={tap},script=no,downscript=no"]
            + ["-device", f"virtio-net-pci,netdev=kn0,mac={GUEST_MAC}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        killer = threading.Timer(QEMU_TIMEOUT, q.kill)
        killer.start()
        try:
            with open(guest_log, "wb") as glog:
                for raw in q.stdout:  # the guest's console, line by line, as it happens
                    glog.write(raw)
                    glog.flush()
                    line = raw.decode(errors="replace").strip()
                    if line.startswith("KESP-READY "):
                        n = json.loads(line.partition(" ")[2])["n"]
                        host_side[n] = host_initiated(ns, n)
                        if BY_N[n].ike:  # while its Child SA is up (the guest deletes it)
                            host_side[n]["status"] = _status(BY_N[n].host_ifname, run_dir)
            rc = q.wait()
        finally:
            killer.cancel()
        seconds = time.monotonic() - t0
        status, exits, left = {}, {}, {}
        for name, p in procs.items():
            status[name] = _status(name, run_dir)
            p.send_signal(signal.SIGTERM)
            try:
                exits[name] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                exits[name] = p.wait()
            left[name] = (
                run(["ip", "-n", ns, "link", "show", name], capture_output=True).returncode == 0
            )
        text = guest_log.read_text(errors="replace")
        wire.close()
        host = {
            "status": status,
            "exit": exits,
            "device_left": left,
            "host_initiated": host_side,
            "wire": wire.seen,
            "wire_unknown_spi": wire.unknown_spi,
            "wire_ike": {k: sorted(v) for k, v in wire.ike.items()},
            "injected": wire.injected,
            "echo_sha256": echo.sha256,
            "logs": {n: (workdir / f"{n}.log").read_text()[-3000:] for n in procs},
        }
        (workdir / f"host-{group}.json").write_text(json.dumps(host, indent=1, default=str))
        return BootResult(rc, seconds, text, host, _parse(text))
    finally:
        for p in [*procs.values(), *([q] if q is not None else [])]:
            if p.poll() is None:
                p.kill()
                p.wait()
        if wire is not None:
            wire.close()
        if echo is not None:
            echo.close()
        run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(keys_dir, ignore_errors=True)
