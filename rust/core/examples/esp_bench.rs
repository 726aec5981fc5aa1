//! ESP throughput benchmark: `SecurityAssociation::encap_in_place` / `decap_in_place` over
//! preallocated buffers, next to `openssl speed` for AES-CBC and HMAC-SHA-256 at the same sizes.
//!
//! ```text
//! cargo run --release -p simpletun-core --example esp_bench -- [--seconds N] [--reps N]
//!     [--sizes 64,512,...] [--keys 128,256] [--batch N] [--wall] [--no-openssl]
//! ```
//!
//! MB/s are 10^6 inner-packet bytes per second. Like `openssl speed` (which by default divides
//! by user CPU time), our rates are per CPU second of the measuring thread, so a busy machine
//! slows both sides alike; `--wall` switches ours to wall-clock time (and passes `-elapsed` to
//! OpenSSL). With `--reps N` every figure is the best of N runs, ours and OpenSSL's interleaved.
//!
//! The OpenSSL "combined" rate is what one pass of AES-CBC plus one pass of HMAC-SHA-256 over
//! the same bytes costs: 1 / (1/aes + 1/hmac). An ESP packet of inner length n carries a little
//! more work than that (trailer and padding, the IV block, the 8-byte header under the MAC), so
//! a ratio of 1.0 is not quite reachable at small sizes.
//!
//! The second table compares the serial path with the batched one
//! (`SecurityAssociation::encap_batch_in_place`, `--batch N` packets of one size per call,
//! default 8: their IVs encrypted together, their CBC chains interleaved through AES-NI and
//! their HMACs two at a time through SHA-NI), serial decap with the batched one
//! (`decap_batch_in_place`, the ICVs of `--batch N` packets computed together) and,
//! for the cipher alone, one packet's CBC (`Cipher::cbc_encrypt`) with `cbc_multi` over the
//! same 8 packets. `ossl-stitch` is OpenSSL's own stitched AES-128-CBC-HMAC-SHA256 EVP cipher
//! (one stream, AES and SHA interleaved in one pass; the TLS-record construction, not ESP's, but
//! the same work per byte).

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use simpletun_core::cbc_multi::cbc_encrypt_multi;
use simpletun_core::crypto::Cipher;
use simpletun_core::esp::{encap_len, padded_len, SecurityAssociation, NH_IPV4, PAYLOAD_OFFSET};
use simpletun_core::DropReason;

const DEFAULT_SIZES: [usize; 5] = [64, 512, 1420, 8192, 65000];
const SPI: u32 = 0x1000;
const AUTH_KEY: [u8; 32] = [0x5a; 32];
/// Decap works through a pool of valid packets this large (it fits in L2), re-made untimed.
const POOL_BYTES: usize = 512 * 1024;

struct Opts {
    seconds: u32,
    reps: u32,
    sizes: Vec<usize>,
    keys: Vec<usize>,
    wall: bool,
    openssl: bool,
    batch: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: esp_bench [--seconds N] [--reps N] [--sizes 64,512,...] [--keys 128,256] \
         [--batch N] [--wall] [--no-openssl]"
    );
    std::process::exit(2)
}

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .map(|x| x.trim().parse().unwrap_or_else(|_| usage()))
        .collect()
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        seconds: 1,
        reps: 1,
        sizes: DEFAULT_SIZES.to_vec(),
        keys: vec![128, 256],
        wall: false,
        openssl: true,
        batch: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--seconds" => o.seconds = val().parse().unwrap_or_else(|_| usage()),
            "--reps" => o.reps = val().parse().unwrap_or_else(|_| usage()),
            "--sizes" => o.sizes = parse_list(&val()),
            "--keys" => o.keys = parse_list(&val()),
            "--batch" => o.batch = val().parse().unwrap_or_else(|_| usage()),
            "--wall" => o.wall = true,
            "--no-openssl" => o.openssl = false,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if o.seconds == 0 || o.reps == 0 || o.sizes.is_empty() || o.batch == 0 {
        usage();
    }
    if o.sizes.iter().any(|&n| n == 0 || n > 65535)
        || o.keys.iter().any(|k| ![128, 256].contains(k))
    {
        usage();
    }
    o
}

