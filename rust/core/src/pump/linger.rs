//! The loop of each pump thread: do its own direction's work, linger, sleep.
//!
//! Waking a thread that sleeps in `poll` on an idle CPU is the largest cost on a quiet tunnel
//! (tens of microseconds on a virtual machine whose idle CPUs halt at once), and the next event
//! of a round trip lands on the *other* direction: the server's rx thread writes an echo request
//! to the device and the reply appears there, for the tx thread; the client's tx thread sends a
//! request and the reply arrives on the socket, for the rx thread. So a thread that has just
//! moved packets after a quiet spell ([`QUIET`]) does not sleep at once: for [`LINGER`] it polls
//! both descriptors without waiting, yielding the CPU between polls, and when the other
//! direction has input and its lock is free (its owner is asleep) it does a little of that work
//! itself ("steals" it). Under load threads sleep only briefly and never linger.
//!
//! Why this cannot deadlock or stall:
//! - all work is non-blocking; a direction that cannot go on keeps its unfinished output in its
//!   state and reports [`Need::Output`]. No thread ever sleeps holding a lock, and no thread
//!   waits for a lock (`try_lock` only), so a lock is held only for a bounded stretch of work;
//! - work is stolen only from a direction waiting for input, only when that input is there (and
//!   for device → stream only when the socket is writable), and only a little of it;
//! - the owner sleeps polling for what its direction needed when it last looked. Stolen work
//!   can only leave that stale in one way, by leaving output waiting; then the stealer kicks the
//!   owner's eventfd, which is in its poll. (Input left unread keeps the owner's poll ready.)

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use super::control::PumpExit;
use super::sys::{self, Wake};
use super::{Plane, Shared};

/// How long a thread that has just moved packets keeps polling before it sleeps. It must cover
/// the time from a packet leaving through one direction to its answer coming back through the
/// other. On the server the answer (an ICMP echo reply, say) is on the device when the write of
/// the request returns: measured, the steal always happens at the first poll. On the client it
/// is one trip through the peer, whose rx thread must be woken (~65 µs on a VM whose idle vCPUs
/// halt at once) and work (~30-60 µs): measured, 97% of those steals came within 200 µs. Pings
/// every 10 ms between two namespaces on a 2-vCPU VM (added RTT over the bare veth, median of 6
/// runs of 300): no linger +0.25 ms at 1.4% of a CPU; 250 µs +0.12 ms at 2.9%; 500 µs +0.115
/// ms at 4.3% (within noise of 250 µs, for 50% more CPU).
pub(super) const LINGER: Duration = Duration::from_micros(250);

/// A thread lingers only after work that followed a sleep at least this long. Busy traffic
/// (shorter sleeps) gains nothing from lingering: sleeping lets packets gather into larger
/// batches, and spinning there cost ~15% of ESP throughput (iperf3 1.35 instead of 1.57
/// Gbit/s). It also bounds lingering to LINGER / (QUIET + LINGER) = 1/3 of a CPU per thread,
/// whatever the traffic; it pays off down to pings every 1 ms (+0.10 instead of +0.14 ms).
const QUIET: Duration = Duration::from_micros(500);

/// A data direction, named after the thread that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    /// Device → stream.
    Tx,
    /// Stream → device.
    Rx,
}

impl Dir {
    pub fn index(self) -> usize {
        self as usize
    }

    fn other(self) -> Dir {
        match self {
            Dir::Tx => Dir::Rx,
            Dir::Rx => Dir::Tx,
        }
    }
}

/// What a direction needs before it can do more work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Input: a packet on the device (tx), bytes on the socket (rx). Nothing is left over.
    Input,
    /// Room for its unfinished output: in the socket (tx), in the device (rx).
    Output,
}

/// The outcome of a stretch of work that could go no further without blocking.
#[derive(Debug)]
pub(super) struct Progress {
    pub need: Need,
    /// Whether any input was consumed.
    pub moved: bool,
}

impl Plane {
    /// The descriptor and poll events `dir` sleeps on while it has `need`.
    fn sleep_on(&self, dir: Dir, need: Need) -> (RawFd, libc::c_short) {
        let (dev, sock) = (self.dev.as_raw_fd(), self.sock.as_raw_fd());
        match (dir, need) {
            (Dir::Tx, Need::Input) => (dev, libc::POLLIN),
            (Dir::Tx, Need::Output) => (sock, libc::POLLOUT),
            (Dir::Rx, Need::Input) => (sock, libc::POLLIN),
            (Dir::Rx, Need::Output) => (dev, libc::POLLOUT),
        }
    }

