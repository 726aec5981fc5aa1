//! Structure-aware ESP decapsulation: the input is a script of operations on one receiving SA
//! (with or without ESN, every key size, several window sizes). Operations build valid packets
//! (with `encap_in_place`, or by hand with a fuzzer-chosen plaintext that may carry a bad
//! trailer), mutate them, replay earlier ones, or forge them with a wrong key. Every outcome is
//! checked against reference models (`simpletun_fuzz`):
//! - an authentic packet is accepted iff the reference window accepts its sequence number (with
//!   the reference ESN inference) and its trailer is well formed; the window moves iff the ICV
//!   verified, even when the padding then fails;
//! - an accepted packet's inner range lies within the buffer, and its bytes, next header and
//!   sequence number are those that were sent;
//! - a packet accepted once is rejected as a replay the second time;
//! - a mutated or forged packet is never accepted and never moves the window (libFuzzer's
//!   comparison hooks see the authentic packets this harness compares, so "arbitrary" bytes
//!   may be an authentic packet rebuilt from them: such inputs carry a valid ICV under the
//!   harness key and are not forgeries, so they are not held to this);
//! - the SA's counters add up.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simpletun_core::crypto::{Hmac256, BLOCK_LEN, ICV_LEN, IV_LEN};
use simpletun_core::esp::{
    encap_len, Decapped, EncapError, MIN_PACKET_LEN, NH_NONE, PAYLOAD_OFFSET,
};
use simpletun_core::{DropReason, SecurityAssociation};
use simpletun_fuzz::{build_packet, parse_trailer, Input, ReplayModel, SaParams, AUTH_KEY, SPI};

const MAX_OPS: usize = 200;
const HISTORY: usize = 16;

struct Harness {
    p: SaParams,
    rx: SecurityAssociation,
    /// A fresh sender, cloned for each packet so that any sequence number can be sent.
    tx0: SecurityAssociation,
    model: ReplayModel,
    calls: u64,
    /// Packets accepted (or that passed the ICV) so far, with their sequence numbers.
    history: Vec<(Vec<u8>, u64)>,
}

/// An authentic packet and what decapsulating it must yield if the window lets it in.
struct Sent {
    pkt: Vec<u8>,
    seq: u64,
    /// `Some((next_header, inner))`, or `None` if its trailer is malformed.
    expect: Option<(u8, Vec<u8>)>,
}

impl Harness {
    fn new(p: SaParams) -> Harness {
        Harness {
            p,
            rx: p.sa(),
            tx0: p.sender(),
            model: ReplayModel::new(p.window),
            calls: 0,
            history: Vec::new(),
        }
    }

    /// Decapsulate a copy of `pkt`; checks the invariants that hold whatever the packet.
    fn decap(&mut self, pkt: &[u8]) -> (Result<Decapped, DropReason>, Vec<u8>) {
        let mut buf = pkt.to_vec();
        let r = self.rx.decap_in_place(&mut buf);
        self.calls += 1;
        let st = self.rx.stats();
        let drops: u64 = st.drops.iter().map(|(_, c)| c).sum();
        assert_eq!(
            st.decap_packets + drops,
            self.calls,
            "counters do not add up"
        );
        if let Ok(d) = &r {
            assert!(
                d.inner.start <= d.inner.end,
                "inverted inner range {:?}",
                d.inner
            );
            assert!(
                d.inner.end <= buf.len(),
                "inner range {:?} beyond {}",
                d.inner,
                buf.len()
            );
            assert_eq!(d.inner.start, PAYLOAD_OFFSET);
            // The trailer (2 bytes) and ICV follow the inner packet.
            assert!(d.inner.end + 2 + ICV_LEN <= buf.len());
        }
        (r, buf)
    }

    fn check_top(&self) {
        assert_eq!(
            self.rx.rx_highest_seq(),
            self.model.top,
            "window top differs from the model"
        );
    }

