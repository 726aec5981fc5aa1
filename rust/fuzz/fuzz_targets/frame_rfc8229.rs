//! The RFC 8229 stream parser (`FrameParser::rfc8229`: the `IKETCP` prefix, lengths that count
//! themselves) fed a stream in arbitrary chunks, the way the stream transport feeds it (a buffer
//! that grows by a chunk whenever the parser needs more, consumed from the front). The input
//! chooses the bound, whether the prefix is expected, the chunk sizes and the stream: raw bytes,
//! or generated frames (lengths 0 and 1 included, lengths around the bound, a prefix that may be
//! damaged). Checked against `simpletun_fuzz::parse_frames_8229`:
//! - the frames and oversize reports, in order, and whether the stream broke, are the
//!   reference's whatever the split; the parser never panics;
//! - nothing is ever buffered beyond one frame within the bound plus one chunk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simpletun_core::frame::{Event, FrameParser, PREFIX_LEN};
use simpletun_fuzz::{parse_frames_8229, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let prefix = flags & 8 != 0;
    let max_arg = if flags & 1 != 0 {
        inp.u16() as usize * 2
    } else {
        inp.u8() as usize
    };
    let mut chunks = Vec::new();
    for _ in 0..inp.u8() % 16 {
        chunks.push(1 + inp.u16() as usize % 4096);
    }
    if chunks.is_empty() {
        chunks.push(4096);
    }
    let mut parser = FrameParser::rfc8229(max_arg, prefix);
    let max = parser.max_frame();
    assert_eq!(max, max_arg.min(u16::MAX as usize - 2));

    let stream: Vec<u8> = if flags & 2 != 0 {
        let mut s = Vec::new();
        if prefix {
            s.extend_from_slice(b"IKETCP");
            if flags & 16 != 0 {
                let i = inp.u8() as usize % 6;
                s[i] ^= 1 + inp.u8() % 255;
            }
        }
        while !inp.is_empty() && s.len() < 1 << 20 {
            let field = (inp.u16() as usize % (2 * max + 6)).min(u16::MAX as usize);
            let fill = inp.u8();
            s.extend_from_slice(&(field as u16).to_be_bytes());
            s.extend((0..field.saturating_sub(2)).map(|i| fill.wrapping_add(i as u8)));
        }
        if flags & 4 != 0 {
            let cut = inp.u16() as usize % (s.len() + 1);
            s.truncate(s.len() - cut);
        }
        s
    } else {
        inp.rest().to_vec()
    };
    let (want, want_broken) = parse_frames_8229(&stream, max, prefix);

    let mut got: Vec<Option<Vec<u8>>> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let (mut fed, mut i) = (0, 0);
    let broken = loop {
        match parser.parse(&buf) {
            Err(_) => break true,
            Ok(Event::Frame(r)) => {
                assert_eq!(r.start, PREFIX_LEN);
                got.push(Some(buf[r.clone()].to_vec()));
                buf.drain(..r.end);
            }
            Ok(Event::TooLarge { len, consumed }) => {
                assert!(len > max && consumed >= PREFIX_LEN && consumed <= PREFIX_LEN + len);
                got.push(None);
                buf.drain(..consumed);
            }
            Ok(Event::Skipped { consumed }) => {
                assert!(consumed > 0 && consumed <= buf.len());
                buf.drain(..consumed);
            }
            Ok(Event::NeedMore) if fed == stream.len() => break false,
            Ok(Event::NeedMore) => {
                let n = chunks[i % chunks.len()].min(stream.len() - fed);
                i += 1;
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
        }
        assert!(
            buf.len() <= max + PREFIX_LEN + 4096 + 6,
            "buffered {}",
            buf.len()
        );
    };
    assert_eq!(got, want, "parser output differs from the reference");
    assert_eq!(
        broken, want_broken,
        "stream error differs from the reference"
    );
});
