//! Batched ESP: several packets per call. Encapsulation encrypts their IVs together,
//! interleaves their CBC chains through [`cbc_multi`](crate::cbc_multi) and their HMACs through
//! [`sha256_multi`](crate::sha256_multi) (two SHA-NI streams at a time); decapsulation computes
//! the ICVs of a batch together. Byte for byte the same packets, sequence numbers, results and
//! counters as calling [`SecurityAssociation::encap_in_place`] /
//! [`SecurityAssociation::decap_in_place`] on each in turn.
//!
//! Shared outbound SAs: [`SecurityAssociation::reserve_tx`] takes a block of sequence numbers
//! and IV nonces from a [`TxCounters`] (kept under the caller's lock, a few instructions), and
//! [`SecurityAssociation::encap_reserved`] encrypts the block with `&self` only (the keys do
//! not change), so several threads encapsulate with one SA at once, none waiting on another's
//! crypto. Every sequence number and IV is still used once.

use super::*;
use crate::cbc_multi::{self, LANES};

/// The mutable outbound state of an SA whose keys several threads share: the last sequence
/// number and IV nonce counter handed out, and the encapsulation counters. Take it from the
/// SA with [`SecurityAssociation::tx_counters`] (after any `skip_tx_seq_to`), keep it under
/// one lock, and reserve from it with [`SecurityAssociation::reserve_tx`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxCounters {
    seq: u64,
    nonce: u64,
    stats: SaStats,
}

impl TxCounters {
    /// The last sequence number handed out (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// The SA's counters: `encap_packets`/`encap_bytes` count reserved packets (a reserved
    /// block is always encapsulated: buffer sizes were checked when it was reserved), and
    /// `SeqExhausted` drops the packets that found no sequence number.
    pub fn stats(&self) -> &SaStats {
        &self.stats
    }
}

/// Sequence numbers and IV nonces reserved for one batch of packets: packet `i` of the batch
/// gets sequence number `first_seq() + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "reserved sequence numbers are lost unless the block is encapsulated"]
pub struct TxBlock {
    /// The sequence number and nonce counter before the block's first.
    seq: u64,
    nonce: u64,
    n: usize,
}

impl TxBlock {
    /// How many packets, from the front of the batch, got a sequence number (fewer than asked
    /// only when the sequence number space ran out).
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn first_seq(&self) -> u64 {
        self.seq + 1
    }
}

fn check_bufs<B: AsRef<[u8]>>(bufs: &[B], inner_lens: &[usize]) -> Result<(), EncapError> {
    for (b, &len) in bufs.iter().zip(inner_lens) {
        let total = encap_len(len);
        let got = b.as_ref().len();
        if got < total {
            return Err(EncapError::BufferTooSmall { needed: total, got });
        }
    }
    Ok(())
}

