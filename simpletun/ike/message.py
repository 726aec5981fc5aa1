"""IKEv2 message and payload codec (RFC 7296 §3), strict and total.

``parse_message`` never raises anything but :class:`ParseError`, which names the notification a
responder should answer with (INVALID_SYNTAX, UNSUPPORTED_CRITICAL_PAYLOAD, INVALID_MAJOR_VERSION)
and why. The encrypted payload (SK) stays opaque here; ``parse_chain`` parses its plaintext once
decrypted. Encoding is the exact inverse for every payload that we generate.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from simpletun.ike import const as c


class ParseError(Exception):
    """Malformed input. ``notify`` is the error notification type to answer with, ``data`` its
    notification data (the payload type for UNSUPPORTED_CRITICAL_PAYLOAD)."""

    def __init__(self, reason: str, notify: int = c.N_INVALID_SYNTAX, data: bytes = b""):
        super().__init__(reason)
        self.reason = reason
        self.notify = notify
        self.data = data


# ---------------------------------------------------------------------------------- payloads


@dataclass
class Transform:
    type: int
    id: int
    key_length: int | None = None
    unknown_attribute: bool = False  # a transform with an unknown attribute is unusable

    def name(self) -> str:
        n = c.TRANSFORM_NAMES.get((self.type, self.id), f"{self.type}:{self.id}")
        return f"{n}_{self.key_length}" if self.key_length else n


@dataclass
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: list[Transform]

    def of_type(self, ttype: int) -> list[Transform]:
        return [t for t in self.transforms if t.type == ttype]

    def describe(self) -> str:
        proto = {c.PROTO_IKE: "IKE", c.PROTO_ESP: "ESP"}.get(self.protocol, str(self.protocol))
        return proto + ":" + "/".join(t.name() for t in self.transforms)


@dataclass
class SA:
    proposals: list[Proposal]
    type: int = c.PL_SA


@dataclass
class KE:
    group: int
    data: bytes
    type: int = c.PL_KE


@dataclass
class Nonce:
    data: bytes
    type: int = c.PL_NONCE


@dataclass
class Id:
    type: int  # PL_IDI or PL_IDR
    id_type: int
    data: bytes

    def body(self) -> bytes:
        """The payload body without its generic header: what AUTH signs (RestOfIDPayload)."""
        return bytes([self.id_type, 0, 0, 0]) + self.data

    def text(self) -> str:
        try:
            if self.id_type == c.ID_IPV4_ADDR and len(self.data) == 4:
                return str(ipaddress.IPv4Address(self.data))
            if self.id_type == c.ID_IPV6_ADDR and len(self.data) == 16:
                return str(ipaddress.IPv6Address(self.data))
            if self.id_type in (c.ID_FQDN, c.ID_RFC822_ADDR):
                return self.data.decode("ascii")
        except (UnicodeDecodeError, ValueError):
            pass
        return "keyid:" + self.data.hex() if self.id_type == c.ID_KEY_ID else self.data.hex()


@dataclass
class Auth:
    method: int
    data: bytes
    type: int = c.PL_AUTH


@dataclass
class Notify:
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""
    type: int = c.PL_NOTIFY

    def name(self) -> str:
        return c.NOTIFY_NAMES.get(self.notify_type, str(self.notify_type))


@dataclass
class Delete:
    protocol: int
    spis: list[bytes] = field(default_factory=list)
    type: int = c.PL_DELETE


@dataclass
class Vendor:
    data: bytes
    type: int = c.PL_VENDOR


@dataclass(frozen=True)
class TrafficSelector:
    ts_type: int
    protocol: int
    start_port: int
    end_port: int
    start_addr: bytes
    end_addr: bytes

    def __str__(self) -> str:
        a = ipaddress.ip_address(self.start_addr)
        b = ipaddress.ip_address(self.end_addr)
        try:
            nets = list(ipaddress.summarize_address_range(a, b))
            addr = str(nets[0]) if len(nets) == 1 else f"{a}..{b}"
        except (TypeError, ValueError):
            addr = f"{a}..{b}"
        if self.protocol or (self.start_port, self.end_port) != (0, 65535):
            return f"{addr}[{self.protocol}/{self.start_port}-{self.end_port}]"
        return addr


@dataclass
class TS:
    type: int  # PL_TSI or PL_TSR
    selectors: list[TrafficSelector]


@dataclass
class SK:
    """The encrypted payload: ``first`` is the type of the first inner payload, ``body`` is
    IV | ciphertext | ICV. ``offset`` is where its generic header starts in the message."""

    first: int
    body: bytes
    offset: int = 0
    type: int = c.PL_SK


@dataclass
class Unknown:
    type: int
    body: bytes
    critical: bool = False


Payload = SA | KE | Nonce | Id | Auth | Notify | Delete | Vendor | TS | SK | Unknown


# ---------------------------------------------------------------------------------- message


@dataclass
class Message:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int
    msg_id: int
    payloads: list = field(default_factory=list)
    raw: bytes = b""
    # for the summary of a decrypted message: the inner payloads
    inner: list | None = None

    @property
    def is_response(self) -> bool:
        return bool(self.flags & c.FLAG_RESPONSE)

    @property
    def from_initiator(self) -> bool:
        return bool(self.flags & c.FLAG_INITIATOR)

    def all(self, ptype: int) -> list:
        return [p for p in self.body() if p.type == ptype]

    def get(self, ptype: int):
        for p in self.body():
            if p.type == ptype:
                return p
        return None

    def notifies(self) -> dict[int, Notify]:
        out: dict[int, Notify] = {}
        for p in self.body():
            if p.type == c.PL_NOTIFY:
                out.setdefault(p.notify_type, p)
        return out

    def body(self) -> list:
        return self.inner if self.inner is not None else self.payloads

    def summary(self) -> str:
        """strongSwan's one-line form: ``IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) ]``."""
        ex = c.EXCHANGE_NAMES.get(self.exchange, str(self.exchange))
        kind = "response" if self.is_response else "request"
        return f"{ex} {kind} {self.msg_id} [ {payload_list(self.body())}]"


