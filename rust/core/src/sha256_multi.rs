//! Multi-buffer SHA-256 compression and HMAC-SHA-256 over several messages at once.
//!
//! One SHA-256 stream is a chain of dependent rounds: with the SHA extensions each
//! `sha256rnds2` (two rounds) must wait for the previous one, so a single message runs at that
//! instruction's latency and leaves the SHA unit idle between issues. Independent messages have
//! independent chains; running [`WAYS`] of them round for round in the same instruction stream
//! lets the out-of-order core overlap them, approaching the unit's throughput instead.
//!
//! Written from FIPS 180-4 §6.2 (the compression function and message schedule) and the Intel
//! SHA extensions reference (`sha256rnds2` works on the state as the two words ABEF and CDGH and
//! takes two `W + K` words; `sha256msg1`/`sha256msg2` compute the σ0 and σ1 halves of the
//! schedule four words at a time). Without the SHA extensions (or off x86-64) every lane goes
//! through the `sha2` crate's `compress256`, one message after the other.
//!
//! [`HmacKeys`] holds an HMAC key's inner and outer midstates (RFC 2104: the compression of
//! `K ^ ipad` and `K ^ opad`), computed once per key, so a message of `n` bytes costs
//! `ceil((n + 9) / 64)` inner compressions and one outer.

use sha2::digest::generic_array::GenericArray;

/// SHA-256 initial hash value H(0) (FIPS 180-4 §5.3.3).
pub const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// How many messages the SHA-NI path interleaves. Measured with `examples/hmac_bench.rs` on AMD
/// Zen: 2 ways are 1.5-1.6× one message; 4 ways a further ~1.06-1.09× on HMAC alone (the SHA
/// instructions take only xmm0-15, so 4 lanes spill) and nothing measurable in ESP encap/decap.
pub const WAYS: usize = 2;

/// The longest suffix (bytes hashed after a message's body) [`HmacKeys::mac_multi`] takes.
pub const MAX_SUFFIX: usize = 64;

/// True if this CPU runs the SHA-NI multi-buffer path (else the portable one).
pub fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        shani::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Compress `blocks` 64-byte blocks of `data[l]` into `states[l]` for every lane `l`, the lanes
/// interleaved on SHA-NI. Each `data[l]` must hold at least `blocks * 64` bytes.
pub fn compress_lanes<const N: usize>(states: &mut [[u32; 8]; N], data: [&[u8]; N], blocks: usize) {
    assert!(data.iter().all(|d| d.len() >= blocks * 64));
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        // SAFETY: the CPU has the SHA extensions and SSE4.1 (checked above) and every lane
        // holds `blocks` whole blocks (asserted above).
        unsafe { shani::compress(states, data, blocks) };
        return;
    }
    for (s, d) in states.iter_mut().zip(data) {
        portable(s, &d[..blocks * 64]);
    }
}

