//! Opening TUN (layer 3) and TAP (layer 2) devices through `/dev/net/tun`.
//!
//! The device is attached with `IFF_NO_PI` (no packet-information header: every read or write
//! is exactly one IP packet or Ethernet frame) and the file descriptor is non-blocking and
//! close-on-exec. A device that did not exist before [`open`] is created by it and, unless made
//! persistent, disappears when the descriptor is closed.

use std::ffi::CStr;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const CLONE_DEVICE: &str = "/dev/net/tun";
/// Longest interface name, in bytes (IFNAMSIZ minus the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Which kind of device: TUN carries IP packets, TAP carries Ethernet frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tun,
    Tap,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tun => "TUN",
            Kind::Tap => "TAP",
        })
    }
}

/// An open TUN/TAP device: the attached descriptor and the device's actual name.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    kind: Kind,
    created: bool,
}

impl Tun {
    /// The interface name the kernel gave the device (resolves patterns such as `tun%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// True when the device did not exist before [`open`]: this descriptor created it.
    pub fn created(&self) -> bool {
        self.created
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Tun {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl From<Tun> for OwnedFd {
    fn from(t: Tun) -> OwnedFd {
        t.fd
    }
}

/// Open (creating if needed) the TUN or TAP device `name`. An empty name or one containing
/// `%d` lets the kernel choose (e.g. `tun%d` → `tun0`).
pub fn open(name: &str, kind: Kind) -> io::Result<Tun> {
    check_name(name)?;
    let existed = !name.is_empty() && !name.contains('%') && interface_exists(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(CLONE_DEVICE)
        .map_err(open_error)?;
    let fd = OwnedFd::from(file);

    // SAFETY: ifreq is plain old data; all-zero is a valid value (empty name, no flags).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    let mode = match kind {
        Kind::Tun => libc::IFF_TUN,
        Kind::Tap => libc::IFF_TAP,
    };
    ifr.ifr_ifru.ifru_flags = (mode | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(attach_error(io::Error::last_os_error(), name, kind));
    }
    // SAFETY: the kernel NUL-terminates the name it writes back (at most IFNAMSIZ - 1 bytes).
    let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) };
    Ok(Tun {
        fd,
        name: actual.to_string_lossy().into_owned(),
        kind,
        created: !existed,
    })
}

/// The kernel's `dev_valid_name` rules, checked here to give a clear message.
fn check_name(name: &str) -> io::Result<()> {
    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: {why}"),
        )
    };
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{} bytes is too long (at most {MAX_NAME_LEN})",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(invalid("'.' and '..' are not allowed".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || *c == '\0')
    {
        return Err(invalid(format!("it may not contain {c:?}")));
    }
    if name.matches('%').count() > 1 || (name.contains('%') && !name.contains("%d")) {
        return Err(invalid("the only pattern allowed is one '%d'".into()));
    }
    Ok(())
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn open_error(e: io::Error) -> io::Error {
    let msg = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => format!(
            "{CLONE_DEVICE}: no such device (load the tun module with 'modprobe tun', or create \
             the node with 'mknod {CLONE_DEVICE} c 10 200')"
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            format!("{CLONE_DEVICE}: permission denied (run as root or with CAP_NET_ADMIN)")
        }
        _ => format!("{CLONE_DEVICE}: {e}"),
    };
    io::Error::new(e.kind(), msg)
}

fn attach_error(e: io::Error, name: &str, kind: Kind) -> io::Error {
    let msg = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{kind} device {name:?}: permission denied (run as root or with CAP_NET_ADMIN, or \
             as the owner of the persistent device)"
        ),
        Some(libc::EBUSY) => {
            format!("{kind} device {name:?} is busy: another process has it open")
        }
        Some(libc::EINVAL) => format!(
            "device {name:?} exists but is not a {kind} device (or was created with \
             incompatible flags, e.g. multi-queue)"
        ),
        _ => format!("{kind} device {name:?}: {e}"),
    };
    io::Error::new(e.kind(), msg)
}
