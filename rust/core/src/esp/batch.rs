//! Batched ESP: several packets per call. Encapsulation encrypts their IVs together,
//! interleaves their CBC chains through [`cbc_multi`](crate::cbc_multi) and their HMACs through
//! [`sha256_multi`](crate::sha256_multi) (two SHA-NI streams at a time); decapsulation computes
//! the ICVs of a batch together. Byte for byte the same packets, sequence numbers, results and
//! counters as calling [`SecurityAssociation::encap_in_place`] /
//! [`SecurityAssociation::decap_in_place`] on each in turn.

use super::*;
use crate::cbc_multi::{self, LANES};

impl SecurityAssociation {
    /// Encapsulate `n` packets in place, `n` being the length of the shortest of the four
    /// slices. As for [`encap_in_place`](Self::encap_in_place), packet `i`'s inner packet lies
    /// at `bufs[i][PAYLOAD_OFFSET..PAYLOAD_OFFSET + inner_lens[i]]`, its next header is
    /// `next_headers[i]`, and on return the ESP packet is `bufs[i][..out_lens[i]]`.
    ///
    /// Returns how many packets, from the front, were encapsulated: `n`, or fewer only when the
    /// sequence number space ran out, in which case each of the rest is counted as a
    /// `SeqExhausted` drop and the SA must be rekeyed. Fails with `BufferTooSmall`, changing
    /// nothing, if any buffer is too short.
    ///
    /// Packets are interleaved [`LANES`] at a time in the order given; lanes of similar length
    /// (as after segmenting one super-packet) make the best use of the interleaving.
    pub fn encap_batch_in_place<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        inner_lens: &[usize],
        next_headers: &[u8],
        out_lens: &mut [usize],
    ) -> Result<usize, EncapError> {
        let n = bufs
            .len()
            .min(inner_lens.len())
            .min(next_headers.len())
            .min(out_lens.len());
        for (b, &len) in bufs.iter_mut().zip(&inner_lens[..n]) {
            let total = encap_len(len);
            let got = b.as_mut().len();
            if got < total {
                return Err(EncapError::BufferTooSmall { needed: total, got });
            }
        }
        let avail = (self.seq_limit() - self.tx_seq).min(n as u64) as usize;
        for _ in avail..n {
            self.stats.drops.bump(DropReason::SeqExhausted);
        }

        let mut start = 0;
        while start < avail {
            let k = LANES.min(avail - start);
            let group = &mut bufs[start..start + k];
            let lens = &inner_lens[start..start + k];
            let nhs = &next_headers[start..start + k];

            let mut ivb: [aes::Block; LANES] = Default::default();
            for b in ivb[..k].iter_mut() {
                b.copy_from_slice(&self.ivgen.next_nonce());
            }
            cbc_multi::encrypt_blocks(&self.cipher, &mut ivb[..k]);
            let mut ivs = [[0u8; IV_LEN]; LANES];
            for (iv, b) in ivs.iter_mut().zip(&ivb[..k]) {
                iv.copy_from_slice(b);
            }

            let mut lanes: [&mut [u8]; LANES] = Default::default();
            for (i, (lane, b)) in lanes.iter_mut().zip(group.iter_mut()).enumerate() {
                let buf = b.as_mut();
                let (inner_len, plen) = (lens[i], padded_len(lens[i]));
                let seq = self.tx_seq + 1 + i as u64;
                let pad = plen - inner_len - 2;
                let payload = &mut buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + plen];
                for (j, x) in payload[inner_len..inner_len + pad].iter_mut().enumerate() {
                    *x = (j + 1) as u8;
                }
                payload[plen - 2] = pad as u8;
                payload[plen - 1] = nhs[i];
                buf[0..4].copy_from_slice(&self.spi.to_be_bytes());
                buf[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
                buf[HEADER_LEN..PAYLOAD_OFFSET].copy_from_slice(&ivs[i]);
                *lane = &mut buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + plen];
            }
            cbc_multi::cbc_encrypt_multi(&self.cipher, &ivs[..k], &mut lanes[..k]);

            self.seal_icvs(
                group,
                lens,
                self.tx_seq + 1,
                &mut out_lens[start..start + k],
            );
            for &len in lens {
                self.stats.encap_packets += 1;
                self.stats.encap_bytes += len as u64;
            }
            self.tx_seq += k as u64;
            start += k;
        }
        Ok(avail)
    }

    /// Write the ICVs of the (encrypted) packets `group` (at most [`LANES`], inner lengths
    /// `lens`, sequence numbers from `seq0` on), computed together, after each packet's
    /// ciphertext, and each ESP packet's length into `out_lens`.
    fn seal_icvs<B: AsMut<[u8]>>(
        &self,
        group: &mut [B],
        lens: &[usize],
        seq0: u64,
        out_lens: &mut [usize],
    ) {
        let k = group.len().min(LANES);
        let mut seq_hi = [[0u8; 4]; LANES];
        for (i, s) in seq_hi[..k].iter_mut().enumerate() {
            *s = (((seq0 + i as u64) >> 32) as u32).to_be_bytes();
        }
        let mut icvs = [[0u8; ICV_LEN]; LANES];
        {
            let mut msgs: [(&[u8], &[u8]); LANES] = [(&[], &[]); LANES];
            for (i, (m, b)) in msgs.iter_mut().zip(group.iter_mut()).enumerate() {
                let authed_end = PAYLOAD_OFFSET + padded_len(lens[i]);
                let suffix: &[u8] = if self.esn { &seq_hi[i] } else { &[] };
                *m = (&b.as_mut()[..authed_end], suffix);
            }
            self.mac.icv_multi(&msgs[..k], &mut icvs[..k]);
        }
        for (i, b) in group[..k].iter_mut().enumerate() {
            let buf = b.as_mut();
            let authed_end = PAYLOAD_OFFSET + padded_len(lens[i]);
            buf[authed_end..authed_end + ICV_LEN].copy_from_slice(&icvs[i]);
            out_lens[i] = authed_end + ICV_LEN;
        }
    }

    /// Decapsulate `n` packets in place, `n` being the shorter of `pkts` and `results`:
    /// `results[i]` is what [`decap_in_place`](Self::decap_in_place) returns for `pkts[i]`
    /// when the packets are decapsulated one after the other in the order given, with the same
    /// counters and replay window afterwards. The ICVs of the packets that pass the length and
    /// replay checks are computed together, [`LANES`] packets at a time (interleaved on
    /// SHA-NI): [`precompute_icvs`](Self::precompute_icvs), then
    /// [`decap_in_place_pre`](Self::decap_in_place_pre) on each.
    pub fn decap_batch_in_place<B: AsMut<[u8]> + AsRef<[u8]>>(
        &mut self,
        pkts: &mut [B],
        results: &mut [Result<Decapped, DropReason>],
    ) {
        let n = pkts.len().min(results.len());
        for (group, res) in pkts[..n]
            .chunks_mut(LANES)
            .zip(results[..n].chunks_mut(LANES))
        {
            let mut pre = [None; LANES];
            self.precompute_icvs(group, &mut pre);
            for ((p, r), pre) in group.iter_mut().zip(res).zip(pre) {
                *r = self.decap_in_place_pre(p.as_mut(), pre);
            }
        }
    }

    /// The first phase of batched decap, which changes nothing (so it runs under a shared
    /// borrow): for each packet that passes the length and replay checks now, its ICV under
    /// this SA, computed together with the others' ([`LANES`] at a time, interleaved on
    /// SHA-NI); `None` for the others. `out[i]` is for `pkts[i]`, for every `i` below the
    /// shorter of the two slices. Pass each to [`decap_in_place_pre`](Self::decap_in_place_pre)
    /// with the same, unchanged packet.
    pub fn precompute_icvs<B: AsRef<[u8]>>(&self, pkts: &[B], out: &mut [Option<PreIcv>]) {
        let n = pkts.len().min(out.len());
        for (group, out) in pkts[..n].chunks(LANES).zip(out[..n].chunks_mut(LANES)) {
            let mut seq_hi = [[0u8; 4]; LANES];
            let mut msgs: [(&[u8], &[u8]); LANES] = [(&[], &[]); LANES];
            let mut idx = [0usize; LANES];
            let mut seqs = [0u64; LANES];
            let mut m = 0;
            for (i, p) in group.iter().enumerate() {
                out[i] = None;
                if let Ok(seq) = self.decap_precheck(p.as_ref()) {
                    seqs[m] = seq;
                    seq_hi[m] = ((seq >> 32) as u32).to_be_bytes();
                    idx[m] = i;
                    m += 1;
                }
            }
            for j in 0..m {
                let p = group[idx[j]].as_ref();
                let suffix: &[u8] = if self.esn { &seq_hi[j] } else { &[] };
                msgs[j] = (&p[..p.len() - ICV_LEN], suffix);
            }
            let mut icvs = [[0u8; ICV_LEN]; LANES];
            self.mac.icv_multi(&msgs[..m], &mut icvs[..m]);
            for j in 0..m {
                out[idx[j]] = Some(PreIcv {
                    seq: seqs[j],
                    icv: icvs[j],
                });
            }
        }
    }

    /// [`decap_in_place`](Self::decap_in_place), with the ICV `pre` computed by
    /// [`precompute_icvs`](Self::precompute_icvs) on this SA for this very packet: the same
    /// checks in the same order, the same result and counters; the ICV is computed here only
    /// if `pre` is `None` or was for another sequence number than the one inferred now (ESN:
    /// an earlier packet moved the window across an epoch). A `pre` from another SA, or for
    /// other bytes, is a caller error (the packet is judged by the ICV it carries).
    pub fn decap_in_place_pre(
        &mut self,
        pkt: &mut [u8],
        pre: Option<PreIcv>,
    ) -> Result<Decapped, DropReason> {
        self.decap_counted(pkt, pre.map(|p| (p.seq, p.icv)))
    }
}

