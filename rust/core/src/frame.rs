//! The stream framing of the classic simpletun.c: each packet is preceded by its length as a
//! 2-byte big-endian integer (the length excludes the prefix itself).
//!
//! [`FrameParser`] is the sans-IO state machine over a caller's receive buffer (used by the data
//! plane, which parses in place); [`FrameDecoder`] wraps it with its own bounded buffer for
//! callers that receive arbitrary chunks.

use std::fmt;
use std::ops::Range;

pub const PREFIX_LEN: usize = 2;
/// The largest payload a 2-byte length can describe.
pub const MAX_FRAME: usize = u16::MAX as usize;

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
}

impl FrameParser {
    pub fn new(max_frame: usize) -> FrameParser {
        FrameParser {
            max_frame: max_frame.min(MAX_FRAME),
            skipping: 0,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Look at the front of `buf` (the unconsumed bytes of the stream).
    pub fn next(&mut self, buf: &[u8]) -> Event {
        if self.skipping > 0 {
            if buf.is_empty() {
                return Event::NeedMore;
            }
            let n = self.skipping.min(buf.len());
            self.skipping -= n;
            return Event::Skipped { consumed: n };
        }
        if buf.len() < PREFIX_LEN {
            return Event::NeedMore;
        }
        let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
        if len > self.max_frame {
            let avail = buf.len() - PREFIX_LEN;
            let now = len.min(avail);
            self.skipping = len - now;
            return Event::TooLarge {
                len,
                consumed: PREFIX_LEN + now,
            };
        }
        if buf.len() < PREFIX_LEN + len {
            return Event::NeedMore;
        }
        Event::Frame(PREFIX_LEN..PREFIX_LEN + len)
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
