//! Edge cases of ESP decapsulation through the public API of `simpletun_core`: replay-window
//! edge tables (window sizes 32, 64, 4096, 65536, and ESN around the 2^32 boundary), the
//! window against a model, every bit flip, every truncation, authentic packets with bad
//! padding, sequence number exhaustion and configuration errors.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use simpletun_core::crypto::{Cipher, Hmac256};
use simpletun_core::esp::{encap_len, padded_len, MIN_PACKET_LEN, PAYLOAD_OFFSET};
use simpletun_core::replay::{ReplayError, ReplayWindow, MAX_WINDOW, MIN_WINDOW};
use simpletun_core::{DropReason, EncapError, SaConfigError, SecurityAssociation};

const SPI: u32 = 0x0100_0000;
const ENC: [u8; 16] = [0x11; 16];
const AUTH: [u8; 32] = [0x22; 32];
const REPLAY: Want = Want::Drop(DropReason::Replay);
const AUTH_FAIL: Want = Want::Drop(DropReason::Auth);
const OK: Want = Want::Ok;
const TOO_OLD: Want = Want::TooOld;

fn sa(window: u32, esn: bool) -> SecurityAssociation {
    SecurityAssociation::new(SPI, &ENC, &AUTH, window, esn).unwrap()
}

fn ipv4(len: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len];
    p[0] = 0x45;
    p
}

