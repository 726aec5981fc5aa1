//! simpletun-core: the sans-IO heart of simpletun plus its Linux data plane.
//!
//! Pure modules (no system calls, no allocation per packet, caller-owned buffers):
//! - [`esp`]: RFC 4303 ESP tunnel-mode encapsulation with AES-CBC (RFC 3602) and
//!   HMAC-SHA-256-128 (RFC 4868).
//! - [`cbc_multi`]: multi-buffer AES-CBC encryption (several packets' chains interleaved), used by
//!   [`SecurityAssociation::encap_batch_in_place`].
//! - [`sha256_multi`]: multi-buffer SHA-256 on SHA-NI (two messages' rounds interleaved) and
//!   HMAC-SHA-256 over several messages at once, used by the batched encap and decap.
//! - [`replay`]: the RFC 4303 §3.4.3 anti-replay window as an RFC 6479 bitmap, with ESN inference.
//! - [`frame`]: the 2-byte big-endian length-prefixed framing of the classic simpletun.c.
//! - [`mod@drop`]: the reasons a packet is dropped, shared by every layer's counters.
//! - [`offload`]: `virtio_net_hdr` parsing, TSO/USO segmentation and TCP GRO coalescing for
//!   TUN devices opened with `IFF_VNET_HDR`.
//!
//! OS-facing modules (the only ones that touch file descriptors):
//! - [`tun`]: opening TUN/TAP devices through `/dev/net/tun`.
//! - [`dp`]: data plane v2: one device, many peers, datagram transports (ESP-in-UDP, raw
//!   ESP) with in-memory fakes, an SA table, control messages and events for Python.
//!
//! [`proto`] holds the protocol constants exported to Python.

pub mod cbc_multi;
pub mod crypto;
pub mod dp;
pub mod drop;
pub mod esp;
pub mod frame;
pub mod offload;
pub mod proto;
pub mod replay;
pub mod sha256_multi;
pub mod tun;

pub use drop::DropReason;
pub use esp::{EncapError, SaConfigError, SecurityAssociation};
pub use frame::{encode_frame, FrameDecoder, FrameError};
