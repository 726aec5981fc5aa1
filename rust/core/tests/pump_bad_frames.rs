//! A hand-written stream of bad frames into one pump: every bad frame is counted under its
//! reason, nothing of it reaches the device, and the good frames around them still arrive.

mod pump_support;

use std::io::Write;
use std::time::Duration;

use pump_support::*;
use simpletun_core::crypto::{Cipher, Hmac256};
use simpletun_core::esp::{NH_ETHERNET, NH_IPV4, NH_IPV6, NH_NONE};
use simpletun_core::frame::{MAX_FRAME, PREFIX_LEN};
use simpletun_core::pump::{Crypto, PumpStats};
use simpletun_core::tun::Kind;
use simpletun_core::DropReason::{self, *};

const SPI: u32 = 0x4242;

fn ip4(tag: u32) -> Vec<u8> {
    packet(Kind::Tun, 4, tag * 2, 60)
}

/// An ESP packet with a valid ICV whose padding bytes are wrong (built from the primitives,
/// since the SA never produces one).
fn bad_padding(enc_key: &[u8], auth_key: &[u8], seq: u32) -> Vec<u8> {
    let mut pkt = Vec::new();
    pkt.extend(SPI.to_be_bytes());
    pkt.extend(seq.to_be_bytes());
    pkt.extend([7u8; 16]); // IV
    let mut payload = ip4(99)[..44].to_vec(); // 44 + 2 pad + 2 trailer = 48
    payload.extend([9, 9, 2, NH_IPV4]); // pad bytes must be 1, 2
    Cipher::new(enc_key)
        .unwrap()
        .cbc_encrypt(&[7u8; 16], &mut payload);
    pkt.extend(payload);
    let icv = Hmac256::new(auth_key).icv(&[&pkt]);
    pkt.extend(icv);
    pkt
}

fn receive_until_quiet(dev: &std::os::fd::OwnedFd) -> Vec<Vec<u8>> {
    let mut got = vec![];
    while readable(
        std::os::fd::AsRawFd::as_raw_fd(dev),
        Duration::from_millis(300),
    ) {
        got.push(take(dev));
    }
    got
}

fn assert_drops(s: &PumpStats, want: &[(DropReason, u64)]) {
    for r in DropReason::ALL {
        let n = want.iter().find(|(w, _)| *w == r).map_or(0, |(_, n)| *n);
        assert_eq!(s.drops(r), n, "drop_{}: {s:?}", r.name());
    }
}

#[test]
fn esp_bad_frames_counted_and_skipped() {
    let (enc, auth) = ([0x11u8; 16], [0x22u8; 32]);
    let new_sa =
        |spi| simpletun_core::SecurityAssociation::new(spi, &enc, &auth, 64, false).unwrap();
    let mut peer = new_sa(SPI); // plays the remote end: same keys as the pump's rx SA
    let mut stranger = new_sa(SPI + 1);

    let (dev, test_dev) = fake_device();
    let (sock, mut test_sock) = stream_pair();
    let crypto = Crypto::Esp {
        tx: new_sa(0x9999),
        rx: new_sa(SPI),
    };
    let pump = start(&dev, &sock, Kind::Tun, crypto, 2000);

    let good1 = peer.encap(&ip4(1), None).unwrap(); // seq 1
    let mut forged = peer.encap(&ip4(2), None).unwrap(); // seq 2
    *forged.last_mut().unwrap() ^= 1;
    let truncated = peer.encap(&ip4(3), None).unwrap()[..40].to_vec(); // seq 3
    let unknown_spi = stranger.encap(&ip4(4), None).unwrap();
    let control = vec![0, 0, 0, 0, 1, 2, 3];
    // An oversized frame whose body is made of valid frames: they must be skipped, not parsed.
    let mut body = vec![];
    while body.len() < 5000 {
        body.extend(frame(&peer.encap(&ip4(5), None).unwrap()));
    }
    let mut oversize = ((body.len()) as u16).to_be_bytes().to_vec();
    oversize.extend(&body);
    let v4_as_v6 = peer.encap(&ip4(6), Some(NH_IPV6)).unwrap();
    let ether_in_tun = peer.encap(&ip4(7), Some(NH_ETHERNET)).unwrap();
    let dummy = peer.encap(b"", Some(NH_NONE)).unwrap();
    let pad_seq = peer.tx_seq() + 1; // reserve a sequence number inside the window
    assert!(peer.skip_tx_seq_to(pad_seq));
    let padding = bad_padding(&enc, &auth, pad_seq as u32);
    let v6 = packet(Kind::Tun, 6, 1, 80);
    let good2 = peer.encap(&v6, None).unwrap();
    let good3 = peer.encap(&ip4(8), None).unwrap();

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
        test_sock.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }

    let got = receive_until_quiet(&test_dev);
    assert_eq!(got, vec![ip4(1), v6, ip4(8)]);
    pump.stop();
    let s = pump.stats();
    assert_eq!((s.rx_packets, s.rx_bytes), (3, 60 + 80 + 60));
    assert_eq!(s.wire_rx_bytes, stream.len() as u64);
    assert_drops(
        &s,
        &[
            (Auth, 1),
            (Replay, 1),
            (BadLength, 2), // truncated, empty
            (UnknownSpi, 1),
            (Control, 1),
            (Oversize, 1),
            (BadInner, 2),
            (BadPadding, 1),
        ],
    );
}

