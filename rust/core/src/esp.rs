//! ESP (RFC 4303) tunnel-mode encapsulation over caller-owned buffers.
//!
//! Packet layout (no outer IP header; the transport carries it):
//!
//! ```text
//! | SPI (4) | seq (4) | IV (16) | AES-CBC( inner | pad 1,2,3.. | pad len | next hdr ) | ICV (16) |
//! ```
//!
//! The ICV is HMAC-SHA-256-128 over SPI..ciphertext, followed by the high 32 bits of the
//! sequence number when ESN is on (RFC 4303 §2.2.1; those bits are never sent).

use std::fmt;
use std::ops::Range;

use crate::crypto::{self, Cipher, Hmac256, IvGenerator, AUTH_KEY_LEN, BLOCK_LEN, ICV_LEN, IV_LEN};
use crate::drop::{DropCounters, DropReason};
use crate::replay::{ReplayError, ReplayWindow, DEFAULT_WINDOW, MAX_WINDOW, MIN_WINDOW};

mod batch;

pub use batch::{PreIcv, TxBlock, TxCounters};

/// SPI + sequence number.
pub const HEADER_LEN: usize = 8;
/// Offset of the (encrypted) payload: header + IV.
pub const PAYLOAD_OFFSET: usize = HEADER_LEN + IV_LEN;
/// The shortest well-formed packet: header, IV, one cipher block, ICV.
pub const MIN_PACKET_LEN: usize = PAYLOAD_OFFSET + BLOCK_LEN + ICV_LEN;
/// The most ESP can add to an inner packet: header, IV, 15 pad bytes, trailer, ICV.
pub const MAX_OVERHEAD: usize = PAYLOAD_OFFSET + (BLOCK_LEN - 1) + 2 + ICV_LEN;

pub const NH_IPV4: u8 = 4;
pub const NH_IPV6: u8 = 41;
pub const NH_ETHERNET: u8 = 143;
/// "No next header": a dummy packet (RFC 4303 §2.6), dropped silently by the receiver.
pub const NH_NONE: u8 = 59;
/// A TSO super-packet carried whole between two simpletun ends that both announced it (the
/// stream transport's negotiated mode): the payload is a [`crate::offload::SUPER_PREFIX_LEN`]-byte
/// prefix (`gso_type`, 0, `gso_size`) and one TCP/IP packet of up to 64 KiB. 253 is one of the
/// two IP protocol numbers RFC 3692 sets aside for experimentation and testing; it never leaves
/// the tunnel.
pub const NH_SUPER: u8 = 253;

pub use crate::replay::DEFAULT_WINDOW as DEFAULT_REPLAY_WINDOW;

/// Length of the encrypted part for an inner packet of `inner_len` bytes: inner, padding and
/// the 2-byte trailer, rounded up to the cipher block.
pub const fn padded_len(inner_len: usize) -> usize {
    (inner_len + 2).div_ceil(BLOCK_LEN) * BLOCK_LEN
}

/// Total ESP packet length for an inner packet of `inner_len` bytes.
pub const fn encap_len(inner_len: usize) -> usize {
    PAYLOAD_OFFSET + padded_len(inner_len) + ICV_LEN
}

/// Next header for an inner IP packet, from its version nibble: 4 → 4 (IPv4), 6 → 41 (IPv6).
pub fn infer_next_header(inner: &[u8]) -> Option<u8> {
    match inner.first().map(|b| b >> 4) {
        Some(4) => Some(NH_IPV4),
        Some(6) => Some(NH_IPV6),
        _ => None,
    }
}

/// A mistake in the parameters of a new SA (user input: keys, SPI, window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaConfigError {
    Spi(u32),
    EncKeyLength(usize),
    AuthKeyLength(usize),
    ReplayWindow(u32),
    Random(String),
}

