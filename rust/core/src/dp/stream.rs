//! The stream transport: TCP connections (or any stream sockets) carrying the 2-byte
//! length-prefixed frames of today's TCP mode, one connection per peer, many at once, behind
//! one epoll descriptor. A connection's endpoint is the address it was added with (normally
//! its peer address), so data-plane peers address connections like datagram endpoints.
//!
//! Backpressure: once a connection holds more than [`TX_LIMIT`] unsent bytes the transport is
//! [`congested`](Transport::congested) and the device thread waits in
//! [`wait_room`](Transport::wait_room) (reading no more packets) until the socket takes them, as
//! the old pump's device thread did; only beyond [`HARD_LIMIT`] is a packet refused.
//!
//! Plaintext mode ([`StreamTransport::plaintext`]): frames carry raw inner packets, byte-compatible
//! with the classic simpletun.c; the data plane then bypasses ESP for its peers.
//!
//! A connection that ends (peer closed, socket error) is reported with its reason through
//! [`Transport::take_closed`] (the data plane turns it into an event).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::sys;
use super::transport::{Datagram, Transport, TransportKind};
use crate::frame::{Event, FrameParser, MAX_FRAME, PREFIX_LEN};

/// Most unsent bytes held per connection.
pub const TX_LIMIT: usize = 4 << 20;
/// Unsent bytes beyond which packets are refused (the device thread stops at [`TX_LIMIT`], so
/// only one batch can land above it).
pub const HARD_LIMIT: usize = 2 * TX_LIMIT;
const RX_BUF: usize = 256 * 1024;
const KICK: u64 = u64::MAX;
// The prefix written by send_batch is a u16.
const _: () = assert!(PREFIX_LEN == 2);

struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    parser: FrameParser,
}

struct Tx {
    buf: Vec<u8>,
    sent: usize,
    want_out: bool,
}

struct Conn {
    fd: OwnedFd,
    token: u64,
    endpoint: SocketAddr,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
}

#[derive(Default)]
struct Conns {
    by_token: HashMap<u64, Arc<Conn>>,
    by_addr: HashMap<SocketAddr, u64>,
    next: u64,
    closed: Vec<(SocketAddr, String)>,
}

pub struct StreamTransport {
    epoll: OwnedFd,
    kick: OwnedFd,
    conns: Mutex<Conns>,
    max_frame: usize,
    plaintext: bool,
    control: bool,
    /// Some connection may hold more than TX_LIMIT unsent bytes.
    full: AtomicBool,
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a valid epoll_event for the kernel to read.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StreamTransport {
    /// Frames carrying ESP and control messages.
    pub fn new(max_frame: usize) -> io::Result<StreamTransport> {
        StreamTransport::with_mode(max_frame, false)
    }

    /// Frames carrying raw inner packets (simpletun.c's `--plaintext` wire format).
    pub fn plaintext(max_frame: usize) -> io::Result<StreamTransport> {
        StreamTransport::with_mode(max_frame, true)
    }

    /// Refuse control messages and keepalives (counted `drop_control`, `drop_bad_length`):
    /// for a connection whose handshake was done before it was handed over.
    pub fn without_control(mut self) -> StreamTransport {
        self.control = false;
        self
    }

    fn with_mode(max_frame: usize, plaintext: bool) -> io::Result<StreamTransport> {
        // SAFETY: plain system call; the descriptor is owned by the OwnedFd.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let kick = sys::eventfd()?;
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            kick.as_raw_fd(),
            libc::EPOLLIN as u32,
            KICK,
        )?;
        Ok(StreamTransport {
            epoll,
            kick,
            conns: Mutex::new(Conns::default()),
            max_frame: max_frame.min(MAX_FRAME),
            plaintext,
            control: !plaintext,
            full: AtomicBool::new(false),
        })
    }

