//! Stream → device. The stream is read in large chunks into one buffer, frames are parsed and
//! decapsulated where they lie, and each inner packet is written to the device. Only the
//! unfinished tail of the buffer is ever moved, and only when the space after it runs short.

use std::io::ErrorKind::WouldBlock;
use std::ops::Range;

use super::control::PumpExit;
use super::counters::Tally;
use super::sys::{self, Wake};
use super::Worker;
use crate::drop::DropReason;
use crate::esp::{SecurityAssociation, HEADER_LEN, NH_ETHERNET, NH_IPV4, NH_IPV6, NH_NONE};
use crate::frame::{Event, FrameParser, PREFIX_LEN};
use crate::tun::Kind;

const BUF_BYTES: usize = 256 * 1024;
/// Shortest Ethernet frame a TAP device accepts (destination, source, EtherType).
const ETH_HEADER_LEN: usize = 14;

pub(super) fn run(w: Worker) -> PumpExit {
    Rx { w }.run()
}

struct Rx<'a> {
    w: Worker<'a>,
}

impl Rx<'_> {
    fn run(mut self) -> PumpExit {
        let mut buf = vec![0u8; BUF_BYTES];
        let mut parser = FrameParser::new(self.w.max_frame);
        let mut tally = Tally::default();
        // Compact when less than one whole frame fits after the unparsed bytes.
        let min_free = PREFIX_LEN + self.w.max_frame;
        let (mut start, mut end) = (0, 0);
        let mut drained = false;
        loop {
            if self.w.ctl.stopping() {
                return PumpExit::Stopped;
            }
            if drained {
                match sys::wait(self.w.sock, libc::POLLIN, self.w.ctl.stop_fd()) {
                    Ok(Wake::Ready) => {}
                    Ok(Wake::Stop) => return PumpExit::Stopped,
                    Err(e) => return PumpExit::Socket(e),
                }
            }
            let n = match sys::read(self.w.sock, &mut buf[end..]) {
                Ok(0) => return PumpExit::PeerClosed,
                Ok(n) => n,
                Err(e) if e.kind() == WouldBlock => {
                    drained = true;
                    continue;
                }
                Err(e) => return PumpExit::Socket(e),
            };
            // A read that did not fill the buffer most likely emptied the socket.
            drained = end + n < buf.len();
            end += n;
            tally.wire_bytes += n as u64;
            loop {
                match parser.next(&buf[start..end]) {
                    Event::Frame(r) => {
                        let frame = &mut buf[start + r.start..start + r.end];
                        start += r.end;
                        if let Err(exit) = self.deliver(frame, &mut tally) {
                            return exit;
                        }
                    }
                    Event::TooLarge { consumed, .. } => {
                        self.w.counters.drop(DropReason::Oversize);
                        start += consumed;
                    }
                    Event::Skipped { consumed } => start += consumed,
                    Event::NeedMore => break,
                }
            }
            self.w.counters.flush_rx(&mut tally);
            if start == end {
                (start, end) = (0, 0);
            } else if buf.len() - end < min_free {
                buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
        }
    }

    /// Open one frame and write its packet to the device.
    fn deliver(&mut self, frame: &mut [u8], tally: &mut Tally) -> Result<(), PumpExit> {
        let inner = match &mut self.w.sa {
            None if frame.is_empty() => Err(DropReason::BadLength),
            None => Ok(Some(0..frame.len())),
            Some(sa) => open_esp(sa, self.w.kind, frame),
        };
        match inner {
            Ok(Some(r)) => self.write_device(&frame[r], tally),
            Ok(None) => Ok(()),
            Err(reason) => {
                self.w.counters.drop(reason);
                Ok(())
            }
        }
    }

    /// One write per packet; waits if the device is full, counts a failed write as a drop.
    fn write_device(&self, pkt: &[u8], tally: &mut Tally) -> Result<(), PumpExit> {
        loop {
            match sys::write(self.w.dev, pkt) {
                Ok(_) => {
                    tally.packet(pkt.len());
                    return Ok(());
                }
                Err(e) if e.kind() == WouldBlock => {
                    match sys::wait(self.w.dev, libc::POLLOUT, self.w.ctl.stop_fd()) {
                        Ok(Wake::Ready) => {}
                        Ok(Wake::Stop) => return Err(PumpExit::Stopped),
                        Err(e) => return Err(PumpExit::Device(e)),
                    }
                }
                Err(_) => {
                    self.w.counters.drop(DropReason::DeviceWrite);
                    return Ok(());
                }
            }
        }
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
