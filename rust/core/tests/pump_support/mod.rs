//! Shared helpers of the pump tests: in-memory fake devices (SOCK_SEQPACKET socketpairs keep
//! packet boundaries like a TUN descriptor), stream socketpairs, SAs and packet builders.
#![allow(dead_code)] // each test file uses its own subset

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use simpletun_core::pump::{Crypto, Pump, PumpConfig};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

pub const SPI_AB: u32 = 0x0000_1001;
pub const SPI_BA: u32 = 0x0000_2002;
pub const TIMEOUT: Duration = Duration::from_secs(10);

fn set_timeout(fd: RawFd, opt: libc::c_int, t: Duration) {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as _,
        tv_usec: t.subsec_micros() as _,
    };
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as _,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// The two ends of a fake packet device: `(pump side, test side)`. The test side blocks, with
/// a timeout so that a broken pump fails the test instead of hanging it.
pub fn fake_device() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_timeout(b.as_raw_fd(), libc::SO_RCVTIMEO, TIMEOUT);
    set_timeout(b.as_raw_fd(), libc::SO_SNDTIMEO, TIMEOUT);
    (a, b)
}

/// A connected stream pair with timeouts on both ends.
pub fn stream_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
    }
    (a, b)
}

/// Write one packet to the test side of a fake device.
pub fn put(dev: &OwnedFd, pkt: &[u8]) {
    let n = unsafe {
        libc::send(
            dev.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    assert_eq!(
        n,
        pkt.len() as isize,
        "send to fake device: {}",
        io::Error::last_os_error()
    );
}

/// Read one packet from the test side of a fake device (panics after [`TIMEOUT`]).
pub fn take(dev: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let n = unsafe { libc::recv(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(
        n >= 0,
        "recv from fake device: {}",
        io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    buf
}

/// Write one packet without blocking; false if the fake device is full.
pub fn try_put(dev: &OwnedFd, pkt: &[u8]) -> bool {
    unsafe {
        libc::send(
            dev.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            libc::MSG_DONTWAIT,
        ) > 0
    }
}

/// Read one packet without blocking; false if none is waiting.
pub fn try_take(dev: &OwnedFd, buf: &mut [u8]) -> bool {
    unsafe {
        libc::recv(
            dev.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        ) > 0
    }
}

/// True if a packet is waiting on the test side of a fake device within `wait`.
pub fn readable(fd: RawFd, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) > 0 }
}

pub fn sa(spi: u32, key_bits: usize) -> SecurityAssociation {
    let enc = vec![spi as u8 ^ 0x5c; key_bits / 8];
    let auth = [spi as u8 ^ 0xa3; 32];
    SecurityAssociation::new(spi, &enc, &auth, 4096, false).unwrap()
}

/// The crypto of side A and side B of one tunnel (one SA per direction).
pub fn esp_pair(key_bits: usize) -> (Crypto, Crypto) {
    (
        Crypto::Esp {
            tx: sa(SPI_AB, key_bits),
            rx: sa(SPI_BA, key_bits),
        },
        Crypto::Esp {
            tx: sa(SPI_BA, key_bits),
            rx: sa(SPI_AB, key_bits),
        },
    )
}

/// A packet of `len` bytes whose contents identify `(stream, index)`. For TUN it starts with
/// an IPv4 or IPv6 version nibble (alternating); for TAP it is an arbitrary frame.
pub fn packet(kind: Kind, stream: u8, index: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(index) as u8)
        .collect();
    if kind == Kind::Tun {
        p[0] = if index % 2 == 0 { 0x45 } else { 0x60 };
    }
    if len >= 6 {
        p[1] = stream;
        p[2..6].copy_from_slice(&index.to_be_bytes());
    }
    p
}

pub fn start(
    dev: &OwnedFd,
    sock: &impl AsRawFd,
    kind: Kind,
    crypto: Crypto,
    max_frame: usize,
) -> Pump {
    let mut cfg = PumpConfig::new(kind, crypto);
    cfg.max_frame = max_frame;
    Pump::start(dev.as_raw_fd(), sock.as_raw_fd(), cfg).expect("pump starts")
}

/// Wait until the pump's done eventfd is readable; returns how long that took.
pub fn wait_done(p: &Pump, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    readable(p.done_fd(), limit).then(|| t.elapsed())
}

/// A frame (2-byte length prefix + payload).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    simpletun_core::encode_frame(payload).unwrap()
}
