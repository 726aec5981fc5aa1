//! Multi-buffer AES-CBC encryption: several independent packets' CBC chains interleaved.
//!
//! CBC encryption is serial within a packet (each block needs the previous ciphertext block),
//! so one packet runs at the AES instruction's *latency*. Across packets the chains are
//! independent: feeding block `i` of up to [`LANES`] packets to the backend's parallel-blocks
//! path (`proc_par_blocks`, 8 blocks for AES-NI in `aes` 0.8) lets the AES unit pipeline them,
//! approaching its *throughput* instead. The result is byte for byte what the serial
//! [`Cipher::cbc_encrypt`] produces for each packet.
//!
//! Lanes advance together, one block of each per step; a lane that has run out of blocks rides
//! along (its slot is encrypted and discarded), so lanes of similar length make the best use of
//! the backend. Decryption needs none of this: CBC decryption is already parallel within a
//! packet (the `cbc` crate does it 8 blocks at a time).

use aes::cipher::{
    consts::U16, typenum::Unsigned, BlockBackend, BlockClosure, BlockEncrypt, BlockSizeUser,
    ParBlocks,
};

use crate::crypto::{Cipher, BLOCK_LEN, IV_LEN};

/// The most lanes one backend pass interleaves (AES-NI's parallel width in `aes` 0.8).
pub const LANES: usize = 8;

struct CbcMulti<'a, 'b> {
    ivs: &'a [[u8; IV_LEN]],
    data: &'a mut [&'b mut [u8]],
}

impl BlockSizeUser for CbcMulti<'_, '_> {
    type BlockSize = U16;
}

impl BlockClosure for CbcMulti<'_, '_> {
    #[inline(always)]
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let width = B::ParBlocksSize::USIZE;
        for (ivs, lanes) in self.ivs.chunks(width).zip(self.data.chunks_mut(width)) {
            let mut chains: ParBlocks<B> = Default::default();
            for (c, iv) in chains.iter_mut().zip(ivs) {
                c.copy_from_slice(iv);
            }
            let longest = lanes.iter().map(|l| l.len()).max().unwrap_or(0);
            let mut off = 0;
            while off < longest {
                for (c, lane) in chains.iter_mut().zip(lanes.iter()) {
                    if let Some(p) = lane.get(off..off + BLOCK_LEN) {
                        for (x, y) in c.iter_mut().zip(p) {
                            *x ^= *y;
                        }
                    }
                }
                backend.proc_par_blocks_inplace(&mut chains);
                for (c, lane) in chains.iter().zip(lanes.iter_mut()) {
                    if let Some(p) = lane.get_mut(off..off + BLOCK_LEN) {
                        p.copy_from_slice(c);
                    }
                }
                off += BLOCK_LEN;
            }
        }
    }
}

/// CBC-encrypt `data[i]` in place under `ivs[i]`, for every `i` below the shorter of the two
/// slices, interleaving the chains. Each `data[i].len()` must be a multiple of 16.
pub fn cbc_encrypt_multi(cipher: &Cipher, ivs: &[[u8; IV_LEN]], data: &mut [&mut [u8]]) {
    debug_assert!(data.iter().all(|d| d.len() % BLOCK_LEN == 0));
    let n = ivs.len().min(data.len());
    let job = CbcMulti {
        ivs: &ivs[..n],
        data: &mut data[..n],
    };
    match cipher {
        Cipher::Aes128(c) => c.encrypt_with_backend(job),
        Cipher::Aes192(c) => c.encrypt_with_backend(job),
        Cipher::Aes256(c) => c.encrypt_with_backend(job),
    }
}