/// One packet per sequence number, from a single sender (which can only move forward).
fn packets(esn: bool, seqs: &[u64]) -> BTreeMap<u64, Vec<u8>> {
    let mut tx = sa(64, esn);
    let sorted: BTreeSet<u64> = seqs.iter().copied().collect();
    let mut out = BTreeMap::new();
    for s in sorted {
        assert!(tx.skip_tx_seq_to(s - 1), "skip to {}", s - 1);
        // The inner packet carries its sequence number, so a mix-up would show.
        let mut inner = ipv4(28, 0);
        inner[20..28].copy_from_slice(&s.to_be_bytes());
        out.insert(s, tx.encap(&inner, None).unwrap());
        assert_eq!(tx.tx_seq(), s);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Ok,
    Drop(DropReason),
    /// Left of the window. Without ESN: a replay. With ESN the low 32 bits are read as the next
    /// 2^32 block (RFC 4303 Appendix A.2), so the ICV, made with the real high bits, fails.
    TooOld,
}

/// Checks every counter of `rx` against the expected number of good packets and drops.
fn assert_counters(rx: &SecurityAssociation, ok: u64, drops: &HashMap<DropReason, u64>, ctx: &str) {
    assert_eq!(rx.stats().decap_packets, ok, "{ctx}: decap_packets");
    for r in DropReason::ALL {
        let n = drops.get(&r).copied().unwrap_or(0);
        assert_eq!(rx.stats().drops.get(r), n, "{ctx}: drop_{}", r.name());
    }
}

/// Feed `table` (sequence number, expected outcome) to a fresh receiver and check every step:
/// outcome, inferred sequence number, window top and counters.
fn run_table(window: u32, esn: bool, table: &[(u64, Want)]) {
    let seqs: Vec<u64> = table.iter().map(|&(s, _)| s).collect();
    let pkts = packets(esn, &seqs);
    let mut rx = sa(window, esn);
    let mut top = 0u64;
    let mut ok = 0u64;
    let mut drops = HashMap::new();
    for (i, &(seq, want)) in table.iter().enumerate() {
        let ctx = format!("window {window} esn {esn} row {i}: seq {seq:#x}");
        let mut buf = pkts[&seq].clone();
        let want = match want {
            Want::TooOld if esn => AUTH_FAIL,
            Want::TooOld => REPLAY,
            w => w,
        };
        match (want, rx.decap_in_place(&mut buf)) {
            (Want::Ok, Ok(d)) => {
                assert_eq!(d.seq, seq, "{ctx}: inferred sequence number");
                assert_eq!(
                    &buf[d.inner.clone()][20..28],
                    &seq.to_be_bytes(),
                    "{ctx}: inner"
                );
                top = top.max(seq);
                ok += 1;
            }
            (Want::Drop(r), Err(e)) => {
                assert_eq!(e, r, "{ctx}");
                *drops.entry(r).or_default() += 1;
            }
            (w, g) => panic!("{ctx}: wanted {w:?}, got {g:?}"),
        }
        assert_eq!(rx.rx_highest_seq(), top, "{ctx}: window top");
        assert_counters(&rx, ok, &drops, &ctx);
    }
}

#[test]
fn replay_window_edge_tables() {
    for w in [32u32, 64, 4096, 65536] {
        let w = w as u64;
        let t = 3 * w + 17;
        let far = t + 10 * w + 5;
        let table = [
            (t, OK),
            (t, REPLAY),         // duplicate of the top
            (t - w + 1, OK),     // the leftmost number inside the window
            (t - w + 1, REPLAY), // ... and its duplicate
            (t - w, TOO_OLD),    // just outside the window (never seen)
            (1, TOO_OLD),        // far left
            (t - 1, OK),         // reordered within the window
            (t - 3, OK),
            (t - 2, OK),
            (t - 2, REPLAY),
            (t - 3, REPLAY),
            (t + 1, OK),          // slides by one
            (t - w + 2, OK),      // now the leftmost inside, never seen
            (t - w + 1, TOO_OLD), // now outside (seen before)
            (far, OK),            // far ahead: the whole window slides
            (t + 2, TOO_OLD),     // never seen, but now too old
            (far - w + 1, OK),    // leftmost of the new window
            (far - w, TOO_OLD),   // just outside it
            (far - 1, OK),        // bits left over from before the jump were cleared
            (far - w / 2, OK),
            (far, REPLAY),
            (far + w - 1, OK), // slides by a window less one: `far` is now the leftmost
            (far, REPLAY),     // ... and was seen
            (far + w - 2, OK),
        ];
        run_table(w as u32, false, &table);
        run_table(w as u32, true, &table);
    }
}

#[test]
fn replay_window_with_esn_off_at_the_top_of_the_32_bit_space() {
    let top = u32::MAX as u64;
    run_table(
        64,
        false,
        &[
            (top - 64, OK),
            (top, OK),
            (top - 63, OK),
            (top - 64, REPLAY),
            (top, REPLAY),
        ],
    );
}

#[test]
fn replay_window_with_esn_across_the_2_32_boundary() {
    const B: u64 = 1 << 32;
    let table = [
        (B - 16, OK),
        (B + 3, OK),      // wire seq 3: the high bits 1 are inferred
        (B - 2, OK),      // late, from the previous 2^32 block, inside the window
        (B - 16, REPLAY), // duplicate from the previous block
        (B + 3, REPLAY),
        (B, OK), // its low 32 bits, the only ones sent, are 0
        (B, REPLAY),
        // B + 3 - 63 is the leftmost number inside the window.
        (B - 60, OK),
        // Just outside: its low bits are taken as the next 2^32 block (RFC 4303 Appendix A),
        // so the ICV, computed with high bits 0, does not verify.
        (B - 61, AUTH_FAIL),
        (B + (1 << 31), OK), // far ahead in the new block
        // The window now lies inside one block: its left edge, and just left of it.
        (B + (1 << 31) - 63, OK),
        (B + (1 << 31) - 64, AUTH_FAIL),
        // Below the window in the current block: taken as the next block, so the ICV fails.
        (B + 4, AUTH_FAIL),
        (2 * B + 1, OK), // into the third block
        (2 * B - 1, OK), // late, from the second
    ];
    run_table(64, true, &table);
}

/// The window against a plain model, over sequences of random jumps (forward, backward, far).
#[test]
fn replay_window_matches_a_model() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for w in [MIN_WINDOW, 64, 100, 4096, 65536, MAX_WINDOW] {
        let w64 = w as u64;
        let mut win = ReplayWindow::new(w).unwrap();
        let mut seen = BTreeSet::new();
        let mut top = 0u64;
        for step in 0..4000 {
            let seq = match next() % 8 {
                0 => top + 1 + next() % (4 * w64), // ahead, maybe past a window
                1 => top.saturating_sub(next() % (w64 + 2)), // inside, around the left edge
                2 => top.saturating_sub(w64 - 1 + next() % 2), // exactly at the left edge
                3 => next() % (top + 1),           // anything up to the top
                _ => top + 1 + next() % 3,         // small steps ahead
            };
            let model = if seq == 0 {
                Err(ReplayError::Zero)
            } else if seq > top {
                Ok(())
            } else if top - seq >= w64 {
                Err(ReplayError::TooOld)
            } else if seen.contains(&seq) {
                Err(ReplayError::Duplicate)
            } else {
                Ok(())
            };
            assert_eq!(
                win.check(seq),
                model,
                "window {w} step {step} seq {seq} top {top}"
            );
            if model.is_ok() {
                win.commit(seq);
                seen.insert(seq);
                top = top.max(seq);
            }
            assert_eq!(win.top(), top);
        }
        assert_eq!(win.check(0), Err(ReplayError::Zero));
    }
}

