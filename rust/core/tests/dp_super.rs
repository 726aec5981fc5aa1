//! The stream transport's super-packet mode, no root: two data planes on an in-memory stream
//! network, both announcing super-packets (`set_peer_super`). A TCP TSO super-packet read from
//! a vnet-header device leaves as ONE ESP packet (Next Header 253, a 4-byte prefix), is cut at
//! a segment boundary when the 2-byte frame cannot hold it, and is written whole to the
//! receiving vnet device (or split there on a device without vnet headers). A prefix or packet
//! the receiver refuses is counted under its `drop_super_*` reason. Packets and checksums are
//! built and checked here independently of `offload`, except the segment-by-segment comparison
//! of the round trip, which uses `offload::split` on both sides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::dp::fake::{FakeNet, FakeSocket};
use simpletun_core::dp::{DataPlane, DpConfig, FakeDevice, Prefix, TransportKind};
use simpletun_core::esp::{encap_len, NH_SUPER, PAYLOAD_OFFSET};
use simpletun_core::offload::{self, VnetHdr};
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

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn get(entries: Vec<(String, u64)>, name: &str) -> u64 {
    entries
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

/// RFC 1071 over the concatenation of `parts`.
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

/// IPv4 TCP 10.0.0.1:40000 → 10.0.0.2:5201, sequence `seq`, ACK|`extra`, valid checksums.
fn tcp4(src: [u8; 4], seq: u32, data: &[u8], extra: u8) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((40 + data.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&77u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
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

/// The IPv4 TCP super-packet the kernel hands over for TSO (checksum field = pseudo sum).
fn tso_ip(seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = tcp4([10, 0, 0, 1], seq, payload, 0x08);
    let ps = !csum(&[&pseudo(&p, p.len() - 20)]);
    p[36..38].copy_from_slice(&ps.to_be_bytes());
    p
}

/// A TUN read: vnet header (NEEDS_CSUM, TCPV4, gso_size) + [`tso_ip`].
fn tso_read(seq: u32, payload: &[u8], gso: u16) -> Vec<u8> {
    let mut h = vec![1u8, 1];
    h.extend_from_slice(&40u16.to_le_bytes());
    h.extend_from_slice(&gso.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(&tso_ip(seq, payload));
    h
}

/// The segments the kernel would make of a vnet write (or TUN read) `buf`.
fn segments(buf: &[u8]) -> Vec<Vec<u8>> {
    let h = VnetHdr::parse(buf, HZ).unwrap();
    let mut outs = vec![vec![0u8; 65536]; 128];
    let mut lens = vec![0usize; 128];
    let n = offload::split(&h, &buf[HZ..], &mut outs, 0, &mut lens).unwrap();
    (0..n).map(|i| outs[i][..lens[i]].to_vec()).collect()
}

struct Node {
    dev: Arc<FakeDevice>,
    sock: Arc<FakeSocket>,
    dp: DataPlane,
    peer: u32,
}

/// A (10.0.0.1) and B (10.0.0.2) on a stream transport; `sup`: both ends announced.
fn pair(vnet_b: bool, sup: bool) -> (Arc<FakeNet>, Node, Node) {
    let net = FakeNet::new();
    let mk = |at: &str, to: &str, vnet: bool, out: u32, inb: u32| {
        let dev = Arc::new(if vnet {
            FakeDevice::with_vnet(HZ).unwrap()
        } else {
            FakeDevice::new(Kind::Tun).unwrap()
        });
        let sock = net.bind(addr(at), TransportKind::Stream).unwrap();
        let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
        let tr = dp.add_transport(sock.clone()).unwrap();
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        let peer = dp.add_peer(tr, &[all], Some(addr(to))).unwrap();
        dp.set_outbound_sa(peer, Some(sa(out, out as u8))).unwrap();
        dp.add_inbound_sa(peer, sa(inb, inb as u8)).unwrap();
        dp.set_peer_super(peer, sup).unwrap();
        Node {
            dev,
            sock,
            dp,
            peer,
        }
    };
    let a = mk("192.0.2.1:5000", "192.0.2.2:5000", true, 0x1100, 0x2200);
    let b = mk("192.0.2.2:5000", "192.0.2.1:5000", vnet_b, 0x2200, 0x1100);
    (net, a, b)
}

/// A 20-segment super-packet crosses as one ESP packet (Next Header 253, larger than the
/// MTU), and B writes it whole: a GSO vnet header at the original gso_size, the IP packet as
/// sent (checksum field = pseudo-header sum), the same segments as A's read. Counters count
/// segments; the super-packet counters count one each way.
#[test]
fn one_esp_packet_per_super_packet() {
    let (_net, a, b) = pair(true, true);
    a.sock.record();
    let d = data(20 * MSS);
    let read = tso_read(1000, &d, MSS as u16);
    a.dev.inject(&read);
    let m = b.dev.take(T).expect("super-packet");
    assert!(b.dev.take(Duration::from_millis(50)).is_none(), "one write");
    let h = &m[..HZ];
    assert_eq!(h[0], 1, "NEEDS_CSUM");
    assert_eq!(h[1], 1, "GSO_TCPV4");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]) as usize, MSS, "gso_size");
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 20, "csum_start");
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "csum_offset");
    assert_eq!(&m[HZ..], &read[HZ..], "the IP packet as read on A");
    assert_eq!(csum(&[&m[HZ..HZ + 20]]), 0, "IPv4 header checksum");
    assert_eq!(segments(&m), segments(&read), "byte-exact segments");
    let log = a.sock.sent_log.lock().unwrap().clone().unwrap();
    assert_eq!(log.len(), 1, "one ESP packet");
    assert_eq!(log[0].0.len(), encap_len(4 + 40 + d.len()));
    eventually("B's counters", || {
        get(b.dp.io().entries(), "dev_writes") == 1
    });
    let seg_bytes = (20 * (40 + MSS)) as u64;
    let (ai, bi) = (a.dp.io().entries(), b.dp.io().entries());
    assert_eq!(get(ai.clone(), "wire_tx_packets"), 1);
    assert_eq!(get(ai.clone(), "wire_tx_super"), 1);
    assert_eq!(get(ai, "dev_read_super"), 1);
    assert_eq!(get(bi.clone(), "wire_rx_super"), 1);
    assert_eq!(get(bi.clone(), "dev_write_super"), 1);
    assert_eq!(get(bi, "dev_write_bytes"), (40 + d.len()) as u64);
    let (sa_, sb) = (
        a.dp.peer_stats(a.peer).unwrap(),
        b.dp.peer_stats(b.peer).unwrap(),
    );
    assert_eq!(get(sa_.clone(), "tx_packets"), 20);
    assert_eq!(get(sa_, "tx_bytes"), seg_bytes);
    assert_eq!(get(sb.clone(), "rx_packets"), 20);
    assert_eq!(get(sb, "rx_bytes"), seg_bytes);
    assert_eq!(a.dp.totals().get("tx_packets"), Some(20));
}

