//! TUN offloads, sans IO: the `virtio_net_hdr` that `IFF_VNET_HDR` puts before every packet,
//! TSO/USO segmentation of the super-packets the kernel hands over, and GRO coalescing of
//! received TCP segments into super-packets the kernel accepts on write.
//!
//! Header layout (`struct virtio_net_hdr`, include/uapi/linux/virtio_net.h; 10 bytes, or 12 with
//! the trailing `num_buffers` when the device's header size is set to 12 with
//! `TUNSETVNETHDRSZ`). Multi-byte fields are little-endian: TUN uses the host's byte order for
//! legacy headers unless `TUNSETVNETBE` is set, and this crate only targets little-endian hosts
//! (or devices switched to little-endian with `TUNSETVNETLE`).
//!
//! ```text
//! | flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16 | [num_buffers u16] |
//! ```
//!
//! Everything here works over caller-owned buffers, never panics on any input and allocates only
//! when a [`Gro`] is built. A packet that cannot be handled is refused with an [`OffloadDrop`]
//! the caller counts ([`OffloadDrop::drop_reason`] maps it to the shared [`DropReason`]).
//!
//! Checksums are the Internet checksum (RFC 1071): the ones' complement of the ones' complement
//! sum of 16-bit big-endian words, with TCP/UDP covering a pseudo-header (RFC 793/768 for IPv4,
//! RFC 8200 §8.1 for IPv6).

use std::fmt;

use crate::drop::DropReason;

/// Size of `struct virtio_net_hdr`, the default header size of a TUN device.
pub const VNET_HDR_LEN: usize = 10;
/// Size of `struct virtio_net_hdr_mrg_rxbuf` / `virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN_MRG: usize = 12;
/// A header meaning "a plain packet, checksum already complete": what to write before every
/// packet that is not a coalesced super-packet (take the first `hdr_sz` bytes).
pub const VNET_HDR_NONE: [u8; VNET_HDR_LEN_MRG] = [0; VNET_HDR_LEN_MRG];

/// `flags`: the checksum from `csum_start` to the end still has to be computed and stored at
/// `csum_start + csum_offset` (the field holds the pseudo-header sum).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been verified (receive side only).
pub const F_DATA_VALID: u8 = 2;
/// `flags`: `csum_start`/`csum_offset` carry coalescing info (`VIRTIO_NET_HDR_F_RSC_INFO`).
pub const F_RSC_INFO: u8 = 4;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (UFO), deprecated; refused.
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation offload (USO, `UDP_SEGMENT` semantics).
pub const GSO_UDP_L4: u8 = 5;
/// Bit or-ed into `gso_type`: the TCP sender uses ECN, so CWR must appear on the first
/// segment only.
pub const GSO_ECN: u8 = 0x80;

/// The largest IP packet (IPv4 total length / IPv6 payload length fit 16 bits): a super-packet
/// is never larger than this.
pub const MAX_IP_PACKET: usize = 65535;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

const IPV4_HDR_MIN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
const TCP_HDR_MIN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// Why a packet read from (or destined to) a vnet-header TUN device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OffloadDrop {
    /// Shorter than the vnet header, or the header size is not one TUN uses.
    ShortHeader,
    /// Unknown or unsupported `gso_type` (e.g. UFO), or unknown flag bits.
    BadGsoType,
    /// The IP header is truncated, of the wrong version for `gso_type`, fragmented, carries
    /// extension headers, or the transport protocol does not match `gso_type`.
    BadIp,
    /// The transport header is truncated or its length field is impossible.
    BadTransport,
    /// `csum_start`/`csum_offset` point outside the packet or disagree with the headers.
    BadCsum,
    /// `gso_size` is zero or too large, `hdr_len` lies beyond the packet, or nothing to segment.
    BadGso,
    /// More segments than the caller gave buffers for.
    TooManySegments,
    /// A caller buffer cannot hold a segment.
    BufferTooSmall,
}

impl OffloadDrop {
    pub const ALL: [OffloadDrop; 8] = [
        OffloadDrop::ShortHeader,
        OffloadDrop::BadGsoType,
        OffloadDrop::BadIp,
        OffloadDrop::BadTransport,
        OffloadDrop::BadCsum,
        OffloadDrop::BadGso,
        OffloadDrop::TooManySegments,
        OffloadDrop::BufferTooSmall,
    ];

    /// Stable snake_case name for a counter.
    pub fn name(self) -> &'static str {
        match self {
            OffloadDrop::ShortHeader => "vnet_short_header",
            OffloadDrop::BadGsoType => "vnet_bad_gso_type",
            OffloadDrop::BadIp => "vnet_bad_ip",
            OffloadDrop::BadTransport => "vnet_bad_transport",
            OffloadDrop::BadCsum => "vnet_bad_csum",
            OffloadDrop::BadGso => "vnet_bad_gso",
            OffloadDrop::TooManySegments => "vnet_too_many_segments",
            OffloadDrop::BufferTooSmall => "vnet_buffer_too_small",
        }
    }

    /// The shared drop reason this is counted under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            OffloadDrop::TooManySegments | OffloadDrop::BufferTooSmall => DropReason::Oversize,
            _ => DropReason::BadLength,
        }
    }
}

