//! Starting, stopping and ending: stop latency, the done eventfd, exit reasons, and what
//! happens to the caller's descriptors.

mod pump_support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use pump_support::*;
use simpletun_core::frame::MAX_FRAME;
use simpletun_core::pump::{Crypto, Pump, PumpConfig, PumpExit};
use simpletun_core::tun::Kind;
use simpletun_core::DropReason;

const LIMIT: Duration = Duration::from_secs(2);

fn timed_stop(p: &Pump) -> Duration {
    let t = Instant::now();
    p.stop();
    t.elapsed()
}

#[test]
fn stop_when_idle() {
    let (dev, _test_dev) = fake_device();
    let (sock, _peer) = stream_pair();
    let (a, _) = esp_pair(128);
    let pump = start(&dev, &sock, Kind::Tun, a, MAX_FRAME);
    thread::sleep(Duration::from_millis(50));
    assert!(pump.running());
    assert!(pump.exit().is_none());
    assert!(
        !readable(pump.done_fd(), Duration::ZERO),
        "done before the end"
    );
    let took = timed_stop(&pump);
    println!("stop latency (idle): {took:?}");
    assert!(took < LIMIT, "stop took {took:?}");
    assert!(!pump.running());
    assert!(readable(pump.done_fd(), Duration::ZERO));
    assert_eq!(pump.exit().unwrap().to_string(), "stopped");
    assert!(timed_stop(&pump) < LIMIT, "second stop");
}

/// Flood device A for 300 ms while the far end is drained (`drain`) or left blocked; then
/// both pumps must stop promptly.
fn stop_under_load(drain: bool) {
    let (dev_a, test_a) = fake_device();
    let (dev_b, test_b) = fake_device();
    let (sock_a, sock_b) = stream_pair();
    let (a, b) = esp_pair(256);
    let pump_a = start(&dev_a, &sock_a, Kind::Tun, a, MAX_FRAME);
    let pump_b = start(&dev_b, &sock_b, Kind::Tun, b, MAX_FRAME);
    let done = AtomicBool::new(false);
    let pkt = packet(Kind::Tun, 1, 0, 1400);
    thread::scope(|s| {
        if drain {
            s.spawn(|| {
                let mut buf = vec![0u8; 2000];
                while !done.load(Ordering::Relaxed) {
                    if !try_take(&test_b, &mut buf) {
                        thread::sleep(Duration::from_micros(100));
                    }
                }
            });
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            if !try_put(&test_a, &pkt) {
                thread::sleep(Duration::from_micros(100));
            }
        }
        assert!(pump_a.stats().tx_packets > 0 && pump_b.stats().rx_packets > 0);
        for (name, p) in [("A", &pump_a), ("B", &pump_b)] {
            let took = timed_stop(p);
            let n = p.stats().tx_packets + p.stats().rx_packets;
            println!("stop latency (pump {name}, drain={drain}, {n} packets moved): {took:?}");
            assert!(took < LIMIT, "stop of {name} took {took:?}");
            assert!(matches!(p.exit(), Some(PumpExit::Stopped)));
        }
        done.store(true, Ordering::Relaxed);
    });
}

#[test]
fn stop_under_load_flowing() {
    stop_under_load(true);
}

#[test]
fn stop_under_load_blocked() {
    // Nobody reads device B: pump B blocks on a full device, then pump A on a full socket.
    stop_under_load(false);
}

#[test]
fn peer_close_ends_the_pump() {
    let (dev, _test_dev) = fake_device();
    let (sock, peer) = stream_pair();
    let pump = start(&dev, &sock, Kind::Tun, Crypto::Plaintext, MAX_FRAME);
    thread::sleep(Duration::from_millis(20));
    assert!(!readable(pump.done_fd(), Duration::ZERO));
    drop(peer);
    let took = wait_done(&pump, LIMIT).expect("done fd readable after the peer closed");
    println!("done after peer close: {took:?}");
    assert!(!pump.running());
    assert_eq!(
        pump.exit().unwrap().to_string(),
        "peer closed the connection"
    );
    pump.stop();
    assert_eq!(
        pump.exit().unwrap().to_string(),
        "peer closed the connection"
    );
}

