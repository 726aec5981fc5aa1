//! Thin, allocation-free wrappers over the system calls of the pump threads.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn check(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    retry_eintr(|| check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }))
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    retry_eintr(|| check(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }))
}

/// `send` without blocking and without SIGPIPE (a closed peer gives `EPIPE`).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    // SAFETY: buf is valid for reads of buf.len() bytes.
    retry_eintr(|| check(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) }))
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the new descriptor is owned by the returned OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Make an eventfd readable. It is never read back: once signalled it stays readable.
pub fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // An eventfd write fails only if the counter would overflow, and then it is readable anyway.
    let _ = write(fd.as_raw_fd(), &one);
}

/// A close-on-exec duplicate of `fd`.
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the new descriptor is owned by the returned OwnedFd.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Set `O_NONBLOCK` on the open file description behind `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls on an open descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0
        && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// True if `fd` is a stream socket (TCP, or a UNIX stream socket).
pub fn is_stream_socket(fd: RawFd) -> bool {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).is_ok_and(|t| t == libc::SOCK_STREAM)
}

/// Turn off Nagle's algorithm on a TCP socket; the pump batches its own writes. Other sockets
/// are left alone.
pub fn set_nodelay_if_tcp(fd: RawFd) {
    if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).is_ok_and(|p| p == libc::IPPROTO_TCP)
    {
        let one: libc::c_int = 1;
        // SAFETY: one is a valid c_int for the kernel to read. Failure leaves Nagle on, which
        // only costs latency.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// What woke a [`wait`].
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// `fd` is ready (or has an error or hang-up, which the next read or write reports).
    Ready,
    /// The stop eventfd was signalled.
    Stop,
    /// The `kick` eventfd was signalled (and has been cleared).
    Kick,
}

const fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    retry_eintr(|| {
        // SAFETY: fds is a valid array of fds.len() pollfd.
        check(
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) } as isize,
        )
    })
}

/// Block until `fd` has `events` (POLLIN or POLLOUT), or `stop` or `kick` is signalled.
pub fn wait(fd: RawFd, events: libc::c_short, stop: RawFd, kick: RawFd) -> io::Result<Wake> {
    let mut fds = [
        pollfd(stop, libc::POLLIN),
        pollfd(fd, events),
        pollfd(kick, libc::POLLIN),
    ];
    poll(&mut fds, -1)?;
    if fds[0].revents != 0 {
        return Ok(Wake::Stop);
    }
    if fds[1].revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    if fds[1].revents == 0 {
        let mut count = [0u8; 8];
        // Reset the eventfd; failure (already reset) is harmless.
        let _ = read(kick, &mut count);
        return Ok(Wake::Kick);
    }
    Ok(Wake::Ready)
}

/// `revents` of the device (polled for `POLLIN`) and the socket (`POLLIN | POLLOUT`) right now,
/// without waiting. A failed poll reports nothing ready.
pub fn ready_now(dev: RawFd, sock: RawFd) -> (libc::c_short, libc::c_short) {
    let mut fds = [
        pollfd(dev, libc::POLLIN),
        pollfd(sock, libc::POLLIN | libc::POLLOUT),
    ];
    match poll(&mut fds, 0) {
        Ok(_) => (fds[0].revents, fds[1].revents),
        Err(_) => (0, 0),
    }
}
