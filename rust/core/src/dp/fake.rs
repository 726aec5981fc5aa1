//! An in-memory datagram network for tests: sockets bound to addresses on a shared
//! [`FakeNet`]; sending to an address nobody holds loses the datagram, as UDP does. Tests can
//! inject datagrams from any source and move a socket to a new address (roaming).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::sys;
use super::transport::{Datagram, Transport, TransportKind};

/// Datagrams a socket sent, with their destinations.
pub type SentLog = Vec<(Vec<u8>, SocketAddr)>;

#[derive(Default)]
pub struct FakeNet {
    socks: Mutex<HashMap<SocketAddr, Weak<FakeSocket>>>,
}

pub struct FakeSocket {
    net: Arc<FakeNet>,
    addr: Mutex<SocketAddr>,
    kind: TransportKind,
    ready: OwnedFd,
    queue: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    /// Datagrams sent by this socket (all of them, for wire checks), if recording.
    pub sent_log: Mutex<Option<SentLog>>,
    /// While set, arriving datagrams queue up without waking the receiver (see
    /// [`hold`](FakeSocket::hold)).
    held: AtomicBool,
}

impl FakeNet {
    pub fn new() -> Arc<FakeNet> {
        Arc::new(FakeNet::default())
    }

    pub fn bind(
        self: &Arc<FakeNet>,
        addr: SocketAddr,
        kind: TransportKind,
    ) -> io::Result<Arc<FakeSocket>> {
        let s = Arc::new(FakeSocket {
            net: self.clone(),
            addr: Mutex::new(addr),
            kind,
            ready: sys::eventfd()?,
            queue: Mutex::new(VecDeque::new()),
            sent_log: Mutex::new(None),
            held: AtomicBool::new(false),
        });
        self.socks.lock().unwrap().insert(addr, Arc::downgrade(&s));
        Ok(s)
    }

    /// Deliver `payload` to whoever holds `to`, as if sent from `from`.
    pub fn inject(&self, to: SocketAddr, from: SocketAddr, payload: &[u8]) -> bool {
        let s = self.socks.lock().unwrap().get(&to).and_then(Weak::upgrade);
        match s {
            Some(s) => {
                s.deliver(payload.to_vec(), from);
                true
            }
            None => false,
        }
    }
}

impl FakeSocket {
    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock().unwrap()
    }

    /// Move to a new address (a NAT rebinding or a roaming client).
    pub fn rebind(self: &Arc<FakeSocket>, new: SocketAddr) {
        let mut a = self.addr.lock().unwrap();
        let mut socks = self.net.socks.lock().unwrap();
        socks.remove(&a);
        socks.insert(new, Arc::downgrade(self));
        *a = new;
    }

    /// Hold arriving datagrams (`true`) so that they are received in one batch once released
    /// (`false`), as a busy receiver finds a full socket queue.
    pub fn hold(&self, on: bool) {
        self.held.store(on, Ordering::SeqCst);
        if !on && !self.queue.lock().unwrap().is_empty() {
            sys::signal(&self.ready);
        }
    }

    /// Datagrams waiting to be received.
    pub fn queued(&self) -> usize {
        self.queue.lock().unwrap().len()
    }

    pub fn record(&self) {
        *self.sent_log.lock().unwrap() = Some(Vec::new());
    }

    fn deliver(&self, p: Vec<u8>, from: SocketAddr) {
        let mut q = self.queue.lock().unwrap();
        if q.len() < 65536 {
            q.push_back((p, from));
        }
        if !self.held.load(Ordering::SeqCst) {
            sys::signal(&self.ready);
        }
    }
}

impl Transport for FakeSocket {
    fn kind(&self) -> TransportKind {
        self.kind
    }
    fn poll_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
    fn recv_batch(&self, bufs: &mut [Vec<u8>], out: &mut Vec<Datagram>) -> io::Result<()> {
        let mut q = self.queue.lock().unwrap();
        for (i, buf) in bufs.iter_mut().enumerate() {
            let Some((p, from)) = q.pop_front() else {
                break;
            };
            let n = p.len().min(buf.len());
            buf[..n].copy_from_slice(&p[..n]);
            out.push(Datagram {
                buf: i,
                start: 0,
                len: n,
                from,
                truncated: n < p.len(),
            });
        }
        if q.is_empty() {
            sys::clear(&self.ready);
        }
        Ok(())
    }
    fn send_batch(&self, pkts: &[(&[u8], SocketAddr)]) -> usize {
        let me = self.addr();
        if let Some(log) = self.sent_log.lock().unwrap().as_mut() {
            log.extend(pkts.iter().map(|(p, to)| (p.to_vec(), *to)));
        }
        for (p, to) in pkts {
            self.net.inject(*to, me, p);
        }
        pkts.len()
    }
}