#[test]
fn plaintext_bad_frames() {
    let (dev, test_dev) = fake_device();
    let (sock, mut test_sock) = stream_pair();
    let pump = start(&dev, &sock, Kind::Tun, Crypto::Plaintext, 1500);
    let mut stream = frame(b"first");
    stream.extend(frame(b""));
    stream.extend(frame(&[0xee; 1501]));
    stream.extend(frame(b"last"));
    test_sock.write_all(&stream).unwrap();
    let got = receive_until_quiet(&test_dev);
    assert_eq!(got, vec![b"first".to_vec(), b"last".to_vec()]);
    pump.stop();
    assert_drops(&pump.stats(), &[(BadLength, 1), (Oversize, 1)]);
}

#[test]
fn outbound_drops() {
    // TUN in ESP mode: a non-IP packet and a packet too big for max_frame are dropped, the
    // packets around them are sent.
    let (dev, test_dev) = fake_device();
    let (sock, mut test_sock) = stream_pair();
    let (enc, auth) = ([0x33u8; 32], [0x44u8; 32]);
    let new_sa =
        |spi| simpletun_core::SecurityAssociation::new(spi, &enc, &auth, 64, false).unwrap();
    let pump = start(
        &dev,
        &sock,
        Kind::Tun,
        Crypto::Esp {
            tx: new_sa(SPI),
            rx: new_sa(SPI),
        },
        1500,
    );
    let mut peer = new_sa(SPI);
    put(&test_dev, &ip4(1));
    put(&test_dev, &[0x10; 60]); // version nibble 1
    put(&test_dev, &packet(Kind::Tun, 9, 0, 1500)); // its ESP packet exceeds 1500
    put(&test_dev, &ip4(2));
    let mut decoder = simpletun_core::FrameDecoder::new(MAX_FRAME);
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    while got.len() < 2 {
        let n = std::io::Read::read(&mut test_sock, &mut buf).unwrap();
        assert!(n > 0);
        decoder.feed(&buf[..n], |f| got.push(peer.decap(f.unwrap()).unwrap().1));
    }
    assert_eq!(got, vec![ip4(1), ip4(2)]);
    pump.stop();
    let s = pump.stats();
    assert_eq!((s.tx_packets, s.tx_bytes), (2, 120));
    assert_eq!(
        s.wire_tx_bytes,
        2 * (PREFIX_LEN + simpletun_core::esp::encap_len(60)) as u64
    );
    assert_drops(&s, &[(BadInner, 1), (Oversize, 1)]);
}
