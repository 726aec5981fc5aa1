//! Device → stream. Packets are read straight into a batch buffer at the offset where they
//! belong in their frame (`prefix | ESP header | IV | inner`), encapsulated in place, and the
//! frames read back to back while the device has packets ready are sent with one `send`. A batch
//! the socket has no room for stays in the buffer until it does.

use std::io::ErrorKind::WouldBlock;
use std::ops::Range;

use super::control::PumpExit;
use super::counters::Tally;
use super::linger::{Direction, Need, Progress};
use super::sys;
use super::{Shared, Worker};
use crate::drop::DropReason;
use crate::esp::{self, EncapError, NH_ETHERNET, PAYLOAD_OFFSET};
use crate::frame::{self, PREFIX_LEN};
use crate::tun::Kind;

/// Stop reading packets into a batch once it holds this many bytes.
const BATCH_BYTES: usize = 64 * 1024;
/// Packets per batch when the rx thread steals this work: a little (its own work waits), and
/// little enough to fit in a socket that polls writable.
const STEAL_PACKETS: usize = 8;

/// How filling a batch ended.
enum Next {
    /// The device has no packet ready: wait for it.
    Drained,
    /// The batch is full (or has `limit` packets): send it and read on.
    Full,
    /// Send the batch, then end the pump.
    End(PumpExit),
}

pub(super) struct Tx {
    w: Worker,
    buf: Vec<u8>,
    /// Where a packet is read, relative to its frame's start.
    packet_offset: usize,
    /// How many bytes each device read may return: one more than the largest packet that fits
    /// in a frame, so a longer (truncated) packet is recognised and dropped.
    read_len: usize,
    tally: Tally,
    /// The part of the batch (which starts at 0 and ends at `unsent.end`) not sent yet.
    unsent: Range<usize>,
    /// Why the pump ends, once the batch is sent.
    end: Option<PumpExit>,
}

impl Tx {
    pub fn new(w: Worker) -> Tx {
        let (packet_offset, largest) = match w.sa {
            None => (PREFIX_LEN, w.max_frame),
            Some(_) => (PREFIX_LEN + PAYLOAD_OFFSET, largest_inner(w.max_frame)),
        };
        Tx {
            buf: vec![0; BATCH_BYTES + PREFIX_LEN + w.max_frame + 1],
            packet_offset,
            read_len: largest + 1,
            tally: Tally::default(),
            unsent: 0..0,
            end: None,
            w,
        }
    }
}

/// The longest inner packet whose ESP packet is at most `max_frame` bytes.
fn largest_inner(max_frame: usize) -> usize {
    let blocks = (max_frame - esp::MIN_PACKET_LEN) / 16 + 1;
    blocks * 16 - 2
}

impl Direction for Tx {
    fn idle(&self) -> bool {
        self.unsent.is_empty() && self.end.is_none()
    }

    fn work(&mut self, sh: &Shared, steal: bool) -> Result<Progress, PumpExit> {
        let limit = if steal { STEAL_PACKETS } else { usize::MAX };
        let (mut moved, mut done) = (false, false);
        loop {
            if !self.send(sh)? {
                return Ok(Progress {
                    need: Need::Output,
                    moved,
                });
            }
            if let Some(exit) = self.end.take() {
                return Err(exit);
            }
            if done {
                return Ok(Progress {
                    need: Need::Input,
                    moved,
                });
            }
            if sh.ctl.stopping() {
                return Err(PumpExit::Stopped);
            }
            let (len, next) = self.fill(sh, limit);
            self.unsent = 0..len;
            moved |= len > 0;
            match next {
                Next::Full => done = steal,
                Next::Drained => done = true,
                Next::End(exit) => self.end = Some(exit),
            }
        }
    }
}

impl Tx {
    /// Read packets into frames until the device has none ready, or the batch is full or has
    /// `limit` packets. Returns the batch length.
    fn fill(&mut self, sh: &Shared, limit: usize) -> (usize, Next) {
        let (mut off, mut packets) = (0, 0);
        while off < BATCH_BYTES && packets < limit {
            let start = off + self.packet_offset;
            let n = match sys::read(self.w.dev, &mut self.buf[start..start + self.read_len]) {
                Ok(0) => return (off, Next::End(PumpExit::DeviceClosed)),
                Ok(n) => n,
                Err(e) if e.kind() == WouldBlock => return (off, Next::Drained),
                Err(e) => return (off, Next::End(PumpExit::Device(e))),
            };
            packets += 1;
            match self.frame(sh, off, n) {
                Ok(Some(len)) => {
                    self.tally.packet(n);
                    off += PREFIX_LEN + len;
                }
                Ok(None) => {}
                Err(exit) => return (off, Next::End(exit)),
            }
        }
        (off, Next::Full)
    }

    /// Turn the `n`-byte packet read at `off + packet_offset` into a frame at `off`. Returns
    /// the payload length, or `None` if the packet was dropped.
    fn frame(&mut self, sh: &Shared, off: usize, n: usize) -> Result<Option<usize>, PumpExit> {
        if n >= self.read_len {
            sh.counters.drop(DropReason::Oversize);
            return Ok(None);
        }
        let payload_len = match &mut self.w.sa {
            None => n,
            Some(sa) => {
                let inner = &self.buf[off + self.packet_offset..][..n];
                let nh = match self.w.kind {
                    Kind::Tap => NH_ETHERNET,
                    Kind::Tun => match esp::infer_next_header(inner) {
                        Some(nh) => nh,
                        None => {
                            sh.counters.drop(DropReason::BadInner);
                            return Ok(None);
                        }
                    },
                };
                let esp_buf = &mut self.buf[off + PREFIX_LEN..][..esp::encap_len(n)];
                match sa.encap_in_place(esp_buf, n, nh) {
                    Ok(len) => len,
                    Err(EncapError::SeqExhausted { .. }) => {
                        sh.counters.drop(DropReason::SeqExhausted);
                        return Err(PumpExit::SeqExhausted);
                    }
                    Err(e) => unreachable!("the batch buffer has room for any frame: {e}"),
                }
            }
        };
        frame::write_prefix(&mut self.buf[off..], payload_len)
            .expect("payloads are at most max_frame bytes");
        Ok(Some(payload_len))
    }

    /// Send what is left of the batch without blocking; false if the socket is full.
    fn send(&mut self, sh: &Shared) -> Result<bool, PumpExit> {
        if self.unsent.is_empty() {
            return Ok(true);
        }
        while !self.unsent.is_empty() {
            match sys::send(self.w.sock, &self.buf[self.unsent.clone()]) {
                Ok(n) => self.unsent.start += n,
                Err(e) if e.kind() == WouldBlock => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    return Err(PumpExit::PeerClosed)
                }
                Err(e) => return Err(PumpExit::Socket(e)),
            }
        }
        self.tally.wire_bytes += self.unsent.end as u64;
        sh.counters.flush_tx(&mut self.tally);
        Ok(true)
    }
}
