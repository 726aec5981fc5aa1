//! Stealing, shown deterministically: a pump plane run by the owner thread of one direction
//! only. Whatever moves in the other direction can only have been moved by the lingering thread
//! (without stealing these tests hang until their socket timeouts and fail).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use super::linger::{self, Dir};
use super::sys::{self, Wake};
use super::{Control, Counters, Crypto, Plane, PumpConfig, PumpExit, Shared};
use crate::frame::{encode_frame, PREFIX_LEN};
use crate::tun::Kind;
use crate::SecurityAssociation;

const TIMEOUT: Duration = Duration::from_secs(10);

/// `(pump side, test side)` of a packet device; the test side blocks up to [`TIMEOUT`].
fn fake_device() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let flags = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: fds has room for the two descriptors.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, fds.as_mut_ptr()) },
        0
    );
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as _,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        set_opt(&b, opt, &tv);
    }
    (a, b)
}

fn set_opt<T>(fd: &impl AsRawFd, opt: libc::c_int, v: &T) {
    // SAFETY: v is a valid T for the kernel to read.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

fn stream_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(TIMEOUT)).unwrap();
    b.set_write_timeout(Some(TIMEOUT)).unwrap();
    (a, b)
}

fn put(dev: &OwnedFd, pkt: &[u8]) {
    // SAFETY: pkt is valid for reads of its length.
    let n = unsafe { libc::send(dev.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0) };
    assert_eq!(n, pkt.len() as isize);
}

fn take(dev: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(
        n >= 0,
        "nothing on the device: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    buf
}

/// Read one frame's payload from the stream.
fn take_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut prefix = [0u8; PREFIX_LEN];
    s.read_exact(&mut prefix).expect("a frame on the stream");
    let mut payload = vec![0u8; u16::from_be_bytes(prefix) as usize];
    s.read_exact(&mut payload).unwrap();
    payload
}

fn ip4(tag: u8, len: usize) -> Vec<u8> {
    let mut p = vec![tag; len];
    p[0] = 0x45;
    p
}

fn sa(spi: u32) -> SecurityAssociation {
    SecurityAssociation::new(spi, &[spi as u8; 16], &[!spi as u8; 32], 64, false).unwrap()
}

/// True if `fd` becomes readable within [`TIMEOUT`].
fn readable(fd: libc::c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd.
    unsafe { libc::poll(&mut p, 1, TIMEOUT.as_millis() as libc::c_int) == 1 }
}

/// Ends the pump when dropped, so that a failed assertion ends the test instead of hanging it.
struct EndOnDrop<'a>(&'a Control);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end(PumpExit::Stopped);
    }
}

fn plane(dev: &OwnedFd, sock: &UnixStream, crypto: Crypto) -> (Plane, Shared) {
    let cfg = PumpConfig::new(Kind::Tun, crypto);
    let p = Plane::new(dev.as_raw_fd(), sock.as_raw_fd(), cfg).unwrap();
    let sh = Shared {
        ctl: Control::new(1).unwrap(),
        counters: Counters::default(),
    };
    (p, sh)
}

/// Like the server of a ping: the rx thread writes the request to the device, where the reply
/// is already waiting, and sends the reply itself.
#[test]
fn rx_thread_steals_device_to_stream() {
    let (mut peer_tx, mut peer_rx) = (sa(0x2000), sa(0x1000));
    let crypto = Crypto::Esp {
        tx: sa(0x1000),
        rx: sa(0x2000),
    };
    let (dev, test_dev) = fake_device();
    let (sock, mut peer) = stream_pair();
    let (p, sh) = plane(&dev, &sock, crypto);
    let (request, reply) = (ip4(1, 84), ip4(2, 84));
    put(&test_dev, &reply);
    let esp = peer_tx.encap(&request, None).unwrap();
    peer.write_all(&encode_frame(&esp).unwrap()).unwrap();
    thread::scope(|s| {
        let _end = EndOnDrop(&sh.ctl);
        let rx = s.spawn(|| linger::run(&sh, &p, Dir::Rx));
        assert_eq!(take(&test_dev), request);
        let (_, got) = peer_rx.decap(&take_frame(&mut peer)).unwrap();
        assert_eq!(got, reply);
        sh.ctl.end(PumpExit::Stopped);
        assert!(matches!(rx.join().unwrap(), PumpExit::Stopped));
    });
    let st = sh.counters.snapshot();
    assert_eq!((st.tx_packets, st.tx_bytes), (1, 84));
    assert_eq!((st.rx_packets, st.rx_bytes), (1, 84));
    assert_eq!(st.wire_tx_bytes, (PREFIX_LEN + esp.len()) as u64);
    assert_eq!(st.total_drops(), 0);
}

