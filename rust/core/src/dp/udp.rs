//! ESP-in-UDP (RFC 3948): one UDP socket for every peer, batched with `recvmmsg`/`sendmmsg`.
//! Telling ESP, control messages (non-ESP marker) and keepalives apart is the data plane's job.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::sys;
use super::transport::{Datagram, Transport, TransportKind};

pub struct UdpTransport {
    fd: OwnedFd,
    v6: bool,
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
        Ok(UdpTransport { fd, v6 })
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
        sys::recvmmsg(self.fd.as_raw_fd(), bufs, &mut got)?;
        for (i, (len, from, truncated)) in got.into_iter().enumerate() {
            if let Some(from) = from {
                out.push(Datagram {
                    buf: i,
                    start: 0,
                    len,
                    from,
                    truncated,
                });
            }
        }
        Ok(())
    }
    fn send_batch(&self, pkts: &[(&[u8], SocketAddr)]) -> usize {
        sys::sendmmsg(self.fd.as_raw_fd(), pkts, self.v6)
    }
}
