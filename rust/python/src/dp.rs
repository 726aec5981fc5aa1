//! Data plane v2 for Python: `DataPlane` (one device, transports, peers, SAs, control messages
//! and events), and the protocol constants. Threads run in Rust, without the GIL.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use simpletun_core::dp::counters::Drop;
use simpletun_core::dp::rawesp::RawEspTransport;
use simpletun_core::dp::stream::StreamTransport;
use simpletun_core::dp::udp::UdpTransport;
use simpletun_core::dp::{DataPlane, Device, DpConfig, DpError, Event, Prefix, TunDevice};
use simpletun_core::esp::DEFAULT_REPLAY_WINDOW;
use simpletun_core::proto;
use simpletun_core::tun::Kind;
use simpletun_core::SecurityAssociation;

use crate::errors;

fn dp_error(e: DpError) -> PyErr {
    errors::config_error(e.0)
}

fn start_error(e: io::Error) -> PyErr {
    match e.kind() {
        io::ErrorKind::InvalidInput => errors::config_error(e.to_string()),
        _ => e.into(),
    }
}

fn endpoint(ep: (String, u16)) -> PyResult<SocketAddr> {
    let ip: IpAddr = ep.0.trim_matches(['[', ']']).parse().map_err(|_| {
        errors::config_error(format!(
            "{:?} is not an IP address (give a literal IPv4/IPv6 address)",
            ep.0
        ))
    })?;
    Ok(SocketAddr::new(ip, ep.1))
}

fn py_endpoint(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
}

/// One device (TUN/TAP descriptor) and its peers, SAs and datagram transports.
#[pyclass(module = "simpletun._core", name = "DataPlane", frozen)]
pub struct PyDataPlane {
    dp: DataPlane,
    streams: Mutex<HashMap<usize, Arc<StreamTransport>>>,
}

impl PyDataPlane {
    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<StreamTransport>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stream(&self, id: usize) -> PyResult<Arc<StreamTransport>> {
        self.lock_streams().get(&id).cloned().ok_or_else(|| {
            errors::config_error(format!("transport {id} is not a stream (TCP) transport"))
        })
    }
}

