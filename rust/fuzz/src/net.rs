//! Reference IP/TCP/UDP helpers for the offload targets, written independently of
//! `simpletun_core::offload`: a byte-at-a-time RFC 1071 checksum, packet builders and readers.

/// RFC 1071 the slow way over the concatenation of `parts`: 16-bit words, carry folded after
/// every addition, an odd last byte padded with zero.
pub fn slow_csum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut hi: Option<u8> = None;
    for &b in parts.iter().flat_map(|p| p.iter()) {
        match hi.take() {
            None => hi = Some(b),
            Some(h) => {
                sum += ((h as u32) << 8) | b as u32;
                sum = (sum & 0xffff) + (sum >> 16);
            }
        }
    }
    if let Some(h) = hi {
        sum += (h as u32) << 8;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// IP version, IP header length and transport protocol, if the header is there.
pub fn ip_info(pkt: &[u8]) -> Option<(bool, usize, u8)> {
    match pkt.first()? >> 4 {
        4 => {
            let ihl = (pkt[0] & 15) as usize * 4;
            (ihl >= 20 && pkt.len() >= ihl).then(|| (false, ihl, pkt[9]))
        }
        6 => (pkt.len() >= 40).then(|| (true, 40, pkt[6])),
        _ => None,
    }
}

/// The pseudo-header bytes for `pkt` with transport length `len`.
pub fn pseudo(pkt: &[u8], v6: bool, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    if v6 {
        p.extend_from_slice(&pkt[8..40]);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        p.extend_from_slice(&pkt[12..20]);
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    }
    p
}

/// Whether the IPv4 header checksum (if IPv4), the IP length field and the transport checksum
/// of `pkt` are all right.
pub fn packet_ok(pkt: &[u8]) -> bool {
    let Some((v6, iph, proto)) = ip_info(pkt) else {
        return false;
    };
    let len_ok = if v6 {
        u16::from_be_bytes([pkt[4], pkt[5]]) as usize == pkt.len() - 40
    } else {
        u16::from_be_bytes([pkt[2], pkt[3]]) as usize == pkt.len() && slow_csum(&[&pkt[..iph]]) == 0
    };
    let t = &pkt[iph..];
    len_ok && slow_csum(&[&pseudo(pkt, v6, proto, t.len()), t]) == 0
}

/// Addresses and ports of a well-formed-looking TCP packet (IPv4 with a full TCP header, or
/// IPv6 with TCP as next header), as one key.
pub fn tcp_flow(pkt: &[u8]) -> Option<Vec<u8>> {
    let (v6, iph, proto) = ip_info(pkt)?;
    if proto != TCP || pkt.len() < iph + 20 {
        return None;
    }
    let mut k = if v6 {
        pkt[8..40].to_vec()
    } else {
        pkt[12..20].to_vec()
    };
    k.extend_from_slice(&pkt[iph..iph + 4]);
    Some(k)
}

/// The TCP payload of a packet `tcp_flow` accepts (empty if the data offset is impossible).
pub fn tcp_payload(pkt: &[u8]) -> &[u8] {
    let Some((_, iph, _)) = ip_info(pkt) else {
        return &[];
    };
    let th = (pkt[iph + 12] >> 4) as usize * 4;
    pkt.get(iph + th..).filter(|_| th >= 20).unwrap_or(&[])
}

/// A TCP segment with valid checksums.
#[allow(clippy::too_many_arguments)]
pub fn tcp_packet(
    v6: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let th = 20 + options.len();
    let mut t = vec![0u8; th];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&443u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((th / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&window.to_be_bytes());
    t[20..].copy_from_slice(options);
    t.extend_from_slice(payload);
    finish(v6, TCP, t, 16)
}

/// A UDP datagram with a valid checksum.
pub fn udp_packet(v6: bool, sport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    finish(v6, UDP, u, 6)
}

fn finish(v6: bool, proto: u8, mut t: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let mut p = if v6 {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(t.len() as u16).to_be_bytes());
        h[6] = proto;
        h[7] = 64;
        h[23] = 1;
        h[39] = 2;
        h
    } else {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
        h[4] = 0x77;
        h[6] = 0x40;
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&[192, 0, 2, 1]);
        h[16..20].copy_from_slice(&[192, 0, 2, 2]);
        let c = slow_csum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    };
    let c = slow_csum(&[&pseudo(&p, v6, proto, t.len()), &t]);
    let c = if proto == UDP && c == 0 { 0xffff } else { c };
    t[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&t);
    p
}
