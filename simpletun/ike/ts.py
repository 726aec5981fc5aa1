"""Traffic selectors: from/to allowed prefixes, and narrowing (RFC 7296 §2.9)."""

from __future__ import annotations

import ipaddress

from simpletun.ike import const as c
from simpletun.ike.message import TrafficSelector


def from_prefix(prefix: str) -> TrafficSelector:
    """An all-protocols, all-ports selector covering ``prefix`` (e.g. ``10.0.0.0/24``)."""
    net = ipaddress.ip_network(prefix, strict=False)
    tst = c.TS_IPV4_ADDR_RANGE if net.version == 4 else c.TS_IPV6_ADDR_RANGE
    return TrafficSelector(
        tst, 0, 0, 65535, net.network_address.packed, net.broadcast_address.packed
    )


def _intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    if a.ts_type != b.ts_type:
        return None
    if a.protocol and b.protocol and a.protocol != b.protocol:
        return None
    proto = a.protocol or b.protocol
    sp, ep = max(a.start_port, b.start_port), min(a.end_port, b.end_port)
    if sp > ep:
        return None
    sa = max(a.start_addr, b.start_addr)  # same length, big-endian: bytes compare as numbers
    ea = min(a.end_addr, b.end_addr)
    if sa > ea:
        return None
    return TrafficSelector(a.ts_type, proto, sp, ep, sa, ea)


def narrow(proposed: list[TrafficSelector], allowed: list[TrafficSelector]):
    """The parts of ``proposed`` inside ``allowed`` (empty: TS_UNACCEPTABLE)."""
    out: list[TrafficSelector] = []
    for p in proposed:
        for a in allowed:
            x = _intersect(p, a)
            if x is not None and x not in out:
                out.append(x)
    return out


def within(got: list[TrafficSelector], offered: list[TrafficSelector]) -> bool:
    """Whether every selector of a response lies inside one we offered."""
    return bool(got) and all(any(_intersect(g, o) == g for o in offered) for g in got)


def describe(sels: list[TrafficSelector]) -> str:
    return " ".join(str(s) for s in sels)