#[pymethods]
impl PyDataPlane {
    /// `queue_fds`: the further queues of a multi-queue device whose first queue is `tun_fd`
    /// (`open_tun_queues`), one device thread each.
    #[new]
    #[pyo3(signature = (tun_fd, *, tap=false, soft_seq=None, soft_bytes=None, queue_len=1024, queue_fds=Vec::new()))]
    fn new(
        py: Python<'_>,
        tun_fd: i32,
        tap: bool,
        soft_seq: Option<u64>,
        soft_bytes: Option<u64>,
        queue_len: usize,
        queue_fds: Vec<i32>,
    ) -> PyResult<Self> {
        let kind = if tap { Kind::Tap } else { Kind::Tun };
        let d = DpConfig::default();
        let config = DpConfig {
            soft_seq: soft_seq.unwrap_or(d.soft_seq),
            soft_bytes: soft_bytes.unwrap_or(d.soft_bytes),
            queue_len,
        };
        let dp = py
            .detach(|| -> io::Result<DataPlane> {
                let mut queues: Vec<Arc<dyn Device>> = Vec::new();
                for fd in std::iter::once(tun_fd).chain(queue_fds) {
                    queues.push(Arc::new(TunDevice::from_fd(fd, kind)?));
                }
                DataPlane::start_queues(queues, config)
            })
            .map_err(start_error)?;
        Ok(PyDataPlane {
            dp,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Add an ESP-in-UDP transport on (a duplicate of) a bound UDP socket; returns its id.
    /// `offload`: UDP GSO on send and GRO on receive where the kernel has them; by default
    /// when the device has offloads (vnet headers), so that one choice made when the device
    /// is opened (`Config.offloads`) holds for both.
    #[pyo3(signature = (sock_fd, *, offload=None))]
    fn add_udp(&self, sock_fd: i32, offload: Option<bool>) -> PyResult<usize> {
        let mut t = UdpTransport::from_fd(sock_fd).map_err(start_error)?;
        if !offload.unwrap_or(self.dp.vnet_hdr_len() > 0) {
            t = t.without_offloads();
        }
        self.dp.add_transport(Arc::new(t)).map_err(start_error)
    }

    /// Add a raw ESP transport on (a duplicate of) a `socket(AF_INET[6], SOCK_RAW, 50)`.
    fn add_raw_esp(&self, sock_fd: i32) -> PyResult<usize> {
        let t = RawEspTransport::from_fd(sock_fd).map_err(start_error)?;
        self.dp.add_transport(Arc::new(t)).map_err(start_error)
    }

    /// Add a stream transport (2-byte length-prefixed frames on TCP connections); returns
    /// its id. Connections are added with add_tcp_connection. `plaintext`: frames carry raw
    /// packets (simpletun.c's --plaintext), no ESP; its peers need no SA. `control` false:
    /// control frames are dropped (`drop_control`), for connections handshaken beforehand.
    /// `rfc8229`: RFC 8229 framing (IKE and ESP over TCP: the length counts itself, the side
    /// that opened a connection sends `IKETCP` first).
    #[pyo3(signature = (max_frame=65535, *, plaintext=false, control=true, rfc8229=false))]
    fn add_tcp(
        &self,
        max_frame: usize,
        plaintext: bool,
        control: bool,
        rfc8229: bool,
    ) -> PyResult<usize> {
        if rfc8229 && (plaintext || !control) {
            return Err(errors::config_error(
                "an RFC 8229 transport carries IKE and ESP: plaintext=True or control=False do not go with rfc8229=True",
            ));
        }
        let t = if rfc8229 {
            StreamTransport::rfc8229(max_frame)
        } else if plaintext {
            StreamTransport::plaintext(max_frame)
        } else {
            StreamTransport::new(max_frame)
        };
        let mut t = t.map_err(start_error)?;
        if !control {
            t = t.without_control();
        }
        let t = Arc::new(t);
        let id = self.dp.add_transport(t.clone()).map_err(start_error)?;
        self.lock_streams().insert(id, t);
        Ok(id)
    }

    /// Carry frames on (a duplicate of) connected socket `sock_fd`, addressed as `endpoint`
    /// (normally its peer address); replaces a connection with the same endpoint.
    /// `opened_by_us` (RFC 8229 transports): we connected, so we send `IKETCP` first; else
    /// the peer must (a connection that does not start with it is closed).
    #[pyo3(signature = (transport, sock_fd, endpoint, *, opened_by_us=false))]
    fn add_tcp_connection(
        &self,
        transport: usize,
        sock_fd: i32,
        endpoint: (String, u16),
        opened_by_us: bool,
    ) -> PyResult<()> {
        let ep = self::endpoint(endpoint)?;
        self.stream(transport)?
            .add_connection_as(sock_fd, ep, opened_by_us)
            .map_err(start_error)
    }

    fn remove_tcp_connection(&self, transport: usize, endpoint: (String, u16)) -> PyResult<bool> {
        let ep = self::endpoint(endpoint)?;
        Ok(self.stream(transport)?.remove_connection(ep))
    }

    /// Add a peer on `transport` allowed `allowed` inner prefixes ("10.0.0.0/24", "fd00::/64").
    #[pyo3(signature = (transport, allowed, endpoint=None))]
    fn add_peer(
        &self,
        transport: usize,
        allowed: Vec<String>,
        endpoint: Option<(String, u16)>,
    ) -> PyResult<u32> {
        let prefixes = allowed
            .iter()
            .map(|s| s.parse::<Prefix>().map_err(errors::config_error))
            .collect::<PyResult<Vec<_>>>()?;
        let ep = endpoint.map(self::endpoint).transpose()?;
        self.dp.add_peer(transport, &prefixes, ep).map_err(dp_error)
    }

    fn remove_peer(&self, peer: u32) -> PyResult<()> {
        self.dp.remove_peer(peer).map_err(dp_error)
    }

    #[pyo3(signature = (peer, endpoint))]
    fn set_endpoint(&self, peer: u32, endpoint: Option<(String, u16)>) -> PyResult<()> {
        let ep = endpoint.map(self::endpoint).transpose()?;
        self.dp.set_endpoint(peer, ep).map_err(dp_error)
    }

    /// The peer's current endpoint `(host, port)` (port 0 on raw ESP), or None.
    fn endpoint(&self, peer: u32) -> PyResult<Option<(String, u16)>> {
        Ok(self.dp.endpoint(peer).map_err(dp_error)?.map(py_endpoint))
    }

    /// Add an inbound SA. `rx_seq`: the window starts after this sequence number (the
    /// peer's first packet is `rx_seq + 1`; manual keying's preset, default 0).
    #[pyo3(signature = (peer, spi, enc_key, auth_key, *, replay_window=DEFAULT_REPLAY_WINDOW, esn=false, rx_seq=0))]
    #[allow(clippy::too_many_arguments)]
    fn add_inbound_sa(
        &self,
        peer: u32,
        spi: u32,
        enc_key: &[u8],
        auth_key: &[u8],
        replay_window: u32,
        esn: bool,
        rx_seq: u64,
    ) -> PyResult<()> {
        let mut sa = SecurityAssociation::new(spi, enc_key, auth_key, replay_window, esn)
            .map_err(errors::sa_config_error)?;
        if rx_seq != 0 && !sa.skip_rx_seq_to(rx_seq) {
            return Err(errors::config_error(format!(
                "rx_seq {rx_seq} is beyond this SA's sequence numbers (esn={esn})"
            )));
        }
        self.dp.add_inbound_sa(peer, sa).map_err(dp_error)
    }

    /// Make this the peer's outbound SA (the previous one is wiped). `tx_seq`: the first
    /// packet carries `tx_seq + 1` (manual keying's preset, default 0). `soft_packets` /
    /// `soft_bytes`: this SA's own soft limits for the "sa_limit" event (at most the data
    /// plane's soft_seq / soft_bytes, which apply when None).
    #[pyo3(signature = (
        peer, spi, enc_key, auth_key, *, esn=false, tx_seq=0, soft_packets=None, soft_bytes=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn set_outbound_sa(
        &self,
        peer: u32,
        spi: u32,
        enc_key: &[u8],
        auth_key: &[u8],
        esn: bool,
        tx_seq: u64,
        soft_packets: Option<u64>,
        soft_bytes: Option<u64>,
    ) -> PyResult<()> {
        let mut sa = SecurityAssociation::new(spi, enc_key, auth_key, DEFAULT_REPLAY_WINDOW, esn)
            .map_err(errors::sa_config_error)?;
        sa.skip_tx_seq_to(tx_seq);
        self.dp
            .set_outbound_sa_with_limits(peer, Some(sa), soft_packets, soft_bytes)
            .map_err(dp_error)
    }

    /// Send TCP TSO super-packets for `peer` whole, one ESP packet each (both ends announced
    /// super-packets in the handshake; ESP stream transports only).
    fn set_peer_super(&self, peer: u32, on: bool) -> PyResult<()> {
        self.dp.set_peer_super(peer, on).map_err(dp_error)
    }

    fn clear_outbound_sa(&self, peer: u32) -> PyResult<()> {
        self.dp.set_outbound_sa(peer, None).map_err(dp_error)
    }

    /// Remove an inbound SA now, or after `grace` seconds (it stays valid until then).
    #[pyo3(signature = (spi, grace=0.0))]
    fn remove_inbound_sa(&self, spi: u32, grace: f64) -> PyResult<()> {
        if !(0.0..=86400.0).contains(&grace) {
            return Err(errors::config_error(format!(
                "grace {grace} s is out of range; use 0 to 86400"
            )));
        }
        self.dp
            .remove_inbound_sa(spi, Duration::from_secs_f64(grace))
            .map_err(dp_error)
    }

    /// Send a control message (starting with CONTROL_MARKER) on a UDP transport.
    fn send_control(
        &self,
        py: Python<'_>,
        transport: usize,
        endpoint: (String, u16),
        payload: &[u8],
    ) -> PyResult<()> {
        let to = self::endpoint(endpoint)?;
        py.detach(|| self.dp.send_control(transport, to, payload))
            .map_err(dp_error)
    }

    fn send_keepalive(&self, transport: usize, endpoint: (String, u16)) -> PyResult<()> {
        let to = self::endpoint(endpoint)?;
        self.dp.send_keepalive(transport, to).map_err(dp_error)
    }

    /// Readable while events wait; never read it, call take_events().
    #[getter]
    fn events_fd(&self) -> i32 {
        self.dp.events_fd()
    }

    /// Up to `max` events: ("control", transport, (host, port), payload), ("no_sa", peer),
    /// ("sa_limit", peer, spi, seq, bytes).
    #[pyo3(signature = (max=256))]
    fn take_events<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for e in self.dp.take_events(max) {
            let t = match e {
                Event::Control {
                    transport,
                    from,
                    payload,
                } => PyTuple::new(
                    py,
                    [
                        "control".into_pyobject(py)?.into_any(),
                        transport.into_pyobject(py)?.into_any(),
                        py_endpoint(from).into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &payload).into_any(),
                    ],
                )?,
                Event::Closed {
                    transport,
                    endpoint,
                    reason,
                } => PyTuple::new(
                    py,
                    [
                        "closed".into_pyobject(py)?.into_any(),
                        transport.into_pyobject(py)?.into_any(),
                        py_endpoint(endpoint).into_pyobject(py)?.into_any(),
                        reason.into_pyobject(py)?.into_any(),
                    ],
                )?,
                Event::NoSa { peer } => PyTuple::new(
                    py,
                    [
                        "no_sa".into_pyobject(py)?.into_any(),
                        peer.into_pyobject(py)?.into_any(),
                    ],
                )?,
                Event::SaLimit {
                    peer,
                    spi,
                    seq,
                    bytes,
                } => PyTuple::new(
                    py,
                    [
                        "sa_limit".into_pyobject(py)?.into_any(),
                        peer.into_pyobject(py)?.into_any(),
                        spi.into_pyobject(py)?.into_any(),
                        seq.into_pyobject(py)?.into_any(),
                        bytes.into_pyobject(py)?.into_any(),
                    ],
                )?,
            };
            out.append(t)?;
        }
        Ok(out)
    }

    /// Device totals: traffic counters and drop_<reason> for every reason.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.dp.totals().entries() {
            d.set_item(k, v)?;
        }
        for (k, v) in self.dp.io().entries() {
            d.set_item(k, v)?;
        }
        let q = self.dp.queue_reads();
        if q.len() > 1 {
            for (i, v) in q.iter().enumerate() {
                d.set_item(format!("dev_reads_q{i}"), v)?;
            }
        }
        Ok(d)
    }

    /// Reads from each device queue (one entry per queue).
    #[getter]
    fn queue_reads(&self) -> Vec<u64> {
        self.dp.queue_reads()
    }

    /// Size of the vnet header on the device's packets (0: no TUN offloads).
    #[getter]
    fn vnet_hdr_len(&self) -> usize {
        self.dp.vnet_hdr_len()
    }

    fn peer_stats<'py>(&self, py: Python<'py>, peer: u32) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.dp.peer_stats(peer).map_err(dp_error)? {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn peers(&self) -> Vec<u32> {
        self.dp.peers()
    }

    /// One dict per installed SA: spi peer inbound tx_seq rx_highest_seq last_rx_ms expiring,
    /// encap/decap packets and bytes, drop_<reason>.
    fn sas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for s in self.dp.sas() {
            let d = PyDict::new(py);
            d.set_item("spi", s.spi)?;
            d.set_item("peer", s.peer)?;
            d.set_item("inbound", s.inbound)?;
            d.set_item("tx_seq", s.tx_seq)?;
            d.set_item("rx_highest_seq", s.rx_highest_seq)?;
            d.set_item("last_rx_ms", s.last_rx_ms)?;
            d.set_item("expiring", s.expiring)?;
            d.set_item("encap_packets", s.stats.encap_packets)?;
            d.set_item("encap_bytes", s.stats.encap_bytes)?;
            d.set_item("decap_packets", s.stats.decap_packets)?;
            d.set_item("decap_bytes", s.stats.decap_bytes)?;
            for (k, v) in s.stats.drops.iter() {
                d.set_item(format!("drop_{k}"), v)?;
            }
            out.append(d)?;
        }
        Ok(out)
    }

    /// Stop the threads and release transports, peers and SAs; the stream connections'
    /// sockets are closed now (not when this object is collected).
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.dp.stop());
        let streams: Vec<Arc<StreamTransport>> =
            self.lock_streams().drain().map(|(_, t)| t).collect();
        for t in streams {
            for ep in t.connections() {
                t.remove_connection(ep);
            }
        }
    }

    #[getter]
    fn done_fd(&self) -> i32 {
        self.dp.done_fd()
    }

    #[getter]
    fn running(&self) -> bool {
        self.dp.running()
    }

    #[getter]
    fn exit_reason(&self) -> Option<String> {
        self.dp.exit_reason()
    }

    fn __repr__(&self) -> String {
        match self.dp.exit_reason() {
            None => format!("<DataPlane running, {} peers>", self.dp.peers().len()),
            Some(e) => format!("<DataPlane ended: {e}>"),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDataPlane>()?;
    let py = m.py();
    m.add("CONTROL_MARKER", PyBytes::new(py, &proto::NON_ESP_MARKER))?;
    m.add("NAT_KEEPALIVE", PyBytes::new(py, &[proto::NAT_KEEPALIVE]))?;
    m.add("MIN_SPI", proto::MIN_SPI)?;
    m.add("AUTH_KEY_LEN", proto::AUTH_KEY_LEN)?;
    m.add("ENC_KEY_LENS", PyTuple::new(py, proto::ENC_KEY_LENS)?)?;
    m.add("ESP_IN_UDP_PORT", proto::ESP_IN_UDP_PORT)?;
    m.add("IPPROTO_ESP", proto::IPPROTO_ESP)?;
    let names: Vec<&str> = Drop::all().map(|d| d.name()).collect();
    m.add("DP_DROP_REASONS", PyTuple::new(py, names)?)?;
    Ok(())
}