    /// The sequence number the receiver will reconstruct from the low 32 bits.
    fn inferred(&self, seq: u64) -> u64 {
        if self.p.esn {
            self.model.infer_esn(seq as u32)
        } else {
            seq & 0xffff_ffff
        }
    }

    /// Deliver an authentic packet and check the outcome against the models.
    fn deliver(&mut self, s: &Sent) {
        let inferred = self.inferred(s.seq);
        let (r, buf) = self.decap(&s.pkt);
        if inferred != s.seq {
            // Wrong high bits: the ICV cannot verify (or the guessed number is a replay).
            assert!(
                matches!(r, Err(DropReason::Replay | DropReason::Auth)),
                "seq {:#x} inferred as {inferred:#x}: {r:?}",
                s.seq
            );
        } else if !self.model.accepts(s.seq) {
            assert_eq!(
                r,
                Err(DropReason::Replay),
                "seq {:#x} top {:#x}",
                s.seq,
                self.model.top
            );
        } else {
            // The ICV verifies, so the window moves whatever the padding says.
            self.model.commit(s.seq);
            match (&r, &s.expect) {
                (Ok(d), Some((nh, inner))) => {
                    assert_eq!(d.next_header, *nh);
                    assert_eq!(d.seq, s.seq);
                    assert_eq!(&buf[d.inner.clone()], &inner[..], "inner packet differs");
                }
                (Err(DropReason::BadPadding), None) => {}
                _ => panic!("seq {:#x}: got {r:?}, expected {:?}", s.seq, s.expect),
            }
            // Accepted once: a replay the second time.
            let (again, _) = self.decap(&s.pkt);
            assert_eq!(
                again,
                Err(DropReason::Replay),
                "replay of seq {:#x} accepted",
                s.seq
            );
            if self.history.len() >= HISTORY {
                self.history.remove(0);
            }
            self.history.push((s.pkt.clone(), s.seq));
        }
        self.check_top();
    }

    /// Whether `pkt` carries a valid ICV under the harness key (for the sequence number the
    /// receiver will infer), i.e. is authentic rather than forged.
    fn authentic(&self, pkt: &[u8]) -> bool {
        if pkt.len() < MIN_PACKET_LEN {
            return false;
        }
        let seq_low = u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
        let seq_hi = ((self.inferred(seq_low as u64) >> 32) as u32).to_be_bytes();
        let authed = &pkt[..pkt.len() - ICV_LEN];
        let mac = Hmac256::new(&AUTH_KEY);
        let icv = if self.p.esn {
            mac.icv(&[authed, &seq_hi])
        } else {
            mac.icv(&[authed])
        };
        icv[..] == pkt[pkt.len() - ICV_LEN..]
    }

    /// Deliver a packet that is not authentic: it must be refused and change nothing.
    fn deliver_forged(&mut self, pkt: &[u8]) {
        let top = self.model.top;
        let (r, _) = self.decap(pkt);
        assert!(
            matches!(
                r,
                Err(DropReason::Replay | DropReason::Auth | DropReason::BadLength)
            ),
            "forged or mutated packet got {r:?}"
        );
        assert_eq!(self.rx.rx_highest_seq(), top);
    }

    /// Choose a sequence number, mostly near the window.
    fn choose_seq(&self, inp: &mut Input, allow_zero: bool) -> u64 {
        let top = self.model.top;
        let w = self.model.size;
        let s = match inp.u8() % 7 {
            0 => top.saturating_add(1),
            1 => top.saturating_add(1 + inp.u16() as u64),
            2 => top.saturating_sub(inp.u16() as u64 % (2 * w)),
            3 => top.saturating_sub(inp.u8() as u64),
            4 => top.saturating_add(inp.u32() as u64),
            5 => inp.u64(),
            _ => {
                // Near a boundary of the 2^32 subspaces (ESN inference).
                let b = inp.u8();
                let hi = ((top >> 32) + (b % 3) as u64)
                    .saturating_sub(1)
                    .min(0xffff_ffff);
                let x = inp.u16() as u64;
                let lo = if b & 4 != 0 { 0xffff_ffff - x } else { x };
                (hi << 32) | lo
            }
        };
        let s = s.min(self.p.seq_max());
        if s == 0 && !allow_zero {
            1
        } else {
            s
        }
    }