/// An authentic packet whose sequence number bytes are all non-zero, and a receiver that has
/// already seen a packet just before it (so the window is not empty).
fn flip_setup(esn: bool) -> (SecurityAssociation, Vec<u8>, u64, u64) {
    let seen = 0x0102_0300u64;
    let seq = 0x0102_0304u64;
    let pkts = packets(esn, &[seen, seq]);
    let mut rx = sa(64, esn);
    rx.decap(&pkts[&seen]).unwrap();
    (rx, pkts[&seq].clone(), seen, seq)
}

#[test]
fn every_bit_flip_is_rejected_and_leaves_the_window_alone() {
    let (mut rx, pkt, seen, seq) = flip_setup(false);
    assert_eq!(pkt.len(), encap_len(28));
    let mut drops = HashMap::new();
    for i in 0..pkt.len() {
        for bit in 0..8 {
            let mut bad = pkt.clone();
            bad[i] ^= 1 << bit;
            // Only a flip in the sequence number can make it a replay: 0, too old, or `seen`.
            let want = if (4..8).contains(&i) {
                let s = u32::from_be_bytes(bad[4..8].try_into().unwrap()) as u64;
                if s == 0 || (s <= seen && (seen - s >= 64 || s == seen)) {
                    DropReason::Replay
                } else {
                    DropReason::Auth
                }
            } else {
                DropReason::Auth
            };
            assert_eq!(rx.decap(&bad), Err(want), "byte {i} bit {bit}");
            *drops.entry(want).or_default() += 1;
            assert_eq!(
                rx.rx_highest_seq(),
                seen,
                "byte {i} bit {bit}: window moved"
            );
        }
    }
    assert_counters(&rx, 1, &drops, "after all flips");
    // seq 01020304, seen 01020300: the flips giving 00020304, 01000304, 01020204 and 01020104
    // are too old, the one giving 01020300 is a duplicate; all other flips fail the ICV.
    assert_eq!(drops[&DropReason::Replay], 5);
    assert_eq!(drops[&DropReason::Auth], pkt.len() as u64 * 8 - 5);
    // Nothing was committed: the genuine packet is still accepted.
    assert_eq!(rx.decap(&pkt).unwrap().0, 4);
    assert_eq!(rx.rx_highest_seq(), seq);
}

#[test]
fn every_byte_inverted_is_an_authentication_failure() {
    for esn in [false, true] {
        let (mut rx, pkt, seen, seq) = flip_setup(esn);
        for i in 0..pkt.len() {
            let mut bad = pkt.clone();
            bad[i] ^= 0xff;
            assert_eq!(rx.decap(&bad), Err(DropReason::Auth), "esn {esn} byte {i}");
            assert_eq!(
                rx.rx_highest_seq(),
                seen,
                "esn {esn} byte {i}: window moved"
            );
        }
        let drops = HashMap::from([(DropReason::Auth, pkt.len() as u64)]);
        assert_counters(&rx, 1, &drops, &format!("esn {esn}"));
        rx.decap(&pkt).unwrap();
        assert_eq!(rx.rx_highest_seq(), seq);
    }
}

/// Structurally possible lengths: header, IV, whole cipher blocks (at least one), ICV.
fn structurally_valid(n: usize) -> bool {
    n >= MIN_PACKET_LEN && (n - PAYLOAD_OFFSET - 16) % 16 == 0
}

#[test]
fn every_truncation_and_extension_is_rejected() {
    assert_eq!(MIN_PACKET_LEN, 56);
    for (inner_len, esn) in [(66usize, false), (1000, false), (0, true), (300, true)] {
        let mut tx = sa(64, esn);
        let mut rx = sa(64, esn);
        tx.skip_tx_seq_to(6);
        rx.decap(&tx.encap(&ipv4(20, 0), None).unwrap()).unwrap();
        let pkt = tx
            .encap(&ipv4(inner_len.max(1), 3)[..inner_len], Some(4))
            .unwrap();
        assert_eq!(pkt.len(), encap_len(inner_len));
        let mut drops = HashMap::new();
        let mut cases: Vec<Vec<u8>> = (0..pkt.len()).map(|n| pkt[..n].to_vec()).collect();
        for extra in 1..=48 {
            let mut longer = pkt.clone();
            longer.extend((0..extra).map(|i| i as u8));
            cases.push(longer);
        }
        for bad in cases {
            let n = bad.len();
            let want = if structurally_valid(n) {
                DropReason::Auth
            } else {
                DropReason::BadLength
            };
            assert_eq!(
                rx.decap(&bad),
                Err(want),
                "inner {inner_len} esn {esn}: length {n}"
            );
            *drops.entry(want).or_default() += 1;
            assert_eq!(rx.rx_highest_seq(), 7, "length {n}: window moved");
        }
        assert_counters(&rx, 1, &drops, &format!("inner {inner_len}"));
        assert!(
            drops[&DropReason::Auth] >= 3,
            "some truncations must be structurally valid"
        );
        rx.decap(&pkt).unwrap();
    }
}

