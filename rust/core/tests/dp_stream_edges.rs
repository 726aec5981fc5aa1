//! The TCP tunnel's edge cases on the v2 data plane (stream transport, one peer allowing
//! everything, as `session.TcpPlane` configures it): bad frames counted under their reasons
//! while the good frames around them arrive, outbound drops, confidentiality of the wire, and
//! the lifecycle (stop latency, dropping, sequence-number exhaustion, the caller's descriptors).
//! Ported from the tests of the single-peer pump the v2 plane replaced.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::crypto::{Cipher, Hmac256};
use simpletun_core::dp::stream::StreamTransport;
use simpletun_core::dp::{DataPlane, DpConfig, Event, FakeDevice, Prefix, Traffic};
use simpletun_core::esp::{encap_len, NH_ETHERNET, NH_IPV4, NH_IPV6, NH_NONE};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

const T: Duration = Duration::from_secs(10);
/// Generous bound for "promptly" (the threads poll every 100 ms): a hang, not a slow machine.
const LIMIT: Duration = Duration::from_secs(3);
const SPI_IN: u32 = 0x4242;
const SPI_OUT: u32 = 0x9999;

fn ep() -> SocketAddr {
    "192.0.2.7:55555".parse().unwrap()
}

fn sa(spi: u32, key: &[u8]) -> SecurityAssociation {
    SecurityAssociation::new(spi, key, &[0x22; 32], 64, false).unwrap()
}

/// An IPv4 packet of `len` bytes (>= 28) whose payload is derived from `tag`.
fn ip4(tag: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(tag) as u8)
        .collect();
    p[..20].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 2]);
    p[16..20].copy_from_slice(&[10, 0, 0, 1]);
    p[20..24].copy_from_slice(&tag.to_be_bytes());
    p
}

fn ip6(tag: u32, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8] = 0xfd;
    p[23] = 2;
    p[24] = 0xfd;
    p[39] = 1;
    p[40..44].copy_from_slice(&tag.to_be_bytes());
    p
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn get(t: &Traffic, name: &str) -> u64 {
    t.get(name).unwrap_or_else(|| panic!("no counter {name}"))
}

