//! Stream → device. The stream is read in large chunks into one buffer, frames are parsed and
//! decapsulated where they lie, and each inner packet is written to the device. Only the
//! unfinished tail of the buffer is ever moved, and only when the space after it runs short.
//! A packet the device has no room for stays where it is until the device has.

use std::io::ErrorKind::WouldBlock;
use std::ops::Range;

use super::control::PumpExit;
use super::counters::Tally;
use super::linger::{Direction, Need, Progress};
use super::sys;
use super::{Shared, Worker};
use crate::drop::DropReason;
use crate::esp::{SecurityAssociation, HEADER_LEN, NH_ETHERNET, NH_IPV4, NH_IPV6, NH_NONE};
use crate::frame::{Event, FrameParser, PREFIX_LEN};
use crate::tun::Kind;

const BUF_BYTES: usize = 256 * 1024;
/// The most read from the stream at a time when the tx thread steals this work (its own work
/// waits meanwhile): a round trip's reply or a few full-size packets.
const STEAL_BYTES: usize = 16 * 1024;
/// Shortest Ethernet frame a TAP device accepts (destination, source, EtherType).
const ETH_HEADER_LEN: usize = 14;

pub(super) struct Rx {
    w: Worker,
    buf: Vec<u8>,
    parser: FrameParser,
    tally: Tally,
    /// `buf[start..end]` is read and not parsed yet.
    start: usize,
    end: usize,
    /// A decapsulated packet in `buf` (before `start`) that the device had no room for.
    unwritten: Option<Range<usize>>,
}

impl Rx {
    pub fn new(w: Worker) -> Rx {
        Rx {
            buf: vec![0u8; BUF_BYTES],
            parser: FrameParser::new(w.max_frame),
            tally: Tally::default(),
            start: 0,
            end: 0,
            unwritten: None,
            w,
        }
    }
}

impl Direction for Rx {
    fn idle(&self) -> bool {
        self.unwritten.is_none()
    }

    fn work(&mut self, sh: &Shared, steal: bool) -> Result<Progress, PumpExit> {
        let (mut moved, mut done) = (false, false);
        loop {
            if !self.deliver(sh)? {
                return Ok(Progress {
                    need: Need::Output,
                    moved,
                });
            }
            if done {
                break;
            }
            if sh.ctl.stopping() {
                return Err(PumpExit::Stopped);
            }
            let limit = match steal {
                true => self.buf.len().min(self.end + STEAL_BYTES),
                false => self.buf.len(),
            };
            let n = match sys::read(self.w.sock, &mut self.buf[self.end..limit]) {
                Ok(0) => return Err(PumpExit::PeerClosed),
                Ok(n) => n,
                Err(e) if e.kind() == WouldBlock => break,
                Err(e) => return Err(PumpExit::Socket(e)),
            };
            // A read that did not fill the space most likely emptied the socket: poll next.
            done = steal || self.end + n < limit;
            moved = true;
            self.end += n;
            self.tally.wire_bytes += n as u64;
        }
        Ok(Progress {
            need: Need::Input,
            moved,
        })
    }
}

impl Rx {
    /// Write the packet the device had no room for, then open every whole frame read so far
    /// and write its packet. False if the device is full.
    fn deliver(&mut self, sh: &Shared) -> Result<bool, PumpExit> {
        if let Some(pkt) = self.unwritten.take() {
            if !self.write_device(sh, pkt) {
                return Ok(false);
            }
        }
        loop {
            match self.parser.next(&self.buf[self.start..self.end]) {
                Event::Frame(r) => {
                    let frame = self.start + r.start..self.start + r.end;
                    self.start += r.end;
                    if let Some(pkt) = self.open(sh, frame) {
                        if !self.write_device(sh, pkt) {
                            sh.counters.flush_rx(&mut self.tally);
                            return Ok(false);
                        }
                    }
                }
                Event::TooLarge { consumed, .. } => {
                    sh.counters.drop(DropReason::Oversize);
                    self.start += consumed;
                }
                Event::Skipped { consumed } => self.start += consumed,
                Event::NeedMore => break,
            }
        }
        sh.counters.flush_rx(&mut self.tally);
        // Compact when less than one whole frame fits after the unparsed bytes.
        let min_free = PREFIX_LEN + self.w.max_frame;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < min_free {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        Ok(true)
    }

    /// Open the frame at `buf[frame]`; the range of its packet, `None` if it has none to write.
    fn open(&mut self, sh: &Shared, frame: Range<usize>) -> Option<Range<usize>> {
        let at = frame.start;
        let frame = &mut self.buf[frame];
        let inner = match &mut self.w.sa {
            None if frame.is_empty() => Err(DropReason::BadLength),
            None => Ok(Some(0..frame.len())),
            Some(sa) => open_esp(sa, self.w.kind, frame),
        };
        match inner {
            Ok(r) => r.map(|r| at + r.start..at + r.end),
            Err(reason) => {
                sh.counters.drop(reason);
                None
            }
        }
    }

    /// One write per packet; false (and the packet kept) if the device is full. A failed
    /// write counts as a drop.
    fn write_device(&mut self, sh: &Shared, pkt: Range<usize>) -> bool {
        match sys::write(self.w.dev, &self.buf[pkt.clone()]) {
            Ok(_) => self.tally.packet(pkt.len()),
            Err(e) if e.kind() == WouldBlock => {
                self.unwritten = Some(pkt);
                return false;
            }
            Err(_) => sh.counters.drop(DropReason::DeviceWrite),
        }
        true
    }
}

/// Check and decapsulate one ESP-mode frame in place. `Ok(None)` is a dummy packet (next
/// header 59), discarded without counting.
fn open_esp(
    sa: &mut SecurityAssociation,
    kind: Kind,
    frame: &mut [u8],
) -> Result<Option<Range<usize>>, DropReason> {
    if frame.len() >= 4 && frame[..4] == [0; 4] {
        return Err(DropReason::Control);
    }
    if frame.len() < HEADER_LEN {
        return Err(DropReason::BadLength);
    }
    if u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) != sa.spi() {
        return Err(DropReason::UnknownSpi);
    }
    let d = sa.decap_in_place(frame)?;
    if d.next_header == NH_NONE {
        return Ok(None);
    }
    let inner = &frame[d.inner.clone()];
    let version = inner.first().map(|b| b >> 4);
    let fits = match (kind, d.next_header) {
        (Kind::Tun, NH_IPV4) => version == Some(4),
        (Kind::Tun, NH_IPV6) => version == Some(6),
        (Kind::Tap, NH_ETHERNET) => inner.len() >= ETH_HEADER_LEN,
        _ => false,
    };
    if fits {
        Ok(Some(d.inner))
    } else {
        Err(DropReason::BadInner)
    }
}
