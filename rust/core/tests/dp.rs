//! Data plane v2, no root: data planes wired back to back through the in-memory fakes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::dp::fake::{FakeNet, FakeSocket};
use simpletun_core::dp::{DataPlane, DpConfig, Event, FakeDevice, Prefix, Traffic, TransportKind};
use simpletun_core::esp::{NH_IPV4, PAYLOAD_OFFSET};
use simpletun_core::proto::{NAT_KEEPALIVE, NON_ESP_MARKER};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

const T: Duration = Duration::from_secs(5);

fn sa(spi: u32, seed: u8) -> SecurityAssociation {
    SecurityAssociation::new(spi, &[seed; 16], &[seed ^ 0x5a; 32], 4096, false).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

/// An IPv4 packet from `src` to `dst` whose payload carries `tag` (no checksums: fake device).
fn ipv4(src: [u8; 4], dst: [u8; 4], tag: u64) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&60u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..28].copy_from_slice(&tag.to_be_bytes());
    p
}

fn ipv6(src_last: u8, dst_last: u8, tag: u64) -> Vec<u8> {
    let mut p = vec![0u8; 80];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8] = 0xfd;
    p[23] = src_last;
    p[24] = 0xfd;
    p[39] = dst_last;
    p[40..48].copy_from_slice(&tag.to_be_bytes());
    p
}

fn tag(p: &[u8]) -> u64 {
    let off = if p[0] >> 4 == 4 { 20 } else { 40 };
    u64::from_be_bytes(p[off..off + 8].try_into().unwrap())
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn get(t: &Traffic, name: &str) -> u64 {
    t.get(name).unwrap_or_else(|| panic!("no counter {name}"))
}

fn peer_get(dp: &DataPlane, peer: u32, name: &str) -> u64 {
    dp.peer_stats(peer)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap()
        .1
}

struct Node {
    dev: Arc<FakeDevice>,
    sock: Arc<FakeSocket>,
    dp: DataPlane,
    tr: usize,
}

fn node(net: &Arc<FakeNet>, at: &str, kind: Kind) -> Node {
    let dev = Arc::new(FakeDevice::new(kind).unwrap());
    let sock = net.bind(addr(at), TransportKind::Udp).unwrap();
    let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
    let tr = dp.add_transport(sock.clone()).unwrap();
    Node { dev, sock, dp, tr }
}

/// A server and `n` clients; client k (1-based) owns 10.0.k.0/24 and fd00::k/128, the server
/// is 10.0.0.1. SPIs: client k → server 0x1000+k, server → client k 0x2000+k.
fn star(n: u8) -> (Arc<FakeNet>, Node, Vec<(Node, u32, u32)>) {
    let net = FakeNet::new();
    let server = node(&net, "192.0.2.1:4500", Kind::Tun);
    let mut clients = Vec::new();
    for k in 1..=n {
        let c = node(&net, &format!("198.51.100.{k}:4500"), Kind::Tun);
        let allowed = [
            pfx(&format!("10.0.{k}.0/24")),
            pfx(&format!("fd00::{k:x}/128")),
        ];
        let sp = server.dp.add_peer(server.tr, &allowed, None).unwrap();
        server
            .dp
            .add_inbound_sa(sp, sa(0x1000 + k as u32, k))
            .unwrap();
        server
            .dp
            .set_outbound_sa(sp, Some(sa(0x2000 + k as u32, k + 100)))
            .unwrap();
        let cp =
            c.dp.add_peer(
                c.tr,
                &[pfx("0.0.0.0/0"), pfx("::/0")],
                Some(addr("192.0.2.1:4500")),
            )
            .unwrap();
        c.dp.add_inbound_sa(cp, sa(0x2000 + k as u32, k + 100))
            .unwrap();
        c.dp.set_outbound_sa(cp, Some(sa(0x1000 + k as u32, k)))
            .unwrap();
        clients.push((c, cp, sp));
    }
    (net, server, clients)
}

#[test]
fn many_peers_routed_by_prefix_both_ways() {
    let (_net, server, clients) = star(3);
    // Client → server first: this teaches the server each client's endpoint.
    for (k, (c, _, _)) in clients.iter().enumerate() {
        let k = k as u8 + 1;
        c.dev.inject(&ipv4([10, 0, k, 5], [10, 0, 0, 1], k as u64));
        let got = server.dev.take(T).expect("packet at the server");
        assert_eq!(tag(&got), k as u64);
        assert_eq!(&got[12..16], &[10, 0, k, 5]);
    }
    // Server → each client by destination prefix, IPv4 and IPv6.
    for k in 1..=3u8 {
        server
            .dev
            .inject(&ipv4([10, 0, 0, 1], [10, 0, k, 77], 100 + k as u64));
        server.dev.inject(&ipv6(1, k, 200 + k as u64));
    }
    for (k, (c, _, sp)) in clients.iter().enumerate() {
        let k = k as u64 + 1;
        let mut tags = vec![tag(&c.dev.take(T).unwrap()), tag(&c.dev.take(T).unwrap())];
        tags.sort();
        assert_eq!(tags, vec![100 + k, 200 + k]);
        assert_eq!(
            c.dev.take(Duration::from_millis(50)),
            None,
            "client {k} got a packet for another peer"
        );
        assert_eq!(peer_get(&server.dp, *sp, "tx_packets"), 2);
        assert_eq!(peer_get(&server.dp, *sp, "rx_packets"), 1);
    }
    // No peer owns 10.9.0.0/16.
    server.dev.inject(&ipv4([10, 0, 0, 1], [10, 9, 0, 1], 1));
    eventually("no_route", || get(server.dp.totals(), "drop_no_route") == 1);
    assert_eq!(get(server.dp.totals(), "tx_packets"), 6);
    assert_eq!(get(server.dp.totals(), "rx_packets"), 3);
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let (_net, server, clients) = star(2);
    let (c1, _, sp1) = &clients[0];
    // Client 1 claims client 2's address; and an IPv6 source it does not own.
    c1.dev.inject(&ipv4([10, 0, 2, 5], [10, 0, 0, 1], 1));
    c1.dev.inject(&ipv6(2, 1, 2));
    c1.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], 3));
    let got = server.dev.take(T).unwrap();
    assert_eq!(tag(&got), 3, "only the honest packet is delivered");
    assert_eq!(peer_get(&server.dp, *sp1, "drop_spoofed"), 2);
    assert_eq!(get(server.dp.totals(), "drop_spoofed"), 2);
    assert_eq!(server.dev.take(Duration::from_millis(50)), None);
}

