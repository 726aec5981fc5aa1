//! The data plane: two threads moving packets between a packet device (a TUN/TAP descriptor,
//! or anything else that keeps packet boundaries) and a connected stream socket carrying
//! length-prefixed frames, in plaintext or inside ESP.
//!
//! - device → stream (`tx.rs`): packets are read into a batch buffer at their place in the frame,
//!   encapsulated in place, and every packet the device has ready (up to 64 KiB of frames) goes
//!   out in one `send`.
//! - stream → device (`rx.rs`): the stream is read 256 KiB at a time, frames are parsed and
//!   decapsulated in place, each inner packet is written to the device.
//!
//! Each direction is a non-blocking state machine behind a lock; its own thread ("owner") holds
//! the lock while it works and releases it before it sleeps. A thread that has just moved
//! packets after a quiet spell lingers briefly before sleeping, and does the other direction's
//! work itself if that arrives meanwhile and the lock is free (`linger.rs`): a ping through a
//! tunnel then wakes two sleeping threads instead of four.
//!
//! No allocation, blocking lock or shared-counter update per packet. The pump works on
//! duplicates of the caller's descriptors, closed when its threads end; the caller's own
//! descriptors are never closed. Either thread ending (stop, end of stream, error, sequence
//! numbers exhausted) ends the other; when both have ended the `done` eventfd becomes readable.

mod control;
mod counters;
mod linger;
mod rx;
mod sys;
#[cfg(test)]
mod tests;
mod tx;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

pub use control::PumpExit;
pub use counters::PumpStats;

use crate::esp::{SecurityAssociation, MIN_PACKET_LEN};
use crate::frame::MAX_FRAME;
use crate::tun::Kind;
use control::Control;
use counters::Counters;
use linger::Dir;
use rx::Rx;
use tx::Tx;

/// What the frames carry.
// Built once per pump and moved into its threads; boxing the SAs would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Crypto {
    /// Raw packets (byte-compatible with the classic simpletun.c).
    Plaintext,
    /// One ESP packet per frame: `tx` encapsulates outbound packets, `rx` is the only inbound
    /// SA (frames with another SPI are dropped).
    Esp {
        tx: SecurityAssociation,
        rx: SecurityAssociation,
    },
}

pub struct PumpConfig {
    /// TUN (IP packets, next header 4/41) or TAP (Ethernet frames, next header 143).
    pub kind: Kind,
    pub crypto: Crypto,
    /// Largest frame payload sent or accepted; larger inbound frames are skipped and counted
    /// as `oversize`, larger outbound packets dropped likewise.
    pub max_frame: usize,
}

impl PumpConfig {
    pub fn new(kind: Kind, crypto: Crypto) -> PumpConfig {
        PumpConfig {
            kind,
            crypto,
            max_frame: MAX_FRAME,
        }
    }
}

/// What the pump and its threads share (outlives the threads).
struct Shared {
    ctl: Control,
    counters: Counters,
}

/// The fixed parameters of one direction (its direction decides which SA it is given).
struct Worker {
    dev: RawFd,
    sock: RawFd,
    kind: Kind,
    sa: Option<SecurityAssociation>,
    max_frame: usize,
}

/// What the threads work on: the pump's own duplicates of the two descriptors and the state of
/// each direction. Dropped by the last thread, which closes the descriptors.
struct Plane {
    dev: OwnedFd,
    sock: OwnedFd,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    /// One eventfd per direction ([`Dir::index`]), in its owner's sleep: signalled by the other
    /// thread when work it did there left output waiting (which the owner is not polling for).
    kick: [OwnedFd; 2],
}