/// An authentic packet built by hand from the crypto primitives, with any payload (the
/// plaintext `inner | padding | pad length | next header`, a whole number of blocks).
fn forge(seq: u32, payload: &[u8]) -> Vec<u8> {
    assert_eq!(payload.len() % 16, 0);
    let iv = [0x5au8; 16];
    let mut pkt = Vec::new();
    pkt.extend(SPI.to_be_bytes());
    pkt.extend(seq.to_be_bytes());
    pkt.extend(iv);
    let mut ct = payload.to_vec();
    Cipher::new(&ENC).unwrap().cbc_encrypt(&iv, &mut ct);
    pkt.extend(ct);
    let icv = Hmac256::new(&AUTH).icv(&[&pkt]);
    pkt.extend(icv);
    pkt
}

fn payload(inner: &[u8], pad: &[u8], pad_len: u8, nh: u8) -> Vec<u8> {
    [inner, pad, &[pad_len, nh]].concat()
}

#[test]
fn forged_packets_with_default_padding_are_accepted() {
    // The hand-built encoder agrees with the SA: a correct packet decaps.
    let mut rx = sa(64, false);
    let good = [
        (payload(&ipv4(10, 1), &[1, 2, 3, 4], 4, 4), ipv4(10, 1), 4u8),
        // No padding at all: inner 14 + trailer = one block.
        (payload(&ipv4(14, 2), &[], 0, 4), ipv4(14, 2), 4),
        // All padding: an empty inner packet, pad length 14.
        (
            payload(&[], &(1..=14).collect::<Vec<u8>>(), 14, 41),
            vec![],
            41,
        ),
        // More padding than needed (RFC 4303 allows up to 255 bytes): 18 bytes.
        (
            payload(&ipv4(12, 3), &(1..=18).collect::<Vec<u8>>(), 18, 4),
            ipv4(12, 3),
            4,
        ),
        // The most padding there can be, 255 bytes, after a 15-byte inner packet: 17 blocks.
        (
            payload(&ipv4(15, 4), &(1..=255).collect::<Vec<u8>>(), 255, 4),
            ipv4(15, 4),
            4,
        ),
    ];
    for (i, (p, inner, nh)) in good.iter().enumerate() {
        let pkt = forge(i as u32 + 1, p);
        assert_eq!(rx.decap(&pkt), Ok((*nh, inner.clone())), "good case {i}");
    }
}

#[test]
fn authentic_packets_with_bad_padding_are_malformed() {
    let bad = [
        payload(&ipv4(10, 1), &[0, 0, 0, 0], 4, 4), // zero pad bytes
        payload(&ipv4(10, 1), &[1, 2, 3, 5], 4, 4), // last pad byte wrong
        payload(&ipv4(10, 1), &[2, 3, 4, 5], 4, 4), // first pad byte wrong
        payload(&ipv4(10, 1), &[1, 2, 3, 4], 3, 4), // pad length one short ...
        payload(&ipv4(10, 1), &[1, 2, 3, 4], 5, 4), // ... and one long
        payload(&[], &(1..=14).collect::<Vec<u8>>(), 15, 4), // pad length beyond the payload
        payload(&ipv4(16, 1), &(1..=14).collect::<Vec<u8>>(), 255, 4),
        payload(&[], &[0xff; 14], 255, 4), // a one-block payload, pad 255
    ];
    let mut rx = sa(64, false);
    for (i, p) in bad.iter().enumerate() {
        let seq = 100 + i as u32;
        let pkt = forge(seq, p);
        assert_eq!(rx.decap(&pkt), Err(DropReason::BadPadding), "bad case {i}");
        // The ICV verified, so (by design, DESIGN.md decap order) the window has moved ...
        assert_eq!(rx.rx_highest_seq(), seq as u64, "bad case {i}");
        // ... and the same packet again is a replay.
        assert_eq!(
            rx.decap(&pkt),
            Err(DropReason::Replay),
            "bad case {i} replayed"
        );
    }
    let n = bad.len() as u64;
    let drops = HashMap::from([(DropReason::BadPadding, n), (DropReason::Replay, n)]);
    assert_counters(&rx, 0, &drops, "bad padding");
}

