//! Data plane v2: one device, many peers, datagram transports, an SA table.
//!
//! - A [`Device`] (TUN/TAP or [`device::FakeDevice`]) and any number of [`Transport`]s
//!   ([`udp::UdpTransport`] ESP-in-UDP, [`rawesp::RawEspTransport`] plain ESP,
//!   [`fake::FakeSocket`] in memory).
//! - Peers, each on one transport, with allowed inner prefixes: outbound packets pick their
//!   peer by longest-prefix match on the inner destination; inbound packets whose inner source
//!   is outside the sending peer's prefixes are dropped (`spoofed`). TAP devices have one peer.
//! - The SA table: inbound SPI → SA (→ peer); per peer one current outbound SA. Installing and
//!   removing SAs while traffic flows is safe; a removed inbound SA may stay valid for a grace
//!   period (rekey without loss). Removed SAs are wiped ([`zero::Zeroizing`]).
//! - Endpoints: a peer's endpoint follows the source of its latest authenticated packet.
//! - Control path: datagrams with the non-ESP marker, and events ("no SA", "SA near its
//!   limit"), go to a bounded queue with a readable eventfd; Python sends control datagrams
//!   through [`DataPlane::send_control`].
//!
//! Threads: one per device queue reads it (encapsulate, route, batch-send per transport; a
//! multi-queue TUN device, [`DataPlane::start_queues`], has several), one per transport
//! receives (classify, decapsulate, check, write to the device). Each takes the table's read
//! lock once per batch; configuration changes take the write lock between batches. Device
//! threads share a peer's outbound SA: each reserves its batch's sequence numbers under the
//! peer's lock and encrypts outside it ([`SecurityAssociation::reserve_tx`]).

pub mod counters;
pub mod device;
pub mod fake;
pub mod gso;
pub mod rawesp;
pub mod route;
pub mod stream;
mod sys;
pub mod transport;
pub mod udp;
pub mod zero;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use counters::{Drop, Io, Traffic};
pub use device::{Device, FakeDevice, TunDevice};
pub use route::Prefix;
pub use transport::{Datagram, Transport, TransportKind};

use crate::drop::DropReason;
use crate::esp::{
    encap_len, infer_next_header, PreIcv, SaStats, SecurityAssociation, TxCounters, MAX_OVERHEAD,
    NH_ETHERNET, NH_IPV4, NH_IPV6, NH_NONE, NH_SUPER, PAYLOAD_OFFSET,
};
use crate::offload::{self, Gro, GroOut, Super, VnetHdr, SUPER_PREFIX_LEN};
use crate::proto::{NAT_KEEPALIVE, NON_ESP_MARKER};
use crate::tun::Kind;
use counters::{add, now_ms};
use route::{flow_hash, inner_addrs, RouteTable};
use zero::Zeroizing;

/// Packets per batch (device reads per send, datagrams per `recvmmsg`).
pub const BATCH: usize = 64;
/// Largest packet handled (inner or datagram).
pub const MAX_PACKET: usize = 65535;
/// Room left in front of each device packet for the ESP header.
pub const HEADROOM: usize = PAYLOAD_OFFSET;
const BUF_LEN: usize = HEADROOM + MAX_PACKET + 64;
/// Poll timeout of the threads (expiry sweeps happen at least this often).
const TICK_MS: i32 = 100;

/// Something the control plane must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A datagram starting with the non-ESP marker (the marker included in `payload`).
    Control {
        transport: usize,
        from: SocketAddr,
        payload: Vec<u8>,
    },
    /// An outbound packet for `peer` was dropped because it has no outbound SA (reported once
    /// until one is installed).
    NoSa { peer: u32 },
    /// A stream connection ended (peer closed or reset it, socket error), with why.
    Closed {
        transport: usize,
        endpoint: SocketAddr,
        reason: String,
    },
    /// The outbound SA `spi` of `peer` passed the soft sequence-number or byte limit (once).
    SaLimit {
        peer: u32,
        spi: u32,
        seq: u64,
        bytes: u64,
    },
}

/// Limits of the data plane.
#[derive(Debug, Clone)]
pub struct DpConfig {
    /// Outbound SA sequence number at which [`Event::SaLimit`] fires.
    pub soft_seq: u64,
    /// Outbound SA inner bytes at which [`Event::SaLimit`] fires.
    pub soft_bytes: u64,
    /// Most events held for the control plane; more are dropped and counted.
    pub queue_len: usize,
}

impl Default for DpConfig {
    fn default() -> DpConfig {
        DpConfig {
            soft_seq: (u32::MAX as u64) - (1 << 24),
            soft_bytes: 1 << 40,
            queue_len: 1024,
        }
    }
}

/// A configuration mistake (the caller's input), with a message saying how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpError(pub String);

impl fmt::Display for DpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for DpError {}

fn err<T>(msg: impl Into<String>) -> Result<T, DpError> {
    Err(DpError(msg.into()))
}

struct OutSa {
    /// The keys, only read once installed: device threads encrypt with them outside the
    /// peer's lock (a replaced SA is wiped when the last batch using it is done).
    sa: Arc<Zeroizing<SecurityAssociation>>,
    /// Sequence numbers and IVs handed out, and the SA's counters.
    tx: TxCounters,
    warned: bool,
    /// This SA's soft limits (at most the data plane's).
    soft_seq: u64,
    soft_bytes: u64,
}

struct Peer {
    id: u32,
    transport: usize,
    allowed: Vec<Prefix>,
    endpoint: Mutex<Option<SocketAddr>>,
    out: Mutex<Option<OutSa>>,
    no_sa_reported: AtomicBool,
    /// Both ends announced super-packets: TCP TSO super-packets for it travel whole, one ESP
    /// packet each (stream transports only; [`DataPlane::set_peer_super`]).
    whole: AtomicBool,
    traffic: Traffic,
}

struct InSa {
    peer: Arc<Peer>,
    sa: Mutex<Zeroizing<SecurityAssociation>>,
    /// Set when removed with a grace period: valid until then.
    expires: Mutex<Option<Instant>>,
    last_rx_ms: AtomicU64,
}

#[derive(Default)]
struct Tables {
    peers: HashMap<u32, Arc<Peer>>,
    routes: RouteTable,
    inbound: HashMap<u32, Arc<InSa>>,
    transports: Vec<Arc<dyn Transport>>,
    next_peer: u32,
}

struct Queue {
    q: Mutex<VecDeque<Event>>,
    fd: OwnedFd,
    cap: usize,
}

impl Queue {
    fn push(&self, e: Event) -> bool {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.cap {
            return false;
        }
        q.push_back(e);
        sys::signal(&self.fd);
        true
    }
    fn take(&self, max: usize) -> Vec<Event> {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len().min(max);
        let v: Vec<Event> = q.drain(..n).collect();
        if q.is_empty() {
            sys::clear(&self.fd);
        }
        v
    }
}

