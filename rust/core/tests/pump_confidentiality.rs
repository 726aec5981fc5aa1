//! In ESP mode the inner plaintext never appears on the stream; in plaintext mode it does
//! (which shows the search would find it).

mod pump_support;

use std::io::Read;
use std::time::{Duration, Instant};

use pump_support::*;
use simpletun_core::frame::MAX_FRAME;
use simpletun_core::pump::Crypto;
use simpletun_core::tun::Kind;

const MARKER: &[u8] = b"SECRET-MARKER-7f3a";

/// Send packets carrying the marker through a pump; return everything it wrote to the stream.
fn wire_bytes(crypto: Crypto) -> Vec<u8> {
    let (dev, test_dev) = fake_device();
    let (sock, mut wire) = stream_pair();
    let pump = start(&dev, &sock, Kind::Tun, crypto, MAX_FRAME);
    let mut expected_packets = 0;
    for i in 0..50u32 {
        let mut pkt = packet(Kind::Tun, 3, i, 100 + 37 * i as usize);
        let at = 20 + (i as usize % 40);
        pkt[at..at + MARKER.len()].copy_from_slice(MARKER);
        put(&test_dev, &pkt);
        expected_packets += 1;
    }
    let deadline = Instant::now() + TIMEOUT;
    while pump.stats().tx_packets < expected_packets {
        assert!(
            Instant::now() < deadline,
            "the pump did not send every packet"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    pump.stop();
    let mut out = vec![0u8; pump.stats().wire_tx_bytes as usize];
    wire.read_exact(&mut out).unwrap();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn esp_never_sends_the_inner_plaintext() {
    let (a, _) = esp_pair(128);
    let wire = wire_bytes(a);
    assert!(wire.len() > 50 * 100);
    assert!(
        !contains(&wire, MARKER),
        "ESP stream contains the plaintext marker"
    );
    // Not even a shorter piece of it.
    assert!(!contains(&wire, &MARKER[..8]));
}

#[test]
fn plaintext_mode_does_send_it() {
    let wire = wire_bytes(Crypto::Plaintext);
    assert_eq!(
        wire.windows(MARKER.len()).filter(|w| *w == MARKER).count(),
        50
    );
}