impl Plane {
    fn new(device: RawFd, stream: RawFd, config: PumpConfig) -> io::Result<Plane> {
        let PumpConfig {
            kind,
            crypto,
            max_frame,
        } = config;
        let esp = matches!(crypto, Crypto::Esp { .. });
        let min_frame = if esp { MIN_PACKET_LEN } else { 1 };
        if !(min_frame..=MAX_FRAME).contains(&max_frame) {
            return Err(invalid(format!(
                "max_frame {max_frame} is out of range; choose {min_frame} to {MAX_FRAME} bytes"
            )));
        }
        let dup = |fd: RawFd, what: &str| {
            sys::dup(fd).map_err(|e| io::Error::new(e.kind(), format!("{what} {fd}: {e}")))
        };
        let (dev_fd, sock_fd) = (dup(device, "device fd")?, dup(stream, "socket fd")?);
        let (dev, sock) = (dev_fd.as_raw_fd(), sock_fd.as_raw_fd());
        if !sys::is_stream_socket(sock) {
            return Err(invalid(format!(
                "socket fd {stream} is not a stream socket (a connected TCP socket is expected)"
            )));
        }
        sys::set_nonblocking(dev)?;
        sys::set_nonblocking(sock)?;
        sys::set_nodelay_if_tcp(sock);

        let (tx_sa, rx_sa) = match crypto {
            Crypto::Plaintext => (None, None),
            Crypto::Esp { tx, rx } => (Some(tx), Some(rx)),
        };
        let worker = |sa| Worker {
            dev,
            sock,
            kind,
            sa,
            max_frame,
        };
        Ok(Plane {
            dev: dev_fd,
            sock: sock_fd,
            tx: Mutex::new(Tx::new(worker(tx_sa))),
            rx: Mutex::new(Rx::new(worker(rx_sa))),
            kick: [sys::eventfd()?, sys::eventfd()?],
        })
    }
}

/// A running (or ended) data plane. Dropping it stops it.
pub struct Pump {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Pump {
    /// Start pumping between `device` and `stream` (a connected stream socket). Both are
    /// switched to non-blocking mode; neither is closed by the pump.
    pub fn start(device: RawFd, stream: RawFd, config: PumpConfig) -> io::Result<Pump> {
        let plane = Arc::new(Plane::new(device, stream, config)?);
        let owners = [Dir::Tx, Dir::Rx];
        let shared = Arc::new(Shared {
            ctl: Control::new(owners.len())?,
            counters: Counters::default(),
        });
        let pump = Pump {
            shared,
            threads: Mutex::new(Vec::with_capacity(owners.len())),
        };
        let mut unstarted = owners.len();
        for dir in owners {
            if let Err(e) = pump.spawn(dir, &plane) {
                // The threads already running must not wait for partners that never started.
                pump.shared.ctl.end(PumpExit::Stopped);
                for _ in 0..unstarted {
                    pump.shared.ctl.thread_exited();
                }
                return Err(e);
            }
            unstarted -= 1;
        }
        Ok(pump)
    }

    fn spawn(&self, dir: Dir, plane: &Arc<Plane>) -> io::Result<()> {
        let (shared, plane) = (self.shared.clone(), plane.clone());
        let name = match dir {
            Dir::Tx => "simpletun-tx",
            Dir::Rx => "simpletun-rx",
        };
        let handle = thread::Builder::new().name(name.into()).spawn(move || {
            let exit = panic::catch_unwind(AssertUnwindSafe(|| linger::run(&shared, &plane, dir)))
                .unwrap_or(PumpExit::Panicked);
            shared.ctl.end(exit);
            drop(plane);
            shared.ctl.thread_exited();
        })?;
        self.lock_threads().push(handle);
        Ok(())
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop both threads and wait for them. Idempotent; returns at once if already stopped.
    pub fn stop(&self) {
        self.shared.ctl.end(PumpExit::Stopped);
        let mut threads = self.lock_threads();
        for h in threads.drain(..) {
            // Thread bodies catch their panics, so join cannot fail.
            let _ = h.join();
        }
    }

    /// An eventfd that becomes readable once both threads have ended. Valid as long as the
    /// pump exists; never read it (it stays readable).
    pub fn done_fd(&self) -> RawFd {
        self.shared.ctl.done_fd()
    }

    /// True until both threads have ended.
    pub fn running(&self) -> bool {
        self.shared.ctl.running()
    }

    /// Why the pump ended; `None` while it runs.
    pub fn exit(&self) -> Option<&PumpExit> {
        self.shared.ctl.exit()
    }

    pub fn stats(&self) -> PumpStats {
        self.shared.counters.snapshot()
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop();
    }
}
