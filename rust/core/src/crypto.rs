//! The cryptographic primitives of an SA: AES-CBC (RFC 3602) in place, HMAC-SHA-256-128
//! (RFC 4868), and the per-packet IV generator.
//!
//! Backend: the RustCrypto `aes` (AES-NI/VAES detected at run time), `cbc`, `hmac` and `sha2`
//! (SHA-NI detected at run time) crates, chosen by the measurement in `examples/esp_bench.rs`.

use aes::cipher::{
    block_padding::NoPadding, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

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

fn cbc_encrypt<C: BlockEncryptMut + BlockEncrypt + Clone + aes::cipher::BlockCipher>(
    c: &C,
    iv: &[u8; IV_LEN],
    data: &mut [u8],
) where
    cbc::Encryptor<C>: InnerIvInit<Inner = C> + BlockEncryptMut,
{
    let n = data.len();
    let enc = cbc::Encryptor::<C>::inner_iv_slice_init(c.clone(), iv).expect("16-byte IV");
    // NoPadding only fails when `data` is not a whole number of blocks, which callers ensure.
    let _ = enc.encrypt_padded_mut::<NoPadding>(data, n);
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

/// HMAC-SHA-256 keyed once; each packet clones the keyed state (no per-packet key schedule).
#[derive(Clone)]
pub struct Hmac256(Hmac<Sha256>);

impl Hmac256 {
    /// Any key length is valid for HMAC (RFC 2104); the ESP SA enforces RFC 4868's 32 bytes.
    pub fn new(key: &[u8]) -> Hmac256 {
        Hmac256(<Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"))
    }

    /// The full 32-byte HMAC-SHA-256 of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.0.clone();
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
        self.counter = self.counter.wrapping_add(1);
        let mut block = [0u8; IV_LEN];
        block[..8].copy_from_slice(&self.salt);
        block[8..].copy_from_slice(&self.counter.to_be_bytes());
        cipher.encrypt_block(&mut block);
        block
    }
}