/// A super-packet whose ESP packet would exceed the 65535-byte frame is cut at a segment
/// boundary: 47 segments leave as two ESP packets (46 segments, then 1), B writes a GSO
/// super-packet and a single segment, and together they are A's segments byte for byte.
#[test]
fn too_large_for_a_frame_is_cut_at_a_segment_boundary() {
    let (_net, a, b) = pair(true, true);
    a.sock.record();
    let d = data(65535 - 40);
    let read = tso_read(77, &d, MSS as u16);
    a.dev.inject(&read);
    let m1 = b.dev.take(T).expect("first piece");
    let m2 = b.dev.take(T).expect("second piece");
    let log = a.sock.sent_log.lock().unwrap().clone().unwrap();
    assert_eq!(log.len(), 2, "two ESP packets");
    assert!(log.iter().all(|(p, _)| p.len() <= 65535));
    assert_eq!(m1.len() - HZ, 40 + 46 * MSS, "46 segments in the first");
    assert_eq!(m1[1], 1, "GSO_TCPV4");
    assert_eq!(m1[HZ + 33], 0x10, "no PSH before the last piece");
    // The last piece is one segment: plain, checksum left to the kernel.
    assert_eq!(m2[0], 1, "NEEDS_CSUM");
    assert_eq!(m2[1], 0, "GSO_NONE");
    assert_eq!(m2[HZ + 33], 0x18, "PSH on the last");
    let seq2 = u32::from_be_bytes(m2[HZ + 24..HZ + 28].try_into().unwrap());
    assert_eq!(seq2, 77 + (46 * MSS) as u32);
    let mut got = segments(&m1);
    // Complete the single segment's checksum as the kernel would.
    let mut last = m2[HZ..].to_vec();
    offload::complete_checksum(&mut last, 20, 16).unwrap();
    assert!(checksums_ok(&last));
    got.push(last);
    assert_eq!(got, segments(&read), "byte-exact segments");
    eventually("B's counters", || {
        get(b.dp.peer_stats(b.peer).unwrap(), "rx_packets") == 47
    });
    assert_eq!(get(a.dp.io().entries(), "wire_tx_super"), 2);
}