#[test]
fn sa_switch_over_under_continuous_traffic_loses_nothing() {
    let (_net, server, clients) = star(1);
    let (c, cp, sp) = &clients[0];
    let n = 30_000u64;
    let spis = [0x1001u32, 0x1101, 0x1201, 0x1301];
    let mut seen = Vec::with_capacity(n as usize);
    thread::scope(|s| {
        // The sender: a continuous stream into the client's device, short queue.
        s.spawn(|| {
            for i in 0..n {
                while c.dev.pending_inbound() > 256 {
                    thread::yield_now();
                }
                c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], i));
            }
        });
        // The control plane: rekey three times while packets flow, in the safe order: new
        // inbound SA first, then the sender switches, then the old inbound SA is retired
        // after a grace period (longer than any packet stays queued).
        s.spawn(|| {
            for (k, at) in [(1usize, 6000u64), (2, 14000), (3, 22000)] {
                eventually("progress", || get(c.dp.totals(), "tx_packets") >= at);
                let key = sa(spis[k], 50 + k as u8);
                server.dp.add_inbound_sa(*sp, key).unwrap();
                c.dp.set_outbound_sa(*cp, Some(sa(spis[k], 50 + k as u8)))
                    .unwrap();
                server
                    .dp
                    .remove_inbound_sa(spis[k - 1], Duration::from_secs(60))
                    .unwrap();
            }
        });
        while (seen.len() as u64) < n {
            match server.dev.take(T) {
                Some(p) => seen.push(tag(&p)),
                None => panic!(
                    "lost a packet after {} of {n}: server {:?}",
                    seen.len(),
                    server
                        .dp
                        .totals()
                        .entries()
                        .into_iter()
                        .filter(|e| e.1 != 0)
                        .collect::<Vec<_>>()
                ),
            }
        }
    });
    assert_eq!(seen, (0..n).collect::<Vec<_>>(), "every packet, in order");
    let drops: u64 = server
        .dp
        .totals()
        .entries()
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(drops, 0);
    // Every SA carried traffic; after the grace period only the newest inbound SA is left.
    let sas = server.dp.sas();
    for spi in spis {
        let s = sas.iter().find(|s| s.inbound && s.spi == spi);
        assert!(
            s.is_some_and(|s| s.stats.decap_packets > 0 && s.last_rx_ms > 0),
            "SA {spi:#x}: {s:?}"
        );
    }
    // Shorten the grace periods: the old SAs then go, the newest stays.
    for spi in &spis[..3] {
        server
            .dp
            .remove_inbound_sa(*spi, Duration::from_millis(100))
            .unwrap();
    }
    eventually("old SAs retired", || {
        server.dp.sas().iter().filter(|s| s.inbound).count() == 1
    });
    assert_eq!(
        server.dp.sas().iter().find(|s| s.inbound).unwrap().spi,
        0x1301
    );
}

#[test]
fn roaming_endpoint_follows_latest_authenticated_packet() {
    let (net, server, clients) = star(1);
    let (c, _, sp) = &clients[0];
    assert_eq!(server.dp.endpoint(*sp).unwrap(), None);
    // No endpoint yet: the server cannot send (counted), and says nothing on the wire.
    server.dev.inject(&ipv4([10, 0, 0, 1], [10, 0, 1, 5], 1));
    eventually("no_endpoint", || {
        peer_get(&server.dp, *sp, "drop_no_endpoint") == 1
    });
    c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], 2));
    server.dev.take(T).unwrap();
    assert_eq!(
        server.dp.endpoint(*sp).unwrap(),
        Some(addr("198.51.100.1:4500"))
    );
    // The client moves (NAT rebinding): its next packet moves the endpoint.
    c.sock.rebind(addr("203.0.113.9:61000"));
    c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], 3));
    server.dev.take(T).unwrap();
    assert_eq!(
        server.dp.endpoint(*sp).unwrap(),
        Some(addr("203.0.113.9:61000"))
    );
    server.dev.inject(&ipv4([10, 0, 0, 1], [10, 0, 1, 5], 4));
    assert_eq!(tag(&c.dev.take(T).unwrap()), 4);
    // A forged packet from elsewhere does not move it.
    net.inject(
        addr("192.0.2.1:4500"),
        addr("192.0.2.66:1"),
        &[0x00, 0x00, 0x10, 0x01, 0, 0, 0, 9, 1, 2, 3],
    );
    eventually("forgery counted", || {
        get(server.dp.totals(), "drop_bad_length") == 1
    });
    let mut forged = vec![0u8; 72];
    forged[..4].copy_from_slice(&0x1001u32.to_be_bytes());
    forged[7] = 200;
    net.inject(addr("192.0.2.1:4500"), addr("192.0.2.66:1"), &forged);
    eventually("forgery counted", || {
        peer_get(&server.dp, *sp, "drop_auth") == 1
    });
    assert_eq!(
        server.dp.endpoint(*sp).unwrap(),
        Some(addr("203.0.113.9:61000"))
    );
}