/// A clock: the calling thread's CPU time, or wall-clock time.
struct Clock {
    wall: bool,
    start: Instant,
}

impl Clock {
    fn new(wall: bool) -> Clock {
        Clock {
            wall,
            start: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        if self.wall {
            return self.start.elapsed();
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

fn sa_pair(key_bits: usize) -> (SecurityAssociation, SecurityAssociation) {
    let enc_key = vec![0xa5u8; key_bits / 8];
    let mk = || SecurityAssociation::new(SPI, &enc_key, &AUTH_KEY, 4096, false).expect("valid SA");
    (mk(), mk())
}

/// Packets per timed batch: enough that reading the clock costs nothing.
fn batch_len(n: usize) -> usize {
    (POOL_BYTES / encap_len(n)).max(4)
}

/// Encapsulation rate in MB/s of inner bytes: one preallocated buffer, encapsulated over and over
/// (each round encrypts what the last one left there; the content does not matter to the cost).
fn bench_encap(key_bits: usize, n: usize, secs: u32, clock: &Clock) -> f64 {
    let (mut tx, _) = sa_pair(key_bits);
    let mut buf = vec![0u8; encap_len(n)];
    buf[PAYLOAD_OFFSET] = 0x45;
    let batch = batch_len(n);
    // Warm-up.
    for _ in 0..batch.min(64) {
        tx.encap_in_place(&mut buf, n, NH_IPV4).expect("encap");
    }
    let budget = Duration::from_secs(secs as u64);
    let t0 = clock.now();
    let mut packets = 0u64;
    let elapsed = loop {
        for _ in 0..batch {
            let len = tx
                .encap_in_place(black_box(&mut buf), n, NH_IPV4)
                .expect("encap");
            black_box(len);
        }
        packets += batch as u64;
        let e = clock.now() - t0;
        if e >= budget {
            break e;
        }
    };
    packets as f64 * n as f64 / elapsed.as_secs_f64() / 1e6
}

/// Batched encapsulation rate in MB/s of inner bytes: `batch` preallocated buffers of one size,
/// encapsulated together by `encap_batch_in_place` over and over.
fn bench_encap_batch(key_bits: usize, n: usize, batch: usize, secs: u32, clock: &Clock) -> f64 {
    let (mut tx, _) = sa_pair(key_bits);
    let mut bufs = vec![vec![0u8; encap_len(n)]; batch];
    for b in bufs.iter_mut() {
        b[PAYLOAD_OFFSET] = 0x45;
    }
    let lens = vec![n; batch];
    let nhs = vec![NH_IPV4; batch];
    let mut out = vec![0usize; batch];
    let rounds = batch_len(n).div_ceil(batch);
    for _ in 0..rounds.min(8) {
        tx.encap_batch_in_place(&mut bufs, &lens, &nhs, &mut out)
            .expect("encap");
    }
    let budget = Duration::from_secs(secs as u64);
    let t0 = clock.now();
    let mut packets = 0u64;
    let elapsed = loop {
        for _ in 0..rounds {
            let k = tx
                .encap_batch_in_place(black_box(&mut bufs), &lens, &nhs, &mut out)
                .expect("encap");
            assert_eq!(k, batch);
            black_box(&out);
        }
        packets += (rounds * batch) as u64;
        let e = clock.now() - t0;
        if e >= budget {
            break e;
        }
    };
    packets as f64 * n as f64 / elapsed.as_secs_f64() / 1e6
}

/// AES-CBC alone over the padded payload of 8 packets of inner size `n`: one packet at a time
/// (`multi` false) or all 8 chains interleaved (`multi` true). MB/s of inner bytes.
fn bench_cbc(key_bits: usize, n: usize, multi: bool, secs: u32, clock: &Clock) -> f64 {
    let cipher = Cipher::new(&vec![0xa5u8; key_bits / 8]).expect("key");
    let plen = padded_len(n);
    let mut bufs = vec![vec![0x33u8; plen]; 8];
    let ivs = [[7u8; 16]; 8];
    let rounds = batch_len(n).div_ceil(8);
    let budget = Duration::from_secs(secs as u64);
    let t0 = clock.now();
    let mut packets = 0u64;
    let elapsed = loop {
        for _ in 0..rounds {
            if multi {
                let mut refs: [&mut [u8]; 8] = Default::default();
                for (r, b) in refs.iter_mut().zip(bufs.iter_mut()) {
                    *r = b.as_mut_slice();
                }
                cbc_encrypt_multi(&cipher, &ivs, black_box(&mut refs));
            } else {
                for (b, iv) in bufs.iter_mut().zip(&ivs) {
                    cipher.cbc_encrypt(iv, black_box(b.as_mut_slice()));
                }
            }
        }
        packets += (rounds * 8) as u64;
        let e = clock.now() - t0;
        if e >= budget {
            break e;
        }
    };
    packets as f64 * n as f64 / elapsed.as_secs_f64() / 1e6
}

/// Decapsulation rate in MB/s of inner bytes. A pool of valid packets (consecutive sequence
/// numbers) is decapsulated in place, timed, one by one (`batch` 0) or `batch` packets per
/// `decap_batch_in_place` call; then the pool is encapsulated afresh, untimed.
fn bench_decap(key_bits: usize, n: usize, batch: usize, secs: u32, clock: &Clock) -> f64 {
    let (mut tx, mut rx) = sa_pair(key_bits);
    let mut pool: Vec<Vec<u8>> = (0..batch_len(n)).map(|_| vec![0u8; encap_len(n)]).collect();
    let refill = |tx: &mut SecurityAssociation, pool: &mut Vec<Vec<u8>>| {
        for buf in pool.iter_mut() {
            buf[PAYLOAD_OFFSET] = 0x45;
            tx.encap_in_place(buf, n, NH_IPV4).expect("encap");
        }
    };
    // Warm-up round, also checks that what we time is the successful path.
    refill(&mut tx, &mut pool);
    for buf in pool.iter_mut() {
        let d = rx.decap_in_place(buf).expect("decap");
        assert_eq!(d.inner.len(), n);
    }
    let budget = Duration::from_secs(secs as u64);
    let mut timed = Duration::ZERO;
    let mut packets = 0u64;
    while timed < budget {
        refill(&mut tx, &mut pool);
        let t0 = clock.now();
        if batch == 0 {
            for buf in pool.iter_mut() {
                let d = rx.decap_in_place(black_box(buf.as_mut_slice()));
                black_box(d.is_ok());
            }
        } else {
            let mut res = vec![Err(DropReason::BadLength); batch];
            for group in pool.chunks_mut(batch) {
                rx.decap_batch_in_place(black_box(group), &mut res);
                black_box(&res);
            }
        }
        timed += clock.now() - t0;
        packets += pool.len() as u64;
    }
    let drops: u64 = rx.stats().drops.iter().map(|(_, c)| c).sum();
    assert_eq!(drops, 0, "decap dropped packets during the benchmark");
    packets as f64 * n as f64 / timed.as_secs_f64() / 1e6
}

/// One `openssl speed -mr` run at one size; MB/s, or `None` if openssl is missing or its output
/// cannot be parsed.
fn openssl_speed(args: &[&str], n: usize, secs: u32, wall: bool) -> Option<f64> {
    let mut cmd = Command::new("openssl");
    cmd.arg("speed").arg("-mr");
    if wall {
        cmd.arg("-elapsed");
    }
    cmd.args(["-seconds", &secs.to_string(), "-bytes", &n.to_string()])
        .args(args);
    let out = cmd.output().ok()?;
    // Machine-readable result: `+F:<index>:<algorithm>:<bytes per second>`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("+F:"))?;
    let bps: f64 = line.rsplit(':').next()?.trim().parse().ok()?;
    Some(bps / 1e6)
}

#[derive(Clone, Copy, Default)]
struct Row {
    encap: f64,
    encap_batch: f64,
    cbc1: f64,
    cbc8: f64,
    decap: f64,
    decap_batch: f64,
    stitched: Option<f64>,
    aes_enc: Option<f64>,
    /// At the size rounded up to a whole number of blocks (see `main`).
    aes_enc16: Option<f64>,
    aes_dec: Option<f64>,
    hmac: Option<f64>,
}

fn best(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn combined(aes: Option<f64>, hmac: Option<f64>) -> Option<f64> {
    Some(1.0 / (1.0 / aes? + 1.0 / hmac?))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
}

fn main() {
    let o = parse_opts();
    let clock = Clock::new(o.wall);
    println!(
        "esp_bench: {} s per figure, best of {}, rates per {} second, MB/s = 10^6 inner bytes/s",
        o.seconds,
        o.reps,
        if o.wall { "wall-clock" } else { "CPU" }
    );
    if o.openssl {
        match Command::new("openssl").arg("version").output() {
            Ok(v) if v.status.success() => {
                print!("reference: {}", String::from_utf8_lossy(&v.stdout));
            }
            _ => println!("reference: openssl not found; OpenSSL columns left empty"),
        }
    }

    // Every row is the best of `reps` rounds; each round runs ours and OpenSSL's back to back
    // at each size, so a burst of load elsewhere hits both sides.
    let mut rows = vec![vec![Row::default(); o.sizes.len()]; o.keys.len()];
    let mut hmac = vec![None; o.sizes.len()];
    for rep in 0..o.reps {
        eprintln!("round {}/{}", rep + 1, o.reps);
        for (si, &n) in o.sizes.iter().enumerate() {
            if o.openssl {
                let h = openssl_speed(&["-hmac", "sha256"], n, o.seconds, o.wall);
                hmac[si] = best(hmac[si], h);
            }
            for (ki, &bits) in o.keys.iter().enumerate() {
                let r = &mut rows[ki][si];
                r.encap = r.encap.max(bench_encap(bits, n, o.seconds, &clock));
                r.encap_batch = r
                    .encap_batch
                    .max(bench_encap_batch(bits, n, o.batch, o.seconds, &clock));
                r.cbc1 = r.cbc1.max(bench_cbc(bits, n, false, o.seconds, &clock));
                r.cbc8 = r.cbc8.max(bench_cbc(bits, n, true, o.seconds, &clock));
                r.decap = r.decap.max(bench_decap(bits, n, 0, o.seconds, &clock));
                r.decap_batch = r
                    .decap_batch
                    .max(bench_decap(bits, n, o.batch, o.seconds, &clock));
                if o.openssl {
                    let alg = format!("aes-{bits}-cbc");
                    let e = openssl_speed(&["-evp", &alg], n, o.seconds, o.wall);
                    let e16 = if n % 16 == 0 {
                        e
                    } else {
                        openssl_speed(&["-evp", &alg], n.next_multiple_of(16), o.seconds, o.wall)
                    };
                    let d = openssl_speed(&["-decrypt", "-evp", &alg], n, o.seconds, o.wall);
                    r.aes_enc = best(r.aes_enc, e);
                    r.aes_enc16 = best(r.aes_enc16, e16);
                    r.aes_dec = best(r.aes_dec, d);
                    if bits == 128 {
                        // A whole number of blocks, like ESP (the stitched cipher pads itself).
                        let st = openssl_speed(
                            &["-evp", "aes-128-cbc-hmac-sha256"],
                            n.next_multiple_of(16),
                            o.seconds,
                            o.wall,
                        );
                        r.stitched = best(r.stitched, st);
                    }
                }
            }
        }
    }

    for (ki, &bits) in o.keys.iter().enumerate() {
        println!();
        println!("AES-{bits}-CBC + HMAC-SHA-256-128 (OpenSSL: aes-{bits}-cbc, hmac sha256)");
        println!(
            "{:>6} | {:>7} {:>7} | {:>8} {:>8} {:>8} {:>7} | {:>7} {:>7} {:>8} | {:>6} {:>6} {:>6} {:>6}",
            "bytes",
            "encap",
            "decap",
            "ossl-enc",
            "enc@16n",
            "ossl-dec",
            "hmac",
            "comb",
            "comb16",
            "comb-dec",
            "enc/c",
            "enc/c16",
            "dec/c",
            "dec/cd"
        );
        for (si, &n) in o.sizes.iter().enumerate() {
            let mut r = rows[ki][si];
            r.hmac = hmac[si];
            let comb = combined(r.aes_enc, r.hmac);
            let comb16 = combined(r.aes_enc16, r.hmac);
            let comb_dec = combined(r.aes_dec, r.hmac);
            println!(
                "{:>6} | {:>7.1} {:>7.1} | {:>8} {:>8} {:>8} {:>7} | {:>7} {:>7} {:>8} | {:>6} {:>7} {:>6} {:>6}",
                n,
                r.encap,
                r.decap,
                fmt_opt(r.aes_enc, 1),
                fmt_opt(r.aes_enc16, 1),
                fmt_opt(r.aes_dec, 1),
                fmt_opt(r.hmac, 1),
                fmt_opt(comb, 1),
                fmt_opt(comb16, 1),
                fmt_opt(comb_dec, 1),
                fmt_opt(comb.map(|c| r.encap / c), 3),
                fmt_opt(comb16.map(|c| r.encap / c), 3),
                fmt_opt(comb.map(|c| r.decap / c), 3),
                fmt_opt(comb_dec.map(|c| r.decap / c), 3),
            );
        }
    }
    for (ki, &bits) in o.keys.iter().enumerate() {
        println!();
        println!(
            "AES-{bits}: serial vs batched encap and decap (--batch {}), CBC alone 1 vs 8 lanes, same run",
            o.batch
        );
        println!(
            "{:>6} | {:>7} {:>7} {:>6} | {:>7} {:>7} {:>6} | {:>7} {:>7} {:>6} | {:>7} {:>11} | {:>7} {:>7} {:>7}",
            "bytes",
            "encap",
            "batched",
            "b/ser",
            "decap",
            "dec-bat",
            "db/d",
            "cbc-1",
            "cbc-8",
            "8/1",
            "comb16",
            "ossl-stitch",
            "enc/c16",
            "bat/c16",
            "bat/st"
        );
        for (si, &n) in o.sizes.iter().enumerate() {
            let r = rows[ki][si];
            let comb16 = combined(r.aes_enc16, hmac[si]);
            println!(
                "{:>6} | {:>7.1} {:>7.1} {:>6.3} | {:>7.1} {:>7.1} {:>6.3} | {:>7.1} {:>7.1} {:>6.2} | {:>7} {:>11} | {:>7} {:>7} {:>7}",
                n,
                r.encap,
                r.encap_batch,
                r.encap_batch / r.encap,
                r.decap,
                r.decap_batch,
                r.decap_batch / r.decap,
                r.cbc1,
                r.cbc8,
                r.cbc8 / r.cbc1,
                fmt_opt(comb16, 1),
                fmt_opt(r.stitched, 1),
                fmt_opt(comb16.map(|c| r.encap / c), 3),
                fmt_opt(comb16.map(|c| r.encap_batch / c), 3),
                fmt_opt(r.stitched.map(|st| r.encap_batch / st), 3),
            );
        }
    }
    println!();
    println!(
        "comb = 1/(1/ossl-enc + 1/hmac); comb-dec = 1/(1/ossl-dec + 1/hmac); \
         enc/c = encap/comb, dec/c = decap/comb, dec/cd = decap/comb-dec"
    );
    println!(
        "enc@16n: openssl aes-cbc at the size rounded up to a multiple of 16 (OpenSSL's EVP is much \
         slower on a partial last block, e.g. 1420; ESP itself only ever encrypts whole blocks); \
         comb16 = 1/(1/enc@16n + 1/hmac), enc/c16 = encap/comb16"
    );
    println!(
        "batched: encap_batch_in_place, b/ser = batched/encap; dec-bat: decap_batch_in_place, \
         db/d = dec-bat/decap; cbc-1/cbc-8: AES-CBC alone, one \
         chain at a time / 8 interleaved; bat/c16 = batched/comb16; ossl-stitch: openssl \
         aes-128-cbc-hmac-sha256 (128-bit keys only), bat/st = batched/ossl-stitch"
    );
}