impl fmt::Display for OffloadDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OffloadDrop::ShortHeader => "vnet header: packet shorter than the header",
            OffloadDrop::BadGsoType => "vnet header: unsupported gso_type or flags",
            OffloadDrop::BadIp => "vnet packet: malformed or unsupported IP header",
            OffloadDrop::BadTransport => "vnet packet: malformed TCP/UDP header",
            OffloadDrop::BadCsum => "vnet header: csum_start/csum_offset out of range",
            OffloadDrop::BadGso => "vnet header: bad gso_size or hdr_len",
            OffloadDrop::TooManySegments => "super-packet has more segments than buffers",
            OffloadDrop::BufferTooSmall => "segment buffer too small",
        })
    }
}

impl std::error::Error for OffloadDrop {}

/// A parsed `virtio_net_hdr` (without `num_buffers`, which TUN ignores on write and sets to 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

impl VnetHdr {
    /// Parse the header at the start of `buf`, a read from a TUN device whose vnet header size
    /// is `hdr_sz` (10 or 12; TUN allows larger sizes, whose extra bytes are ignored). The
    /// packet is `buf[hdr_sz..]`.
    pub fn parse(buf: &[u8], hdr_sz: usize) -> Result<VnetHdr, OffloadDrop> {
        if hdr_sz < VNET_HDR_LEN || buf.len() < hdr_sz {
            return Err(OffloadDrop::ShortHeader);
        }
        let h = VnetHdr {
            flags: buf[0],
            gso_type: buf[1],
            hdr_len: le16(buf, 2),
            gso_size: le16(buf, 4),
            csum_start: le16(buf, 6),
            csum_offset: le16(buf, 8),
        };
        if h.flags & !(F_NEEDS_CSUM | F_DATA_VALID | F_RSC_INFO) != 0 {
            return Err(OffloadDrop::BadGsoType);
        }
        match h.gso_type & !GSO_ECN {
            GSO_NONE if h.gso_type & GSO_ECN != 0 => Err(OffloadDrop::BadGsoType),
            GSO_NONE | GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => Ok(h),
            _ => Err(OffloadDrop::BadGsoType),
        }
    }

    /// Write the header into `out[..hdr_sz]` (bytes past the 10 defined ones are zeroed).
    /// `out` must be at least `hdr_sz >= 10` bytes long.
    pub fn write(&self, out: &mut [u8], hdr_sz: usize) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out[VNET_HDR_LEN..hdr_sz].fill(0);
    }

    /// Whether the packet needs segmentation (a TSO/USO super-packet).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

// ---------------------------------------------------------------------------------------------
// Internet checksum

/// Unfolded ones' complement sum of `data` as big-endian 16-bit words (an odd last byte is
/// padded with zero), added to `initial`: the same sum modulo 0xffff, zero only if `data` is
/// all zeros and `initial` is zero, and below 2^36 + `initial` (so sums of a few can be added).
///
/// Four independent accumulators take 64-bit big-endian words (32 bytes per round, no carry
/// chain between them); each counts its wrap-arounds apart. Since 2^16 ≡ 1 (mod 0xffff), a
/// 64-bit word is congruent to the sum of its four 16-bit words, and each wrap of an
/// accumulator (2^64) to 1, as in RFC 1071's deferred carries.
pub fn sum16(data: &[u8], initial: u64) -> u64 {
    #[inline(always)]
    fn word(c: &[u8]) -> u64 {
        u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
    }
    #[inline(always)]
    fn half(x: u64) -> u64 {
        (x >> 32) + (x & 0xffff_ffff)
    }
    let mut acc = [0u64; 4];
    let mut wraps = 0u64;
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            let (v, w) = a.overflowing_add(word(&c[i * 8..]));
            *a = v;
            wraps += w as u64;
        }
    }
    let mut rest = chunks.remainder();
    let mut tail = 0u64;
    while rest.len() >= 8 {
        tail += half(word(rest));
        rest = &rest[8..];
    }
    while rest.len() >= 2 {
        tail += u16::from_be_bytes([rest[0], rest[1]]) as u64;
        rest = &rest[2..];
    }
    if let Some(&b) = rest.first() {
        tail += (b as u64) << 8;
    }
    acc.iter().map(|&a| half(a)).sum::<u64>() + wraps + tail + initial
}

/// Fold an unfolded sum to 16 bits (end-around carry).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (the value to store in a header checksum field).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// Unfolded pseudo-header sum of the IP packet `pkt` (version from its first nibble; the
/// addresses must be present) for protocol `proto` and transport length `len`.
fn pseudo_sum(pkt: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    sum16(addrs, proto as u64 + len as u64)
}

