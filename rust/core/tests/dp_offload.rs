//! Data plane v2 with TUN offloads, no root: devices that carry `virtio_net_hdr`s
//! ([`FakeDevice::with_vnet`]) on both ends of an in-memory network. A TSO super-packet read
//! from the device leaves as MTU-sized ESP packets and arrives as segments with valid
//! checksums; segments received in one batch are written as one super-packet with a correct
//! vnet header; malformed vnet headers are counted drops. Packets and checksums are built and
//! checked here independently of `offload`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::dp::fake::{FakeNet, FakeSocket};
use simpletun_core::dp::{DataPlane, DpConfig, FakeDevice, Prefix, TransportKind};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

const T: Duration = Duration::from_secs(5);
const HZ: usize = 10;
const MSS: usize = 1400;

fn sa(spi: u32, seed: u8) -> SecurityAssociation {
    SecurityAssociation::new(spi, &[seed; 16], &[seed ^ 0x5a; 32], 4096, false).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn counter(entries: Vec<(String, u64)>, name: &str) -> u64 {
    entries
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

/// RFC 1071 over the concatenation of `parts`, 16 bits at a time.
fn csum(parts: &[&[u8]]) -> u16 {
    let b: Vec<u8> = parts.concat();
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += (c[0] as u32) << 8 | *c.get(1).unwrap_or(&0) as u32;
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn pseudo(ip: &[u8], tlen: usize) -> Vec<u8> {
    [&ip[12..20], &[0, 6][..], &(tlen as u16).to_be_bytes()[..]].concat()
}

/// An IPv4 TCP segment 10.0.0.1:40000 → 10.0.0.2:5201 with sequence number `seq`, flags
/// ACK (| `extra`), valid IP and TCP checksums.
fn tcp4(seq: u32, data: &[u8], extra: u8) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((40 + data.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&77u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = csum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&9u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10 | extra;
    p[34..36].copy_from_slice(&512u16.to_be_bytes());
    p.extend_from_slice(data);
    let c = csum(&[&pseudo(&p, p.len() - 20), &p[20..]]);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn checksums_ok(p: &[u8]) -> bool {
    csum(&[&p[..20]]) == 0 && csum(&[&pseudo(p, p.len() - 20), &p[20..]]) == 0
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// What the kernel hands over for TSO: a vnet header (NEEDS_CSUM, TCPV4, gso_size) and one
/// IPv4 TCP packet with all of `payload`, its checksum field holding the pseudo-header sum.
fn super_packet(seq: u32, payload: &[u8], gso: u16) -> Vec<u8> {
    let mut p = tcp4(seq, payload, 0x08);
    let ps = !csum(&[&pseudo(&p, p.len() - 20)]);
    p[36..38].copy_from_slice(&ps.to_be_bytes());
    let mut h = vec![1u8, 1];
    h.extend_from_slice(&40u16.to_le_bytes());
    h.extend_from_slice(&gso.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(&p);
    h
}

struct Node {
    dev: Arc<FakeDevice>,
    sock: Arc<FakeSocket>,
    dp: DataPlane,
    peer: u32,
}

/// Two nodes, A (10.0.0.1) and B (10.0.0.2), each with a vnet device if asked.
fn pair(vnet_a: bool, vnet_b: bool) -> (Arc<FakeNet>, Node, Node) {
    let net = FakeNet::new();
    let mk = |at: &str, to: &str, vnet: bool, out: u32, inb: u32| {
        let dev = Arc::new(if vnet {
            FakeDevice::with_vnet(HZ).unwrap()
        } else {
            FakeDevice::new(Kind::Tun).unwrap()
        });
        let sock = net.bind(addr(at), TransportKind::Udp).unwrap();
        let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
        let tr = dp.add_transport(sock.clone()).unwrap();
        let peer = dp
            .add_peer(tr, &[pfx("10.0.0.0/24")], Some(addr(to)))
            .unwrap();
        dp.set_outbound_sa(peer, Some(sa(out, out as u8))).unwrap();
        dp.add_inbound_sa(peer, sa(inb, inb as u8)).unwrap();
        Node {
            dev,
            sock,
            dp,
            peer,
        }
    };
    let a = mk("192.0.2.1:4500", "192.0.2.2:4500", vnet_a, 0x1100, 0x2200);
    let b = mk("192.0.2.2:4500", "192.0.2.1:4500", vnet_b, 0x2200, 0x1100);
    (net, a, b)
}

/// A 10-segment TSO super-packet read from A's device leaves as 10 ESP packets (one device
/// read, a super-packet) and B, a plain device, receives 10 segments with valid checksums,
/// the payload in order, PSH on the last only.
#[test]
fn tso_super_packet_is_split_before_esp() {
    let (_net, a, b) = pair(true, false);
    let d = data(10 * MSS);
    a.dev.inject(&super_packet(1000, &d, MSS as u16));
    let mut got = Vec::new();
    for i in 0..10 {
        let s = b.dev.take(T).expect("segment");
        assert!(checksums_ok(&s), "segment {i} checksums");
        assert_eq!(s.len(), 40 + MSS);
        let seq = u32::from_be_bytes(s[24..28].try_into().unwrap());
        assert_eq!(seq, 1000 + (i * MSS) as u32);
        assert_eq!(s[33] & 0x08 != 0, i == 9, "PSH on segment {i}");
        got.extend_from_slice(&s[40..]);
    }
    assert_eq!(got, d);
    // Counters follow the sends: wait for them rather than race the receiver.
    eventually("A's wire counter", || {
        counter(a.dp.io().entries(), "wire_tx_packets") == 10
    });
    let io = a.dp.io().entries();
    assert_eq!(counter(io.clone(), "dev_reads"), 1);
    assert_eq!(counter(io.clone(), "dev_read_super"), 1);
    assert_eq!(counter(io.clone(), "dev_read_bytes"), (40 + d.len()) as u64);
    assert_eq!(counter(io, "wire_tx_packets"), 10);
    assert_eq!(counter(a.dp.peer_stats(a.peer).unwrap(), "tx_packets"), 10);
}

/// Ten segments of one flow received in one batch are written to B's vnet device as one
/// super-packet: a vnet header asking for TSO at the segments' size with the checksum left
/// to the kernel, and the ten payloads in order. Non-TCP packets pass with an empty header.
#[test]
fn segments_of_one_batch_are_coalesced_for_the_device() {
    let (_net, a, b) = pair(false, true);
    b.sock.hold(true);
    let d = data(10 * MSS);
    for i in 0..10 {
        let extra = if i == 9 { 0x08 } else { 0 };
        a.dev.inject(&tcp4(
            5000 + (i * MSS) as u32,
            &d[i * MSS..(i + 1) * MSS],
            extra,
        ));
    }
    let mut udp = tcp4(1, b"not tcp", 0);
    udp[9] = 17;
    a.dev.inject(&udp);
    eventually("11 datagrams at B", || b.sock.queued() == 11);
    b.sock.hold(false);
    let m = b.dev.take(T).expect("super-packet");
    let h = &m[..HZ];
    assert_eq!(h[0], 1, "NEEDS_CSUM");
    assert_eq!(h[1], 1, "GSO_TCPV4");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]) as usize, MSS, "gso_size");
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 20, "csum_start");
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "csum_offset");
    let p = &m[HZ..];
    assert_eq!(p.len(), 40 + d.len());
    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
    assert_eq!(csum(&[&p[..20]]), 0, "IPv4 header checksum");
    assert_eq!(u32::from_be_bytes(p[24..28].try_into().unwrap()), 5000);
    assert_eq!(p[33], 0x18, "ACK|PSH");
    // The TCP checksum field holds the pseudo-header sum for the kernel to complete.
    let ps = !csum(&[&pseudo(p, p.len() - 20)]);
    assert_eq!(u16::from_be_bytes([p[36], p[37]]), ps);
    assert_eq!(&p[40..], &d[..]);
    let other = b.dev.take(T).expect("the UDP packet");
    assert_eq!(&other[..HZ], &[0u8; HZ]);
    assert_eq!(&other[HZ..], &udp[..]);
    // Counters follow the device writes: wait for them rather than race the writer.
    eventually("B's write counters", || {
        counter(b.dp.io().entries(), "dev_writes") == 2
    });
    let io = b.dp.io().entries();
    assert_eq!(counter(io.clone(), "dev_writes"), 2);
    assert_eq!(counter(io.clone(), "dev_write_super"), 1);
    assert_eq!(counter(io, "wire_rx_packets"), 11);
    let st = b.dp.peer_stats(b.peer).unwrap();
    assert_eq!(counter(st.clone(), "rx_packets"), 11);
    assert_eq!(
        counter(st, "rx_bytes"),
        (10 * (40 + MSS) + udp.len()) as u64
    );
}

/// Through vnet devices on both ends: a 40-segment super-packet and a plain one survive the
/// round trip byte for byte (B's writes resegment to the original payload).
#[test]
fn super_packets_end_to_end() {
    let (_net, a, b) = pair(true, true);
    b.sock.hold(true);
    let d = data(40 * 1000 + 123);
    a.dev.inject(&super_packet(7, &d, 1000));
    eventually("41 datagrams at B", || b.sock.queued() == 41);
    b.sock.hold(false);
    let m = b.dev.take(T).expect("super-packet");
    assert_eq!(u16::from_le_bytes([m[4], m[5]]), 1000, "gso_size");
    assert_eq!(&m[HZ + 40..], &d[..]);
    assert!(b.dev.take(Duration::from_millis(50)).is_none());
}

/// Malformed vnet reads are counted as `bad_vnet` and nothing is sent for them; a good packet
/// after them goes through.
#[test]
fn malformed_vnet_headers_are_counted() {
    let (_net, a, b) = pair(true, false);
    let good = super_packet(1, &data(3 * MSS), MSS as u16);
    let mut bad = Vec::new();
    bad.push(good[..5].to_vec()); // shorter than the header
    let mut t = good.clone();
    t[1] = 3; // UFO
    bad.push(t);
    let mut t = good.clone();
    t[4..6].copy_from_slice(&0u16.to_le_bytes()); // gso_size 0
    bad.push(t);
    let mut t = good.clone();
    t[6..8].copy_from_slice(&60000u16.to_le_bytes()); // csum_start outside
    bad.push(t);
    let mut t = good.clone();
    t[HZ + 32] = 0xf0; // TCP header longer than the packet's headers
    t.truncate(HZ + 50);
    bad.push(t);
    for p in &bad {
        a.dev.inject(p);
    }
    a.dev.inject(&good);
    for _ in 0..3 {
        assert!(checksums_ok(
            &b.dev.take(T).expect("the good packet's segments")
        ));
    }
    let bad_n = bad.len() as u64;
    eventually("A's send counters", || {
        a.dp.totals().get("tx_packets") == Some(3)
    });
    assert_eq!(a.dp.totals().get("drop_bad_vnet"), Some(bad_n));
    assert_eq!(a.dp.totals().get("tx_packets"), Some(3));
}

/// Two vnet-header queues of one device (a multi-queue TUN with offloads) share A's SA: a
/// TSO super-packet read on each queue leaves as 10 ESP packets each, 20 distinct sequence
/// numbers, and B receives all 20 segments with valid checksums, each super-packet's payload
/// in order.
#[test]
fn super_packets_on_two_vnet_queues() {
    let net = FakeNet::new();
    let qa: Vec<Arc<FakeDevice>> = (0..2)
        .map(|_| Arc::new(FakeDevice::with_vnet(HZ).unwrap()))
        .collect();
    let queues: Vec<Arc<dyn simpletun_core::dp::Device>> = qa
        .iter()
        .map(|q| q.clone() as Arc<dyn simpletun_core::dp::Device>)
        .collect();
    let a = DataPlane::start_queues(queues, DpConfig::default()).unwrap();
    let sock_a = net
        .bind(addr("192.0.2.1:4500"), TransportKind::Udp)
        .unwrap();
    sock_a.record();
    let ta = a.add_transport(sock_a.clone()).unwrap();
    let pa = a
        .add_peer(ta, &[pfx("10.0.0.0/24")], Some(addr("192.0.2.2:4500")))
        .unwrap();
    a.set_outbound_sa(pa, Some(sa(0x1100, 1))).unwrap();
    let b_dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let b = DataPlane::start(b_dev.clone(), DpConfig::default()).unwrap();
    let sock_b = net
        .bind(addr("192.0.2.2:4500"), TransportKind::Udp)
        .unwrap();
    let tb = b.add_transport(sock_b).unwrap();
    let pb = b
        .add_peer(tb, &[pfx("10.0.0.0/24")], Some(addr("192.0.2.1:4500")))
        .unwrap();
    b.add_inbound_sa(pb, sa(0x1100, 1)).unwrap();
    let d = data(10 * MSS);
    // Queue q's super-packet starts at TCP sequence number 1_000_000 * (q + 1).
    for (q, dev) in qa.iter().enumerate() {
        dev.inject(&super_packet(1_000_000 * (q as u32 + 1), &d, MSS as u16));
    }
    let mut by_q: [Vec<u8>; 2] = Default::default();
    for i in 0..20 {
        let s = b_dev.take(T).unwrap_or_else(|| panic!("segment {i}"));
        assert!(checksums_ok(&s), "segment {i} checksums");
        let seq = u32::from_be_bytes(s[24..28].try_into().unwrap());
        by_q[(seq / 1_000_000 - 1) as usize].extend_from_slice(&s[40..]);
    }
    assert_eq!(by_q[0], d);
    assert_eq!(by_q[1], d);
    assert_eq!(a.queue_reads(), vec![1, 1]);
    assert_eq!(counter(a.io().entries(), "dev_read_super"), 2);
    assert_eq!(counter(a.peer_stats(pa).unwrap(), "tx_packets"), 20);
    let log = sock_a.sent_log.lock().unwrap();
    let mut seqs: Vec<u32> = log
        .as_ref()
        .unwrap()
        .iter()
        .map(|(p, _)| u32::from_be_bytes(p[4..8].try_into().unwrap()))
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=20).collect::<Vec<u32>>());
}
