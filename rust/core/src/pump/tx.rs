//! Device → stream. Packets are read straight into a batch buffer at the offset where they
//! belong in their frame (`prefix | ESP header | IV | inner`), encapsulated in place, and the
//! frames read back to back while the device has packets ready are sent with one `send`.

use std::io::ErrorKind::WouldBlock;

use super::control::PumpExit;
use super::counters::Tally;
use super::sys::{self, Wake};
use super::Worker;
use crate::drop::DropReason;
use crate::esp::{self, EncapError, NH_ETHERNET, PAYLOAD_OFFSET};
use crate::frame::{self, PREFIX_LEN};
use crate::tun::Kind;

/// Stop reading packets into a batch once it holds this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// How filling a batch ended.
enum Next {
    /// The device has no packet ready: wait for it.
    Drained,
    /// The batch is full: send it and read on.
    Full,
    /// Send the batch, then end the pump.
    End(PumpExit),
}

struct Tx<'a> {
    w: Worker<'a>,
    buf: Vec<u8>,
    /// Where a packet is read, relative to its frame's start.
    packet_offset: usize,
    /// How many bytes each device read may return: one more than the largest packet that fits
    /// in a frame, so a longer (truncated) packet is recognised and dropped.
    read_len: usize,
    tally: Tally,
}

pub(super) fn run(w: Worker) -> PumpExit {
    let (packet_offset, largest) = match w.sa {
        None => (PREFIX_LEN, w.max_frame),
        Some(_) => (PREFIX_LEN + PAYLOAD_OFFSET, largest_inner(w.max_frame)),
    };
    Tx {
        buf: vec![0; BATCH_BYTES + PREFIX_LEN + w.max_frame + 1],
        packet_offset,
        read_len: largest + 1,
        tally: Tally::default(),
        w,
    }
    .run()
}

/// The longest inner packet whose ESP packet is at most `max_frame` bytes.
fn largest_inner(max_frame: usize) -> usize {
    let blocks = (max_frame - esp::MIN_PACKET_LEN) / 16 + 1;
    blocks * 16 - 2
}

impl Tx<'_> {
    fn run(&mut self) -> PumpExit {
        let (dev, stop) = (self.w.dev, self.w.ctl.stop_fd());
        loop {
            if self.w.ctl.stopping() {
                return PumpExit::Stopped;
            }
            let (len, next) = self.fill();
            if len > 0 {
                if let Err(exit) = self.send(len) {
                    return exit;
                }
            }
            match next {
                Next::Full => {}
                Next::End(exit) => return exit,
                Next::Drained => match sys::wait(dev, libc::POLLIN, stop) {
                    Ok(Wake::Ready) => {}
                    Ok(Wake::Stop) => return PumpExit::Stopped,
                    Err(e) => return PumpExit::Device(e),
                },
            }
        }
    }

    /// Read packets into frames until the device has none ready or the batch is full.
    /// Returns the batch length.
    fn fill(&mut self) -> (usize, Next) {
        let mut off = 0;
        while off < BATCH_BYTES {
            let start = off + self.packet_offset;
            let n = match sys::read(self.w.dev, &mut self.buf[start..start + self.read_len]) {
                Ok(0) => return (off, Next::End(PumpExit::DeviceClosed)),
                Ok(n) => n,
                Err(e) if e.kind() == WouldBlock => return (off, Next::Drained),
                Err(e) => return (off, Next::End(PumpExit::Device(e))),
            };
            match self.frame(off, n) {
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
    fn frame(&mut self, off: usize, n: usize) -> Result<Option<usize>, PumpExit> {
        if n >= self.read_len {
            self.w.counters.drop(DropReason::Oversize);
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
                            self.w.counters.drop(DropReason::BadInner);
                            return Ok(None);
                        }
                    },
                };
                let esp_buf = &mut self.buf[off + PREFIX_LEN..][..esp::encap_len(n)];
                match sa.encap_in_place(esp_buf, n, nh) {
                    Ok(len) => len,
                    Err(EncapError::SeqExhausted { .. }) => {
                        self.w.counters.drop(DropReason::SeqExhausted);
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

    /// Send `buf[..len]` whole, waiting for room in the socket as needed.
    fn send(&mut self, len: usize) -> Result<(), PumpExit> {
        let (sock, stop) = (self.w.sock, self.w.ctl.stop_fd());
        let mut sent = 0;
        while sent < len {
            match sys::send(sock, &self.buf[sent..len]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == WouldBlock => match sys::wait(sock, libc::POLLOUT, stop) {
                    Ok(Wake::Ready) => {}
                    Ok(Wake::Stop) => return Err(PumpExit::Stopped),
                    Err(e) => return Err(PumpExit::Socket(e)),
                },
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    return Err(PumpExit::PeerClosed)
                }
                Err(e) => return Err(PumpExit::Socket(e)),
            }
        }
        self.tally.wire_bytes += len as u64;
        self.w.counters.flush_tx(&mut self.tally);
        Ok(())
    }
}