#[test]
fn unknown_spi_and_missing_sa() {
    let (net, server, clients) = star(1);
    let (c, cp, _) = &clients[0];
    let mut p = vec![0u8; 64];
    p[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    net.inject(addr("192.0.2.1:4500"), addr("198.51.100.1:4500"), &p);
    eventually("unknown_spi", || {
        get(server.dp.totals(), "drop_unknown_spi") == 1
    });
    // An SA of another peer's transport is not accepted on a second transport either.
    // Without an outbound SA the client drops (counted) and tells the control plane once.
    c.dp.set_outbound_sa(*cp, None).unwrap();
    c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], 1));
    c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], 2));
    eventually("no_sa", || peer_get(&c.dp, *cp, "drop_no_sa") == 2);
    assert_eq!(c.dp.take_events(10), vec![Event::NoSa { peer: *cp }]);
}

#[test]
fn sa_near_its_limit_is_reported_once() {
    let net = FakeNet::new();
    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let cfg = DpConfig {
        soft_seq: 3,
        ..DpConfig::default()
    };
    let dp = DataPlane::start(dev.clone(), cfg).unwrap();
    let tr = dp
        .add_transport(net.bind(addr("10.1.1.1:4500"), TransportKind::Udp).unwrap())
        .unwrap();
    let p = dp
        .add_peer(tr, &[pfx("0.0.0.0/0")], Some(addr("10.1.1.2:4500")))
        .unwrap();
    dp.set_outbound_sa(p, Some(sa(0x3000, 1))).unwrap();
    for i in 0..6 {
        dev.inject(&ipv4([1, 1, 1, 1], [2, 2, 2, 2], i));
    }
    eventually("sent", || get(dp.totals(), "tx_packets") == 6);
    let ev = dp.take_events(10);
    assert_eq!(
        ev,
        vec![Event::SaLimit {
            peer: p,
            spi: 0x3000,
            seq: 3,
            bytes: 180
        }]
    );
}

/// Per-SA soft limits (a peer's rekey_packets / rekey_bytes): each SA fires at its own limit,
/// never above the data plane's, and a new SA starts counting afresh.
#[test]
fn per_sa_soft_limits_fire_at_their_own_threshold() {
    let net = FakeNet::new();
    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let cfg = DpConfig {
        soft_seq: 5,
        ..DpConfig::default()
    };
    let dp = DataPlane::start(dev.clone(), cfg).unwrap();
    let tr = dp
        .add_transport(net.bind(addr("10.1.1.1:4500"), TransportKind::Udp).unwrap())
        .unwrap();
    let p = dp
        .add_peer(tr, &[pfx("0.0.0.0/0")], Some(addr("10.1.1.2:4500")))
        .unwrap();
    let send = |n: u64, total: u64| {
        for i in 0..n {
            dev.inject(&ipv4([1, 1, 1, 1], [2, 2, 2, 2], i));
        }
        eventually("sent", || get(dp.totals(), "tx_packets") == total);
    };
    // A packet limit of 2.
    dp.set_outbound_sa_with_limits(p, Some(sa(0x3001, 1)), Some(2), None)
        .unwrap();
    send(4, 4);
    let want = |spi, seq, bytes| Event::SaLimit {
        peer: p,
        spi,
        seq,
        bytes,
    };
    assert_eq!(dp.take_events(10), vec![want(0x3001, 2, 120)]);
    // A byte limit of 150 inner bytes (each packet has 60).
    dp.set_outbound_sa_with_limits(p, Some(sa(0x3002, 2)), None, Some(150))
        .unwrap();
    send(4, 8);
    assert_eq!(dp.take_events(10), vec![want(0x3002, 3, 180)]);
    // A limit above the data plane's: the data plane's applies.
    dp.set_outbound_sa_with_limits(p, Some(sa(0x3003, 3)), Some(1000), None)
        .unwrap();
    send(6, 14);
    assert_eq!(dp.take_events(10), vec![want(0x3003, 5, 300)]);
}

#[test]
fn control_messages_both_ways_and_keepalives() {
    let (net, server, clients) = star(1);
    let (c, _, _) = &clients[0];
    let mut hello = NON_ESP_MARKER.to_vec();
    hello.extend_from_slice(b"\x01hello");
    c.dp.send_control(c.tr, addr("192.0.2.1:4500"), &hello)
        .unwrap();
    eventually("control at server", || {
        get(server.dp.totals(), "control_rx") == 1
    });
    let ev = server.dp.take_events(10);
    assert_eq!(
        ev,
        vec![Event::Control {
            transport: server.tr,
            from: addr("198.51.100.1:4500"),
            payload: hello.clone()
        }]
    );
    let mut reply = NON_ESP_MARKER.to_vec();
    reply.extend_from_slice(b"\x02reply");
    server
        .dp
        .send_control(server.tr, addr("198.51.100.1:4500"), &reply)
        .unwrap();
    eventually("control at client", || {
        get(c.dp.totals(), "control_rx") == 1
    });
    assert!(
        matches!(&c.dp.take_events(10)[..], [Event::Control { payload, .. }] if *payload == reply)
    );
    // Keepalives are accepted and ignored.
    c.dp.send_keepalive(c.tr, addr("192.0.2.1:4500")).unwrap();
    net.inject(addr("192.0.2.1:4500"), addr("9.9.9.9:9"), &[NAT_KEEPALIVE]);
    eventually("keepalives", || get(server.dp.totals(), "keepalives") == 2);
    assert!(server.dp.take_events(10).is_empty());
    // Python cannot send ESP-looking datagrams through the control path.
    assert!(server
        .dp
        .send_control(server.tr, addr("198.51.100.1:4500"), b"\x00\x00\x10\x01xx")
        .is_err());
    // A full queue drops (counted) instead of blocking the data plane.
    for _ in 0..1100 {
        net.inject(addr("192.0.2.1:4500"), addr("9.9.9.9:9"), &hello);
    }
    eventually("overflow counted", || {
        get(server.dp.totals(), "drop_control_overflow") == 1100 - 1024
    });
    assert_eq!(server.dp.take_events(2000).len(), 1024);
}

