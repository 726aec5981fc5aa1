//! The cryptographic primitives of an SA: AES-CBC (RFC 3602) in place, HMAC-SHA-256-128
//! (RFC 4868), and the per-packet IV generator.
//!
//! Backend: the RustCrypto `aes` (AES-NI/VAES detected at run time), `cbc`, `hmac` and `sha2`
//! (SHA-NI detected at run time) crates, chosen by the measurement in `examples/esp_bench.rs`
//! (against aws-lc-rs 1.19 and RustCrypto aes 0.9/cbc 0.2/hmac 0.13/sha2 0.11, which were no
//! faster for ESP as a whole). CBC encryption is our own loop over the `aes` backend; the `cbc`
//! crate does the (parallel) decryption.

use aes::cipher::{
    block_padding::NoPadding, consts::U16, BlockBackend, BlockClosure, BlockDecryptMut,
    BlockEncrypt, BlockSizeUser, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::sha256_multi::HmacKeys;

pub const BLOCK_LEN: usize = 16;
pub const IV_LEN: usize = 16;
/// HMAC-SHA-256-128: the ICV is the HMAC-SHA-256 output truncated to 128 bits.
pub const ICV_LEN: usize = 16;
pub const AUTH_KEY_LEN: usize = 32;

/// AES with a 128-, 192- or 256-bit key, chosen by the key length.
#[derive(Clone)]
pub enum Cipher {
    Aes128(Aes128),
    Aes192(Aes192),
    Aes256(Aes256),
}

/// CBC encryption in place, as a closure run by the cipher's backend (`encrypt_with_backend`):
/// the chaining block stays a local value across the loop, so each block costs the AES rounds
/// plus one XOR on the serial dependency chain. The `cbc` crate's `Encryptor` keeps its chaining
/// value in its own state and measured ~28% slower at 1424 bytes (AES-NI), which made ESP encap
/// 6-11% slower in `examples/esp_bench.rs`. This also borrows the key schedule instead of
/// cloning it per packet.
struct CbcEncrypt<'a> {
    iv: aes::Block,
    data: &'a mut [u8],
}

impl BlockSizeUser for CbcEncrypt<'_> {
    type BlockSize = U16;
}

impl BlockClosure for CbcEncrypt<'_> {
    #[inline(always)]
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let mut chain = self.iv;
        for block in self.data.chunks_exact_mut(BLOCK_LEN) {
            for (c, p) in chain.iter_mut().zip(block.iter()) {
                *c ^= *p;
            }
            backend.proc_block_inplace(&mut chain);
            block.copy_from_slice(&chain);
        }
    }
}

fn cbc_encrypt<C: BlockEncrypt<BlockSize = U16>>(c: &C, iv: &[u8; IV_LEN], data: &mut [u8]) {
    c.encrypt_with_backend(CbcEncrypt {
        iv: (*iv).into(),
        data,
    });
}

fn cbc_decrypt<C: aes::cipher::BlockDecrypt + Clone + aes::cipher::BlockCipher>(
    c: &C,
    iv: &[u8; IV_LEN],
    data: &mut [u8],
) where
    cbc::Decryptor<C>: InnerIvInit<Inner = C> + BlockDecryptMut,
{
    let dec = cbc::Decryptor::<C>::inner_iv_slice_init(c.clone(), iv).expect("16-byte IV");
    let _ = dec.decrypt_padded_mut::<NoPadding>(data);
}

impl Cipher {
    /// A cipher for a 16-, 24- or 32-byte key; `None` for any other length.
    pub fn new(key: &[u8]) -> Option<Cipher> {
        Some(match key.len() {
            16 => Cipher::Aes128(Aes128::new_from_slice(key).ok()?),
            24 => Cipher::Aes192(Aes192::new_from_slice(key).ok()?),
            32 => Cipher::Aes256(Aes256::new_from_slice(key).ok()?),
            _ => return None,
        })
    }

    /// Key length in bits.
    pub fn key_bits(&self) -> u32 {
        match self {
            Cipher::Aes128(_) => 128,
            Cipher::Aes192(_) => 192,
            Cipher::Aes256(_) => 256,
        }
    }

