//! ESP-in-UDP (RFC 3948): one UDP socket for every peer, batched with `recvmmsg`/`sendmmsg`.
//! Telling ESP, control messages (non-ESP marker) and keepalives apart is the data plane's job.
//!
//! Where the kernel has them, runs of equal-sized datagrams to one peer (the ESP packets of one
//! split super-packet) leave as one `UDP_SEGMENT` message, and `UDP_GRO` lets one receive
//! return a run of datagrams (split again here). A refused `UDP_SEGMENT` send turns GSO off
//! for the socket and sends one message per datagram. The socket buffers are raised to
//! [`SOCKET_BUFFER`] so that bursts of 64 KiB super-packets are not dropped by the receiver.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::transport::{Datagram, Transport, TransportKind};
use super::{gso, sys};

/// Send and receive buffer size asked for on data-plane sockets (forced as root).
pub const SOCKET_BUFFER: i32 = 4 << 20;

pub struct UdpTransport {
    fd: OwnedFd,
    v6: bool,
    gso: AtomicBool,
    gro: bool,
}

impl UdpTransport {
    /// Use a duplicate of `fd`, a bound UDP socket (IPv4, or IPv6 possibly dual-stack).
    pub fn from_fd(fd: RawFd) -> io::Result<UdpTransport> {
        // Not a socket at all reads as type/protocol -1: the same clear error.
        let ty = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
        let proto = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(-1);
        if ty != libc::SOCK_DGRAM || proto != libc::IPPROTO_UDP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} is not a UDP socket (a bound UDP socket is expected)"),
            ));
        }
        let v6 = sys::local_family(fd)? == libc::AF_INET6;
        let fd = sys::dup(fd)?;
        sys::set_nonblocking(fd.as_raw_fd())?;
        sys::size_buffers(fd.as_raw_fd(), SOCKET_BUFFER);
        let gso = AtomicBool::new(gso::has_udp_segment(fd.as_raw_fd()));
        let gro = gso::enable_udp_gro(fd.as_raw_fd()).is_ok();
        Ok(UdpTransport { fd, v6, gso, gro })
    }

    /// Plain `sendmmsg`/`recvmmsg`: no UDP GSO or GRO (comparisons, captures that need one
    /// datagram per frame).
    pub fn without_offloads(self) -> UdpTransport {
        if self.gro {
            let _ = sys::setsockopt_int(self.fd.as_raw_fd(), gso::SOL_UDP, gso::UDP_GRO, 0);
        }
        UdpTransport {
            gso: AtomicBool::new(false),
            gro: false,
            ..self
        }
    }

    /// Whether sends use `UDP_SEGMENT` (off when the kernel lacks or refused it).
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Whether receives are coalesced (`UDP_GRO`).
    pub fn gro(&self) -> bool {
        self.gro
    }
}

impl Transport for UdpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Udp
    }
    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn recv_batch(&self, bufs: &mut [Vec<u8>], out: &mut Vec<Datagram>) -> io::Result<()> {
        let mut got = Vec::with_capacity(bufs.len());
        sys::recvmmsg(self.fd.as_raw_fd(), bufs, &mut got, self.gro)?;
        for (i, (len, from, truncated, seg)) in got.into_iter().enumerate() {
            let Some(from) = from else { continue };
            // A coalesced run: datagrams of `seg` bytes, the last possibly shorter.
            let seg = if seg == 0 { len.max(1) } else { seg };
            let mut start = 0;
            loop {
                let n = seg.min(len - start);
                out.push(Datagram {
                    buf: i,
                    start,
                    len: n,
                    from,
                    truncated,
                });
                start += n;
                if start >= len {
                    break;
                }
            }
        }
        Ok(())
    }
    fn send_batch(&self, pkts: &[(&[u8], SocketAddr)]) -> usize {
        let fd = self.fd.as_raw_fd();
        if !self.gso() {
            return sys::sendmmsg(fd, pkts, self.v6);
        }
        match sys::send_groups(fd, pkts, self.v6, true) {
            (sent, None) => sent,
            (sent, Some(at)) => {
                self.gso.store(false, Ordering::Relaxed);
                sent + sys::sendmmsg(fd, &pkts[at..], self.v6)
            }
        }
    }
}
