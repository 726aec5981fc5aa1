//! Counters of the data plane: device totals, per peer and per SA. Atomics, updated relaxed by
//! the data-plane threads and read by snapshots.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::drop::DropReason;
use crate::offload::OffloadDrop;

/// Why the data plane dropped a packet: every ESP reason plus the routing/transport ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    Esp(DropReason),
    /// Outbound: no peer's allowed prefixes contain the inner destination.
    NoRoute,
    /// Outbound: the peer has no current outbound SA (an event tells Python).
    NoSa,
    /// Outbound: the peer has no endpoint yet (datagram transports).
    NoEndpoint,
    /// Inbound: the inner source is outside the sending peer's allowed prefixes.
    Spoofed,
    /// A control message arrived while the control queue to Python was full.
    ControlOverflow,
    /// A datagram did not fit the receive buffer.
    Truncated,
    /// Sending on the transport failed (buffer full, unreachable, ...).
    SendFailed,
    /// Inbound plaintext frame from a connection no peer uses.
    NoPeer,
    /// Outbound: a read from a vnet-header TUN device whose `virtio_net_hdr` or super-packet
    /// headers are malformed ([`crate::offload::OffloadDrop`]).
    BadVnet,
    /// Inbound: a super-packet carried whole (ESP Next Header [`crate::esp::NH_SUPER`]) whose
    /// prefix or headers are refused, by why (`drop_super_*`).
    Super(OffloadDrop),
}

pub const DROP_KINDS: usize = DropReason::ALL.len() + 9 + OffloadDrop::ALL.len();

impl Drop {
    pub const EXTRA: [Drop; 9] = [
        Drop::NoRoute,
        Drop::NoSa,
        Drop::NoEndpoint,
        Drop::Spoofed,
        Drop::ControlOverflow,
        Drop::Truncated,
        Drop::SendFailed,
        Drop::NoPeer,
        Drop::BadVnet,
    ];

    pub fn all() -> impl Iterator<Item = Drop> {
        DropReason::ALL
            .iter()
            .map(|r| Drop::Esp(*r))
            .chain(Drop::EXTRA.iter().copied())
            .chain(OffloadDrop::ALL.iter().map(|o| Drop::Super(*o)))
    }

    pub fn name(self) -> &'static str {
        match self {
            Drop::Esp(r) => r.name(),
            Drop::NoRoute => "no_route",
            Drop::NoSa => "no_sa",
            Drop::NoEndpoint => "no_endpoint",
            Drop::Spoofed => "spoofed",
            Drop::ControlOverflow => "control_overflow",
            Drop::Truncated => "truncated",
            Drop::SendFailed => "send_failed",
            Drop::NoPeer => "no_peer",
            Drop::BadVnet => "bad_vnet",
            Drop::Super(o) => match o {
                OffloadDrop::ShortHeader => "super_short_prefix",
                OffloadDrop::BadGsoType => "super_bad_gso_type",
                OffloadDrop::BadIp => "super_bad_ip",
                OffloadDrop::BadTransport => "super_bad_transport",
                OffloadDrop::BadCsum => "super_bad_csum",
                OffloadDrop::BadGso => "super_bad_gso",
                OffloadDrop::TooManySegments => "super_too_many_segments",
                OffloadDrop::BufferTooSmall => "super_buffer_too_small",
            },
        }
    }

    pub fn index(self) -> usize {
        match self {
            Drop::Esp(r) => r.index(),
            Drop::Super(o) => {
                DropReason::ALL.len()
                    + Drop::EXTRA.len()
                    + OffloadDrop::ALL.iter().position(|d| *d == o).unwrap_or(0)
            }
            other => {
                DropReason::ALL.len() + Drop::EXTRA.iter().position(|d| *d == other).unwrap_or(0)
            }
        }
    }
}