def payload_list(payloads: list) -> str:
    out = []
    for p in payloads:
        if p.type == c.PL_NOTIFY:
            out.append(f"N({p.name()})")
        elif p.type == c.PL_DELETE:
            out.append("D")
        else:
            out.append(c.PAYLOAD_NAMES.get(p.type, f"U({p.type})"))
    return "".join(s + " " for s in out)


HEADER = struct.Struct("!8s8sBBBBII")
GENERIC = struct.Struct("!BBH")


def parse_header(data: bytes) -> Message:
    if len(data) < c.IKE_HEADER_LEN:
        raise ParseError(f"message of {len(data)} bytes is shorter than the IKE header")
    spi_i, spi_r, nxt, version, exchange, flags, msg_id, length = HEADER.unpack_from(data)
    if version >> 4 != 2:
        raise ParseError(
            f"IKE major version {version >> 4} (we speak 2)", c.N_INVALID_MAJOR_VERSION
        )
    if length != len(data):
        raise ParseError(f"header length {length} but datagram of {len(data)} bytes")
    msg = Message(spi_i, spi_r, exchange, flags, msg_id, raw=bytes(data))
    msg._first = nxt  # type: ignore[attr-defined]
    return msg


def parse_message(data: bytes) -> Message:
    """Parse a whole IKE message (without the non-ESP marker)."""
    msg = parse_header(data)
    msg.payloads = parse_chain(msg._first, data, c.IKE_HEADER_LEN, outer=True)  # type: ignore
    return msg


def parse_chain(first: int, data: bytes, offset: int = 0, outer: bool = False) -> list:
    """Parse a chain of payloads starting at ``offset`` up to the end of ``data``."""
    payloads: list = []
    nxt = first
    pos = offset
    end = len(data)
    while nxt != c.PL_NONE:
        if end - pos < GENERIC.size:
            raise ParseError(f"payload {nxt} truncated: {end - pos} bytes left for its header")
        following, flags, length = GENERIC.unpack_from(data, pos)
        if length < GENERIC.size or pos + length > end:
            raise ParseError(f"payload {nxt} has length {length}, {end - pos} bytes left")
        body = bytes(data[pos + GENERIC.size : pos + length])
        critical = bool(flags & 0x80)
        if nxt == c.PL_SK:
            if not outer:
                raise ParseError("an encrypted payload inside an encrypted payload")
            if pos + length != end:
                raise ParseError("the encrypted payload is not the last payload")
            payloads.append(SK(following, body, pos))
            return payloads
        if nxt in c.KNOWN_PAYLOADS and nxt != c.PL_SKF:
            payloads.append(_parse_body(nxt, body))
        elif critical:
            raise ParseError(
                f"unknown critical payload type {nxt}",
                c.N_UNSUPPORTED_CRITICAL_PAYLOAD,
                bytes([nxt & 0xFF]),
            )
        else:
            payloads.append(Unknown(nxt, body, critical))
        nxt = following
        pos += length
        if len(payloads) > 64:
            raise ParseError("more than 64 payloads")
    if pos != end:
        raise ParseError(f"{end - pos} bytes after the last payload")
    return payloads


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise ParseError(f"{what} payload of {len(body)} bytes is too short (needs {n})")


