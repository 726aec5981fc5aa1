//! Helpers shared by the fuzz targets: an input reader, and small reference models written
//! independently of the code under test (the anti-replay window of RFC 4303 §3.4.3 with the ESN
//! inference of its Appendix A, ESP packet construction and trailer parsing, and the 2-byte
//! length-prefixed framing). The targets compare simpletun-core against these models.

use std::collections::BTreeSet;

pub mod net;

use simpletun_core::crypto::{Cipher, Hmac256, BLOCK_LEN, ICV_LEN, IV_LEN};
use simpletun_core::esp::{HEADER_LEN, NH_NONE, PAYLOAD_OFFSET};
use simpletun_core::frame::FrameError;
use simpletun_core::SecurityAssociation;

/// Reads typed values off the fuzzer's input; once it runs dry every read returns zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer if the input runs out).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let n = self.data.len();
        self.bytes(n)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
}

pub const SPI: u32 = 0x0001_0001;
pub const AUTH_KEY: [u8; 32] = [0x42; 32];
const ENC_KEY: [u8; 32] = [0x17; 32];

/// The parameters of a fuzzed SA, drawn from one configuration byte.
#[derive(Debug, Clone, Copy)]
pub struct SaParams {
    pub key_len: usize,
    pub window: u32,
    pub esn: bool,
}

impl SaParams {
    pub fn from_byte(b: u8) -> SaParams {
        SaParams {
            esn: b & 1 != 0,
            key_len: [16, 24, 32, 16][((b >> 1) & 3) as usize],
            // 100 is not a multiple of the 64-bit bitmap block; 32 is the smallest allowed.
            window: [32, 64, 100, 4096][((b >> 3) & 3) as usize],
        }
    }

    pub fn enc_key(&self) -> &'static [u8] {
        &ENC_KEY[..self.key_len]
    }

    /// A receiving SA with these parameters.
    pub fn sa(&self) -> SecurityAssociation {
        SecurityAssociation::new(SPI, self.enc_key(), &AUTH_KEY, self.window, self.esn)
            .expect("valid SA parameters")
    }

    /// A sending SA with the same keys (its own window is irrelevant: the smallest is cheapest
    /// to clone).
    pub fn sender(&self) -> SecurityAssociation {
        SecurityAssociation::new(SPI, self.enc_key(), &AUTH_KEY, 32, self.esn)
            .expect("valid SA parameters")
    }

    /// The largest sequence number a sender may use.
    pub fn seq_max(&self) -> u64 {
        if self.esn {
            u64::MAX
        } else {
            u32::MAX as u64
        }
    }
}

/// Reference anti-replay window: every accepted number is remembered, so "already seen" needs
/// no bitmap, and a number is inside the window iff `seq > top - W`.
#[derive(Debug, Clone)]
pub struct ReplayModel {
    pub size: u64,
    pub top: u64,
    pub seen: BTreeSet<u64>,
}

impl ReplayModel {
    pub fn new(size: u32) -> ReplayModel {
        ReplayModel {
            size: size as u64,
            top: 0,
            seen: BTreeSet::new(),
        }
    }

    pub fn accepts(&self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            return true;
        }
        self.top - seq < self.size && !self.seen.contains(&seq)
    }

    pub fn commit(&mut self, seq: u64) {
        self.top = self.top.max(seq);
        self.seen.insert(seq);
    }

    /// RFC 4303 Appendix A2.1: the high 32 bits for a received low half `seql`, assuming the
    /// packet lies in or right of the window. Where the RFC would step below subspace 0 there
    /// is nothing to step to (subspace 0 is kept), and above the last subspace there is nothing
    /// either (the last one is kept).
    pub fn infer_esn(&self, seql: u32) -> u64 {
        let w = self.size;
        let tl = self.top & 0xffff_ffff;
        let th = self.top >> 32;
        let seql = seql as u64;
        let seqh = if tl >= w - 1 {
            // Case A: the window sits inside one subspace.
            if seql + (w - 1) >= tl {
                th
            } else {
                th + 1
            }
        } else {
            // Case B: the window straddles the start of subspace th.
            let bottom = (tl + (1 << 32) - (w - 1)) & 0xffff_ffff;
            if seql >= bottom {
                th.saturating_sub(1)
            } else {
                th
            }
        };
        (seqh.min(0xffff_ffff) << 32) | seql
    }
}