impl fmt::Display for SaConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SaConfigError::Spi(s) => write!(
                f,
                "SPI {s:#x} is reserved (0 marks non-ESP frames, 1-255 are IANA-reserved); use 256 or above"
            ),
            SaConfigError::EncKeyLength(n) => write!(
                f,
                "encryption key is {n} bytes; AES-CBC needs 16, 24 or 32 bytes (AES-128/192/256)"
            ),
            SaConfigError::AuthKeyLength(n) => write!(
                f,
                "authentication key is {n} bytes; HMAC-SHA-256-128 (RFC 4868) needs exactly {AUTH_KEY_LEN}"
            ),
            SaConfigError::ReplayWindow(n) => write!(
                f,
                "replay window {n} is out of range; choose {MIN_WINDOW} to {MAX_WINDOW} packets (default {DEFAULT_WINDOW})"
            ),
            SaConfigError::Random(e) => write!(f, "the OS random number generator failed: {e}"),
        }
    }
}

impl std::error::Error for SaConfigError {}

/// Why an outbound packet could not be encapsulated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncapError {
    /// The sequence number space is used up; the SA must be replaced (rekeyed).
    SeqExhausted { esn: bool },
    /// The caller's buffer cannot hold the ESP packet.
    BufferTooSmall { needed: usize, got: usize },
    /// No next header was given and the inner packet is not IPv4 or IPv6.
    UnknownNextHeader,
}

impl fmt::Display for EncapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncapError::SeqExhausted { esn } => write!(
                f,
                "sequence number space exhausted ({} packets sent); create a new SA with fresh keys",
                if *esn { "2^64-1" } else { "2^32-1" }
            ),
            EncapError::BufferTooSmall { needed, got } => {
                write!(f, "output buffer holds {got} bytes; the ESP packet needs {needed}")
            }
            EncapError::UnknownNextHeader => f.write_str(
                "cannot infer next header: inner packet is neither IPv4 nor IPv6; pass next_header",
            ),
        }
    }
}

impl std::error::Error for EncapError {}

/// A successfully decapsulated packet: its next header and where the inner packet lies in the
/// buffer that was passed to [`SecurityAssociation::decap_in_place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapped {
    pub next_header: u8,
    pub inner: Range<usize>,
    /// The full (ESN-inferred) sequence number of the packet.
    pub seq: u64,
}

/// Packet and byte counters of one SA (bytes are inner-packet bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaStats {
    pub encap_packets: u64,
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    pub drops: DropCounters,
}

/// One ESP security association. As in RFC 4301 an SA describes one direction: a sender uses
/// [`encap_in_place`](Self::encap_in_place) (the outbound sequence counter), a receiver
/// [`decap_in_place`](Self::decap_in_place) (the replay window).
#[derive(Clone)]
pub struct SecurityAssociation {
    spi: u32,
    esn: bool,
    cipher: Cipher,
    mac: Hmac256,
    ivgen: IvGenerator,
    /// Last sequence number sent (0 = none yet).
    tx_seq: u64,
    window: ReplayWindow,
    stats: SaStats,
}

