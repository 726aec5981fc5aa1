//! The stream framing of the classic simpletun.c: each packet is preceded by its length as a
//! 2-byte big-endian integer (the length excludes the prefix itself).
//!
//! [`FrameParser::rfc8229`] parses RFC 8229's TCP encapsulation of IKE and ESP instead: the
//! 2-byte length counts itself (so 0 and 1 are invalid and end the stream), and a stream opened
//! by the peer starts with the 6-byte [`IKETCP`] prefix (checked and skipped).
//!
//! [`FrameParser`] is the sans-IO state machine over a caller's receive buffer (used by the data
//! plane, which parses in place); [`FrameDecoder`] wraps it with its own bounded buffer for
//! callers that receive arbitrary chunks.

use std::fmt;
use std::ops::Range;

pub const PREFIX_LEN: usize = 2;
/// The largest payload a 2-byte length can describe.
pub const MAX_FRAME: usize = u16::MAX as usize;
/// The largest payload of an RFC 8229 frame (its length counts the 2 length bytes).
pub const MAX_FRAME_8229: usize = MAX_FRAME - PREFIX_LEN;
/// What the initiator of an RFC 8229 stream sends once, before its first frame (RFC 8229 §4).
pub const IKETCP: &[u8; 6] = b"IKETCP";

/// The two stream framings: simpletun.c's and RFC 8229's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The length excludes itself (classic simpletun.c).
    Classic,
    /// The length counts itself (RFC 8229 §3).
    Rfc8229,
}

impl Framing {
    /// The largest payload the length field can describe.
    pub fn max_payload(self) -> usize {
        match self {
            Framing::Classic => MAX_FRAME,
            Framing::Rfc8229 => MAX_FRAME_8229,
        }
    }

    /// The length field of a payload of `len` bytes (which must be at most
    /// [`max_payload`](Self::max_payload)).
    pub fn length_field(self, len: usize) -> u16 {
        debug_assert!(len <= self.max_payload());
        match self {
            Framing::Classic => len as u16,
            Framing::Rfc8229 => (len + PREFIX_LEN) as u16,
        }
    }
}

