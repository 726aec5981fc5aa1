"""The simpletun side of the kernel-ESP interop tests: a test helper standing in for
simpletun's userspace data plane until its raw-ESP and ESP-in-UDP transports exist.

It runs in the host namespace of tests/kernel/harness.py and moves packets between a TUN device
(kesp0, the host stack's side of the tunnel) and the wire (raw IP protocol 50 or UDP port 4500)
with simpletun's own Rust ESP core, ``simpletun._core.SecurityAssociation`` (encap/decap). Only
the ESP processing is simpletun's; this loop is the stand-in. Replace it by the real data plane
(``simpletun ... --dataplane userspace`` with the same keys) when that lands: the test only needs
a process that carries kesp0 <-> ESP and reports its SA counters.

Towards the kernel it injects, once per SA, a replayed and a forged packet: the 2nd outbound
packet is re-sent verbatim, then a fresh one with a flipped ICV bit. (The guest does the same
towards this side, on the wire: see guest_main.inject.)

Runs until SIGTERM, then writes its counters as JSON to ``--out``. Also serves the TCP echo the
guest's transfer uses (on 10.98.0.1:5001 over the tunnel), recording SHA-256 of what it got.

Usage: python -m tests.kernel.peer --group esp|udp|all --keys DIR --out FILE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import threading

from simpletun import _core, manual_keys
from simpletun._errors import EspError

from .scenarios import (
    ECHO_PORT,
    ENCAP_PORT,
    ESN_START,
    GROUPS,
    GUEST_OUTER,
    HOST_INNER,
    HOST_OUTER,
    INNER_MTU,
    Scenario,
)

TUN = "kesp0"


class SaPair:
    def __init__(self, sc: Scenario, keys_dir: str) -> None:
        self.sc = sc
        keys = manual_keys.load(os.path.join(keys_dir, f"{sc.name}.toml"))
        self.tx, self.rx = keys.security_associations("server")
        assert (self.rx.spi, self.tx.spi) == (sc.spi_g2h, sc.spi_h2g)
        if sc.esn:
            self.tx._skip_tx_seq_to(ESN_START)
        self.rx_ok = 0
        self.tx_sent = 0
        self.injected: dict[str, object] = {}
        self.rx_via: dict[str, int] = {}

    def result(self) -> dict:
        return {
            "rx_stats": dict(self.rx.stats),
            "tx_stats": dict(self.tx.stats),
            "tx_seq": self.tx.tx_seq,
            "rx_highest_seq": self.rx.rx_highest_seq,
            "injected": self.injected,
            "rx_via": self.rx_via,
        }


class Peer:
    def __init__(self, scenarios: list[Scenario], keys_dir: str) -> None:
        self.pairs = {sc.n: SaPair(sc, keys_dir) for sc in scenarios}
        self.by_spi = {p.sc.spi_g2h: p for p in self.pairs.values()}
        self.by_inner = {p.sc.guest_inner: p for p in self.pairs.values()}
        self.unknown = 0
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((HOST_OUTER, ENCAP_PORT))
        self.tun_fd, name, _ = _core.open_tun(TUN, False)
        for cmd in (
            ["ip", "link", "set", name, "mtu", str(INNER_MTU), "up"],
            ["ip", "addr", "add", f"{HOST_INNER}/16", "dev", name],
        ):
            subprocess.run(cmd, check=True)
        os.set_blocking(self.tun_fd, False)
        self.echo_sha: list[str] = []

    # -- wire -> tun ---------------------------------------------------------------------
    def from_wire(self, esp: bytes, via: str) -> None:
        if len(esp) < 8:
            self.unknown += 1
            return
        spi = struct.unpack_from("!I", esp)[0]
        p = self.by_spi.get(spi)
        if p is None:
            self.unknown += 1
            return
        p.rx_via[via] = p.rx_via.get(via, 0) + 1
        try:
            _nh, inner = p.rx.decap(esp)
        except EspError:
            return  # counted by the SA (drop_<reason>)
        p.rx_ok += 1
        os.write(self.tun_fd, inner)

    # -- tun -> wire ---------------------------------------------------------------------
    def send(self, p: SaPair, esp: bytes) -> None:
        if p.sc.transport == "udp":
            self.udp.sendto(esp, (GUEST_OUTER, ENCAP_PORT))
        else:
            self.raw.sendto(esp, (GUEST_OUTER, 0))

    def from_tun(self, inner: bytes) -> None:
        if len(inner) < 20 or inner[0] >> 4 != 4:
            return
        p = self.by_inner.get(socket.inet_ntoa(inner[16:20]))
        if p is None:
            return
        esp = p.tx.encap(inner)
        self.send(p, esp)
        p.tx_sent += 1
        if p.tx_sent == 2 and "tx_replay" not in p.injected:
            self.send(p, esp)  # the kernel must count this as a replay
            forged = bytearray(p.tx.encap(inner))
            forged[-1] ^= 0x01  # ... and this as an integrity failure
            self.send(p, bytes(forged))
            p.injected["tx_replay"] = 1
            p.injected["tx_forged"] = 1

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            r, _, _ = select.select([self.raw, self.udp, self.tun_fd], [], [], 0.2)
            for s in r:
                if s is self.raw:
                    pkt = self.raw.recv(65535)
                    self.from_wire(pkt[(pkt[0] & 15) * 4 :], "esp")
                elif s is self.udp:
                    pkt = self.udp.recv(65535)
                    if pkt == b"\xff" or pkt[:4] == b"\0\0\0\0":
                        continue  # NAT keepalive / IKE marker
                    self.from_wire(pkt, "udp")
                else:
                    while True:
                        try:
                            inner = os.read(self.tun_fd, 65535)
                        except BlockingIOError:
                            break
                        self.from_tun(inner)

    # -- the TCP echo the guest's transfer uses ------------------------------------------
    def echo_server(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((HOST_INNER, ECHO_PORT))
        srv.listen(8)
        while True:
            c, _ = srv.accept()
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        with c:
            (n,) = struct.unpack("!I", _recv_exact(c, 4))
            data = _recv_exact(c, n)
            self.echo_sha.append(hashlib.sha256(data).hexdigest())
            c.sendall(data)

    def result(self) -> dict:
        return {
            "pairs": {p.sc.name: p.result() for p in self.pairs.values()},
            "unknown_spi": self.unknown,
            "echo_sha256": self.echo_sha,
        }


def _recv_exact(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("short read")
        buf += chunk
    return bytes(buf)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", required=True, choices=sorted(GROUPS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", required=True, help="directory of <scenario>.toml key files")
    args = ap.parse_args()
    peer = Peer(GROUPS[args.group], args.keys)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=peer.echo_server, daemon=True).start()
    print("peer: ready", flush=True)
    peer.run(stop)
    with open(args.out + ".tmp", "w") as f:
        json.dump(peer.result(), f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