    /// Do `dir`'s work if its lock is free: all of it (`steal` false), or a little of it and
    /// only if it is waiting for input (`steal` true). `None` if nothing was done.
    fn try_work(&self, sh: &Shared, dir: Dir, steal: bool) -> Option<Result<Progress, PumpExit>> {
        match dir {
            Dir::Tx => try_work(&self.tx, sh, steal),
            Dir::Rx => try_work(&self.rx, sh, steal),
        }
    }
}

/// A direction's state (`tx.rs`, `rx.rs`).
pub(super) trait Direction {
    /// Move packets until that would block: all there are, or only a few when `steal`ing.
    fn work(&mut self, sh: &Shared, steal: bool) -> Result<Progress, PumpExit>;
    /// True if nothing is left over: the next work is reading input.
    fn idle(&self) -> bool;
}

fn try_work<D: Direction>(
    m: &Mutex<D>,
    sh: &Shared,
    steal: bool,
) -> Option<Result<Progress, PumpExit>> {
    let mut d = match m.try_lock() {
        Ok(d) => d,
        Err(TryLockError::WouldBlock) => return None,
        // A thread panicked in there; it is ending the pump.
        Err(TryLockError::Poisoned(_)) => return Some(Err(PumpExit::Panicked)),
    };
    if steal && !d.idle() {
        return None;
    }
    Some(d.work(sh, steal))
}

/// The body of the thread that owns `me`; returns why the pump ends.
pub(super) fn run(sh: &Shared, p: &Plane, me: Dir) -> PumpExit {
    let mut need = Need::Input;
    // How long the last sleep lasted; a thread just started has seen no traffic at all.
    let mut slept = Duration::MAX;
    loop {
        if sh.ctl.stopping() {
            return PumpExit::Stopped;
        }
        match p.try_work(sh, me, false) {
            Some(Ok(done)) => {
                need = done.need;
                if done.moved && need == Need::Input && slept >= QUIET {
                    match linger(sh, p, me) {
                        Ok(true) => {
                            slept = Duration::ZERO;
                            continue;
                        }
                        Ok(false) => {}
                        Err(exit) => return exit,
                    }
                }
            }
            Some(Err(exit)) => return exit,
            // The other thread is at work here (briefly); let it run, then look again.
            None => thread::yield_now(),
        }
        let (fd, events) = p.sleep_on(me, need);
        let kick = p.kick[me.index()].as_raw_fd();
        let t = Instant::now();
        match sys::wait(fd, events, sh.ctl.stop_fd(), kick) {
            Ok(Wake::Ready | Wake::Kick) => {}
            Ok(Wake::Stop) => return PumpExit::Stopped,
            Err(e) if fd == p.dev.as_raw_fd() => return PumpExit::Device(e),
            Err(e) => return PumpExit::Socket(e),
        }
        slept = t.elapsed();
    }
}

/// Poll both descriptors until [`LINGER`] has passed since the last work done, stealing the
/// other direction's work when it comes. `Ok(true)` as soon as `me` has input again.
fn linger(sh: &Shared, p: &Plane, me: Dir) -> Result<bool, PumpExit> {
    const IN: libc::c_short = libc::POLLIN | libc::POLLERR | libc::POLLHUP;
    let other = me.other();
    let mut until = Instant::now() + LINGER;
    loop {
        if sh.ctl.stopping() {
            return Err(PumpExit::Stopped);
        }
        let (dev, sock) = sys::ready_now(p.dev.as_raw_fd(), p.sock.as_raw_fd());
        let (tx_in, rx_in) = (dev & IN != 0, sock & IN != 0);
        let (mine, theirs) = match me {
            Dir::Tx => (tx_in, rx_in),
            Dir::Rx => (rx_in, tx_in && sock & libc::POLLOUT != 0),
        };
        if mine {
            return Ok(true);
        }
        if theirs {
            if let Some(done) = p.try_work(sh, other, true) {
                let done = done?;
                if done.need == Need::Output {
                    sys::signal(&p.kick[other.index()]);
                }
                if done.moved {
                    until = Instant::now() + LINGER;
                }
            }
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        thread::yield_now();
    }
}