/// Complete a partial checksum in place (`F_NEEDS_CSUM` on a non-GSO packet): the 16-bit field
/// at `csum_start + csum_offset` holds the pseudo-header sum; replace it with the checksum of
/// everything from `csum_start` to the end, seeded with that sum. A result of 0 is stored as
/// 0xffff (equivalent in ones' complement, and required for UDP, where 0 means "none").
pub fn complete_checksum(
    pkt: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
) -> Result<(), OffloadDrop> {
    let start = csum_start as usize;
    let at = start + csum_offset as usize;
    if at.checked_add(2).is_none_or(|end| end > pkt.len()) {
        return Err(OffloadDrop::BadCsum);
    }
    let initial = be16(pkt, at) as u64;
    pkt[at] = 0;
    pkt[at + 1] = 0;
    let c = !fold(sum16(&pkt[start..], initial));
    put_be16(pkt, at, if c == 0 { 0xffff } else { c });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Segmentation (TSO / USO)

/// What [`split`] found in a super-packet's headers.
#[derive(Clone, Copy)]
struct Layout {
    v6: bool,
    /// IP header length (= `csum_start`).
    iph: usize,
    /// IP + transport header length.
    hl: usize,
    udp: bool,
}

/// The IP header length of `pkt`, required to be version `v6`'s with transport `proto` and no
/// IPv4 fragmenting or IPv6 extension headers.
fn ip_header(pkt: &[u8], v6: bool, proto: u8) -> Result<usize, OffloadDrop> {
    let ver = pkt.first().ok_or(OffloadDrop::BadIp)? >> 4;
    if v6 {
        if ver != 6 || pkt.len() < IPV6_HDR_LEN || pkt[6] != proto {
            return Err(OffloadDrop::BadIp);
        }
        Ok(IPV6_HDR_LEN)
    } else {
        let iph = (pkt[0] & 0x0f) as usize * 4;
        if ver != 4 || iph < IPV4_HDR_MIN || pkt.len() < iph || pkt[9] != proto {
            return Err(OffloadDrop::BadIp);
        }
        // More-fragments flag or a fragment offset: not a whole packet.
        if be16(pkt, 6) & 0x3fff != 0 {
            return Err(OffloadDrop::BadIp);
        }
        Ok(iph)
    }
}

fn gso_layout(hdr: &VnetHdr, pkt: &[u8]) -> Result<Layout, OffloadDrop> {
    let (v6, udp) = match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 => (false, false),
        GSO_TCPV6 => (true, false),
        GSO_UDP_L4 => (pkt.first().map(|b| b >> 4) == Some(6), true),
        _ => return Err(OffloadDrop::BadGsoType),
    };
    let iph = ip_header(pkt, v6, if udp { PROTO_UDP } else { PROTO_TCP })?;
    let want_off = if udp {
        UDP_CSUM_OFFSET
    } else {
        TCP_CSUM_OFFSET
    };
    // The kernel always asks for the transport checksum on a GSO packet, starting right after
    // the IP header.
    if hdr.flags & F_NEEDS_CSUM == 0
        || hdr.csum_start as usize != iph
        || hdr.csum_offset != want_off
    {
        return Err(OffloadDrop::BadCsum);
    }
    let hl = if udp {
        iph + UDP_HDR_LEN
    } else {
        if pkt.len() < iph + TCP_HDR_MIN {
            return Err(OffloadDrop::BadTransport);
        }
        let th = (pkt[iph + 12] >> 4) as usize * 4;
        if th < TCP_HDR_MIN {
            return Err(OffloadDrop::BadTransport);
        }
        iph + th
    };
    if pkt.len() < hl {
        return Err(OffloadDrop::BadTransport);
    }
    // hdr_len is only a hint (the kernel reports its linear head length, which may include
    // payload); the real header length comes from the headers. It must still lie inside.
    if hdr.hdr_len as usize > pkt.len() {
        return Err(OffloadDrop::BadGso);
    }
    let gso = hdr.gso_size as usize;
    if gso == 0 || pkt.len() == hl || hl + gso > MAX_IP_PACKET {
        return Err(OffloadDrop::BadGso);
    }
    Ok(Layout { v6, iph, hl, udp })
}

/// Segment one packet read from a vnet-header TUN device into MTU-sized packets.
///
/// `hdr` is the packet's parsed header and `pkt` the packet after it. Segment `i` is written to
/// `outs[i][offset..offset + lens[i]]` (the offset leaves room for, e.g., the ESP header, so
/// the segment can be encapsulated where it lies). Returns the number of segments.
///
/// - No GSO: one segment, a copy of `pkt`, with its checksum completed if `F_NEEDS_CSUM`.
/// - TCP (TSO, IPv4/IPv6): `gso_size` payload bytes per segment (the last may be shorter); each
///   gets the IP header with its total length (IPv4: ID + i, header checksum) or payload length
///   (IPv6), the TCP header with sequence number + i·gso_size, FIN and PSH only on the last
///   segment, CWR only on the first, and a full TCP checksum.
/// - UDP (USO): likewise with UDP length and checksum per segment.
///
/// Headers are validated first: nothing is written to `outs` for a refused packet, and no
/// length field in the packet or header is trusted for indexing.
pub fn split<B: AsMut<[u8]>>(
    hdr: &VnetHdr,
    pkt: &[u8],
    outs: &mut [B],
    offset: usize,
    lens: &mut [usize],
) -> Result<usize, OffloadDrop> {
    let (n, total) = split_from(hdr, pkt, 0, outs, offset, lens)?;
    if n < total {
        return Err(OffloadDrop::TooManySegments);
    }
    Ok(n)
}

