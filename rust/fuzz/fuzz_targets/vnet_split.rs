//! `VnetHdr::parse` + `offload::split` (and `split_from` in parts, which must make the same
//! segments) on fuzzed headers and packets: raw bytes, or a
//! well-formed TSO/USO super-packet (IPv4/IPv6, TCP options, flags) whose vnet header and IP/TCP
//! header bytes are then lied about (hdr_len, gso_size, csum_start/offset, gso_type, lengths,
//! truncation). Must never panic; whatever it accepts must come out as valid segments checked
//! with an independent checksum routine: lengths and checksums right, at most gso_size payload
//! each, the payloads concatenating to the original, TCP sequence numbers and FIN/PSH/CWR
//! placement as TSO defines them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simpletun_core::offload::{
    split, split_from, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, TCP_CWR, TCP_FIN,
    TCP_PSH, VNET_HDR_LEN,
};
use simpletun_fuzz::net::{self, ip_info, slow_csum};
use simpletun_fuzz::Input;

const OFFSET: usize = 24;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let hdr_sz = if mode & 1 == 0 { 10 } else { 12 };
    let nbufs = 1 + inp.u8() as usize % 64;
    // Big enough for any structured segment (headers + gso_size < 9000).
    let bufsz = if mode & 2 == 0 {
        9300
    } else {
        inp.u16() as usize
    };
    let (raw_hdr, pkt) = if mode & 4 == 0 {
        let h = inp.bytes(hdr_sz).to_vec();
        (h, inp.rest().to_vec())
    } else {
        structured(&mut inp, mode, hdr_sz)
    };
    let Ok(hdr) = VnetHdr::parse(&raw_hdr, hdr_sz) else {
        return;
    };
    let mut outs = vec![vec![0u8; bufsz]; nbufs];
    let mut lens = vec![0usize; nbufs];
    let Ok(k) = split(&hdr, &pkt, &mut outs, OFFSET, &mut lens) else {
        return;
    };
    assert!(k >= 1 && k <= nbufs);
    let segs: Vec<&[u8]> = (0..k).map(|i| &outs[i][OFFSET..OFFSET + lens[i]]).collect();
    // split_from in parts of 1-4 buffers (as the data plane calls it) makes the same segments.
    let part = 1 + (mode >> 3) as usize % 4;
    let mut pouts = vec![vec![0u8; bufsz]; part];
    let mut plens = vec![0usize; part];
    let mut done = 0;
    while done < k {
        let (n, total) = split_from(&hdr, &pkt, done, &mut pouts, OFFSET, &mut plens)
            .expect("split_from refuses what split accepted");
        assert_eq!(total, k);
        assert!(n >= 1 && n <= part);
        for i in 0..n {
            assert_eq!(&pouts[i][OFFSET..OFFSET + plens[i]], segs[done + i]);
        }
        done += n;
    }
    if !hdr.is_gso() {
        assert_eq!(k, 1);
        assert_eq!(segs[0].len(), pkt.len());
        if hdr.flags & F_NEEDS_CSUM == 0 {
            assert_eq!(segs[0], &pkt[..]);
        } else {
            // Only the checksum field may differ, and the sum from csum_start now verifies.
            let at = hdr.csum_start as usize + hdr.csum_offset as usize;
            assert_eq!(&segs[0][..at], &pkt[..at]);
            assert_eq!(&segs[0][at + 2..], &pkt[at + 2..]);
            let seed = [pkt[at], pkt[at + 1]];
            let mut rest = segs[0][hdr.csum_start as usize..].to_vec();
            let rel = hdr.csum_offset as usize;
            let stored = [rest[rel], rest[rel + 1]];
            rest[rel] = 0;
            rest[rel + 1] = 0;
            // The seed goes first so that it does not shift the 16-bit alignment of the data.
            let want = slow_csum(&[&seed, &rest]);
            let want = if want == 0 { 0xffff } else { want };
            assert_eq!(u16::from_be_bytes(stored), want);
        }
        return;
    }

    // A GSO packet was accepted: its headers must really be what gso_type says.
    let (v6, iph, proto) = ip_info(&pkt).expect("accepted GSO packet has an IP header");
    let udp = hdr.gso_type & !GSO_ECN == GSO_UDP_L4;
    assert_eq!(proto, if udp { net::UDP } else { net::TCP });
    match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 => assert!(!v6),
        GSO_TCPV6 => assert!(v6),
        _ => assert!(udp),
    }
    let hl = if udp {
        iph + 8
    } else {
        iph + (pkt[iph + 12] >> 4) as usize * 4
    };
    let gso = hdr.gso_size as usize;
    assert!(pkt.len() > hl && gso > 0);
    assert_eq!(k, (pkt.len() - hl).div_ceil(gso));
    let mut joined = Vec::new();
    let seq0 = u32::from_be_bytes(pkt[iph + 4..iph + 8].try_into().unwrap());
    for (i, s) in segs.iter().enumerate() {
        assert!(
            net::packet_ok(s),
            "segment {i} of {k} fails its checksums or length"
        );
        assert!(s.len() > hl && s.len() <= hl + gso);
        assert_eq!(&s[iph..iph + 4], &pkt[iph..iph + 4], "ports");
        if udp {
            assert_eq!(
                u16::from_be_bytes([s[iph + 4], s[iph + 5]]) as usize,
                s.len() - iph
            );
        } else {
            let seq = u32::from_be_bytes(s[iph + 4..iph + 8].try_into().unwrap());
            assert_eq!(seq, seq0.wrapping_add((i * gso) as u32));
            let (f, f0) = (s[iph + 13], pkt[iph + 13]);
            let last = i + 1 == k;
            assert_eq!(
                f & (TCP_FIN | TCP_PSH),
                if last { f0 & (TCP_FIN | TCP_PSH) } else { 0 }
            );
            assert_eq!(f & TCP_CWR, if i == 0 { f0 & TCP_CWR } else { 0 });
            assert_eq!(
                f & !(TCP_FIN | TCP_PSH | TCP_CWR),
                f0 & !(TCP_FIN | TCP_PSH | TCP_CWR)
            );
            assert_eq!(&s[iph + 20..hl], &pkt[iph + 20..hl], "options");
        }
        joined.extend_from_slice(&s[hl..]);
    }
    assert_eq!(joined, &pkt[hl..]);
});

