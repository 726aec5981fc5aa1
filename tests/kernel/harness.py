"""Boot Debian's kernel (which has ESP) under qemu against a host namespace, for tests.

The host side lives in a namespace of its own holding a tap (ktap0, 10.99.0.1/24) that qemu
attaches the guest NIC (10.99.0.2) to, and the simpletun side of the test (tests/kernel/peer.py)
running there. The guest mounts the host root read-only over virtio-9p (initramfs built by
tests/kernel/mkinitrd.sh), so it runs the project's own .venv, and executes
tests/kernel/guest.sh, then powers off. Software emulation only (KVM does not work on these
machines): guest timings are emulated, never benchmark in it.

scripts/setup-kernel.sh (run by scripts/setup.sh) installs qemu, busybox and the unpacked kernel
into $SIMPLETUN_KESP_DIR (default /var/tmp/simpletun-kesp).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .scenarios import GROUPS, GUEST_MAC, HOST_OUTER

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
    return missing


@dataclass
class BootResult:
    qemu_rc: int
    seconds: float
    guest_log: str
    peer: dict
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


def boot(group: str, workdir: Path) -> BootResult:
    """Start the host side (namespace, tap, peer), boot the guest for ``group``, collect both
    sides' results. Everything started here is stopped and removed here."""
    kimg = kernel_image()
    ns = f"stkesp-{os.getpid()}-{group}"
    tap = "ktap0"
    peer_out = workdir / f"peer-{group}.json"
    peer_log = workdir / f"peer-{group}.log"
    guest_log = workdir / f"guest-{group}.log"
    # Manual key files, fresh per boot, where the guest sees them too (its /tmp is its own).
    keys_dir = KESP_DIR / f"keys-{os.getpid()}-{group}"
    shutil.rmtree(keys_dir, ignore_errors=True)
    keys_dir.mkdir(mode=0o700, parents=True)
    for sc in GROUPS[group]:
        path = keys_dir / f"{sc.name}.toml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(sc.key_file())
    run = subprocess.run
    run(["ip", "netns", "add", ns], check=True)
    peer = None
    try:
        for cmd in (
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"],
            ["ip", "-n", ns, "addr", "add", f"{HOST_OUTER}/24", "dev", tap],
            ["ip", "-n", ns, "link", "set", tap, "up"],
            ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        ):
            run(cmd, check=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(peer_log, "w") as log:
            peer = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.kernel.peer"]
                + ["--group", group, "--out", str(peer_out), "--keys", str(keys_dir)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "peer: ready" not in peer_log.read_text():
            if peer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"peer did not start: {peer_log.read_text()}")
            time.sleep(0.1)
        append = (
            "console=ttyS0 quiet loglevel=1 panic=-1 cryptomgr.notests=1 "
            f"kesp.run={HERE / 'guest.sh'} kesp.kroot={KESP_DIR / 'kroot'} kesp.group={group} "
            f"kesp.keys={keys_dir}"
        )
        t0 = time.monotonic()
        with open(guest_log, "w") as glog:
            q = subprocess.run(
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
                stdout=glog,
                stderr=subprocess.STDOUT,
                timeout=QEMU_TIMEOUT,
            )
        seconds = time.monotonic() - t0
        peer.send_signal(signal.SIGTERM)
        peer.wait(timeout=10)
        text = guest_log.read_text(errors="replace")
        peer_result = json.loads(peer_out.read_text()) if peer_out.exists() else {}
        return BootResult(q.returncode, seconds, text, peer_result, _parse(text))
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait()
        run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(keys_dir, ignore_errors=True)
