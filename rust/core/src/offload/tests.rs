//! Tests of the offload module over hand-built packets. Every checksum is checked with
//! `slow_csum`, a separate byte-at-a-time RFC 1071 routine, never with the module's own.

use super::*;

/// RFC 1071 the slow way: 16-bit words, carry folded after every addition.
fn slow_csum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let hi = bytes[i] as u32;
        let lo = if i + 1 < bytes.len() {
            bytes[i + 1] as u32
        } else {
            0
        };
        sum += (hi << 8) | lo;
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    !(sum as u16)
}

/// The pseudo-header, as bytes.
fn pseudo(pkt: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    if pkt[0] >> 4 == 6 {
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

fn iph_len(pkt: &[u8]) -> usize {
    if pkt[0] >> 4 == 6 {
        40
    } else {
        (pkt[0] & 15) as usize * 4
    }
}

/// Whether the transport checksum (and IPv4 header checksum) of `pkt` verify.
fn checksums_ok(pkt: &[u8]) -> bool {
    let iph = iph_len(pkt);
    let proto = if pkt[0] >> 4 == 6 { pkt[6] } else { pkt[9] };
    let ip_ok = pkt[0] >> 4 == 6 || slow_csum(&[&pkt[..iph]]) == 0;
    let t = &pkt[iph..];
    ip_ok && slow_csum(&[&pseudo(pkt, proto, t.len()), t]) == 0
}

#[derive(Clone)]
struct Tcp {
    v6: bool,
    id: u16,
    tos: u8,
    ttl: u8,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
}

impl Tcp {
    fn new(v6: bool) -> Tcp {
        Tcp {
            v6,
            id: 0x1234,
            tos: 0,
            ttl: 64,
            sport: 40000,
            dport: 5201,
            seq: 0xfffff000,
            ack: 77,
            flags: TCP_ACK,
            window: 502,
            options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], // NOP NOP timestamps
        }
    }

    /// A complete packet with valid checksums (computed with `slow_csum`).
    fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let th = 20 + self.options.len();
        let mut t = vec![0u8; th];
        t[0..2].copy_from_slice(&self.sport.to_be_bytes());
        t[2..4].copy_from_slice(&self.dport.to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = ((th / 4) as u8) << 4;
        t[13] = self.flags;
        t[14..16].copy_from_slice(&self.window.to_be_bytes());
        t[20..].copy_from_slice(&self.options);
        t.extend_from_slice(payload);
        let mut p = ip_header(self.v6, self.id, self.tos, self.ttl, PROTO_TCP, t.len());
        let c = slow_csum(&[&pseudo(&p, PROTO_TCP, t.len()), &t]);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&t);
        p
    }
}

