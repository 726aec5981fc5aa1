//! The receive path of a super-packet carried whole on the stream transport (ESP Next Header
//! 253, `dp::DataPlane::receive` → validation of the prefix → the device write): genuine ESP
//! packets whose payload is a prefix (gso_type, flags, gso_size from the input) and a TCP/IP
//! packet (IPv4 or IPv6, built valid then with lying length, header-length, flag and
//! fragment fields, truncated or raw bytes), onto a device with or without vnet headers.
//! Invariants: nothing panics; a refused packet counts exactly one drop and writes nothing;
//! an accepted one counts its segments (rx_packets) and writes, on a vnet device, one packet
//! whose vnet header the kernel's rules accept (`VnetHdr::parse` + `offload::split` succeed
//! with that many segments), on a plain device that many packets.
#![no_main]

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use simpletun_core::dp::fake::FakeNet;
use simpletun_core::dp::{DataPlane, DpConfig, Drop, FakeDevice, TransportKind};
use simpletun_core::esp::NH_SUPER;
use simpletun_core::offload::{self, VnetHdr};
use simpletun_core::SecurityAssociation;

const HZ: usize = 10;

fn sa() -> SecurityAssociation {
    SecurityAssociation::new(0x1001, &[1; 16], &[1; 32], 64, false).unwrap()
}

/// A TCP/IP packet from 10.0.1.1 (v4) or fd00::1 (v6) with `payload` bytes of data.
fn tcp(v6: bool, payload: usize, opts: usize) -> Vec<u8> {
    let th = 20 + opts * 4;
    let iph = if v6 { 40 } else { 20 };
    let mut p = vec![0u8; iph + th + payload];
    let n = p.len();
    if v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8] = 0xfd;
        p[23] = 1;
        p[24] = 0xfd;
        p[39] = 2;
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 1, 1]);
        p[16..20].copy_from_slice(&[10, 0, 1, 2]);
    }
    p[iph + 12] = ((th / 4) as u8) << 4;
    p[iph + 13] = 0x18;
    for (i, b) in p[iph + th..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let vnet = data[0] & 1 != 0;
    let dev = Arc::new(if vnet {
        FakeDevice::with_vnet(HZ).unwrap()
    } else {
        FakeDevice::new(simpletun_core::tun::Kind::Tun).unwrap()
    });
    let dp = DataPlane::without_threads(dev.clone(), DpConfig::default()).unwrap();
    let net = FakeNet::new();
    let at: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let from: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    let tr = dp.add_transport_without_thread(net.bind(at, TransportKind::Stream).unwrap());
    let peer = dp
        .add_peer(
            tr,
            &["10.0.1.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
            Some(from),
        )
        .unwrap();
    dp.add_inbound_sa(peer, sa()).unwrap();
    let mut tx = sa();
    let mut seg = [vec![0u8; 65536]];
    let mut len = [0usize];

    let mut rest = &data[1..];
    while rest.len() >= 8 {
        let c = &rest[..8];
        rest = &rest[8..];
        let v6 = c[0] & 1 != 0;
        let payload = u16::from_be_bytes([c[1], c[2]]) as usize % 66000;
        let mut ip = if c[0] & 0x80 != 0 {
            // Raw bytes as the IP packet.
            let n = (c[3] as usize).min(rest.len());
            let raw = rest[..n].to_vec();
            rest = &rest[n..];
            raw
        } else {
            tcp(v6, payload.min(65535 - 100), (c[3] & 7) as usize)
        };
        // Lies and damage.
        match c[4] & 7 {
            1 if ip.len() > 4 => ip[2..4].copy_from_slice(&[c[5], c[6]]), // v4 length / v6 flow
            2 if ip.len() > 6 => ip[4..6].copy_from_slice(&[c[5], c[6]]), // v6 length / v4 id
            3 if ip.len() > 33 => ip[32] = c[5],                          // v4 TCP data offset
            4 if ip.len() > 52 => ip[52] = c[5],                          // v6 TCP data offset
            5 => ip.truncate(c[5] as usize),
            6 if ip.len() > 7 => ip[6] = c[5], // v4 flags/fragment
            7 if !ip.is_empty() => ip[0] = c[5], // version / IHL
            _ => {}
        }
        let gso_type = match c[7] & 3 {
            0 => 1 + 3 * (v6 as u8), // matching TCPV4/TCPV6
            1 => c[6],               // anything
            2 => 0x80 | (1 + 3 * (v6 as u8)),
            _ => 4 - 3 * (v6 as u8), // the other family
        };
        let flags = if c[7] & 4 != 0 { c[5] } else { 0 };
        let gso = u16::from_be_bytes([c[5], c[6]]) >> (c[7] >> 4);
        let mut inner = vec![gso_type, flags];
        inner.extend_from_slice(&gso.to_be_bytes());
        inner.extend_from_slice(&ip);
        if c[7] & 8 != 0 {
            inner.truncate((c[6] as usize) % 5);
        }
        let Ok(mut pkt) = tx.encap(&inner, Some(NH_SUPER)) else {
            continue;
        };
        let t = dp.totals();
        let drops0: u64 = Drop::all().map(|d| t.drops(d)).sum();
        let rx0 = t.rx_packets.load(Relaxed);
        dp.receive(tr, from, &mut pkt);
        let drops = Drop::all().map(|d| t.drops(d)).sum::<u64>() - drops0;
        let segs = t.rx_packets.load(Relaxed) - rx0;
        if segs == 0 {
            assert_eq!(drops, 1, "a refused super-packet counts one drop");
            assert!(dev.take(Duration::ZERO).is_none(), "refused but written");
            continue;
        }
        assert_eq!(drops, 0);
        if vnet {
            let w = dev.take(Duration::ZERO).expect("accepted but not written");
            let h = VnetHdr::parse(&w, HZ).expect("the written vnet header parses");
            let (_, n) = offload::split_from(&h, &w[HZ..], 0, &mut seg, 0, &mut len)
                .expect("the kernel's rules accept the write");
            assert_eq!(n as u64, segs, "segments counted = segments written");
        } else {
            for _ in 0..segs {
                assert!(dev.take(Duration::ZERO).is_some(), "a segment missing");
            }
        }
        assert!(
            dev.take(Duration::ZERO).is_none(),
            "more written than counted"
        );
    }
});