#[test]
fn raw_esp_transport_refuses_control_datagrams() {
    let net = FakeNet::new();
    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev, DpConfig::default()).unwrap();
    let raw = net.bind(addr("10.2.0.1:0"), TransportKind::RawEsp).unwrap();
    let tr = dp.add_transport(raw).unwrap();
    net.inject(
        addr("10.2.0.1:0"),
        addr("10.2.0.2:0"),
        b"\x00\x00\x00\x00\x01hello",
    );
    eventually("control dropped", || get(dp.totals(), "drop_control") == 1);
    assert!(dp.take_events(10).is_empty());
    assert!(dp
        .send_control(tr, addr("10.2.0.2:0"), b"\x00\x00\x00\x00\x01")
        .is_err());
}

#[test]
fn malformed_datagrams_are_counted_and_none_panics() {
    let (net, server, clients) = star(1);
    let (c, _, sp) = &clients[0];
    let to = addr("192.0.2.1:4500");
    let from = addr("198.51.100.1:4500");
    // A genuine packet, captured on the wire to be replayed and mangled.
    c.sock.record();
    c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], 1));
    server.dev.take(T).unwrap();
    let genuine = c.sock.sent_log.lock().unwrap().as_ref().unwrap()[0]
        .0
        .clone();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "drop_bad_length"),
        (vec![0x01], "drop_bad_length"),
        (vec![0xff, 0xff], "drop_bad_length"),
        (vec![0, 0, 0x10, 0x01, 0, 0, 0], "drop_bad_length"),
        (genuine[..genuine.len() - 1].to_vec(), "drop_bad_length"),
        (genuine[..40].to_vec(), "drop_bad_length"),
        (genuine.clone(), "drop_replay"),
        (
            {
                let mut g = genuine.clone();
                g[4..8].copy_from_slice(&[0, 0, 0, 2]);
                g
            },
            "drop_auth",
        ),
        (
            {
                let mut g = genuine.clone();
                let l = g.len();
                g[4..8].copy_from_slice(&[0, 0, 0, 3]);
                g[l - 20] ^= 0x80;
                g
            },
            "drop_auth",
        ),
        (vec![0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1], "drop_unknown_spi"),
    ];
    let mut expect = std::collections::HashMap::<&str, u64>::new();
    for (d, counter) in &cases {
        net.inject(to, from, d);
        *expect.entry(counter).or_default() += 1;
        let want = expect[counter];
        eventually(counter, || get(server.dp.totals(), counter) == want);
    }
    // Random garbage, some of it starting with the peer's SPI: every datagram is counted
    // somewhere, nothing reaches the device, nothing panics.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let before: u64 = server
        .dp
        .totals()
        .entries()
        .iter()
        .filter(|(k, _)| k.starts_with("drop_") || k == "keepalives" || k == "control_rx")
        .map(|(_, v)| v)
        .sum();
    let n = 5000u64;
    for i in 0..n {
        let len = (rnd() % 200) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        if i % 2 == 0 && len >= 4 {
            d[..4].copy_from_slice(&0x1001u32.to_be_bytes());
        }
        net.inject(to, from, &d);
    }
    eventually("all garbage counted", || {
        let now: u64 = server
            .dp
            .totals()
            .entries()
            .iter()
            .filter(|(k, _)| k.starts_with("drop_") || k == "keepalives" || k == "control_rx")
            .map(|(_, v)| v)
            .sum();
        now - before == n
    });
    assert_eq!(server.dev.take(Duration::from_millis(50)), None);
    assert!(server.dp.running());
    assert_eq!(peer_get(&server.dp, *sp, "rx_packets"), 1);
}

#[test]
fn tap_device_takes_exactly_one_peer() {
    let net = FakeNet::new();
    let a = node(&net, "10.3.0.1:4500", Kind::Tap);
    let b = node(&net, "10.3.0.2:4500", Kind::Tap);
    let pa =
        a.dp.add_peer(a.tr, &[], Some(addr("10.3.0.2:4500")))
            .unwrap();
    let e = a.dp.add_peer(a.tr, &[], None).unwrap_err();
    assert!(e.to_string().contains("exactly one peer"), "{e}");
    let pb =
        b.dp.add_peer(b.tr, &[], Some(addr("10.3.0.1:4500")))
            .unwrap();
    a.dp.set_outbound_sa(pa, Some(sa(0x4000, 1))).unwrap();
    b.dp.add_inbound_sa(pb, sa(0x4000, 1)).unwrap();
    let frame: Vec<u8> = (0..60u8).collect();
    a.dev.inject(&frame);
    assert_eq!(b.dev.take(T).unwrap(), frame);
}

#[test]
fn configuration_mistakes_are_clear_errors() {
    let (_net, server, _clients) = star(1);
    let e = server
        .dp
        .add_peer(server.tr, &[pfx("10.0.1.0/24")], None)
        .unwrap_err();
    assert!(e.to_string().contains("already allowed"), "{e}");
    assert!(server
        .dp
        .add_peer(7, &[], None)
        .unwrap_err()
        .to_string()
        .contains("no transport 7"));
    let e = server.dp.add_inbound_sa(0, sa(0x1001, 1)).unwrap_err();
    assert!(e.to_string().contains("already installed"), "{e}");
    assert!(server.dp.remove_inbound_sa(0x9999, Duration::ZERO).is_err());
    server.dp.remove_peer(0).unwrap();
    assert!(server.dp.sas().is_empty());
    server.dp.stop();
    assert!(!server.dp.running());
    assert_eq!(server.dp.exit_reason().as_deref(), Some("stopped"));
}

