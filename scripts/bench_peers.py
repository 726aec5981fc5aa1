"""Other VPNs beside simpletun in ``bench_tunnel.py --peers``: OpenVPN (UDP, AES-256-GCM, TLS
mode, userspace data channel), boringtun and wireguard-go, each run as one end in namespace A
and one in B of the same :class:`~simpletun.lab.Lab`, with the same tunnel addresses as
simpletun, so that the same iperf3 flow and pings cross them.

``scripts/setup-peers.sh`` installs them (Debian's ``openvpn``, ``wireguard-go`` and
``wireguard-tools``; ``boringtun-cli`` from crates.io into ``$SIMPLETUN_PEERS_DIR``). This
kernel may have no WireGuard module: boringtun and wireguard-go are userspace WireGuard, each
end configured with ``wg`` through its UAPI socket (``/var/run/wireguard/DEV.sock``). Keys and
certificates are made at run time in the lab's temporary directory. The processes are started
with :meth:`Lab.spawn`, so the lab ends them by PID (also on Ctrl-C or an error).

A pair has ``server`` and ``client`` (the two tunnel-end processes, whose own CPU time the
benchmark counts) and ``dev_b`` (the sending end's device), like simpletun's pairs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from simpletun.lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A_ADDR, VETH_B_ADDR, Lab, Proc

PEERS_DIR = Path(os.environ.get("SIMPLETUN_PEERS_DIR", "/var/tmp/simpletun-peers"))
BORINGTUN_VERSION = "0.7.1"  # the version scripts/setup-peers.sh installs
BORINGTUN = PEERS_DIR / "bin" / "boringtun-cli"
WG_PORT = 51820
OVPN_PORT = 1194
# WireGuard's default MTU, used for all three peers (outer packets fit the 1500-byte veth).
PEER_MTU = 1420
UAPI_DIR = Path("/var/run/wireguard")
PEERS = ("openvpn", "boringtun", "wireguard-go")
# wireguard-go's TUN TSO/GRO and UDP GSO/GRO came in 2023 releases; Debian 12 ships a 2022 one.
WG_GO_NOTE = (
    "wireguard-go: Debian's package is the old release without TUN/UDP offloads; modern "
    "wireguard-go (0.0.20250522, with TUN TSO/GRO and UDP GSO/GRO) measured 0.17x veth and "
    "8.1-8.8 CPU-s/GB on this machine (issue 9's table) - that is the yardstick"
)


class PeerError(RuntimeError):
    """A peer is not installed or did not come up; the message is one line."""


def one_line(text: str, limit: int = 160) -> str:
    """The last non-empty line of a log (where programs say why they stopped), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else "no output"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def parse_version(peer: str, text: str) -> str | None:
    """The version in ``--version`` output: ``OpenVPN 2.6.14 x86_64...``,
    ``wireguard-go v0.0.20220316``, ``boringtun-cli 0.7.1``."""
    rx = {
        "openvpn": r"^OpenVPN (\d[\w.]*)",
        "wireguard-go": r"^wireguard-go v?(\d[\w.]*)",
        "boringtun": r"^boringtun(?:-cli)? v?(\d[\w.]*)",
    }[peer]
    m = re.search(rx, text, re.M)
    return m.group(1) if m else None


