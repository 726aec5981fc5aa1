"""Running the ``simpletun`` command in a :class:`~simpletun.lab.Lab`: server in A, client in B."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

# simpletun.lab imports this module at its end, when these names are already defined.
from simpletun.lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A_ADDR, Lab, Proc

XFER = str(Path(__file__).with_name("xfer.py"))
DEV = "st0"
PORT = 55555


def simpletun_cmd() -> str | None:
    """The ``simpletun`` console script of the running interpreter's environment."""
    cand = Path(sys.executable).parent / "simpletun"
    if cand.exists():
        return str(cand)
    return shutil.which("simpletun")


def genkey(path: str | os.PathLike) -> Path:
    """Make a key file with ``simpletun genkey > path``; returns the path."""
    import subprocess

    path = Path(path)
    with open(path, "wb") as f:
        subprocess.run([simpletun_cmd(), "genkey"], stdout=f, check=True, timeout=30)
    return path


_COUNTERS_RX = re.compile(r"session with (\S+) counters: (.*)$", re.M)


def session_counters(log: str) -> list[dict[str, int]]:
    """Counters of every ended session in a ``-d`` log, oldest first.

    The log line is ``session with PEER counters: k=v k=v ...``; drop counters that are zero
    are left out of the line, so absent ``drop_*`` keys read as 0 (see :func:`counter`).
    """
    out = []
    for m in _COUNTERS_RX.finditer(log):
        d: dict[str, int] = {"peer": m.group(1)}  # type: ignore[dict-item]
        for kv in m.group(2).split():
            k, _, v = kv.partition("=")
            if v.isdigit():
                d[k] = int(v)
        out.append(d)
    return out


_IO_RX = re.compile(r"data plane: (offloads=.*)$", re.M)


def io_counters(proc: Proc, timeout: float = 10.0) -> dict:
    """The data-plane device and wire counters of a running tunnel end: SIGUSR1 makes it log
    ``data plane: offloads=... dev_reads=N ...`` (``cli.io_line``), parsed here; ``offloads``
    stays a string."""
    since = len(proc.stderr())
    proc.send_signal(signal.SIGUSR1)
    m = proc.wait_for_output(_IO_RX.pattern, timeout, since=since)
    out: dict = {}
    for kv in m.group(1).split():
        k, _, v = kv.partition("=")
        out[k] = int(v) if v.isdigit() else v
    return out


def counter(stats: dict, name: str) -> int:
    return int(stats.get(name, 0))


def drops(stats: dict) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.startswith("drop_") and v}


class TunnelPair:
    """A simpletun server in namespace A and a client in namespace B.

    ``key_a``/``key_b`` are key files (None + ``plaintext=True`` for plaintext mode).
    ``client_port`` lets the client connect somewhere else than the server (a proxy).
    """

    def __init__(
        self,
        lab: Lab,
        *,
        tap: bool = False,
        plaintext: bool = False,
        key_a: Path | None = None,
        key_b: Path | None = None,
        cipher: str | None = None,
        port: int = PORT,
        client_port: int | None = None,
        client_host: str = VETH_A_ADDR,
        mtu: int | None = None,
        server_args: tuple[str, ...] = (),
        client_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        client_env: dict[str, str] | None = None,
        server_env: dict[str, str] | None = None,
        cmd: str | None = None,
    ):
        self.lab = lab
        # The simpletun command (another checkout's, for before/after benchmarks).
        self.cmd = cmd or simpletun_cmd()
        # Extra environment of both ends (e.g. SIMPLETUN_OFFLOADS=0), on top of ours.
        self.env = {**os.environ, **env} if env else None
        # ... and of one end only, on top of that (e.g. one end without offloads).
        self.client_env = {**(self.env or os.environ), **client_env} if client_env else self.env
        self.server_env = {**(self.env or os.environ), **server_env} if server_env else self.env
        self.tap = tap
        self.plaintext = plaintext
        self.key_a = key_a
        self.key_b = key_b if key_b is not None else key_a
        self.cipher = cipher
        self.port = port
        self.client_port = client_port or port
        self.client_host = client_host
        self.mtu = mtu
        self.server_args = tuple(server_args)
        self.client_args = tuple(client_args)
        self.server: Proc | None = None
        self.client: Proc | None = None

    def _common(self, key: Path | None) -> list[str]:
        argv = ["-i", DEV, "-a" if self.tap else "-u", "-d"]
        if self.plaintext:
            argv.append("--plaintext")
        else:
            argv += ["--key", str(key)]
            if self.cipher:
                argv += ["--cipher", self.cipher]
        if self.mtu:
            argv += ["--mtu", str(self.mtu)]
        return argv

    def start_server(self) -> Proc:
        argv = [self.cmd, *self._common(self.key_a), "-s", "-p", str(self.port)]
        argv += ["--addr", f"{TUN_A_ADDR}/24", *self.server_args]
        self.server = self.lab.spawn(self.lab.ns_a, argv, name="server", env=self.server_env)
        self.server.wait_for_output(r"listening on TCP port", timeout=15)
        return self.server

    def start_client(self) -> Proc:
        argv = [self.cmd, *self._common(self.key_b), "-c", self.client_host]
        argv += ["-p", str(self.client_port), "--addr", f"{TUN_B_ADDR}/24", *self.client_args]
        self.client = self.lab.spawn(self.lab.ns_b, argv, name="client", env=self.client_env)
        return self.client

    def start(self, timeout: float = 15.0) -> float:
        """Start both ends and wait until a ping crosses the tunnel; returns the seconds."""
        self.start_server()
        self.start_client()
        return self.wait_up(timeout)

    def wait_up(self, timeout: float = 15.0) -> float:
        try:
            return self.lab.wait_ping(self.lab.ns_b, TUN_A_ADDR, timeout)
        except Exception as exc:
            raise AssertionError(f"tunnel did not come up: {exc}\n{self.logs()}") from None

    def logs(self) -> str:
        parts = []
        for p in (self.server, self.client):
            if p is not None:
                status = "running" if p.alive() else f"exited {p.popen.returncode}"
                parts.append(f"--- {p.name} ({status}) stderr ---\n{p.stderr()[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for p in (self.client, self.server):
            if p is not None:
                p.stop()

    def transfer(
        self,
        nbytes: int,
        *,
        seed: int = 1,
        port: int = 5201,
        timeout: float = 60.0,
        marker: str | None = None,
    ) -> tuple[dict, dict]:
        """Send ``nbytes`` from B to A's tunnel address with xfer.py; returns (sent, received)
        as reported by each end (bytes, sha256, seconds)."""
        py = sys.executable
        rx_argv = [py, XFER, "recv", TUN_A_ADDR, str(port), "--timeout", str(timeout)]
        tx_argv = [py, XFER, "send", TUN_A_ADDR, str(port), "--bytes", str(nbytes)]
        tx_argv += ["--seed", str(seed), "--timeout", str(timeout)]
        if marker:
            rx_argv += ["--marker", marker]
            tx_argv += ["--marker", marker]
        rx = self.lab.spawn(self.lab.ns_a, rx_argv, name="xfer-recv")
        rx.wait_for_output('"listening"', 10, stream="stdout")
        tx = self.lab.spawn(self.lab.ns_b, tx_argv, name="xfer-send")
        tx.wait(timeout + 10)
        rx.wait(timeout + 10)
        sent = _last_json(tx.stdout())
        got = _last_json(rx.stdout())
        if "error" in sent or "error" in got:
            raise AssertionError(f"transfer failed: sent={sent} received={got}\n{self.logs()}")
        return sent, got


def _last_json(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"no output: {text!r}"}
