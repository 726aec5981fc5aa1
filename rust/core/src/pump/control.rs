//! Start/stop coordination of the two pump threads: the stop flag and eventfd, the "done"
//! eventfd, and the reason the pump ended.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::sys;

/// Why the pump ended.
#[derive(Debug)]
pub enum PumpExit {
    /// [`Pump::stop`](super::Pump::stop) was called.
    Stopped,
    /// The stream reached end of file: the peer closed the connection.
    PeerClosed,
    /// Reading or writing the stream socket failed.
    Socket(io::Error),
    /// Reading the device failed.
    Device(io::Error),
    /// The device descriptor reached end of file.
    DeviceClosed,
    /// The outbound SA used its last sequence number; the session must rekey.
    SeqExhausted,
    /// A pump thread panicked (a bug).
    Panicked,
}

impl fmt::Display for PumpExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PumpExit::Stopped => f.write_str("stopped"),
            PumpExit::PeerClosed => f.write_str("peer closed the connection"),
            PumpExit::Socket(e) => write!(f, "socket error: {e}"),
            PumpExit::Device(e) => write!(f, "device error: {e}"),
            PumpExit::DeviceClosed => f.write_str("device closed"),
            PumpExit::SeqExhausted => {
                f.write_str("sequence numbers exhausted; a new session is needed")
            }
            PumpExit::Panicked => f.write_str("internal error: a data-plane thread panicked"),
        }
    }
}

pub(super) struct Control {
    stopping: AtomicBool,
    stop_fd: OwnedFd,
    done_fd: OwnedFd,
    live: AtomicUsize,
    exit: OnceLock<PumpExit>,
}

impl Control {
    pub fn new(threads: usize) -> io::Result<Control> {
        Ok(Control {
            stopping: AtomicBool::new(false),
            stop_fd: sys::eventfd()?,
            done_fd: sys::eventfd()?,
            live: AtomicUsize::new(threads),
            exit: OnceLock::new(),
        })
    }

    /// Checked by the threads between batches (cheaper than polling the eventfd).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Polled by the threads together with their descriptor.
    pub fn stop_fd(&self) -> RawFd {
        self.stop_fd.as_raw_fd()
    }

    pub fn done_fd(&self) -> RawFd {
        self.done_fd.as_raw_fd()
    }

    /// Why the pump ended, once both threads have.
    pub fn exit(&self) -> Option<&PumpExit> {
        if self.running() {
            return None;
        }
        self.exit.get()
    }

    pub fn running(&self) -> bool {
        self.live.load(Ordering::Acquire) > 0
    }

    /// Record `why` (the first reason wins) and tell every thread to stop.
    pub fn end(&self, why: PumpExit) {
        let _ = self.exit.set(why);
        self.stopping.store(true, Ordering::Relaxed);
        sys::signal(&self.stop_fd);
    }

    /// Called by each thread as its very last step; the last one signals "done".
    pub fn thread_exited(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            sys::signal(&self.done_fd);
        }
    }
}
