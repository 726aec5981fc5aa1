//! The kernel as the independent judge of the offload code: in a private network namespace a
//! TUN device is opened with `IFF_VNET_HDR` and TSO enabled; TCP segments are coalesced with
//! `offload::Gro`, the super-packet is written to the device, the kernel forwards it (routed
//! back out of the same device), and what it hands back (a TSO super-packet with the kernel's
//! own vnet header, or segments) is split with `offload::split`. The segments must be the
//! original ones, with TTL / hop limit one lower as forwarding makes them. And a locally sent
//! SYN, which the kernel hands over with a partial checksum, must verify once `split` completed
//! it. Needs root (runs in
//! CI as root); skipped with a printed reason otherwise.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use simpletun_core::offload::{split, Gro, GroOut, VnetHdr, F_NEEDS_CSUM, VNET_HDR_LEN};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const DEV: &str = "stgro0";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// Run a command (it inherits this thread's network namespace).
fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_vnet_tun() -> libc::c_int {
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    let mut ifr = [0u8; 40];
    ifr[..DEV.len()].copy_from_slice(DEV.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    assert_eq!(
        unsafe { libc::ioctl(fd, libc::TUNSETIFF, ifr.as_mut_ptr()) },
        0,
        "TUNSETIFF: {}",
        std::io::Error::last_os_error()
    );
    let offl = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    assert_eq!(
        unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, offl) },
        0,
        "TUNSETOFFLOAD: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// RFC 1071, 16 bits at a time (independent of the crate's routine).
fn csum(parts: &[&[u8]]) -> u16 {
    let b: Vec<u8> = parts.concat();
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += (c[0] as u32) << 8 | *c.get(1).unwrap_or(&0) as u32;
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A TCP segment 10.77.1.1:40000 → 10.77.1.2:5201 (or fd77:1::1 → fd77:1::2), valid checksums.
fn segment(v6: bool, k: u32, len: usize, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&(1_000_000 + k * 1400).to_be_bytes());
    t[8..12].copy_from_slice(&7u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&1000u16.to_be_bytes());
    t.extend((0..len).map(|i| (i as u32 * 7 + k) as u8));
    let mut ip;
    let pseudo: Vec<u8>;
    if v6 {
        ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(t.len() as u16).to_be_bytes());
        ip[6] = 6;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&[0xfd, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        ip[24..40].copy_from_slice(&[0xfd, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        pseudo = [
            &ip[8..40],
            &(t.len() as u32).to_be_bytes()[..],
            &[0, 0, 0, 6],
        ]
        .concat();
    } else {
        ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&(300 + k as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 77, 1, 1]);
        ip[16..20].copy_from_slice(&[10, 77, 1, 2]);
        let c = csum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        pseudo = [&ip[12..20], &[0, 6], &(t.len() as u16).to_be_bytes()[..]].concat();
    }
    let c = csum(&[&pseudo, &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&t);
    ip
}

/// What forwarding makes of a segment: TTL / hop limit minus one (IPv4 checksum redone).
fn forwarded(mut p: Vec<u8>) -> Vec<u8> {
    if p[0] >> 4 == 6 {
        p[7] -= 1;
    } else {
        p[8] -= 1;
        p[10] = 0;
        p[11] = 0;
        let c = csum(&[&p[..20]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn is_ours(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.len() >= 40 && p[9] == 6 && p[16..20] == [10, 77, 1, 2],
        Some(6) => p.len() >= 60 && p[6] == 6 && p[39] == 2 && p[24..26] == [0xfd, 0x77],
        _ => false,
    }
}

#[test]
fn kernel_accepts_gro_output_and_its_tso_splits_back() {
    if !is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root: this test must run there"
        );
        eprintln!("skipping kernel_accepts_gro_output_and_its_tso_splits_back: needs root");
        return;
    }
    in_private_netns(|| {
        let fd = open_vnet_tun();
        run(&["ip", "link", "set", DEV, "up"]);
        run(&["ip", "addr", "add", "10.77.0.1/24", "dev", DEV]);
        run(&["ip", "route", "add", "10.77.1.0/24", "dev", DEV]);
        run(&["ip", "-6", "addr", "add", "fd77::1/64", "dev", DEV, "nodad"]);
        run(&["ip", "-6", "route", "add", "fd77:1::/64", "dev", DEV]);
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            run(&["sysctl", "-q", "-w", s]);
        }
        for v6 in [false, true] {
            let segs: Vec<Vec<u8>> = (0..8)
                .map(|k| segment(v6, k, 1400, if k == 7 { 0x18 } else { 0x10 }))
                .collect();
            let mut gro = Gro::new(VNET_HDR_LEN, 1);
            assert_eq!(
                gro.coalesce(&segs),
                &[GroOut::Merged {
                    slot: 0,
                    segments: 8
                }]
            );
            let m = gro.merged(0);
            let n = unsafe { libc::write(fd, m.as_ptr().cast(), m.len()) };
            assert_eq!(
                n,
                m.len() as isize,
                "kernel refused the super-packet: {}",
                std::io::Error::last_os_error()
            );

            let want: Vec<Vec<u8>> = segs.into_iter().map(forwarded).collect();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut gso_reads = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = vec![0u8; 70000];
            while got.len() < want.len() && Instant::now() < deadline {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                unsafe { libc::poll(&mut pfd, 1, 200) };
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    continue;
                }
                let r = &buf[..n as usize];
                let hdr = VnetHdr::parse(r, VNET_HDR_LEN).expect("kernel's vnet header");
                let pkt = &r[VNET_HDR_LEN..];
                if !is_ours(pkt) {
                    continue; // router solicitations and the like
                }
                if hdr.is_gso() {
                    gso_reads += 1;
                }
                let mut outs = vec![vec![0u8; 1600]; 64];
                let mut lens = [0usize; 64];
                let k = split(&hdr, pkt, &mut outs, 0, &mut lens).expect("kernel packet splits");
                got.extend((0..k).map(|i| outs[i][..lens[i]].to_vec()));
            }
            assert_eq!(
                got.len(),
                want.len(),
                "v6 {v6}: segments back from the kernel"
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "v6 {v6}: segment {i}");
            }
            eprintln!(
                "v6 {v6}: the kernel forwarded the super-packet; {gso_reads} TSO read(s) back"
            );
        }
        // A locally sent SYN leaves with a partial checksum (TUN_F_CSUM): completed by
        // `split`, it must verify with the independent routine.
        let sock =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        assert!(sock >= 0);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 5201u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([10, 77, 1, 9]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        unsafe { libc::connect(sock, (&sa as *const libc::sockaddr_in).cast(), len) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70000];
        let mut partial = 0;
        while partial == 0 && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            unsafe { libc::poll(&mut pfd, 1, 200) };
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let r = &buf[..n as usize];
            let hdr = VnetHdr::parse(r, VNET_HDR_LEN).unwrap();
            let pkt = &r[VNET_HDR_LEN..];
            if pkt.len() < 40 || pkt[0] != 0x45 || pkt[16..20] != [10, 77, 1, 9] {
                continue;
            }
            assert_ne!(
                hdr.flags & F_NEEDS_CSUM,
                0,
                "the kernel left the checksum to us"
            );
            let t = &pkt[20..];
            let pseudo = [&pkt[12..20], &[0, 6], &(t.len() as u16).to_be_bytes()[..]].concat();
            assert_ne!(csum(&[&pseudo, t]), 0, "not yet complete");
            let mut outs = [vec![0u8; 200]];
            let mut lens = [0usize];
            assert_eq!(split(&hdr, pkt, &mut outs, 0, &mut lens), Ok(1));
            let seg = &outs[0][..lens[0]];
            assert_eq!(
                csum(&[&pseudo, &seg[20..]]),
                0,
                "completed checksum verifies"
            );
            assert_eq!(seg[33] & 0x02, 0x02, "a SYN");
            partial += 1;
        }
        assert_eq!(partial, 1, "no SYN read from the device");
        unsafe { libc::close(sock) };
        unsafe { libc::close(fd) };
    });
}