/// The real ESP-in-UDP transport on loopback (no root needed), IPv4 and IPv6: a burst larger
/// than one batch, and a control message.
#[test]
fn udp_transport_on_loopback() {
    use simpletun_core::dp::udp::UdpTransport;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    for host in ["127.0.0.1", "[::1]"] {
        let (sa_sock, sb_sock) = match (
            UdpSocket::bind(format!("{host}:0")),
            UdpSocket::bind(format!("{host}:0")),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                eprintln!("skipping {host}: cannot bind (no IPv6 loopback?)");
                continue;
            }
        };
        let (a_addr, b_addr) = (sa_sock.local_addr().unwrap(), sb_sock.local_addr().unwrap());
        let mk = |s: &UdpSocket| {
            let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
            let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
            let tr = dp
                .add_transport(Arc::new(UdpTransport::from_fd(s.as_raw_fd()).unwrap()))
                .unwrap();
            (dev, dp, tr)
        };
        let (da, a, ta) = mk(&sa_sock);
        let (db, b, tb) = mk(&sb_sock);
        let pa = a.add_peer(ta, &[pfx("0.0.0.0/0")], Some(b_addr)).unwrap();
        let pb = b.add_peer(tb, &[pfx("0.0.0.0/0")], None).unwrap();
        a.set_outbound_sa(pa, Some(sa(0x5000, 3))).unwrap();
        b.add_inbound_sa(pb, sa(0x5000, 3)).unwrap();
        for i in 0..200 {
            da.inject(&ipv4([10, 0, 0, 1], [10, 0, 0, 2], i));
        }
        for i in 0..200 {
            assert_eq!(tag(&db.take(T).expect("over UDP")), i);
        }
        assert_eq!(b.endpoint(pb).unwrap(), Some(a_addr));
        let mut m = NON_ESP_MARKER.to_vec();
        m.push(9);
        b.send_control(tb, a_addr, &m).unwrap();
        eventually("control over UDP", || get(a.totals(), "control_rx") == 1);
        assert_eq!(
            a.take_events(4),
            vec![Event::Control {
                transport: ta,
                from: b_addr,
                payload: m
            }]
        );
        // The data plane owns duplicates: the caller's sockets are still open.
        drop(a);
        assert!(sa_sock.local_addr().is_ok());
    }
}

/// The stream transport (2-byte frames): three clients on one server over UNIX stream socket
/// pairs (in memory) and one over real TCP on loopback; routing by prefix, control messages,
/// oversized frames counted, a closed connection reported.
#[test]
fn stream_transport_many_connections() {
    use simpletun_core::dp::stream::StreamTransport;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let sdev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let server = DataPlane::start(sdev.clone(), DpConfig::default()).unwrap();
    let sst = Arc::new(StreamTransport::new(65535).unwrap());
    let str_id = server.add_transport(sst.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut keep = Vec::new();
    let mut clients = Vec::new();
    for k in 1..=3u8 {
        let (s_end, c_end): (Box<dyn AsRawFd>, Box<dyn AsRawFd>) = if k < 3 {
            let (a, b) = UnixStream::pair().unwrap();
            (Box::new(a), Box::new(b))
        } else {
            let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (s, _) = listener.accept().unwrap();
            (Box::new(s), Box::new(c))
        };
        let ep_at_server = addr(&format!("198.51.100.{k}:1000"));
        sst.add_connection(s_end.as_raw_fd(), ep_at_server).unwrap();
        let sp = server
            .add_peer(
                str_id,
                &[pfx(&format!("10.0.{k}.0/24"))],
                Some(ep_at_server),
            )
            .unwrap();
        server.add_inbound_sa(sp, sa(0x1000 + k as u32, k)).unwrap();
        server
            .set_outbound_sa(sp, Some(sa(0x2000 + k as u32, k + 9)))
            .unwrap();
        let cdev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
        let c = DataPlane::start(cdev.clone(), DpConfig::default()).unwrap();
        let cst = Arc::new(StreamTransport::new(65535).unwrap());
        let ct = c.add_transport(cst.clone()).unwrap();
        let server_ep = addr("192.0.2.1:55555");
        cst.add_connection(c_end.as_raw_fd(), server_ep).unwrap();
        let cp = c
            .add_peer(ct, &[pfx("0.0.0.0/0")], Some(server_ep))
            .unwrap();
        c.add_inbound_sa(cp, sa(0x2000 + k as u32, k + 9)).unwrap();
        c.set_outbound_sa(cp, Some(sa(0x1000 + k as u32, k)))
            .unwrap();
        keep.push((s_end, c_end));
        clients.push((cdev, c, cst, ct, server_ep, sp));
    }
    // Each client → server, then server → each client by prefix; a burst of 500 each way.
    for (k, (cdev, ..)) in clients.iter().enumerate() {
        for i in 0..500 {
            cdev.inject(&ipv4([10, 0, k as u8 + 1, 5], [10, 0, 0, 1], i));
        }
    }
    let mut per = [0u32; 3];
    for _ in 0..1500 {
        let p = sdev.take(T).expect("frames at the server");
        per[p[14] as usize - 1] += 1;
    }
    assert_eq!(per, [500, 500, 500]);
    for k in 1..=3u8 {
        sdev.inject(&ipv4([10, 0, 0, 1], [10, 0, k, 5], k as u64));
    }
    for (k, (cdev, ..)) in clients.iter().enumerate() {
        assert_eq!(tag(&cdev.take(T).unwrap()), k as u64 + 1);
        assert_eq!(cdev.take(Duration::from_millis(30)), None);
    }
    // Control messages both ways on a stream.
    let (_, c1, _, ct1, server_ep, _) = &clients[0];
    let mut m = NON_ESP_MARKER.to_vec();
    m.push(1);
    c1.send_control(*ct1, *server_ep, &m).unwrap();
    eventually("control", || get(server.totals(), "control_rx") == 1);
    assert_eq!(
        server.take_events(4),
        vec![Event::Control {
            transport: str_id,
            from: addr("198.51.100.1:1000"),
            payload: m.clone()
        }]
    );
    server
        .send_control(str_id, addr("198.51.100.1:1000"), &m)
        .unwrap();
    eventually("control back", || get(c1.totals(), "control_rx") == 1);
    // Client 3 (TCP) goes away: the server reports its connection closed.
    let (_, c3, c3t, ..) = &clients[2];
    c3.stop();
    c3t.remove_connection(addr("192.0.2.1:55555"));
    keep.pop();
    let mut evs = Vec::new();
    eventually("closed", || {
        evs.extend(server.take_events(16));
        evs.iter().any(|e| {
            matches!(e, Event::Closed { transport, endpoint, reason }
                if *transport == str_id && *endpoint == addr("198.51.100.3:1000")
                    && reason.starts_with("peer closed the connection"))
        })
    });
}

#[test]
fn stream_transport_skips_oversized_frames_and_counts_them() {
    use simpletun_core::dp::stream::StreamTransport;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev, DpConfig::default()).unwrap();
    let st = Arc::new(StreamTransport::new(100).unwrap());
    let tr = dp.add_transport(st.clone()).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    st.add_connection(a.as_raw_fd(), addr("10.0.0.9:9"))
        .unwrap();
    // A 200-byte frame (above 100), then a control frame split across writes.
    b.write_all(&200u16.to_be_bytes()).unwrap();
    b.write_all(&[0xab; 150]).unwrap();
    b.write_all(&[0xab; 50]).unwrap();
    b.write_all(&[0, 6, 0, 0]).unwrap();
    b.write_all(&[0, 0, 1, 2]).unwrap();
    eventually("control after the oversized frame", || {
        get(dp.totals(), "control_rx") == 1
    });
    assert_eq!(get(dp.totals(), "drop_oversize"), 1);
    assert_eq!(
        dp.take_events(4),
        vec![Event::Control {
            transport: tr,
            from: addr("10.0.0.9:9"),
            payload: vec![0, 0, 0, 0, 1, 2]
        }]
    );
    // Half a frame, then the end: reported with its reason.
    b.write_all(&[0, 40, 1, 2]).unwrap();
    drop(b);
    let mut evs = Vec::new();
    eventually("closed", || {
        evs.extend(dp.take_events(4));
        !evs.is_empty()
    });
    assert_eq!(
        evs,
        vec![Event::Closed {
            transport: tr,
            endpoint: addr("10.0.0.9:9"),
            reason: "peer closed the connection in the middle of a frame".into()
        }]
    );
    assert!(st.connections().is_empty());
}

