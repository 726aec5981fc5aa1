//! Anti-replay window (RFC 4303 §3.4.3) kept as an RFC 6479 ring of 64-bit blocks, with
//! Extended Sequence Number inference (RFC 4303 Appendix A).
//!
//! The check and the update are separate steps so that the receiver can check before it spends
//! time on the ICV and update only after the ICV verifies.

use std::fmt;

/// Smallest and largest window sizes accepted, in packets.
pub const MIN_WINDOW: u32 = 32;
pub const MAX_WINDOW: u32 = 1 << 20;
pub const DEFAULT_WINDOW: u32 = 4096;

const BLOCK_BITS: u64 = 64;

/// Why a sequence number was rejected by the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Sequence number 0 is never sent (counters start at 1).
    Zero,
    /// Left of the window: too old to tell whether it was seen.
    TooOld,
    /// Inside the window and already received.
    Duplicate,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplayError::Zero => "sequence number 0 is never valid",
            ReplayError::TooOld => "sequence number is left of the replay window",
            ReplayError::Duplicate => "sequence number was already received",
        })
    }
}

/// A sliding window over the (64-bit) sequence number space.
#[derive(Clone)]
pub struct ReplayWindow {
    /// Window size W: numbers in `top - W + 1 ..= top` are tracked individually.
    size: u64,
    /// Highest authenticated sequence number received (0 = none yet).
    top: u64,
    /// Ring of bitmap blocks; its length is a power of two greater than W/64, so sliding the
    /// window never needs to shift bits: whole blocks are cleared instead (RFC 6479 §2).
    bitmap: Box<[u64]>,
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("size", &self.size)
            .field("top", &self.top)
            .finish()
    }
}

