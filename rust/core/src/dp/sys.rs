//! System calls of the data plane v2: poll with timeout, eventfds, socket addresses,
//! `recvmmsg`/`sendmmsg`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::gso;

pub fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: valid 8-byte buffer. Failure means the counter is saturated: readable anyway.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

pub fn clear(fd: &OwnedFd) {
    let mut b = [0u8; 8];
    // SAFETY: valid 8-byte buffer; EAGAIN (already clear) is fine.
    unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
}

pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the new descriptor is owned by the OwnedFd.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls on an open descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Wait up to `timeout_ms` for any of `fds` to be readable; returns which are.
pub fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> [bool; N] {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: p is a valid array of N pollfds.
    let r = retry(|| {
        cvt(unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) } as isize)
    });
    if r.is_err() {
        return [false; N];
    }
    p.map(|x| x.revents != 0)
}

/// Wait until `fd` is writable (or in error) or `stop` is readable, at most `timeout_ms`.
pub fn poll_writable(fd: RawFd, stop: RawFd, timeout_ms: i32) {
    let mut p = [
        libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: p holds two valid pollfds.
    unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
}

pub fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Socket address storage for the kernel.
pub fn to_storage(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { *(&mut ss as *mut _ as *mut libc::sockaddr_in) = sin };
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { *(&mut ss as *mut _ as *mut libc::sockaddr_in6) = sin6 };
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

pub fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            // A v4-mapped source on a dual-stack socket is reported as IPv4.
            if let Some(v4) = ip.to_ipv4_mapped() {
                return Some(SocketAddr::new(
                    IpAddr::V4(v4),
                    u16::from_be(sin6.sin6_port),
                ));
            }
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub fn local_family(fd: RawFd) -> io::Result<i32> {
    // SAFETY: zeroed storage and its length are valid for the kernel to write.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let r = unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ss.ss_family as i32)
}

/// One received datagram of a batch: `(length, source, truncated, segment size)`. The segment
/// size comes from a `UDP_GRO` control message (several datagrams of that size glued
/// together, the last possibly shorter); 0 when there was none (one datagram).
pub type Received = (usize, Option<SocketAddr>, bool, usize);

/// Control buffer of one message, in u64 words (aligned for cmsghdr): room for one int.
const CMSG_WORDS: usize = 4;

pub fn setsockopt_int(fd: RawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: v lives across the call; the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r as isize).map(|_| ())
}

/// Ask for socket buffers of at least `bytes` each way: the `*FORCE` options (root, above
/// `net.core.[rw]mem_max`), else the plain ones (capped by those sysctls). Never shrinks a
/// buffer; a refusal leaves the kernel's default.
pub fn size_buffers(fd: RawFd, bytes: i32) {
    for (plain, force) in [
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
    ] {
        // The kernel reports twice what was set (its bookkeeping overhead).
        if getsockopt_int(fd, libc::SOL_SOCKET, plain).is_ok_and(|v| v / 2 >= bytes) {
            continue;
        }
        if setsockopt_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

/// `recvmmsg` into `bufs` without blocking; `Ok(empty)` when nothing is waiting. With `gro`
/// each message gets a control buffer for the `UDP_GRO` segment size.
pub fn recvmmsg(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    out: &mut Vec<Received>,
    gro: bool,
) -> io::Result<()> {
    const MAX: usize = 64;
    let n = bufs.len().min(MAX);
    // SAFETY: all-zero is valid for these plain C structs.
    let mut names: [libc::sockaddr_storage; MAX] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; MAX] = unsafe { zeroed() };
    let mut msgs: [libc::mmsghdr; MAX] = unsafe { zeroed() };
    let mut cbufs = [[0u64; CMSG_WORDS]; MAX];
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: bufs[i].len(),
        };
        msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if gro {
            msgs[i].msg_hdr.msg_control = cbufs[i].as_mut_ptr().cast();
            msgs[i].msg_hdr.msg_controllen = size_of::<[u64; CMSG_WORDS]>() as _;
        }
    }
    // SAFETY: msgs/iovs/names/cbufs point into live buffers of the stated lengths.
    let r = retry(|| {
        cvt(unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        } as isize)
    });
    let got = match r {
        Ok(g) => g,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e),
    };
    for i in 0..got {
        let len = msgs[i].msg_len as usize;
        let trunc = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        // SAFETY: the kernel filled message i; its control buffer is cbufs[i].
        let seg = if gro {
            unsafe { gso::gro_segment(&msgs[i].msg_hdr) }
        } else {
            0
        };
        out.push((len.min(bufs[i].len()), from_storage(&names[i]), trunc, seg));
    }
    Ok(())
}