fn portable(state: &mut [u32; 8], data: &[u8]) {
    for block in data.chunks_exact(64) {
        sha2::compress256(
            state,
            core::slice::from_ref(GenericArray::from_slice(block)),
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod shani {
    use core::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("ssse3")
    }

    /// FIPS 180-4 §4.2.2, four words per load.
    #[repr(align(16))]
    struct K([u32; 64]);
    static K256: K = K([
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ]);

    /// Four rounds (group `$g`, rounds 4g..4g+3) of every lane. For `$g >= 4` the group's
    /// schedule words are first made from the previous sixteen (FIPS 180-4 §6.2.2 step 1):
    /// W[t] = σ1(W[t-2]) + W[t-7] + σ0(W[t-15]) + W[t-16], with `m[(g+k) % 4]` holding
    /// W[4g-16+4k ..] (k = 0..3): msg1 adds σ0, the alignr picks W[t-7..t-4], msg2 adds σ1.
    macro_rules! group {
        ($n:expr, $abef:ident, $cdgh:ident, $m:ident, $g:expr) => {{
            let k = _mm_load_si128(K256.0.as_ptr().add(4 * $g).cast());
            for l in 0..$n {
                if $g >= 4 {
                    let m = &mut $m[l];
                    let t = _mm_sha256msg1_epu32(m[$g % 4], m[($g + 1) % 4]);
                    let t = _mm_add_epi32(t, _mm_alignr_epi8(m[($g + 3) % 4], m[($g + 2) % 4], 4));
                    m[$g % 4] = _mm_sha256msg2_epu32(t, m[($g + 3) % 4]);
                }
                let wk = _mm_add_epi32($m[l][$g % 4], k);
                // Two rounds on W+K words 0 and 1: the result is the new ABEF, and the old ABEF
                // becomes CDGH; then two on words 2 and 3 with the roles swapped back.
                $cdgh[l] = _mm_sha256rnds2_epu32($cdgh[l], $abef[l], wk);
                $abef[l] = _mm_sha256rnds2_epu32($abef[l], $cdgh[l], _mm_shuffle_epi32(wk, 0x0e));
            }
        }};
    }

    /// # Safety
    /// The CPU must have SHA, SSSE3 and SSE4.1, and every `data[l]` at least `blocks * 64` bytes.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn compress<const N: usize>(
        states: &mut [[u32; 8]; N],
        data: [&[u8]; N],
        blocks: usize,
    ) {
        // Big-endian words: reverse the bytes of each 32-bit lane.
        let bswap = _mm_set_epi64x(0x0c0d0e0f_08090a0b, 0x04050607_00010203);
        let mut abef = [_mm_setzero_si128(); N];
        let mut cdgh = [_mm_setzero_si128(); N];
        for l in 0..N {
            // [a b c d] [e f g h] (word 0 lowest) -> ABEF = [f e b a], CDGH = [h g d c].
            let abcd = _mm_loadu_si128(states[l].as_ptr().cast());
            let efgh = _mm_loadu_si128(states[l].as_ptr().add(4).cast());
            let badc = _mm_shuffle_epi32(abcd, 0xb1);
            let hgfe = _mm_shuffle_epi32(efgh, 0x1b);
            abef[l] = _mm_alignr_epi8(badc, hgfe, 8);
            cdgh[l] = _mm_blend_epi16(hgfe, badc, 0xf0);
        }
        let mut ptrs: [*const u8; N] = [core::ptr::null(); N];
        for l in 0..N {
            ptrs[l] = data[l].as_ptr();
        }
        for _ in 0..blocks {
            let (abef0, cdgh0) = (abef, cdgh);
            let mut m = [[_mm_setzero_si128(); 4]; N];
            for l in 0..N {
                for (j, w) in m[l].iter_mut().enumerate() {
                    let x = _mm_loadu_si128(ptrs[l].add(16 * j).cast());
                    *w = _mm_shuffle_epi8(x, bswap);
                }
                ptrs[l] = ptrs[l].add(64);
            }
            group!(N, abef, cdgh, m, 0);
            group!(N, abef, cdgh, m, 1);
            group!(N, abef, cdgh, m, 2);
            group!(N, abef, cdgh, m, 3);
            group!(N, abef, cdgh, m, 4);
            group!(N, abef, cdgh, m, 5);
            group!(N, abef, cdgh, m, 6);
            group!(N, abef, cdgh, m, 7);
            group!(N, abef, cdgh, m, 8);
            group!(N, abef, cdgh, m, 9);
            group!(N, abef, cdgh, m, 10);
            group!(N, abef, cdgh, m, 11);
            group!(N, abef, cdgh, m, 12);
            group!(N, abef, cdgh, m, 13);
            group!(N, abef, cdgh, m, 14);
            group!(N, abef, cdgh, m, 15);
            for l in 0..N {
                abef[l] = _mm_add_epi32(abef[l], abef0[l]);
                cdgh[l] = _mm_add_epi32(cdgh[l], cdgh0[l]);
            }
        }
        for l in 0..N {
            // ABEF = [f e b a], CDGH = [h g d c] -> [a b c d] [e f g h].
            let abef_r = _mm_shuffle_epi32(abef[l], 0x1b); // [a b e f]
            let cdgh_r = _mm_shuffle_epi32(cdgh[l], 0xb1); // [g h c d]
            let abcd = _mm_blend_epi16(abef_r, cdgh_r, 0xf0);
            let efgh = _mm_alignr_epi8(cdgh_r, abef_r, 8);
            _mm_storeu_si128(states[l].as_mut_ptr().cast(), abcd);
            _mm_storeu_si128(states[l].as_mut_ptr().add(4).cast(), efgh);
        }
    }
}

/// The padded end of one message: the body's last partial block, the suffix, `0x80`, zeros and
/// the 64-bit bit length (FIPS 180-4 §5.1.1), one to three blocks.
struct Tail {
    buf: [u8; 192],
    blocks: usize,
}

impl Tail {
    /// `prefix_len` bytes (whole blocks) were hashed before `body` (the HMAC key block).
    fn new(prefix_len: usize, body: &[u8], suffix: &[u8]) -> Tail {
        let rest = &body[body.len() / 64 * 64..];
        let mut buf = [0u8; 192];
        buf[..rest.len()].copy_from_slice(rest);
        buf[rest.len()..rest.len() + suffix.len()].copy_from_slice(suffix);
        let used = rest.len() + suffix.len();
        buf[used] = 0x80;
        let blocks = (used + 9).div_ceil(64);
        let bits = ((prefix_len + body.len() + suffix.len()) as u64) * 8;
        buf[blocks * 64 - 8..blocks * 64].copy_from_slice(&bits.to_be_bytes());
        Tail { buf, blocks }
    }
}

/// One message in flight: `direct` blocks read from the body where it lies, then the tail.
struct Lane<'a> {
    body: &'a [u8],
    direct: usize,
    tail: Tail,
    pos: usize,
    state: [u32; 8],
}