impl fmt::Debug for SecurityAssociation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityAssociation")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("aes_bits", &self.cipher.key_bits())
            .field("esn", &self.esn)
            .field("tx_seq", &self.tx_seq)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl SecurityAssociation {
    pub fn new(
        spi: u32,
        enc_key: &[u8],
        auth_key: &[u8],
        replay_window: u32,
        esn: bool,
    ) -> Result<SecurityAssociation, SaConfigError> {
        if spi < 256 {
            return Err(SaConfigError::Spi(spi));
        }
        let cipher = Cipher::new(enc_key).ok_or(SaConfigError::EncKeyLength(enc_key.len()))?;
        if auth_key.len() != AUTH_KEY_LEN {
            return Err(SaConfigError::AuthKeyLength(auth_key.len()));
        }
        let window =
            ReplayWindow::new(replay_window).ok_or(SaConfigError::ReplayWindow(replay_window))?;
        let ivgen = IvGenerator::new().map_err(|e| SaConfigError::Random(e.to_string()))?;
        Ok(SecurityAssociation {
            spi,
            esn,
            cipher,
            mac: Hmac256::new(auth_key),
            ivgen,
            tx_seq: 0,
            window,
            stats: SaStats::default(),
        })
    }

    pub fn spi(&self) -> u32 {
        self.spi
    }
    pub fn esn(&self) -> bool {
        self.esn
    }
    pub fn enc_key_bits(&self) -> u32 {
        self.cipher.key_bits()
    }
    pub fn replay_window(&self) -> u32 {
        self.window.size()
    }
    /// The last sequence number sent (0 before the first packet).
    pub fn tx_seq(&self) -> u64 {
        self.tx_seq
    }
    /// The highest sequence number received and authenticated (0 before the first).
    pub fn rx_highest_seq(&self) -> u64 {
        self.window.top()
    }
    pub fn stats(&self) -> &SaStats {
        &self.stats
    }

    /// Move the outbound counter forward so that the next packet uses `last + 1`. It can only
    /// move forward, so no sequence number is ever used twice under one key.
    pub fn skip_tx_seq_to(&mut self, last: u64) -> bool {
        if last < self.tx_seq {
            return false;
        }
        self.tx_seq = last;
        true
    }

    /// Start the inbound window after `last` (the peer's first packet is `last + 1`), as a
    /// kernel SA's replay state can be preset; only before any packet was accepted.
    pub fn skip_rx_seq_to(&mut self, last: u64) -> bool {
        if last >= self.seq_limit() {
            return false;
        }
        self.window.start_after(last)
    }

    fn seq_limit(&self) -> u64 {
        if self.esn {
            u64::MAX
        } else {
            u32::MAX as u64
        }
    }

    /// Encapsulate in place. The caller has put the inner packet at
    /// `buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + inner_len]`; `buf` must be at least
    /// [`encap_len(inner_len)`](encap_len) long. Returns the ESP packet length (the packet is
    /// `buf[..len]`).
    pub fn encap_in_place(
        &mut self,
        buf: &mut [u8],
        inner_len: usize,
        next_header: u8,
    ) -> Result<usize, EncapError> {
        let total = encap_len(inner_len);
        if buf.len() < total {
            return Err(EncapError::BufferTooSmall {
                needed: total,
                got: buf.len(),
            });
        }
        if self.tx_seq >= self.seq_limit() {
            self.stats.drops.bump(DropReason::SeqExhausted);
            return Err(EncapError::SeqExhausted { esn: self.esn });
        }
        self.tx_seq += 1;
        let seq = self.tx_seq;

        let plen = padded_len(inner_len);
        let pad = plen - inner_len - 2;
        let payload = &mut buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + plen];
        for (i, b) in payload[inner_len..inner_len + pad].iter_mut().enumerate() {
            *b = (i + 1) as u8;
        }
        payload[plen - 2] = pad as u8;
        payload[plen - 1] = next_header;

        let iv = self.ivgen.next_iv(&self.cipher);
        self.cipher.cbc_encrypt(&iv, payload);
        buf[0..4].copy_from_slice(&self.spi.to_be_bytes());
        buf[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        buf[HEADER_LEN..PAYLOAD_OFFSET].copy_from_slice(&iv);

        let authed_end = PAYLOAD_OFFSET + plen;
        let seq_hi = ((seq >> 32) as u32).to_be_bytes();
        let icv = if self.esn {
            self.mac.icv(&[&buf[..authed_end], &seq_hi])
        } else {
            self.mac.icv(&[&buf[..authed_end]])
        };
        buf[authed_end..total].copy_from_slice(&icv);

        self.stats.encap_packets += 1;
        self.stats.encap_bytes += inner_len as u64;
        Ok(total)
    }

    /// Encapsulate `inner` into a new buffer. `next_header` defaults to the inner packet's IP
    /// version (4 → 4, 6 → 41).
    pub fn encap(&mut self, inner: &[u8], next_header: Option<u8>) -> Result<Vec<u8>, EncapError> {
        let nh = match next_header {
            Some(nh) => nh,
            None => infer_next_header(inner).ok_or(EncapError::UnknownNextHeader)?,
        };
        let mut buf = vec![0u8; encap_len(inner.len())];
        buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + inner.len()].copy_from_slice(inner);
        let n = self.encap_in_place(&mut buf, inner.len(), nh)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Decapsulate `pkt` in place (it is decrypted where it lies). On success the inner packet
    /// is `pkt[d.inner]`. Checks, in order: length, replay window, ICV (constant time), then
    /// decrypts and checks the padding; the window is advanced only once the ICV verified.
    /// Every failure is counted in [`stats`](Self::stats).
    pub fn decap_in_place(&mut self, pkt: &mut [u8]) -> Result<Decapped, DropReason> {
        self.decap_counted(pkt, None)
    }

    /// [`decap_in_place`](Self::decap_in_place) with the ICV perhaps computed beforehand for
    /// sequence number `pre.0` (batched decap); any other inferred number computes it here.
    fn decap_counted(
        &mut self,
        pkt: &mut [u8],
        pre: Option<(u64, [u8; ICV_LEN])>,
    ) -> Result<Decapped, DropReason> {
        let r = self.decap_inner(pkt, pre);
        match &r {
            Ok(d) => {
                self.stats.decap_packets += 1;
                self.stats.decap_bytes += d.inner.len() as u64;
            }
            Err(reason) => self.stats.drops.bump(*reason),
        }
        r
    }

    /// The first checks of decap, which change nothing: length, then the replay window. The
    /// full sequence number the packet is taken for.
    fn decap_precheck(&self, pkt: &[u8]) -> Result<u64, DropReason> {
        let len = pkt.len();
        if len < MIN_PACKET_LEN || (len - PAYLOAD_OFFSET - ICV_LEN) % BLOCK_LEN != 0 {
            return Err(DropReason::BadLength);
        }
        let seq_low = u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
        let seq = if self.esn {
            self.window.infer_esn(seq_low)
        } else {
            seq_low as u64
        };
        self.window
            .check(seq)
            .map_err(|_: ReplayError| DropReason::Replay)?;
        Ok(seq)
    }

    fn decap_inner(
        &mut self,
        pkt: &mut [u8],
        pre: Option<(u64, [u8; ICV_LEN])>,
    ) -> Result<Decapped, DropReason> {
        let seq = self.decap_precheck(pkt)?;
        let len = pkt.len();
        let authed_end = len - ICV_LEN;
        let seq_hi = ((seq >> 32) as u32).to_be_bytes();
        let icv = match pre {
            Some((s, icv)) if s == seq => icv,
            _ if self.esn => self.mac.icv(&[&pkt[..authed_end], &seq_hi]),
            _ => self.mac.icv(&[&pkt[..authed_end]]),
        };
        if !crypto::ct_eq(&icv, &pkt[authed_end..]) {
            return Err(DropReason::Auth);
        }
        self.window.commit(seq);

        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&pkt[HEADER_LEN..PAYLOAD_OFFSET]);
        let payload = &mut pkt[PAYLOAD_OFFSET..authed_end];
        self.cipher.cbc_decrypt(&iv, payload);
        let plen = payload.len();
        let pad = payload[plen - 2] as usize;
        let next_header = payload[plen - 1];
        if pad + 2 > plen {
            return Err(DropReason::BadPadding);
        }
        let inner_len = plen - 2 - pad;
        let pad_ok = payload[inner_len..plen - 2]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i + 1) as u8);
        if !pad_ok {
            return Err(DropReason::BadPadding);
        }
        let inner = if next_header == NH_NONE {
            PAYLOAD_OFFSET..PAYLOAD_OFFSET
        } else {
            PAYLOAD_OFFSET..PAYLOAD_OFFSET + inner_len
        };
        Ok(Decapped {
            next_header,
            inner,
            seq,
        })
    }

    /// Decapsulate a copy of `pkt`, returning `(next_header, inner)`.
    pub fn decap(&mut self, pkt: &[u8]) -> Result<(u8, Vec<u8>), DropReason> {
        let mut buf = pkt.to_vec();
        let d = self.decap_in_place(&mut buf)?;
        Ok((d.next_header, buf[d.inner].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(esn: bool) -> (SecurityAssociation, SecurityAssociation) {
        let a = SecurityAssociation::new(0x0100_0000, &[7u8; 16], &[9u8; 32], 64, esn).unwrap();
        let b = SecurityAssociation::new(0x0100_0000, &[7u8; 16], &[9u8; 32], 64, esn).unwrap();
        (a, b)
    }

    fn ipv4(len: usize) -> Vec<u8> {
        let mut p = vec![0xabu8; len];
        p[0] = 0x45;
        p
    }

    #[test]
    fn kernel_trace_sizes() {
        // A 66-byte inner IPv4 packet: 12 pad bytes, payload 80, ESP 120, next header 4.
        let (mut a, mut b) = pair(false);
        let esp = a.encap(&ipv4(66), None).unwrap();
        assert_eq!(esp.len(), 120);
        assert_eq!(padded_len(66), 80);
        assert_eq!(&esp[0..8], &[1, 0, 0, 0, 0, 0, 0, 1]);
        let (nh, inner) = b.decap(&esp).unwrap();
        assert_eq!((nh, inner), (4, ipv4(66)));
    }

    #[test]
    fn roundtrip_sizes_and_esn() {
        for esn in [false, true] {
            let (mut a, mut b) = pair(esn);
            for n in [0usize, 1, 13, 14, 15, 16, 1420, 65000] {
                let inner = vec![0x60u8; n];
                let esp = a.encap(&inner, Some(41)).unwrap();
                assert_eq!(esp.len(), encap_len(n));
                assert_eq!(b.decap(&esp).unwrap(), (41, inner));
            }
        }
    }

    #[test]
    fn dummy_packet_and_inference() {
        let (mut a, mut b) = pair(false);
        let esp = a.encap(b"", Some(NH_NONE)).unwrap();
        assert_eq!(b.decap(&esp).unwrap(), (59, vec![]));
        assert_eq!(a.encap(b"\x10", None), Err(EncapError::UnknownNextHeader));
        let esp = a.encap(&[0x60, 0, 0, 0], None).unwrap();
        assert_eq!(b.decap(&esp).unwrap().0, 41);
    }

    #[test]
    fn replay_then_auth_order() {
        let (mut a, mut b) = pair(false);
        let esp = a.encap(&ipv4(40), None).unwrap();
        b.decap(&esp).unwrap();
        assert_eq!(b.decap(&esp), Err(DropReason::Replay));
        // A forged packet must not advance the window.
        let mut forged = a.encap(&ipv4(40), None).unwrap();
        forged[30] ^= 1;
        assert_eq!(b.decap(&forged), Err(DropReason::Auth));
        assert_eq!(b.rx_highest_seq(), 1);
        assert_eq!(b.stats().drops.get(DropReason::Auth), 1);
        assert_eq!(b.stats().drops.get(DropReason::Replay), 1);
    }

    #[test]
    fn seq_exhaustion() {
        let (mut a, _) = pair(false);
        assert!(a.skip_tx_seq_to(u32::MAX as u64 - 1));
        let esp = a.encap(&ipv4(20), None).unwrap();
        assert_eq!(&esp[4..8], &[0xff; 4]);
        assert_eq!(
            a.encap(&ipv4(20), None),
            Err(EncapError::SeqExhausted { esn: false })
        );
        assert!(!a.skip_tx_seq_to(5));
        let (mut e, _) = pair(true);
        assert!(e.skip_tx_seq_to(u64::MAX - 1));
        e.encap(&ipv4(20), None).unwrap();
        assert_eq!(
            e.encap(&ipv4(20), None),
            Err(EncapError::SeqExhausted { esn: true })
        );
    }

    #[test]
    fn config_errors() {
        assert_eq!(
            SecurityAssociation::new(0, &[0; 16], &[0; 32], 64, false).unwrap_err(),
            SaConfigError::Spi(0)
        );
        assert_eq!(
            SecurityAssociation::new(256, &[0; 17], &[0; 32], 64, false).unwrap_err(),
            SaConfigError::EncKeyLength(17)
        );
        assert_eq!(
            SecurityAssociation::new(256, &[0; 16], &[0; 20], 64, false).unwrap_err(),
            SaConfigError::AuthKeyLength(20)
        );
        assert_eq!(
            SecurityAssociation::new(256, &[0; 16], &[0; 32], 16, false).unwrap_err(),
            SaConfigError::ReplayWindow(16)
        );
    }
}