impl From<DropReason> for Drop {
    fn from(r: DropReason) -> Drop {
        Drop::Esp(r)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Traffic counters (device totals, or one peer's).
#[derive(Default)]
#[repr(align(64))]
pub struct Traffic {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub wire_tx_bytes: AtomicU64,
    pub wire_rx_bytes: AtomicU64,
    /// Unix time in milliseconds of the last authenticated inbound packet (0 = never).
    pub last_rx_ms: AtomicU64,
    pub keepalives: AtomicU64,
    /// Authenticated dummy packets (next header 59), discarded.
    pub dummies: AtomicU64,
    pub control_rx: AtomicU64,
    pub control_tx: AtomicU64,
    drops: [AtomicU64; DROP_KINDS],
}

pub fn add(c: &AtomicU64, v: u64) {
    if v != 0 {
        c.fetch_add(v, Relaxed);
    }
}

impl Traffic {
    pub fn drop(&self, d: Drop) {
        self.drops[d.index()].fetch_add(1, Relaxed);
    }
    pub fn drops(&self, d: Drop) -> u64 {
        self.drops[d.index()].load(Relaxed)
    }

    /// `(name, value)` pairs: traffic counters, then `drop_<reason>` for every reason.
    pub fn entries(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = [
            ("tx_packets", &self.tx_packets),
            ("tx_bytes", &self.tx_bytes),
            ("rx_packets", &self.rx_packets),
            ("rx_bytes", &self.rx_bytes),
            ("wire_tx_bytes", &self.wire_tx_bytes),
            ("wire_rx_bytes", &self.wire_rx_bytes),
            ("last_rx_ms", &self.last_rx_ms),
            ("keepalives", &self.keepalives),
            ("dummies", &self.dummies),
            ("control_rx", &self.control_rx),
            ("control_tx", &self.control_tx),
        ]
        .iter()
        .map(|(k, c)| (k.to_string(), c.load(Relaxed)))
        .collect();
        for d in Drop::all() {
            v.push((format!("drop_{}", d.name()), self.drops(d)));
        }
        v
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.entries()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// System-call level counters of the data plane (device totals only): how many bytes each
/// device read and write and each wire datagram moves, the figures offloads change.
#[derive(Default)]
#[repr(align(64))]
pub struct Io {
    /// Reads from the device and the bytes they returned (vnet headers not counted).
    pub dev_reads: AtomicU64,
    pub dev_read_bytes: AtomicU64,
    /// Writes to the device (a coalesced super-packet is one) and their bytes.
    pub dev_writes: AtomicU64,
    pub dev_write_bytes: AtomicU64,
    /// Datagrams sent and received on the transports (each segment of a UDP GSO send or
    /// GRO receive is one).
    pub wire_tx_packets: AtomicU64,
    pub wire_rx_packets: AtomicU64,
    /// Super-packets read from the device (more than one segment).
    pub dev_read_super: AtomicU64,
    /// Super-packets written to the device (coalesced from more than one segment).
    pub dev_write_super: AtomicU64,
    /// TSO super-packets sent whole in one ESP packet to a stream peer that announced it
    /// (each piece of a cut one counts), and received whole.
    pub wire_tx_super: AtomicU64,
    pub wire_rx_super: AtomicU64,
}

impl Io {
    pub fn entries(&self) -> Vec<(String, u64)> {
        [
            ("dev_reads", &self.dev_reads),
            ("dev_read_bytes", &self.dev_read_bytes),
            ("dev_read_super", &self.dev_read_super),
            ("dev_writes", &self.dev_writes),
            ("dev_write_bytes", &self.dev_write_bytes),
            ("dev_write_super", &self.dev_write_super),
            ("wire_tx_packets", &self.wire_tx_packets),
            ("wire_rx_packets", &self.wire_rx_packets),
            ("wire_tx_super", &self.wire_tx_super),
            ("wire_rx_super", &self.wire_rx_super),
        ]
        .iter()
        .map(|(k, c)| (k.to_string(), c.load(Relaxed)))
        .collect()
    }
}
