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
            elif isinstance(a, RemoveChildSa):
                self.children.pop(a.spi_in, None)

    def poll(self, timeout: float) -> None:
        dl = self.ep.next_deadline()
        if dl is not None:
            timeout = max(0.0, min(timeout, dl - self.now()))
        r, _, _ = select.select(list(self.socks.values()), [], [], timeout)
        for s in r:
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