/// [`split`] in parts, for callers with fewer buffers than a super-packet has segments:
/// writes segments `first..` (as many as `outs` and `lens` hold) to `outs[0..]` and returns
/// `(written, total segments)`. Segment `first + i` is the same packet `split` would make.
/// Refuses `first` beyond the last segment (`TooManySegments`) and, like `split`, writes
/// nothing for a refused packet.
pub fn split_from<B: AsMut<[u8]>>(
    hdr: &VnetHdr,
    pkt: &[u8],
    first: usize,
    outs: &mut [B],
    offset: usize,
    lens: &mut [usize],
) -> Result<(usize, usize), OffloadDrop> {
    let cap = outs.len().min(lens.len());
    if !hdr.is_gso() {
        if first != 0 {
            return Err(OffloadDrop::TooManySegments);
        }
        if cap == 0 {
            return Err(OffloadDrop::TooManySegments);
        }
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let at = hdr.csum_start as usize + hdr.csum_offset as usize;
            if at + 2 > pkt.len() {
                return Err(OffloadDrop::BadCsum);
            }
        }
        let out = outs[0].as_mut();
        if out.len() < offset.saturating_add(pkt.len()) {
            return Err(OffloadDrop::BufferTooSmall);
        }
        let seg = &mut out[offset..offset + pkt.len()];
        seg.copy_from_slice(pkt);
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(seg, hdr.csum_start, hdr.csum_offset)?;
        }
        lens[0] = pkt.len();
        return Ok((1, 1));
    }

    let l = gso_layout(hdr, pkt)?;
    let gso = hdr.gso_size as usize;
    let payload = pkt.len() - l.hl;
    let nseg = payload.div_ceil(gso);
    if first >= nseg || cap == 0 {
        return Err(OffloadDrop::TooManySegments);
    }
    let count = cap.min(nseg - first);
    for (j, out) in outs[..count].iter_mut().enumerate() {
        let i = first + j;
        let seg = gso.min(payload - i * gso);
        if out.as_mut().len() < offset.saturating_add(l.hl + seg) {
            return Err(OffloadDrop::BufferTooSmall);
        }
    }

    let iph = l.iph;
    let proto = if l.udp { PROTO_UDP } else { PROTO_TCP };
    let id0 = if l.v6 { 0 } else { be16(pkt, 4) };
    let seq0 = if l.udp { 0 } else { be32(pkt, iph + 4) };
    let flags0 = if l.udp { 0 } else { pkt[iph + 13] };
    for j in 0..count {
        let i = first + j;
        let start = l.hl + i * gso;
        let end = (start + gso).min(pkt.len());
        let total = l.hl + (end - start);
        let out = &mut outs[j].as_mut()[offset..offset + total];
        out[..l.hl].copy_from_slice(&pkt[..l.hl]);
        out[l.hl..].copy_from_slice(&pkt[start..end]);
        if l.v6 {
            put_be16(out, 4, (total - IPV6_HDR_LEN) as u16);
        } else {
            put_be16(out, 2, total as u16);
            put_be16(out, 4, id0.wrapping_add(i as u16));
            put_be16(out, 10, 0);
            let c = checksum(&out[..iph]);
            put_be16(out, 10, c);
        }
        let tlen = total - iph;
        if l.udp {
            put_be16(out, iph + 4, tlen as u16);
            put_be16(out, iph + 6, 0);
        } else {
            out[iph + 4..iph + 8]
                .copy_from_slice(&seq0.wrapping_add((i * gso) as u32).to_be_bytes());
            let mut f = flags0;
            if i + 1 != nseg {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                f &= !TCP_CWR;
            }
            out[iph + 13] = f;
            put_be16(out, iph + 16, 0);
        }
        let at = iph + if l.udp { 6 } else { 16 };
        let c = !fold(sum16(&out[iph..], pseudo_sum(out, l.v6, proto, tlen)));
        put_be16(out, at, if l.udp && c == 0 { 0xffff } else { c });
        lens[j] = total;
    }
    Ok((count, nseg))
}

// ---------------------------------------------------------------------------------------------
// Whole super-packets between two simpletun ends (the stream transport's negotiated mode)

/// Bytes in front of the IP packet of a super-packet carried whole in one ESP packet (ESP Next
/// Header [`crate::esp::NH_SUPER`]): `| gso_type u8 | flags u8 (0) | gso_size u16 BE |`.
/// `gso_type` is [`GSO_TCPV4`] or [`GSO_TCPV6`], optionally with [`GSO_ECN`].
pub const SUPER_PREFIX_LEN: usize = 4;
/// Most segments a super-packet from a peer may hold (a 64 KiB packet at the IPv4 minimum MSS
/// of 536 has 123); more is refused as [`OffloadDrop::TooManySegments`].
pub const MAX_SUPER_SEGMENTS: usize = 128;