/// Encrypt independent blocks (ECB) in place, in parallel: used for a batch's IVs.
pub fn encrypt_blocks(cipher: &Cipher, blocks: &mut [aes::Block]) {
    match cipher {
        Cipher::Aes128(c) => c.encrypt_blocks(blocks),
        Cipher::Aes192(c) => c.encrypt_blocks(blocks),
        Cipher::Aes256(c) => c.encrypt_blocks(blocks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Key, IV, plaintext, ciphertext.
    type Vector = (Vec<u8>, [u8; 16], Vec<u8>, Vec<u8>);

    /// RFC 3602 §4 test cases #1-#4 (AES-128-CBC), also checked with `openssl enc -nopad`.
    fn rfc3602() -> Vec<Vector> {
        let v = |k: &str, iv: &str, p: Vec<u8>, c: &str| {
            (hex(k), hex(iv).try_into().unwrap(), p, hex(c))
        };
        vec![
            v(
                "06a9214036b8a15b512e03d534120006",
                "3dafba429d9eb430b422da802c9fac41",
                b"Single block msg".to_vec(),
                "e353779c1079aeb82708942dbe77181a",
            ),
            v(
                "c286696d887c9aa0611bbb3e2025a45a",
                "562e17996d093d28ddb3ba695a2e6f58",
                (0u8..32).collect(),
                "d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1",
            ),
            v(
                "6c3ea0477630ce21a2ce334aa746c2cd",
                "c782dc4c098c66cbd9cd27d825682c81",
                b"This is a 48-byte message (exactly 3 AES blocks)".to_vec(),
                "d0a02b3836451753d493665d33f0e8862dea54cdb293abc7506939276772f8d5\
                 021c19216bad525c8579695d83ba2684",
            ),
            v(
                "56e47a38c5598974bc46903dba290349",
                "8ce82eefbea0da3c44699ed7db51b7d9",
                (0xa0u8..0xe0).collect(),
                "c30e32ffedc0774e6aff6af0869f71aa0f3af07a9a31a9c684db207eb0ef8e4e\
                 35907aa632c3ffdf868bb7b29d3d46ad83ce9f9a102ee99d49a53e87f4c3da55",
            ),
        ]
    }

    #[test]
    fn rfc3602_vectors_in_every_lane() {
        for (key, iv, plain, want) in rfc3602() {
            let cipher = Cipher::new(&key).unwrap();
            // The vector alone, and as every lane of 11 (so it also runs in the partial group).
            for lanes in [1usize, 11] {
                let ivs = vec![iv; lanes];
                let mut bufs = vec![plain.clone(); lanes];
                let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                cbc_encrypt_multi(&cipher, &ivs, &mut refs);
                assert!(bufs.iter().all(|b| *b == want));
            }
        }
    }

    #[test]
    fn matches_serial_for_mixed_lengths() {
        for key_len in [16usize, 24, 32] {
            let key: Vec<u8> = (0..key_len as u8).map(|i| i ^ 0x3c).collect();
            let cipher = Cipher::new(&key).unwrap();
            for n in [0usize, 1, 2, 7, 8, 9, 16, 17, 33] {
                let ivs: Vec<[u8; 16]> = (0..n)
                    .map(|i| core::array::from_fn(|j| (i * 16 + j) as u8))
                    .collect();
                // Lengths 0..=100 blocks, deliberately uneven.
                let plains: Vec<Vec<u8>> = (0..n)
                    .map(|i| {
                        let blocks = (i * 37 + key_len) % 101;
                        (0..blocks * 16).map(|k| (k * 13 + i) as u8).collect()
                    })
                    .collect();
                let mut multi = plains.clone();
                let mut refs: Vec<&mut [u8]> = multi.iter_mut().map(|b| b.as_mut_slice()).collect();
                cbc_encrypt_multi(&cipher, &ivs, &mut refs);
                for i in 0..n {
                    let mut serial = plains[i].clone();
                    cipher.cbc_encrypt(&ivs[i], &mut serial);
                    assert_eq!(multi[i], serial, "AES-{} lane {i} of {n}", key_len * 8);
                }
            }
        }
    }

    #[test]
    fn ecb_blocks_match_single_block() {
        let cipher = Cipher::new(&[9u8; 16]).unwrap();
        let mut blocks: Vec<aes::Block> = (0..19u8).map(|i| [i; 16].into()).collect();
        encrypt_blocks(&cipher, &mut blocks);
        for (i, b) in blocks.iter().enumerate() {
            let mut one = [i as u8; 16];
            cipher.encrypt_block(&mut one);
            assert_eq!(b.as_slice(), &one[..]);
        }
    }
}