/// Plaintext stream mode: frames carry the raw packets (simpletun.c's wire format, checked
/// byte for byte on the far end of the socket), in both directions, no SA needed; a frame
/// from a connection no peer uses is counted.
#[test]
fn stream_transport_plaintext_carries_raw_frames() {
    use simpletun_core::dp::stream::StreamTransport;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
    let st = Arc::new(StreamTransport::plaintext(65535).unwrap());
    let tr = dp.add_transport(st.clone()).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let ep = addr("192.0.2.7:7");
    st.add_connection(a.as_raw_fd(), ep).unwrap();
    let p = dp.add_peer(tr, &[pfx("0.0.0.0/0")], Some(ep)).unwrap();
    // Device → wire: [len][packet], nothing else.
    let pkt = ipv4([10, 0, 0, 1], [10, 0, 0, 2], 77);
    dev.inject(&pkt);
    let mut got = vec![0u8; 2 + pkt.len()];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got[..2], &(pkt.len() as u16).to_be_bytes());
    assert_eq!(&got[2..], &pkt[..]);
    // Wire → device, two frames in one write.
    let back = ipv4([10, 0, 0, 2], [10, 0, 0, 1], 78);
    let mut w = Vec::new();
    for _ in 0..2 {
        w.extend_from_slice(&(back.len() as u16).to_be_bytes());
        w.extend_from_slice(&back);
    }
    b.write_all(&w).unwrap();
    assert_eq!(dev.take(T).unwrap(), back);
    assert_eq!(dev.take(T).unwrap(), back);
    eventually("rx counted", || peer_get(&dp, p, "rx_packets") == 2);
    assert_eq!(peer_get(&dp, p, "tx_packets"), 1);
    // A second connection nobody's peer uses: its frames are counted, not delivered.
    let (a2, mut b2) = UnixStream::pair().unwrap();
    st.add_connection(a2.as_raw_fd(), addr("192.0.2.8:8"))
        .unwrap();
    b2.write_all(&w[..2 + back.len()]).unwrap();
    eventually("no_peer", || get(dp.totals(), "drop_no_peer") == 1);
    assert_eq!(dev.take(Duration::from_millis(30)), None);
}

/// Backpressure: a peer that reads slowly slows the device reader down instead of losing
/// packets (nothing counted send_failed), and everything arrives in order.
#[test]
fn stream_transport_backpressure_loses_nothing() {
    use simpletun_core::dp::stream::StreamTransport;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
    let st = Arc::new(StreamTransport::plaintext(65535).unwrap());
    let tr = dp.add_transport(st.clone()).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let ep = addr("192.0.2.7:7");
    st.add_connection(a.as_raw_fd(), ep).unwrap();
    dp.add_peer(tr, &[pfx("0.0.0.0/0")], Some(ep)).unwrap();
    // 12 MiB of packets queued at once: three times the transport's TX_LIMIT.
    let n = 12 * 1024 * 1024 / 8000;
    let pad = vec![0u8; 8000 - 28];
    for i in 0..n {
        let mut p = ipv4([10, 0, 0, 1], [10, 0, 0, 2], i as u64);
        p.extend_from_slice(&pad);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        dev.inject(&p);
    }
    thread::sleep(Duration::from_millis(300));
    // The reader fell behind: the device still holds packets, nothing was dropped.
    assert!(dev.pending_inbound() > 0, "the device reader waits");
    assert_eq!(get(dp.totals(), "drop_send_failed"), 0);
    let mut hdr = [0u8; 2];
    let mut body = vec![0u8; 9000];
    for i in 0..n {
        b.read_exact(&mut hdr).unwrap();
        let len = u16::from_be_bytes(hdr) as usize;
        b.read_exact(&mut body[..len]).unwrap();
        assert_eq!(tag(&body[..len]), i as u64);
    }
    assert_eq!(get(dp.totals(), "drop_send_failed"), 0);
}

