//! UDP segmentation offloads for ESP-in-UDP (issue 9), not yet used by the data plane:
//! `UDP_SEGMENT` sends several equal-sized datagrams with one `sendmsg`, `UDP_GRO` lets one
//! `recvmsg` return several datagrams of one flow glued together, with their size in a cmsg.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::sys;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: v lives across the call; the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sys::cvt(r as isize).map(|_| ())
}

/// Ask the kernel to coalesce received datagrams (`UDP_GRO`); fails on kernels without it.
pub fn enable_gro(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, SOL_UDP, UDP_GRO, 1)
}

/// Send `payload` as datagrams of `seg` bytes each (the last may be shorter) to `to` with one
/// `sendmsg` carrying a `UDP_SEGMENT` cmsg. Returns the bytes sent.
pub fn send_segments(fd: RawFd, payload: &[u8], seg: u16, to: &SocketAddr) -> io::Result<usize> {
    let (mut ss, sl) = sys::to_storage(to);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: every pointer refers to a live local; CMSG_* stay inside cbuf (its size is
    // checked against CMSG_SPACE).
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        assert!(space <= std::mem::size_of_val(&cbuf));
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut ss as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = sl;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        sys::retry(|| sys::cvt(libc::sendmsg(fd, &msg, 0)))
    }
}

/// Receive one (possibly coalesced) datagram into `buf`: (length, segment size from the
/// `UDP_GRO` cmsg or the length itself, source).
pub fn recv_coalesced(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, usize, Option<SocketAddr>)> {
    // SAFETY: as in send_segments; the kernel writes at most msg_controllen control bytes.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut ss as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = sys::retry(|| sys::cvt(libc::recvmsg(fd, &mut msg, 0)))?;
        let mut seg = n;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                if v > 0 {
                    seg = v as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n, seg, sys::from_storage(&ss)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// One sendmsg of 5 × 1000 bytes + 300 arrives as six datagrams (no GRO asked), or
    /// coalesced with a 1000-byte segment size when GRO is on: the bytes are the same.
    #[test]
    fn gso_send_arrives_as_segments() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payload: Vec<u8> = (0..5300u32).map(|i| (i % 251) as u8).collect();
        let to = rx.local_addr().unwrap();
        match send_segments(tx.as_raw_fd(), &payload, 1000, &to) {
            Ok(n) => assert_eq!(n, payload.len()),
            Err(e) => {
                println!("skipped: kernel refuses UDP_SEGMENT ({e})");
                return;
            }
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < payload.len() {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            assert!(n == 1000 || n == 300, "segment of {n} bytes");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, payload);

        if enable_gro(rx.as_raw_fd()).is_err() {
            println!("skipped GRO half: kernel refuses UDP_GRO");
            return;
        }
        send_segments(tx.as_raw_fd(), &payload, 1000, &to).unwrap();
        let mut got = Vec::new();
        while got.len() < payload.len() {
            let (n, seg, from) = recv_coalesced(rx.as_raw_fd(), &mut buf).unwrap();
            assert_eq!(from, Some(tx.local_addr().unwrap()));
            assert!(seg == 1000 || seg == n, "segment size {seg} of {n}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, payload);
    }
}