/// A validated super-packet carried whole ([`parse_super`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Super {
    /// The header to segment it with: `F_NEEDS_CSUM`, the prefix's `gso_type`/`gso_size`,
    /// `csum_start` = the IP header length, `csum_offset` 16, `hdr_len` = IP + TCP headers.
    pub hdr: VnetHdr,
    /// Segments it stands for (payload / `gso_size`, rounded up).
    pub segments: usize,
    /// IP + TCP header length (every segment carries these bytes).
    pub hl: usize,
}

impl Super {
    /// Inner bytes its segments carry together (what the counters count as for segments).
    pub fn segment_bytes(&self, ip_len: usize) -> usize {
        ip_len + (self.segments.saturating_sub(1)) * self.hl
    }
}

/// Whether `hdr` (read from our TUN) is a TCP TSO super-packet, the kind carried whole.
pub fn is_tso(hdr: &VnetHdr) -> bool {
    matches!(hdr.gso_type & !GSO_ECN, GSO_TCPV4 | GSO_TCPV6)
}

/// Validate the TCP super-packet `pkt` under `gso_type`/`gso_size` with the rules of a header
/// read from our own TUN ([`split`]'s), plus: the IP length field equals the packet's length,
/// at most [`MAX_SUPER_SEGMENTS`] segments.
pub fn tso_layout(gso_type: u8, gso_size: u16, pkt: &[u8]) -> Result<Super, OffloadDrop> {
    if !matches!(gso_type & !GSO_ECN, GSO_TCPV4 | GSO_TCPV6) {
        return Err(OffloadDrop::BadGsoType);
    }
    let v6 = gso_type & !GSO_ECN == GSO_TCPV6;
    let iph = match (v6, pkt.first()) {
        (true, _) => IPV6_HDR_LEN,
        (false, Some(b)) => (b & 0x0f) as usize * 4,
        (false, None) => return Err(OffloadDrop::BadIp),
    };
    let mut hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: 0,
        gso_size,
        csum_start: iph as u16,
        csum_offset: TCP_CSUM_OFFSET,
    };
    let l = gso_layout(&hdr, pkt)?;
    let ip_len = if v6 {
        be16(pkt, 4) as usize + IPV6_HDR_LEN
    } else {
        be16(pkt, 2) as usize
    };
    if ip_len != pkt.len() {
        return Err(OffloadDrop::BadIp);
    }
    let segments = (pkt.len() - l.hl).div_ceil(gso_size as usize);
    if segments > MAX_SUPER_SEGMENTS {
        return Err(OffloadDrop::TooManySegments);
    }
    hdr.hdr_len = l.hl as u16;
    Ok(Super {
        hdr,
        segments,
        hl: l.hl,
    })
}

/// Write the prefix of a super-packet carried whole into `out[..SUPER_PREFIX_LEN]`.
pub fn write_super_prefix(hdr: &VnetHdr, out: &mut [u8]) {
    out[0] = hdr.gso_type;
    out[1] = 0;
    out[2..4].copy_from_slice(&hdr.gso_size.to_be_bytes());
}

/// Parse prefix + IP packet as received in an ESP packet with Next Header
/// [`crate::esp::NH_SUPER`] (from an authenticated peer that may still be buggy): never panics,
/// and refuses what [`tso_layout`] refuses.
pub fn parse_super(buf: &[u8]) -> Result<Super, OffloadDrop> {
    if buf.len() < SUPER_PREFIX_LEN {
        return Err(OffloadDrop::ShortHeader);
    }
    if buf[1] != 0 {
        return Err(OffloadDrop::BadGsoType);
    }
    tso_layout(buf[0], be16(buf, 2), &buf[SUPER_PREFIX_LEN..])
}

/// Prepare a validated super-packet ([`parse_super`]) for a TUN write in place: IPv4 header
/// checksum recomputed, TCP checksum field = the pseudo-header sum (the kernel completes it,
/// `F_NEEDS_CSUM`). Returns the vnet header to write in front: a GSO one, or for a single
/// segment a plain `F_NEEDS_CSUM` one (nothing to segment).
pub fn super_for_tun(s: &Super, pkt: &mut [u8]) -> VnetHdr {
    let iph = s.hdr.csum_start as usize;
    let v6 = s.hdr.gso_type & !GSO_ECN == GSO_TCPV6;
    if !v6 {
        put_be16(pkt, 10, 0);
        let c = checksum(&pkt[..iph]);
        put_be16(pkt, 10, c);
    }
    let ps = fold(pseudo_sum(pkt, v6, PROTO_TCP, pkt.len() - iph));
    put_be16(pkt, iph + TCP_CSUM_OFFSET as usize, ps);
    if s.segments > 1 {
        s.hdr
    } else {
        VnetHdr {
            gso_type: GSO_NONE,
            gso_size: 0,
            hdr_len: 0,
            ..s.hdr
        }
    }
}