/// RFC 8229 mode, byte for byte on the far end of the socket: the side that opened the
/// connection sends `IKETCP` once, every frame's length counts itself, control messages keep
/// their non-ESP marker, ESP packets go as they are (starting with our SPI).
#[test]
fn stream_transport_rfc8229_wire_format() {
    use simpletun_core::dp::stream::StreamTransport;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
    let st = Arc::new(StreamTransport::rfc8229(65535).unwrap());
    let tr = dp.add_transport(st.clone()).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let ep = addr("192.0.2.7:4500");
    st.add_connection_as(a.as_raw_fd(), ep, true).unwrap();
    let p = dp.add_peer(tr, &[pfx("0.0.0.0/0")], Some(ep)).unwrap();
    dp.add_inbound_sa(p, sa(0x2001, 2)).unwrap();
    dp.set_outbound_sa(p, Some(sa(0x1001, 1))).unwrap();
    let mut prefix = [0u8; 6];
    b.read_exact(&mut prefix).unwrap();
    assert_eq!(&prefix, b"IKETCP");
    // A control message: length = 2 + marker + body.
    let mut m = NON_ESP_MARKER.to_vec();
    m.extend_from_slice(&[7; 30]);
    dp.send_control(tr, ep, &m).unwrap();
    let mut hdr = [0u8; 2];
    b.read_exact(&mut hdr).unwrap();
    assert_eq!(u16::from_be_bytes(hdr) as usize, 2 + m.len());
    let mut body = vec![0u8; m.len()];
    b.read_exact(&mut body).unwrap();
    assert_eq!(body, m);
    // An ESP packet: starts with the outbound SPI, decrypts with the peer's SA.
    let pkt = ipv4([10, 0, 0, 1], [10, 0, 0, 2], 42);
    dev.inject(&pkt);
    b.read_exact(&mut hdr).unwrap();
    let n = u16::from_be_bytes(hdr) as usize - 2;
    let mut esp = vec![0u8; n];
    b.read_exact(&mut esp).unwrap();
    assert_eq!(&esp[..4], &0x1001u32.to_be_bytes());
    let mut peer_in = sa(0x1001, 1);
    let d = peer_in.decap_in_place(&mut esp).unwrap();
    assert_eq!(&esp[d.inner], &pkt[..]);
    // The other way: a control message and an ESP packet from the peer (no prefix: we opened).
    let back = ipv4([10, 0, 0, 2], [10, 0, 0, 1], 43);
    let mut peer_out = sa(0x2001, 2);
    let mut buf = vec![0u8; PAYLOAD_OFFSET + back.len() + 64];
    buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + back.len()].copy_from_slice(&back);
    let len = peer_out
        .encap_in_place(&mut buf, back.len(), NH_IPV4)
        .unwrap();
    let mut w = ((m.len() + 2) as u16).to_be_bytes().to_vec();
    w.extend_from_slice(&m);
    w.extend_from_slice(&((len + 2) as u16).to_be_bytes());
    w.extend_from_slice(&buf[..len]);
    b.write_all(&w).unwrap();
    assert_eq!(dev.take(T).unwrap(), back);
    eventually("control", || get(dp.totals(), "control_rx") == 1);
    assert_eq!(
        dp.take_events(4),
        vec![Event::Control {
            transport: tr,
            from: ep,
            payload: m
        }]
    );
}

/// RFC 8229 mode, a connection the peer opened: it must start with `IKETCP` (else closed with
/// the reason), a length below 2 closes it (counted drop_bad_length), an oversized frame is
/// skipped and counted, and nothing panics.
#[test]
fn stream_transport_rfc8229_bad_streams_are_closed_and_counted() {
    use simpletun_core::dp::stream::StreamTransport;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev, DpConfig::default()).unwrap();
    let st = Arc::new(StreamTransport::rfc8229(100).unwrap());
    let tr = dp.add_transport(st.clone()).unwrap();
    let closed = |ep: SocketAddr| {
        let mut evs = Vec::new();
        eventually("closed", || {
            evs.extend(dp.take_events(8));
            evs.iter().any(|e| matches!(e, Event::Closed { .. }))
        });
        evs.into_iter()
            .find_map(|e| match e {
                Event::Closed {
                    transport,
                    endpoint,
                    reason,
                } if transport == tr && endpoint == ep => Some(reason),
                _ => None,
            })
            .expect("closed event of that connection")
    };
    // No prefix: a classic frame.
    let (a, mut b) = UnixStream::pair().unwrap();
    st.add_connection(a.as_raw_fd(), addr("10.0.0.1:1"))
        .unwrap();
    b.write_all(&[0, 6, 0, 0, 0, 0, 1, 2]).unwrap();
    assert!(closed(addr("10.0.0.1:1")).contains("IKETCP"));
    // Prefix split, an oversized frame, a control message, then length 1.
    let (a, mut b) = UnixStream::pair().unwrap();
    st.add_connection(a.as_raw_fd(), addr("10.0.0.2:2"))
        .unwrap();
    b.write_all(b"IKE").unwrap();
    b.write_all(b"TCP").unwrap();
    b.write_all(&202u16.to_be_bytes()).unwrap();
    b.write_all(&[0xab; 200]).unwrap();
    b.write_all(&[0, 8, 0, 0, 0, 0, 1, 2]).unwrap();
    eventually("control", || get(dp.totals(), "control_rx") == 1);
    assert_eq!(get(dp.totals(), "drop_oversize"), 1);
    b.write_all(&[0, 1, 9, 9, 9]).unwrap();
    let why = closed(addr("10.0.0.2:2"));
    assert!(why.contains("length field 1"), "{why}");
    assert_eq!(get(dp.totals(), "drop_bad_length"), 1);
    assert!(st.connections().is_empty());
    // Random streams after a good prefix: every one ends, none panics.
    let mut x: u64 = 12345;
    for k in 0..50u16 {
        let (a, mut b) = UnixStream::pair().unwrap();
        let ep = addr(&format!("10.0.1.{}:{k}", k % 250));
        st.add_connection(a.as_raw_fd(), ep).unwrap();
        let mut junk = b"IKETCP".to_vec();
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push(x as u8);
        }
        b.write_all(&junk).unwrap();
        drop(b);
        let _ = closed(ep);
    }
    assert!(dp.running());
}