    /// A packet made by `encap_in_place` with sequence number `seq`.
    fn encap(&self, inp: &mut Input, seq: u64) -> Sent {
        let flags = inp.u8();
        let len = if flags & 0x80 != 0 {
            inp.u16() as usize
        } else {
            inp.u16() as usize % 2048
        };
        let nh = if flags & 0x40 != 0 {
            inp.u8()
        } else {
            [4, 41, 143, NH_NONE][flags as usize & 3]
        };
        let fill = inp.u8();
        let inner: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();

        let mut tx = self.tx0.clone();
        assert!(tx.skip_tx_seq_to(seq - 1));
        let mut buf = vec![0u8; encap_len(len) + (flags as usize >> 4 & 3)];
        buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + len].copy_from_slice(&inner);
        let n = tx.encap_in_place(&mut buf, len, nh).expect("encap");
        assert_eq!(n, encap_len(len));
        assert_eq!(tx.tx_seq(), seq);
        assert_eq!(&buf[0..4], &SPI.to_be_bytes());
        assert_eq!(&buf[4..8], &(seq as u32).to_be_bytes());
        buf.truncate(n);
        let inner = if nh == NH_NONE { Vec::new() } else { inner };
        Sent {
            pkt: buf,
            seq,
            expect: Some((nh, inner)),
        }
    }

    /// A packet built by hand around a fuzzer-chosen plaintext (trailer possibly malformed).
    fn handmade(&self, inp: &mut Input, seq: u64) -> Sent {
        let flags = inp.u8();
        let spi = if flags & 0x80 != 0 { inp.u32() } else { SPI };
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&{
            let mut b = inp.bytes(IV_LEN).to_vec();
            b.resize(IV_LEN, 0);
            b
        });
        let n = BLOCK_LEN * (1 + (flags as usize & 7));
        let mut pt = inp.bytes(n).to_vec();
        pt.resize(n, 0);
        if flags & 0x40 != 0 {
            // Make the trailer well formed, with a fuzzer-chosen pad length.
            let pad = inp.u8() as usize % (n - 1);
            for k in 0..pad {
                pt[n - 2 - pad + k] = (k + 1) as u8;
            }
            pt[n - 2] = pad as u8;
        }
        let pkt = build_packet(self.p.enc_key(), spi, seq, self.p.esn, &iv, &pt);
        let expect = parse_trailer(&pt).map(|(nh, inner)| (nh, inner.to_vec()));
        Sent { pkt, seq, expect }
    }
}

