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
    /// Write one packet without blocking (a full device drops it: `Err(WouldBlock)`). On a
    /// device with vnet headers an empty header (a plain, checksummed packet) goes first.
    fn send(&self, pkt: &[u8]) -> io::Result<()>;
    /// Size of the `virtio_net_hdr` in front of every packet [`recv`](Self::recv) returns and
    /// [`send_vnet`](Self::send_vnet) takes (0: none, the device carries bare packets).
    fn vnet_hdr_len(&self) -> usize {
        0
    }
    /// Write `buf`, a vnet header of [`vnet_hdr_len`](Self::vnet_hdr_len) bytes and then a
    /// packet (a coalesced super-packet), without blocking.
    fn send_vnet(&self, buf: &[u8]) -> io::Result<()> {
        self.send(buf)
    }
}

/// Largest vnet header size handled (TUN's default is 10; virtio's is 12).
pub const MAX_VNET_HDR: usize = 32;

/// A TUN/TAP descriptor (the data plane works on its own duplicate).
pub struct TunDevice {
    fd: OwnedFd,
    kind: Kind,
    vnet: usize,
}

impl TunDevice {
    /// Wrap a duplicate of `fd` (the caller's descriptor stays the caller's), non-blocking.
    /// A TUN device opened with `IFF_VNET_HDR` ([`crate::tun::open_offload`]) is detected:
    /// its packets then carry vnet headers.
    pub fn from_fd(fd: RawFd, kind: Kind) -> io::Result<TunDevice> {
        let vnet = crate::tun::vnet_hdr_len(fd).unwrap_or(0);
        if vnet > MAX_VNET_HDR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the device's vnet header size is {vnet} bytes (at most {MAX_VNET_HDR} handled); reset it with TUNSETVNETHDRSZ or reopen the device"),
            ));
        }
        let fd = sys::dup(fd)?;
        sys::set_nonblocking(fd.as_raw_fd())?;
        Ok(TunDevice { fd, kind, vnet })
    }

    fn write(&self, pkt: &[u8]) -> io::Result<()> {
        // SAFETY: pkt is valid for reads of pkt.len() bytes.
        sys::retry(|| {
            sys::cvt(unsafe { libc::write(self.fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) })
        })
        .map(|_| ())
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
        if self.vnet == 0 {
            return self.write(pkt);
        }
        let none = [0u8; MAX_VNET_HDR];
        let iov = [
            libc::iovec {
                iov_base: none.as_ptr() as *mut libc::c_void,
                iov_len: self.vnet,
            },
            libc::iovec {
                iov_base: pkt.as_ptr() as *mut libc::c_void,
                iov_len: pkt.len(),
            },
        ];
        // SAFETY: both iovecs point into live buffers of the stated lengths.
        sys::retry(|| sys::cvt(unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) }))
            .map(|_| ())
    }
    fn vnet_hdr_len(&self) -> usize {
        self.vnet
    }
    fn send_vnet(&self, buf: &[u8]) -> io::Result<()> {
        self.write(buf)
    }
}

/// An in-memory device: the test [`inject`](Self::inject)s packets "from the OS" and
/// [`take`](Self::take)s the packets the data plane delivered. Made
/// [`with_vnet`](Self::with_vnet), it models a TUN device opened with `IFF_VNET_HDR`: what is
/// injected and taken starts with a vnet header (the data plane's plain writes get an empty
/// one, as the kernel's TUN device would read them).
/// What [`FakeDevice::answer_quietly`] calls: a delivered packet → the answer, if any.
pub type Answer = fn(&[u8]) -> Option<Vec<u8>>;

pub struct FakeDevice {
    kind: Kind,
    vnet: usize,
    ready: OwnedFd,
    inbound: Mutex<VecDeque<Vec<u8>>>,
    delivered: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    /// Most packets held in `delivered` before the device reports "full".
    pub capacity: usize,
    /// Called with each delivered packet; what it returns is queued for reading *without*
    /// making the device readable, as a reply the kernel produced during the write that the
    /// device thread has not been woken for (tests of who sends it).
    pub answer_quietly: Option<Answer>,
}

impl FakeDevice {
    pub fn new(kind: Kind) -> io::Result<FakeDevice> {
        Ok(FakeDevice {
            kind,
            vnet: 0,
            ready: sys::eventfd()?,
            inbound: Mutex::new(VecDeque::new()),
            delivered: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            capacity: 1 << 20,
            answer_quietly: None,
        })
    }

    /// A TUN device whose packets carry vnet headers of `hdr_sz` bytes (10 or 12).
    pub fn with_vnet(hdr_sz: usize) -> io::Result<FakeDevice> {
        let mut d = FakeDevice::new(Kind::Tun)?;
        d.vnet = hdr_sz.min(MAX_VNET_HDR);
        Ok(d)
    }

    fn deliver(&self, buf: Vec<u8>) -> io::Result<()> {
        let mut q = self.delivered.lock().unwrap();
        if q.len() >= self.capacity {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if let Some(reply) = self.answer_quietly.and_then(|f| f(&buf[self.vnet..])) {
            self.inbound.lock().unwrap().push_back(reply);
        }
        q.push_back(buf);
        self.arrived.notify_all();
        Ok(())
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
        let mut buf = vec![0u8; self.vnet];
        buf.extend_from_slice(pkt);
        self.deliver(buf)
    }
    fn vnet_hdr_len(&self) -> usize {
        self.vnet
    }
    fn send_vnet(&self, buf: &[u8]) -> io::Result<()> {
        self.deliver(buf.to_vec())
    }
}
