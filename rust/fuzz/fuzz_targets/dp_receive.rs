//! The datagram receive path of data plane v2 (`dp::DataPlane::receive`, the body of every
//! transport's receive loop): any sequence of datagrams, raw bytes or genuine ESP packets
//! (optionally mutated or replayed) on a UDP and a raw ESP transport. Invariants: nothing
//! panics, every datagram ends in exactly one counter (a drop reason, keepalive, control
//! message, dummy or delivery), and only delivered packets reach the device.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use simpletun_core::dp::fake::FakeNet;
use simpletun_core::dp::{DataPlane, DpConfig, Drop, FakeDevice, Traffic, TransportKind};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

fn sa(spi: u32, k: u8) -> SecurityAssociation {
    SecurityAssociation::new(spi, &[k; 16], &[k; 32], 64, false).unwrap()
}

fn outcomes(t: &Traffic) -> u64 {
    // Every possible outcome of one datagram: a drop reason, a keepalive, a control message,
    // a dummy or a delivery (read field by field: this runs twice per datagram).
    use std::sync::atomic::Ordering::Relaxed;
    Drop::all().map(|d| t.drops(d)).sum::<u64>()
        + t.keepalives.load(Relaxed)
        + t.control_rx.load(Relaxed)
        + t.rx_packets.load(Relaxed)
        + t.dummies.load(Relaxed)
}

fuzz_target!(|data: &[u8]| {
    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let cfg = DpConfig {
        queue_len: 8,
        ..DpConfig::default()
    };
    let dp = DataPlane::without_threads(dev.clone(), cfg).unwrap();
    let net = FakeNet::new();
    let (ua, ra): (SocketAddr, SocketAddr) = (
        "10.0.0.1:4500".parse().unwrap(),
        "10.0.0.1:0".parse().unwrap(),
    );
    let udp = dp.add_transport_without_thread(net.bind(ua, TransportKind::Udp).unwrap());
    let raw = dp.add_transport_without_thread(net.bind(ra, TransportKind::RawEsp).unwrap());
    let p1 = dp
        .add_peer(udp, &["10.0.1.0/24".parse().unwrap()], None)
        .unwrap();
    let p2 = dp
        .add_peer(
            raw,
            &["fd00::/64".parse().unwrap(), "10.0.2.0/24".parse().unwrap()],
            None,
        )
        .unwrap();
    dp.add_inbound_sa(p1, sa(0x1001, 1)).unwrap();
    dp.add_inbound_sa(p2, sa(0x1002, 2)).unwrap();
    let mut senders = [sa(0x1001, 1), sa(0x1002, 2)];
    let mut last: Option<(usize, Vec<u8>)> = None;

    let mut rest = data;
    while rest.len() >= 2 {
        let (len, mode) = (rest[0] as usize, rest[1]);
        let body = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        let which = ((mode >> 2) & 1) as usize;
        let (tr, from): (usize, SocketAddr) = if which == 0 {
            (udp, "192.0.2.1:4500".parse().unwrap())
        } else {
            (raw, "192.0.2.2:0".parse().unwrap())
        };
        let mut pkt = match mode & 3 {
            0 => body.to_vec(),
            1 | 2 => {
                let nh = if mode & 0x80 != 0 {
                    body.first().copied()
                } else {
                    None
                };
                let Ok(mut p) = senders[which].encap(body, nh.or(Some(4))) else {
                    continue;
                };
                if mode & 3 == 2 && !p.is_empty() {
                    let at = body.first().map_or(0, |b| *b as usize) % p.len();
                    p[at] ^= 1 << (mode >> 4 & 7);
                }
                last = Some((which, p.clone()));
                p
            }
            _ => match &last {
                Some((_, p)) => p.clone(),
                None => continue,
            },
        };
        let before = outcomes(dp.totals());
        let delivered_before = dp
            .totals()
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed);
        dp.receive(tr, from, &mut pkt);
        assert_eq!(
            outcomes(dp.totals()) - before,
            1,
            "a datagram not counted exactly once"
        );
        let delivered = dp
            .totals()
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed)
            - delivered_before;
        if delivered == 1 {
            assert!(dev.take(Duration::ZERO).is_some());
        }
    }
    assert!(
        dev.take(Duration::ZERO).is_none(),
        "a packet reached the device uncounted"
    );
});