fn mutate(inp: &mut Input, pkt: &mut Vec<u8>) {
    for _ in 0..1 + inp.u8() % 4 {
        let len = pkt.len();
        match inp.u8() % 7 {
            0 if len > 0 => {
                let pos = inp.u16() as usize % len;
                pkt[pos] ^= 1 << (inp.u8() % 8);
            }
            1 if len > 0 => {
                let pos = inp.u16() as usize % len;
                pkt[pos] = inp.u8();
            }
            2 => pkt.truncate(inp.u16() as usize % (len + 1)),
            3 => {
                let v = inp.u8();
                let k = 1 + inp.u8() as usize % 48;
                pkt.resize(len + k, v);
            }
            4 if len >= 8 => pkt[4..8].copy_from_slice(&inp.u32().to_be_bytes()),
            5 if len >= 4 => pkt[0..4].copy_from_slice(&inp.u32().to_be_bytes()),
            6 if len >= PAYLOAD_OFFSET + 2 * BLOCK_LEN => {
                // Swap two cipher blocks (or IV and a block).
                let blocks = (len - PAYLOAD_OFFSET + BLOCK_LEN) / BLOCK_LEN;
                let a = 8 + BLOCK_LEN * (inp.u8() as usize % blocks);
                let b = 8 + BLOCK_LEN * (inp.u8() as usize % blocks);
                if a + BLOCK_LEN <= len && b + BLOCK_LEN <= len && a != b {
                    for i in 0..BLOCK_LEN {
                        pkt.swap(a + i, b + i);
                    }
                }
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let p = SaParams::from_byte(inp.u8());
    let mut h = Harness::new(p);

    // The sender refuses to go past the end of the sequence space.
    let mut tx = h.tx0.clone();
    assert!(tx.skip_tx_seq_to(p.seq_max()));
    assert_eq!(
        tx.encap_in_place(&mut [0u8; 64], 0, 4),
        Err(EncapError::SeqExhausted { esn: p.esn })
    );

    let mut ops = 0;
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        match inp.u8() % 7 {
            0 => {
                let seq = h.choose_seq(&mut inp, false);
                let s = h.encap(&mut inp, seq);
                h.deliver(&s);
            }
            1 => {
                let seq = h.choose_seq(&mut inp, true);
                let s = h.handmade(&mut inp, seq);
                h.deliver(&s);
            }
            2 => {
                // Mutate an authentic packet; it must be refused (unless the mutation was a
                // no-op), and must not stop the original from getting through afterwards.
                let seq = h.choose_seq(&mut inp, false);
                let s = if inp.u8() & 1 == 0 {
                    h.encap(&mut inp, seq)
                } else {
                    h.handmade(&mut inp, seq)
                };
                let mut m = s.pkt.clone();
                mutate(&mut inp, &mut m);
                if m == s.pkt {
                    h.deliver(&s);
                } else if !h.authentic(&m) {
                    h.deliver_forged(&m);
                    if inp.u8() & 1 == 0 {
                        h.deliver(&s);
                    }
                }
            }
            3 => {
                // Replay an earlier packet.
                if !h.history.is_empty() {
                    let i = inp.u8() as usize % h.history.len();
                    let (pkt, seq) = h.history[i].clone();
                    let inferred = h.inferred(seq);
                    let (r, _) = h.decap(&pkt);
                    if inferred == seq {
                        assert_eq!(r, Err(DropReason::Replay), "replay of {seq:#x} not refused");
                    } else {
                        assert!(
                            matches!(r, Err(DropReason::Replay | DropReason::Auth)),
                            "{r:?}"
                        );
                    }
                    h.check_top();
                }
            }
            4 => {
                // Forged: right structure, wrong authentication key.
                let seq = h.choose_seq(&mut inp, false);
                let mut key = AUTH_KEY;
                key[inp.u8() as usize % 32] ^= 1 << (inp.u8() % 8);
                let mut tx =
                    SecurityAssociation::new(SPI, p.enc_key(), &key, 32, p.esn).expect("SA");
                assert!(tx.skip_tx_seq_to(seq - 1));
                let pkt = tx.encap(&[0x45; 40], None).expect("encap");
                h.deliver_forged(&pkt);
            }
            5 => {
                // A burst of in-order packets with a stride (slides the window over blocks).
                let stride = 1 + inp.u8() as u64 % 100;
                for _ in 0..1 + inp.u8() % 32 {
                    let seq = h.model.top.saturating_add(stride).min(p.seq_max());
                    let s = Sent {
                        pkt: {
                            let mut tx = h.tx0.clone();
                            assert!(tx.skip_tx_seq_to(seq - 1));
                            tx.encap(&[0x60; 20], None).expect("encap")
                        },
                        seq,
                        expect: Some((41, vec![0x60; 20])),
                    };
                    h.deliver(&s);
                }
            }
            _ => {
                // Arbitrary bytes.
                let n = inp.u16() as usize % 512;
                let raw = inp.bytes(n).to_vec();
                if !h.authentic(&raw) {
                    h.deliver_forged(&raw);
                }
            }
        }
    }
});
