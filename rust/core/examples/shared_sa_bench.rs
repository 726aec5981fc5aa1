//! Shared outbound SA benchmark: T threads encapsulate batches of packets with one SA, as the
//! device threads of a multi-queue TUN do, two ways:
//!
//! - `reserve`: sequence numbers and IVs reserved under a mutex, the crypto outside it
//!   (`SecurityAssociation::reserve_tx` + `encap_reserved`, what the data plane does);
//! - `locked`: the mutex held around `encap_batch_in_place` (the crypto serialised, as before
//!   multi-queue).
//!
//! ```text
//! cargo run --release -p simpletun-core --example shared_sa_bench -- [--seconds N]
//!     [--threads 1,2] [--size 1420] [--batch 16]
//! ```
//!
//! Prints aggregate MB/s (10^6 inner bytes per wall-clock second) per variant and thread count,
//! the CPU seconds the process used per GB, and `lock busy`: the share of wall-clock time the
//! SA's lock was held by some thread (near 100%: the encryption is serialised, more threads
//! cannot add to it; measured inside the critical section, so it means the same on a busy
//! machine). Wall-clock rates on a busy machine scale only as far as
//! the machine has idle cores: print the load average beside them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use simpletun_core::esp::{encap_len, SecurityAssociation, NH_IPV4, PAYLOAD_OFFSET};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage struct, which outlives the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn run(threads: usize, locked: bool, size: usize, batch: usize, secs: f64) -> (f64, f64, f64) {
    let sa = SecurityAssociation::new(0x1000, &[7; 16], &[9; 32], 4096, false).unwrap();
    let tx = Arc::new(Mutex::new(sa.tx_counters()));
    let shared = Arc::new(sa);
    let whole = Arc::new(Mutex::new(shared.as_ref().clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let held = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (shared, tx, whole) = (shared.clone(), tx.clone(), whole.clone());
            let (stop, bytes, held) = (stop.clone(), bytes.clone(), held.clone());
            std::thread::spawn(move || {
                let mut bufs: Vec<Vec<u8>> = (0..batch)
                    .map(|_| {
                        let mut b = vec![0u8; encap_len(size)];
                        b[PAYLOAD_OFFSET] = 0x45;
                        b
                    })
                    .collect();
                let lens = vec![size; batch];
                let nhs = vec![NH_IPV4; batch];
                let mut out = vec![0usize; batch];
                let mut done = 0u64;
                let mut inside = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let n = if locked {
                        let mut sa = whole.lock().unwrap();
                        let t0 = Instant::now();
                        let n = sa
                            .encap_batch_in_place(&mut bufs, &lens, &nhs, &mut out)
                            .unwrap();
                        inside += t0.elapsed();
                        n
                    } else {
                        let mut c = tx.lock().unwrap();
                        let t0 = Instant::now();
                        let blk = shared.reserve_tx(&mut c, &bufs, &lens).unwrap();
                        inside += t0.elapsed();
                        drop(c);
                        shared
                            .encap_reserved(blk, &mut bufs, &lens, &nhs, &mut out)
                            .unwrap()
                    };
                    // The encapsulated packets are rewritten next round: restore the inner
                    // version byte (the rest may stay ciphertext; the work is the same).
                    for b in bufs.iter_mut() {
                        b[PAYLOAD_OFFSET] = 0x45;
                    }
                    done += (n * size) as u64;
                }
                bytes.fetch_add(done, Ordering::Relaxed);
                held.fetch_add(inside.as_nanos() as u64, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let b = bytes.load(Ordering::Relaxed) as f64;
    let held = held.load(Ordering::Relaxed) as f64 / 1e9 / wall;
    (b / wall / 1e6, cpu / (b / 1e9), held)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = arg(&args, "--seconds").map_or(2.0, |s| s.parse().expect("--seconds N"));
    let size: usize = arg(&args, "--size").map_or(1420, |s| s.parse().expect("--size N"));
    let batch: usize = arg(&args, "--batch").map_or(16, |s| s.parse().expect("--batch N"));
    let threads: Vec<usize> = arg(&args, "--threads").map_or(vec![1, 2], |s| {
        s.split(',')
            .map(|t| t.parse().expect("--threads 1,2"))
            .collect()
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "shared SA encap, AES-128-CBC + HMAC-SHA-256-128, {size}-byte packets, batches of {batch}, \
         {secs} s per run; {cpus} CPUs, load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("variant  threads   MB/s  x 1 thread  CPU-s/GB  lock busy");
    for locked in [false, true] {
        let name = if locked { "locked" } else { "reserve" };
        let mut one = None;
        for &t in &threads {
            let (mbs, cpu, held) = run(t, locked, size, batch, secs);
            let base = *one.get_or_insert(mbs);
            println!(
                "{name:<8} {t:>7} {mbs:>6.0} {:>11.2} {cpu:>9.2} {:>9.1}%",
                mbs / base,
                held * 100.0
            );
        }
    }
}
