//! A multi-queue device, no root: two fake device queues feed one data plane (one device
//! thread each) whose peer's outbound SA both threads share.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::dp::fake::{FakeNet, FakeSocket};
use simpletun_core::dp::{DataPlane, Device, DpConfig, Event, FakeDevice, Prefix, TransportKind};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

const T: Duration = Duration::from_secs(10);

fn sa(spi: u32, seed: u8) -> SecurityAssociation {
    SecurityAssociation::new(spi, &[seed; 16], &[seed ^ 0x5a; 32], 4096, false).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

/// An IPv4 packet of flow `flow` (its source port) carrying `(flow, n)`.
fn pkt(src: [u8; 4], dst: [u8; 4], flow: u16, n: u32) -> Vec<u8> {
    let len = 100 + (n as usize * 13) % 1300;
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&flow.to_be_bytes());
    p[28..32].copy_from_slice(&n.to_be_bytes());
    p
}

fn id(p: &[u8]) -> (u16, u32) {
    (
        u16::from_be_bytes([p[20], p[21]]),
        u32::from_be_bytes(p[28..32].try_into().unwrap()),
    )
}

fn get(dp: &DataPlane, name: &str) -> u64 {
    dp.totals().get(name).unwrap()
}

fn io(dp: &DataPlane, name: &str) -> u64 {
    dp.io()
        .entries()
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap()
        .1
}

struct Pair {
    qa: Vec<Arc<FakeDevice>>,
    a: DataPlane,
    sock_a: Arc<FakeSocket>,
    b_dev: Arc<FakeDevice>,
    b: DataPlane,
    _net: Arc<FakeNet>,
}

/// A (two queues) ⇄ B (one queue), 10.0.1.0/24 behind A, 10.0.2.0/24 behind B.
fn pair(config: DpConfig) -> Pair {
    let net = FakeNet::new();
    let qa: Vec<Arc<FakeDevice>> = (0..2)
        .map(|_| Arc::new(FakeDevice::new(Kind::Tun).unwrap()))
        .collect();
    let queues: Vec<Arc<dyn Device>> = qa.iter().map(|q| q.clone() as Arc<dyn Device>).collect();
    let a = DataPlane::start_queues(queues, config).unwrap();
    let sock_a = net
        .bind(addr("192.0.2.1:4500"), TransportKind::Udp)
        .unwrap();
    sock_a.record();
    let ta = a.add_transport(sock_a.clone()).unwrap();
    let b_dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let b = DataPlane::start(b_dev.clone(), DpConfig::default()).unwrap();
    let sock_b = net
        .bind(addr("192.0.2.2:4500"), TransportKind::Udp)
        .unwrap();
    let tb = b.add_transport(sock_b).unwrap();
    let pa = a
        .add_peer(ta, &[pfx("10.0.2.0/24")], Some(addr("192.0.2.2:4500")))
        .unwrap();
    let pb = b
        .add_peer(tb, &[pfx("10.0.1.0/24")], Some(addr("192.0.2.1:4500")))
        .unwrap();
    a.set_outbound_sa(pa, Some(sa(0x1111, 1))).unwrap();
    b.add_inbound_sa(pb, sa(0x1111, 1)).unwrap();
    b.set_outbound_sa(pb, Some(sa(0x2222, 2))).unwrap();
    a.add_inbound_sa(pa, sa(0x2222, 2)).unwrap();
    Pair {
        qa,
        a,
        sock_a,
        b_dev,
        b,
        _net: net,
    }
}