/// `sendmmsg` of `(payload, destination)` pairs without blocking; returns how many were sent.
/// A datagram the kernel refuses (e.g. unreachable) is skipped and counted as not sent.
/// On an IPv6 socket (`v6_socket`), IPv4 destinations are sent as v4-mapped addresses
/// (dual-stack); from_storage reports such sources as IPv4, so endpoints stay plain IPv4.
pub fn sendmmsg(fd: RawFd, pkts: &[(&[u8], SocketAddr)], v6_socket: bool) -> usize {
    send_groups(fd, pkts, v6_socket, false).0
}

/// [`sendmmsg`], with `gso`: each run of [`gso_runs`] longer than one goes as one message
/// with `UDP_SEGMENT` (its datagrams as the iovecs). Returns `(datagrams sent, refused)`,
/// `refused` the index of the first datagram of a `UDP_SEGMENT` message the kernel rejected:
/// sending stopped there (the caller resends from it without GSO).
pub fn send_groups(
    fd: RawFd,
    pkts: &[(&[u8], SocketAddr)],
    v6_socket: bool,
    gso: bool,
) -> (usize, Option<usize>) {
    const MAX: usize = 64;
    let runs = if gso {
        gso::gso_runs(pkts)
    } else {
        vec![1; pkts.len()]
    };
    // Datagram index where each run starts.
    let mut starts = Vec::with_capacity(runs.len());
    let mut at = 0;
    for r in &runs {
        starts.push(at);
        at += r;
    }
    let mut iovs: Vec<libc::iovec> = pkts
        .iter()
        .map(|(p, _)| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut sent = 0;
    let mut run = 0;
    while run < runs.len() {
        let n = (runs.len() - run).min(MAX);
        // SAFETY: all-zero is valid for these plain C structs.
        let mut names: [libc::sockaddr_storage; MAX] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; MAX] = unsafe { zeroed() };
        let mut cbufs = [[0u64; CMSG_WORDS]; MAX];
        for i in 0..n {
            let (first, count) = (starts[run + i], runs[run + i]);
            let to = match pkts[first].1 {
                SocketAddr::V4(a) if v6_socket => {
                    SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
                }
                other => other,
            };
            let (ss, len) = to_storage(&to);
            names[i] = ss;
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = len;
            h.msg_iov = iovs[first..].as_mut_ptr();
            h.msg_iovlen = count as _;
            if count > 1 {
                let seg = pkts[first].0.len() as u16;
                // SAFETY: CMSG_* stay inside cbufs[i], which holds CMSG_SPACE(2) bytes.
                unsafe {
                    h.msg_control = cbufs[i].as_mut_ptr().cast();
                    h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = gso::SOL_UDP;
                    (*c).cmsg_type = gso::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
        }
        // SAFETY: as in recvmmsg; the kernel only reads the payloads.
        let r = retry(|| {
            cvt(unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } as isize)
        });
        match r {
            Ok(0) => break,
            Ok(k) => {
                sent += runs[run..run + k].iter().sum::<usize>();
                run += k;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Socket buffer full: wait briefly for room rather than dropping a burst.
                let mut p = [libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd.
                let ready = unsafe { libc::poll(p.as_mut_ptr(), 1, 10) };
                if ready <= 0 {
                    break;
                }
            }
            // A UDP_SEGMENT message refused (no GSO on the route's device, EIO; or EINVAL):
            // let the caller fall back.
            Err(_) if runs[run] > 1 => return (sent, Some(starts[run])),
            // The first datagram failed (e.g. ENETUNREACH): skip it.
            Err(_) => run += 1,
        }
    }
    (sent, None)
}