/// Every `drop_*` total is zero except those named.
fn assert_drops(t: &Traffic, want: &[(&str, u64)]) {
    for (k, v) in t.entries() {
        if let Some(reason) = k.strip_prefix("drop_") {
            let n = want.iter().find(|(w, _)| *w == reason).map_or(0, |w| w.1);
            assert_eq!(v, n, "{k}: {:?}", t.entries());
        }
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// A TCP-mode plane: a fake device, a stream transport (control frames not carried, as the
/// TCP session runs it) on one end of a socket pair, one peer allowing everything; `esp`
/// installs SPI_IN inbound and SPI_OUT outbound. Returns the far end of the socket too.
struct Plane {
    dev: Arc<FakeDevice>,
    dp: DataPlane,
    st: Arc<StreamTransport>,
    near: UnixStream,
    wire: UnixStream,
}

fn plane(esp: Option<(SecurityAssociation, SecurityAssociation)>, max_frame: usize) -> Plane {
    let dev = Arc::new(FakeDevice::new(Kind::Tun).unwrap());
    let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
    let st = Arc::new(match esp {
        Some(_) => StreamTransport::new(max_frame).unwrap().without_control(),
        None => StreamTransport::plaintext(max_frame).unwrap(),
    });
    let tr = dp.add_transport(st.clone()).unwrap();
    let (near, wire) = UnixStream::pair().unwrap();
    wire.set_read_timeout(Some(T)).unwrap();
    st.add_connection(near.as_raw_fd(), ep()).unwrap();
    let all: [Prefix; 2] = ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    let p = dp.add_peer(tr, &all, Some(ep())).unwrap();
    if let Some((rx, tx)) = esp {
        dp.add_inbound_sa(p, rx).unwrap();
        dp.set_outbound_sa(p, Some(tx)).unwrap();
    }
    Plane {
        dev,
        dp,
        st,
        near,
        wire,
    }
}

fn quiet(dev: &FakeDevice) -> Vec<Vec<u8>> {
    let mut got = vec![];
    while let Some(p) = dev.take(Duration::from_millis(300)) {
        got.push(p);
    }
    got
}

/// An ESP packet with a valid ICV whose padding bytes are wrong (built from the primitives,
/// since the SA never produces one).
fn bad_padding(enc_key: &[u8], auth_key: &[u8], seq: u32) -> Vec<u8> {
    let mut pkt = Vec::new();
    pkt.extend(SPI_IN.to_be_bytes());
    pkt.extend(seq.to_be_bytes());
    pkt.extend([7u8; 16]); // IV
    let mut payload = ip4(99, 60)[..44].to_vec(); // 44 + 2 pad + 2 trailer = 48
    payload.extend([9, 9, 2, NH_IPV4]); // pad bytes must be 1, 2
    Cipher::new(enc_key)
        .unwrap()
        .cbc_encrypt(&[7u8; 16], &mut payload);
    pkt.extend(payload);
    let icv = Hmac256::new(auth_key).icv(&[&pkt]);
    pkt.extend(icv);
    pkt
}

#[test]
fn esp_bad_frames_counted_and_skipped() {
    let key = [0x11u8; 16];
    let mut peer = sa(SPI_IN, &key); // plays the remote end: the same keys as our inbound SA
    let mut stranger = sa(SPI_IN + 1, &key);
    let mut pl = plane(Some((sa(SPI_IN, &key), sa(SPI_OUT, &key))), 2000);

    let good1 = peer.encap(&ip4(1, 60), None).unwrap(); // seq 1
    let mut forged = peer.encap(&ip4(2, 60), None).unwrap(); // seq 2
    *forged.last_mut().unwrap() ^= 1;
    let truncated = peer.encap(&ip4(3, 60), None).unwrap()[..40].to_vec(); // seq 3
    let unknown_spi = stranger.encap(&ip4(4, 60), None).unwrap();
    let control = vec![0, 0, 0, 0, 1, 2, 3];
    // An oversized frame whose body is made of valid frames: they must be skipped, not parsed.
    let mut body = vec![];
    while body.len() < 5000 {
        body.extend(frame(&peer.encap(&ip4(5, 60), None).unwrap()));
    }
    let mut oversize = (body.len() as u16).to_be_bytes().to_vec();
    oversize.extend(&body);
    let v4_as_v6 = peer.encap(&ip4(6, 60), Some(NH_IPV6)).unwrap();
    let ether_in_tun = peer.encap(&ip4(7, 60), Some(NH_ETHERNET)).unwrap();
    let dummy = peer.encap(b"", Some(NH_NONE)).unwrap();
    let pad_seq = peer.tx_seq() + 1; // reserve a sequence number inside the window
    assert!(peer.skip_tx_seq_to(pad_seq));
    let padding = bad_padding(&key, &[0x22; 32], pad_seq as u32);
    let good2 = peer.encap(&ip6(1, 80), None).unwrap();
    let good3 = peer.encap(&ip4(8, 60), None).unwrap();

    let mut stream = vec![];
    for f in [
        &good1,
        &forged,
        &good1,
        &truncated,
        &unknown_spi,
        &control,
        &vec![],
    ] {
        stream.extend(frame(f));
    }
    stream.extend(&oversize);
    for f in [&v4_as_v6, &ether_in_tun, &dummy, &padding, &good2, &good3] {
        stream.extend(frame(f));
    }
    // Dribble the stream in odd-sized pieces so frames straddle reads.
    for chunk in stream.chunks(777) {
        pl.wire.write_all(chunk).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    eventually("the last good frame", || {
        get(pl.dp.totals(), "rx_packets") == 3
    });
    let got = quiet(&pl.dev);
    assert_eq!(got, vec![ip4(1, 60), ip6(1, 80), ip4(8, 60)]);
    let t = pl.dp.totals();
    assert_eq!(
        (get(t, "rx_packets"), get(t, "rx_bytes")),
        (3, 60 + 80 + 60)
    );
    assert_eq!(
        get(t, "dummies"),
        1,
        "the dummy packet (next header 59) is discarded"
    );
    assert_drops(
        t,
        &[
            ("auth", 1),
            ("replay", 1),
            ("bad_length", 2), // truncated, empty
            ("unknown_spi", 1),
            ("control", 1),
            ("oversize", 1),
            ("bad_inner", 2),
            ("bad_padding", 1),
        ],
    );
    pl.dp.stop();
}

#[test]
fn plaintext_bad_frames() {
    let mut pl = plane(None, 1500);
    let mut stream = frame(&ip4(1, 40));
    stream.extend(frame(b""));
    stream.extend(frame(&[0xee; 1501]));
    stream.extend(frame(&ip4(2, 40)));
    pl.wire.write_all(&stream).unwrap();
    assert_eq!(pl.dev.take(T).unwrap(), ip4(1, 40));
    assert_eq!(pl.dev.take(T).unwrap(), ip4(2, 40));
    assert_eq!(pl.dev.take(Duration::from_millis(100)), None);
    assert_drops(pl.dp.totals(), &[("bad_length", 1), ("oversize", 1)]);
}

#[test]
fn outbound_drops() {
    // ESP: a non-IP packet and a packet whose ESP packet is too big for the frame limit are
    // dropped and counted; the packets around them are sent.
    let key = [0x33u8; 32];
    let mut pl = plane(Some((sa(SPI_IN, &key), sa(SPI_OUT, &key))), 1500);
    let mut peer = sa(SPI_OUT, &key);
    pl.dev.inject(&ip4(1, 60));
    pl.dev.inject(&[0x10; 60]); // version nibble 1
    pl.dev.inject(&ip4(9, 1500)); // its ESP packet exceeds 1500
    pl.dev.inject(&ip4(2, 60));
    let mut decoder = simpletun_core::FrameDecoder::new(65535);
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    while got.len() < 2 {
        let n = pl.wire.read(&mut buf).unwrap();
        assert!(n > 0);
        decoder.feed(&buf[..n], |f| got.push(peer.decap(f.unwrap()).unwrap().1));
    }
    assert_eq!(got, vec![ip4(1, 60), ip4(2, 60)]);
    eventually("all four counted", || {
        let t = pl.dp.totals();
        get(t, "tx_packets") + get(t, "drop_bad_inner") + get(t, "drop_oversize") == 4
    });
    let t = pl.dp.totals();
    assert_eq!((get(t, "tx_packets"), get(t, "tx_bytes")), (2, 120));
    assert_eq!(get(t, "wire_tx_bytes"), 2 * encap_len(60) as u64);
    assert_drops(t, &[("bad_inner", 1), ("oversize", 1)]);
}

/// Packets carrying a marker through a plane; everything it wrote to the stream.
fn wire_bytes(esp: bool, marker: &[u8]) -> Vec<u8> {
    let key = [0x44u8; 16];
    let mut pl = plane(esp.then(|| (sa(SPI_IN, &key), sa(SPI_OUT, &key))), 65535);
    for i in 0..50u32 {
        let mut pkt = ip4(i, 100 + 37 * i as usize);
        let at = 28 + (i as usize % 40);
        pkt[at..at + marker.len()].copy_from_slice(marker);
        pl.dev.inject(&pkt);
    }
    eventually("every packet sent", || {
        get(pl.dp.totals(), "tx_packets") == 50
    });
    pl.dp.stop();
    let mut out = vec![0u8; get(pl.dp.totals(), "wire_tx_bytes") as usize + 2 * 50];
    pl.wire.read_exact(&mut out).unwrap();
    out
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn esp_never_sends_the_inner_plaintext_and_plaintext_mode_does() {
    const MARKER: &[u8] = b"SECRET-MARKER-7f3a";
    let wire = wire_bytes(true, MARKER);
    assert!(wire.len() > 50 * 100);
    assert_eq!(count(&wire, MARKER), 0, "ESP stream contains the marker");
    assert_eq!(count(&wire, &MARKER[..8]), 0, "not even a piece of it");
    // The search finds it when it is there.
    assert_eq!(count(&wire_bytes(false, MARKER), MARKER), 50);
}

#[test]
fn stop_when_idle_and_under_load() {
    let key = [0x55u8; 32];
    let pl = plane(Some((sa(SPI_IN, &key), sa(SPI_OUT, &key))), 65535);
    assert!(pl.dp.running());
    assert!(pl.dp.exit_reason().is_none());
    let t = Instant::now();
    pl.dp.stop();
    assert!(t.elapsed() < LIMIT, "idle stop took {:?}", t.elapsed());
    assert!(!pl.dp.running());
    assert_eq!(pl.dp.exit_reason().as_deref(), Some("stopped"));
    pl.dp.stop(); // idempotent

    // Under load, with nobody reading the far end (the transport is congested).
    let pl = plane(Some((sa(SPI_IN, &key), sa(SPI_OUT, &key))), 65535);
    for i in 0..4000 {
        pl.dev.inject(&ip4(i, 1400));
    }
    eventually("congested", || {
        pl.st.connections().len() == 1
            && pl.dev.pending_inbound() > 0
            && get(pl.dp.totals(), "tx_packets") > 100
    });
    let t = Instant::now();
    pl.dp.stop();
    assert!(t.elapsed() < LIMIT, "loaded stop took {:?}", t.elapsed());
}

#[test]
fn sequence_exhaustion_is_counted_and_reported() {
    let key = [0x66u8; 16];
    let mut tx = sa(SPI_OUT, &key);
    assert!(tx.skip_tx_seq_to(u32::MAX as u64 - 1));
    let mut peer = sa(SPI_OUT, &key);
    let mut pl = plane(Some((sa(SPI_IN, &key), tx)), 65535);
    pl.dev.inject(&ip4(1, 100)); // gets the last sequence number
    pl.dev.inject(&ip4(2, 100));
    eventually("exhaustion counted", || {
        get(pl.dp.totals(), "drop_seq_exhausted") == 1
    });
    let evs = pl.dp.take_events(8);
    assert!(
        evs.iter().any(|e| matches!(e, Event::NoSa { .. })),
        "{evs:?}"
    );
    let mut wire = vec![0u8; 2 + encap_len(100)];
    pl.wire.read_exact(&mut wire).unwrap();
    assert_eq!(peer.decap(&wire[2..]).unwrap().1, ip4(1, 100));
    assert_eq!(peer.rx_highest_seq(), u32::MAX as u64);
    assert_eq!(get(pl.dp.totals(), "tx_packets"), 1);
    // Nothing else went out: the plane never reuses a sequence number.
    pl.dp.stop();
    let mut rest = vec![];
    pl.wire
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let _ = pl.wire.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} more bytes", rest.len());
}

#[test]
fn callers_descriptor_stays_open_and_is_released() {
    let mut pl = plane(None, 65535);
    pl.dp.stop();
    drop(pl.dp);
    drop(pl.st);
    // The caller's socket still works after the plane is gone...
    pl.wire.write_all(b"hi").unwrap();
    let mut two = [0u8; 2];
    pl.near.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"hi");
    // ...and the plane kept no duplicate: closing it closes the connection.
    drop(pl.near);
    let mut rest = vec![];
    assert_eq!(pl.wire.read_to_end(&mut rest).unwrap(), 0, "end of file");
}

#[test]
fn dropping_a_running_plane_stops_it_and_releases_the_socket() {
    let mut pl = plane(None, 65535);
    let t = Instant::now();
    drop(pl.dp);
    assert!(t.elapsed() < LIMIT);
    drop(pl.st);
    drop(pl.near);
    let mut rest = vec![];
    assert_eq!(pl.wire.read_to_end(&mut rest).unwrap(), 0);
}

/// Two planes back to back over one stream (fake device A ↔ plane A ↔ socket pair ↔ plane B
/// ↔ fake device B), traffic both ways at once, sizes up to the largest a frame carries:
/// everything arrives intact and in order, the counters of both ends agree.
fn back_to_back(kind: Kind, esp: Option<usize>) {
    const COUNT: u32 = 600;
    let largest = match esp {
        Some(_) => (0..65535).rev().find(|&n| encap_len(n) <= 65535).unwrap(),
        None => 65535,
    };
    let sizes = [
        28, 40, 41, 52, 64, 100, 576, 1279, 1280, 1400, 1420, 1500, 1501, 4000, 9000, 60, largest,
    ];
    let size = |i: u32| sizes[i as usize % sizes.len()];
    let pkt = |tag: u8, i: u32| {
        let mut p = ip4(i, size(i));
        p[1] = tag;
        if kind == Kind::Tap {
            p[0] = tag; // any bytes: TAP frames are not parsed
        }
        p
    };
    let (sa_, sb) = UnixStream::pair().unwrap();
    let keys = |bits: usize| vec![bits as u8; bits / 8];
    let mk = |sock: &UnixStream, rx: u32, tx: u32| {
        let dev = Arc::new(FakeDevice::new(kind).unwrap());
        let dp = DataPlane::start(dev.clone(), DpConfig::default()).unwrap();
        let st = Arc::new(match esp {
            Some(_) => StreamTransport::new(65535).unwrap().without_control(),
            None => StreamTransport::plaintext(65535).unwrap(),
        });
        let tr = dp.add_transport(st.clone()).unwrap();
        st.add_connection(sock.as_raw_fd(), ep()).unwrap();
        let all: [Prefix; 1] = ["0.0.0.0/0".parse().unwrap()];
        let p = dp.add_peer(tr, &all, Some(ep())).unwrap();
        if let Some(bits) = esp {
            dp.add_inbound_sa(p, sa(rx, &keys(bits))).unwrap();
            dp.set_outbound_sa(p, Some(sa(tx, &keys(bits)))).unwrap();
        }
        (dev, dp)
    };
    let (dev_a, dp_a) = mk(&sa_, 0x2002, 0x1001);
    let (dev_b, dp_b) = mk(&sb, 0x1001, 0x2002);
    thread::scope(|s| {
        for (from, to, tag) in [(&dev_a, &dev_b, 0xa0u8), (&dev_b, &dev_a, 0xb0u8)] {
            s.spawn(move || {
                for i in 0..COUNT {
                    // The fake device holds what is injected: pace it so TUN-queue-like
                    // bounds are not what is tested here.
                    while from.pending_inbound() > 256 {
                        thread::sleep(Duration::from_millis(1));
                    }
                    from.inject(&pkt(tag, i));
                }
            });
            s.spawn(move || {
                for i in 0..COUNT {
                    let got = to
                        .take(T)
                        .unwrap_or_else(|| panic!("packet {i} of {tag:#x}"));
                    assert_eq!(got.len(), size(i), "packet {i} of {tag:#x}: length");
                    assert!(got == pkt(tag, i), "packet {i} of {tag:#x}");
                }
            });
        }
    });
    let bytes: u64 = (0..COUNT).map(|i| size(i) as u64).sum();
    for (p, q) in [(&dp_a, &dp_b), (&dp_b, &dp_a)] {
        eventually("counted", || get(q.totals(), "rx_packets") == COUNT as u64);
        let (s, r) = (p.totals(), q.totals());
        assert_eq!(
            (get(s, "tx_packets"), get(s, "tx_bytes")),
            (COUNT as u64, bytes)
        );
        assert_eq!(
            (get(r, "rx_packets"), get(r, "rx_bytes")),
            (COUNT as u64, bytes)
        );
        assert_eq!(get(s, "wire_tx_bytes"), get(r, "wire_rx_bytes"));
        assert_drops(s, &[]);
        assert_drops(r, &[]);
    }
    dp_a.stop();
    dp_b.stop();
}

#[test]
fn back_to_back_esp_aes128_tun() {
    back_to_back(Kind::Tun, Some(128));
}

#[test]
fn back_to_back_esp_aes256_tun() {
    back_to_back(Kind::Tun, Some(256));
}

#[test]
fn back_to_back_esp_aes128_tap() {
    back_to_back(Kind::Tap, Some(128));
}

#[test]
fn back_to_back_plaintext_tun() {
    back_to_back(Kind::Tun, None);
}

#[test]
fn back_to_back_plaintext_tap() {
    back_to_back(Kind::Tap, None);
}