impl ReplayWindow {
    /// A window of `size` packets; `None` unless `MIN_WINDOW <= size <= MAX_WINDOW`.
    pub fn new(size: u32) -> Option<ReplayWindow> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&size) {
            return None;
        }
        let blocks = (size as u64).div_ceil(BLOCK_BITS) + 1;
        let blocks = blocks.next_power_of_two() as usize;
        Some(ReplayWindow {
            size: size as u64,
            top: 0,
            bitmap: vec![0u64; blocks].into_boxed_slice(),
        })
    }

    pub fn size(&self) -> u32 {
        self.size as u32
    }

    /// Highest sequence number accepted so far (0 before the first).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// RFC 4303 Appendix A.2: reconstruct the full 64-bit sequence number from its low 32 bits,
    /// assuming it lies in or right of the current window.
    pub fn infer_esn(&self, seq_low: u32) -> u64 {
        let w = self.size;
        let tl = self.top & 0xffff_ffff;
        let th = self.top >> 32;
        let sl = seq_low as u64;
        let hi = if tl >= w - 1 {
            // The window lies within one 2^32 subspace.
            if sl >= tl - (w - 1) {
                th
            } else {
                th + 1
            }
        } else {
            // The window spans the boundary between subspace th-1 and th.
            let bottom_low = (tl.wrapping_sub(w - 1)) & 0xffff_ffff;
            if sl >= bottom_low && th > 0 {
                th - 1
            } else {
                th
            }
        };
        // th + 1 only overflows after 2^64 packets, which the sender refuses to send.
        (hi.min(0xffff_ffff) << 32) | sl
    }

    fn locate(seq: u64, blocks: usize) -> (usize, u64) {
        let block = ((seq / BLOCK_BITS) as usize) & (blocks - 1);
        (block, 1u64 << (seq % BLOCK_BITS))
    }

    /// Start the window after `last` (nothing received yet): the sender's first packet is
    /// `last + 1`, what the kernel's `XFRMA_REPLAY_ESN_VAL` `seq`/`seq_hi` preset does (manual
    /// keying, tests). Only before anything was accepted; returns false otherwise.
    pub fn start_after(&mut self, last: u64) -> bool {
        if self.top != 0 {
            return false;
        }
        self.top = last;
        true
    }

    /// Would `seq` be accepted? Does not change the window.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::Zero);
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= self.size {
            return Err(ReplayError::TooOld);
        }
        let (block, bit) = Self::locate(seq, self.bitmap.len());
        if self.bitmap[block] & bit != 0 {
            Err(ReplayError::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Record `seq` as received, sliding the window right if it is new highest. Call only after
    /// the packet's ICV has verified, and only with a number `check` accepted.
    pub fn commit(&mut self, seq: u64) {
        let blocks = self.bitmap.len();
        if seq > self.top {
            let old_block = self.top / BLOCK_BITS;
            let new_block = seq / BLOCK_BITS;
            let advance = (new_block - old_block).min(blocks as u64) as usize;
            for i in 1..=advance {
                let idx = ((old_block as usize).wrapping_add(i)) & (blocks - 1);
                self.bitmap[idx] = 0;
            }
            self.top = seq;
        }
        let (block, bit) = Self::locate(seq, blocks);
        self.bitmap[block] |= bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_after_presets_the_top_once() {
        let mut w = ReplayWindow::new(64).unwrap();
        assert!(w.start_after((1 << 32) - 4));
        assert_eq!(w.infer_esn(0xffff_fffd), (1 << 32) - 3);
        assert!(w.check((1 << 32) - 3).is_ok());
        assert_eq!(w.check((1 << 32) - 100), Err(ReplayError::TooOld));
        w.commit((1 << 32) - 3);
        assert_eq!(w.infer_esn(1), (1 << 32) + 1);
        assert!(!w.start_after(5));
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(ReplayWindow::new(31).is_none());
        assert!(ReplayWindow::new(32).is_some());
        assert!(ReplayWindow::new(65536).is_some());
        assert!(ReplayWindow::new(MAX_WINDOW + 1).is_none());
    }

    #[test]
    fn duplicate_old_and_ahead() {
        let mut w = ReplayWindow::new(64).unwrap();
        assert_eq!(w.check(0), Err(ReplayError::Zero));
        for s in [1, 2, 5, 3] {
            w.check(s).unwrap();
            w.commit(s);
        }
        assert_eq!(w.check(2), Err(ReplayError::Duplicate));
        assert_eq!(w.check(4), Ok(()));
        w.commit(1000);
        // 1000 - 64 + 1 = 937 is the leftmost tracked number.
        assert_eq!(w.check(937), Ok(()));
        assert_eq!(w.check(936), Err(ReplayError::TooOld));
        assert_eq!(w.check(1000), Err(ReplayError::Duplicate));
        assert_eq!(w.check(1001), Ok(()));
    }

    #[test]
    fn bits_are_cleared_when_sliding() {
        let mut w = ReplayWindow::new(64).unwrap();
        w.commit(10);
        // Jump so far that the ring wraps onto the block holding 10's bit.
        let far = 10 + 64 * w.bitmap.len() as u64;
        w.commit(far - 1);
        w.commit(far);
        assert_eq!(w.check(far - 2), Ok(()));
        assert_eq!(w.check(far - 1), Err(ReplayError::Duplicate));
    }

    #[test]
    fn esn_inference() {
        let mut w = ReplayWindow::new(64).unwrap();
        // Before anything: low numbers are in subspace 0.
        assert_eq!(w.infer_esn(1), 1);
        w.commit(0xffff_fff0);
        assert_eq!(w.infer_esn(0xffff_fff5), 0xffff_fff5);
        // Wrapped low bits belong to the next subspace.
        assert_eq!(w.infer_esn(3), (1 << 32) | 3);
        w.commit((1 << 32) | 3);
        // The window now spans the boundary: a late packet from subspace 0.
        assert_eq!(w.infer_esn(0xffff_fffe), 0xffff_fffe);
        assert_eq!(w.infer_esn(10), (1 << 32) | 10);
    }
}