fn ip_header(v6: bool, id: u16, tos: u8, ttl: u8, proto: u8, tlen: usize) -> Vec<u8> {
    if v6 {
        let mut h = vec![0u8; 40];
        h[0] = 0x60 | (tos >> 4);
        h[1] = tos << 4 | 0x0a;
        h[2] = 0xbc;
        h[3] = 0xde;
        h[4..6].copy_from_slice(&(tlen as u16).to_be_bytes());
        h[6] = proto;
        h[7] = ttl;
        h[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        h[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        h
    } else {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[1] = tos;
        h[2..4].copy_from_slice(&((20 + tlen) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6] = 0x40; // DF
        h[8] = ttl;
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let c = slow_csum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }
}

fn udp_packet(v6: bool, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&4500u16.to_be_bytes());
    u[2..4].copy_from_slice(&4501u16.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    let mut p = ip_header(v6, id, 0, 64, PROTO_UDP, u.len());
    let c = slow_csum(&[&pseudo(&p, PROTO_UDP, u.len()), &u]);
    u[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    p.extend_from_slice(&u);
    p
}

/// Turn a complete packet into what the kernel hands over for TSO/USO: the transport checksum
/// field holds the (folded, uncomplemented) pseudo-header sum over the whole length.
fn as_gso(mut pkt: Vec<u8>, gso_size: u16, ecn: bool) -> (VnetHdr, Vec<u8>) {
    let iph = iph_len(&pkt);
    let v6 = pkt[0] >> 4 == 6;
    let proto = if v6 { pkt[6] } else { pkt[9] };
    let (gso_type, off, hl) = match proto {
        PROTO_TCP => (
            if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            16u16,
            iph + (pkt[iph + 12] >> 4) as usize * 4,
        ),
        _ => (GSO_UDP_L4, 6u16, iph + 8),
    };
    let ps = !slow_csum(&[&pseudo(&pkt, proto, pkt.len() - iph)]);
    pkt[iph + off as usize..iph + off as usize + 2].copy_from_slice(&ps.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: gso_type | if ecn { GSO_ECN } else { 0 },
        hdr_len: hl as u16,
        gso_size,
        csum_start: iph as u16,
        csum_offset: off,
    };
    (hdr, pkt)
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn do_split(hdr: &VnetHdr, pkt: &[u8], n: usize) -> Result<Vec<Vec<u8>>, OffloadDrop> {
    let mut outs = vec![vec![0u8; 70000]; n];
    let mut lens = vec![0usize; n];
    let k = split(hdr, pkt, &mut outs, 24, &mut lens)?;
    Ok((0..k).map(|i| outs[i][24..24 + lens[i]].to_vec()).collect())
}

#[test]
fn checksum_matches_slow_routine_and_rfc1071_example() {
    // RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    let ex = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(sum16(&ex, 0)), 0xddf2);
    assert_eq!(checksum(&ex), !0xddf2);
    for n in 0..200 {
        let d = payload(n, n as u8 ^ 0xa5);
        assert_eq!(checksum(&d), slow_csum(&[&d]), "length {n}");
    }
    let d = vec![0xffu8; 65535];
    assert_eq!(checksum(&d), slow_csum(&[&d]));
}

#[test]
fn vnet_header_roundtrip_and_refusals() {
    let h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV6 | GSO_ECN,
        hdr_len: 0x1234,
        gso_size: 1380,
        csum_start: 40,
        csum_offset: 16,
    };
    let mut b = [0xeeu8; 12];
    h.write(&mut b, 12);
    assert_eq!(
        b,
        [1, 0x84, 0x34, 0x12, 0x64, 0x05, 40, 0, 16, 0, 0, 0],
        "little-endian fields, num_buffers zeroed"
    );
    assert_eq!(VnetHdr::parse(&b, 12), Ok(h));
    assert_eq!(VnetHdr::parse(&b, 10), Ok(h));
    assert!(h.is_gso());
    assert_eq!(VnetHdr::parse(&b[..9], 10), Err(OffloadDrop::ShortHeader));
    assert_eq!(VnetHdr::parse(&b[..11], 12), Err(OffloadDrop::ShortHeader));
    assert_eq!(VnetHdr::parse(&b, 8), Err(OffloadDrop::ShortHeader));
    for (flags, gso) in [(8, 0), (0, GSO_UDP), (0, 2), (0, 6), (0, GSO_ECN)] {
        let mut c = b;
        c[0] = flags;
        c[1] = gso;
        assert_eq!(
            VnetHdr::parse(&c, 10),
            Err(OffloadDrop::BadGsoType),
            "{flags} {gso}"
        );
    }
    assert_eq!(VnetHdr::parse(&VNET_HDR_NONE, 10), Ok(VnetHdr::default()));
}

#[test]
fn partial_checksum_completion() {
    for v6 in [false, true] {
        // TCP and UDP packets as the kernel hands them over with CHECKSUM_PARTIAL.
        let tcp = Tcp::new(v6).packet(&payload(999, 3));
        for want in [tcp, udp_packet(v6, 9, &payload(333, 4))] {
            let (mut hdr, partial) = as_gso(want.clone(), 0, false);
            hdr.gso_type = GSO_NONE;
            hdr.gso_size = 0;
            assert_ne!(partial, want);
            let segs = do_split(&hdr, &partial, 1).unwrap();
            assert_eq!(segs, vec![want.clone()]);
            let mut inplace = partial.clone();
            complete_checksum(&mut inplace, hdr.csum_start, hdr.csum_offset).unwrap();
            assert_eq!(inplace, want);
        }
    }
    // Without NEEDS_CSUM the packet is copied untouched, whatever it holds.
    let junk = payload(77, 1);
    assert_eq!(do_split(&VnetHdr::default(), &junk, 1).unwrap(), vec![junk]);
    // The checksum field must lie inside the packet.
    let mut p = vec![0u8; 30];
    assert_eq!(complete_checksum(&mut p, 20, 9), Err(OffloadDrop::BadCsum));
    assert_eq!(complete_checksum(&mut p, 28, 0), Ok(()));
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 29,
        ..VnetHdr::default()
    };
    assert_eq!(do_split(&hdr, &p, 1), Err(OffloadDrop::BadCsum));
}

#[test]
fn tso_split_ipv4_and_ipv6() {
    for v6 in [false, true] {
        let mut t = Tcp::new(v6);
        t.flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR;
        let data = payload(5000, 7);
        let (hdr, sp) = as_gso(t.packet(&data), 1448, true);
        let segs = do_split(&hdr, &sp, 8).unwrap();
        assert_eq!(segs.len(), 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let n = if i == 3 { 5000 - 3 * 1448 } else { 1448 };
            let mut want = t.clone();
            want.seq = t.seq.wrapping_add((i * 1448) as u32);
            want.id = t.id.wrapping_add(i as u16);
            want.flags = TCP_ACK;
            if i == 0 {
                want.flags |= TCP_CWR;
            }
            if i == 3 {
                want.flags |= TCP_PSH | TCP_FIN;
            }
            let expect = want.packet(&data[i * 1448..i * 1448 + n]);
            assert_eq!(s, &expect, "v6 {v6} segment {i}");
            assert!(checksums_ok(s));
            joined.extend_from_slice(&s[s.len() - n..]);
        }
        assert_eq!(joined, data);
    }
}

/// Splitting in parts of 3 buffers gives the same segments as one `split`, for TCP and UDP;
/// a start past the last segment is refused.
#[test]
fn split_from_in_parts_equals_split() {
    for v6 in [false, true] {
        let mut t = Tcp::new(v6);
        t.flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR;
        let tcp = as_gso(t.packet(&payload(10000, 3)), 1000, true);
        let udp = as_gso(udp_packet(v6, 9, &payload(7001, 5)), 700, false);
        for (hdr, sp) in [tcp, udp] {
            let whole = do_split(&hdr, &sp, 16).unwrap();
            let mut parts = Vec::new();
            let mut outs = vec![vec![0u8; 3000]; 3];
            let mut lens = [0usize; 3];
            loop {
                let (n, total) =
                    split_from(&hdr, &sp, parts.len(), &mut outs, 24, &mut lens).unwrap();
                assert_eq!(total, whole.len());
                parts.extend((0..n).map(|i| outs[i][24..24 + lens[i]].to_vec()));
                if parts.len() == total {
                    break;
                }
            }
            assert_eq!(parts, whole);
            assert_eq!(
                split_from(&hdr, &sp, whole.len(), &mut outs, 24, &mut lens),
                Err(OffloadDrop::TooManySegments)
            );
        }
    }
}

#[test]
fn uso_split_ipv4_and_ipv6() {
    for v6 in [false, true] {
        let data = payload(3000, 9);
        let (hdr, sp) = as_gso(udp_packet(v6, 500, &data), 1200, false);
        let segs = do_split(&hdr, &sp, 3).unwrap();
        assert_eq!(segs.len(), 3);
        for (i, s) in segs.iter().enumerate() {
            let chunk = &data[i * 1200..(i * 1200 + 1200).min(3000)];
            assert_eq!(s, &udp_packet(v6, 500 + i as u16, chunk), "v6 {v6} seg {i}");
            assert!(checksums_ok(s));
        }
    }
}

#[test]
fn lying_headers_are_refused() {
    let data = payload(3000, 1);
    let (good, sp4) = as_gso(Tcp::new(false).packet(&data), 1400, false);
    let (good6, sp6) = as_gso(Tcp::new(true).packet(&data), 1400, false);
    assert!(do_split(&good, &sp4, 3).is_ok());
    assert!(do_split(&good6, &sp6, 3).is_ok());
    let cases: Vec<(VnetHdr, Vec<u8>, OffloadDrop)> = vec![
        (
            VnetHdr {
                gso_size: 0,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadGso,
        ),
        (
            VnetHdr {
                gso_size: 65535,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadGso,
        ),
        (
            VnetHdr {
                hdr_len: 3053,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadGso,
        ),
        (
            VnetHdr {
                csum_start: 24,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadCsum,
        ),
        (
            VnetHdr {
                csum_offset: 6,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadCsum,
        ),
        (
            VnetHdr { flags: 0, ..good },
            sp4.clone(),
            OffloadDrop::BadCsum,
        ),
        (
            VnetHdr {
                gso_type: GSO_TCPV6,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadIp,
        ),
        (
            VnetHdr {
                gso_type: GSO_TCPV4,
                ..good6
            },
            sp6.clone(),
            OffloadDrop::BadIp,
        ),
        (
            VnetHdr {
                gso_type: GSO_UDP_L4,
                ..good
            },
            sp4.clone(),
            OffloadDrop::BadIp,
        ),
        (good, sp4[..20].to_vec(), OffloadDrop::BadTransport),
        (good, sp4[..39].to_vec(), OffloadDrop::BadTransport),
        (good, sp4[..52].to_vec(), OffloadDrop::BadGso),
        (good, sp4[..10].to_vec(), OffloadDrop::BadIp),
        (good, vec![], OffloadDrop::BadIp),
        (good6, sp6[..39].to_vec(), OffloadDrop::BadIp),
        (
            good,
            {
                let mut p = sp4.clone();
                p[32] = 0x40; // data offset 4 words
                p
            },
            OffloadDrop::BadTransport,
        ),
        (
            good,
            {
                let mut p = sp4.clone();
                p[0] = 0x4f; // IHL 60 bytes: the TCP header no longer fits where it says
                p[9] = PROTO_TCP;
                p
            },
            OffloadDrop::BadCsum,
        ),
        (
            good,
            {
                let mut p = sp4.clone();
                p[0] = 0x44; // IHL 16 bytes
                p
            },
            OffloadDrop::BadIp,
        ),
        (
            good,
            {
                let mut p = sp4.clone();
                p[6] |= 0x20; // more fragments
                p
            },
            OffloadDrop::BadIp,
        ),
        (
            good6,
            {
                let mut p = sp6.clone();
                p[6] = 0; // hop-by-hop extension header
                p
            },
            OffloadDrop::BadIp,
        ),
    ];
    for (i, (h, p, want)) in cases.iter().enumerate() {
        assert_eq!(do_split(h, p, 8), Err(*want), "case {i}");
    }
    // Capacity: buffers and their count.
    assert_eq!(do_split(&good, &sp4, 2), Err(OffloadDrop::TooManySegments));
    let mut outs = vec![vec![0u8; 24 + 1451]; 3];
    let mut lens = [0usize; 3];
    assert_eq!(
        split(&good, &sp4, &mut outs, 24, &mut lens),
        Err(OffloadDrop::BufferTooSmall)
    );
    outs[0].push(0);
    outs[1].push(0);
    assert_eq!(split(&good, &sp4, &mut outs, 24, &mut lens), Ok(3));
    assert_eq!(lens, [1452, 1452, 252]);
}

/// The merged packet, checked as the kernel will use it, and resplit for comparison.
fn check_merged(gro: &Gro, slot: usize, hdr_sz: usize) -> (VnetHdr, Vec<u8>) {
    let m = gro.merged(slot);
    let hdr = VnetHdr::parse(m, hdr_sz).unwrap();
    let pkt = m[hdr_sz..].to_vec();
    let v6 = pkt[0] >> 4 == 6;
    let iph = iph_len(&pkt);
    assert_eq!(hdr.flags, F_NEEDS_CSUM);
    assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
    assert_eq!(hdr.csum_start as usize, iph);
    assert_eq!(hdr.csum_offset, 16);
    assert_eq!(
        hdr.hdr_len as usize,
        iph + (pkt[iph + 12] >> 4) as usize * 4
    );
    if v6 {
        assert_eq!(
            u16::from_be_bytes([pkt[4], pkt[5]]) as usize,
            pkt.len() - 40
        );
    } else {
        assert_eq!(u16::from_be_bytes([pkt[2], pkt[3]]) as usize, pkt.len());
        assert_eq!(slow_csum(&[&pkt[..iph]]), 0, "IPv4 header checksum");
    }
    let ps = !slow_csum(&[&pseudo(&pkt, PROTO_TCP, pkt.len() - iph)]);
    assert_eq!(
        &pkt[iph + 16..iph + 18],
        &ps.to_be_bytes(),
        "pseudo-header sum"
    );
    (hdr, pkt)
}

#[test]
fn gro_merges_what_tso_split() {
    for v6 in [false, true] {
        for hdr_sz in [VNET_HDR_LEN, VNET_HDR_LEN_MRG] {
            let mut t = Tcp::new(v6);
            t.flags = TCP_ACK | TCP_PSH;
            let data = payload(10000, 5);
            let orig = t.packet(&data);
            let (hdr, sp) = as_gso(orig.clone(), 1400, false);
            let segs = do_split(&hdr, &sp, 8).unwrap();
            let mut gro = Gro::new(hdr_sz, 4);
            let out = gro.coalesce(&segs).to_vec();
            assert_eq!(
                out,
                vec![GroOut::Merged {
                    slot: 0,
                    segments: 8
                }]
            );
            let (h2, merged) = check_merged(&gro, 0, hdr_sz);
            assert_eq!(h2.gso_size, 1400);
            // With its checksum completed it is exactly the original super-packet.
            let mut full = merged.clone();
            complete_checksum(&mut full, h2.csum_start, h2.csum_offset).unwrap();
            assert_eq!(full, orig);
            // And it splits back into the same segments.
            assert_eq!(do_split(&h2, &merged, 8).unwrap(), segs);
        }
    }
}

#[test]
fn gro_keeps_flows_apart_and_in_order() {
    let a = Tcp::new(false);
    let mut b = Tcp::new(false);
    b.sport = 40001;
    let mut c = Tcp::new(true);
    c.seq = 5;
    let seg = |t: &Tcp, k: u32, n: usize| {
        let mut t = t.clone();
        t.seq = t.seq.wrapping_add(k * 1000);
        t.packet(&payload(n, k as u8))
    };
    let udp = udp_packet(false, 1, b"hello");
    let pkts = vec![
        seg(&a, 0, 1000),
        seg(&b, 0, 1000),
        seg(&a, 1, 1000),
        udp.clone(),
        seg(&c, 0, 1000),
        seg(&b, 1, 1000),
        seg(&a, 2, 1000),
        seg(&c, 1, 1000),
        seg(&b, 3, 1000), // gap in b: starts a new item
        seg(&b, 4, 500),  // short: ends it
        seg(&b, 5, 1000),
    ];
    let mut gro = Gro::new(10, 8);
    let out = gro.coalesce(&pkts).to_vec();
    assert_eq!(
        out,
        vec![
            GroOut::Merged {
                slot: 0,
                segments: 3
            }, // a
            GroOut::Merged {
                slot: 1,
                segments: 2
            }, // b 0,1
            GroOut::Pass(3),
            GroOut::Merged {
                slot: 2,
                segments: 2
            }, // c
            GroOut::Merged {
                slot: 3,
                segments: 2
            }, // b 3,4
            GroOut::Pass(10),
        ]
    );
    for slot in 0..4 {
        check_merged(&gro, slot, 10);
    }
    // The batch after reuses the slots.
    let out = gro.coalesce(&pkts[..3]).to_vec();
    assert_eq!(
        out[0],
        GroOut::Merged {
            slot: 0,
            segments: 2
        }
    );
}

#[test]
fn gro_passes_what_it_must_not_merge() {
    let t = Tcp::new(false);
    let first = t.packet(&payload(1000, 0));
    let next = |f: &dyn Fn(&mut Tcp)| {
        let mut u = t.clone();
        u.seq = t.seq.wrapping_add(1000);
        f(&mut u);
        u.packet(&payload(1000, 1))
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("other ack", next(&|u| u.ack += 1)),
        ("other window", next(&|u| u.window += 1)),
        ("other options", next(&|u| u.options[11] = 3)),
        ("no options", next(&|u| u.options.clear())),
        ("FIN", next(&|u| u.flags |= TCP_FIN)),
        ("SYN", next(&|u| u.flags |= TCP_SYN)),
        ("RST", next(&|u| u.flags |= TCP_RST)),
        ("URG", next(&|u| u.flags |= TCP_URG)),
        ("ECE", next(&|u| u.flags |= TCP_ECE)),
        ("CWR", next(&|u| u.flags |= TCP_CWR)),
        ("no ACK", next(&|u| u.flags = TCP_PSH)),
        ("retransmit", next(&|u| u.seq = t.seq)),
        ("gap", next(&|u| u.seq += 1)),
        ("other TOS", next(&|u| u.tos = 4)),
        ("other TTL", next(&|u| u.ttl = 63)),
        ("bad TCP checksum", {
            let mut p = next(&|_| {});
            p[60] ^= 1;
            p
        }),
        ("bad IP checksum", {
            let mut p = next(&|_| {});
            p[10] ^= 1;
            p
        }),
        ("lying total length", {
            let mut p = next(&|_| {});
            p.push(0);
            p
        }),
        ("longer payload", {
            let mut u = t.clone();
            u.seq = t.seq.wrapping_add(1000);
            u.packet(&payload(1001, 1))
        }),
    ];
    for (what, p) in cases {
        let mut gro = Gro::new(10, 2);
        let out = gro.coalesce(&[first.clone(), p]).to_vec();
        assert_eq!(out, vec![GroOut::Pass(0), GroOut::Pass(1)], "{what}");
    }
    // A PSH segment ends the super-packet; the next starts a new one.
    let mut u = t.clone();
    let mut pkts = Vec::new();
    for k in 0..4u32 {
        u.seq = t.seq.wrapping_add(k * 1000);
        u.flags = if k == 1 { TCP_ACK | TCP_PSH } else { TCP_ACK };
        pkts.push(u.packet(&payload(1000, k as u8)));
    }
    let mut gro = Gro::new(10, 2);
    let out = gro.coalesce(&pkts).to_vec();
    assert_eq!(
        out,
        vec![
            GroOut::Merged {
                slot: 0,
                segments: 2
            },
            GroOut::Merged {
                slot: 1,
                segments: 2
            }
        ]
    );
    let (_, m) = check_merged(&gro, 0, 10);
    assert_eq!(m[33], TCP_ACK | TCP_PSH);
    // Out of slots: the rest passes through.
    let mut gro = Gro::new(10, 1);
    assert_eq!(
        gro.coalesce(&pkts).to_vec(),
        vec![
            GroOut::Merged {
                slot: 0,
                segments: 2
            },
            GroOut::Pass(2),
            GroOut::Pass(3)
        ]
    );
    // A non-mergeable packet of a flow closes its open item (no reordering around it).
    let mut gro = Gro::new(10, 2);
    let mut syn = pkts[2].clone();
    syn[33] |= TCP_SYN;
    let out = gro
        .coalesce(&[pkts[0].clone(), syn, pkts[2].clone()])
        .to_vec();
    assert_eq!(out, vec![GroOut::Pass(0), GroOut::Pass(1), GroOut::Pass(2)]);
}

#[test]
fn gro_bounded_to_64k() {
    let mut t = Tcp::new(true);
    t.options.clear();
    let mut pkts = Vec::new();
    for k in 0..50u32 {
        t.seq = k * 1400;
        pkts.push(t.packet(&payload(1400, k as u8)));
    }
    let mut gro = Gro::new(10, 4);
    let out = gro.coalesce(&pkts).to_vec();
    // 40 + 20 + n·1400 <= 65535 → 46 segments in the first.
    assert_eq!(
        out,
        vec![
            GroOut::Merged {
                slot: 0,
                segments: 46
            },
            GroOut::Merged {
                slot: 1,
                segments: 4
            }
        ]
    );
    let (h, m) = check_merged(&gro, 0, 10);
    assert_eq!(m.len(), 60 + 46 * 1400);
    assert_eq!(do_split(&h, &m, 64).unwrap(), pkts[..46].to_vec());
}

/// xorshift64*: a deterministic generator for the property tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn property_split_then_coalesce_is_the_original() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..400 {
        let v6 = rng.below(2) == 1;
        let mut t = Tcp::new(v6);
        t.seq = rng.next() as u32;
        t.ack = rng.next() as u32;
        t.id = rng.next() as u16;
        t.options = vec![1; 4 * rng.below(11) as usize];
        t.flags = TCP_ACK | if rng.below(2) == 1 { TCP_PSH } else { 0 };
        let hl = if v6 { 40 } else { 20 } + 20 + t.options.len();
        let gso = 1 + rng.below(1500) as usize;
        let max = (MAX_IP_PACKET - hl).min(gso * 40);
        let n = 1 + rng.below(max as u64) as usize;
        let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        let orig = t.packet(&data);
        let (hdr, sp) = as_gso(orig.clone(), gso as u16, false);
        let segs = do_split(&hdr, &sp, 64).unwrap();
        assert_eq!(segs.len(), n.div_ceil(gso));
        assert!(segs.iter().all(|s| checksums_ok(s)), "case {case}");
        let mut gro = Gro::new(10, 2);
        let out = gro.coalesce(&segs).to_vec();
        if segs.len() == 1 {
            assert_eq!(out, vec![GroOut::Pass(0)]);
            assert_eq!(segs[0], orig);
            continue;
        }
        assert_eq!(
            out,
            vec![GroOut::Merged {
                slot: 0,
                segments: segs.len()
            }],
            "case {case}"
        );
        let (h2, mut m) = check_merged(&gro, 0, 10);
        assert_eq!(h2.gso_size as usize, gso);
        complete_checksum(&mut m, h2.csum_start, h2.csum_offset).unwrap();
        assert_eq!(m, orig, "case {case}");
    }
}

#[test]
fn property_split_never_panics_on_mutations() {
    let mut rng = Rng(42);
    let (hdr, sp) = as_gso(Tcp::new(false).packet(&payload(4000, 1)), 1000, false);
    let (hdr6, sp6) = as_gso(udp_packet(true, 0, &payload(4000, 1)), 1000, false);
    for _ in 0..5000 {
        let (mut h, mut p) = if rng.below(2) == 0 {
            (hdr, sp.clone())
        } else {
            (hdr6, sp6.clone())
        };
        let mut raw = [0u8; 10];
        h.write(&mut raw, 10);
        for _ in 0..1 + rng.below(4) {
            match rng.below(4) {
                0 => raw[rng.below(10) as usize] = rng.next() as u8,
                1 => {
                    let i = rng.below(p.len() as u64) as usize;
                    p[i] = rng.next() as u8
                }
                2 => p.truncate(rng.below(p.len() as u64 + 1) as usize),
                _ => {}
            }
        }
        if let Ok(parsed) = VnetHdr::parse(&raw, 10) {
            h = parsed;
            if let Ok(segs) = do_split(&h, &p, 8) {
                if h.is_gso() {
                    assert!(segs.iter().all(|s| checksums_ok(s)));
                }
            }
        }
        let mut gro = Gro::new(10, 2);
        let _ = gro.coalesce(&[p.clone(), p]);
    }
}

/// `sum16` agrees with a plain 16-bit word sum (modulo 0xffff, and zero exactly when the data
/// is) at every length and alignment, for random and all-0xff data.
#[test]
fn sum16_matches_the_word_by_word_sum() {
    fn plain(d: &[u8], init: u64) -> u64 {
        let mut acc = init;
        for c in d.chunks(2) {
            acc += (c[0] as u64) << 8 | c.get(1).copied().unwrap_or(0) as u64;
        }
        acc
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; 9100];
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let ones = vec![0xffu8; 9100];
    let zeros = vec![0u8; 9100];
    for len in (0..200).chain([1419, 1420, 1500, 9000, 9001]) {
        for off in 0..4 {
            for (d, init) in [(&data, 0u64), (&data, 0x1234_5678), (&ones, 7), (&zeros, 0)] {
                let d = &d[off..off + len];
                let (a, b) = (sum16(d, init), plain(d, init));
                assert_eq!(fold(a), fold(b), "len {len} off {off}");
                assert_eq!(a == 0, b == 0);
                assert!(a < (1u64 << 36) + init);
            }
        }
    }
}
