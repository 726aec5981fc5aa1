//! Why a packet was dropped. Every layer counts drops under one of these reasons.

use std::fmt;

/// The reason an inbound (or outbound) packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The packet or frame is too short, too long, or not a whole number of cipher blocks.
    BadLength,
    /// The ICV did not verify (wrong key, corruption, forgery).
    Auth,
    /// The sequence number was already seen or is left of the replay window.
    Replay,
    /// No security association for the packet's SPI.
    UnknownSpi,
    /// The decrypted trailer is invalid: padding bytes, pad length or next header.
    BadPadding,
    /// The inner packet is not what this tunnel carries (e.g. an IPv6 packet with next header 4).
    BadInner,
    /// A frame's length prefix exceeds the configured maximum frame size.
    Oversize,
    /// A control frame (SPI 0) arrived where only data frames are expected.
    Control,
    /// The outbound sequence number space is exhausted; the SA must be rekeyed.
    SeqExhausted,
    /// Writing the packet to the local device failed.
    DeviceWrite,
}

impl DropReason {
    /// All reasons, in a stable order (used to build counter tables).
    pub const ALL: [DropReason; 10] = [
        DropReason::BadLength,
        DropReason::Auth,
        DropReason::Replay,
        DropReason::UnknownSpi,
        DropReason::BadPadding,
        DropReason::BadInner,
        DropReason::Oversize,
        DropReason::Control,
        DropReason::SeqExhausted,
        DropReason::DeviceWrite,
    ];

    /// Stable snake_case name, used as the counter key `drop_<name>`.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadLength => "bad_length",
            DropReason::Auth => "auth",
            DropReason::Replay => "replay",
            DropReason::UnknownSpi => "unknown_spi",
            DropReason::BadPadding => "bad_padding",
            DropReason::BadInner => "bad_inner",
            DropReason::Oversize => "oversize",
            DropReason::Control => "control",
            DropReason::SeqExhausted => "seq_exhausted",
            DropReason::DeviceWrite => "device_write",
        }
    }

    /// Index into [`DropReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DropReason::BadLength => "malformed packet: bad length",
            DropReason::Auth => "authentication failed: ICV mismatch",
            DropReason::Replay => "replayed or too old sequence number",
            DropReason::UnknownSpi => "unknown SPI",
            DropReason::BadPadding => "malformed packet: invalid padding or trailer",
            DropReason::BadInner => "malformed packet: inner packet does not match next header",
            DropReason::Oversize => "frame larger than the maximum frame size",
            DropReason::Control => "unexpected control frame",
            DropReason::SeqExhausted => "sequence number space exhausted",
            DropReason::DeviceWrite => "device write failed",
        };
        f.write_str(s)
    }
}

/// Per-reason drop counters (plain integers; the pump keeps atomic ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    pub fn bump(&mut self, r: DropReason) {
        self.0[r.index()] += 1;
    }
    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r.index()]
    }
    /// `(name, count)` for every reason, in [`DropReason::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), self.0[r.index()]))
    }
}