/// A valid super-packet and its header, then a few fuzz-chosen lies.
fn structured(inp: &mut Input, mode: u8, hdr_sz: usize) -> (Vec<u8>, Vec<u8>) {
    let v6 = mode & 8 != 0;
    let udp = mode & 16 != 0;
    let gso = inp.u16() % 9000;
    let n = inp.u16() as usize % 20000;
    let fill = inp.u8();
    let payload: Vec<u8> = (0..n).map(|i| fill.wrapping_add(i as u8)).collect();
    let mut pkt = if udp {
        net::udp_packet(v6, inp.u16(), &payload)
    } else {
        let opts = vec![1u8; 4 * (inp.u8() as usize % 11)];
        net::tcp_packet(
            v6,
            inp.u16(),
            inp.u32(),
            inp.u32(),
            inp.u8(),
            inp.u16(),
            &opts,
            &payload,
        )
    };
    let (_, iph, _) = ip_info(&pkt).unwrap();
    let th = if udp {
        8
    } else {
        (pkt[iph + 12] >> 4) as usize * 4
    };
    let mut h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if udp {
            GSO_UDP_L4
        } else if v6 {
            GSO_TCPV6
        } else {
            GSO_TCPV4
        } | if mode & 32 != 0 { GSO_ECN } else { 0 },
        hdr_len: (iph + th) as u16,
        gso_size: gso,
        csum_start: iph as u16,
        csum_offset: if udp { 6 } else { 16 },
    };
    // Lies.
    let lies = inp.u8();
    for bit in 0..8 {
        if lies & (1 << bit) == 0 || (bit >= 5 && pkt.is_empty()) {
            continue;
        }
        match bit {
            0 => h.hdr_len = inp.u16(),
            1 => h.csum_start = inp.u16() % 128,
            2 => h.csum_offset = inp.u16() % 64,
            3 => h.gso_type = inp.u8(),
            4 => h.flags = inp.u8() & 7,
            5 => {
                let at = inp.u8() as usize % pkt.len().min(100);
                pkt[at] = inp.u8();
            }
            6 => pkt.truncate(inp.u16() as usize % (pkt.len() + 1)),
            _ => {
                let at = inp.u8() as usize % pkt.len().min(100);
                pkt[at] ^= 1 << (inp.u8() % 8);
            }
        }
    }
    let mut raw = vec![0u8; hdr_sz];
    h.write(&mut raw, hdr_sz);
    let _ = VNET_HDR_LEN;
    (raw, pkt)
}