/// An ICV computed ahead of decapsulation by [`SecurityAssociation::precompute_icvs`], for the
/// sequence number the packet was taken for then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreIcv {
    seq: u64,
    icv: [u8; ICV_LEN],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(key_len: usize, esn: bool) -> SecurityAssociation {
        let key: Vec<u8> = (0..key_len as u8).map(|i| i.wrapping_mul(7)).collect();
        SecurityAssociation::new(0x4242, &key, &[3u8; 32], 128, esn).unwrap()
    }

    fn inner(i: usize, len: usize) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|k| (k * 5 + i) as u8).collect();
        if let Some(b) = p.first_mut() {
            *b = 0x45;
        }
        p
    }

    /// The batch and a clone of the same SA fed packet by packet produce identical bytes.
    #[test]
    fn batch_is_byte_identical_to_serial() {
        for key_len in [16, 24, 32] {
            for esn in [false, true] {
                let mut serial = sa(key_len, esn);
                if esn {
                    assert!(serial.skip_tx_seq_to((1u64 << 32) - 5));
                }
                let mut batched = serial.clone();
                let mut rx = serial.clone();
                for n in [1usize, 3, 8, 9, 20] {
                    let lens: Vec<usize> = (0..n)
                        .map(|i| [0, 1, 14, 15, 64, 1420, 1500, 8192, 65000][(i * 7 + n) % 9])
                        .collect();
                    let nhs: Vec<u8> = (0..n).map(|i| [4, 41, 59][i % 3]).collect();
                    let mut bufs: Vec<Vec<u8>> = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| {
                            let mut b = vec![0u8; encap_len(l) + i % 3];
                            b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + l].copy_from_slice(&inner(i, l));
                            b
                        })
                        .collect();
                    let mut want = Vec::new();
                    for (i, &l) in lens.iter().enumerate() {
                        let mut b = bufs[i].clone();
                        let len = serial.encap_in_place(&mut b, l, nhs[i]).unwrap();
                        want.push(b[..len].to_vec());
                    }
                    let mut out = vec![0usize; n];
                    assert_eq!(
                        batched.encap_batch_in_place(&mut bufs, &lens, &nhs, &mut out),
                        Ok(n)
                    );
                    for i in 0..n {
                        assert_eq!(&bufs[i][..out[i]], &want[i][..], "packet {i} of {n}");
                        let (nh, got) = rx.decap(&bufs[i][..out[i]]).unwrap();
                        assert_eq!(nh, nhs[i]);
                        if nh != NH_NONE {
                            assert_eq!(got, inner(i, lens[i]));
                        }
                    }
                    assert_eq!(batched.tx_seq(), serial.tx_seq());
                    assert_eq!(batched.stats(), serial.stats());
                }
            }
        }
    }

    #[test]
    fn small_buffer_changes_nothing_and_exhaustion_is_counted() {
        let mut a = sa(16, false);
        let mut bufs = vec![vec![0u8; encap_len(100)], vec![0u8; encap_len(100) - 1]];
        let mut out = [0usize; 2];
        assert_eq!(
            a.encap_batch_in_place(&mut bufs, &[100, 100], &[4, 4], &mut out),
            Err(EncapError::BufferTooSmall {
                needed: encap_len(100),
                got: encap_len(100) - 1
            })
        );
        assert_eq!(a.tx_seq(), 0);

        assert!(a.skip_tx_seq_to(u32::MAX as u64 - 2));
        let mut bufs = vec![vec![0u8; encap_len(10)]; 5];
        let mut out = [0usize; 5];
        assert_eq!(
            a.encap_batch_in_place(&mut bufs, &[10; 5], &[4; 5], &mut out),
            Ok(2)
        );
        assert_eq!(a.tx_seq(), u32::MAX as u64);
        assert_eq!(a.stats().drops.get(DropReason::SeqExhausted), 3);
        assert_eq!(&bufs[1][4..8], &[0xff; 4]);
        assert_eq!(
            a.encap_batch_in_place(&mut bufs, &[10; 5], &[4; 5], &mut out),
            Ok(0)
        );
    }

    /// Batched decap returns, counts and leaves behind exactly what serial decap does, for a
    /// mix of good, reordered, duplicated, replayed, forged and malformed packets, with and
    /// without ESN (crossing 2^32 within one batch), in batches of every size up to 20.
    #[test]
    fn decap_batch_matches_serial() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for esn in [false, true] {
            let mut tx = sa(16, esn);
            let mut rx_serial = tx.clone();
            if esn {
                assert!(tx.skip_tx_seq_to((1u64 << 32) - 30));
                assert!(rx_serial.skip_rx_seq_to((1u64 << 32) - 30));
            }
            let mut rx_batch = rx_serial.clone();
            let mut old: Vec<Vec<u8>> = Vec::new();
            for round in 0..40 {
                let n = 1 + round % 20;
                let mut pkts: Vec<Vec<u8>> = Vec::new();
                for i in 0..n {
                    let len = [0, 20, 63, 64, 100, 1400, 1420, 9000][rnd(8)];
                    let nh = if rnd(10) == 0 { Some(NH_NONE) } else { Some(4) };
                    let p = tx.encap(&inner(i, len), nh).unwrap();
                    match rnd(12) {
                        0 => {
                            // Duplicate within the batch.
                            pkts.push(p.clone());
                            pkts.push(p);
                        }
                        1 => {
                            let mut q = p;
                            let j = rnd(q.len());
                            q[j] ^= 1 << rnd(8);
                            pkts.push(q);
                        }
                        2 => pkts.push(p[..p.len() - 1 - rnd(20)].to_vec()),
                        3 => {
                            // Never sent: withheld, so the window has a hole.
                        }
                        _ => {
                            old.push(p.clone());
                            pkts.push(p);
                        }
                    }
                }
                if !old.is_empty() && rnd(3) == 0 {
                    let j = rnd(old.len());
                    let at = rnd(pkts.len() + 1);
                    pkts.insert(at, old[j].clone());
                }
                // Reorder a little.
                for _ in 0..rnd(4) {
                    if pkts.len() > 1 {
                        let (a, b) = (rnd(pkts.len()), rnd(pkts.len()));
                        pkts.swap(a, b);
                    }
                }
                let mut want_bufs = pkts.clone();
                let want: Vec<_> = want_bufs
                    .iter_mut()
                    .map(|p| rx_serial.decap_in_place(p))
                    .collect();
                let mut got = vec![Err(DropReason::BadLength); pkts.len()];
                rx_batch.decap_batch_in_place(&mut pkts, &mut got);
                assert_eq!(got, want, "round {round}, esn {esn}");
                assert_eq!(pkts, want_bufs, "decrypted bytes, round {round}");
                assert_eq!(rx_batch.stats(), rx_serial.stats());
                assert_eq!(rx_batch.rx_highest_seq(), rx_serial.rx_highest_seq());
            }
            assert!(rx_serial.stats().decap_packets > 100);
            for r in [DropReason::Replay, DropReason::Auth, DropReason::BadLength] {
                assert!(rx_serial.stats().drops.get(r) > 0, "{r:?} exercised");
            }
            if esn {
                assert!(rx_serial.rx_highest_seq() > 1u64 << 32);
            }
        }
    }
}