def binary(peer: str) -> str | None:
    if peer == "boringtun":
        return str(BORINGTUN) if os.access(BORINGTUN, os.X_OK) else None
    return shutil.which(peer)


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here (one line), or None."""
    needs = {"openvpn": ["openvpn"], "boringtun": ["boringtun", "wg"]}
    for tool in needs.get(peer, [peer, "wg"]):
        if tool == "boringtun" and binary(tool) is None:
            return (
                f"boringtun-cli {BORINGTUN_VERSION} is not installed in {BORINGTUN.parent} "
                "(scripts/setup-peers.sh: cargo install failed or was not run)"
            )
        if tool != "boringtun" and shutil.which(tool) is None:
            pkg = {"wg": "wireguard-tools"}.get(tool, tool)
            return f"'{tool}' is not installed (Debian package {pkg}; scripts/setup-peers.sh)"
    return None


def version(peer: str) -> str | None:
    exe = binary(peer)
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(peer, (proc.stdout + proc.stderr).decode(errors="replace"))


def row_name(peer: str, ver: str | None) -> str:
    v = f" {ver}" if ver else ""
    return {
        "openvpn": f"OpenVPN{v} UDP AES-256-GCM",
        "boringtun": f"boringtun{v}",
        "wireguard-go": f"wireguard-go{v} (Debian, pre-offload)",
    }[peer]


def dev_names(peer: str, pid: int) -> tuple[str, str]:
    """Device names of the two ends (at most 15 bytes). They differ between A and B because a
    userspace WireGuard's UAPI socket path (``/var/run/wireguard/DEV.sock``) is not per
    namespace."""
    tag = {"openvpn": "prov", "boringtun": "prbt", "wireguard-go": "prwg"}[peer]
    base = f"{tag}{pid % 10**7}"
    return f"{base}a", f"{base}b"


def wg_set_argv(
    dev: str, private_key: Path, port: int, peer_public: str, peer_ip: str, endpoint: str
) -> list[str]:
    """``wg set`` for one end: its key and port, the other end as its only peer."""
    return [
        *("wg", "set", dev, "listen-port", str(port), "private-key", str(private_key)),
        *("peer", peer_public, "allowed-ips", f"{peer_ip}/32", "endpoint", endpoint),
    ]


def openvpn_argv(
    role: str, dev: str, local: str, remote: str, ifconfig: tuple[str, str], pki: dict[str, Path]
) -> list[str]:
    """A point-to-point OpenVPN end in TLS mode: UDP, data channel AES-256-GCM only, the
    userspace data channel (no DCO), tunnel MTU :data:`PEER_MTU`."""
    argv = ["openvpn", "--dev", dev, "--dev-type", "tun", "--proto", "udp"]
    argv += ["--local", local, "--lport", str(OVPN_PORT), "--remote", remote, str(OVPN_PORT)]
    argv += ["--ifconfig", *ifconfig, "--tun-mtu", str(PEER_MTU), "--disable-dco"]
    argv += ["--data-ciphers", "AES-256-GCM", "--cipher", "AES-256-GCM"]
    argv += ["--ca", str(pki["ca"]), "--cert", str(pki["cert"]), "--key", str(pki["key"])]
    if role == "server":
        argv += ["--tls-server", "--dh", "none"]
    else:
        argv += ["--tls-client", "--verify-x509-name", "server", "name"]
    argv += ["--verb", "3", "--ping", "10", "--ping-exit", "120", "--script-security", "0"]
    return argv


def _run(argv: list[str], *, input: bytes | None = None) -> bytes:
    proc = subprocess.run(argv, capture_output=True, timeout=30, input=input, check=False)
    if proc.returncode != 0:
        raise PeerError(f"{argv[0]} {argv[1]}: {one_line(proc.stderr.decode(errors='replace'))}")
    return proc.stdout


def make_pki(d: Path) -> dict[str, dict[str, Path]]:
    """A throw-away CA and a server and a client certificate (P-256), made with openssl."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, cakey = d / "ca.crt", d / "ca.key"
    if not ca.exists():
        subj = ["-subj", "/CN=bench-ca", "-days", "2"]
        _run(["openssl", "req", "-x509", *ec, "-keyout", str(cakey), "-out", str(ca), *subj])
    sign = ["-CA", str(ca), "-CAkey", str(cakey), "-CAcreateserial", "-days", "2"]
    out = {}
    for name in ("server", "client"):
        key, crt, csr = d / f"{name}.key", d / f"{name}.crt", d / f"{name}.csr"
        if not crt.exists():
            subj = ["-subj", f"/CN={name}"]
            _run(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), *subj])
            _run(["openssl", "x509", "-req", "-in", str(csr), *sign, "-out", str(crt)])
        out[name] = {"ca": ca, "cert": crt, "key": key}
    return out