/// Flows 0..4 on queue 0, 4..8 on queue 1 (as the kernel's flow hash keeps a flow on one
/// queue), injected from two threads at once; every packet arrives at B once, each flow in
/// order; A used every sequence number once; counters are exact.
#[test]
fn two_queues_share_one_sa_nothing_lost() {
    let config = DpConfig {
        soft_seq: 5000,
        ..DpConfig::default()
    };
    let p = pair(config);
    const PER_FLOW: u32 = 2500;
    const FLOWS: u16 = 8;
    let total = PER_FLOW as u64 * FLOWS as u64;
    let mut got: Vec<(u16, u32)> = Vec::with_capacity(total as usize);
    let mut bytes = 0u64;
    thread::scope(|s| {
        for (q, dev) in p.qa.iter().enumerate() {
            s.spawn(move || {
                for n in 0..PER_FLOW {
                    for f in 0..FLOWS / 2 {
                        while dev.pending_inbound() > 256 {
                            thread::yield_now();
                        }
                        let flow = q as u16 * (FLOWS / 2) + f;
                        dev.inject(&pkt([10, 0, 1, 1], [10, 0, 2, 1], flow, n));
                    }
                }
            });
        }
        let end = Instant::now() + T;
        while (got.len() as u64) < total {
            assert!(
                Instant::now() < end,
                "{} of {total} packets arrived",
                got.len()
            );
            if let Some(pk) = p.b_dev.take(Duration::from_millis(100)) {
                bytes += pk.len() as u64;
                got.push(id(&pk));
            }
        }
    });
    assert_eq!(p.b_dev.take(Duration::from_millis(50)), None, "a duplicate");
    // Each flow complete and in order.
    let mut next: HashMap<u16, u32> = HashMap::new();
    for (flow, n) in &got {
        let want = next.entry(*flow).or_insert(0);
        assert_eq!(n, want, "flow {flow} out of order");
        *want += 1;
    }
    assert!(next.values().all(|&n| n == PER_FLOW));
    // Every sequence number once, 1..=total.
    let log = p.sock_a.sent_log.lock().unwrap();
    let seqs: HashSet<u32> = log
        .as_ref()
        .unwrap()
        .iter()
        .map(|(d, _)| u32::from_be_bytes(d[4..8].try_into().unwrap()))
        .collect();
    assert_eq!(log.as_ref().unwrap().len() as u64, total);
    assert_eq!(seqs, (1..=total as u32).collect::<HashSet<_>>());
    drop(log);
    // Counters: both queues read, the sum is exact; A sent, B accepted everything.
    let qr = p.a.queue_reads();
    assert_eq!(qr, vec![total / 2, total / 2]);
    assert_eq!(io(&p.a, "dev_reads"), total);
    assert_eq!(get(&p.a, "tx_packets"), total);
    assert_eq!(get(&p.a, "tx_bytes"), bytes);
    assert_eq!(get(&p.b, "rx_packets"), total);
    assert_eq!(get(&p.b, "rx_bytes"), bytes);
    assert_eq!(get(&p.b, "drop_replay"), 0);
    let out = p.a.sas().into_iter().find(|s| !s.inbound).unwrap();
    assert_eq!(out.tx_seq, total);
    assert_eq!(out.stats.encap_packets, total);
    assert_eq!(out.stats.encap_bytes, bytes);
    // The soft limit fired once, past 5000.
    let limits: Vec<Event> =
        p.a.take_events(100)
            .into_iter()
            .filter(|e| matches!(e, Event::SaLimit { .. }))
            .collect();
    assert_eq!(limits.len(), 1, "{limits:?}");
    let Event::SaLimit { seq, spi, .. } = limits[0] else {
        unreachable!()
    };
    assert_eq!(spi, 0x1111);
    assert!((5000..5000 + 64).contains(&seq), "{seq}");

    // B → A: each flow is written to one queue of A's device, chosen by its flow hash (the
    // kernel then reads the flow's replies from that queue); eight flows use both queues.
    for n in 0..4 {
        for flow in 100..108 {
            p.b_dev.inject(&pkt([10, 0, 2, 1], [10, 0, 1, 1], flow, n));
        }
    }
    let mut on: HashMap<u16, HashSet<usize>> = HashMap::new();
    let mut per_queue = [0usize; 2];
    for _ in 0..32 {
        let end = Instant::now() + T;
        'found: loop {
            assert!(Instant::now() < end, "a packet lost on the way to A");
            for (q, dev) in p.qa.iter().enumerate() {
                if let Some(pk) = dev.take(Duration::from_millis(5)) {
                    on.entry(id(&pk).0).or_default().insert(q);
                    per_queue[q] += 1;
                    break 'found;
                }
            }
        }
    }
    assert_eq!(on.len(), 8);
    assert!(
        on.values().all(|qs| qs.len() == 1),
        "a flow on two queues: {on:?}"
    );
    assert!(per_queue.iter().all(|&n| n > 0), "{per_queue:?}");
    assert_eq!(get(&p.a, "rx_packets"), 32);
}

#[test]
fn queues_must_match() {
    let tun: Arc<dyn Device> = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let tap: Arc<dyn Device> = Arc::new(FakeDevice::new(Kind::Tap).unwrap());
    let vnet: Arc<dyn Device> = Arc::new(FakeDevice::with_vnet(10).unwrap());
    for qs in [vec![tun.clone(), tap], vec![tun.clone(), vnet], vec![]] {
        let e = DataPlane::start_queues(qs, DpConfig::default())
            .err()
            .expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    }
    let one = DataPlane::start_queues(vec![tun], DpConfig::default()).unwrap();
    assert_eq!(one.queue_reads(), vec![0]);
}