    /// Carry frames on (a duplicate of) the connected stream socket `fd`, known to peers as
    /// `endpoint`. A connection already using that endpoint is replaced (closed).
    pub fn add_connection(&self, fd: RawFd, endpoint: SocketAddr) -> io::Result<()> {
        let ty = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
        if ty != libc::SOCK_STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} is not a stream socket (a connected TCP socket is expected)"),
            ));
        }
        let fd = sys::dup(fd)?;
        sys::set_nonblocking(fd.as_raw_fd())?;
        let one: libc::c_int = 1;
        // SAFETY: valid c_int; failure (not TCP) is harmless.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        let mut c = lock(&self.conns);
        if let Some(old) = c.by_addr.remove(&endpoint) {
            if let Some(conn) = c.by_token.remove(&old) {
                self.forget(&conn);
            }
        }
        let token = c.next;
        c.next += 1;
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            libc::EPOLLIN as u32,
            token,
        )?;
        let conn = Arc::new(Conn {
            fd,
            token,
            endpoint,
            rx: Mutex::new(Rx {
                buf: vec![0; RX_BUF],
                start: 0,
                end: 0,
                parser: FrameParser::new(self.max_frame),
            }),
            tx: Mutex::new(Tx {
                buf: Vec::new(),
                sent: 0,
                want_out: false,
            }),
        });
        c.by_token.insert(token, conn);
        c.by_addr.insert(endpoint, token);
        // Frames may already be waiting.
        sys::signal(&self.kick);
        Ok(())
    }

    /// Close the connection of `endpoint`; false if there is none.
    pub fn remove_connection(&self, endpoint: SocketAddr) -> bool {
        let mut c = lock(&self.conns);
        let Some(t) = c.by_addr.remove(&endpoint) else {
            return false;
        };
        if let Some(conn) = c.by_token.remove(&t) {
            self.forget(&conn);
        }
        true
    }

    pub fn connections(&self) -> Vec<SocketAddr> {
        lock(&self.conns).by_addr.keys().copied().collect()
    }

    fn forget(&self, conn: &Conn) {
        let _ = epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            conn.fd.as_raw_fd(),
            0,
            0,
        );
    }

    fn close(&self, conn: &Conn, why: String) {
        let mut c = lock(&self.conns);
        if c.by_token.remove(&conn.token).is_some() {
            c.by_addr.remove(&conn.endpoint);
            c.closed.push((conn.endpoint, why));
            self.forget(conn);
        }
    }

    /// Send what is buffered; arm EPOLLOUT if some stays. Err = the connection is dead.
    fn flush(&self, conn: &Conn, tx: &mut Tx) -> io::Result<()> {
        while tx.sent < tx.buf.len() {
            let rest = &tx.buf[tx.sent..];
            // SAFETY: rest is valid for reads of rest.len() bytes.
            let r = sys::retry(|| {
                sys::cvt(unsafe {
                    libc::send(
                        conn.fd.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                })
            });
            match r {
                Ok(n) => tx.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if tx.sent == tx.buf.len() {
            tx.buf.clear();
            tx.sent = 0;
        } else if tx.sent > TX_LIMIT {
            tx.buf.drain(..tx.sent);
            tx.sent = 0;
        }
        let want = !tx.buf.is_empty();
        if want != tx.want_out {
            tx.want_out = want;
            let ev = libc::EPOLLIN as u32 | if want { libc::EPOLLOUT as u32 } else { 0 };
            epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                conn.fd.as_raw_fd(),
                ev,
                conn.token,
            )?;
        }
        Ok(())
    }

    /// Move whole frames of `conn` into `bufs[*next..]`; read more when none is buffered.
    /// Returns why, when the connection ended.
    fn drain(
        &self,
        conn: &Conn,
        bufs: &mut [Vec<u8>],
        next: &mut usize,
        out: &mut Vec<Datagram>,
    ) -> Option<String> {
        let mut rx = lock(&conn.rx);
        let rx = &mut *rx;
        loop {
            while *next < bufs.len() {
                match rx.parser.next(&rx.buf[rx.start..rx.end]) {
                    Event::Frame(r) => {
                        let n = r.len();
                        bufs[*next][..n]
                            .copy_from_slice(&rx.buf[rx.start + r.start..rx.start + r.end]);
                        out.push(Datagram {
                            buf: *next,
                            start: 0,
                            len: n,
                            from: conn.endpoint,
                            truncated: false,
                        });
                        *next += 1;
                        rx.start += r.end;
                    }
                    Event::TooLarge { consumed, .. } => {
                        out.push(Datagram {
                            buf: *next,
                            start: 0,
                            len: 0,
                            from: conn.endpoint,
                            truncated: true,
                        });
                        *next += 1;
                        rx.start += consumed;
                    }
                    Event::Skipped { consumed } => rx.start += consumed,
                    Event::NeedMore => break,
                }
            }
            if *next >= bufs.len() {
                // More may be buffered: come back without waiting for the socket.
                sys::signal(&self.kick);
                return None;
            }
            // Compact, then read.
            if rx.start > 0 {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
            }
            let room = &mut rx.buf[rx.end..];
            if room.is_empty() {
                return None; // cannot happen: a frame is at most 65537 bytes
            }
            // SAFETY: room is valid for writes of room.len() bytes.
            let r = sys::retry(|| {
                sys::cvt(unsafe {
                    libc::read(conn.fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len())
                })
            });
            match r {
                Ok(0) if rx.start < rx.end => {
                    return Some("peer closed the connection in the middle of a frame".into())
                }
                Ok(0) => return Some("peer closed the connection".into()),
                Ok(n) => rx.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => return Some(format!("socket error: {e}")),
            }
        }
    }
}

fn socket_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPIPE | libc::ECONNRESET) => "peer reset the connection".into(),
        _ => format!("socket error: {e}"),
    }
}

