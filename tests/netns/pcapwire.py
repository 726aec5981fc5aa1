"""Read what crossed the wire: pcap files → TCP streams → simpletun frames → ESP headers.

Stdlib only, no relative imports (``scripts/`` imports it too).

- :func:`read_pcap` parses classic pcap (what ``tcpdump -w`` writes): Ethernet, Linux cooked
  (SLL, SLL2) and raw-IP link types; IPv4 and IPv6; TCP segments.
- :func:`tcp_streams` reassembles each direction of each TCP connection by sequence number
  (retransmissions and overlaps collapse, holes are reported).
- :func:`split_frames` cuts a stream into simpletun frames (2-byte big-endian length + payload).
- :func:`classify` tells a control frame (first 4 payload bytes zero) from an ESP frame and
  decodes SPI and sequence number.
- :func:`write_udp_pcap` writes messages as IPv4/UDP datagrams into a new pcap (to hand frames
  cut out of a stream to a dissector that knows UDP encapsulation but not the stream's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04


class PcapError(ValueError):
    pass


@dataclass
class Segment:
    ts: float
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    flags: int
    payload: bytes


def _ip_str(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


def _parse_ip(pkt: bytes, ts: float) -> Segment | None:
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        total = struct.unpack_from(">H", pkt, 2)[0]
        frag = struct.unpack_from(">H", pkt, 6)[0]
        if pkt[9] != 6 or frag & 0x1FFF:
            return None
        # total length 0 happens for GSO super-packets captured before segmentation
        end = total if total >= ihl else len(pkt)
        src, dst = _ip_str(pkt[12:16]), _ip_str(pkt[16:20])
        tcp = pkt[ihl:end]
    elif version == 6:
        if len(pkt) < 40 or pkt[6] != 6:  # no extension headers expected here
            return None
        plen = struct.unpack_from(">H", pkt, 4)[0]
        src, dst = _ip_str(pkt[8:24]), _ip_str(pkt[24:40])
        tcp = pkt[40 : 40 + plen] if plen else pkt[40:]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
    off = (tcp[12] >> 4) * 4
    flags = tcp[13]
    return Segment(ts, src, sport, dst, dport, seq, flags, bytes(tcp[off:]))


def _strip_link(linktype: int, frame: bytes) -> bytes | None:
    if linktype == LINKTYPE_ETHERNET:
        off, ethertype = 14, struct.unpack_from(">H", frame, 12)[0] if len(frame) >= 14 else 0
        while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:
            ethertype = struct.unpack_from(">H", frame, off + 2)[0]
            off += 4
        return frame[off:] if ethertype in (0x0800, 0x86DD) else None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16 or struct.unpack_from(">H", frame, 14)[0] not in (0x0800, 0x86DD):
            return None
        return frame[16:]
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20 or struct.unpack_from(">H", frame, 0)[0] not in (0x0800, 0x86DD):
            return None
        return frame[20:]
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame
    raise PcapError(f"unsupported pcap link type {linktype}")


def write_udp_pcap(path, datagrams: list[tuple[str, int, str, int, bytes]]) -> None:
    """A classic pcap (raw IPv4 link type) of ``(src, sport, dst, dport, payload)`` UDP
    datagrams (IPv4 addresses; UDP checksum 0, as IPv4 allows)."""
    import ipaddress

    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW)]
    for i, (src, sport, dst, dport, payload) in enumerate(datagrams):
        udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        total = 20 + len(udp)
        a, b = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, i & 0xFFFF, 0, 64, 17, 0, a, b)
        words = struct.unpack("!10H", hdr)
        csum = sum(words)
        while csum >> 16:
            csum = (csum & 0xFFFF) + (csum >> 16)
        hdr = hdr[:10] + struct.pack("!H", ~csum & 0xFFFF) + hdr[12:]
        out.append(struct.pack("<IIII", i, 0, total, total) + hdr + udp)
    with open(path, "wb") as f:
        f.write(b"".join(out))


def read_pcap(data: bytes) -> list[Segment]:
    """All TCP segments of a classic pcap file, in capture order."""
    if len(data) < 24:
        raise PcapError("pcap file too short for its global header (was the capture stopped?)")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise PcapError(f"not a classic pcap file (magic {magic.hex()}); pcapng is not supported")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    segs: list[Segment] = []
    off = 24
    rec = struct.Struct(endian + "IIII")
    while off + 16 <= len(data):
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += 16
        frame = data[off : off + incl]
        off += incl
        if len(frame) < incl:
            break  # a record cut short by an interrupted writer
        ip = _strip_link(linktype, frame)
        if ip is None:
            continue
        seg = _parse_ip(ip, sec + frac / (1e9 if nano else 1e6))
        if seg is not None:
            segs.append(seg)
    return segs


@dataclass
class Stream:
    """One direction of one TCP connection, reassembled."""

    src: str
    sport: int
    dst: str
    dport: int
    data: bytes = b""
    holes: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) never seen
    saw_syn: bool = False
    first_ts: float = 0.0

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)

    def __repr__(self) -> str:
        return (
            f"Stream({self.src}:{self.sport} -> {self.dst}:{self.dport}, {len(self.data)} bytes,"
            f" holes={self.holes}, syn={self.saw_syn})"
        )


def _reassemble(segs: list[Segment]) -> Stream:
    first = segs[0]
    st = Stream(first.src, first.sport, first.dst, first.dport, first_ts=first.ts)
    syn = next((s for s in segs if s.flags & TCP_SYN), None)
    if syn is not None:
        base = (syn.seq + 1) & 0xFFFFFFFF
        st.saw_syn = True
    else:
        base = min(
            (s for s in segs if s.payload),
            key=lambda s: (s.seq - first.seq + 2**31) & 0xFFFFFFFF,
            default=first,
        ).seq
    pieces = []
    for s in segs:
        if not s.payload:
            continue
        rel = (s.seq - base) & 0xFFFFFFFF
        if rel >= 2**31:  # before base (e.g. data carried in a SYN), ignore
            continue
        pieces.append((rel, s.payload))
    pieces.sort(key=lambda p: p[0])
    out = bytearray()
    for rel, payload in pieces:
        end = rel + len(payload)
        if end <= len(out):
            continue  # retransmission of bytes we have
        if rel > len(out):
            st.holes.append((len(out), rel - len(out)))
            out.extend(b"\x00" * (rel - len(out)))
        out.extend(payload[len(out) - rel :])
    st.data = bytes(out)
    return st


def tcp_streams(segs: list[Segment], port: int | None = None) -> list[Stream]:
    """Reassemble every TCP direction (optionally only those with ``port`` at either end).

    A connection's two directions come out as two streams, ordered by first appearance. A
    4-tuple reused by a later connection (new SYN) starts a new stream.
    """
    groups: dict[tuple, list[list[Segment]]] = {}
    order: list[tuple[tuple, int]] = []
    for s in segs:
        if port is not None and port not in (s.sport, s.dport):
            continue
        key = (s.src, s.sport, s.dst, s.dport)
        lst = groups.setdefault(key, [])
        if not lst or (s.flags & TCP_SYN and any(x.payload or x.flags & TCP_FIN for x in lst[-1])):
            lst.append([])
            order.append((key, len(lst) - 1))
        lst[-1].append(s)
    return [_reassemble(groups[key][i]) for key, i in order]


@dataclass
class Frame:
    offset: int  # of the length prefix in the stream
    payload: bytes

    @property
    def is_control(self) -> bool:
        return len(self.payload) >= 4 and self.payload[:4] == b"\x00\x00\x00\x00"

    @property
    def spi(self) -> int | None:
        return None if len(self.payload) < 8 else struct.unpack_from(">I", self.payload, 0)[0]

    @property
    def seq(self) -> int | None:
        return None if len(self.payload) < 8 else struct.unpack_from(">I", self.payload, 4)[0]


def split_frames(stream: bytes) -> tuple[list[Frame], bytes]:
    """Cut a byte stream into frames; returns (frames, trailing partial frame bytes)."""
    frames = []
    off = 0
    while off + 2 <= len(stream):
        n = struct.unpack_from(">H", stream, off)[0]
        if off + 2 + n > len(stream):
            break
        frames.append(Frame(off, stream[off + 2 : off + 2 + n]))
        off += 2 + n
    return frames, stream[off:]


def esp_summary(frames: list[Frame]) -> dict:
    """Facts about a frame sequence as the ESP wire protocol promises them.

    Returns a dict: leading control frames, ESP frames, control frames after the first ESP
    frame, the SPIs seen, whether sequence numbers strictly increase, and gaps in them.
    """
    lead = 0
    while lead < len(frames) and frames[lead].is_control:
        lead += 1
    esp = [f for f in frames[lead:] if not f.is_control]
    late_control = sum(1 for f in frames[lead:] if f.is_control)
    seqs = [f.seq for f in esp]
    increasing = all(b > a for a, b in zip(seqs, seqs[1:], strict=False))
    gaps = sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1)
    return {
        "control_lead": lead,
        "esp": len(esp),
        "late_control": late_control,
        "spis": sorted({f.spi for f in esp}),
        "first_seq": seqs[0] if seqs else None,
        "last_seq": seqs[-1] if seqs else None,
        "seq_increasing": increasing,
        "seq_gaps": gaps,
    }