def _parse_body(ptype: int, body: bytes):
    if ptype == c.PL_SA:
        return SA(_parse_proposals(body))
    if ptype == c.PL_KE:
        _need(body, 4, "KE")
        (group,) = struct.unpack_from("!H", body)
        return KE(group, body[4:])
    if ptype == c.PL_NONCE:
        if not 16 <= len(body) <= 256:
            raise ParseError(f"nonce of {len(body)} bytes (RFC 7296: 16..256)")
        return Nonce(body)
    if ptype in (c.PL_IDI, c.PL_IDR):
        _need(body, 5, "ID")
        return Id(ptype, body[0], body[4:])
    if ptype == c.PL_AUTH:
        _need(body, 5, "AUTH")
        return Auth(body[0], body[4:])
    if ptype == c.PL_NOTIFY:
        _need(body, 4, "N")
        proto, spi_size, ntype = struct.unpack_from("!BBH", body)
        _need(body, 4 + spi_size, "N")
        return Notify(ntype, body[4 + spi_size :], proto, body[4 : 4 + spi_size])
    if ptype == c.PL_DELETE:
        _need(body, 4, "D")
        proto, spi_size, n = struct.unpack_from("!BBH", body)
        if proto == c.PROTO_IKE:
            if spi_size != 0 or n != 0 or len(body) != 4:
                raise ParseError("IKE Delete with SPIs")
            return Delete(proto)
        if spi_size != 4 or len(body) != 4 + 4 * n:
            raise ParseError(f"Delete: {n} SPIs of {spi_size} bytes in {len(body) - 4} bytes")
        return Delete(proto, [body[4 + 4 * i : 8 + 4 * i] for i in range(n)])
    if ptype == c.PL_VENDOR:
        return Vendor(body)
    if ptype in (c.PL_TSI, c.PL_TSR):
        return TS(ptype, _parse_ts(body))
    return Unknown(ptype, body)


def _parse_proposals(body: bytes) -> list[Proposal]:
    out = []
    pos = 0
    last = False
    while not last:
        if len(body) - pos < 8:
            raise ParseError("SA: proposal truncated")
        more, _, plen, num, proto, spi_size, ntrans = struct.unpack_from("!BBHBBBB", body, pos)
        if more not in (0, 2):
            raise ParseError(f"SA: proposal 'last' field {more}")
        last = more == 0
        if plen < 8 + spi_size or pos + plen > len(body):
            raise ParseError(f"SA: proposal length {plen}")
        spi = body[pos + 8 : pos + 8 + spi_size]
        transforms = _parse_transforms(body[pos + 8 + spi_size : pos + plen], ntrans)
        out.append(Proposal(num, proto, spi, transforms))
        pos += plen
        if len(out) > 32:
            raise ParseError("SA: more than 32 proposals")
    if pos != len(body):
        raise ParseError("SA: bytes after the last proposal")
    return out


def _parse_transforms(body: bytes, count: int) -> list[Transform]:
    out = []
    pos = 0
    for i in range(count):
        if len(body) - pos < 8:
            raise ParseError("SA: transform truncated")
        more, _, tlen, ttype, _, tid = struct.unpack_from("!BBHBBH", body, pos)
        if more != (0 if i == count - 1 else 3):
            raise ParseError(f"SA: transform 'last' field {more}")
        if tlen < 8 or pos + tlen > len(body):
            raise ParseError(f"SA: transform length {tlen}")
        t = Transform(ttype, tid)
        apos = pos + 8
        while apos < pos + tlen:
            if pos + tlen - apos < 4:
                raise ParseError("SA: transform attribute truncated")
            atype, aval = struct.unpack_from("!HH", body, apos)
            if atype & 0x8000:
                if atype & 0x7FFF == c.ATTR_KEY_LENGTH:
                    t.key_length = aval
                else:
                    t.unknown_attribute = True
                apos += 4
            else:
                if apos + 4 + aval > pos + tlen:
                    raise ParseError("SA: transform attribute length")
                t.unknown_attribute = True
                apos += 4 + aval
        out.append(t)
        pos += tlen
    if pos != len(body):
        raise ParseError("SA: bytes after the last transform")
    return out


