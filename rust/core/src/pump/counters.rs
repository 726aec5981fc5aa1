//! The pump's counters: atomics shared with readers, updated once per batch (not per packet)
//! from a thread-local tally, each direction on its own cache line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::drop::DropReason;

const REASONS: usize = DropReason::ALL.len();

/// Packets and bytes moved in one direction since the last flush.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub packets: u64,
    /// Inner (device-side) bytes.
    pub bytes: u64,
    /// Stream bytes, length prefixes included.
    pub wire_bytes: u64,
}

impl Tally {
    pub fn packet(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

#[derive(Default)]
#[repr(align(64))]
struct Direction {
    packets: AtomicU64,
    bytes: AtomicU64,
    wire_bytes: AtomicU64,
}

impl Direction {
    fn flush(&self, t: &mut Tally) {
        for (c, v) in [
            (&self.packets, t.packets),
            (&self.bytes, t.bytes),
            (&self.wire_bytes, t.wire_bytes),
        ] {
            if v != 0 {
                c.fetch_add(v, Relaxed);
            }
        }
        *t = Tally::default();
    }
}

#[derive(Default)]
pub(super) struct Counters {
    tx: Direction,
    rx: Direction,
    drops: [AtomicU64; REASONS],
}

impl Counters {
    pub fn flush_tx(&self, t: &mut Tally) {
        self.tx.flush(t);
    }

    pub fn flush_rx(&self, t: &mut Tally) {
        self.rx.flush(t);
    }

    pub fn drop(&self, r: DropReason) {
        self.drops[r.index()].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> PumpStats {
        PumpStats {
            tx_packets: self.tx.packets.load(Relaxed),
            tx_bytes: self.tx.bytes.load(Relaxed),
            rx_packets: self.rx.packets.load(Relaxed),
            rx_bytes: self.rx.bytes.load(Relaxed),
            wire_tx_bytes: self.tx.wire_bytes.load(Relaxed),
            wire_rx_bytes: self.rx.wire_bytes.load(Relaxed),
            drops: std::array::from_fn(|i| self.drops[i].load(Relaxed)),
        }
    }
}

/// A snapshot of the pump's counters. `tx` is device → stream, `rx` stream → device; packet
/// byte counts are inner bytes, `wire_*` count stream bytes including the length prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PumpStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub wire_tx_bytes: u64,
    pub wire_rx_bytes: u64,
    drops: [u64; REASONS],
}

impl PumpStats {
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    /// Sum of all drop counters.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// `(name, value)` for every counter: the six traffic counters, then `drop_<reason>` in
    /// [`DropReason::ALL`] order.
    pub fn entries(&self) -> Vec<(String, u64)> {
        let traffic = [
            ("tx_packets", self.tx_packets),
            ("tx_bytes", self.tx_bytes),
            ("rx_packets", self.rx_packets),
            ("rx_bytes", self.rx_bytes),
            ("wire_tx_bytes", self.wire_tx_bytes),
            ("wire_rx_bytes", self.wire_rx_bytes),
        ];
        traffic
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .chain(
                DropReason::ALL
                    .iter()
                    .map(|r| (format!("drop_{}", r.name()), self.drops(*r))),
            )
            .collect()
    }
}