#[test]
fn device_close_ends_the_pump() {
    let (dev, test_dev) = fake_device();
    let (sock, _peer) = stream_pair();
    let pump = start(&dev, &sock, Kind::Tun, Crypto::Plaintext, MAX_FRAME);
    drop(test_dev);
    wait_done(&pump, LIMIT).expect("done fd readable after the device closed");
    assert_eq!(pump.exit().unwrap().to_string(), "device closed");
}

#[test]
fn sequence_exhaustion_ends_the_pump() {
    let mut tx = sa(SPI_AB, 128);
    assert!(tx.skip_tx_seq_to(u32::MAX as u64 - 1));
    let mut peer = sa(SPI_AB, 128);
    let (dev, test_dev) = fake_device();
    let (sock, mut stream) = stream_pair();
    let pump = start(
        &dev,
        &sock,
        Kind::Tun,
        Crypto::Esp {
            tx,
            rx: sa(SPI_BA, 128),
        },
        MAX_FRAME,
    );
    put(&test_dev, &packet(Kind::Tun, 1, 0, 100)); // gets the last sequence number
    put(&test_dev, &packet(Kind::Tun, 1, 2, 100));
    wait_done(&pump, LIMIT).expect("done fd readable after exhaustion");
    assert_eq!(
        pump.exit().unwrap().to_string(),
        "sequence numbers exhausted; a new session is needed"
    );
    let s = pump.stats();
    assert_eq!((s.tx_packets, s.drops(DropReason::SeqExhausted)), (1, 1));
    let mut wire = vec![0u8; s.wire_tx_bytes as usize];
    stream.read_exact(&mut wire).unwrap();
    let (_, inner) = peer.decap(&wire[2..]).unwrap();
    assert_eq!(inner, packet(Kind::Tun, 1, 0, 100));
    assert_eq!(peer.rx_highest_seq(), u32::MAX as u64);
}

#[test]
fn callers_descriptors_stay_open_and_are_released() {
    let (dev, test_dev) = fake_device();
    let (sock, mut peer) = stream_pair();
    let pump = start(&dev, &sock, Kind::Tun, Crypto::Plaintext, MAX_FRAME);
    pump.stop();
    drop(pump);
    // The caller's descriptors still work after the pump is gone...
    put(&dev, b"still open");
    assert_eq!(take(&test_dev), b"still open");
    peer.write_all(b"hi").unwrap();
    let mut two = [0u8; 2];
    (&sock).read_exact(&mut two).unwrap();
    assert_eq!(&two, b"hi");
    // ...and the pump kept no duplicate: closing them closes the connection.
    drop(sock);
    let mut rest = vec![];
    assert_eq!(
        peer.read_to_end(&mut rest).unwrap(),
        0,
        "peer sees end of file"
    );
}

#[test]
fn dropping_a_running_pump_stops_it() {
    let (dev, _test_dev) = fake_device();
    let (sock, mut peer) = stream_pair();
    let pump = start(&dev, &sock, Kind::Tap, Crypto::Plaintext, MAX_FRAME);
    let t = Instant::now();
    drop(pump);
    assert!(t.elapsed() < LIMIT);
    drop(sock);
    let mut rest = vec![];
    assert_eq!(peer.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn bad_arguments() {
    let (dev, _t) = fake_device();
    let (sock, _p) = stream_pair();
    let err = |dev: i32, sock: i32, cfg: PumpConfig| Pump::start(dev, sock, cfg).err().unwrap();
    let plain = || PumpConfig::new(Kind::Tun, Crypto::Plaintext);
    let e = err(dev.as_raw_fd(), dev.as_raw_fd(), plain());
    assert!(e.to_string().contains("not a stream socket"), "{e}");
    let e = err(dev.as_raw_fd(), 1_000_000, plain());
    assert!(e.to_string().starts_with("socket fd 1000000: "), "{e}");
    let e = err(-1, sock.as_raw_fd(), plain());
    assert!(e.to_string().starts_with("device fd -1: "), "{e}");
    let mut small = PumpConfig::new(Kind::Tun, esp_pair(128).0);
    small.max_frame = 55;
    let e = err(dev.as_raw_fd(), sock.as_raw_fd(), small);
    assert_eq!(
        e.to_string(),
        "max_frame 55 is out of range; choose 56 to 65535 bytes"
    );
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let mut zero = plain();
    zero.max_frame = 0;
    let e = err(dev.as_raw_fd(), sock.as_raw_fd(), zero);
    assert_eq!(
        e.to_string(),
        "max_frame 0 is out of range; choose 1 to 65535 bytes"
    );
}