#[test]
fn sequence_number_exhaustion() {
    for (esn, last) in [(false, u32::MAX as u64), (true, u64::MAX)] {
        let mut tx = sa(64, esn);
        let mut rx = sa(64, esn);
        assert!(tx.skip_tx_seq_to(last - 1));
        let pkt = tx
            .encap(&ipv4(20, 9), None)
            .expect("the packet at the last number");
        assert_eq!(&pkt[4..8], &[0xff; 4], "esn {esn}");
        assert_eq!(tx.tx_seq(), last);
        for _ in 0..3 {
            assert_eq!(
                tx.encap(&ipv4(20, 9), None),
                Err(EncapError::SeqExhausted { esn })
            );
        }
        assert_eq!(
            tx.tx_seq(),
            last,
            "esn {esn}: counter moved after exhaustion"
        );
        assert_eq!(tx.stats().encap_packets, 1);
        assert_eq!(tx.stats().encap_bytes, 20);
        assert_eq!(tx.stats().drops.get(DropReason::SeqExhausted), 3);
        let msg = EncapError::SeqExhausted { esn }.to_string();
        assert!(msg.contains(if esn { "2^64-1" } else { "2^32-1" }), "{msg}");
        assert!(!tx.skip_tx_seq_to(last - 1), "the counter moved backwards");

        if !esn {
            // The last packet is accepted by a receiver.
            let d = rx.decap(&pkt).unwrap();
            assert_eq!(d, (4, ipv4(20, 9)));
            assert_eq!(rx.rx_highest_seq(), last);
        }
    }
}

#[test]
fn counters_count_inner_bytes() {
    let mut tx = sa(64, false);
    let mut rx = sa(64, false);
    let sizes = [0usize, 1, 14, 15, 16, 66, 1400, 9000, 65000];
    for &n in &sizes {
        let inner = ipv4(n.max(1), 7)[..n].to_vec();
        let pkt = tx.encap(&inner, Some(4)).unwrap();
        assert_eq!(pkt.len(), encap_len(n));
        assert_eq!(pkt.len(), PAYLOAD_OFFSET + padded_len(n) + 16);
        assert_eq!(rx.decap(&pkt).unwrap(), (4, inner));
    }
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    assert_eq!(
        (tx.stats().encap_packets, tx.stats().encap_bytes),
        (sizes.len() as u64, total)
    );
    assert_eq!(
        (rx.stats().decap_packets, rx.stats().decap_bytes),
        (sizes.len() as u64, total)
    );
}

#[test]
fn configuration_errors() {
    for w in [0u32, 1, 16, MIN_WINDOW - 1, MAX_WINDOW + 1, u32::MAX] {
        let e = SecurityAssociation::new(SPI, &ENC, &AUTH, w, false).unwrap_err();
        assert_eq!(e, SaConfigError::ReplayWindow(w));
        let msg = e.to_string();
        assert!(msg.contains(&MIN_WINDOW.to_string()) && msg.contains(&MAX_WINDOW.to_string()));
    }
    for w in [MIN_WINDOW, 64, 65536, MAX_WINDOW] {
        assert_eq!(
            SecurityAssociation::new(SPI, &ENC, &AUTH, w, false)
                .unwrap()
                .replay_window(),
            w
        );
    }
    for n in [0usize, 1, 15, 17, 20, 23, 25, 31, 33, 64] {
        let e = SecurityAssociation::new(SPI, &vec![1; n], &AUTH, 64, false).unwrap_err();
        assert_eq!(e, SaConfigError::EncKeyLength(n));
        let msg = e.to_string();
        assert!(msg.contains("16, 24 or 32"), "{msg}");
        assert!(msg.contains(&format!("{n} bytes")), "{msg}");
    }
    for (n, bits) in [(16usize, 128u32), (24, 192), (32, 256)] {
        let sa = SecurityAssociation::new(SPI, &vec![1; n], &AUTH, 64, false).unwrap();
        assert_eq!(sa.enc_key_bits(), bits);
    }
    for n in [0usize, 16, 20, 31, 33, 64] {
        let e = SecurityAssociation::new(SPI, &ENC, &vec![1; n], 64, false).unwrap_err();
        assert_eq!(e, SaConfigError::AuthKeyLength(n));
        assert!(e.to_string().contains("32"), "{e}");
    }
    for spi in [0u32, 1, 255] {
        assert_eq!(
            SecurityAssociation::new(spi, &ENC, &AUTH, 64, false).unwrap_err(),
            SaConfigError::Spi(spi)
        );
    }
    assert_eq!(
        SecurityAssociation::new(256, &ENC, &AUTH, 64, false)
            .unwrap()
            .spi(),
        256
    );
}
