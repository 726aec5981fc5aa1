//! The batched paths against the serial ones, on fuzzer-chosen inputs:
//! - HMAC: `sha256_multi::HmacKeys::mac_multi_ways` over 1..=20 messages of unequal lengths
//!   (0..=9000 bytes, with suffixes of 0..=64 bytes) at every interleaving width equals
//!   `crypto::Hmac256::mac` (the `hmac` crate) message by message, for a fuzzer-chosen key;
//! - ESP decap: `decap_batch_in_place` over a batch of authentic (at fuzzer-chosen sequence
//!   numbers, so reordered, duplicated, far ahead or behind, across 2^32 with ESN), mutated,
//!   truncated or arbitrary packets returns, for every packet, what `decap_in_place` returns on a
//!   clone of the SA fed the same packets one by one, leaves the same bytes, counters and window;
//! - ESP encap: `encap_batch_in_place` produces the packets `encap_in_place` does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simpletun_core::crypto::Hmac256;
use simpletun_core::esp::{encap_len, NH_IPV4};
use simpletun_core::sha256_multi::{HmacKeys, MAX_SUFFIX};
use simpletun_core::DropReason;
use simpletun_fuzz::{Input, SaParams};

/// `n` bytes: the input's next bytes, cycled (zeros once it is dry).
fn fill(inp: &mut Input<'_>, n: usize) -> Vec<u8> {
    let seed = inp.bytes(32).to_vec();
    if seed.is_empty() {
        return vec![0; n];
    }
    (0..n)
        .map(|i| seed[i % seed.len()] ^ (i / seed.len()) as u8)
        .collect()
}

fn hmac_case(inp: &mut Input<'_>) {
    let key_len = inp.u8() as usize;
    let key = fill(inp, key_len);
    let n = 1 + inp.u8() as usize % 20;
    let mut bodies = Vec::new();
    let mut suffixes = Vec::new();
    for _ in 0..n {
        let len = inp.u16() as usize % 9001;
        bodies.push(fill(inp, len));
        let s = inp.u8() as usize % (MAX_SUFFIX + 1);
        suffixes.push(fill(inp, s));
    }
    let msgs: Vec<(&[u8], &[u8])> = bodies
        .iter()
        .zip(&suffixes)
        .map(|(b, s)| (&b[..], &s[..]))
        .collect();
    let one = Hmac256::new(&key);
    let want: Vec<[u8; 32]> = msgs.iter().map(|(b, s)| one.mac(&[b, s])).collect();
    let keys = HmacKeys::new(&key);
    for ways in 1..=4 {
        let mut got = vec![[0u8; 32]; n];
        keys.mac_multi_ways(&msgs, &mut got, ways);
        assert_eq!(got, want, "ways {ways}");
    }
}

fn esp_case(inp: &mut Input<'_>) {
    let p = SaParams::from_byte(inp.u8());
    let mut rx_serial = p.sa();
    let base = if p.esn {
        inp.u64() % (1 << 40)
    } else {
        inp.u32() as u64 / 2
    };
    if base > 0 && !rx_serial.skip_rx_seq_to(base) {
        return;
    }
    let mut rx_batch = rx_serial.clone();
    let tx0 = p.sender();
    for _round in 0..inp.u8() % 4 + 1 {
        let n = inp.u8() as usize % 20;
        let mut pkts: Vec<Vec<u8>> = Vec::new();
        let mut lens = Vec::new();
        for _ in 0..n {
            let op = inp.u8();
            let len = inp.u16() as usize % 2000;
            let mut inner = fill(inp, len);
            if let Some(b) = inner.first_mut() {
                *b = 0x45;
            }
            let pkt = match op % 4 {
                3 => fill(inp, len),
                _ => {
                    // Around the window's top, ahead or behind.
                    let delta = inp.u16() as i128 - 0x8000 + (inp.u8() as i128 - 128) * (1 << 24);
                    let seq = (rx_serial.rx_highest_seq().max(base) as i128 + delta)
                        .clamp(0, p.seq_max() as i128 - 1) as u64;
                    let mut tx = tx0.clone();
                    if !tx.skip_tx_seq_to(seq) {
                        continue;
                    }
                    let mut pk = tx.encap(&inner, Some(NH_IPV4)).expect("encap");
                    match op % 4 {
                        1 if !pk.is_empty() => {
                            let at = inp.u16() as usize % pk.len();
                            pk[at] ^= 1 | inp.u8();
                        }
                        2 => pk.truncate(inp.u16() as usize % (pk.len() + 1)),
                        _ => {}
                    }
                    pk
                }
            };
            if op & 0x10 != 0 {
                pkts.push(pkt.clone());
            }
            pkts.push(pkt);
            lens.push(len);
        }
        let mut want_bufs = pkts.clone();
        let want: Vec<_> = want_bufs
            .iter_mut()
            .map(|b| rx_serial.decap_in_place(b))
            .collect();
        let mut got = vec![Err(DropReason::BadLength); pkts.len()];
        rx_batch.decap_batch_in_place(&mut pkts, &mut got);
        assert_eq!(got, want);
        assert_eq!(pkts, want_bufs);
        assert_eq!(rx_batch.stats(), rx_serial.stats());
        assert_eq!(rx_batch.rx_highest_seq(), rx_serial.rx_highest_seq());

        // Encap: the batch equals the serial packets (the IV generator and counter are cloned).
        let mut serial = tx0.clone();
        let mut batched = serial.clone();
        let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0x45; encap_len(l)]).collect();
        let nhs = vec![NH_IPV4; lens.len()];
        let mut out = vec![0usize; lens.len()];
        let k = batched
            .encap_batch_in_place(&mut bufs, &lens, &nhs, &mut out)
            .expect("buffers are large enough");
        assert_eq!(k, lens.len());
        for (i, &l) in lens.iter().enumerate() {
            let mut b = vec![0x45; encap_len(l)];
            let m = serial.encap_in_place(&mut b, l, NH_IPV4).expect("encap");
            assert_eq!(&bufs[i][..out[i]], &b[..m]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 0 {
        hmac_case(&mut inp);
    } else {
        esp_case(&mut inp);
    }
});
