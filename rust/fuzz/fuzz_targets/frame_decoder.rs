//! The stream frame decoder fed arbitrary splits of a byte stream. The input chooses the
//! maximum frame size, the chunk sizes, and the stream: either raw bytes, or generated frames
//! (of lengths around the bound, so that oversized ones are common). Checked against the
//! reference parser of `simpletun_fuzz`:
//! - the frames and oversize reports, in order, equal the reference's for the whole stream,
//!   whatever the split; so do those of `FrameParser` driven over the whole stream at once;
//! - the decoder never buffers more than `max_frame + 2` bytes, and at the end holds exactly the
//!   bytes of the incomplete frame the reference leaves over.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simpletun_core::frame::{Event, FrameParser, PREFIX_LEN};
use simpletun_core::FrameDecoder;
use simpletun_fuzz::{parse_frames, FrameItem, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    // Small bounds are the interesting ones; the full 16-bit range (and beyond, clamped) too.
    let max_arg = if flags & 1 != 0 {
        inp.u16() as usize * 2
    } else {
        inp.u8() as usize
    };
    let mut chunks = Vec::new();
    for _ in 0..inp.u8() % 32 {
        chunks.push(inp.u16() as usize);
    }

    let mut dec = FrameDecoder::new(max_arg);
    let max = dec.max_frame();
    assert_eq!(max, max_arg.min(u16::MAX as usize));

    let stream: Vec<u8> = if flags & 2 != 0 {
        // Generated frames, their lengths spread around the bound.
        let mut s = Vec::new();
        while !inp.is_empty() && s.len() < 1 << 20 {
            let len = (inp.u16() as usize % (2 * max + 3)).min(u16::MAX as usize);
            let fill = inp.u8();
            s.extend_from_slice(&(len as u16).to_be_bytes());
            s.extend((0..len).map(|i| fill.wrapping_add(i as u8)));
        }
        if flags & 4 != 0 {
            // Cut the last frame short.
            let cut = inp.u16() as usize % (s.len() + 1);
            s.truncate(s.len() - cut.min(s.len()));
        }
        s
    } else {
        inp.rest().to_vec()
    };

    let (want, want_left) = parse_frames(&stream, max);

    let mut got: Vec<FrameItem> = Vec::new();
    let mut rest = &stream[..];
    let mut i = 0;
    while !rest.is_empty() {
        // Chunk sizes cycle through the chosen ones; 0 means an empty feed.
        let n = if chunks.is_empty() {
            rest.len()
        } else {
            chunks[i % chunks.len()] % (rest.len() + 1)
        };
        i += 1;
        let n = if n == 0 && i > 4 * chunks.len() + 4 {
            rest.len()
        } else {
            n
        };
        dec.feed(&rest[..n], |r| got.push(r.into()));
        rest = &rest[n..];
        assert!(
            dec.buffered() <= max + PREFIX_LEN,
            "buffered {} > {}",
            dec.buffered(),
            max + 2
        );
    }
    dec.feed(&[], |r| got.push(r.into()));
    assert_eq!(got, want, "decoder output differs from the reference");
    assert_eq!(dec.buffered(), want_left, "bytes held back at the end");

    // The in-place parser over the whole stream at once.
    let mut parser = FrameParser::new(max_arg);
    let mut items = Vec::new();
    let mut pos = 0;
    loop {
        match parser.next(&stream[pos..]) {
            Event::Frame(r) => {
                items.push(FrameItem::Frame(stream[pos..][r.clone()].to_vec()));
                pos += r.end;
            }
            Event::TooLarge { len, consumed } => {
                items.push(FrameItem::TooLarge { len, max });
                assert!(consumed >= PREFIX_LEN && consumed <= PREFIX_LEN + len);
                pos += consumed;
            }
            Event::Skipped { consumed } => {
                assert!(consumed > 0);
                pos += consumed;
            }
            Event::NeedMore => break,
        }
    }
    assert_eq!(items, want, "parser output differs from the reference");
});