/// Like the client of a ping: the tx thread sends the request, the reply arrives on the socket,
/// and the tx thread writes it to the device itself.
#[test]
fn tx_thread_steals_stream_to_device() {
    let (dev, test_dev) = fake_device();
    let (sock, mut peer) = stream_pair();
    let (p, sh) = plane(&dev, &sock, Crypto::Plaintext);
    let (request, reply) = (ip4(1, 84), ip4(2, 60));
    peer.write_all(&encode_frame(&reply).unwrap()).unwrap();
    put(&test_dev, &request);
    thread::scope(|s| {
        let _end = EndOnDrop(&sh.ctl);
        let tx = s.spawn(|| linger::run(&sh, &p, Dir::Tx));
        assert_eq!(take_frame(&mut peer), request);
        assert_eq!(take(&test_dev), reply);
        sh.ctl.end(PumpExit::Stopped);
        assert!(matches!(tx.join().unwrap(), PumpExit::Stopped));
    });
    let st = sh.counters.snapshot();
    assert_eq!((st.tx_packets, st.rx_packets, st.rx_bytes), (1, 1, 60));
    assert_eq!(st.wire_rx_bytes, (PREFIX_LEN + 60) as u64);
}

/// A stolen batch the socket has no room for stays with its direction, and the other thread
/// kicks that direction's owner, whose sleep (polling the device) would otherwise never end;
/// the owner then sends the rest.
#[test]
fn stolen_batch_left_half_sent_wakes_the_owner() {
    let (dev, test_dev) = fake_device();
    let (sock, mut peer) = stream_pair();
    // The smallest send buffer: a few KiB, far less than the stolen batch.
    set_opt(&sock, libc::SO_SNDBUF, &(4096 as libc::c_int));
    let (p, sh) = plane(&dev, &sock, Crypto::Plaintext);
    let big: Vec<Vec<u8>> = (0..8).map(|i| ip4(i, 9000)).collect();
    for pkt in &big {
        put(&test_dev, pkt);
    }
    peer.write_all(&encode_frame(&ip4(9, 60)).unwrap()).unwrap();
    thread::scope(|s| {
        let _end = EndOnDrop(&sh.ctl);
        let rx = s.spawn(|| linger::run(&sh, &p, Dir::Rx));
        assert_eq!(take(&test_dev), ip4(9, 60));
        let kick = p.kick[Dir::Tx.index()].as_raw_fd();
        assert!(readable(kick), "the tx owner is kicked");
        let (dev, stop) = (p.dev.as_raw_fd(), sh.ctl.stop_fd());
        // What the tx owner would be doing had it slept before the steal: the device is empty
        // (all eight packets were stolen), so only the kick ends this wait.
        assert_eq!(
            sys::wait(dev, libc::POLLIN, stop, kick).unwrap(),
            Wake::Kick
        );
        let tx = s.spawn(|| linger::run(&sh, &p, Dir::Tx));
        for pkt in &big {
            assert_eq!(&take_frame(&mut peer), pkt);
        }
        sh.ctl.end(PumpExit::Stopped);
        assert!(matches!(rx.join().unwrap(), PumpExit::Stopped));
        assert!(matches!(tx.join().unwrap(), PumpExit::Stopped));
    });
    let st = sh.counters.snapshot();
    assert_eq!((st.tx_packets, st.tx_bytes), (8, 8 * 9000));
    assert_eq!(st.wire_tx_bytes, 8 * (PREFIX_LEN + 9000) as u64);
}
