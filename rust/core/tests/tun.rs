//! Opening TUN/TAP devices. Name checks need no privileges. The device tests run as root in a
//! private network namespace of their own thread (nothing outside it is touched and it
//! vanishes with the thread); without root they check the permission error instead.

use std::ffi::CString;
use std::io::ErrorKind;
use std::thread;

use simpletun_core::tun::{self, Kind};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Run `f` on a thread that has its own, new network namespace.
fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap()
    })
}

fn exists(name: &str) -> bool {
    let c = CString::new(name).unwrap();
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn error(name: &str, kind: Kind) -> std::io::Error {
    tun::open(name, kind).expect_err("open should fail")
}

#[test]
fn invalid_names() {
    let e = error("a-name-that-is-too-long", Kind::Tun);
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        e.to_string(),
        "invalid interface name \"a-name-that-is-too-long\": 23 bytes is too long (at most 15)"
    );
    assert!(error("bad/name", Kind::Tun)
        .to_string()
        .contains("may not contain '/'"));
    assert!(error("bad name", Kind::Tap)
        .to_string()
        .contains("may not contain ' '"));
    assert!(error("..", Kind::Tun)
        .to_string()
        .contains("'.' and '..' are not allowed"));
    assert!(error("tun%s", Kind::Tun).to_string().contains("one '%d'"));
}

#[test]
fn create_attach_and_vanish() {
    if !is_root() {
        let e = error("sttest0", Kind::Tun);
        assert!(
            e.to_string()
                .contains("permission denied (run as root or with CAP_NET_ADMIN"),
            "{e}"
        );
        return;
    }
    in_private_netns(|| {
        let t = tun::open("sttest%d", Kind::Tun).unwrap();
        assert_eq!(t.name(), "sttest0");
        assert!(t.created());
        assert_eq!(t.kind(), Kind::Tun);
        assert!(exists("sttest0"));
        let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&t), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "non-blocking");
        let fdflags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&t), libc::F_GETFD) };
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0, "close-on-exec");

        let e = error("sttest0", Kind::Tun);
        assert_eq!(
            e.to_string(),
            "TUN device \"sttest0\" is busy: another process has it open"
        );
        let e = error("sttest0", Kind::Tap);
        assert!(
            e.to_string()
                .starts_with("device \"sttest0\" exists but is not a TAP device"),
            "{e}"
        );
        let e = error("lo", Kind::Tun);
        assert!(
            e.to_string()
                .starts_with("device \"lo\" exists but is not a TUN device"),
            "{e}"
        );

        let tap = tun::open("sttap", Kind::Tap).unwrap();
        assert_eq!(
            (tap.name(), tap.created(), tap.kind()),
            ("sttap", true, Kind::Tap)
        );

        drop(t);
        drop(tap);
        assert!(
            !exists("sttest0") && !exists("sttap"),
            "non-persistent devices vanish on close"
        );
    });
}

#[test]
fn attach_to_persistent_device_reports_not_created() {
    if !is_root() {
        let e = error("stpersist", Kind::Tap);
        assert!(e.to_string().contains("permission denied"), "{e}");
        return;
    }
    in_private_netns(|| {
        let t = tun::open("stpersist", Kind::Tap).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&t);
        assert_eq!(unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, 1) }, 0);
        assert!(t.created());
        drop(t);
        assert!(exists("stpersist"));
        let again = tun::open("stpersist", Kind::Tap).unwrap();
        assert!(
            !again.created(),
            "an existing device is attached, not created"
        );
        assert_eq!(again.name(), "stpersist");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&again);
        assert_eq!(unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, 0) }, 0);
        drop(again);
        assert!(!exists("stpersist"));
    });
}

fn tun_flags(t: &tun::Tun) -> libc::c_int {
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let fd = std::os::fd::AsRawFd::as_raw_fd(t);
    assert_eq!(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) }, 0);
    unsafe { ifr.ifr_ifru.ifru_flags as libc::c_int }
}

#[test]
fn multi_queue_device() {
    if !is_root() {
        let e = tun::open_queues("stmq0", Kind::Tun, true, 2).expect_err("no root");
        assert!(e.to_string().contains("permission denied"), "{e}");
        return;
    }
    in_private_netns(|| {
        // One queue is the plain device, without IFF_MULTI_QUEUE.
        let one = tun::open_queues("stmq%d", Kind::Tun, true, 1).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(tun_flags(&one[0]) & libc::IFF_MULTI_QUEUE, 0);
        assert!(one[0].offloads().is_some());
        drop(one);

        let qs = tun::open_queues("stmq%d", Kind::Tun, true, 3).unwrap();
        assert_eq!(qs.len(), 3);
        let off = qs[0].offloads();
        assert!(off.is_some());
        for q in &qs {
            assert_eq!(q.name(), "stmq0");
            assert!(q.created());
            assert_eq!(q.offloads(), off);
            assert_ne!(tun_flags(q) & libc::IFF_MULTI_QUEUE, 0);
            let fd = std::os::fd::AsRawFd::as_raw_fd(q);
            assert_eq!(tun::vnet_hdr_len(fd), Some(10));
        }
        // A single-queue open of a multi-queue device is refused, in one line.
        let e = tun::open("stmq0", Kind::Tun).expect_err("flags differ");
        assert!(e.to_string().contains("multi-queue"), "{e}");
        let e = tun::open_queues("stmq1", Kind::Tun, false, 300).expect_err("too many");
        assert!(e.to_string().contains("at most 256"), "{e}");
        // The device lives while any queue is open.
        let mut qs = qs;
        qs.truncate(1);
        assert!(exists("stmq0"));
        drop(qs);
        assert!(!exists("stmq0"));
    });
}
