//! The packet device of a data plane: a TUN/TAP descriptor, or an in-memory fake for tests.
//! The data plane reads each packet into a buffer at an offset (headroom) leaving room for the
//! ESP header in front of it, so encapsulation happens in place.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::sys;
use crate::tun::Kind;

pub trait Device: Send + Sync + 'static {
    /// TUN (IP packets) or TAP (Ethernet frames).
    fn kind(&self) -> Kind;
    /// Readable when [`recv`](Self::recv) may return a packet.
    fn poll_fd(&self) -> RawFd;
    /// Read one packet into `buf` without blocking; `Ok(None)` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Write one packet without blocking (a full device drops it: `Err(WouldBlock)`).
    fn send(&self, pkt: &[u8]) -> io::Result<()>;
}

/// A TUN/TAP descriptor (the data plane works on its own duplicate).
pub struct TunDevice {
    fd: OwnedFd,
    kind: Kind,
}

impl TunDevice {
    /// Wrap a duplicate of `fd` (the caller's descriptor stays the caller's), non-blocking.
    pub fn from_fd(fd: RawFd, kind: Kind) -> io::Result<TunDevice> {
        let fd = sys::dup(fd)?;
        sys::set_nonblocking(fd.as_raw_fd())?;
        Ok(TunDevice { fd, kind })
    }
}

impl Device for TunDevice {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        match sys::retry(|| {
            sys::cvt(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
        }) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "device closed",
            )),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        // SAFETY: pkt is valid for reads of pkt.len() bytes.
        sys::retry(|| {
            sys::cvt(unsafe { libc::write(self.fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) })
        })
        .map(|_| ())
    }
}

/// An in-memory device: the test [`inject`](Self::inject)s packets "from the OS" and
/// [`take`](Self::take)s the packets the data plane delivered.
pub struct FakeDevice {
    kind: Kind,
    ready: OwnedFd,
    inbound: Mutex<VecDeque<Vec<u8>>>,
    delivered: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    /// Most packets held in `delivered` before the device reports "full".
    pub capacity: usize,
}

impl FakeDevice {
    pub fn new(kind: Kind) -> io::Result<FakeDevice> {
        Ok(FakeDevice {
            kind,
            ready: sys::eventfd()?,
            inbound: Mutex::new(VecDeque::new()),
            delivered: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            capacity: 1 << 20,
        })
    }

    pub fn inject(&self, pkt: &[u8]) {
        let mut q = self.inbound.lock().unwrap();
        q.push_back(pkt.to_vec());
        sys::signal(&self.ready);
    }

    /// Wait up to `timeout` for the next delivered packet.
    pub fn take(&self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut q = self.delivered.lock().unwrap();
        loop {
            if let Some(p) = q.pop_front() {
                return Some(p);
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            q = self.arrived.wait_timeout(q, end - now).unwrap().0;
        }
    }

    pub fn pending_inbound(&self) -> usize {
        self.inbound.lock().unwrap().len()
    }
}

impl Device for FakeDevice {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn poll_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut q = self.inbound.lock().unwrap();
        let Some(p) = q.pop_front() else {
            sys::clear(&self.ready);
            return Ok(None);
        };
        if q.is_empty() {
            sys::clear(&self.ready);
        }
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(Some(n))
    }
    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        let mut q = self.delivered.lock().unwrap();
        if q.len() >= self.capacity {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        q.push_back(pkt.to_vec());
        self.arrived.notify_all();
        Ok(())
    }
}
