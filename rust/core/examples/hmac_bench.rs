//! HMAC-SHA-256 throughput: one message at a time (`crypto::Hmac256`, the `hmac`/`sha2`
//! crates) against `sha256_multi` interleaving 1, 2, 3 or 4 messages per SHA-NI stream, next to
//! `openssl speed -hmac sha256` and `openssl speed -evp sha256` at the same sizes.
//!
//! ```text
//! cargo run --release -p simpletun-core --example hmac_bench -- [--seconds N] [--reps N]
//!     [--sizes 64,512,1420,8192] [--batch N] [--no-openssl]
//! ```
//!
//! Each figure hashes `--batch` (default 8) messages of one size per call, over and over. MB/s
//! are 10^6 message bytes per CPU second of the measuring thread (OpenSSL's own default is user
//! CPU time too); with `--reps N` every figure is the best of N rounds, ours and OpenSSL's
//! interleaved. The load average is printed before and after, as other work on the machine
//! slows every column alike only roughly.

use std::hint::black_box;
use std::process::Command;
use std::time::Duration;

use simpletun_core::crypto::Hmac256;
use simpletun_core::sha256_multi::{accelerated, HmacKeys};

fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` (which hashes `bytes_per_call` bytes) for `secs` CPU seconds; MB/s.
fn rate(secs: f64, bytes_per_call: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..16 {
        f();
    }
    let calls_per_check = (256 * 1024 / bytes_per_call).max(1);
    let t0 = cpu_now();
    let mut calls = 0u64;
    let e = loop {
        for _ in 0..calls_per_check {
            f();
        }
        calls += calls_per_check as u64;
        let e = cpu_now() - t0;
        if e.as_secs_f64() >= secs {
            break e;
        }
    };
    calls as f64 * bytes_per_call as f64 / e.as_secs_f64() / 1e6
}

fn openssl_speed(args: &[&str], n: usize, secs: u32) -> Option<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-mr",
            "-seconds",
            &secs.to_string(),
            "-bytes",
            &n.to_string(),
        ])
        .args(args)
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("+F:"))?;
    let bps: f64 = line.rsplit(':').next()?.trim().parse().ok()?;
    Some(bps / 1e6)
}

fn best_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn usage() -> ! {
    eprintln!(
        "usage: hmac_bench [--seconds N] [--reps N] [--sizes a,b,..] [--batch N] [--no-openssl]"
    );
    std::process::exit(2)
}

fn main() {
    let (mut secs, mut reps, mut batch, mut openssl) = (1u32, 1u32, 8usize, true);
    let mut sizes = vec![64usize, 512, 1420, 8192];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--seconds" => secs = val().parse().unwrap_or_else(|_| usage()),
            "--reps" => reps = val().parse().unwrap_or_else(|_| usage()),
            "--batch" => batch = val().parse().unwrap_or_else(|_| usage()),
            "--sizes" => {
                sizes = val()
                    .split(',')
                    .map(|x| x.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--no-openssl" => openssl = false,
            _ => usage(),
        }
    }
    if secs == 0 || reps == 0 || batch == 0 {
        usage();
    }
    println!(
        "hmac_bench: {secs} s per figure, best of {reps}, {batch} messages per call, MB/s per CPU \
         second; SHA-NI multi-buffer: {}; load average {}",
        if accelerated() {
            "yes"
        } else {
            "no (portable)"
        },
        loadavg()
    );
    let key = [0x5au8; 32];
    let single = Hmac256::new(&key);
    let multi = HmacKeys::new(&key);
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>7}",
        "bytes",
        "crate",
        "ours-x1",
        "ours-x2",
        "ours-x3",
        "ours-x4",
        "ossl-hmac",
        "ossl-sha",
        "x2/cr",
        "x2/ossl"
    );
    for &n in &sizes {
        let msgs: Vec<Vec<u8>> = (0..batch).map(|i| vec![i as u8; n]).collect();
        let views: Vec<(&[u8], &[u8])> = msgs.iter().map(|m| (&m[..], &[][..])).collect();
        let mut out = vec![[0u8; 32]; batch];
        let mut best = [0f64; 5];
        let (mut oh, mut os) = (None::<f64>, None::<f64>);
        for _ in 0..reps {
            let r = rate(secs as f64, n * batch, || {
                for m in &msgs {
                    black_box(single.mac(&[black_box(m)]));
                }
            });
            best[0] = best[0].max(r);
            for (ways, b) in best.iter_mut().enumerate().skip(1) {
                let r = rate(secs as f64, n * batch, || {
                    multi.mac_multi_ways(black_box(&views), &mut out, ways);
                    black_box(&out);
                });
                *b = b.max(r);
            }
            if openssl {
                let h = openssl_speed(&["-hmac", "sha256"], n, secs);
                oh = best_of(oh, h);
                let s = openssl_speed(&["-evp", "sha256"], n, secs);
                os = best_of(os, s);
            }
        }
        let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.0}"));
        println!(
            "{:>6} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10} {:>10} {:>7.2} {:>7}",
            n,
            best[0],
            best[1],
            best[2],
            best[3],
            best[4],
            f(oh),
            f(os),
            best[2] / best[0],
            oh.map_or("-".into(), |h| format!("{:.2}", best[2] / h)),
        );
    }
    println!("load average after: {}", loadavg());
}