/// Cut a TCP super-packet read from our TUN (`hdr`, `pkt`) at segment boundaries into smaller
/// super-packets of `per` segments each (the last may have fewer), for a carrier whose packets
/// cannot hold it whole. Like [`split_from`]: pieces `first..` go to `outs[j][offset..offset +
/// lens[j]]`, returns `(written, total pieces)`, nothing is written for a refused packet. Each
/// piece gets its IP length (IPv4: ID + first segment index, header checksum), sequence number,
/// FIN/PSH only on the last piece, CWR only on the first, and the pseudo-header sum in the TCP
/// checksum field; its `gso_size` stays `hdr.gso_size`.
pub fn cut_from<B: AsMut<[u8]>>(
    hdr: &VnetHdr,
    pkt: &[u8],
    first: usize,
    per: usize,
    outs: &mut [B],
    offset: usize,
    lens: &mut [usize],
) -> Result<(usize, usize), OffloadDrop> {
    if !is_tso(hdr) {
        return Err(OffloadDrop::BadGsoType);
    }
    let l = gso_layout(hdr, pkt)?;
    let cap = outs.len().min(lens.len());
    let piece = per.max(1).saturating_mul(hdr.gso_size as usize);
    let payload = pkt.len() - l.hl;
    let total = payload.div_ceil(piece);
    if first >= total || cap == 0 {
        return Err(OffloadDrop::TooManySegments);
    }
    let count = cap.min(total - first);
    for (j, out) in outs[..count].iter_mut().enumerate() {
        let seg = piece.min(payload - (first + j) * piece);
        if out.as_mut().len() < offset.saturating_add(l.hl + seg) {
            return Err(OffloadDrop::BufferTooSmall);
        }
    }
    let iph = l.iph;
    let id0 = if l.v6 { 0 } else { be16(pkt, 4) };
    let seq0 = be32(pkt, iph + 4);
    let flags0 = pkt[iph + 13];
    for j in 0..count {
        let i = first + j;
        let start = l.hl + i * piece;
        let end = (start + piece).min(pkt.len());
        let len = l.hl + (end - start);
        let out = &mut outs[j].as_mut()[offset..offset + len];
        out[..l.hl].copy_from_slice(&pkt[..l.hl]);
        out[l.hl..].copy_from_slice(&pkt[start..end]);
        if l.v6 {
            put_be16(out, 4, (len - IPV6_HDR_LEN) as u16);
        } else {
            put_be16(out, 2, len as u16);
            put_be16(out, 4, id0.wrapping_add((i * per.max(1)) as u16));
            put_be16(out, 10, 0);
            let c = checksum(&out[..iph]);
            put_be16(out, 10, c);
        }
        out[iph + 4..iph + 8].copy_from_slice(&seq0.wrapping_add((i * piece) as u32).to_be_bytes());
        let mut f = flags0;
        if i + 1 != total {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            f &= !TCP_CWR;
        }
        out[iph + 13] = f;
        let ps = fold(pseudo_sum(out, l.v6, PROTO_TCP, len - iph));
        put_be16(out, iph + TCP_CSUM_OFFSET as usize, ps);
        lens[j] = len;
    }
    Ok((count, total))
}

// ---------------------------------------------------------------------------------------------
// GRO: coalescing received TCP segments for the TUN write side

/// Addresses and ports of a TCP packet (the direction matters).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    v6: bool,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// Parsed TCP segment (lengths verified against the buffer).
#[derive(Clone, Copy)]
struct Seg {
    key: FlowKey,
    iph: usize,
    th: usize,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: usize,
}

/// The flow key of a TCP packet whatever else is in it, if its addresses and ports can be read
/// (used to keep the order of a flow when one of its packets cannot be coalesced).
fn tcp_key(pkt: &[u8]) -> Option<(FlowKey, usize)> {
    let mut k = FlowKey {
        v6: false,
        addrs: [0; 32],
        ports: [0; 4],
    };
    let iph = match pkt.first()? >> 4 {
        4 => {
            let iph = (pkt[0] & 0x0f) as usize * 4;
            if pkt.len() < iph + 4 || iph < IPV4_HDR_MIN || pkt[9] != PROTO_TCP {
                return None;
            }
            k.addrs[..8].copy_from_slice(&pkt[12..20]);
            iph
        }
        6 => {
            if pkt.len() < IPV6_HDR_LEN + 4 || pkt[6] != PROTO_TCP {
                return None;
            }
            k.v6 = true;
            k.addrs.copy_from_slice(&pkt[8..40]);
            IPV6_HDR_LEN
        }
        _ => return None,
    };
    k.ports.copy_from_slice(&pkt[iph..iph + 4]);
    Some((k, iph))
}

