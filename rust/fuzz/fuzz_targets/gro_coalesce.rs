//! `offload::Gro::coalesce` on a fuzzed batch: valid TCP segments of a few IPv4/IPv6 flows (in
//! or out of order, PSH/FIN/SYN, short segments, changed windows or ACKs), mutated or truncated
//! copies of them, UDP datagrams and raw bytes. Must never panic; every input packet must come
//! out exactly once (passed through or inside one super-packet); every super-packet must carry a
//! vnet header that `split` accepts and that resegments into packets passing an independent
//! checksum check; and, flow by flow, the TCP payload bytes must come out in the order they went
//! in (GRO never reorders a flow).

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use simpletun_core::offload::{split, Gro, GroOut, VnetHdr, MAX_IP_PACKET};
use simpletun_fuzz::net;
use simpletun_fuzz::Input;

struct Flow {
    v6: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    window: u16,
    mss: usize,
    options: Vec<u8>,
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let cfg = inp.u8();
    let hdr_sz = if cfg & 1 == 0 { 10 } else { 12 };
    let slots = cfg as usize >> 1 & 7;
    let mut flows: Vec<Flow> = (0..3)
        .map(|i| Flow {
            v6: inp.u8() & 1 == 1,
            sport: 1000 + i,
            seq: inp.u32(),
            ack: 1,
            window: 100,
            mss: 1 + inp.u16() as usize % 1500,
            options: vec![1u8; 4 * (inp.u8() as usize % 4)],
        })
        .collect();
    let mut pkts: Vec<Vec<u8>> = Vec::new();
    while !inp.is_empty() && pkts.len() < 64 {
        let op = inp.u8();
        let f = &mut flows[(op as usize >> 3) % 3];
        let p = match op & 7 {
            0 => {
                let n = inp.u16() as usize % 2000;
                inp.bytes(n).to_vec()
            }
            1 => {
                let n = inp.u8() as usize;
                net::udp_packet(f.v6, 53, inp.bytes(n))
            }
            _ => {
                let ctl = inp.u8();
                let len = if ctl & 1 == 0 {
                    f.mss
                } else {
                    inp.u16() as usize % (f.mss + 2)
                };
                let flags = match ctl >> 1 & 7 {
                    0..=3 => 0x10,
                    4 => 0x18,
                    5 => 0x11,
                    6 => 0x12,
                    _ => inp.u8(),
                };
                if ctl & 0x10 != 0 {
                    f.seq = f.seq.wrapping_add(inp.u16() as u32).wrapping_sub(0x8000);
                }
                if ctl & 0x20 != 0 {
                    f.ack = f.ack.wrapping_add(1);
                }
                if ctl & 0x40 != 0 {
                    f.window ^= 1;
                }
                let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ ctl).collect();
                let mut p = net::tcp_packet(
                    f.v6, f.sport, f.seq, f.ack, flags, f.window, &f.options, &payload,
                );
                f.seq = f.seq.wrapping_add(len as u32);
                if op & 7 == 7 {
                    // Mutate or truncate a copy.
                    let at = inp.u16() as usize % p.len();
                    if ctl & 0x80 != 0 {
                        p.truncate(at);
                    } else {
                        p[at] ^= 1 << (inp.u8() % 8);
                    }
                }
                p
            }
        };
        pkts.push(p);
    }

    let mut gro = Gro::new(hdr_sz, slots);
    let outs = gro.coalesce(&pkts).to_vec();

    let mut seen = vec![false; pkts.len()];
    let mut total = 0;
    let mut streams_out: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for o in &outs {
        match *o {
            GroOut::Pass(i) => {
                assert!(!seen[i], "packet {i} written twice");
                seen[i] = true;
                total += 1;
                if let Some(k) = net::tcp_flow(&pkts[i]) {
                    streams_out
                        .entry(k)
                        .or_default()
                        .extend_from_slice(net::tcp_payload(&pkts[i]));
                }
            }
            GroOut::Merged { slot, segments } => {
                assert!(segments >= 2 && slot < slots);
                total += segments;
                let m = gro.merged(slot);
                let hdr = VnetHdr::parse(m, hdr_sz).expect("merged vnet header");
                let pkt = &m[hdr_sz..];
                assert!(pkt.len() <= MAX_IP_PACKET);
                let mut bufs = vec![vec![0u8; 1600]; 64];
                let mut lens = [0usize; 64];
                let k = split(&hdr, pkt, &mut bufs, 0, &mut lens).expect("merged packet splits");
                // All but the last merged segment carry exactly gso_size bytes.
                assert_eq!(k, segments, "resegmented into a different count");
                for (b, &l) in bufs.iter().zip(&lens).take(k) {
                    let s = &b[..l];
                    assert!(net::packet_ok(s), "resegmented packet fails its checksums");
                    let key = net::tcp_flow(s).expect("TCP");
                    streams_out
                        .entry(key)
                        .or_default()
                        .extend_from_slice(net::tcp_payload(s));
                }
            }
        }
    }
    assert_eq!(total, pkts.len(), "packets lost or duplicated");
    let mut streams_in: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for p in &pkts {
        if let Some(k) = net::tcp_flow(p) {
            streams_in
                .entry(k)
                .or_default()
                .extend_from_slice(net::tcp_payload(p));
        }
    }
    assert!(
        streams_in == streams_out,
        "a flow's bytes were reordered or changed"
    );
});