impl<'a> Lane<'a> {
    fn total(&self) -> usize {
        self.direct + self.tail.blocks
    }
    /// The blocks from `pos` that lie contiguously in one place.
    fn run(&self) -> &[u8] {
        if self.pos < self.direct {
            &self.body[self.pos * 64..self.direct * 64]
        } else {
            &self.tail.buf[(self.pos - self.direct) * 64..self.tail.blocks * 64]
        }
    }
}

/// Hash every lane to its end, up to `ways` (1..=4) lanes at a time: the first unfinished
/// lanes run together for as many blocks as the shortest contiguous run among them, then the
/// next unfinished lane takes the place of any that ended (so unequal lengths keep the group
/// full while lanes remain).
fn run_lanes(lanes: &mut [Lane<'_>], ways: usize) {
    loop {
        let mut pick = [0usize; 4];
        let mut k = 0;
        for (i, l) in lanes.iter().enumerate() {
            if l.pos < l.total() {
                pick[k] = i;
                k += 1;
                if k == ways {
                    break;
                }
            }
        }
        match k {
            0 => return,
            1 => step::<1>(lanes, [pick[0]]),
            2 => step::<2>(lanes, [pick[0], pick[1]]),
            3 => step::<3>(lanes, [pick[0], pick[1], pick[2]]),
            _ => step::<4>(lanes, pick),
        }
    }
}

/// One interleaved run of the lanes `pick` (distinct indexes).
fn step<const N: usize>(lanes: &mut [Lane<'_>], pick: [usize; N]) {
    let n = pick
        .iter()
        .map(|&i| lanes[i].run().len() / 64)
        .min()
        .unwrap_or(0);
    let mut st: [[u32; 8]; N] = core::array::from_fn(|j| lanes[pick[j]].state);
    compress_lanes::<N>(&mut st, core::array::from_fn(|j| lanes[pick[j]].run()), n);
    for (j, &i) in pick.iter().enumerate() {
        lanes[i].state = st[j];
        lanes[i].pos += n;
    }
}

fn digest_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// An HMAC-SHA-256 key as its inner and outer midstates.
#[derive(Clone)]
pub struct HmacKeys {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl HmacKeys {
    /// Any key length (RFC 2104): keys longer than the 64-byte block are hashed first.
    pub fn new(key: &[u8]) -> HmacKeys {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&sha256(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut ipad = [0u8; 64];
        let mut opad = [0u8; 64];
        for i in 0..64 {
            ipad[i] = k[i] ^ 0x36;
            opad[i] = k[i] ^ 0x5c;
        }
        let mut st = [H0, H0];
        compress_lanes::<2>(&mut st, [&ipad, &opad], 1);
        HmacKeys {
            inner: st[0],
            outer: st[1],
        }
    }

    /// The HMAC-SHA-256 of `body || suffix` for each message, into `out` (the first
    /// `min(msgs.len(), out.len())`). Each suffix is at most [`MAX_SUFFIX`] bytes.
    pub fn mac_multi(&self, msgs: &[(&[u8], &[u8])], out: &mut [[u8; 32]]) {
        self.mac_multi_ways(msgs, out, WAYS);
    }

    /// [`mac_multi`](Self::mac_multi) interleaving `ways` (1..=4) messages instead of
    /// [`WAYS`]; for benchmarks and tests.
    pub fn mac_multi_ways(&self, msgs: &[(&[u8], &[u8])], out: &mut [[u8; 32]], ways: usize) {
        const CHUNK: usize = 8;
        let ways = ways.clamp(1, 4);
        let n = msgs.len().min(out.len());
        for (msgs, out) in msgs[..n].chunks(CHUNK).zip(out[..n].chunks_mut(CHUNK)) {
            self.mac_chunk(msgs, out, ways);
        }
    }

    fn mac_chunk(&self, msgs: &[(&[u8], &[u8])], out: &mut [[u8; 32]], ways: usize) {
        let k = msgs.len().min(out.len()).min(8);
        let mut lanes: [Lane<'_>; 8] = core::array::from_fn(|i| match msgs.get(i) {
            Some(&(body, suffix)) if i < k => {
                assert!(
                    suffix.len() <= MAX_SUFFIX,
                    "HMAC suffix longer than {MAX_SUFFIX}"
                );
                Lane {
                    body,
                    direct: body.len() / 64,
                    tail: Tail::new(64, body, suffix),
                    pos: 0,
                    state: self.inner,
                }
            }
            _ => Lane {
                body: &[],
                direct: 0,
                tail: Tail {
                    buf: [0; 192],
                    blocks: 0,
                },
                pos: 0,
                state: self.inner,
            },
        });
        run_lanes(&mut lanes[..k], ways);
        // The outer hash: opad midstate, then one block of the 32-byte inner digest.
        let mut outer: [[u8; 64]; 8] = [[0; 64]; 8];
        for (b, l) in outer.iter_mut().zip(&lanes[..k]) {
            b[..32].copy_from_slice(&digest_bytes(&l.state));
            b[32] = 0x80;
            b[62..].copy_from_slice(&(((64 + 32) * 8) as u16).to_be_bytes());
        }
        let mut i = 0;
        while i < k {
            let (b, o) = (&outer[i..k], &mut out[i..k]);
            let mut st = [self.outer; 4];
            let take = match b.len().min(ways) {
                1 => {
                    compress_lanes::<1>((&mut st[..1]).try_into().unwrap(), [&b[0]], 1);
                    1
                }
                2 | 3 => {
                    compress_lanes::<2>((&mut st[..2]).try_into().unwrap(), [&b[0], &b[1]], 1);
                    2
                }
                _ => {
                    compress_lanes::<4>(&mut st, [&b[0], &b[1], &b[2], &b[3]], 1);
                    4
                }
            };
            for j in 0..take {
                o[j] = digest_bytes(&st[j]);
            }
            i += take;
        }
    }
}

/// Plain SHA-256 of one message (for long HMAC keys and tests).
pub fn sha256(msg: &[u8]) -> [u8; 32] {
    let mut st = [H0];
    let direct = msg.len() / 64;
    compress_lanes::<1>(&mut st, [msg], direct);
    let tail = Tail::new(0, msg, &[]);
    compress_lanes::<1>(&mut st, [&tail.buf], tail.blocks);
    digest_bytes(&st[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// xorshift64*: a fixed, seeded stream for the property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545f4914f6cdd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes_below(&mut self, max: usize) -> Vec<u8> {
            let n = self.below(max + 1);
            self.bytes(n)
        }
        fn bytes_len(&mut self, max: usize) -> Vec<u8> {
            let n = self.len(max);
            self.bytes(n)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        /// A length in 0..=max, often next to a block or padding boundary.
        fn len(&mut self, max: usize) -> usize {
            if self.below(2) == 0 {
                let b = 64 * self.below(max / 64 + 1);
                let d = [0usize, 1, 8, 9, 55, 56, 63][self.below(7)];
                (b + d).min(max)
            } else {
                self.below(max + 1)
            }
        }
    }

    fn reference(key: &[u8], body: &[u8], suffix: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
        m.update(body);
        m.update(suffix);
        m.finalize().into_bytes().into()
    }

    #[test]
    fn fips180_4_sha256() {
        // FIPS 180-4 examples (one block, two blocks) and the empty message.
        let cases: [(&[u8], &str); 4] = [
            (
                b"abc",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
            (
                b"",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq\
                  klmnopqrlmnopqrsmnopqrstnopqrstu",
                "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(sha256(msg).to_vec(), hex(want));
        }
    }

    #[test]
    fn rfc4231_hmac_sha256() {
        let cases: [(Vec<u8>, &[u8], &str); 7] = [
            (
                vec![0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 20],
                &[0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                (1u8..=25).collect(),
                &[0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                vec![0x0c; 20],
                b"Test With Truncation",
                "a3b6167473100ee06e0c796c2955552b",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size \
                  data. The key needs to be hashed before being used by the HMAC algorithm.",
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        // All seven in one batch (unequal lengths), then each alone, at every width.
        let msgs: Vec<(&[u8], &[u8])> = cases.iter().map(|c| (c.1, &[][..])).collect();
        for ways in 1..=4 {
            for (i, (key, data, want)) in cases.iter().enumerate() {
                let keys = HmacKeys::new(key);
                let mut one = [[0u8; 32]];
                keys.mac_multi_ways(&[(data, &[])], &mut one, ways);
                let want = hex(want);
                assert_eq!(
                    &one[0][..want.len()],
                    &want[..],
                    "case {} ways {ways}",
                    i + 1
                );
                // The same key over every case's data: lane i must still be case i's MAC
                // wherever case i's key is this one.
                let mut all = [[0u8; 32]; 7];
                keys.mac_multi_ways(&msgs, &mut all, ways);
                assert_eq!(all[i], one[0]);
                for (j, m) in msgs.iter().enumerate() {
                    assert_eq!(all[j], reference(key, m.0, m.1));
                }
            }
        }
    }

    /// Random keys, bodies of 0..=9000 bytes (unequal within a batch), suffixes of 0..=64 bytes
    /// and 1..=20 messages per call at every width: each MAC equals the `hmac` crate's.
    #[test]
    fn multi_equals_hmac_crate() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for round in 0..120 {
            let key = rng.bytes_below(150);
            let keys = HmacKeys::new(&key);
            let n = 1 + rng.below(20);
            let bodies: Vec<Vec<u8>> = (0..n).map(|_| rng.bytes_len(9000)).collect();
            let suffixes: Vec<Vec<u8>> = (0..n)
                .map(|_| match rng.below(3) {
                    0 => vec![],
                    1 => rng.bytes(4),
                    _ => rng.bytes_below(MAX_SUFFIX),
                })
                .collect();
            let msgs: Vec<(&[u8], &[u8])> = bodies
                .iter()
                .zip(&suffixes)
                .map(|(b, s)| (&b[..], &s[..]))
                .collect();
            let want: Vec<[u8; 32]> = msgs.iter().map(|m| reference(&key, m.0, m.1)).collect();
            for ways in 1..=4 {
                let mut got = vec![[0u8; 32]; n];
                keys.mac_multi_ways(&msgs, &mut got, ways);
                assert_eq!(got, want, "round {round}, ways {ways}");
            }
        }
    }

    /// The SHA-NI lanes agree with the portable compression block for block.
    #[test]
    fn lanes_equal_portable() {
        let mut rng = Rng(7);
        for _ in 0..50 {
            let blocks = rng.below(5);
            let data: Vec<Vec<u8>> = (0..4).map(|_| rng.bytes(blocks * 64)).collect();
            let init: [[u32; 8]; 4] =
                core::array::from_fn(|_| core::array::from_fn(|_| rng.next() as u32));
            let mut want = init;
            for (s, d) in want.iter_mut().zip(&data) {
                portable(s, d);
            }
            let mut four = init;
            compress_lanes::<4>(&mut four, core::array::from_fn(|i| &data[i][..]), blocks);
            assert_eq!(four, want);
            let mut two = [init[2], init[3]];
            compress_lanes::<2>(&mut two, [&data[2], &data[3]], blocks);
            assert_eq!(two, [want[2], want[3]]);
            let mut one = [init[1]];
            compress_lanes::<1>(&mut one, [&data[1]], blocks);
            assert_eq!(one, [want[1]]);
        }
    }
}