/// Build an ESP packet by hand: `SPI | seq | IV | CBC(plaintext) | ICV`. `plaintext` must be a
/// whole number of blocks; nothing checks that it carries a well-formed trailer.
pub fn build_packet(
    enc_key: &[u8],
    spi: u32,
    seq: u64,
    esn: bool,
    iv: &[u8; IV_LEN],
    plaintext: &[u8],
) -> Vec<u8> {
    assert_eq!(plaintext.len() % BLOCK_LEN, 0);
    let cipher = Cipher::new(enc_key).expect("valid key");
    let mac = Hmac256::new(&AUTH_KEY);
    let mut pkt = Vec::with_capacity(PAYLOAD_OFFSET + plaintext.len() + ICV_LEN);
    pkt.extend_from_slice(&spi.to_be_bytes());
    pkt.extend_from_slice(&(seq as u32).to_be_bytes());
    pkt.extend_from_slice(iv);
    pkt.extend_from_slice(plaintext);
    cipher.cbc_encrypt(iv, &mut pkt[PAYLOAD_OFFSET..]);
    let seq_hi = ((seq >> 32) as u32).to_be_bytes();
    let icv = if esn {
        mac.icv(&[&pkt, &seq_hi])
    } else {
        mac.icv(&[&pkt])
    };
    pkt.extend_from_slice(&icv);
    debug_assert_eq!(pkt.len(), HEADER_LEN + IV_LEN + plaintext.len() + ICV_LEN);
    pkt
}

/// Reference trailer parsing (RFC 4303 §2.4, §2.6 and the default monotonic padding 1, 2, 3..):
/// `Some((next_header, inner))` for a well-formed decrypted payload, `None` for bad padding.
/// A dummy packet (next header 59) has an empty inner packet.
pub fn parse_trailer(pt: &[u8]) -> Option<(u8, &[u8])> {
    let n = pt.len();
    if n < 2 {
        return None;
    }
    let padlen = pt[n - 2] as usize;
    let nh = pt[n - 1];
    if padlen + 2 > n {
        return None;
    }
    let inner_len = n - 2 - padlen;
    for k in 0..padlen {
        if pt[inner_len + k] as usize != k + 1 {
            return None;
        }
    }
    if nh == NH_NONE {
        Some((nh, &pt[..0]))
    } else {
        Some((nh, &pt[..inner_len]))
    }
}

/// One item of a framed stream, as the reference parser sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameItem {
    Frame(Vec<u8>),
    TooLarge { len: usize, max: usize },
}

impl From<Result<&[u8], FrameError>> for FrameItem {
    fn from(r: Result<&[u8], FrameError>) -> FrameItem {
        match r {
            Ok(f) => FrameItem::Frame(f.to_vec()),
            Err(FrameError::TooLarge { len, max }) => FrameItem::TooLarge { len, max },
            Err(e) => panic!("the decoder reported an impossible error: {e:?}"),
        }
    }
}

/// Reference parser over a whole stream: the frames (and oversize reports) it holds, and how
/// many trailing bytes a streaming decoder must still be holding back at its end (the bytes
/// of an incomplete frame within the bound; an incomplete oversized frame is never held).
pub fn parse_frames(stream: &[u8], max: usize) -> (Vec<FrameItem>, usize) {
    let mut items = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &stream[pos..];
        if rest.len() < 2 {
            return (items, rest.len());
        }
        let len = ((rest[0] as usize) << 8) | rest[1] as usize;
        if len > max {
            items.push(FrameItem::TooLarge { len, max });
            if rest.len() < 2 + len {
                return (items, 0);
            }
        } else if rest.len() < 2 + len {
            return (items, rest.len());
        } else {
            items.push(FrameItem::Frame(rest[2..2 + len].to_vec()));
        }
        pos += 2 + len;
    }
}

/// What the reference RFC 8229 parser makes of a whole stream: the frames (`None` for one
/// above the bound), and whether the stream broke (a missing `IKETCP` prefix or a length field
/// below 2, which counts itself).
pub fn parse_frames_8229(stream: &[u8], max: usize, prefix: bool) -> (Vec<Option<Vec<u8>>>, bool) {
    let mut items = Vec::new();
    let mut pos = 0;
    if prefix {
        let n = stream.len().min(6);
        if stream[..n] != b"IKETCP"[..n] {
            return (items, true);
        }
        if n < 6 {
            return (items, false);
        }
        pos = 6;
    }
    loop {
        let rest = &stream[pos..];
        if rest.len() < 2 {
            return (items, false);
        }
        let field = ((rest[0] as usize) << 8) | rest[1] as usize;
        if field < 2 {
            return (items, true);
        }
        let len = field - 2;
        if len > max {
            items.push(None);
            if rest.len() < 2 + len {
                return (items, false);
            }
        } else if rest.len() < 2 + len {
            return (items, false);
        } else {
            items.push(Some(rest[2..2 + len].to_vec()));
        }
        pos += 2 + len;
    }
}
