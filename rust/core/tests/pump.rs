//! Two pumps back to back (fake device A ↔ pump A ↔ stream ↔ pump B ↔ fake device B): traffic
//! in both directions at once arrives intact and in order, and the counters agree.

mod pump_support;

use std::thread;

use pump_support::*;
use simpletun_core::esp::encap_len;
use simpletun_core::frame::{MAX_FRAME, PREFIX_LEN};
use simpletun_core::pump::{Crypto, PumpExit};
use simpletun_core::tun::Kind;
use simpletun_core::DropReason;

const COUNT: u32 = 1200;

/// Packet sizes cycled through, ending with the largest a frame can carry.
fn sizes(esp: bool) -> Vec<usize> {
    let largest = match esp {
        true => (0..MAX_FRAME)
            .rev()
            .find(|&n| encap_len(n) <= MAX_FRAME)
            .unwrap(),
        false => MAX_FRAME,
    };
    vec![
        20, 40, 41, 52, 64, 100, 576, 1279, 1280, 1400, 1420, 1500, 1501, 4000, 9000, 60, largest,
    ]
}

fn wire_len(esp: bool, inner: usize) -> u64 {
    (PREFIX_LEN + if esp { encap_len(inner) } else { inner }) as u64
}

fn back_to_back(kind: Kind, a: Crypto, b: Crypto) {
    let esp = matches!(a, Crypto::Esp { .. });
    let (dev_a, test_a) = fake_device();
    let (dev_b, test_b) = fake_device();
    let (sock_a, sock_b) = stream_pair();
    let pump_a = start(&dev_a, &sock_a, kind, a, MAX_FRAME);
    let pump_b = start(&dev_b, &sock_b, kind, b, MAX_FRAME);
    let sizes = sizes(esp);
    let size = |i: u32| sizes[i as usize % sizes.len()];

    thread::scope(|s| {
        for (from, to, tag) in [(&test_a, &test_b, 0xa0u8), (&test_b, &test_a, 0xb0u8)] {
            s.spawn(move || (0..COUNT).for_each(|i| put(from, &packet(kind, tag, i, size(i)))));
            s.spawn(move || {
                for i in 0..COUNT {
                    let got = take(to);
                    assert_eq!(got.len(), size(i), "packet {i} of stream {tag:#x}: length");
                    assert!(
                        got == packet(kind, tag, i, size(i)),
                        "packet {i} of stream {tag:#x}"
                    );
                }
            });
        }
    });
    assert!(pump_a.running() && pump_b.running());
    assert!(pump_a.exit().is_none());
    pump_a.stop();
    pump_b.stop();
    assert!(matches!(pump_a.exit(), Some(PumpExit::Stopped)));
    assert!(!pump_a.running());

    let bytes: u64 = (0..COUNT).map(|i| size(i) as u64).sum();
    let wire: u64 = (0..COUNT).map(|i| wire_len(esp, size(i))).sum();
    for (p, q) in [(&pump_a, &pump_b), (&pump_b, &pump_a)] {
        let (s, r) = (p.stats(), q.stats());
        assert_eq!(
            (s.tx_packets, s.tx_bytes, s.wire_tx_bytes),
            (COUNT as u64, bytes, wire)
        );
        assert_eq!(
            (r.rx_packets, r.rx_bytes, r.wire_rx_bytes),
            (COUNT as u64, bytes, wire)
        );
        assert_eq!(s.total_drops(), 0, "{s:?}");
    }
    let names: Vec<String> = pump_a
        .stats()
        .entries()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(names.len(), 6 + DropReason::ALL.len());
    assert!(
        names.contains(&"wire_rx_bytes".to_string()) && names.contains(&"drop_auth".to_string())
    );
}

#[test]
fn esp_aes128_tun() {
    let (a, b) = esp_pair(128);
    back_to_back(Kind::Tun, a, b);
}

#[test]
fn esp_aes256_tun() {
    let (a, b) = esp_pair(256);
    back_to_back(Kind::Tun, a, b);
}

#[test]
fn esp_aes128_tap() {
    let (a, b) = esp_pair(128);
    back_to_back(Kind::Tap, a, b);
}

#[test]
fn plaintext_tun() {
    back_to_back(Kind::Tun, Crypto::Plaintext, Crypto::Plaintext);
}

#[test]
fn plaintext_tap() {
    back_to_back(Kind::Tap, Crypto::Plaintext, Crypto::Plaintext);
}