/// Why an RFC 8229 stream cannot be parsed any further (the connection must end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// The stream did not start with [`IKETCP`].
    BadPrefix,
    /// A length field below 2 (it counts itself): the stream is out of sync.
    BadLength(u16),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::BadPrefix => {
                f.write_str("the stream did not start with the IKETCP prefix (RFC 8229)")
            }
            StreamError::BadLength(n) => write!(
                f,
                "bad RFC 8229 length field {n} (it counts itself, so at least 2): stream out of sync"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A frame announced `len` bytes, more than the decoder's bound. Its bytes are skipped
    /// (never buffered), so the stream stays in sync.
    TooLarge { len: usize, max: usize },
    /// A payload longer than the 2-byte prefix can describe.
    PayloadTooLarge { len: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => write!(
                f,
                "frame of {len} bytes exceeds the maximum frame size of {max} bytes; frame dropped"
            ),
            FrameError::PayloadTooLarge { len } => write!(
                f,
                "payload of {len} bytes cannot be framed: the 2-byte length prefix allows at most {MAX_FRAME}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Write the 2-byte prefix for a payload of `len` bytes.
pub fn write_prefix(out: &mut [u8], len: usize) -> Result<(), FrameError> {
    if len > MAX_FRAME {
        return Err(FrameError::PayloadTooLarge { len });
    }
    out[..PREFIX_LEN].copy_from_slice(&(len as u16).to_be_bytes());
    Ok(())
}

/// `prefix | payload` as a new buffer.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; PREFIX_LEN + payload.len()];
    write_prefix(&mut out, payload.len())?;
    out[PREFIX_LEN..].copy_from_slice(payload);
    Ok(out)
}

/// What the parser found at the front of the buffer it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole frame; its payload is `buf[range]`. Consume `range.end` bytes.
    Frame(Range<usize>),
    /// A frame above the bound; `consumed` of its bytes (prefix included) may be discarded now,
    /// the parser skips the rest as it arrives.
    TooLarge { len: usize, consumed: usize },
    /// Bytes of an oversized frame skipped; discard `consumed` bytes.
    Skipped { consumed: usize },
    /// Not enough bytes for the next frame; consume nothing, read more.
    NeedMore,
}

/// Sans-IO frame parser with a maximum frame size.
#[derive(Debug, Clone)]
pub struct FrameParser {
    max_frame: usize,
    /// Bytes still to skip of an oversized frame.
    skipping: usize,
    framing: Framing,
    /// The IKETCP prefix is still to come (RFC 8229 streams the peer opened).
    expect_prefix: bool,
}

impl FrameParser {
    /// simpletun.c's framing.
    pub fn new(max_frame: usize) -> FrameParser {
        FrameParser {
            max_frame: max_frame.min(MAX_FRAME),
            skipping: 0,
            framing: Framing::Classic,
            expect_prefix: false,
        }
    }

    /// RFC 8229 framing; `expect_prefix`: the peer opened the stream, so it starts with
    /// [`IKETCP`].
    pub fn rfc8229(max_frame: usize, expect_prefix: bool) -> FrameParser {
        FrameParser {
            max_frame: max_frame.min(MAX_FRAME_8229),
            skipping: 0,
            framing: Framing::Rfc8229,
            expect_prefix,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Look at the front of `buf` (the unconsumed bytes of the stream). The classic framing
    /// never fails; use [`parse`](Self::parse) for RFC 8229 (an invalid stream reads as
    /// [`Event::NeedMore`] here, forever).
    pub fn next(&mut self, buf: &[u8]) -> Event {
        self.parse(buf).unwrap_or(Event::NeedMore)
    }

    /// [`next`](Self::next), with the errors that end an RFC 8229 stream. The IKETCP prefix
    /// reads as [`Event::Skipped`] once all of it is there (a wrong byte fails at once).
    pub fn parse(&mut self, buf: &[u8]) -> Result<Event, StreamError> {
        if self.expect_prefix {
            let n = IKETCP.len().min(buf.len());
            if buf[..n] != IKETCP[..n] {
                return Err(StreamError::BadPrefix);
            }
            if n < IKETCP.len() {
                return Ok(Event::NeedMore);
            }
            self.expect_prefix = false;
            return Ok(Event::Skipped { consumed: n });
        }
        if self.skipping > 0 {
            if buf.is_empty() {
                return Ok(Event::NeedMore);
            }
            let n = self.skipping.min(buf.len());
            self.skipping -= n;
            return Ok(Event::Skipped { consumed: n });
        }
        if buf.len() < PREFIX_LEN {
            return Ok(Event::NeedMore);
        }
        let field = u16::from_be_bytes([buf[0], buf[1]]);
        let len = match self.framing {
            Framing::Classic => field as usize,
            Framing::Rfc8229 if (field as usize) < PREFIX_LEN => {
                return Err(StreamError::BadLength(field))
            }
            Framing::Rfc8229 => field as usize - PREFIX_LEN,
        };
        if len > self.max_frame {
            let avail = buf.len() - PREFIX_LEN;
            let now = len.min(avail);
            self.skipping = len - now;
            return Ok(Event::TooLarge {
                len,
                consumed: PREFIX_LEN + now,
            });
        }
        if buf.len() < PREFIX_LEN + len {
            return Ok(Event::NeedMore);
        }
        Ok(Event::Frame(PREFIX_LEN..PREFIX_LEN + len))
    }
}

/// A streaming decoder that accepts any split of the byte stream. It buffers at most one
/// incomplete frame (so at most `max_frame + 2` bytes) and never buffers an oversized one.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    parser: FrameParser,
    pending: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            parser: FrameParser::new(max_frame),
            pending: Vec::new(),
        }
    }

    pub fn max_frame(&self) -> usize {
        self.parser.max_frame()
    }

    /// Bytes held back waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Feed a chunk; `on` is called, in stream order, with each complete frame or error.
    pub fn feed(&mut self, mut chunk: &[u8], mut on: impl FnMut(Result<&[u8], FrameError>)) {
        // First complete (or skip) what is pending, taking only the bytes it needs, so the
        // pending buffer never grows past one frame.
        while !self.pending.is_empty() && !chunk.is_empty() {
            let need = match self.parser.next(&self.pending) {
                Event::NeedMore if self.pending.len() < PREFIX_LEN => {
                    PREFIX_LEN - self.pending.len()
                }
                Event::NeedMore => {
                    let len = u16::from_be_bytes([self.pending[0], self.pending[1]]) as usize;
                    PREFIX_LEN + len - self.pending.len()
                }
                other => {
                    self.handle_pending(other, &mut on);
                    continue;
                }
            };
            let take = need.min(chunk.len());
            self.pending.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            let ev = self.parser.next(&self.pending);
            if ev != Event::NeedMore {
                self.handle_pending(ev, &mut on);
            }
        }
        loop {
            match self.parser.next(chunk) {
                Event::Frame(r) => {
                    on(Ok(&chunk[r.clone()]));
                    chunk = &chunk[r.end..];
                }
                Event::TooLarge { len, consumed } => {
                    on(Err(FrameError::TooLarge {
                        len,
                        max: self.parser.max_frame(),
                    }));
                    chunk = &chunk[consumed..];
                }
                Event::Skipped { consumed } => chunk = &chunk[consumed..],
                Event::NeedMore => {
                    self.pending.extend_from_slice(chunk);
                    return;
                }
            }
        }
    }

    fn handle_pending(&mut self, ev: Event, on: &mut impl FnMut(Result<&[u8], FrameError>)) {
        match ev {
            Event::Frame(r) => {
                on(Ok(&self.pending[r]));
                self.pending.clear();
            }
            Event::TooLarge { len, consumed } => {
                on(Err(FrameError::TooLarge {
                    len,
                    max: self.parser.max_frame(),
                }));
                self.pending.drain(..consumed);
            }
            Event::Skipped { consumed } => {
                self.pending.drain(..consumed);
            }
            Event::NeedMore => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(d: &mut FrameDecoder, chunk: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut out = vec![];
        d.feed(chunk, |r| out.push(r.map(|f| f.to_vec())));
        out
    }

    #[test]
    fn every_split() {
        let mut stream = vec![];
        let frames: Vec<Vec<u8>> = vec![vec![], vec![1], vec![2; 300], vec![3; 5]];
        for f in &frames {
            stream.extend(encode_frame(f).unwrap());
        }
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let mut d = FrameDecoder::new(1000);
                let mut got = collect(&mut d, &stream[..a]);
                got.extend(collect(&mut d, &stream[a..b]));
                got.extend(collect(&mut d, &stream[b..]));
                let got: Vec<Vec<u8>> = got.into_iter().map(|r| r.unwrap()).collect();
                assert_eq!(got, frames, "split at {a},{b}");
                assert_eq!(d.buffered(), 0);
            }
        }
    }

    #[test]
    fn oversize_is_skipped_not_buffered() {
        let mut stream = encode_frame(&[1; 10]).unwrap();
        stream.extend(encode_frame(&[9; 5000]).unwrap());
        stream.extend(encode_frame(&[2; 10]).unwrap());
        for split in 0..=stream.len() {
            let mut d = FrameDecoder::new(100);
            let mut got = collect(&mut d, &stream[..split]);
            assert!(d.buffered() <= 102);
            got.extend(collect(&mut d, &stream[split..]));
            assert_eq!(
                got,
                vec![
                    Ok(vec![1; 10]),
                    Err(FrameError::TooLarge {
                        len: 5000,
                        max: 100
                    }),
                    Ok(vec![2; 10])
                ],
                "split {split}"
            );
        }
    }

    /// What a stream transport makes of `stream` fed in chunks of `chunk` bytes with RFC 8229
    /// framing: the frames (`None` for an oversized one) and the error that ended it.
    fn run_8229(
        stream: &[u8],
        chunk: usize,
        max: usize,
        prefix: bool,
    ) -> (Vec<Option<Vec<u8>>>, Option<StreamError>) {
        let mut p = FrameParser::rfc8229(max, prefix);
        let (mut buf, mut fed, mut out) = (Vec::new(), 0, Vec::new());
        loop {
            match p.parse(&buf) {
                Err(e) => return (out, Some(e)),
                Ok(Event::Frame(r)) => {
                    out.push(Some(buf[r.clone()].to_vec()));
                    buf.drain(..r.end);
                }
                Ok(Event::TooLarge { consumed, .. }) => {
                    out.push(None);
                    buf.drain(..consumed);
                }
                Ok(Event::Skipped { consumed }) => {
                    buf.drain(..consumed);
                }
                Ok(Event::NeedMore) if fed == stream.len() => return (out, None),
                Ok(Event::NeedMore) => {
                    let n = chunk.min(stream.len() - fed);
                    buf.extend_from_slice(&stream[fed..fed + n]);
                    fed += n;
                }
            }
            assert!(buf.len() <= max + 2 + chunk, "buffered {}", buf.len());
        }
    }

    fn frame_8229(payload: &[u8]) -> Vec<u8> {
        let mut v = Framing::Rfc8229
            .length_field(payload.len())
            .to_be_bytes()
            .to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn rfc8229_length_counts_itself_and_prefix_is_skipped() {
        assert_eq!(frame_8229(&[7; 3]), vec![0, 5, 7, 7, 7]);
        assert_eq!(Framing::Classic.length_field(3), 3);
        assert_eq!(Framing::Rfc8229.max_payload(), 65533);
        // An IKE message (non-ESP marker), an ESP packet, an empty frame, a keepalive.
        let frames: Vec<Vec<u8>> = vec![
            [&[0u8; 4][..], &[0x11; 40]].concat(),
            [&[0xc0, 0xff, 0xee, 0x01][..], &[0x22; 100]].concat(),
            vec![],
            vec![0xff],
        ];
        let mut stream = IKETCP.to_vec();
        for f in &frames {
            stream.extend(frame_8229(f));
        }
        let want: Vec<Option<Vec<u8>>> = frames.iter().cloned().map(Some).collect();
        for chunk in 1..=stream.len() {
            assert_eq!(run_8229(&stream, chunk, 1000, true), (want.clone(), None));
            // The side that opened the stream sees no prefix.
            assert_eq!(
                run_8229(&stream[6..], chunk, 1000, false),
                (want.clone(), None)
            );
        }
    }

    #[test]
    fn rfc8229_bad_prefix_fails_at_the_first_wrong_byte() {
        for i in 0..IKETCP.len() {
            let mut stream = IKETCP.to_vec();
            stream[i] ^= 0x20;
            stream.extend(frame_8229(&[1; 8]));
            for chunk in 1..=stream.len() {
                assert_eq!(
                    run_8229(&stream, chunk, 1000, true),
                    (vec![], Some(StreamError::BadPrefix)),
                    "byte {i} chunk {chunk}"
                );
            }
        }
        // A classic-framed stream sent to an RFC 8229 listener is refused the same way.
        assert_eq!(
            run_8229(&encode_frame(&[1; 8]).unwrap(), 1, 1000, true).1,
            Some(StreamError::BadPrefix)
        );
        // A stream cut inside the prefix is just short.
        assert_eq!(run_8229(b"IKE", 1, 1000, true), (vec![], None));
    }

    #[test]
    fn rfc8229_lengths_below_two_end_the_stream() {
        for bad in [0u16, 1] {
            let mut stream = IKETCP.to_vec();
            stream.extend(frame_8229(&[1; 8]));
            stream.extend(bad.to_be_bytes());
            stream.extend(frame_8229(&[2; 8]));
            let (got, e) = run_8229(&stream, 3, 1000, true);
            assert_eq!(got, vec![Some(vec![1; 8])]);
            assert_eq!(e, Some(StreamError::BadLength(bad)));
            assert!(e.unwrap().to_string().contains("counts itself"));
        }
    }

    #[test]
    fn rfc8229_oversize_skipped_and_truncation_is_short() {
        let mut stream = frame_8229(&[1; 10]);
        stream.extend(frame_8229(&[9; 5000]));
        stream.extend(frame_8229(&[2; 10]));
        for chunk in [1, 7, 100, 6000] {
            assert_eq!(
                run_8229(&stream, chunk, 100, false),
                (vec![Some(vec![1; 10]), None, Some(vec![2; 10])], None)
            );
        }
        // Every truncation yields the whole frames before the cut, no error, nothing more.
        for cut in 0..stream.len() {
            let (got, e) = run_8229(&stream[..cut], 5, 6000, false);
            assert_eq!(e, None);
            let whole = [12, 12 + 5002, 12 + 5002 + 12]
                .iter()
                .filter(|&&end| end <= cut)
                .count();
            assert_eq!(got.len(), whole, "cut {cut}");
        }
        // The largest payload fits; the classic maximum does not.
        assert_eq!(FrameParser::rfc8229(MAX_FRAME, false).max_frame(), 65533);
    }

    #[test]
    fn rfc8229_random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut stream = if x & 1 == 0 { IKETCP.to_vec() } else { vec![] };
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                stream.push(x as u8);
            }
            let chunk = 1 + (x % 9) as usize;
            let (got, _) = run_8229(&stream, chunk, 30, true);
            assert!(got.len() <= stream.len() / 2);
        }
    }

    #[test]
    fn encode_bounds() {
        assert_eq!(encode_frame(&[0; 3]).unwrap(), vec![0, 3, 0, 0, 0]);
        assert!(encode_frame(&vec![0; MAX_FRAME]).is_ok());
        assert_eq!(
            encode_frame(&vec![0; MAX_FRAME + 1]),
            Err(FrameError::PayloadTooLarge { len: MAX_FRAME + 1 })
        );
    }
}