/// Whether `pkt` is a TCP segment GRO may merge: IPv4 without options and not fragmented, or
/// IPv6 without extension headers; lengths exactly matching the buffer; ACK set with only PSH
/// besides; a non-empty payload; valid IPv4 header and TCP checksums (a merged packet gets a
/// fresh checksum, so a corrupt segment must not be hidden inside one).
fn gro_candidate(pkt: &[u8]) -> Result<Seg, Option<FlowKey>> {
    let (key, iph) = tcp_key(pkt).ok_or(None)?;
    let no = Err(Some(key));
    if pkt.len() > MAX_IP_PACKET || pkt.len() < iph + TCP_HDR_MIN {
        return no;
    }
    if key.v6 {
        if be16(pkt, 4) as usize != pkt.len() - IPV6_HDR_LEN {
            return no;
        }
    } else if iph != IPV4_HDR_MIN
        || be16(pkt, 2) as usize != pkt.len()
        || be16(pkt, 6) & 0x3fff != 0
        || fold(sum16(&pkt[..iph], 0)) != 0xffff
    {
        return no;
    }
    let th = (pkt[iph + 12] >> 4) as usize * 4;
    if th < TCP_HDR_MIN || pkt.len() < iph + th {
        return no;
    }
    let flags = pkt[iph + 13];
    if flags & !TCP_PSH != TCP_ACK {
        return no;
    }
    let payload = pkt.len() - iph - th;
    if payload == 0 {
        return no;
    }
    let tlen = pkt.len() - iph;
    if fold(sum16(&pkt[iph..], pseudo_sum(pkt, key.v6, PROTO_TCP, tlen))) != 0xffff {
        return no;
    }
    Ok(Seg {
        key,
        iph,
        th,
        seq: be32(pkt, iph + 4),
        ack: be32(pkt, iph + 8),
        flags,
        payload,
    })
}

/// One packet to write to the TUN device, from [`Gro::coalesce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroOut {
    /// Write input packet `index` as it is, after a [`VNET_HDR_NONE`] header.
    Pass(usize),
    /// Write [`Gro::merged`]`(slot)` (vnet header included): `segments` input packets merged.
    Merged { slot: usize, segments: usize },
}

#[derive(Clone, Copy)]
struct Item {
    /// Input index of the first segment.
    head: usize,
    /// The slot holding the merged packet, once a second segment joined.
    slot: Option<usize>,
    open: bool,
    key: FlowKey,
    iph: usize,
    th: usize,
    ack: u32,
    next_seq: u32,
    gso: usize,
    /// Length of the (merged) IP packet so far.
    len: usize,
    segments: usize,
    psh: bool,
}

/// GRO for the TUN write side: merges consecutive in-order TCP segments of one flow in a batch
/// into super-packets (as the kernel's GRO and wireguard-go do), so one TUN write moves up to
/// 64 KiB. Everything that is not a plain in-order data segment passes through unchanged, and
/// the order of packets within a flow is kept.
///
/// Segments merge when they have the same addresses, ports, ACK number, window, TCP options,
/// TCP header length, IPv4 TOS/TTL/DF (IPv6 traffic class/flow label/hop limit), contiguous
/// sequence numbers, flags ACK (PSH allowed on the last), and a payload no larger than the first
/// one's (a shorter one ends the super-packet), up to [`MAX_IP_PACKET`] bytes. The merged
/// packet's header asks the kernel to complete the checksum (`F_NEEDS_CSUM`, the TCP checksum
/// field holding the pseudo-header sum) and to resegment at the first segment's payload size.
pub struct Gro {
    hdr_sz: usize,
    slots: Vec<Vec<u8>>,
    used: usize,
    items: Vec<Item>,
    /// Indices into `items` of those still accepting segments.
    open: Vec<usize>,
    order: Vec<Pending>,
    out: Vec<GroOut>,
    /// Length of the IP packet in each slot.
    slot_len: Vec<usize>,
    /// Input index of the first segment merged into each slot.
    slot_head: Vec<usize>,
}

#[derive(Clone, Copy)]
enum Pending {
    Pass(usize),
    Item(usize),
}

impl Gro {
    /// A coalescer writing vnet headers of `hdr_sz` bytes (10 or 12), with `slots` buffers of
    /// 64 KiB for merged packets (allocated here, once): at most that many super-packets per
    /// batch; further segments pass through.
    pub fn new(hdr_sz: usize, slots: usize) -> Gro {
        assert!(
            hdr_sz >= VNET_HDR_LEN,
            "vnet header size must be at least 10"
        );
        Gro {
            hdr_sz,
            slots: (0..slots)
                .map(|_| vec![0u8; hdr_sz + MAX_IP_PACKET])
                .collect(),
            used: 0,
            items: Vec::with_capacity(64),
            open: Vec::with_capacity(64),
            order: Vec::with_capacity(64),
            out: Vec::with_capacity(64),
            slot_len: vec![0; slots],
            slot_head: vec![0; slots],
        }
    }

    /// The merged packet in `slot`, vnet header first (valid until the next `coalesce`).
    pub fn merged(&self, slot: usize) -> &[u8] {
        &self.slots[slot][..self.hdr_sz + self.slot_len[slot]]
    }

    /// The input index of the first segment merged into `slot` (valid until the next
    /// `coalesce`): the merged packet's segments are that input and later ones of its flow.
    pub fn head(&self, slot: usize) -> usize {
        self.slot_head[slot]
    }

    fn close(&mut self, key: &FlowKey) {
        let items = &mut self.items;
        self.open.retain(|&i| {
            if items[i].key == *key {
                items[i].open = false;
                false
            } else {
                true
            }
        });
    }

