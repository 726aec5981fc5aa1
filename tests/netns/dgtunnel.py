"""A :class:`~tunnel.TunnelPair` over a datagram transport (``--transport udp|raw``), IPv4 or
IPv6 outer addresses. Stdlib only (``scripts/`` imports it too)."""

from __future__ import annotations

import re
import subprocess

try:
    from .lab import VETH_A, VETH_A_ADDR, VETH_B, Lab
    from .tunnel import TunnelPair
except ImportError:  # imported as a top-level module by scripts/
    from lab import VETH_A, VETH_A_ADDR, VETH_B, Lab  # type: ignore[no-redef]
    from tunnel import TunnelPair  # type: ignore[no-redef]

VETH_A_ADDR6 = "fd00:250::1"
VETH_B_ADDR6 = "fd00:250::2"
UDP_PORT = 4500


def add_ipv6_outer(lab: Lab) -> None:
    """IPv6 addresses on the veth pair (the lab must be built with ipv6=True)."""
    for ns, dev, a in ((lab.ns_a, VETH_A, VETH_A_ADDR6), (lab.ns_b, VETH_B, VETH_B_ADDR6)):
        lab.run(ns, ["ip", "addr", "add", f"{a}/64", "dev", dev, "nodad"])


class DatagramPair(TunnelPair):
    def __init__(self, lab: Lab, *, transport: str, ipv6: bool = False, **kw):
        kw.setdefault("port", UDP_PORT)
        kw.setdefault("client_host", VETH_A_ADDR6 if ipv6 else VETH_A_ADDR)
        super().__init__(lab, **kw)
        self.transport = transport

    def _common(self, key):
        return [*super()._common(key), "--transport", self.transport]

    def start_server(self):
        try:
            from .tunnel import TUN_A_ADDR
        except ImportError:
            from tunnel import TUN_A_ADDR  # type: ignore[no-redef]

        argv = [self.cmd, *self._common(self.key_a), "-s", "-p", str(self.port)]
        argv += ["--addr", f"{TUN_A_ADDR}/24", *self.server_args]
        self.server = self.lab.spawn(self.lab.ns_a, argv, name="server", env=self.env)
        self.server.wait_for_output(r"listening on UDP port", timeout=15)
        return self.server


_ESP = re.compile(r"ESP\(spi=(0x[0-9a-f]+),seq=(0x[0-9a-f]+)\)")


def decode_esp(pcap: str) -> list[tuple[str, str, int, int, str]]:
    """``tcpdump -r`` every packet: (src, dst, spi, seq, line) for ESP, else ValueError."""
    out = subprocess.run(
        ["tcpdump", "-n", "-r", pcap], capture_output=True, check=True, timeout=300
    ).stdout.decode()
    rows = []
    for line in out.splitlines():
        m = _ESP.search(line)
        if not m:
            raise ValueError(f"not ESP: {line}")
        parts = line.split()
        src, dst = parts[2], parts[4].rstrip(":")
        rows.append((src, dst, int(m.group(1), 16), int(m.group(2), 16), line))
    return rows