impl Transport for StreamTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Stream
    }
    fn poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
    fn recv_batch(&self, bufs: &mut [Vec<u8>], out: &mut Vec<Datagram>) -> io::Result<()> {
        // SAFETY: all-zero epoll_events are valid.
        let mut evs: [libc::epoll_event; 64] = unsafe { std::mem::zeroed() };
        // SAFETY: evs holds 64 events.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), 64, 0) };
        let mut writable = Vec::new();
        for ev in evs.iter().take(n.max(0) as usize) {
            let (events, token) = (ev.events, ev.u64);
            if token != KICK && events & libc::EPOLLOUT as u32 != 0 {
                writable.push(token);
            }
        }
        sys::clear(&self.kick);
        let conns: Vec<Arc<Conn>> = lock(&self.conns).by_token.values().cloned().collect();
        let mut next = 0;
        for conn in &conns {
            if writable.contains(&conn.token) {
                let mut tx = lock(&conn.tx);
                if let Err(e) = self.flush(conn, &mut tx) {
                    drop(tx);
                    self.close(conn, socket_error(&e));
                    continue;
                }
            }
            if let Some(why) = self.drain(conn, bufs, &mut next, out) {
                self.close(conn, why);
            }
        }
        Ok(())
    }
    fn send_batch(&self, pkts: &[(&[u8], SocketAddr)]) -> usize {
        let mut sent = 0;
        let mut touched: Vec<Arc<Conn>> = Vec::new();
        {
            let c = lock(&self.conns);
            for (p, to) in pkts {
                let Some(conn) = c.by_addr.get(to).and_then(|t| c.by_token.get(t)) else {
                    continue;
                };
                if p.len() > self.max_frame {
                    continue;
                }
                let mut tx = lock(&conn.tx);
                if tx.buf.len() - tx.sent > HARD_LIMIT {
                    continue;
                }
                tx.buf.extend_from_slice(&(p.len() as u16).to_be_bytes());
                tx.buf.extend_from_slice(p);
                sent += 1;
                if !touched.iter().any(|t| t.token == conn.token) {
                    touched.push(conn.clone());
                }
            }
        }
        for conn in touched {
            let mut tx = lock(&conn.tx);
            match self.flush(&conn, &mut tx) {
                Ok(()) => {
                    if tx.buf.len() - tx.sent > TX_LIMIT {
                        self.full.store(true, Ordering::Release);
                    }
                }
                Err(e) => {
                    drop(tx);
                    self.close(&conn, socket_error(&e));
                }
            }
        }
        sent
    }
    fn max_payload(&self) -> usize {
        self.max_frame
    }
    fn plaintext(&self) -> bool {
        self.plaintext
    }
    fn carries_control(&self) -> bool {
        self.control
    }
    fn congested(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }
    fn wait_room(&self, stop_fd: RawFd, timeout_ms: i32) {
        let full: Vec<Arc<Conn>> = lock(&self.conns)
            .by_token
            .values()
            .filter(|c| {
                let tx = lock(&c.tx);
                tx.buf.len() - tx.sent > TX_LIMIT
            })
            .cloned()
            .collect();
        let Some(conn) = full.first() else {
            self.full.store(false, Ordering::Release);
            return;
        };
        sys::poll_writable(conn.fd.as_raw_fd(), stop_fd, timeout_ms);
        let mut tx = lock(&conn.tx);
        if let Err(e) = self.flush(conn, &mut tx) {
            drop(tx);
            self.close(conn, socket_error(&e));
        }
        // Looked at again by the next call (cleared once no connection is over the limit).
    }
    fn take_closed(&self) -> Vec<(SocketAddr, String)> {
        let mut c = lock(&self.conns);
        if c.closed.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut c.closed)
    }
}