    /// CBC-encrypt `data` in place. `data.len()` must be a multiple of 16.
    pub fn cbc_encrypt(&self, iv: &[u8; IV_LEN], data: &mut [u8]) {
        debug_assert_eq!(data.len() % BLOCK_LEN, 0);
        match self {
            Cipher::Aes128(c) => cbc_encrypt(c, iv, data),
            Cipher::Aes192(c) => cbc_encrypt(c, iv, data),
            Cipher::Aes256(c) => cbc_encrypt(c, iv, data),
        }
    }

    /// CBC-decrypt `data` in place. `data.len()` must be a multiple of 16.
    pub fn cbc_decrypt(&self, iv: &[u8; IV_LEN], data: &mut [u8]) {
        debug_assert_eq!(data.len() % BLOCK_LEN, 0);
        match self {
            Cipher::Aes128(c) => cbc_decrypt(c, iv, data),
            Cipher::Aes192(c) => cbc_decrypt(c, iv, data),
            Cipher::Aes256(c) => cbc_decrypt(c, iv, data),
        }
    }

    /// Encrypt one block in place (the raw block cipher, ECB on a single block).
    pub fn encrypt_block(&self, block: &mut [u8; BLOCK_LEN]) {
        let b = aes::Block::from_mut_slice(block);
        match self {
            Cipher::Aes128(c) => c.encrypt_block(b),
            Cipher::Aes192(c) => c.encrypt_block(b),
            Cipher::Aes256(c) => c.encrypt_block(b),
        }
    }
}

/// HMAC-SHA-256 keyed once: the `hmac` crate's keyed state (which holds the key's inner and
/// outer midstates, so a clone per packet costs no key compressions) for one message, and the
/// same midstates in [`HmacKeys`] for several messages interleaved on SHA-NI.
#[derive(Clone)]
pub struct Hmac256 {
    one: Hmac<Sha256>,
    multi: HmacKeys,
}

impl Hmac256 {
    /// Any key length is valid for HMAC (RFC 2104); the ESP SA enforces RFC 4868's 32 bytes.
    pub fn new(key: &[u8]) -> Hmac256 {
        Hmac256 {
            one: <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"),
            multi: HmacKeys::new(key),
        }
    }

    /// The full 32-byte HMAC-SHA-256 of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.one.clone();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// The 128-bit truncated ICV (RFC 4868) of the concatenation of `parts`.
    pub fn icv(&self, parts: &[&[u8]]) -> [u8; ICV_LEN] {
        let full = self.mac(parts);
        let mut out = [0u8; ICV_LEN];
        out.copy_from_slice(&full[..ICV_LEN]);
        out
    }

    /// The ICVs of several messages, each `body || suffix` (the suffix at most
    /// [`MAX_SUFFIX`](crate::sha256_multi::MAX_SUFFIX) bytes, e.g. ESN's high sequence bits), computed together
    /// (interleaved on SHA-NI); `out[i]` is `icv(&[body_i, suffix_i])` for every `i` below the
    /// shorter of the two slices.
    pub fn icv_multi(&self, msgs: &[(&[u8], &[u8])], out: &mut [[u8; ICV_LEN]]) {
        const CHUNK: usize = 8;
        let n = msgs.len().min(out.len());
        for (m, o) in msgs[..n].chunks(CHUNK).zip(out[..n].chunks_mut(CHUNK)) {
            let mut full = [[0u8; 32]; CHUNK];
            self.multi.mac_multi(m, &mut full);
            for (o, f) in o.iter_mut().zip(&full) {
                o.copy_from_slice(&f[..ICV_LEN]);
            }
        }
    }
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Unpredictable per-packet IVs without a system call per packet.
///
/// NIST SP 800-38A, Appendix C, first method: the IV is the forward cipher, under the SA's
/// own encryption key, applied to a nonce that is unique per message. The nonce is a random
/// 64-bit salt drawn once per SA from the OS CSPRNG followed by a 64-bit message counter, so it
/// never repeats for the life of the SA, and the IV is unpredictable to anyone without the key.
#[derive(Clone)]
pub struct IvGenerator {
    salt: [u8; 8],
    counter: u64,
}

impl IvGenerator {
    /// Draws the salt from the OS. Fails only if the OS has no randomness to give.
    pub fn new() -> Result<IvGenerator, getrandom::Error> {
        let mut salt = [0u8; 8];
        getrandom::getrandom(&mut salt)?;
        Ok(IvGenerator { salt, counter: 0 })
    }

