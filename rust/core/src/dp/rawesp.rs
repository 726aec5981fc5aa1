//! Plain ESP on a raw IP socket (protocol 50), IPv4 or IPv6, as the Linux kernel's ESP speaks
//! it. IPv4 raw sockets deliver the outer IP header, which is skipped here; endpoints have port 0.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::sys;
use super::transport::{Datagram, Transport, TransportKind};
use crate::proto::IPPROTO_ESP;

pub struct RawEspTransport {
    fd: OwnedFd,
    v4: bool,
}

impl RawEspTransport {
    /// Use a duplicate of `fd`, a raw socket of protocol 50 (`socket(AF_INET[6], SOCK_RAW, 50)`).
    pub fn from_fd(fd: RawFd) -> io::Result<RawEspTransport> {
        // Not a socket at all reads as type/protocol -1: the same clear error.
        let ty = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
        let proto = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(-1);
        if ty != libc::SOCK_RAW || proto != IPPROTO_ESP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fd {fd} is not a raw ESP socket (socket(AF_INET, SOCK_RAW, 50) is expected)"
                ),
            ));
        }
        let v4 = sys::local_family(fd)? == libc::AF_INET;
        let fd = sys::dup(fd)?;
        sys::set_nonblocking(fd.as_raw_fd())?;
        sys::size_buffers(fd.as_raw_fd(), super::udp::SOCKET_BUFFER);
        Ok(RawEspTransport { fd, v4 })
    }
}

/// Where the ESP packet starts in an IPv4 datagram with its header, if well formed.
pub fn skip_ipv4_header(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let ihl = (pkt[0] & 0x0f) as usize * 4;
    (ihl >= 20 && ihl <= pkt.len()).then_some(ihl)
}

impl Transport for RawEspTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::RawEsp
    }
    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn recv_batch(&self, bufs: &mut [Vec<u8>], out: &mut Vec<Datagram>) -> io::Result<()> {
        let mut got = Vec::with_capacity(bufs.len());
        sys::recvmmsg(self.fd.as_raw_fd(), bufs, &mut got, false)?;
        for (i, (len, from, truncated, _)) in got.into_iter().enumerate() {
            let Some(mut from) = from else { continue };
            from.set_port(0);
            let start = if self.v4 {
                // A malformed header yields an empty payload, counted by the caller.
                skip_ipv4_header(&bufs[i][..len]).unwrap_or(len)
            } else {
                0
            };
            out.push(Datagram {
                buf: i,
                start,
                len: len - start,
                from,
                truncated,
            });
        }
        Ok(())
    }
    fn send_batch(&self, pkts: &[(&[u8], SocketAddr)]) -> usize {
        sys::sendmmsg(self.fd.as_raw_fd(), pkts, false)
    }
}