/// A receiver without vnet headers splits a super-packet received whole into segments with
/// full checksums; one that did not announce still accepts it (only sending needs the flag).
#[test]
fn receiver_without_vnet_header_writes_segments() {
    let (_net, a, b) = pair(false, true);
    b.dp.set_peer_super(b.peer, false).unwrap();
    let d = data(5 * MSS + 7);
    a.dev.inject(&tso_read(5, &d, MSS as u16));
    let mut got = Vec::new();
    for i in 0..6 {
        let s = b.dev.take(T).expect("segment");
        assert!(checksums_ok(&s), "segment {i} checksums");
        got.extend_from_slice(&s[40..]);
    }
    assert_eq!(got, d);
    assert_eq!(get(a.dp.io().entries(), "wire_tx_super"), 1);
}

/// Without the flag (one end did not announce) super-packets are split as today.
#[test]
fn not_announced_means_segments() {
    let (_net, a, b) = pair(true, false);
    let d = data(4 * MSS);
    a.dev.inject(&tso_read(5, &d, MSS as u16));
    let m = b.dev.take(T).expect("coalesced or segment");
    assert!(m.len() > HZ);
    eventually("A's sends", || {
        get(a.dp.io().entries(), "wire_tx_packets") == 4
    });
    assert_eq!(get(a.dp.io().entries(), "wire_tx_super"), 0);
}

/// The flag is refused on a datagram transport.
#[test]
fn super_only_on_stream_transports() {
    let net = FakeNet::new();
    let dev = Arc::new(FakeDevice::with_vnet(HZ).unwrap());
    let dp = DataPlane::start(dev, DpConfig::default()).unwrap();
    let udp = net
        .bind(addr("192.0.2.9:4500"), TransportKind::Udp)
        .unwrap();
    let tr = dp.add_transport(udp).unwrap();
    let p = dp.add_peer(tr, &[], None).unwrap();
    let e = dp.set_peer_super(p, true).unwrap_err();
    assert!(e.0.contains("stream"), "{e}");
    dp.set_peer_super(p, false).unwrap();
}

/// Every refusal of a prefix or packet received whole is counted under its reason and writes
/// nothing; the good one after them is written.
#[test]
fn prefix_validation_table() {
    let from = addr("192.0.2.1:5000");
    let dev = Arc::new(FakeDevice::with_vnet(HZ).unwrap());
    let dp = DataPlane::without_threads(dev.clone(), DpConfig::default()).unwrap();
    let net = FakeNet::new();
    let s = net
        .bind(addr("192.0.2.2:5000"), TransportKind::Stream)
        .unwrap();
    let tr = dp.add_transport_without_thread(s);
    let allowed: Prefix = "10.0.0.0/24".parse().unwrap();
    let peer = dp.add_peer(tr, &[allowed], Some(from)).unwrap();
    dp.add_inbound_sa(peer, sa(0x1100, 0x11)).unwrap();
    let mut tx = sa(0x1100, 0x11);
    let good_ip = tso_ip(1, &data(3 * MSS));
    let with = |prefix: [u8; 4], ip: &[u8]| -> Vec<u8> { [&prefix[..], ip].concat() };
    let gs = (MSS as u16).to_be_bytes();
    let good = with([1, 0, gs[0], gs[1]], &good_ip);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("super_short_prefix", vec![1, 0]),
        ("super_bad_gso_type", with([1, 1, gs[0], gs[1]], &good_ip)), // flags byte
        ("super_bad_gso_type", with([5, 0, gs[0], gs[1]], &good_ip)), // USO
        ("super_bad_gso_type", with([3, 0, gs[0], gs[1]], &good_ip)), // UFO
        ("super_bad_gso_type", with([0, 0, gs[0], gs[1]], &good_ip)), // none
        ("super_bad_ip", with([4, 0, gs[0], gs[1]], &good_ip)),       // v6 type, v4 packet
    ];
    let mut lie = good_ip.clone();
    lie[2..4].copy_from_slice(&((good_ip.len() + 100) as u16).to_be_bytes());
    cases.push(("super_bad_ip", with([1, 0, gs[0], gs[1]], &lie))); // length lies (longer)
    let mut lie = good_ip.clone();
    lie[2..4].copy_from_slice(&((good_ip.len() - 100) as u16).to_be_bytes());
    cases.push(("super_bad_ip", with([1, 0, gs[0], gs[1]], &lie))); // length lies (shorter)
    let mut frag = good_ip.clone();
    frag[6] = 0x20; // more fragments
    cases.push(("super_bad_ip", with([1, 0, gs[0], gs[1]], &frag)));
    let mut udp = good_ip.clone();
    udp[9] = 17;
    cases.push(("super_bad_ip", with([1, 0, gs[0], gs[1]], &udp)));
    cases.push(("super_bad_ip", with([1, 0, gs[0], gs[1]], &[])));
    cases.push(("super_bad_gso", with([1, 0, 0, 0], &good_ip))); // gso_size 0
    let hdr_only = tso_ip(1, &[]);
    cases.push(("super_bad_gso", with([1, 0, gs[0], gs[1]], &hdr_only))); // nothing to segment
    let mut doff = good_ip.clone();
    doff[32] = 4 << 4; // TCP data offset below 5 words
    cases.push(("super_bad_transport", with([1, 0, gs[0], gs[1]], &doff)));
    let mut short = good_ip[..30].to_vec();
    short[2..4].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("super_bad_transport", with([1, 0, gs[0], gs[1]], &short)));
    cases.push((
        "super_too_many_segments",
        with([1, 0, 0, 10], &tso_ip(1, &data(2000))), // 200 segments of 10 bytes
    ));
    let spoof = {
        let mut p = tcp4([10, 9, 9, 9], 1, &data(3 * MSS), 0);
        let ps = !csum(&[&pseudo(&p, p.len() - 20)]);
        p[36..38].copy_from_slice(&ps.to_be_bytes());
        p
    };
    cases.push(("spoofed", with([1, 0, gs[0], gs[1]], &spoof)));
    let encap = |tx: &mut SecurityAssociation, inner: &[u8]| -> Vec<u8> {
        let mut buf = vec![0u8; encap_len(inner.len())];
        buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + inner.len()].copy_from_slice(inner);
        let n = tx.encap_in_place(&mut buf, inner.len(), NH_SUPER).unwrap();
        buf.truncate(n);
        buf
    };
    for (reason, inner) in &cases {
        let before = dp.totals().get(&format!("drop_{reason}")).unwrap();
        let mut pkt = encap(&mut tx, inner);
        dp.receive(tr, from, &mut pkt);
        assert_eq!(
            dp.totals().get(&format!("drop_{reason}")).unwrap(),
            before + 1,
            "{reason}: {:02x?}",
            &inner[..inner.len().min(8)]
        );
        assert!(
            dev.take(Duration::ZERO).is_none(),
            "{reason}: nothing written"
        );
    }
    let mut pkt = encap(&mut tx, &good);
    dp.receive(tr, from, &mut pkt);
    let m = dev.take(T).expect("the good one");
    assert_eq!(&m[HZ..], &good_ip[..]);
    assert_eq!(m[1], 1);
    let st = dp.peer_stats(peer).unwrap();
    assert_eq!(get(st, "rx_packets"), 3);
}

