"""A plain-socket driver for the sans-IO :class:`simpletun.ike.Endpoint` (tests only).

Binds UDP 500 and 4500 on one address inside a network namespace, feeds datagrams and timer
ticks to the endpoint, sends what it asks for and records its events. ESP-in-UDP datagrams on
4500 (first four bytes not zero) go to ``esp_handler`` if one is set. Single-threaded: the
test calls :meth:`run_until` to make progress.
"""

from __future__ import annotations

import select
import socket
import time

from netns.lab import run_in_netns

from simpletun.ike import (
    ChildSaFailed,
    Endpoint,
    IkeSaDown,
    IkeSaRekeyed,
    IkeSaUp,
    InstallChildSa,
    RemoveChildSa,
    Send,
)


class Driver:
    def __init__(self, ns: str, ip: str, ep: Endpoint):
        self.ip = ip
        self.ep = ep
        self.socks: dict[int, socket.socket] = {}
        for port in (500, 4500):

            def make(port=port):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((ip, port))
                s.setblocking(False)
                return s

            self.socks[port] = run_in_netns(ns, make)
        self.events: list = []
        self.children: dict[int, InstallChildSa] = {}
        self.esp_handler = None
        self.sent = 0
        self.tun_fd: int | None = None
        self.esp_in: dict = {}  # spi -> simpletun._core.SecurityAssociation
        self.esp_out = None  # (SecurityAssociation, remote address)
        self.pending_out: dict = {}  # old spi_in -> outbound SA to switch to when it goes
        self.esp_stats = {"tx": 0, "rx": 0, "rx_unknown_spi": 0, "rx_dropped": 0, "tx_no_sa": 0}

    def attach_tun(self, fd: int) -> None:
        """Carry IP packets between TUN ``fd`` and ESP-in-UDP with simpletun's Rust ESP core
        (per-packet Python: a test harness, not the data plane)."""
        self.tun_fd = fd
        self.esp_handler = self._esp_in

    def _install_esp(self, a: InstallChildSa) -> None:
        from simpletun._core import SecurityAssociation

        if self.tun_fd is None or a.encap is None:
            return
        # inbound first, then outbound: at once if we initiated the exchange, else (the peer's
        # rekey) once the old SA is deleted
        self.esp_in[a.spi_in] = SecurityAssociation(a.spi_in, a.enc_in, a.auth_in)
        out = (SecurityAssociation(a.spi_out, a.enc_out, a.auth_out), a.encap[1])
        if a.initiator or a.rekey_of is None or self.esp_out is None:
            self.esp_out = out
        else:
            self.pending_out[a.rekey_of] = out

    def _remove_esp(self, a: RemoveChildSa) -> None:
        self.esp_in.pop(a.spi_in, None)
        pending = self.pending_out.pop(a.spi_in, None)
        if pending is not None:
            self.esp_out = pending
        elif self.esp_out is not None and self.esp_out[0].spi == a.spi_out:
            self.esp_out = None

    def _esp_in(self, data: bytes, addr) -> None:
        import os

        sa = self.esp_in.get(int.from_bytes(data[:4], "big"))
        if sa is None:
            self.esp_stats["rx_unknown_spi"] += 1
            return
        try:
            _nh, inner = sa.decap(data)
        except Exception:
            self.esp_stats["rx_dropped"] += 1
            return
        self.esp_stats["rx"] += 1
        os.write(self.tun_fd, inner)

    def _tun_out(self) -> None:
        import os

        while True:
            try:
                pkt = os.read(self.tun_fd, 65535)
            except BlockingIOError:
                return
            if self.esp_out is None:
                self.esp_stats["tx_no_sa"] += 1
                continue
            sa, remote = self.esp_out
            self.socks[4500].sendto(sa.encap(pkt), remote)
            self.esp_stats["tx"] += 1

    def close(self) -> None:
        for s in self.socks.values():
            s.close()

    def now(self) -> float:
        return time.monotonic()

    def handle(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.sent += 1
                self.socks[a.local_port].sendto(a.data, a.remote)
                continue
            self.events.append(a)
            if isinstance(a, InstallChildSa):
                self.children[a.spi_in] = a
                self._install_esp(a)
            elif isinstance(a, RemoveChildSa):
                self.children.pop(a.spi_in, None)
                self._remove_esp(a)

    def poll(self, timeout: float) -> None:
        dl = self.ep.next_deadline()
        if dl is not None:
            timeout = max(0.0, min(timeout, dl - self.now()))
        fds = list(self.socks.values()) + ([self.tun_fd] if self.tun_fd is not None else [])
        r, _, _ = select.select(fds, [], [], timeout)
        for s in r:
            if s == self.tun_fd:
                self._tun_out()
                continue
            port = s.getsockname()[1]
            while True:
                try:
                    data, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if port == 4500 and data[:4] != b"\x00\x00\x00\x00" and len(data) > 1:
                    if self.esp_handler is not None:
                        self.esp_handler(data, addr)
                    continue
                self.handle(self.ep.receive(data, (self.ip, port), addr, self.now()))
        dl = self.ep.next_deadline()
        if dl is not None and dl <= self.now():
            self.handle(self.ep.tick(self.now()))

    def run_until(self, pred, timeout: float, what: str = "condition"):
        end = self.now() + timeout
        while True:
            v = pred()
            if v:
                return v
            if self.now() > end:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.poll(0.05)

    def run_for(self, seconds: float) -> None:
        end = self.now() + seconds
        while self.now() < end:
            self.poll(min(0.05, end - self.now()))

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def ups(self) -> list[IkeSaUp]:
        return self.of(IkeSaUp)

    def downs(self) -> list[IkeSaDown]:
        return self.of(IkeSaDown)

    def rekeys(self) -> list[IkeSaRekeyed]:
        return self.of(IkeSaRekeyed)

    def failures(self) -> list[ChildSaFailed]:
        return self.of(ChildSaFailed)


def open_tun(ns: str, name: str) -> int:
    """A TUN device (IFF_TUN | IFF_NO_PI, non-blocking) created inside namespace ``ns``."""
    import fcntl
    import os
    import struct

    def make():
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
        return fd

    return run_in_netns(ns, make)