def wg_keys(d: Path, name: str) -> tuple[Path, str]:
    """A WireGuard private key file and its public key (``wg genkey``, ``wg pubkey``)."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.key"
    if not path.exists():
        path.write_bytes(_run(["wg", "genkey"]))
        path.chmod(0o600)
    return path, _run(["wg", "pubkey"], input=path.read_bytes()).decode().strip()


class PeerPair:
    """One peer VPN between namespaces A (server) and B (client); :meth:`start`, :meth:`stop`."""

    def __init__(self, lab: Lab, peer: str):
        if peer not in PEERS:
            raise ValueError(peer)
        self.lab = lab
        self.peer = peer
        self.dev_a, self.dev_b = dev_names(peer, os.getpid())
        self.workdir = lab.workdir / "peers"
        self.server: Proc | None = None
        self.client: Proc | None = None

    def start(self, timeout: float = 30.0) -> float:
        why = missing(self.peer)
        if why:
            raise PeerError(why)
        t0 = time.monotonic()
        if self.peer == "openvpn":
            self._start_openvpn(timeout)
        else:
            self._start_wireguard(timeout)
        try:
            self.lab.wait_ping(
                self.lab.ns_b, TUN_A_ADDR, max(5.0, timeout - (time.monotonic() - t0))
            )
        except Exception:
            raise PeerError(f"{self.peer}: no ping through the tunnel; {self._why()}") from None
        return time.monotonic() - t0

    def _why(self) -> str:
        for p in (self.server, self.client):
            if p is not None and not p.alive():
                return f"{p.name} exited {p.popen.returncode}: {one_line(p.stderr() + p.stdout())}"
        p = self.client or self.server
        return one_line(p.stdout() + p.stderr()) if p else "not started"

    def _start_openvpn(self, timeout: float) -> None:
        pki = make_pki(self.workdir / "openvpn")
        ends = [
            ("server", self.lab.ns_a, self.dev_a, VETH_A_ADDR, VETH_B_ADDR, TUN_A_ADDR, TUN_B_ADDR),
            ("client", self.lab.ns_b, self.dev_b, VETH_B_ADDR, VETH_A_ADDR, TUN_B_ADDR, TUN_A_ADDR),
        ]
        for role, ns, dev, local, remote, ip, peer_ip in ends:
            argv = openvpn_argv(role, dev, local, remote, (ip, peer_ip), pki[role])
            proc = self.lab.spawn(ns, argv, name=f"openvpn-{role}")
            setattr(self, role, proc)
        # up, and the data channel really is AES-256-GCM (OpenVPN 2.6 logs what was negotiated)
        for p in (self.server, self.client):
            try:
                p.wait_for_output(r"Data Channel: cipher 'AES-256-GCM'", timeout, stream="stdout")
            except Exception:
                raise PeerError(f"openvpn: no AES-256-GCM data channel; {self._why()}") from None

    def _start_wireguard(self, timeout: float) -> None:
        exe = binary(self.peer)
        keys = {end: wg_keys(self.workdir / "wg", end) for end in ("a", "b")}
        ends = [
            ("server", "a", self.lab.ns_a, self.dev_a, TUN_A_ADDR, "b", TUN_B_ADDR, VETH_B_ADDR),
            ("client", "b", self.lab.ns_b, self.dev_b, TUN_B_ADDR, "a", TUN_A_ADDR, VETH_A_ADDR),
        ]
        for role, me, ns, dev, ip, other, peer_ip, peer_veth in ends:
            sock = UAPI_DIR / f"{dev}.sock"
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()  # left by an end that was killed
            if self.peer == "boringtun":
                argv = [exe, "--foreground", "--disable-drop-privileges", dev]
            else:
                argv = [exe, "-f", dev]
            proc = self.lab.spawn(ns, argv, name=f"{self.peer}-{role}")
            setattr(self, role, proc)
            deadline = time.monotonic() + timeout
            while not sock.exists():
                if not proc.alive() or time.monotonic() > deadline:
                    raise PeerError(f"{self.peer}: no UAPI socket {sock}; {self._why()}")
                time.sleep(0.05)
            argv = wg_set_argv(
                dev, keys[me][0], WG_PORT, keys[other][1], peer_ip, f"{peer_veth}:{WG_PORT}"
            )
            for cmd in (
                argv,
                ["ip", "addr", "add", f"{ip}/24", "dev", dev],
                ["ip", "link", "set", dev, "mtu", str(PEER_MTU), "up"],
            ):
                res = self.lab.run(ns, cmd, check=False)
                if res.returncode != 0:
                    msg = one_line(res.stderr.decode(errors="replace"))
                    raise PeerError(f"{self.peer}: {' '.join(cmd[:2])}: {msg}")

    def stop(self) -> None:
        for p in (self.client, self.server):
            if p is not None:
                p.stop()
        if self.peer in ("boringtun", "wireguard-go"):
            for dev in (self.dev_a, self.dev_b):
                with contextlib.suppress(FileNotFoundError):
                    (UAPI_DIR / f"{dev}.sock").unlink()


def ratios(rounds: list[list[dict]], ours: int, peer: int) -> tuple[float, float | None] | None:
    """Row ``ours`` against row ``peer``: median over the rounds where both ran of (throughput
    ratio, CPU-s/GB ratio), or None if no round has both."""
    tput, cpu = [], []
    for rnd in rounds:
        a, b = rnd[ours], rnd[peer]
        if "error" in a or "error" in b or not b.get("gbps"):
            continue
        tput.append(a["gbps"] / b["gbps"])
        if a.get("cpu_per_gb") and b.get("cpu_per_gb"):
            cpu.append(a["cpu_per_gb"] / b["cpu_per_gb"])
    if not tput:
        return None
    return statistics.median(tput), statistics.median(cpu) if cpu else None