    /// Coalesce one batch of IP packets (as decapsulated, in arrival order). Returns what to
    /// write, in order.
    pub fn coalesce<P: AsRef<[u8]>>(&mut self, pkts: &[P]) -> &[GroOut] {
        self.items.clear();
        self.open.clear();
        self.order.clear();
        self.out.clear();
        self.used = 0;
        for (idx, p) in pkts.iter().enumerate() {
            let pkt = p.as_ref();
            let seg = match gro_candidate(pkt) {
                Ok(s) => s,
                Err(key) => {
                    if let Some(k) = key {
                        self.close(&k);
                    }
                    self.order.push(Pending::Pass(idx));
                    continue;
                }
            };
            let open = self.open.iter().position(|&i| self.items[i].key == seg.key);
            if let Some(pos) = open {
                let ii = self.open[pos];
                if self.try_append(ii, pkts, pkt, &seg) {
                    if !self.items[ii].open {
                        self.open.swap_remove(pos);
                    }
                    continue;
                }
                self.items[ii].open = false;
                self.open.swap_remove(pos);
            }
            let psh = seg.flags & TCP_PSH != 0;
            self.items.push(Item {
                head: idx,
                slot: None,
                open: !psh,
                key: seg.key,
                iph: seg.iph,
                th: seg.th,
                ack: seg.ack,
                next_seq: seg.seq.wrapping_add(seg.payload as u32),
                gso: seg.payload,
                len: pkt.len(),
                segments: 1,
                psh,
            });
            let ii = self.items.len() - 1;
            if !psh {
                self.open.push(ii);
            }
            self.order.push(Pending::Item(ii));
        }
        for o in 0..self.order.len() {
            let out = match self.order[o] {
                Pending::Pass(idx) => GroOut::Pass(idx),
                Pending::Item(ii) => {
                    let it = self.items[ii];
                    match it.slot {
                        None => GroOut::Pass(it.head),
                        Some(slot) => {
                            self.finish(&it, slot);
                            GroOut::Merged {
                                slot,
                                segments: it.segments,
                            }
                        }
                    }
                }
            };
            self.out.push(out);
        }
        &self.out
    }

    fn try_append<P: AsRef<[u8]>>(&mut self, ii: usize, pkts: &[P], pkt: &[u8], s: &Seg) -> bool {
        let it = self.items[ii];
        if it.ack != s.ack
            || it.next_seq != s.seq
            || it.th != s.th
            || s.payload > it.gso
            || it.len + s.payload > MAX_IP_PACKET
        {
            return false;
        }
        let hz = self.hdr_sz;
        let head: &[u8] = match it.slot {
            Some(slot) => &self.slots[slot][hz..hz + it.len],
            None => pkts[it.head].as_ref(),
        };
        let (iph, th) = (it.iph, it.th);
        let same_ip = if s.key.v6 {
            head[..4] == pkt[..4] && head[7] == pkt[7]
        } else {
            head[1] == pkt[1] && (head[6] & 0x40) == (pkt[6] & 0x40) && head[8] == pkt[8]
        };
        // Window, options; flags equal but for PSH (the head has ACK only, else it is closed).
        if !same_ip
            || head[iph + 14..iph + 16] != pkt[iph + 14..iph + 16]
            || head[iph + 20..iph + th] != pkt[iph + 20..iph + th]
            || head[iph + 13] != s.flags & !TCP_PSH
        {
            return false;
        }
        let slot = match it.slot {
            Some(slot) => slot,
            None => {
                if self.used == self.slots.len() {
                    return false;
                }
                let slot = self.used;
                self.used += 1;
                let src = pkts[it.head].as_ref();
                self.slots[slot][hz..hz + src.len()].copy_from_slice(src);
                slot
            }
        };
        let data = &pkt[iph + th..];
        self.slots[slot][hz + it.len..hz + it.len + data.len()].copy_from_slice(data);
        let it = &mut self.items[ii];
        it.slot = Some(slot);
        it.len += data.len();
        it.next_seq = it.next_seq.wrapping_add(data.len() as u32);
        it.segments += 1;
        if s.flags & TCP_PSH != 0 {
            it.psh = true;
            it.open = false;
        }
        if s.payload < it.gso {
            it.open = false;
        }
        true
    }

    fn finish(&mut self, it: &Item, slot: usize) {
        let hz = self.hdr_sz;
        let buf = &mut self.slots[slot];
        let v6 = it.key.v6;
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (it.iph + it.th) as u16,
            gso_size: it.gso as u16,
            csum_start: it.iph as u16,
            csum_offset: TCP_CSUM_OFFSET,
        }
        .write(&mut buf[..hz], hz);
        let pkt = &mut buf[hz..hz + it.len];
        if v6 {
            put_be16(pkt, 4, (it.len - IPV6_HDR_LEN) as u16);
        } else {
            put_be16(pkt, 2, it.len as u16);
            put_be16(pkt, 10, 0);
            let c = checksum(&pkt[..it.iph]);
            put_be16(pkt, 10, c);
        }
        if it.psh {
            pkt[it.iph + 13] |= TCP_PSH;
        }
        self.slot_len[slot] = it.len;
        self.slot_head[slot] = it.head;
        let tlen = it.len - it.iph;
        let ps = fold(pseudo_sum(pkt, v6, PROTO_TCP, tlen));
        put_be16(pkt, it.iph + 16, ps);
    }
}

#[cfg(test)]
mod tests;