/// On a TAP device Next Header 253 is not an Ethernet frame: counted `bad_inner`.
#[test]
fn super_on_tap_is_bad_inner() {
    let from = addr("192.0.2.1:5000");
    let dev = Arc::new(FakeDevice::new(Kind::Tap).unwrap());
    let dp = DataPlane::without_threads(dev, DpConfig::default()).unwrap();
    let net = FakeNet::new();
    let s = net
        .bind(addr("192.0.2.2:5000"), TransportKind::Stream)
        .unwrap();
    let tr = dp.add_transport_without_thread(s);
    let peer = dp.add_peer(tr, &[], Some(from)).unwrap();
    dp.add_inbound_sa(peer, sa(0x1100, 0x11)).unwrap();
    let mut tx = sa(0x1100, 0x11);
    let inner = [&[1u8, 0, 5, 120][..], &tso_ip(1, &data(3 * MSS))].concat();
    let mut buf = vec![0u8; encap_len(inner.len())];
    buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + inner.len()].copy_from_slice(&inner);
    let n = tx.encap_in_place(&mut buf, inner.len(), NH_SUPER).unwrap();
    dp.receive(tr, from, &mut buf[..n]);
    assert_eq!(dp.totals().get("drop_bad_inner"), Some(1));
}

/// Several super-packets of two flows read back to back (in one batch when the device thread
/// finds them queued, encapsulated together) arrive whole, each byte-exact, in order.
#[test]
fn back_to_back_super_packets_arrive_whole_in_order() {
    let (_net, a, b) = pair(true, true);
    let reads: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            let mut r = tso_read(
                1000 + i * 100_000,
                &data((10 + i as usize) * MSS),
                MSS as u16,
            );
            r[HZ + 20 + 1] = (i % 2) as u8; // source port 40000 or 40001: two flows
            r
        })
        .collect();
    for r in &reads {
        a.dev.inject(r);
    }
    for (i, r) in reads.iter().enumerate() {
        let m = b.dev.take(T).expect("super-packet");
        assert_eq!(&m[HZ..], &r[HZ..], "super-packet {i}");
    }
    eventually("A's sends", || {
        get(a.dp.io().entries(), "wire_tx_super") == 6
    });
    assert_eq!(get(a.dp.io().entries(), "wire_tx_packets"), 6);
}
