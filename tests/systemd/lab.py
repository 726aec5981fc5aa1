"""Python side of ``tests/systemd/lab.sh``: a real systemd, PID 1 of its own namespaces, booted
for a test module and always shut down.

``SystemdLab.start()`` boots it (about half a second); ``run`` executes a command inside it as
root (its network namespace has only ``lo``; its root file system is a copy-on-write overlay of
this machine's, so this checkout and its ``.venv`` are there); ``close`` shuts it down and removes
every trace (idempotent; also called at exit as a last resort).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAB_SH = Path(__file__).with_name("lab.sh")
REPO = Path(__file__).resolve().parents[2]

_OPEN: list[SystemdLab] = []


def missing_prerequisites() -> list[str]:
    """What this machine lacks for a lab (empty when it can run one)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not root")
    if not any(os.access(p, os.X_OK) for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")):
        missing.append("systemd not installed (apt-get install systemd)")
    for tool in ("unshare", "nsenter", "setpriv", "script", "systemd-analyze"):
        if shutil.which(tool) is None:
            missing.append(f"no '{tool}' command")
    if not os.path.exists("/dev/net/tun"):
        missing.append("no /dev/net/tun")
    if not (
        os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        or os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers")
    ):
        missing.append("no cgroup v2 hierarchy")
    return missing


class SystemdLab:
    def __init__(self) -> None:
        self.dir: str | None = None

    def start(self) -> SystemdLab:
        # The lab has its own /tmp and /run: a checkout (or venv) there is bound in.
        binds = sorted(
            {
                p
                for p in (str(REPO), os.path.realpath(sys.prefix))
                if p.startswith(("/tmp/", "/run/"))
            }
        )
        out = subprocess.run(
            ["bash", str(LAB_SH), "start", *binds], capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"lab.sh start failed ({out.returncode}): {out.stderr.strip()}")
        self.dir = out.stdout.strip().splitlines()[-1]
        _OPEN.append(self)
        return self

    def run(
        self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the lab; stdout/stderr captured as text."""
        assert self.dir is not None, "lab not started"
        out = subprocess.run(
            ["bash", str(LAB_SH), "exec", self.dir, *cmd],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"in the lab, {' '.join(cmd)!r} exited {out.returncode}:\n{out.stdout}{out.stderr}"
            )
        return out

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Create ``path`` (and its parents) in the lab with ``text`` and ``mode``."""
        self.run("install", "-D", "-m", f"{mode:o}", "/dev/stdin", path, input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        """``journalctl --no-pager ARGS`` (after a journal flush, so every line written so far
        is there)."""
        self.run("journalctl", "--sync", check=False)
        return self.run("journalctl", "--no-pager", *args, check=False).stdout

    def wait_for(self, what: str, predicate, timeout: float = 20.0):
        """Poll ``predicate()`` every 0.1 s until truthy (returned) or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = self.journal("-n", "40", "-o", "short-monotonic")
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; the lab's journal:\n"
                    + tail
                )
            time.sleep(0.1)

    def close(self) -> None:
        if self.dir is None:
            return
        lab, self.dir = self.dir, None
        subprocess.run(["bash", str(LAB_SH), "stop", lab], timeout=60, check=False)
        if self in _OPEN:
            _OPEN.remove(self)


@atexit.register
def close_all_labs() -> None:
    for lab in list(_OPEN):
        lab.close()
