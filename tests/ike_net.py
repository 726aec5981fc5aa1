"""An in-memory network and clock for the sans-IO IKEv2 endpoints (tests only).

Each :class:`Node` is one :class:`simpletun.ike.Endpoint` at one IP address with ports 500 and
4500. ``Net.run()`` delivers queued datagrams (optionally dropping or duplicating some) and
fires timers by advancing the fake clock to the next deadline, until nothing is left to do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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


@dataclass
class Node:
    ip: str
    ep: Endpoint
    events: list = field(default_factory=list)
    children: dict = field(default_factory=dict)  # spi_in -> InstallChildSa

    def ups(self) -> list[IkeSaUp]:
        return [e for e in self.events if isinstance(e, IkeSaUp)]

    def downs(self) -> list[IkeSaDown]:
        return [e for e in self.events if isinstance(e, IkeSaDown)]

    def installs(self) -> list[InstallChildSa]:
        return [e for e in self.events if isinstance(e, InstallChildSa)]

    def removes(self) -> list[RemoveChildSa]:
        return [e for e in self.events if isinstance(e, RemoveChildSa)]

    def rekeys(self) -> list[IkeSaRekeyed]:
        return [e for e in self.events if isinstance(e, IkeSaRekeyed)]

    def failures(self) -> list[ChildSaFailed]:
        return [e for e in self.events if isinstance(e, ChildSaFailed)]


class Net:
    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self.now = 1000.0
        self.queue: deque = deque()
        self.wire: list[tuple[str, tuple, bytes]] = []  # (src ip, dst, data)
        self.drop = None  # callable(src, dst, data) -> bool
        self.delivered = 0

    def add(self, ip: str, ep: Endpoint) -> Node:
        n = Node(ip, ep)
        self.nodes[ip] = n
        return n

    def handle(self, node: Node, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.queue.append((node.ip, a.local_port, a.remote, a.data))
            else:
                node.events.append(a)
                if isinstance(a, InstallChildSa):
                    node.children[a.spi_in] = a
                elif isinstance(a, RemoveChildSa):
                    node.children.pop(a.spi_in, None)

    def step(self) -> bool:
        if not self.queue:
            return False
        src, sport, dst, data = self.queue.popleft()
        self.wire.append((src, dst, data))
        if self.drop is not None and self.drop(src, dst, data):
            return True
        node = self.nodes.get(dst[0])
        if node is not None:
            self.delivered += 1
            self.handle(node, node.ep.receive(data, (dst[0], dst[1]), (src, sport), self.now))
        return True

    def run(self, until: float | None = None, max_steps: int = 100000) -> None:
        """Deliver everything; then fire timers (advancing the clock) up to ``until``."""
        for _ in range(max_steps):
            if self.step():
                continue
            deadlines = [d for n in self.nodes.values() if (d := n.ep.next_deadline()) is not None]
            if not deadlines or until is None or min(deadlines) > until:
                if until is not None:
                    self.now = max(self.now, until)
                return
            self.now = max(self.now, min(deadlines))
            for n in self.nodes.values():
                self.handle(n, n.ep.tick(self.now))
        raise AssertionError("network did not settle")

    def call(self, node: Node, actions: list) -> None:
        self.handle(node, actions)
        self.run()