struct Inner {
    /// Queue 0 of the device (its kind, header size; every write when it has one queue).
    device: Arc<dyn Device>,
    /// Every queue of the device (`queues[0]` is `device`), one device thread each.
    queues: Vec<Arc<dyn Device>>,
    /// Reads per queue (their sum is `io.dev_reads`).
    queue_reads: Vec<AtomicU64>,
    /// Per queue: the device side's state, once its thread runs ([`TxState`]).
    tx: Vec<Mutex<Option<TxState>>>,
    config: DpConfig,
    tables: RwLock<Tables>,
    totals: Traffic,
    io: Io,
    events: Queue,
    stopping: AtomicBool,
    stop_fd: OwnedFd,
    done_fd: OwnedFd,
    live: AtomicU64,
    exit: OnceLock<String>,
    expiring: AtomicBool,
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|e| e.into_inner())
    }
    /// The queue an inner packet is written to: with several TUN queues the one its flow
    /// hashes to. The kernel's TUN remembers the queue a flow was last written on and reads
    /// the flow's outgoing packets from that queue, so this spreads both directions of the
    /// flows over the queues (always writing one queue would pull every flow onto it).
    #[inline]
    fn write_queue(&self, pkt: &[u8]) -> &dyn Device {
        let n = self.queues.len();
        if n == 1 || self.device.kind() == Kind::Tap {
            return &*self.device;
        }
        &*self.queues[route::pick(flow_hash(pkt), n)]
    }
    fn end(&self, why: String) {
        let _ = self.exit.set(why);
        self.stopping.store(true, Ordering::Relaxed);
        sys::signal(&self.stop_fd);
    }
    fn drop_pkt(&self, peer: Option<&Peer>, d: Drop) {
        self.totals.drop(d);
        if let Some(p) = peer {
            p.traffic.drop(d);
        }
    }
    fn event(&self, e: Event) {
        if !self.events.push(e) {
            self.totals.drop(Drop::ControlOverflow);
        }
    }
    /// Forget inbound SAs whose grace period is over (they are wiped when the last batch
    /// using them is done).
    fn sweep(&self) {
        if !self.expiring.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut t = self.write();
        t.inbound
            .retain(|_, s| !lock(&s.expires).is_some_and(|e| e <= now));
        let more = t.inbound.values().any(|s| lock(&s.expires).is_some());
        self.expiring.store(more, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Snapshot of one SA's counters.
#[derive(Debug, Clone)]
pub struct SaInfo {
    pub spi: u32,
    pub peer: u32,
    pub inbound: bool,
    pub stats: SaStats,
    pub tx_seq: u64,
    pub rx_highest_seq: u64,
    pub last_rx_ms: u64,
    /// Inbound SA removed with a grace period that has not ended yet.
    pub expiring: bool,
}

/// A running data plane. Dropping it stops it.
pub struct DataPlane {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl DataPlane {
    /// Start the data plane on `device` (its device thread starts at once).
    pub fn start(device: Arc<dyn Device>, config: DpConfig) -> io::Result<DataPlane> {
        DataPlane::start_queues(vec![device], config)
    }

    /// Start the data plane on the queues of one multi-queue device (`IFF_MULTI_QUEUE`,
    /// [`crate::tun::open_queues`]), one device thread per queue (all at once). Every queue
    /// must be of the same kind and vnet header size. Each received packet is written to the
    /// queue its flow hashes to (so the kernel reads the flow's replies from that queue).
    pub fn start_queues(queues: Vec<Arc<dyn Device>>, config: DpConfig) -> io::Result<DataPlane> {
        let Some(first) = queues.first().cloned() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a data plane needs at least one device queue",
            ));
        };
        if queues
            .iter()
            .any(|q| q.kind() != first.kind() || q.vnet_hdr_len() != first.vnet_hdr_len())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the queues of one device differ in kind (TUN/TAP) or vnet header size; open them together (tun::open_queues)",
            ));
        }
        let n = queues.len();
        let dp = DataPlane::new(queues, config)?;
        for q in 0..n {
            let name = if q == 0 {
                "simpletun-dev".to_string()
            } else {
                format!("simpletun-dev{q}")
            };
            dp.spawn(&name, move |inner| device_loop(inner, q))?;
        }
        Ok(dp)
    }

    /// A data plane whose threads are never started: datagrams are fed with
    /// [`receive`](Self::receive) (fuzzing and deterministic tests).
    #[doc(hidden)]
    pub fn without_threads(device: Arc<dyn Device>, config: DpConfig) -> io::Result<DataPlane> {
        DataPlane::new(vec![device], config)
    }

    fn new(queues: Vec<Arc<dyn Device>>, config: DpConfig) -> io::Result<DataPlane> {
        let inner = Arc::new(Inner {
            device: queues[0].clone(),
            queue_reads: queues.iter().map(|_| AtomicU64::new(0)).collect(),
            tx: queues.iter().map(|_| Mutex::new(None)).collect(),
            queues,
            events: Queue {
                q: Mutex::new(VecDeque::new()),
                fd: sys::eventfd()?,
                cap: config.queue_len.max(1),
            },
            config,
            tables: RwLock::new(Tables::default()),
            totals: Traffic::default(),
            io: Io::default(),
            stopping: AtomicBool::new(false),
            stop_fd: sys::eventfd()?,
            done_fd: sys::eventfd()?,
            live: AtomicU64::new(0),
            exit: OnceLock::new(),
            expiring: AtomicBool::new(false),
        });
        Ok(DataPlane {
            inner,
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Register a transport without its receive thread (see [`without_threads`](Self::without_threads)).
    #[doc(hidden)]
    pub fn add_transport_without_thread(&self, t: Arc<dyn Transport>) -> usize {
        let mut tables = self.inner.write();
        tables.transports.push(t);
        tables.transports.len() - 1
    }

    /// Handle one datagram as if transport `transport` had received it from `from`.
    #[doc(hidden)]
    pub fn receive(&self, transport: usize, from: SocketAddr, data: &mut [u8]) {
        let t = self.inner.read();
        let Some(udp) = t.transports.get(transport).map(|tr| tr.carries_control()) else {
            return;
        };
        let got = receive_one(
            &self.inner,
            &t,
            transport,
            udp,
            data,
            from,
            false,
            (now_ms(), Instant::now()),
            None,
        );
        if let Some((peer, r, whole)) = got {
            to_device(&self.inner, None, &[(peer, &data[r], whole)]);
        }
    }

    fn spawn(
        &self,
        name: &str,
        body: impl FnOnce(&Inner) -> String + Send + 'static,
    ) -> io::Result<()> {
        let inner = self.inner.clone();
        inner.live.fetch_add(1, Ordering::AcqRel);
        let h = thread::Builder::new().name(name.into()).spawn(move || {
            let why = panic::catch_unwind(AssertUnwindSafe(|| body(&inner)))
                .unwrap_or_else(|_| "internal error: a data-plane thread panicked".into());
            inner.end(why);
            if inner.live.fetch_sub(1, Ordering::AcqRel) == 1 {
                sys::signal(&inner.done_fd);
            }
        });
        match h {
            Ok(h) => {
                lock(&self.threads).push(h);
                Ok(())
            }
            Err(e) => {
                self.inner.live.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Add a transport (its receive thread starts at once); returns its id.
    pub fn add_transport(&self, t: Arc<dyn Transport>) -> io::Result<usize> {
        let id = {
            let mut tables = self.inner.write();
            tables.transports.push(t.clone());
            tables.transports.len() - 1
        };
        self.spawn(&format!("simpletun-rx{id}"), move |inner| {
            transport_loop(inner, id, t)
        })?;
        Ok(id)
    }

    /// Add a peer on transport `transport` allowed to use `allowed` inner prefixes, with an
    /// initial endpoint (`None`: learnt from its first authenticated packet).
    pub fn add_peer(
        &self,
        transport: usize,
        allowed: &[Prefix],
        endpoint: Option<SocketAddr>,
    ) -> Result<u32, DpError> {
        let mut t = self.inner.write();
        if transport >= t.transports.len() {
            return err(format!(
                "no transport {transport}; add the transport before its peers"
            ));
        }
        if self.inner.device.kind() == Kind::Tap && !t.peers.is_empty() {
            return err("a TAP device carries Ethernet frames for exactly one peer; use a TUN device (-u) for several peers, or one TAP device per peer");
        }
        for p in allowed {
            if let Some(owner) = t.routes.owner(p) {
                return err(format!("prefix {p} is already allowed for peer {owner}; each prefix belongs to one peer"));
            }
        }
        let id = t.next_peer;
        t.next_peer += 1;
        for p in allowed {
            t.routes.insert(*p, id);
        }
        t.peers.insert(
            id,
            Arc::new(Peer {
                id,
                transport,
                allowed: allowed.to_vec(),
                endpoint: Mutex::new(endpoint),
                out: Mutex::new(None),
                no_sa_reported: AtomicBool::new(false),
                whole: AtomicBool::new(false),
                traffic: Traffic::default(),
            }),
        );
        Ok(id)
    }

    /// Remove a peer and all its SAs (wiped).
    pub fn remove_peer(&self, peer: u32) -> Result<(), DpError> {
        let mut t = self.inner.write();
        let Some(p) = t.peers.remove(&peer) else {
            return err(format!("no peer {peer}"));
        };
        t.routes.remove_peer(peer);
        t.inbound.retain(|_, s| s.peer.id != peer);
        lock(&p.out).take();
        Ok(())
    }

    fn peer(&self, peer: u32) -> Result<Arc<Peer>, DpError> {
        match self.inner.read().peers.get(&peer) {
            Some(p) => Ok(p.clone()),
            None => err(format!("no peer {peer}")),
        }
    }

    pub fn set_endpoint(&self, peer: u32, ep: Option<SocketAddr>) -> Result<(), DpError> {
        *lock(&self.peer(peer)?.endpoint) = ep;
        Ok(())
    }

    /// Whether TCP TSO super-packets read from a vnet-header device for `peer` are sent whole,
    /// one ESP packet each (Next Header [`NH_SUPER`]), instead of as MTU-sized segments: set
    /// when both ends announced it in the handshake. Only for peers on an ESP stream
    /// transport (a frame holds up to 64 KiB; a datagram would be fragmented). Receiving such
    /// packets needs no flag (they are validated like any header from our own TUN).
    pub fn set_peer_super(&self, peer: u32, on: bool) -> Result<(), DpError> {
        let p = self.peer(peer)?;
        if on {
            let ok = self
                .transport(p.transport)
                .is_ok_and(|t| t.kind() == TransportKind::Stream && !t.plaintext());
            if !ok {
                return err(format!(
                    "peer {peer}: super-packets travel whole on ESP stream (TCP) transports only"
                ));
            }
        }
        p.whole.store(on, Ordering::Relaxed);
        Ok(())
    }

    pub fn endpoint(&self, peer: u32) -> Result<Option<SocketAddr>, DpError> {
        Ok(*lock(&self.peer(peer)?.endpoint))
    }

    /// Install an inbound SA for `peer` (keyed by its SPI, which must be unused).
    pub fn add_inbound_sa(&self, peer: u32, sa: SecurityAssociation) -> Result<(), DpError> {
        let mut t = self.inner.write();
        let Some(p) = t.peers.get(&peer).cloned() else {
            return err(format!("no peer {peer}"));
        };
        let spi = sa.spi();
        if t.inbound.contains_key(&spi) {
            return err(format!(
                "inbound SPI {spi:#x} is already installed; remove it first or pick another"
            ));
        }
        t.inbound.insert(
            spi,
            Arc::new(InSa {
                peer: p,
                sa: Mutex::new(Zeroizing::new(sa)),
                expires: Mutex::new(None),
                last_rx_ms: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Remove inbound SA `spi`, at once (`grace` zero) or once `grace` has passed.
    pub fn remove_inbound_sa(&self, spi: u32, grace: Duration) -> Result<(), DpError> {
        let mut t = self.inner.write();
        if grace.is_zero() {
            return match t.inbound.remove(&spi) {
                Some(_) => Ok(()),
                None => err(format!("no inbound SA with SPI {spi:#x}")),
            };
        }
        match t.inbound.get(&spi) {
            Some(s) => {
                *lock(&s.expires) = Some(Instant::now() + grace);
                self.inner.expiring.store(true, Ordering::Relaxed);
                Ok(())
            }
            None => err(format!("no inbound SA with SPI {spi:#x}")),
        }
    }

    /// Make `sa` the current outbound SA of `peer` (the previous one is wiped); `None` removes it.
    pub fn set_outbound_sa(
        &self,
        peer: u32,
        sa: Option<SecurityAssociation>,
    ) -> Result<(), DpError> {
        self.set_outbound_sa_with_limits(peer, sa, None, None)
    }

    /// [`set_outbound_sa`](Self::set_outbound_sa) with this SA's own soft limits: the
    /// sequence number (packets sent) and inner bytes at which [`Event::SaLimit`] fires; each
    /// is at most the data plane's own ([`DpConfig`]), which also applies when `None`.
    pub fn set_outbound_sa_with_limits(
        &self,
        peer: u32,
        sa: Option<SecurityAssociation>,
        soft_seq: Option<u64>,
        soft_bytes: Option<u64>,
    ) -> Result<(), DpError> {
        let p = self.peer(peer)?;
        let c = &self.inner.config;
        let new = sa.map(|sa| OutSa {
            tx: sa.tx_counters(),
            sa: Arc::new(Zeroizing::new(sa)),
            warned: false,
            soft_seq: soft_seq.map_or(c.soft_seq, |v| v.min(c.soft_seq)),
            soft_bytes: soft_bytes.map_or(c.soft_bytes, |v| v.min(c.soft_bytes)),
        });
        let has = new.is_some();
        let old = std::mem::replace(&mut *lock(&p.out), new);
        if has {
            p.no_sa_reported.store(false, Ordering::Relaxed);
        }
        drop(old);
        Ok(())
    }

    /// Send one control message (it must start with the non-ESP marker) on a UDP or stream
    /// transport.
    pub fn send_control(
        &self,
        transport: usize,
        to: SocketAddr,
        payload: &[u8],
    ) -> Result<(), DpError> {
        if payload.len() < 5 || payload[..4] != NON_ESP_MARKER || payload.len() > MAX_PACKET {
            return err("a control message starts with the 4-byte non-ESP marker and a type byte, at most 65535 bytes");
        }
        let t = self.transport(transport)?;
        if !t.carries_control() {
            return err(
                "control messages travel on UDP and stream transports only (raw ESP carries ESP alone)",
            );
        }
        if t.send_batch(&[(payload, to)]) == 1 {
            add(&self.inner.totals.control_tx, 1);
            Ok(())
        } else {
            err(format!("sending the control message to {to} failed"))
        }
    }

    /// Send a NAT keepalive (one 0xFF byte) on a UDP transport.
    pub fn send_keepalive(&self, transport: usize, to: SocketAddr) -> Result<(), DpError> {
        let t = self.transport(transport)?;
        t.send_batch(&[(&[NAT_KEEPALIVE], to)]);
        Ok(())
    }

    fn transport(&self, id: usize) -> Result<Arc<dyn Transport>, DpError> {
        match self.inner.read().transports.get(id) {
            Some(t) => Ok(t.clone()),
            None => err(format!("no transport {id}")),
        }
    }

    /// Readable while events are waiting (never read it; [`take_events`](Self::take_events)).
    pub fn events_fd(&self) -> RawFd {
        self.inner.events.fd.as_raw_fd()
    }

    pub fn take_events(&self, max: usize) -> Vec<Event> {
        self.inner.events.take(max)
    }

    pub fn totals(&self) -> &Traffic {
        &self.inner.totals
    }

    /// Device and wire system-call counters (bytes per device read / write / datagram).
    pub fn io(&self) -> &Io {
        &self.inner.io
    }

    /// Reads from each device queue (one entry per queue; their sum is `io().dev_reads`).
    pub fn queue_reads(&self) -> Vec<u64> {
        self.inner
            .queue_reads
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The size of the vnet header on the device's packets (0: a device without offloads).
    pub fn vnet_hdr_len(&self) -> usize {
        self.inner.device.vnet_hdr_len()
    }

    pub fn peer_stats(&self, peer: u32) -> Result<Vec<(String, u64)>, DpError> {
        Ok(self.peer(peer)?.traffic.entries())
    }

    pub fn peers(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.inner.read().peers.keys().copied().collect();
        v.sort();
        v
    }

    /// Every installed SA (inbound, and each peer's current outbound).
    pub fn sas(&self) -> Vec<SaInfo> {
        let t = self.inner.read();
        let mut v = Vec::new();
        for (spi, s) in &t.inbound {
            let sa = lock(&s.sa);
            v.push(SaInfo {
                spi: *spi,
                peer: s.peer.id,
                inbound: true,
                stats: sa.stats().clone(),
                tx_seq: sa.tx_seq(),
                rx_highest_seq: sa.rx_highest_seq(),
                last_rx_ms: s.last_rx_ms.load(Ordering::Relaxed),
                expiring: lock(&s.expires).is_some(),
            });
        }
        for p in t.peers.values() {
            if let Some(o) = lock(&p.out).as_ref() {
                v.push(SaInfo {
                    spi: o.sa.spi(),
                    peer: p.id,
                    inbound: false,
                    stats: o.tx.stats().clone(),
                    tx_seq: o.tx.seq(),
                    rx_highest_seq: 0,
                    last_rx_ms: 0,
                    expiring: false,
                });
            }
        }
        v.sort_by_key(|s| (s.peer, !s.inbound, s.spi));
        v
    }

    /// Readable once every thread has ended.
    pub fn done_fd(&self) -> RawFd {
        self.inner.done_fd.as_raw_fd()
    }

    pub fn running(&self) -> bool {
        self.inner.live.load(Ordering::Acquire) > 0
    }

    pub fn exit_reason(&self) -> Option<String> {
        if self.running() {
            None
        } else {
            self.inner.exit.get().cloned()
        }
    }

    /// Stop every thread and wait for them; idempotent.
    pub fn stop(&self) {
        self.inner.end("stopped".into());
        let hs: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for h in hs {
            let _ = h.join();
        }
        // Release the transports (their sockets), peers and SAs (keys wiped) now rather than
        // when the last reference to the data plane goes: a tunnel restarted on a recreated
        // device binds the same port again at once.
        let mut t = self.inner.write();
        t.peers.clear();
        t.inbound.clear();
        t.transports.clear();
    }
}

impl std::ops::Drop for DataPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bufs() -> Vec<Vec<u8>> {
    (0..BATCH).map(|_| vec![0u8; BUF_LEN]).collect()
}

/// (buffer, start, wire length, inner length, transport, endpoint, inner segments) of a
/// batch's packets (a super-packet sent whole counts as its segments, and their bytes).
type Out = (usize, usize, usize, usize, usize, SocketAddr, u64);

/// Route and encapsulate the inner packets at `bufs[j][HEADROOM..HEADROOM + lens[j]]`, one
/// packet or the segments of one super-packet (same addresses, so routed once by the first),
/// buffer `first + j` of the batch; appends what to send to `out` (what is dropped is
/// counted). The segments of a super-packet are encapsulated together, their CBC chains
/// interleaved (`encap_batch_in_place`).
///
/// With `whole` the buffers hold TCP super-packets (or pieces of them, [`offload::cut_from`])
/// for one peer to send whole, `whole[j]` the layout of buffer `j`'s: each a
/// [`SUPER_PREFIX_LEN`]-byte prefix and the IP packet, encapsulated together (several
/// super-packets fill the CBC lanes) with Next Header [`NH_SUPER`] and counted as the
/// segments they stand for.
#[allow(clippy::too_many_arguments)]
fn prepare(
    inner: &Inner,
    t: &Tables,
    kind: Kind,
    first: usize,
    bufs: &mut [Vec<u8>],
    lens: &[usize],
    whole: Option<&[Super]>,
    out: &mut Vec<Out>,
) {
    let k = bufs.len().min(lens.len());
    if k == 0 {
        return;
    }
    let drop_all = |peer: Option<&Peer>, d: Drop| {
        for _ in 0..k {
            inner.drop_pkt(peer, d);
        }
    };
    let off = if whole.is_some() { SUPER_PREFIX_LEN } else { 0 };
    let pkt = &bufs[0][HEADROOM + off..HEADROOM + lens[0].max(off)];
    // Segments and inner bytes each buffer stands for.
    let segs = |j: usize| -> (u64, u64) {
        match whole.and_then(|w| w.get(j)) {
            None => (1, lens[j] as u64),
            Some(s) => {
                let ip = lens[j] - SUPER_PREFIX_LEN;
                let n = ip
                    .saturating_sub(s.hl)
                    .div_ceil(s.hdr.gso_size.max(1) as usize);
                (n as u64, (ip + n.saturating_sub(1) * s.hl) as u64)
            }
        }
    };
    let (peer, nh) = match kind {
        Kind::Tap => (t.peers.values().next().cloned(), NH_ETHERNET),
        Kind::Tun => match (inner_addrs(pkt), infer_next_header(pkt)) {
            (Some((_, dst)), Some(nh)) => (
                t.routes
                    .lookup(dst)
                    .and_then(|id| t.peers.get(&id).cloned()),
                nh,
            ),
            _ => return drop_all(None, DropReason::BadInner.into()),
        },
    };
    let Some(peer) = peer else {
        return drop_all(None, Drop::NoRoute);
    };
    let nh = if whole.is_some() { NH_SUPER } else { nh };
    let Some(ep) = *lock(&peer.endpoint) else {
        return drop_all(Some(&peer), Drop::NoEndpoint);
    };
    let (plaintext, max) = t
        .transports
        .get(peer.transport)
        .map_or((false, MAX_PACKET), |tr| (tr.plaintext(), tr.max_payload()));
    let n_max = lens[..k].iter().copied().max().unwrap_or(0);
    if (if plaintext { n_max } else { encap_len(n_max) }) > max {
        return drop_all(Some(&peer), DropReason::Oversize.into());
    }
    if plaintext {
        for (j, &n) in lens[..k].iter().enumerate() {
            add(&peer.traffic.tx_packets, 1);
            add(&peer.traffic.tx_bytes, n as u64);
            add(&peer.traffic.wire_tx_bytes, n as u64);
            out.push((first + j, HEADROOM, n, n, peer.transport, ep, 1));
        }
        return;
    }
    let mut o = lock(&peer.out);
    let Some(osa) = o.as_mut() else {
        drop(o);
        drop_all(Some(&peer), Drop::NoSa);
        if !peer.no_sa_reported.swap(true, Ordering::Relaxed) {
            inner.event(Event::NoSa { peer: peer.id });
        }
        return;
    };
    // Each ESP packet starts HEADROOM - PAYLOAD_OFFSET = 0 bytes into its buffer.
    let nhs = [nh; BATCH];
    let mut wire = [0usize; BATCH];
    let k = k.min(BATCH);
    // Sequence numbers and IVs for the batch are reserved under the lock, the encryption runs
    // outside it: device threads of other queues encapsulate with this SA at the same time.
    let Ok(blk) = osa.sa.reserve_tx(&mut osa.tx, &bufs[..k], &lens[..k]) else {
        // A buffer too small for its ESP packet: BUF_LEN leaves room for the largest.
        drop(o);
        return drop_all(Some(&peer), DropReason::Oversize.into());
    };
    let (seq, bytes) = (osa.tx.seq(), osa.tx.stats().encap_bytes);
    if !osa.warned && (seq >= osa.soft_seq || bytes >= osa.soft_bytes) {
        osa.warned = true;
        inner.event(Event::SaLimit {
            peer: peer.id,
            spi: osa.sa.spi(),
            seq,
            bytes,
        });
    }
    let sa = osa.sa.clone();
    drop(o);
    let done = blk.len();
    if sa
        .encap_reserved(blk, &mut bufs[..k], &lens[..k], &nhs[..k], &mut wire[..k])
        .is_err()
    {
        // Not reached: the same buffers were checked when reserving.
        return drop_all(Some(&peer), DropReason::Oversize.into());
    }
    drop(sa);
    if whole.is_some() {
        add(&inner.io.wire_tx_super, done as u64);
    }
    for (j, &w) in wire[..done].iter().enumerate() {
        let (n, bytes) = segs(j);
        add(&peer.traffic.tx_packets, n);
        add(&peer.traffic.tx_bytes, bytes);
        add(&peer.traffic.wire_tx_bytes, w as u64);
        out.push((first + j, 0, w, bytes as usize, peer.transport, ep, n));
    }
    if done < k {
        // The sequence numbers ran out.
        for _ in done..k {
            inner.drop_pkt(Some(&peer), DropReason::SeqExhausted.into());
        }
        if !peer.no_sa_reported.swap(true, Ordering::Relaxed) {
            inner.event(Event::NoSa { peer: peer.id });
        }
    }
}

/// A super-packet read from a vnet-header device whose segments (or pieces) do not all fit
/// the batch: its header, its length in the read buffer, the next segment (piece) to make,
/// and, when it travels whole ([`whole_plan`]), its layout and segments per piece.
struct Pending {
    hdr: VnetHdr,
    len: usize,
    next: usize,
    whole: Option<(Super, usize, u32)>,
}

/// Whether the super-packet `pkt` read with `hdr` travels whole: a TCP TSO packet routed to a
/// peer that announced super-packets, on an ESP stream transport. Returns its layout and how
/// many segments fit one ESP packet (the frame's 2-byte length caps it: a 64 KiB packet is
/// cut at a segment boundary into two); `None`: split it into segments as for any transport.
fn whole_plan(t: &Tables, hdr: &VnetHdr, pkt: &[u8]) -> Option<(Super, usize, u32)> {
    if !offload::is_tso(hdr) {
        return None;
    }
    let (_, dst) = inner_addrs(pkt)?;
    let peer = t.routes.lookup(dst).and_then(|id| t.peers.get(&id))?;
    if !peer.whole.load(Ordering::Relaxed) {
        return None;
    }
    let tr = t.transports.get(peer.transport)?;
    if tr.kind() != TransportKind::Stream || tr.plaintext() {
        return None;
    }
    let s = offload::tso_layout(hdr.gso_type, hdr.gso_size, pkt).ok()?;
    let room = tr
        .max_payload()
        .min(MAX_PACKET)
        .saturating_sub(MAX_OVERHEAD + SUPER_PREFIX_LEN + s.hl);
    let per = room / (hdr.gso_size as usize).max(1);
    (per > 0).then_some((s, per.min(s.segments), peer.id))
}

/// One device read into `buf`, counted (`hz`: the vnet header's size, not counted as bytes);
/// `Err` is why the device thread ends.
#[inline]
fn read_device(
    dev: &dyn Device,
    buf: &mut [u8],
    io: &Io,
    hz: usize,
    queue: &AtomicU64,
) -> Result<Option<usize>, String> {
    match dev.recv(buf) {
        Ok(Some(n)) => {
            add(&io.dev_reads, 1);
            add(queue, 1);
            add(&io.dev_read_bytes, n.saturating_sub(hz) as u64);
            Ok(Some(n))
        }
        Ok(None) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err("device closed".into()),
        Err(e) => Err(format!("device error: {e}")),
    }
}

/// One queue's device-side buffers and the super-packet it is part-way through. Shared,
/// behind `Inner::tx[q]`, by the queue's device thread and the receive threads: a receive
/// thread runs a batch right after its device writes, so what the kernel produced during
/// those writes (an echo reply, a TCP ACK) goes out without waking the device thread — one
/// thread wake-up less per round trip. One holder at a time, so a queue's packets leave in
/// the order they were read.
struct TxState {
    bufs: Vec<Vec<u8>>,
    raw: Vec<u8>,
    pending: Option<Pending>,
    lens: [usize; BATCH],
    sups: [Super; BATCH],
    out: Vec<Out>,
}

impl TxState {
    fn new(hz: usize) -> TxState {
        TxState {
            bufs: bufs(),
            raw: vec![0u8; if hz > 0 { hz + MAX_PACKET } else { 0 }],
            pending: None,
            lens: [0usize; BATCH],
            sups: [Super::default(); BATCH],
            out: Vec::with_capacity(BATCH),
        }
    }
}

/// Whether the device side may read now: not before the first peer is configured (what the
/// device holds then is for it: `Ok(false)`), nor while a transport cannot take more
/// (backpressure: `Err` with the transport to wait on).
fn tx_ready(inner: &Inner) -> Result<bool, Arc<dyn Transport>> {
    let t = inner.read();
    if let Some(c) = t.transports.iter().find(|tr| tr.congested()) {
        return Err(c.clone());
    }
    Ok(!t.peers.is_empty())
}

/// Read what queue `q` holds (at most a batch, never waiting), route, encapsulate and send
/// it; `Err` is why the device thread ends.
fn tx_batch(inner: &Inner, q: usize, st: &mut TxState) -> Result<(), String> {
    let dev = &*inner.queues[q];
    let qreads = &inner.queue_reads[q];
    let kind = dev.kind();
    let hz = dev.vnet_hdr_len();
    let io = &inner.io;
    st.out.clear();
    let t = inner.read();
    let mut i = 0;
    // Buffers `start..i` hold whole super-packets for peer `id` not yet encapsulated.
    let mut run: Option<(u32, usize)> = None;
    while i < BATCH {
        let k = if hz == 0 {
            let n = match read_device(
                dev,
                &mut st.bufs[i][HEADROOM..HEADROOM + MAX_PACKET],
                io,
                0,
                qreads,
            ) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(why) => return Err(why),
            };
            st.lens[i] = n;
            1
        } else {
            let p = match st.pending.take() {
                Some(p) => p,
                None => {
                    let n = match read_device(dev, &mut st.raw, io, hz, qreads) {
                        Ok(Some(n)) => n,
                        Ok(None) => break,
                        Err(why) => return Err(why),
                    };
                    match VnetHdr::parse(&st.raw[..n], hz) {
                        Ok(hdr) => Pending {
                            hdr,
                            len: n,
                            next: 0,
                            whole: whole_plan(&t, &hdr, &st.raw[hz..n]),
                        },
                        Err(_) => {
                            inner.drop_pkt(None, Drop::BadVnet);
                            continue;
                        }
                    }
                }
            };
            if let Some((s, per, peer)) = p.whole {
                // Sent whole: pieces of `per` segments after a prefix, one ESP packet each.
                let r = offload::cut_from(
                    &p.hdr,
                    &st.raw[hz..p.len],
                    p.next,
                    per,
                    &mut st.bufs[i..],
                    HEADROOM + SUPER_PREFIX_LEN,
                    &mut st.lens[i..],
                );
                let Ok((k, total)) = r else {
                    inner.drop_pkt(None, Drop::BadVnet);
                    continue;
                };
                if p.next == 0 && s.segments > 1 {
                    add(&io.dev_read_super, 1);
                }
                if p.next + k < total {
                    st.pending = Some(Pending {
                        next: p.next + k,
                        ..p
                    });
                }
                for j in i..i + k {
                    offload::write_super_prefix(&p.hdr, &mut st.bufs[j][HEADROOM..]);
                    st.lens[j] += SUPER_PREFIX_LEN;
                    st.sups[j] = s;
                }
                // Encapsulated with the run of whole super-packets for the same peer
                // read before it in this batch (their CBC chains interleaved).
                match run {
                    Some((q, start)) if q != peer => {
                        let w = Some(&st.sups[start..i]);
                        prepare(
                            inner,
                            &t,
                            kind,
                            start,
                            &mut st.bufs[start..i],
                            &st.lens[start..i],
                            w,
                            &mut st.out,
                        );
                        run = Some((peer, i));
                    }
                    Some(_) => {}
                    None => run = Some((peer, i)),
                }
                i += k;
                continue;
            }
            let r = offload::split_from(
                &p.hdr,
                &st.raw[hz..p.len],
                p.next,
                &mut st.bufs[i..],
                HEADROOM,
                &mut st.lens[i..],
            );
            match r {
                Ok((k, total)) => {
                    if p.next == 0 && total > 1 {
                        add(&io.dev_read_super, 1);
                    }
                    if p.next + k < total {
                        st.pending = Some(Pending {
                            next: p.next + k,
                            ..p
                        });
                    }
                    k
                }
                Err(_) => {
                    inner.drop_pkt(None, Drop::BadVnet);
                    continue;
                }
            }
        };
        if let Some((_, start)) = run.take() {
            let w = Some(&st.sups[start..i]);
            prepare(
                inner,
                &t,
                kind,
                start,
                &mut st.bufs[start..i],
                &st.lens[start..i],
                w,
                &mut st.out,
            );
        }
        prepare(
            inner,
            &t,
            kind,
            i,
            &mut st.bufs[i..i + k],
            &st.lens[i..i + k],
            None,
            &mut st.out,
        );
        i += k;
    }
    if let Some((_, start)) = run.take() {
        let w = Some(&st.sups[start..i]);
        prepare(
            inner,
            &t,
            kind,
            start,
            &mut st.bufs[start..i],
            &st.lens[start..i],
            w,
            &mut st.out,
        );
    }
    // One send per transport in use.
    let mut done = 0;
    let mut tid = 0;
    while done < st.out.len() {
        let mine: Vec<&Out> = st.out.iter().filter(|o| o.4 == tid).collect();
        if !mine.is_empty() {
            let pkts: Vec<(&[u8], SocketAddr)> = mine
                .iter()
                .map(|o| (&st.bufs[o.0][o.1..o.1 + o.2], o.5))
                .collect();
            let sent = t.transports.get(tid).map_or(0, |tr| tr.send_batch(&pkts));
            for _ in sent..pkts.len() {
                inner.totals.drop(Drop::SendFailed);
            }
            add(
                &inner.totals.tx_packets,
                mine[..sent].iter().map(|o| o.6).sum(),
            );
            add(&io.wire_tx_packets, sent as u64);
            add(
                &inner.totals.tx_bytes,
                mine[..sent].iter().map(|o| o.3 as u64).sum(),
            );
            add(
                &inner.totals.wire_tx_bytes,
                mine[..sent].iter().map(|o| o.2 as u64).sum(),
            );
            done += mine.len();
        }
        tid += 1;
    }
    drop(t);
    Ok(())
}

/// Device → transports. On a vnet-header device each read may be a TSO/USO super-packet,
/// split here into MTU-sized packets (checksums completed) before encapsulation; its segments
/// travel in order in one batch (or the next, when the batch is full). One per device queue
/// (`q`): the kernel keeps each flow on one queue, so per-flow order holds.
fn device_loop(inner: &Inner, q: usize) -> String {
    let dev = inner.queues[q].clone();
    *lock(&inner.tx[q]) = Some(TxState::new(dev.vnet_hdr_len()));
    let mut last_sweep = Instant::now();
    loop {
        if inner.stopping.load(Ordering::Relaxed) {
            return "stopped".into();
        }
        match tx_ready(inner) {
            Ok(true) => {}
            Ok(false) => {
                sys::poll_readable([inner.stop_fd.as_raw_fd()], TICK_MS);
                continue;
            }
            Err(tr) => {
                tr.wait_room(inner.stop_fd.as_raw_fd(), TICK_MS);
                continue;
            }
        }
        let pending = lock(&inner.tx[q])
            .as_ref()
            .is_some_and(|s| s.pending.is_some());
        if !pending {
            let [ready, _] =
                sys::poll_readable([dev.poll_fd(), inner.stop_fd.as_raw_fd()], TICK_MS);
            if !ready {
                inner.sweep();
                continue;
            }
        }
        if let Some(s) = lock(&inner.tx[q]).as_mut() {
            if let Err(why) = tx_batch(inner, q, s) {
                return why;
            }
        }
        if last_sweep.elapsed() >= Duration::from_millis(TICK_MS as u64) {
            last_sweep = Instant::now();
            inner.sweep();
        }
    }
}

/// After a receive thread's device writes: send what they made the kernel answer, on every
/// queue whose device thread is not busy (a busy one sends it itself).
fn tx_after_rx(inner: &Inner) {
    if !matches!(tx_ready(inner), Ok(true)) {
        return;
    }
    for (q, tx) in inner.tx.iter().enumerate() {
        if let Ok(mut g) = tx.try_lock() {
            if let Some(s) = g.as_mut() {
                // The rest of a super-packet cut short by the batch goes too: the device
                // thread waits only for new packets. A device error ends that queue's device
                // thread, which meets it too.
                while tx_batch(inner, q, s).is_ok() && s.pending.is_some() {}
            }
        }
    }
}

/// Packets accepted from one receive batch before they are written to the device: when
/// this many are waiting they are written (coalesced) at once.
const RX_FLUSH: usize = 128;
/// Super-packets [`Gro`] builds per flush (64 KiB buffers each).
const GRO_SLOTS: usize = 8;

/// One transport → device.
fn transport_loop(inner: &Inner, id: usize, tr: Arc<dyn Transport>) -> String {
    let udp = tr.carries_control();
    let mut bufs = bufs();
    let mut got: Vec<Datagram> = Vec::with_capacity(BATCH);
    let mut pre: Vec<Option<PreIcv>> = Vec::with_capacity(BATCH);
    let mut last_sweep = Instant::now();
    let hz = inner.device.vnet_hdr_len();
    let mut gro = (hz > 0).then(|| Gro::new(hz, GRO_SLOTS));
    loop {
        if inner.stopping.load(Ordering::Relaxed) {
            return "stopped".into();
        }
        let [ready, _] = sys::poll_readable([tr.poll_fd(), inner.stop_fd.as_raw_fd()], TICK_MS);
        if !ready {
            inner.sweep();
            continue;
        }
        got.clear();
        if let Err(e) = tr.recv_batch(&mut bufs, &mut got) {
            // ICMP errors surface as ECONNREFUSED etc. on UDP sockets: not fatal.
            if matches!(
                e.raw_os_error(),
                Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
            ) {
                continue;
            }
            return format!("transport {id} error: {e}");
        }
        add(&inner.io.wire_rx_packets, got.len() as u64);
        for (endpoint, reason) in tr.take_closed() {
            inner.event(Event::Closed {
                transport: id,
                endpoint,
                reason,
            });
        }
        let t = inner.read();
        let now = (now_ms(), Instant::now());
        pre.clear();
        pre.resize(got.len(), None);
        if !t.transports.get(id).is_some_and(|tr| tr.plaintext()) {
            precompute_icvs(&t, &bufs, &got, &mut pre);
        }
        let mut from = 0;
        while from < got.len() {
            // Decapsulate in place until RX_FLUSH packets are accepted, then write those.
            let mut accepted: Vec<(&Peer, usize, Range<usize>, Option<Super>)> =
                Vec::with_capacity(RX_FLUSH);
            while from < got.len() && accepted.len() < RX_FLUSH {
                let (dg, pre) = (got[from], pre[from]);
                from += 1;
                let d = &mut bufs[dg.buf][dg.start..dg.start + dg.len];
                if let Some((peer, r, whole)) =
                    receive_one(inner, &t, id, udp, d, dg.from, dg.truncated, now, pre)
                {
                    accepted.push((peer, dg.buf, dg.start + r.start..dg.start + r.end, whole));
                }
            }
            let pkts: Vec<Accepted> = accepted
                .iter()
                .map(|(p, b, r, w)| (*p, &bufs[*b][r.clone()], *w))
                .collect();
            to_device(inner, gro.as_mut(), &pkts);
        }
        drop(t);
        tx_after_rx(inner);
        if last_sweep.elapsed() >= Duration::from_millis(TICK_MS as u64) {
            last_sweep = Instant::now();
            inner.sweep();
        }
    }
}

/// The ICVs of a receive batch's ESP datagrams computed ahead, several at a time
/// ([`SecurityAssociation::precompute_icvs`]): each run of consecutive datagrams (two to
/// [`cbc_multi::LANES`](crate::cbc_multi::LANES)) with one known inbound SPI, under one lock of
/// that SA. Counts nothing and changes no state: [`receive_one`] still classifies every
/// datagram, and uses `pre[i]` only when it decapsulates datagram `i` with that same SA.
fn precompute_icvs(t: &Tables, bufs: &[Vec<u8>], got: &[Datagram], pre: &mut [Option<PreIcv>]) {
    const MAX_RUN: usize = crate::cbc_multi::LANES;
    let spi_of = |dg: &Datagram| {
        (!dg.truncated && dg.len >= 8).then(|| {
            let d = &bufs[dg.buf][dg.start..];
            u32::from_be_bytes([d[0], d[1], d[2], d[3]])
        })
    };
    let mut i = 0;
    while i < got.len() {
        let Some(spi) = spi_of(&got[i]) else {
            i += 1;
            continue;
        };
        let mut end = i + 1;
        while end < got.len() && end - i < MAX_RUN && spi_of(&got[end]) == Some(spi) {
            end += 1;
        }
        if end - i >= 2 {
            if let Some(s) = t.inbound.get(&spi) {
                let mut pkts: [&[u8]; MAX_RUN] = [&[]; MAX_RUN];
                for (p, dg) in pkts.iter_mut().zip(&got[i..end]) {
                    *p = &bufs[dg.buf][dg.start..dg.start + dg.len];
                }
                lock(&s.sa).precompute_icvs(&pkts[..end - i], &mut pre[i..end]);
            }
        }
        i = end;
    }
}

/// Classify and handle one received datagram (the body of the receive loop; also called
/// directly by tests and the fuzz target). Every datagram ends in exactly one counter. `pre`:
/// its ICV if [`precompute_icvs`] computed it (under the SA its SPI names in `t`).
/// Returns the accepted inner packet (where it lies in `d`) and its peer, for [`to_device`];
/// for a super-packet received whole also its layout, the packet then starting with the
/// device's vnet header (written in place) when the device has one.
#[allow(clippy::too_many_arguments)]
fn receive_one<'t>(
    inner: &Inner,
    t: &'t Tables,
    id: usize,
    udp: bool,
    d: &mut [u8],
    from: SocketAddr,
    truncated: bool,
    now: (u64, Instant),
    pre: Option<PreIcv>,
) -> Option<(&'t Peer, Range<usize>, Option<Super>)> {
    let dev = &inner.device;
    let kind = dev.kind();
    add(&inner.totals.wire_rx_bytes, d.len() as u64);
    if truncated {
        // A stream frame above max_frame (skipped by the parser), or a datagram cut short.
        let stream = t
            .transports
            .get(id)
            .is_some_and(|tr| tr.kind() == TransportKind::Stream);
        inner.totals.drop(if stream {
            DropReason::Oversize.into()
        } else {
            Drop::Truncated
        });
        return None;
    }
    if t.transports.get(id).is_some_and(|tr| tr.plaintext()) {
        return receive_plaintext(inner, t, id, d, from, now.0).map(|(p, r)| (p, r, None));
    }
    if udp && d.len() == 1 && d[0] == NAT_KEEPALIVE {
        add(&inner.totals.keepalives, 1);
        return None;
    }
    if d.len() >= 4 && d[..4] == NON_ESP_MARKER {
        if !udp {
            inner.totals.drop(DropReason::Control.into());
            return None;
        }
        let ev = Event::Control {
            transport: id,
            from,
            payload: d.to_vec(),
        };
        if inner.events.push(ev) {
            add(&inner.totals.control_rx, 1);
        } else {
            inner.totals.drop(Drop::ControlOverflow);
        }
        return None;
    }
    if d.len() < 8 {
        inner.totals.drop(DropReason::BadLength.into());
        return None;
    }
    let spi = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let Some(s) = t.inbound.get(&spi) else {
        inner.totals.drop(DropReason::UnknownSpi.into());
        return None;
    };
    if lock(&s.expires).is_some_and(|e| e <= now.1) {
        inner.totals.drop(DropReason::UnknownSpi.into());
        return None;
    }
    let peer = &s.peer;
    if peer.transport != id {
        // An SA belongs to its peer's transport; the same SPI elsewhere is not it.
        inner.totals.drop(DropReason::UnknownSpi.into());
        return None;
    }
    let r = lock(&s.sa).decap_in_place_pre(d, pre);
    let dec = match r {
        Ok(dec) => dec,
        Err(reason) => {
            inner.drop_pkt(Some(peer), reason.into());
            return None;
        }
    };
    // Authenticated: the peer is at the packet's source now (roaming).
    {
        let mut ep = lock(&peer.endpoint);
        if *ep != Some(from) {
            *ep = Some(from);
        }
    }
    s.last_rx_ms.store(now.0, Ordering::Relaxed);
    peer.traffic.last_rx_ms.store(now.0, Ordering::Relaxed);
    inner.totals.last_rx_ms.store(now.0, Ordering::Relaxed);
    add(&peer.traffic.wire_rx_bytes, d.len() as u64);
    if dec.next_header == NH_NONE {
        add(&inner.totals.dummies, 1);
        return None;
    }
    if dec.next_header == NH_SUPER && kind == Kind::Tun {
        return receive_whole(inner, peer, d, dec.inner);
    }
    let pkt = &d[dec.inner.clone()];
    let ok = match kind {
        Kind::Tap => dec.next_header == NH_ETHERNET,
        Kind::Tun => {
            infer_next_header(pkt) == Some(dec.next_header)
                && matches!(dec.next_header, NH_IPV4 | NH_IPV6)
        }
    };
    if !ok {
        inner.drop_pkt(Some(peer), DropReason::BadInner.into());
        return None;
    }
    if kind == Kind::Tun {
        let allowed =
            inner_addrs(pkt).is_some_and(|(src, _)| peer.allowed.iter().any(|p| p.contains(src)));
        if !allowed {
            inner.drop_pkt(Some(peer), Drop::Spoofed);
            return None;
        }
    }
    Some((peer, dec.inner, None))
}

/// A decapsulated super-packet sent whole (Next Header [`NH_SUPER`], `d[r]` = prefix + IP
/// packet): validated like a header read from our own TUN (refusals counted
/// `drop_super_<why>`), spoof-checked, then made ready for the device in place (IPv4 header
/// checksum, pseudo-header sum in the TCP checksum field, the vnet header in front on a
/// vnet-header device; [`to_device`] splits it on a device without).
fn receive_whole<'t>(
    inner: &Inner,
    peer: &'t Peer,
    d: &mut [u8],
    r: Range<usize>,
) -> Option<(&'t Peer, Range<usize>, Option<Super>)> {
    let s = match offload::parse_super(&d[r.clone()]) {
        Ok(s) => s,
        Err(why) => {
            inner.drop_pkt(Some(peer), Drop::Super(why));
            return None;
        }
    };
    let ip = r.start + SUPER_PREFIX_LEN..r.end;
    let allowed = inner_addrs(&d[ip.clone()])
        .is_some_and(|(src, _)| peer.allowed.iter().any(|p| p.contains(src)));
    if !allowed {
        inner.drop_pkt(Some(peer), Drop::Spoofed);
        return None;
    }
    let hz = inner.device.vnet_hdr_len();
    if hz == 0 {
        add(&inner.io.wire_rx_super, 1);
        return Some((peer, ip, Some(s)));
    }
    // The ESP header and the prefix lie in front of the packet: room for the vnet header.
    if ip.start < hz {
        inner.drop_pkt(
            Some(peer),
            Drop::Super(offload::OffloadDrop::BufferTooSmall),
        );
        return None;
    }
    let vh = offload::super_for_tun(&s, &mut d[ip.clone()]);
    vh.write(&mut d[ip.start - hz..ip.start], hz);
    add(&inner.io.wire_rx_super, 1);
    Some((peer, ip.start - hz..ip.end, Some(s)))
}

/// An accepted inner packet: its peer, the packet, and for a super-packet received whole its
/// layout (the packet then has the device's vnet header in front, if the device has one).
type Accepted<'a> = (&'a Peer, &'a [u8], Option<Super>);

/// The last step of every receive path: write accepted inner packets to the device and count
/// them (or count the failed writes). With `gro` (a vnet-header device) in-order TCP segments
/// of one flow are coalesced into super-packets, one write each. A super-packet received
/// whole is written as it came (split into segments on a device without vnet headers), after
/// everything accepted before it (so each flow keeps its order).
fn to_device(inner: &Inner, mut gro: Option<&mut Gro>, pkts: &[Accepted]) {
    let mut from = 0;
    for (i, p) in pkts.iter().enumerate() {
        if let Some(s) = p.2 {
            to_device_run(inner, gro.as_deref_mut(), &pkts[from..i]);
            whole_to_device(inner, p.0, p.1, &s);
            from = i + 1;
        }
    }
    to_device_run(inner, gro, &pkts[from..]);
}

/// Write one super-packet received whole and count it as the segments it stands for.
fn whole_to_device(inner: &Inner, peer: &Peer, pkt: &[u8], s: &Super) {
    let dev = &inner.device;
    let io = &inner.io;
    let hz = dev.vnet_hdr_len();
    let count = |segs: u64, bytes: u64, wrote: u64| {
        add(&io.dev_writes, 1);
        add(&io.dev_write_bytes, wrote);
        add(&peer.traffic.rx_packets, segs);
        add(&peer.traffic.rx_bytes, bytes);
        add(&inner.totals.rx_packets, segs);
        add(&inner.totals.rx_bytes, bytes);
    };
    if hz > 0 {
        let ip = pkt.len() - hz;
        let segs = s.segments as u64;
        if inner.write_queue(&pkt[hz..]).send_vnet(pkt).is_err() {
            for _ in 0..segs {
                inner.drop_pkt(Some(peer), DropReason::DeviceWrite.into());
            }
            return;
        }
        if segs > 1 {
            add(&io.dev_write_super, 1);
        }
        count(segs, s.segment_bytes(ip) as u64, ip as u64);
        return;
    }
    // No vnet header: the segments, one write each (never announced for such a device, but
    // an authenticated peer may still send it).
    let mut seg = [vec![0u8; MAX_PACKET]];
    let mut len = [0usize];
    for i in 0..s.segments {
        match offload::split_from(&s.hdr, pkt, i, &mut seg, 0, &mut len) {
            Ok(_) => {
                let n = len[0];
                if inner.write_queue(&seg[0][..n]).send(&seg[0][..n]).is_err() {
                    inner.drop_pkt(Some(peer), DropReason::DeviceWrite.into());
                } else {
                    count(1, n as u64, n as u64);
                }
            }
            Err(why) => {
                inner.drop_pkt(Some(peer), Drop::Super(why));
                return;
            }
        }
    }
}

fn to_device_run(inner: &Inner, gro: Option<&mut Gro>, pkts: &[Accepted]) {
    if pkts.is_empty() {
        return;
    }
    let dev = &inner.device;
    let io = &inner.io;
    let write = |peer: &Peer, r: io::Result<()>, segs: u64, bytes: u64, wrote: u64| {
        if r.is_err() {
            for _ in 0..segs {
                inner.drop_pkt(Some(peer), DropReason::DeviceWrite.into());
            }
            return;
        }
        add(&io.dev_writes, 1);
        add(&io.dev_write_bytes, wrote);
        add(&peer.traffic.rx_packets, segs);
        add(&peer.traffic.rx_bytes, bytes);
        add(&inner.totals.rx_packets, segs);
        add(&inner.totals.rx_bytes, bytes);
    };
    let Some(gro) = gro else {
        for (peer, pkt, _) in pkts {
            let n = pkt.len() as u64;
            write(peer, inner.write_queue(pkt).send(pkt), 1, n, n);
        }
        return;
    };
    let only: Vec<&[u8]> = pkts.iter().map(|(_, p, _)| *p).collect();
    let hz = dev.vnet_hdr_len();
    for o in gro.coalesce(&only).to_vec() {
        match o {
            GroOut::Pass(i) => {
                let (peer, pkt, _) = pkts[i];
                let n = pkt.len() as u64;
                write(peer, inner.write_queue(pkt).send(pkt), 1, n, n);
            }
            GroOut::Merged { slot, segments } => {
                let buf = gro.merged(slot);
                let (peer, head, _) = pkts[gro.head(slot)];
                let ip = (buf.len() - hz) as u64;
                // Every segment carried the same headers (hdr_len bytes): the inner bytes
                // received are the merged packet's plus the headers it saved.
                let hl = VnetHdr::parse(buf, hz).map_or(0, |h| h.hdr_len as u64);
                let bytes = ip + (segments as u64 - 1) * hl;
                add(&io.dev_write_super, 1);
                let q = inner.write_queue(head);
                write(peer, q.send_vnet(buf), segments as u64, bytes, ip);
            }
        }
    }
}

/// A raw inner packet from a plaintext stream connection: its peer is the one whose endpoint
/// the connection is (no authentication: plaintext mode is simpletun.c's, chosen by the user).
fn receive_plaintext<'t>(
    inner: &Inner,
    t: &'t Tables,
    id: usize,
    pkt: &[u8],
    from: SocketAddr,
    now: u64,
) -> Option<(&'t Peer, Range<usize>)> {
    let dev = &inner.device;
    let Some(peer) = t
        .peers
        .values()
        .find(|p| p.transport == id && *lock(&p.endpoint) == Some(from))
    else {
        inner.totals.drop(Drop::NoPeer);
        return None;
    };
    if pkt.is_empty() {
        inner.drop_pkt(Some(peer), DropReason::BadLength.into());
        return None;
    }
    if dev.kind() == Kind::Tun {
        let src = match (inner_addrs(pkt), infer_next_header(pkt)) {
            (Some((src, _)), Some(_)) => src,
            _ => {
                inner.drop_pkt(Some(peer), DropReason::BadInner.into());
                return None;
            }
        };
        if !peer.allowed.iter().any(|p| p.contains(src)) {
            inner.drop_pkt(Some(peer), Drop::Spoofed);
            return None;
        }
    }
    peer.traffic.last_rx_ms.store(now, Ordering::Relaxed);
    inner.totals.last_rx_ms.store(now, Ordering::Relaxed);
    add(&peer.traffic.wire_rx_bytes, pkt.len() as u64);
    Some((peer, 0..pkt.len()))
}
