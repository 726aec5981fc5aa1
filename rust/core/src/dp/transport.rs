//! The transport interface of the data plane: batches of datagrams to and from endpoints.
//! Implementations: [`super::udp`] (ESP-in-UDP), [`super::rawesp`] (IP protocol 50),
//! [`super::stream`] (framed TCP connections), [`super::fake`] (in memory).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// One received datagram in a receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct Datagram {
    /// Index of the buffer it was received into.
    pub buf: usize,
    /// Where the payload lies in that buffer (e.g. after an outer IPv4 header on raw sockets).
    pub start: usize,
    pub len: usize,
    pub from: SocketAddr,
    /// The datagram was larger than the buffer (the rest is lost).
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// ESP in UDP (RFC 3948): carries ESP, control messages (non-ESP marker) and keepalives.
    Udp,
    /// Plain ESP (IP protocol 50): ESP only; endpoints have port 0.
    RawEsp,
    /// Length-prefixed frames on stream connections (TCP): ESP and control messages.
    Stream,
}

impl TransportKind {
    /// Whether control messages (non-ESP marker) and keepalives travel on it.
    pub fn carries_control(self) -> bool {
        self != TransportKind::RawEsp
    }
}

pub trait Transport: Send + Sync + 'static {
    fn kind(&self) -> TransportKind;
    /// Readable when [`recv_batch`](Self::recv_batch) may return datagrams.
    fn poll_fd(&self) -> RawFd;
    /// Receive what is waiting (up to one datagram per buffer) without blocking; appends to
    /// `out` (nothing appended = nothing waiting).
    fn recv_batch(&self, bufs: &mut [Vec<u8>], out: &mut Vec<Datagram>) -> io::Result<()>;
    /// Send datagrams without blocking for long; returns how many were sent.
    fn send_batch(&self, pkts: &[(&[u8], SocketAddr)]) -> usize;
    /// Whether control messages and keepalives are accepted from it (its kind's default; a
    /// stream transport whose handshake is done before the data plane starts refuses them).
    fn carries_control(&self) -> bool {
        self.kind().carries_control()
    }
    /// Largest payload (ESP packet, or inner packet in plaintext mode) one send carries; the
    /// data plane drops larger packets as `oversize` before spending a sequence number.
    fn max_payload(&self) -> usize {
        super::MAX_PACKET
    }
    /// Datagrams are raw inner packets, not ESP (the stream transport's plaintext mode).
    fn plaintext(&self) -> bool {
        false
    }
    /// Some destination cannot take more now: the device thread should wait in
    /// [`wait_room`](Self::wait_room) instead of reading more packets (backpressure).
    fn congested(&self) -> bool {
        false
    }
    /// Wait (at most `timeout_ms`, or until `stop_fd` is readable) for room, and send what
    /// is waiting.
    fn wait_room(&self, _stop_fd: RawFd, _timeout_ms: i32) {}
    /// Connections that ended since the last call, with why (stream transports).
    fn take_closed(&self) -> Vec<(SocketAddr, String)> {
        Vec::new()
    }
}