def _parse_ts(body: bytes) -> list[TrafficSelector]:
    _need(body, 4, "TS")
    n = body[0]
    pos = 4
    out = []
    for _ in range(n):
        if len(body) - pos < 8:
            raise ParseError("TS: selector truncated")
        ts_type, proto, slen, sport, eport = struct.unpack_from("!BBHHH", body, pos)
        alen = {c.TS_IPV4_ADDR_RANGE: 4, c.TS_IPV6_ADDR_RANGE: 16}.get(ts_type)
        if alen is None:
            raise ParseError(f"TS: unknown selector type {ts_type}")
        if slen != 8 + 2 * alen or pos + slen > len(body):
            raise ParseError(f"TS: selector length {slen}")
        a = body[pos + 8 : pos + 8 + alen]
        b = body[pos + 8 + alen : pos + 8 + 2 * alen]
        out.append(TrafficSelector(ts_type, proto, sport, eport, a, b))
        pos += slen
    if pos != len(body):
        raise ParseError("TS: bytes after the last selector")
    if not out:
        raise ParseError("TS: no selectors")
    return out


# ---------------------------------------------------------------------------------- encoding


def _encode_body(p) -> bytes:
    t = p.type
    if t == c.PL_SA:
        return _encode_proposals(p.proposals)
    if t == c.PL_KE:
        return struct.pack("!HH", p.group, 0) + p.data
    if t in (c.PL_NONCE, c.PL_VENDOR):
        return p.data
    if t in (c.PL_IDI, c.PL_IDR):
        return p.body()
    if t == c.PL_AUTH:
        return bytes([p.method, 0, 0, 0]) + p.data
    if t == c.PL_NOTIFY:
        return struct.pack("!BBH", p.protocol, len(p.spi), p.notify_type) + p.spi + p.data
    if t == c.PL_DELETE:
        size = 0 if p.protocol == c.PROTO_IKE else 4
        return struct.pack("!BBH", p.protocol, size, len(p.spis)) + b"".join(p.spis)
    if t in (c.PL_TSI, c.PL_TSR):
        out = bytes([len(p.selectors), 0, 0, 0])
        for s in p.selectors:
            out += struct.pack(
                "!BBHHH", s.ts_type, s.protocol, 8 + 2 * len(s.start_addr), s.start_port, s.end_port
            )
            out += s.start_addr + s.end_addr
        return out
    if isinstance(p, Unknown):
        return p.body
    raise ValueError(f"cannot encode payload {p!r}")


def _encode_proposals(proposals: list[Proposal]) -> bytes:
    out = b""
    for i, prop in enumerate(proposals):
        tb = b""
        for j, tr in enumerate(prop.transforms):
            attrs = b""
            if tr.key_length is not None:
                attrs = struct.pack("!HH", 0x8000 | c.ATTR_KEY_LENGTH, tr.key_length)
            more = 0 if j == len(prop.transforms) - 1 else 3
            tb += struct.pack("!BBHBBH", more, 0, 8 + len(attrs), tr.type, 0, tr.id) + attrs
        more = 0 if i == len(proposals) - 1 else 2
        plen = 8 + len(prop.spi) + len(tb)
        out += struct.pack(
            "!BBHBBBB", more, 0, plen, prop.number, prop.protocol, len(prop.spi),
            len(prop.transforms),
        )  # fmt: skip
        out += prop.spi + tb
    return out


def encode_chain(payloads: list) -> tuple[int, bytes]:
    """(type of the first payload, the encoded chain)."""
    bodies = [(p.type, getattr(p, "critical", False), _encode_body(p)) for p in payloads]
    out = b""
    for i, (_t, crit, body) in enumerate(bodies):
        nxt = bodies[i + 1][0] if i + 1 < len(bodies) else c.PL_NONE
        out += GENERIC.pack(nxt, 0x80 if crit else 0, GENERIC.size + len(body)) + body
    return (bodies[0][0] if bodies else c.PL_NONE), out


def encode_header(msg: Message, first: int, length: int) -> bytes:
    return HEADER.pack(
        msg.spi_i, msg.spi_r, first, c.VERSION, msg.exchange, msg.flags, msg.msg_id, length
    )


def encode_message(msg: Message) -> bytes:
    """Encode an unencrypted message."""
    first, chain = encode_chain(msg.payloads)
    return encode_header(msg, first, c.IKE_HEADER_LEN + len(chain)) + chain