    /// The next IV, encrypted with `cipher`.
    pub fn next_iv(&mut self, cipher: &Cipher) -> [u8; IV_LEN] {
        let mut block = self.next_nonce();
        cipher.encrypt_block(&mut block);
        block
    }

    /// The next nonce block (salt, counter), before encryption: [`next_iv`](Self::next_iv) is
    /// this encrypted; batched encapsulation encrypts several at once.
    pub fn next_nonce(&mut self) -> [u8; IV_LEN] {
        self.counter = self.counter.wrapping_add(1);
        self.nonce_at(self.counter)
    }

    /// The nonce block of counter value `counter` (the counter itself is not moved): threads
    /// sharing one SA each encrypt the nonces of the counter values they reserved.
    pub fn nonce_at(&self, counter: u64) -> [u8; IV_LEN] {
        let mut block = [0u8; IV_LEN];
        block[..8].copy_from_slice(&self.salt);
        block[8..].copy_from_slice(&counter.to_be_bytes());
        block
    }

    /// The last counter value used (0: none yet).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    pub(crate) fn counter_mut(&mut self) -> &mut u64 {
        &mut self.counter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::BlockEncryptMut;

    /// The `cbc` crate's encryptor, as the reference for our own CBC-encrypt loop.
    fn reference_encrypt<C>(c: C, iv: &[u8; IV_LEN], data: &mut [u8])
    where
        C: BlockEncryptMut + aes::cipher::BlockCipher,
        cbc::Encryptor<C>: InnerIvInit<Inner = C> + BlockEncryptMut,
    {
        let n = data.len();
        let enc = cbc::Encryptor::<C>::inner_iv_slice_init(c, iv).unwrap();
        enc.encrypt_padded_mut::<NoPadding>(data, n).unwrap();
    }

    #[test]
    fn cbc_matches_reference_and_roundtrips() {
        for key_len in [16, 24, 32] {
            let key: Vec<u8> = (0..key_len as u8)
                .map(|i| i.wrapping_mul(37) ^ 0x5c)
                .collect();
            let cipher = Cipher::new(&key).unwrap();
            for blocks in 0..=20 {
                let iv: [u8; IV_LEN] = core::array::from_fn(|i| (i * 11 + blocks) as u8);
                let plain: Vec<u8> = (0..blocks * BLOCK_LEN)
                    .map(|i| (i * 7 + key_len) as u8)
                    .collect();
                let mut ours = plain.clone();
                cipher.cbc_encrypt(&iv, &mut ours);
                let mut theirs = plain.clone();
                match key_len {
                    16 => {
                        reference_encrypt(Aes128::new_from_slice(&key).unwrap(), &iv, &mut theirs)
                    }
                    24 => {
                        reference_encrypt(Aes192::new_from_slice(&key).unwrap(), &iv, &mut theirs)
                    }
                    _ => reference_encrypt(Aes256::new_from_slice(&key).unwrap(), &iv, &mut theirs),
                }
                assert_eq!(ours, theirs, "AES-{} CBC, {blocks} blocks", key_len * 8);
                cipher.cbc_decrypt(&iv, &mut ours);
                assert_eq!(ours, plain);
            }
        }
    }

    #[test]
    fn rfc3602_case_2() {
        // RFC 3602 §4, Case #2: AES-128-CBC, 32 bytes.
        let key = hex("c286696d887c9aa0611bbb3e2025a45a");
        let iv: [u8; 16] = hex("562e17996d093d28ddb3ba695a2e6f58").try_into().unwrap();
        let plain: Vec<u8> = (0u8..32).collect();
        let want = hex("d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1");
        let cipher = Cipher::new(&key).unwrap();
        let mut data = plain.clone();
        cipher.cbc_encrypt(&iv, &mut data);
        assert_eq!(data, want);
        cipher.cbc_decrypt(&iv, &mut data);
        assert_eq!(data, plain);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