/// A burst of datagrams received in one batch, so that runs of one SA's packets have their
/// ICVs computed together before each is judged: every genuine packet reaches the device once
/// and in order, a duplicate counts as a replay, a forged one as an authentication failure,
/// and a second peer's packets interleaved with the first's are unaffected.
#[test]
fn burst_received_in_one_batch_is_judged_packet_by_packet() {
    let (net, server, clients) = star(2);
    let to = addr("192.0.2.1:4500");
    let (from1, from2) = (addr("198.51.100.1:4500"), addr("198.51.100.2:4500"));
    // The clients' outbound SAs (same SPIs and keys), driven by hand.
    let mut tx1 = sa(0x1001, 1);
    let mut tx2 = sa(0x1002, 2);
    let mut burst = Vec::new();
    let mut want = Vec::new();
    let (mut replays, mut forged) = (0u64, 0u64);
    for i in 0..60u64 {
        let p = tx1
            .encap(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], i), None)
            .unwrap();
        match i % 10 {
            3 => {
                burst.push((p.clone(), from1));
                burst.push((p, from1));
                want.push(i);
                replays += 1;
            }
            5 => {
                let mut f = p;
                let l = f.len();
                f[l - 30] ^= 0x01;
                burst.push((f, from1));
                forged += 1;
            }
            7 => {
                let q = tx2
                    .encap(&ipv4([10, 0, 2, 9], [10, 0, 0, 1], 1000 + i), None)
                    .unwrap();
                burst.push((p, from1));
                want.push(i);
                burst.push((q, from2));
                want.push(1000 + i);
            }
            _ => {
                burst.push((p, from1));
                want.push(i);
            }
        }
    }
    server.sock.hold(true);
    for (d, from) in &burst {
        assert!(net.inject(to, *from, d));
    }
    assert_eq!(server.sock.queued(), burst.len());
    server.sock.hold(false);
    let got: Vec<u64> = (0..want.len())
        .map(|_| tag(&server.dev.take(T).expect("a delivered packet")))
        .collect();
    assert_eq!(got, want);
    eventually("drops counted", || {
        get(server.dp.totals(), "drop_replay") == replays
            && get(server.dp.totals(), "drop_auth") == forged
    });
    assert_eq!(server.dev.take(Duration::from_millis(50)), None);
    assert_eq!(
        peer_get(&server.dp, clients[0].2, "rx_packets"),
        60 - forged
    );
    assert_eq!(peer_get(&server.dp, clients[1].2, "rx_packets"), 6);
}

/// The kernel answers during the receive thread's device write (an echo reply, a TCP ACK):
/// the receive thread sends that answer itself. The fake device queues the answer without
/// making itself readable, so the device thread is never woken for it: only the receive
/// thread's send after its writes can deliver it.
#[test]
fn answer_made_during_a_device_write_is_sent_by_the_receive_thread() {
    fn echo(p: &[u8]) -> Option<Vec<u8>> {
        let mut r = p.to_vec();
        r[12..16].copy_from_slice(&p[16..20]);
        r[16..20].copy_from_slice(&p[12..16]);
        r[20..28].copy_from_slice(&(tag(p) + 1000).to_be_bytes());
        Some(r)
    }
    let net = FakeNet::new();
    let mut dev = FakeDevice::new(Kind::Tun).unwrap();
    dev.answer_quietly = Some(echo);
    let dev = Arc::new(dev);
    let sock = net
        .bind(addr("192.0.2.1:4500"), TransportKind::Udp)
        .unwrap();
    let sdp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
    let str_ = sdp.add_transport(sock).unwrap();
    let c = node(&net, "198.51.100.1:4500", Kind::Tun);
    let sp = sdp.add_peer(str_, &[pfx("10.0.1.0/24")], None).unwrap();
    sdp.add_inbound_sa(sp, sa(0x1001, 1)).unwrap();
    sdp.set_outbound_sa(sp, Some(sa(0x2001, 2))).unwrap();
    let cp =
        c.dp.add_peer(c.tr, &[pfx("0.0.0.0/0")], Some(addr("192.0.2.1:4500")))
            .unwrap();
    c.dp.add_inbound_sa(cp, sa(0x2001, 2)).unwrap();
    c.dp.set_outbound_sa(cp, Some(sa(0x1001, 1))).unwrap();
    // The server's device thread is running (its state exists) once it has handled a packet:
    // one for the client before its endpoint is known.
    dev.inject(&ipv4([10, 0, 0, 1], [10, 0, 1, 5], 0));
    eventually("the device thread's first packet", || {
        get(sdp.totals(), "drop_no_endpoint") == 1
    });
    for k in 1..=20u64 {
        c.dev.inject(&ipv4([10, 0, 1, 5], [10, 0, 0, 1], k));
        let req = dev.take(T).expect("request at the server");
        assert_eq!(tag(&req), k);
        let reply = c.dev.take(T).expect("the answer back at the client");
        assert_eq!(tag(&reply), 1000 + k);
        assert_eq!(&reply[12..16], &[10, 0, 0, 1]);
    }
    assert_eq!(dev.pending_inbound(), 0);
    // Counted just after the send, so possibly after the client has the last answer.
    eventually("20 packets counted each way", || {
        get(sdp.totals(), "tx_packets") == 20 && get(sdp.totals(), "rx_packets") == 20
    });
}
