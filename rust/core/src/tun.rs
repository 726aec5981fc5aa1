//! Opening TUN (layer 3) and TAP (layer 2) devices through `/dev/net/tun`.
//!
//! The device is attached with `IFF_NO_PI` (no packet-information header: every read or write
//! is exactly one IP packet or Ethernet frame) and the file descriptor is non-blocking and
//! close-on-exec. A device that did not exist before [`open`] is created by it and, unless made
//! persistent, disappears when the descriptor is closed.
//!
//! [`open_queues`] opens a multi-queue device (`IFF_MULTI_QUEUE`): one descriptor per queue,
//! each attached with its own `TUNSETIFF`. The kernel picks the queue a packet is read from
//! by its flow hash, so one flow's packets come from one queue, in order; a write on any
//! queue is received alike. The device goes when its last queue is closed.

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
    offloads: Option<Offloads>,
}

/// What a TUN device opened with [`open_offload`] accepted from `TUNSETOFFLOAD`: every read
/// and write then starts with a `virtio_net_hdr` ([`crate::offload`]), and the kernel hands
/// over TCP (`tso`) / UDP (`uso`) super-packets of up to 64 KiB and packets whose transport
/// checksum is left to us (`csum`) as far as these allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    pub csum: bool,
    pub tso: bool,
    pub uso: bool,
}

impl fmt::Display for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = [(self.csum, "csum"), (self.tso, "tso"), (self.uso, "uso")]
            .iter()
            .filter(|(b, _)| *b)
            .map(|(_, n)| *n)
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join("+"))
        }
    }
}

/// `TUNSETOFFLOAD` sets tried in turn, most first: kernels before 6.2 refuse USO (EINVAL).
const OFFLOAD_SETS: [(libc::c_uint, Offloads); 4] = [
    (
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6,
        Offloads {
            csum: true,
            tso: true,
            uso: true,
        },
    ),
    (
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
        Offloads {
            csum: true,
            tso: true,
            uso: false,
        },
    ),
    (
        libc::TUN_F_CSUM,
        Offloads {
            csum: true,
            tso: false,
            uso: false,
        },
    ),
    (
        0,
        Offloads {
            csum: false,
            tso: false,
            uso: false,
        },
    ),
];

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

    /// The offloads in use when opened with [`open_offload`] (reads and writes then carry a
    /// vnet header, even if the kernel refused every offload); `None` otherwise.
    pub fn offloads(&self) -> Option<Offloads> {
        self.offloads
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
    open_flags(name, kind, false, false)
}

/// Open (creating if needed) the TUN device `name` with `IFF_VNET_HDR` and as many offloads
/// as the kernel accepts (see [`Tun::offloads`]). For TAP devices this is [`open`].
pub fn open_offload(name: &str, kind: Kind) -> io::Result<Tun> {
    open_flags(name, kind, kind == Kind::Tun, false)
}

/// Most queues [`open_queues`] opens (the kernel's `MAX_TAP_QUEUES` is 256).
pub const MAX_QUEUES: usize = 256;

/// Open (creating if needed) the TUN or TAP device `name` with `queues` queues: one
/// descriptor each, in queue order. One queue is [`open`] / [`open_offload`] (`offload`, TUN
/// only) exactly, without `IFF_MULTI_QUEUE`; more open the device with `IFF_MULTI_QUEUE`
/// (a pre-existing single-queue device refuses that: `EINVAL`), all with the same flags and
/// offloads. `Tun::created` of every queue says whether the first one created the device.
pub fn open_queues(name: &str, kind: Kind, offload: bool, queues: usize) -> io::Result<Vec<Tun>> {
    let vnet = offload && kind == Kind::Tun;
    if queues <= 1 {
        return Ok(vec![open_flags(name, kind, vnet, false)?]);
    }
    if queues > MAX_QUEUES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{queues} queues asked for; a TUN/TAP device has at most {MAX_QUEUES}"),
        ));
    }
    let first = open_flags(name, kind, vnet, true)?;
    let mut v = Vec::with_capacity(queues);
    for _ in 1..queues {
        // Later queues attach to the device the first one named (a `%d` pattern resolved);
        // TUNSETOFFLOAD is device-wide, set once by the first.
        let mut t = open_flags_only(first.name(), kind, vnet, true)?;
        t.created = first.created;
        t.offloads = first.offloads;
        v.push(t);
    }
    v.insert(0, first);
    Ok(v)
}

fn open_flags(name: &str, kind: Kind, vnet: bool, multi: bool) -> io::Result<Tun> {
    let mut t = open_flags_only(name, kind, vnet, multi)?;
    if vnet {
        t.offloads = Some(set_offloads(t.fd.as_raw_fd()));
    }
    Ok(t)
}

/// Attach a new descriptor to `name` (creating it) with these flags; no offloads set.
fn open_flags_only(name: &str, kind: Kind, vnet: bool, multi: bool) -> io::Result<Tun> {
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
    let vnet_flag = if vnet { libc::IFF_VNET_HDR } else { 0 };
    let multi_flag = if multi { libc::IFF_MULTI_QUEUE } else { 0 };
    ifr.ifr_ifru.ifru_flags = (mode | libc::IFF_NO_PI | vnet_flag | multi_flag) as libc::c_short;
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
        offloads: None,
    })
}

/// Ask for the largest offload set the kernel accepts (the last, none, always is).
fn set_offloads(fd: RawFd) -> Offloads {
    for (flags, o) in OFFLOAD_SETS {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) } == 0 {
            return o;
        }
    }
    Offloads::default()
}

/// The vnet header size of the TUN descriptor `fd` if it was opened with `IFF_VNET_HDR`,
/// else `None` (also for descriptors that are no TUN device).
pub fn vnet_hdr_len(fd: RawFd) -> Option<usize> {
    // SAFETY: ifreq is plain old data; TUNGETIFF writes one, which outlives the call.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
        return None;
    }
    // SAFETY: TUNGETIFF set the flags member.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as libc::c_int;
    if flags & libc::IFF_VNET_HDR == 0 {
        return None;
    }
    let mut sz: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int.
    if unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ, &mut sz) } < 0 {
        return None;
    }
    usize::try_from(sz).ok()
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
