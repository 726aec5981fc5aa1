//! Data-plane throughput: two pumps back to back over a loopback TCP connection, with in-memory
//! fake devices (SOCK_SEQPACKET socketpairs) standing in for the TUN devices.
//!
//! ```text
//! cargo run --release -p simpletun-core --example pump_bench -- [--seconds N] [--size BYTES]
//!     [--mode esp128|esp256|plain] [--both] [--rr]
//! ```
//!
//! A writer thread offers `size`-byte IPv4-looking packets to device A as fast as it can; a
//! reader drains device B (with `--both`, the same happens from B to A at the same time).
//! Reported: inner-packet goodput (10^9 bit/s), packets per second, and the process's CPU
//! time per second of wall time (out of the machine's cores).
//!
//! `--rr` measures latency instead: one packet at a time goes A → B, a responder echoes it
//! back B → A, and the next leaves 2 ms after the answer came (a quiet tunnel, like `ping`).
//! Reported: round trips through both pumps (and the two test threads' own wake-ups), median,
//! mean and 90th percentile.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::pump::{Crypto, Pump, PumpConfig};
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

struct Args {
    seconds: f64,
    size: usize,
    mode: String,
    both: bool,
    rr: bool,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 5.0,
        size: 1400,
        mode: "esp128".into(),
        both: false,
        rr: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--seconds" => a.seconds = v().parse().expect("--seconds N"),
            "--size" => a.size = v().parse().expect("--size BYTES"),
            "--mode" => a.mode = v(),
            "--both" => a.both = true,
            "--rr" => a.rr = true,
            _ => panic!("unknown argument {k}; see the header of examples/pump_bench.rs"),
        }
    }
    a
}

fn crypto(mode: &str, spi_tx: u32, spi_rx: u32) -> Crypto {
    let bits = match mode {
        "plain" => return Crypto::Plaintext,
        "esp128" => 128,
        "esp256" => 256,
        _ => panic!("--mode is esp128, esp256 or plain"),
    };
    let sa = |spi: u32| {
        SecurityAssociation::new(
            spi,
            &vec![spi as u8; bits / 8],
            &[!spi as u8; 32],
            4096,
            false,
        )
        .expect("valid SA")
    };
    Crypto::Esp {
        tx: sa(spi_tx),
        rx: sa(spi_rx),
    }
}

fn fake_device() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let flags = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: fds has room for the two descriptors.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, fds.as_mut_ptr()) },
        0
    );
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn cpu_seconds() -> f64 {
    // SAFETY: ru is valid for the kernel to write.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Offer packets to `dev` until `stop`; the device side blocks when the pump falls behind.
fn writer(dev: &OwnedFd, size: usize, stop: &AtomicBool) {
    let mut pkt = vec![0xa5u8; size];
    pkt[0] = 0x45;
    while !stop.load(Relaxed) {
        // SAFETY: pkt is valid for reads of its length.
        unsafe { libc::send(dev.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0) };
    }
}

/// Count packets arriving on `dev` until `stop` (the pump's shutdown wakes the reader).
fn reader(dev: &OwnedFd, stop: &AtomicBool, packets: &AtomicU64) {
    let mut buf = vec![0u8; 70_000];
    while !stop.load(Relaxed) {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            packets.fetch_add(1, Relaxed);
        }
    }
}

/// Echo every packet arriving on `dev` back into it until `stop`.
fn responder(dev: &OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 70_000];
    while !stop.load(Relaxed) {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            // SAFETY: buf[..n] was just written.
            unsafe { libc::send(dev.as_raw_fd(), buf.as_ptr().cast(), n as usize, 0) };
        }
    }
}

/// Send one packet into `dev` at a time and time its echo, for `seconds`; microseconds.
fn round_trips(dev: &OwnedFd, size: usize, seconds: f64) -> Vec<f64> {
    let mut pkt = vec![0xa5u8; size];
    pkt[0] = 0x45;
    let mut buf = vec![0u8; 70_000];
    let mut rtts = vec![];
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        // SAFETY: pkt and buf are valid for the lengths given.
        unsafe { libc::send(dev.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0) };
        let n = unsafe { libc::recv(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert_eq!(n, size as isize, "echo lost");
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
        thread::sleep(Duration::from_millis(2));
    }
    rtts
}

fn main() {
    let a = args();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sock_a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (sock_b, _) = listener.accept().unwrap();
    let (dev_a, test_a) = fake_device();
    let (dev_b, test_b) = fake_device();
    let start = |dev: &OwnedFd, sock: &TcpStream, c| {
        Pump::start(
            dev.as_raw_fd(),
            sock.as_raw_fd(),
            PumpConfig::new(Kind::Tun, c),
        )
        .unwrap()
    };
    let pump_a = start(&dev_a, &sock_a, crypto(&a.mode, 0x1000, 0x2000));
    let pump_b = start(&dev_b, &sock_b, crypto(&a.mode, 0x2000, 0x1000));
    for dev in [&test_a, &test_b] {
        // Let readers and writers notice the end instead of blocking forever.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: tv is a valid timeval for the kernel to read.
            unsafe {
                libc::setsockopt(
                    dev.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
        }
    }

    let stop = AtomicBool::new(false);
    if a.rr {
        let mut rtts = thread::scope(|s| {
            s.spawn(|| responder(&test_b, &stop));
            let r = round_trips(&test_a, a.size, a.seconds);
            stop.store(true, Relaxed);
            r
        });
        rtts.sort_by(f64::total_cmp);
        let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
        println!(
            "mode={} size={} rr: {} round trips, median {:.0} µs, mean {:.0} µs, p90 {:.0} µs",
            a.mode,
            a.size,
            rtts.len(),
            rtts[rtts.len() / 2],
            mean,
            rtts[rtts.len() * 9 / 10]
        );
        return;
    }
    let (fwd, rev) = (AtomicU64::new(0), AtomicU64::new(0));
    let total = || fwd.load(Relaxed) + rev.load(Relaxed);
    let (wall, cpu, moved) = thread::scope(|s| {
        s.spawn(|| writer(&test_a, a.size, &stop));
        s.spawn(|| reader(&test_b, &stop, &fwd));
        if a.both {
            s.spawn(|| writer(&test_b, a.size, &stop));
            s.spawn(|| reader(&test_a, &stop, &rev));
        }
        // Measure after a short warm-up (TCP window growth).
        thread::sleep(Duration::from_millis(500));
        let (t0, c0, p0) = (Instant::now(), cpu_seconds(), total());
        thread::sleep(Duration::from_secs_f64(a.seconds));
        let r = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0, total() - p0);
        stop.store(true, Relaxed);
        r
    });
    pump_a.stop();
    pump_b.stop();

    let pps = moved as f64 / wall;
    let gbps = pps * a.size as f64 * 8.0 / 1e9;
    println!(
        "mode={} size={} both={}: {:.2} Gbit/s inner, {:.0} packets/s, CPU {:.2} s per s",
        a.mode,
        a.size,
        a.both,
        gbps,
        pps,
        cpu / wall
    );
    for (name, p) in [("A", &pump_a), ("B", &pump_b)] {
        let s = p.stats();
        println!(
            "  pump {name}: tx {} pkts / {} wire bytes, rx {} pkts, drops {}",
            s.tx_packets,
            s.wire_tx_bytes,
            s.rx_packets,
            s.total_drops()
        );
    }
}