/// Hand out the next `inner_lens.len()` sequence numbers and nonces (as many as remain below
/// `limit`), counting the packets as encapsulated and the rest as `SeqExhausted` drops.
fn reserve(
    limit: u64,
    seq: &mut u64,
    nonce: &mut u64,
    stats: &mut SaStats,
    inner_lens: &[usize],
) -> TxBlock {
    let n = inner_lens.len();
    let avail = (limit - *seq).min(n as u64) as usize;
    for _ in avail..n {
        stats.drops.bump(DropReason::SeqExhausted);
    }
    let blk = TxBlock {
        seq: *seq,
        nonce: *nonce,
        n: avail,
    };
    *seq += avail as u64;
    *nonce = nonce.wrapping_add(avail as u64);
    stats.encap_packets += avail as u64;
    stats.encap_bytes += inner_lens[..avail].iter().map(|&l| l as u64).sum::<u64>();
    blk
}

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
    pub fn encap_batch_in_place<B: AsMut<[u8]> + AsRef<[u8]>>(
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
        check_bufs(&bufs[..n], &inner_lens[..n])?;
        let limit = self.seq_limit();
        let blk = reserve(
            limit,
            &mut self.tx_seq,
            self.ivgen.counter_mut(),
            &mut self.stats,
            &inner_lens[..n],
        );
        self.seal(blk, bufs, inner_lens, next_headers, out_lens, true);
        Ok(blk.n)
    }

    /// This SA's outbound state now, for [`reserve_tx`](Self::reserve_tx): its last sequence
    /// number (as preset by [`skip_tx_seq_to`](Self::skip_tx_seq_to)), IV counter and counters.
    /// From then on the SA itself is only read (its own `tx_seq` stays where it was).
    pub fn tx_counters(&self) -> TxCounters {
        TxCounters {
            seq: self.tx_seq,
            nonce: self.ivgen.counter(),
            stats: self.stats.clone(),
        }
    }

    /// Reserve sequence numbers and IV nonces from `tx` for the first `n` packets of a batch
    /// (`n` the shorter of the two slices), after checking that each buffer holds its ESP
    /// packet (`BufferTooSmall` changes nothing). Packets beyond the sequence number space are
    /// counted as `SeqExhausted` drops and get none (see [`TxBlock::len`]). Encapsulate the
    /// block with [`encap_reserved`](Self::encap_reserved), outside the lock guarding `tx`.
    pub fn reserve_tx<B: AsRef<[u8]>>(
        &self,
        tx: &mut TxCounters,
        bufs: &[B],
        inner_lens: &[usize],
    ) -> Result<TxBlock, EncapError> {
        let n = bufs.len().min(inner_lens.len());
        check_bufs(&bufs[..n], &inner_lens[..n])?;
        Ok(reserve(
            self.seq_limit(),
            &mut tx.seq,
            &mut tx.nonce,
            &mut tx.stats,
            &inner_lens[..n],
        ))
    }

    /// Encapsulate the packets of `blk` (reserved from this SA's [`TxCounters`] for the same
    /// buffers and lengths) in place, as [`encap_batch_in_place`](Self::encap_batch_in_place)
    /// would, with `&self` only: threads sharing the SA run this at the same time. Returns how
    /// many packets were encapsulated (`blk.len()`); `BufferTooSmall` if the buffers are not
    /// the ones reserved for (nothing is written then).
    pub fn encap_reserved<B: AsMut<[u8]> + AsRef<[u8]>>(
        &self,
        blk: TxBlock,
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
        if n < blk.n {
            return Err(EncapError::BufferTooSmall {
                needed: blk.n,
                got: n,
            });
        }
        check_bufs(&bufs[..blk.n], &inner_lens[..blk.n])?;
        self.seal(blk, bufs, inner_lens, next_headers, out_lens, false);
        Ok(blk.n)
    }

    /// Write the ESP packets of `blk` (sizes checked by the caller). A block of one packet
    /// takes the serial cipher path unless `lanes_always` (the lane set-up does not pay for one
    /// lane; the bytes are the same either way).
    fn seal<B: AsMut<[u8]>>(
        &self,
        blk: TxBlock,
        bufs: &mut [B],
        inner_lens: &[usize],
        next_headers: &[u8],
        out_lens: &mut [usize],
        lanes_always: bool,
    ) {
        let mut start = 0;
        while start < blk.n {
            let k = LANES.min(blk.n - start);
            let group = &mut bufs[start..start + k];
            let lens = &inner_lens[start..start + k];
            let nhs = &next_headers[start..start + k];
            let seq0 = blk.seq + 1 + start as u64;
            let nonce0 = blk.nonce.wrapping_add(1 + start as u64);

            let mut ivb: [aes::Block; LANES] = Default::default();
            for (i, b) in ivb[..k].iter_mut().enumerate() {
                b.copy_from_slice(&self.ivgen.nonce_at(nonce0.wrapping_add(i as u64)));
            }
            let serial = k == 1 && blk.n == 1 && !lanes_always;
            if serial {
                let mut iv = [0u8; IV_LEN];
                iv.copy_from_slice(&ivb[0]);
                self.cipher.encrypt_block(&mut iv);
                ivb[0].copy_from_slice(&iv);
            } else {
                cbc_multi::encrypt_blocks(&self.cipher, &mut ivb[..k]);
            }
            let mut ivs = [[0u8; IV_LEN]; LANES];
            for (iv, b) in ivs.iter_mut().zip(&ivb[..k]) {
                iv.copy_from_slice(b);
            }

            let mut lanes: [&mut [u8]; LANES] = Default::default();
            for (i, (lane, b)) in lanes.iter_mut().zip(group.iter_mut()).enumerate() {
                let buf = b.as_mut();
                let (inner_len, plen) = (lens[i], padded_len(lens[i]));
                let seq = seq0 + i as u64;
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
            if serial {
                self.cipher.cbc_encrypt(&ivs[0], lanes[0]);
            } else {
                cbc_multi::cbc_encrypt_multi(&self.cipher, &ivs[..k], &mut lanes[..k]);
            }

            self.seal_icvs(group, lens, seq0, &mut out_lens[start..start + k]);
            start += k;
        }
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
    /// Reserve + encap_reserved makes the bytes the serial path makes, and the counters.
    #[test]
    fn reserved_blocks_match_serial() {
        for esn in [false, true] {
            let mut serial = sa(16, esn);
            if esn {
                assert!(serial.skip_tx_seq_to((1u64 << 32) - 3));
            }
            let shared = serial.clone();
            let mut tx = shared.tx_counters();
            for n in [1usize, 2, 9] {
                let lens: Vec<usize> = (0..n).map(|i| [0, 40, 1420, 8000][i % 4]).collect();
                let nhs = vec![4u8; n];
                let mut bufs: Vec<Vec<u8>> = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        let mut b = vec![0u8; encap_len(l)];
                        b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + l].copy_from_slice(&inner(i, l));
                        b
                    })
                    .collect();
                let want: Vec<Vec<u8>> = (0..n)
                    .map(|i| {
                        let mut b = bufs[i].clone();
                        let len = serial.encap_in_place(&mut b, lens[i], 4).unwrap();
                        b[..len].to_vec()
                    })
                    .collect();
                let blk = shared.reserve_tx(&mut tx, &bufs, &lens).unwrap();
                assert_eq!(blk.len(), n);
                let mut out = vec![0usize; n];
                assert_eq!(
                    shared.encap_reserved(blk, &mut bufs, &lens, &nhs, &mut out),
                    Ok(n)
                );
                for i in 0..n {
                    assert_eq!(&bufs[i][..out[i]], &want[i][..]);
                }
                assert_eq!(tx.seq(), serial.tx_seq());
                assert_eq!(tx.stats(), serial.stats());
            }
        }
        // A too-small buffer reserves nothing.
        let a = sa(16, false);
        let mut tx = a.tx_counters();
        let bufs = [vec![0u8; encap_len(100) - 1]];
        assert!(a.reserve_tx(&mut tx, &bufs, &[100]).is_err());
        assert_eq!(tx.seq(), 0);
        assert_eq!(tx.stats().encap_packets, 0);
    }

    /// Many threads encapsulate with one SA, reserving under a lock and encrypting outside it:
    /// every sequence number is used exactly once, every IV is distinct, every packet
    /// verifies and decrypts at the receiver, and the counters are exact.
    #[test]
    fn concurrent_encap_on_one_sa() {
        use std::collections::HashSet;
        use std::sync::{Arc, Mutex};
        const THREADS: usize = 8;
        const ROUNDS: usize = 200;
        let tx_sa = Arc::new(sa(16, false));
        let tx = Arc::new(Mutex::new(tx_sa.tx_counters()));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (sa, tx) = (tx_sa.clone(), tx.clone());
                std::thread::spawn(move || {
                    let mut made = Vec::new();
                    for r in 0..ROUNDS {
                        let n = 1 + (t * 7 + r) % 12;
                        let lens: Vec<usize> =
                            (0..n).map(|i| 20 + (t * 31 + r + i) % 1400).collect();
                        let mut bufs: Vec<Vec<u8>> = lens
                            .iter()
                            .enumerate()
                            .map(|(i, &l)| {
                                let mut b = vec![0u8; encap_len(l)];
                                let tag = (t << 24 | r << 8 | i) as u64;
                                let mut p = inner(i, l);
                                p[1..9].copy_from_slice(&tag.to_be_bytes());
                                b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + l].copy_from_slice(&p);
                                b
                            })
                            .collect();
                        let blk = sa
                            .reserve_tx(&mut tx.lock().unwrap(), &bufs, &lens)
                            .unwrap();
                        let mut out = vec![0usize; n];
                        let nhs = vec![4u8; n];
                        assert_eq!(
                            sa.encap_reserved(blk, &mut bufs, &lens, &nhs, &mut out),
                            Ok(n)
                        );
                        for (i, b) in bufs.iter().enumerate() {
                            let tag = (t << 24 | r << 8 | i) as u64;
                            made.push((tag, lens[i], b[..out[i]].to_vec()));
                        }
                    }
                    made
                })
            })
            .collect();
        let mut all: Vec<(u64, usize, Vec<u8>)> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let total = all.len();
        all.sort_by_key(|(_, _, p)| u32::from_be_bytes(p[4..8].try_into().unwrap()));
        let seqs: Vec<u32> = all
            .iter()
            .map(|(_, _, p)| u32::from_be_bytes(p[4..8].try_into().unwrap()))
            .collect();
        assert_eq!(seqs, (1..=total as u32).collect::<Vec<_>>());
        let ivs: HashSet<&[u8]> = all.iter().map(|(_, _, p)| &p[8..24]).collect();
        assert_eq!(ivs.len(), total);
        let mut rx = sa(16, false);
        let mut bytes = 0u64;
        for (tag, len, p) in &all {
            let (nh, got) = rx.decap(p).unwrap();
            assert_eq!((nh, got.len()), (4, *len));
            assert_eq!(u64::from_be_bytes(got[1..9].try_into().unwrap()), *tag);
            bytes += *len as u64;
        }
        let tx = tx.lock().unwrap();
        assert_eq!(tx.seq(), total as u64);
        assert_eq!(tx.stats().encap_packets, total as u64);
        assert_eq!(tx.stats().encap_bytes, bytes);
        assert_eq!(rx.stats().decap_packets, total as u64);
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
