"""IKEv2 keying for the v2 data plane: the glue between :class:`simpletun.ike.Endpoint`
(sans-IO) and :class:`simpletun._core.DataPlane` (ESP-in-UDP on port 4500).

- UDP 4500 belongs to the data plane: ESP goes to the Rust threads, IKE messages (non-ESP
  marker, RFC 3948) come back as ``control`` events and are fed to the endpoint;
- UDP 500 is a plain socket owned here: IKE_SA_INIT (and anything a peer sends before NAT-T
  switch-over, RFC 7296 2.23); the endpoint moves to 4500 for IKE_AUTH by itself;
- every peer is a data-plane peer from the start (its allowed prefixes are its remote traffic
  selectors); a Child SA becomes an inbound SA, then the outbound SA (a rekey we answered
  switches outbound only once the old SA is deleted, as RFC 7296 2.8 says), and the replaced
  inbound SA stays valid for ``OLD_SA_GRACE`` seconds: no packet is lost across a rekey;
- the data plane's ``sa_limit`` event (soft sequence/byte limit) starts a Child SA rekey; IKE
  lifetimes and retransmissions are the endpoint's timers, run here in trio;
- a peer we initiate to is re-initiated when its IKE SA goes down or an initiation fails,
  after a capped exponential delay with jitter (:class:`Backoff`, reset once an IKE SA is up);
- over TCP (RFC 8229, ``stream=True``) one data-plane stream transport carries IKE (non-ESP
  marker) and ESP: an initiator connects to each peer's endpoint (and reconnects with backoff
  when the connection ends; an IKE SA that survives is told of the new connection by a DPD
  exchange, one that does not is re-initiated), a responder accepts many connections and
  closes those that carry no IKE SA after ``STREAM_IDLE`` seconds.

:class:`IkeGlue` is the socket-free part (tested with a fake data plane); :func:`run` adds
the sockets and trio tasks.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from dataclasses import dataclass, field

import trio

from simpletun._errors import SimpletunError
from simpletun.ike import (
    Endpoint,
    IkeSaDown,
    IkeSaRekeyed,
    IkeSaUp,
    InstallChildSa,
    PeerConfig,
    RemoveChildSa,
    Send,
)
from simpletun.ike import const as c

log = logging.getLogger("simpletun.ikesession")

IKE_PORT = c.IKE_PORT if hasattr(c, "IKE_PORT") else 500
NATT_PORT = c.NATT_PORT
# RFC 8229 gives IKE over TCP no default port (it suggests a port may be configured); 4500,
# the NAT-T port, is the common choice, so it is our default for TCP too (listen and connect).
TCP_PORT = NATT_PORT
OLD_SA_GRACE = 2.0  # seconds a replaced inbound SA stays valid
STREAM_IDLE = 30.0  # seconds an accepted TCP connection may go without an IKE SA
MAX_STREAMS = 1000  # accepted TCP connections at most (more are refused at once)
CONNECT_TIMEOUT = 10.0  # seconds for a TCP connect to an initiator's peer


@dataclass
class Backoff:
    """Delay before attempt n + 1 after n failures: ``initial * 2**n`` capped at ``cap``, less
    up to ``jitter`` of it at random (so many initiators do not retry in step); ``reset`` on
    success. Sans-IO: the caller adds the delay to its own clock."""

    initial: float = 1.0
    cap: float = 60.0
    jitter: float = 0.25
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failures: int = 0

    def next(self) -> float:
        d = min(self.initial * 2 ** min(self.failures, 32), self.cap)
        self.failures += 1
        return d * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.failures = 0


@dataclass
class ChildView:
    """One installed Child SA as ``simpletun status`` shows it."""

    spi_in: int
    spi_out: int
    suite: str
    ike_sa: str
    installed_at: float
    outbound: bool = False


@dataclass
class PeerState:
    config: PeerConfig
    dp_peer: int
    ike_sa: str | None = None
    remote_id: str | None = None
    children: dict[int, ChildView] = field(default_factory=dict)
    pending_out: dict[int, InstallChildSa] = field(default_factory=dict)  # old spi_in -> new


class IkeGlue:
    """Endpoint actions -> data plane calls and datagrams; data plane events -> endpoint.

    ``dp`` is a DataPlane (or a fake with the same methods), ``udp`` its UDP transport id on
    port 4500, ``send500(data, addr)`` sends a datagram from port 500. ``stream``: ``udp`` is
    an RFC 8229 stream transport instead (no port 500); the caller connects when
    :meth:`due_connects` says so and reports it with :meth:`connected`, and hands accepted
    connections to :meth:`accepted`. ``esp``: the transport ESP travels on when it is not
    ``udp`` (raw ESP, IP protocol 50: the endpoint must not force UDP encapsulation, and a
    Child SA that needs it, behind a NAT, is refused)."""

    def __init__(
        self, ep: Endpoint, dp, udp: int, send500, local_ip: str, clock=time.monotonic, *,
        stream: bool = False, backoff=Backoff, esp: int | None = None,
    ):  # fmt: skip
        self.ep = ep
        self.dp = dp
        self.udp = udp
        self.send500 = send500
        self.local_ip = local_ip
        self.clock = clock
        self.stream = stream
        self.esp = udp if esp is None else esp
        self.raw = esp is not None and esp != udp
        self.new_backoff = backoff
        self.peers: dict[str, PeerState] = {}
        self.down_initiators: dict[str, float] = {}  # peer name -> when to initiate again
        self.backoffs: dict[str, Backoff] = {}  # initiator peer name -> its re-initiation delay
        self.want_connect: dict[str, float] = {}  # stream: peer name -> when to (re)connect
        self.connecting: set[str] = set()  # stream: connects under way
        self.linked: set[str] = set()  # stream: initiator peers whose connection is up
        self.streams: dict[tuple, float] = {}  # stream: accepted connection -> when
        self.stats: dict[str, int] = {}
        self.changed = trio.Event() if _in_trio() else None
        self.on_sa_change = None  # called after a Child SA is installed or removed
        for p in ep.peers:
            self._add_dp_peer(p)

    # -- peers ---------------------------------------------------------------------------

    def _add_dp_peer(self, p: PeerConfig) -> None:
        endpoint = None
        if p.remote_addr is not None:
            port = p.remote_addr[1] if self.stream else 0 if self.raw else NATT_PORT
            endpoint = (p.remote_addr[0], port)
        self.peers[p.name] = PeerState(p, self.dp.add_peer(self.esp, list(p.remote_ts), endpoint))

    def _backoff(self, name: str) -> Backoff:
        return self.backoffs.setdefault(name, self.new_backoff())

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def add_peer(self, p: PeerConfig) -> list:
        if p.name in self.peers:
            raise SimpletunError(f"peer {p.name!r} exists already")
        self.ep.peers.append(p)
        self._add_dp_peer(p)
        return self.start(p)

    def remove_peer(self, name: str) -> None:
        st = self.peers.pop(name)
        for sa in self.ep.find(name):
            self.handle(self.ep.delete_ike(sa, self.clock()))
        self.ep.peers = [p for p in self.ep.peers if p.name != name]
        self.down_initiators.pop(name, None)
        self.backoffs.pop(name, None)
        self.want_connect.pop(name, None)
        if name in self.linked:
            self.linked.discard(name)
            self._drop_stream(tuple(st.config.remote_addr))
        self.dp.remove_peer(st.dp_peer)

    def start(self, p: PeerConfig) -> list:
        if p.remote_addr is None:
            return []
        if self.stream and not self._stream_up(p):
            self.want_connect.setdefault(p.name, self.clock())  # initiated once connected
            return []
        return self.handle(self.ep.initiate(p, self.clock()))

    # -- TCP (RFC 8229) connections ------------------------------------------------------

    def _stream_up(self, p: PeerConfig) -> bool:
        return p.name in self.linked

    def due_connects(self) -> list[PeerConfig]:
        """Initiator peers to connect to now (each is then in progress until
        :meth:`connected` or :meth:`connect_failed`)."""
        now = self.clock()
        due = [n for n, at in self.want_connect.items() if at <= now and n in self.peers]
        for n in due:
            del self.want_connect[n]
            self.connecting.add(n)
        return [self.peers[n].config for n in due]

    def connected(self, name: str) -> None:
        """The TCP connection to ``name`` is the data plane's now: an IKE SA that is up hears
        of it by DPD (so the responder follows the new connection); else initiate."""
        self.connecting.discard(name)
        st = self.peers.get(name)
        if st is None:
            return
        self.linked.add(name)
        self.count("tcp_connected")
        established = self.ep.find(name)
        for sa in established:
            self.handle(self.ep.dpd(sa, self.clock()))
        if not established and not self._initiating(name):
            self.handle(self.ep.initiate(st.config, self.clock()))
        # (an initiation under way retransmits on the new connection by itself)

    def _initiating(self, name: str) -> bool:
        return any(s.peer is not None and s.peer.name == name and s.state != "dead"
                   for s in self.ep.sas.values())  # fmt: skip

    def connect_failed(self, name: str, why: str) -> None:
        self.connecting.discard(name)
        if name in self.peers:
            self.count("tcp_connect_failed")
            delay = self._backoff(name).next()
            log.info("TCP connection to %s failed: %s; again in %.1f s", name, why, delay)
            self.want_connect[name] = self.clock() + delay

    def accepted(self, addr: tuple[str, int]) -> bool:
        """A connection a peer opened; False: refuse it (too many)."""
        if len(self.streams) >= MAX_STREAMS:
            self.count("tcp_refused")
            return False
        self.streams[tuple(addr)] = self.clock()
        self.count("tcp_accepted")
        return True

    def _drop_stream(self, addr: tuple) -> None:
        try:
            self.dp.remove_tcp_connection(self.udp, addr)
        except SimpletunError:
            pass

    def _closed(self, addr: tuple, reason: str) -> None:
        self.count("tcp_closed")
        if "IKETCP" in reason:  # the data plane refused a stream without the RFC 8229 prefix
            self.count("tcp_bad_prefix")
        self.streams.pop(addr, None)
        for name, st in self.peers.items():
            ra = st.config.remote_addr
            if ra is not None and tuple(ra) == addr and name not in self.connecting:
                self.linked.discard(name)
                delay = self._backoff(name).next()  # reset when an IKE SA comes up
                log.info("TCP connection to %s (%s) closed: %s; reconnecting in %.1f s",
                         name, _fmt_ep(addr), reason, delay)  # fmt: skip
                self.want_connect[name] = self.clock() + delay
                return
        log.debug("TCP connection from %s closed: %s", _fmt_ep(addr), reason)

    def _sweep_streams(self, now: float) -> None:
        """Close accepted connections that carried no IKE SA for STREAM_IDLE seconds."""
        used = {tuple(s.remote) for s in self.ep.sas.values() if s.state != "dead"}
        for addr, at in list(self.streams.items()):
            if addr in used:
                self.streams[addr] = now
            elif now - at >= STREAM_IDLE:
                del self.streams[addr]
                self.count("tcp_idle_closed")
                log.debug("TCP connection from %s carries no IKE SA: closed", _fmt_ep(addr))
                self._drop_stream(addr)

    # -- endpoint actions ----------------------------------------------------------------

    def _peer_of_sa(self, sa_name: str) -> PeerState | None:
        for sa in self.ep.sas.values():
            if sa.name == sa_name and sa.peer is not None:
                return self.peers.get(sa.peer.name)
        for st in self.peers.values():
            if st.ike_sa == sa_name:
                return st
        return None

    def handle(self, actions: list) -> list:
        for a in actions:
            try:
                self._one(a)
            except SimpletunError as e:
                log.warning("cannot apply %s: %s", type(a).__name__, e)
        if self.changed is not None:
            self.changed.set()
        return actions

    def _one(self, a) -> None:
        if isinstance(a, Send):
            if self.stream:
                # RFC 8229: one stream for IKE and ESP, no NAT keepalives (TCP has its own)
                if a.data != b"\xff":
                    self.dp.send_control(self.udp, a.remote, a.data)
            elif a.local_port == NATT_PORT and a.data == b"\xff":
                self.dp.send_keepalive(self.udp, a.remote)  # RFC 3948 NAT-keepalive
            elif a.local_port == NATT_PORT:
                self.dp.send_control(self.udp, a.remote, a.data)
            else:
                self.send500(a.data, a.remote)
        elif isinstance(a, IkeSaUp):
            st = self.peers.get(a.peer)
            if st is not None:
                st.ike_sa, st.remote_id = a.sa, a.remote_id
                if self.stream:
                    # both ends announced super-packets in IKE_AUTH (RFC 8229 stream only)
                    self.dp.set_peer_super(st.dp_peer, a.super_packets)
                self.down_initiators.pop(a.peer, None)
                self._backoff(a.peer).reset()
        elif isinstance(a, IkeSaDown):
            st = self.peers.get(a.peer)
            # our IKE SA went down, or an initiation failed (it never came up)
            if st is not None and st.ike_sa in (a.sa, None):
                st.ike_sa = None
                live = any(s.state != "dead" for s in self.ep.find(a.peer))
                if st.config.remote_addr is not None and not live:
                    delay = self._backoff(a.peer).next()
                    log.info("initiating to %s again in %.1f s", a.peer, delay)
                    self.down_initiators[a.peer] = self.clock() + delay
        elif isinstance(a, IkeSaRekeyed):
            st = self.peers.get(a.peer)
            if st is not None and st.ike_sa == a.old:
                st.ike_sa = a.new  # the peer's IKE SA is the new one now (RFC 7296 2.18)
        elif isinstance(a, InstallChildSa):
            self._install(a)
        elif isinstance(a, RemoveChildSa):
            self._remove(a)

    def _install(self, a: InstallChildSa) -> None:
        st = self._peer_of_sa(a.sa)
        if st is None:
            log.warning("Child SA %08x of unknown IKE SA %s not installed", a.spi_in, a.sa)
            return
        if self.raw and a.encap is not None:
            # raw ESP (protocol 50) cannot cross the NAT the endpoint detected
            log.warning(
                "Child SA %08x of %s not installed: a NAT lies between us and the peer, and "
                'raw ESP cannot cross it; use transport = "udp" (ESP-in-UDP)',
                a.spi_in, st.config.name,
            )  # fmt: skip
            self.count("child_sa_refused_nat")
            ike = next((s for s in self.ep.sas.values() if s.name == a.sa), None)
            if ike is not None:
                self.handle(self.ep.delete_child(ike, a.spi_in, self.clock()))
            return
        esn = a.suite.esn
        # The endpoint first: a kernel SA needs the peer's address.
        if a.encap is not None:
            self.dp.set_endpoint(st.dp_peer, tuple(a.encap[1]))
        elif self.raw:
            ike = next((s for s in self.ep.sas.values() if s.name == a.sa), None)
            if ike is not None:
                self.dp.set_endpoint(st.dp_peer, (ike.remote[0], 0))
        self.dp.add_inbound_sa(st.dp_peer, a.spi_in, a.enc_in, a.auth_in, esn=esn)
        view = ChildView(a.spi_in, a.spi_out, a.suite.name(), a.sa, self.clock())
        st.children[a.spi_in] = view
        if a.initiator or a.rekey_of is None or a.rekey_of not in st.children:
            self._switch_out(st, a)
        else:
            st.pending_out[a.rekey_of] = a
        if self.on_sa_change is not None:
            self.on_sa_change()

    def _switch_out(self, st: PeerState, a: InstallChildSa) -> None:
        p = st.config
        limits = {k: v for k, v in (("soft_packets", p.rekey_packets),
                                    ("soft_bytes", p.rekey_bytes)) if v is not None}  # fmt: skip
        self.dp.set_outbound_sa(
            st.dp_peer, a.spi_out, a.enc_out, a.auth_out, esn=a.suite.esn, **limits
        )
        for v in st.children.values():
            v.outbound = v.spi_in == a.spi_in

    def _remove(self, a: RemoveChildSa) -> None:
        st = self._peer_of_sa(a.sa)
        if st is None:
            st = next((s for s in self.peers.values() if a.spi_in in s.children), None)
        if st is None:
            return
        pending = st.pending_out.pop(a.spi_in, None)
        if pending is not None:
            self._switch_out(st, pending)
        view = st.children.pop(a.spi_in, None)
        if view is not None and view.outbound:
            self.dp.clear_outbound_sa(st.dp_peer)
        try:
            self.dp.remove_inbound_sa(a.spi_in, OLD_SA_GRACE)
        except SimpletunError:
            pass
        if self.on_sa_change is not None:
            self.on_sa_change()

    # -- input ---------------------------------------------------------------------------

    def receive(self, data: bytes, local_port: int, remote: tuple[str, int]) -> None:
        self.handle(self.ep.receive(data, (self.local_ip, local_port), remote, self.clock()))
        if self.stream:
            self._follow_stream(tuple(remote))

    def _follow_stream(self, remote: tuple) -> None:
        """An IKE SA that now lives on the connection ``remote`` (it followed an authenticated
        message there, e.g. the DPD after a reconnect) takes its peer's ESP along at once,
        not only once the peer's first ESP packet arrives on it."""
        for sa in self.ep.sas.values():
            if sa.remote != remote or sa.peer is None or sa.state == "dead":
                continue
            st = self.peers.get(sa.peer.name)
            if st is not None and st.children:
                if self.dp.endpoint(st.dp_peer) != remote:
                    self.dp.set_endpoint(st.dp_peer, remote)

    def on_event(self, ev) -> None:
        kind = ev[0]
        if kind == "control":
            _, tid, addr, payload = ev
            if tid == self.udp:
                self.receive(payload, NATT_PORT, (addr[0], addr[1]))
        elif kind == "closed":
            _, tid, addr, reason = ev
            if tid == self.udp:
                self._closed(tuple(addr), reason)
        elif kind == "sa_limit":
            _, peer, spi_out, seq, nbytes = ev
            self._rekey_out(peer, spi_out, f"seq {seq}, {nbytes} bytes")
        elif kind == "no_sa":
            st = self._by_dp_peer(ev[1])
            if st is not None and st.config.remote_addr is not None and not st.ike_sa:
                self.down_initiators.setdefault(st.config.name, self.clock())
        else:
            log.debug("data plane event %s", ev)

    def _by_dp_peer(self, dp_peer: int) -> PeerState | None:
        return next((s for s in self.peers.values() if s.dp_peer == dp_peer), None)

    def _rekey_out(self, dp_peer: int, spi_out: int, why: str) -> None:
        st = self._by_dp_peer(dp_peer)
        if st is None:
            return
        child = next((v for v in st.children.values() if v.spi_out == spi_out), None)
        sas = self.ep.find(st.config.name)
        if child is None or not sas:
            return
        sa = next((s for s in sas if s.name == child.ike_sa), sas[0])
        log.info("Child SA %08x_o of %s near its limit (%s): rekeying", spi_out, sa.name, why)
        self.handle(self.ep.rekey_child(sa, child.spi_in, self.clock()))

    def tick(self) -> None:
        now = self.clock()
        dl = self.ep.next_deadline()
        if dl is not None and dl <= now:
            self.handle(self.ep.tick(now))
        if self.stream:
            self._sweep_streams(now)
        for name, at in list(self.down_initiators.items()):
            if at <= now and name in self.peers and not self.peers[name].ike_sa:
                del self.down_initiators[name]
                if not self._initiating(name):
                    self.start(self.peers[name].config)

    def next_wakeup(self) -> float | None:
        times = [t for t in [self.ep.next_deadline(), *self.down_initiators.values(),
                             *self.want_connect.values()] if t]  # fmt: skip
        return min(times) if times else None

    # -- status --------------------------------------------------------------------------

    def status(self) -> list[dict]:
        now = self.clock()
        sas: dict = {}  # (spi, inbound) -> the data plane's view of that SA
        try:
            for s in self.dp.sas():
                sas[(s.get("spi"), bool(s.get("inbound")))] = s
        except (SimpletunError, AttributeError):  # a fake without sas(): no per-SA figures
            pass
        out = []
        for name, st in self.peers.items():
            children = []
            for v in st.children.values():
                rx, tx = sas.get((v.spi_in, True), {}), sas.get((v.spi_out, False), {})
                children.append({
                    "spi_in": f"{v.spi_in:08x}", "spi_out": f"{v.spi_out:08x}",
                    "suite": v.suite, "age": round(now - v.installed_at, 1),
                    "outbound": v.outbound,
                    "seq_in": rx.get("rx_highest_seq"), "packets_in": rx.get("decap_packets"),
                    "seq_out": tx.get("tx_seq"), "packets_out": tx.get("encap_packets"),
                })  # fmt: skip
            try:
                stats = dict(self.dp.peer_stats(st.dp_peer))
            except SimpletunError:
                stats = {}
            out.append({
                "name": name, "ike_sa": st.ike_sa, "remote_id": st.remote_id,
                "endpoint": _fmt_ep(self.dp.endpoint(st.dp_peer)),
                "allowed": list(st.config.remote_ts), "child_sas": children, "stats": stats,
            })  # fmt: skip
        return out


def _fmt_ep(ep) -> str | None:
    if ep is None:
        return None
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
        return True
    except RuntimeError:
        return False


def ike_sockets(local_ip: str, port500: int = 500, port4500: int = NATT_PORT):
    """The two UDP sockets of an IKE speaker bound to ``local_ip``."""
    from simpletun.datagram import _no_pmtu

    fam = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    socks = []
    try:
        for port in (port500, port4500):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((local_ip, port))
        _no_pmtu(socks[1])
    except OSError as e:
        for s in socks:
            s.close()
        raise SimpletunError(
            f"cannot bind the IKE ports on {local_ip}: {e.strerror or e}"
        ) from None
    return socks[0], socks[1]


async def run(
    tun_fd: int,
    ep: Endpoint,
    sock500: socket.socket | None,
    sock4500: socket.socket | None,
    local_ip: str,
    *,
    tap: bool = False,
    soft_seq: int | None = None,
    soft_bytes: int | None = None,
    tcp: bool = False,
    listener: socket.socket | None = None,
    raw_sock: socket.socket | None = None,
    queue_fds: list[int] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the IKE speaker ``ep`` with a DataPlane on ``tun_fd``; ``task_status.started``
    gets the :class:`IkeGlue`. The caller keeps (and closes) the sockets and the device.
    The data plane carries ESP-in-UDP only, so the endpoint always asks for UDP
    encapsulation (``force_encap``). ``tcp``: IKE and ESP over TCP (RFC 8229) instead of
    the two UDP sockets (pass None for them): initiator peers are connected to, and
    ``listener`` (a listening TCP socket, or None) accepts connections from peers.
    ``raw_sock``: ESP goes as IP protocol 50 on this raw socket instead (IKE stays on the UDP
    sockets; no forced encapsulation, so without a NAT IKE stays on port 500)."""
    ep.force_encap = raw_sock is None
    ep.natt_from_start = tcp
    from simpletun._core import DataPlane
    from simpletun.datagram import _events, _watch_done

    kw = {k: v for k, v in (("soft_seq", soft_seq), ("soft_bytes", soft_bytes)) if v is not None}
    dp = DataPlane(tun_fd, tap=tap, queue_fds=queue_fds or [], **kw)
    try:
        esp = None
        if tcp:
            udp = dp.add_tcp(rfc8229=True)
        else:
            udp = dp.add_udp(sock4500.fileno())
            if raw_sock is not None:
                esp = dp.add_raw_esp(raw_sock.fileno())

        def send500(data: bytes, addr) -> None:
            try:
                sock500.sendto(data, addr)
            except OSError as e:
                log.debug("sending to %s from port 500 failed: %s", addr, e)

        glue = IkeGlue(ep, dp, udp, send500, local_ip, stream=tcp, esp=esp)
        glue.dp_obj = dp

        async def connect(p: PeerConfig) -> None:
            host, port = p.remote_addr
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    s = await _tcp_connect(local_ip, host, port)
            except (OSError, trio.TooSlowError) as e:
                why = "timed out" if isinstance(e, trio.TooSlowError) else (e.strerror or str(e))
                glue.connect_failed(p.name, why)
                return
            with s:
                try:
                    dp.add_tcp_connection(udp, s.fileno(), (host, port), opened_by_us=True)
                except (SimpletunError, OSError) as e:
                    glue.connect_failed(p.name, str(e))
                    return
            log.info("TCP connection to %s (%s) up", p.name, _fmt_ep((host, port)))
            glue.connected(p.name)

        async def accept(nursery) -> None:
            lst = trio.socket.from_stdlib_socket(listener)
            while True:
                try:
                    s, addr = await lst.accept()
                except OSError as e:  # e.g. EMFILE: count, wait a little, go on
                    glue.count("tcp_accept_failed")
                    log.debug("accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                with s:
                    if glue.accepted((addr[0], addr[1])):
                        try:
                            dp.add_tcp_connection(udp, s.fileno(), (addr[0], addr[1]))
                        except (SimpletunError, OSError) as e:
                            glue.streams.pop((addr[0], addr[1]), None)
                            log.debug("TCP connection from %s not taken: %s", addr, e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_events, dp, glue.on_event)
            nursery.start_soon(_watch_done, dp)
            if not tcp:
                s500 = trio.socket.from_stdlib_socket(sock500)
                nursery.start_soon(_recv, glue, s500, sock500.getsockname()[1])
            elif listener is not None:
                nursery.start_soon(accept, nursery)
            nursery.start_soon(_timers, glue, lambda p: nursery.start_soon(connect, p))
            for p in list(ep.peers):
                glue.start(p)
            task_status.started(glue)
    finally:
        with trio.CancelScope(shield=True):
            _goodbye(
                locals().get("glue"), ep, lambda a: dp.send_control(udp, a.remote, a.data),
                locals().get("send500") if sock500 is not None else None,  # IKE on 500
            )  # fmt: skip
            await trio.to_thread.run_sync(dp.stop)


async def _tcp_connect(local_ip: str, host: str, port: int) -> socket.socket:
    """A TCP connection from ``local_ip`` to ``host:port`` (a stdlib socket, blocking)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = trio.socket.socket(fam, socket.SOCK_STREAM)
    try:
        if local_ip and local_ip not in ("0.0.0.0", "::"):
            await s.bind((local_ip, 0))
        await s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return socket.socket(fileno=s.detach())


def tcp_listener(local_ip: str, port: int) -> socket.socket:
    """The listening TCP socket of an RFC 8229 responder on ``local_ip:port``."""
    fam = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((local_ip, port))
        s.listen(128)
    except OSError as e:
        s.close()
        raise SimpletunError(
            f"cannot listen on TCP {local_ip} port {port}: {e.strerror or e}"
        ) from None
    return s


async def _recv(glue: IkeGlue, sock, port: int) -> None:
    """IKE datagrams of one (trio) socket to the endpoint."""
    while True:
        data, addr = await sock.recvfrom(65535)
        glue.receive(data, port, (addr[0], addr[1]))


async def _timers(glue: IkeGlue, connect=None) -> None:
    """The endpoint's timers (retransmissions, lifetimes, DPD) and re-initiations; over TCP,
    ``connect(peer)`` opens the connections that are due."""
    while True:
        glue.changed = trio.Event()
        wake = glue.next_wakeup()
        delay = 1.0 if wake is None else max(0.0, wake - time.monotonic())
        with trio.move_on_after(min(delay, 1.0)):
            await glue.changed.wait()
        glue.tick()
        if connect is not None:
            for p in glue.due_connects():
                connect(p)


def _goodbye(glue: IkeGlue | None, ep: Endpoint, send4500, send500=None) -> None:
    """On exit: delete every IKE SA, telling the peers (port 4500 messages via ``send4500``;
    with raw ESP, port 500 ones via ``send500(data, addr)``)."""
    for st in list(getattr(glue, "peers", {}).values()):
        for sa in ep.find(st.config.name):
            for a in ep.delete_ike(sa, time.monotonic()):
                if not isinstance(a, Send):
                    continue
                try:
                    if a.local_port == NATT_PORT:
                        send4500(a)
                    elif send500 is not None:
                        send500(a.data, a.remote)
                except (SimpletunError, OSError):
                    pass


async def run_with_plane(
    plane, ep: Endpoint, sock500, sock4500, local_ip: str, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """:func:`run` with another data plane (``kernel_dp.KernelPlane``): IKE on port 4500 is
    read from ``sock4500`` itself (the kernel takes the ESP on it). The caller owns the
    sockets and the plane; ``task_status.started`` gets the :class:`IkeGlue`."""
    ep.force_encap = True
    s500 = trio.socket.from_stdlib_socket(sock500)
    s4500 = trio.socket.from_stdlib_socket(sock4500)

    def send500(data: bytes, addr) -> None:
        try:
            sock500.sendto(data, addr)
        except OSError as e:
            log.debug("sending to %s from port 500 failed: %s", addr, e)

    glue = IkeGlue(ep, plane, 0, send500, local_ip)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_recv, glue, s500, sock500.getsockname()[1])
            nursery.start_soon(_recv, glue, s4500, NATT_PORT)
            nursery.start_soon(_timers, glue)
            for p in list(ep.peers):
                glue.start(p)
            task_status.started(glue)
    finally:
        with trio.CancelScope(shield=True):
            _goodbye(glue, ep, lambda a: sock4500.sendto(a.data, tuple(a.remote)))


# -- from a config file ------------------------------------------------------------------------


@dataclass(frozen=True)
class IkePeerSpec:
    """One [[peer]] of an IKEv2 tunnel, validated by simpletun.configfile."""

    name: str
    identity: str | None  # the peer's IKE ID; None: any that authenticates (one peer only)
    endpoint: tuple[str, int] | None  # we initiate to it; None: responder only
    allowed_ips: tuple  # remote traffic selectors, routes, data-plane prefixes
    local_ips: tuple  # local traffic selectors
    psk: bytes | None = field(default=None, repr=False)
    public_key: object | None = field(default=None, repr=False)  # Ed25519PublicKey
    rekey_time: int | None = None  # Child SA soft lifetime, seconds
    ike_rekey_time: int | None = None
    dpd_delay: int | None = None
    rekey_packets: int | None = None  # outbound Child SA soft limits (the data plane's)
    rekey_bytes: int | None = None


@dataclass(frozen=True)
class IkeSetup:
    local_ip: str
    local_id: str | None
    private_key: bytes | None = field(default=None, repr=False)  # 32 bytes (simpletun genkey)
    peers: tuple[IkePeerSpec, ...] = ()
    transport: str = "udp"  # "tcp": IKE and ESP over TCP (RFC 8229); "raw": ESP as protocol 50
    listen_port: int | None = None  # tcp: the port we accept peers on (None: no listener)


def peer_config(setup: IkeSetup, sp: IkePeerSpec) -> PeerConfig:
    from simpletun.ike import Identity
    from simpletun.ike.keys import private_key

    kw: dict = {}
    if sp.psk is not None:
        kw["psk"] = sp.psk
    else:
        kw["private_key"] = private_key(setup.private_key)
        kw["remote_public_key"] = sp.public_key
    return PeerConfig(
        name=sp.name,
        local_ts=[str(n) for n in sp.local_ips],
        remote_ts=[str(n) for n in sp.allowed_ips],
        local_id=Identity.parse(setup.local_id) if setup.local_id else None,
        remote_id=Identity.parse(sp.identity) if sp.identity else None,
        remote_addr=sp.endpoint,
        local_addr=setup.local_ip,
        child_rekey_time=sp.rekey_time,
        ike_rekey_time=sp.ike_rekey_time,
        rand_time=min(60.0, (sp.rekey_time or 0) / 10),
        dpd_delay=sp.dpd_delay,
        rekey_packets=sp.rekey_packets,
        rekey_bytes=sp.rekey_bytes,
        **kw,
    )


class IkeTunnel:
    """Live state of an IKEv2 tunnel (what the service, ``status`` and the API look at)."""

    def __init__(self, config, device) -> None:
        self.config = config
        self.device = device
        self.glue: IkeGlue | None = None
        self.session = None
        self.sessions = 0
        self.handshake_failures = 0
        self.last_exit_reason: str | None = None
        self.port = NATT_PORT
        self._sa_changed = trio.Event()

    def _sa_change(self) -> None:
        self._sa_changed.set()
        self._sa_changed = trio.Event()

    def stats(self) -> dict:
        """The data plane's device-level counters (all peers; {} before it runs)."""
        dp = getattr(self.glue, "dp", None)
        try:
            return dict(dp.stats) if dp is not None else {}  # a property of DataPlane
        except (SimpletunError, AttributeError):
            return {}

    def is_up(self, peer: str | None = None) -> bool:
        """Whether ``peer`` (by name; any peer if None) has a Child SA."""
        glue = self.glue
        if glue is None:
            return False
        return any(st.children for n, st in glue.peers.items() if peer is None or n == peer)

    async def wait_up(self, peer: str | None = None) -> None:
        """Until ``peer`` (any peer if None) has a Child SA; woken by SA changes, no polling."""
        if peer is not None and peer not in {sp.name for sp in self.config.ike.peers}:
            raise SimpletunError(f"no peer named {peer!r} in this tunnel")
        while not self.is_up(peer):
            await self._sa_changed.wait()

    def status(self) -> dict:
        peers = self.glue.status() if self.glue is not None else []
        c = self.config
        for p in peers:  # the keys `simpletun status` (commands.format_status) prints
            st = p["stats"]
            p["allowed_ips"] = p["allowed"]
            p["connected"] = bool(p["child_sas"])
            ages = [ch["age"] for ch in p["child_sas"]]
            p["latest_handshake"] = round(time.time() - min(ages), 3) if ages else None
            for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
                p[k] = st.get(k, 0)
            p["drops"] = {k[5:]: v for k, v in st.items() if k.startswith("drop_") and v}
            p["sas"] = [
                sa
                for ch in p["child_sas"]
                for sa in (
                    {"direction": "in", "spi": "0x" + ch["spi_in"], "age": ch["age"],
                     "seq": ch["seq_in"] or 0, "packets": ch["packets_in"] or 0},
                    {"direction": "out" if ch["outbound"] else "out (standby)",
                     "spi": "0x" + ch["spi_out"], "age": ch["age"],
                     "seq": ch["seq_out"] or 0, "packets": ch["packets_out"] or 0},
                )
            ]  # fmt: skip
        return {
            "interface": getattr(self.device, "name", c.ifname),
            "mode": "tap" if c.tap else "tun",
            "encryption": "ESP keyed by IKEv2",
            "role": "ikev2",
            "transport": c.ike.transport,
            "dataplane": c.dataplane,
            "key_exchange": "ikev2",
            "listen_address": c.ike.local_ip,
            "listen_port": c.ike.listen_port if c.ike.transport == "tcp" else NATT_PORT,
            "mtu": c.mtu,
            "addresses": [str(a) for a in c.addresses],
            "up": any(p["child_sas"] for p in peers),
            "peers": peers,
            # the IKE endpoint's drop/event counters and the driver's (TCP connections)
            "ike_counters": (
                {**self.glue.ep.stats, **self.glue.stats} if self.glue is not None else {}
            ),
        }

    def apply_peers(self, setup: IkeSetup) -> dict:
        """Add the peers of ``setup`` we do not have, remove those it no longer has; the
        others (and their traffic) are untouched."""
        glue = self.glue
        old = {sp.name: sp for sp in self.config.ike.peers}
        new = {sp.name: sp for sp in setup.peers}
        removed = [n for n in old if n not in new or new[n] != old[n]]
        added = [n for n in new if n not in old or new[n] != old[n]]
        for n in removed:
            if n in glue.peers:
                glue.remove_peer(n)
        for n in added:
            glue.add_peer(peer_config(setup, new[n]))
        from dataclasses import replace

        self.config = replace(self.config, ike=setup)
        log.info("peers: added %s, removed %s", added or "none", removed or "none")
        return {"peers_added": added, "peers_removed": removed}


async def run_config(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """``simpletun up`` of a config with ``key_exchange = "ikev2"``: the device with its
    routes, the IKE sockets and :func:`run`; ``task_status.started`` gets an IkeTunnel."""
    from simpletun import netdev, session

    setup: IkeSetup = config.ike
    device = await trio.to_thread.run_sync(session._open, config)
    try:
        tcp = setup.transport == "tcp"
        if tcp:
            s500 = s4500 = None
            socks = [tcp_listener(setup.local_ip, setup.listen_port)] if setup.listen_port else []
            where = f"TCP {setup.listen_port} (RFC 8229)" if socks else "TCP (RFC 8229)"
        else:
            s500, s4500 = socks = list(ike_sockets(setup.local_ip))
            where = "UDP 500/4500"
            if setup.transport == "raw":
                from simpletun.datagram import raw_esp_socket

                fam = socket.AF_INET6 if ":" in setup.local_ip else socket.AF_INET
                try:
                    socks.append(raw_esp_socket(fam))
                except OSError as e:
                    for s in socks:
                        s.close()
                    raise SimpletunError(
                        f"cannot open a raw ESP socket: {e.strerror or e} (raw ESP needs root)"
                    ) from None
                where += ", ESP as IP protocol 50"
        try:
            ep = Endpoint([peer_config(setup, sp) for sp in setup.peers])
            ep.super_packets = tcp and "tso" in (getattr(device, "offloads", None) or "").split("+")
            tunnel = IkeTunnel(config, device)
            log.info(
                "IKEv2 on %s, %s %s, %d peer(s)",
                device.name, setup.local_ip, where, len(setup.peers),
            )  # fmt: skip
            kw = {"tcp": tcp, "listener": socks[0] if tcp and socks else None}
            kw["queue_fds"] = device.queue_fds
            if setup.transport == "raw":
                kw["raw_sock"] = socks[2]
            async with trio.open_nursery() as n:
                tunnel.glue = await n.start(
                    partial_run(device.fd, ep, s500, s4500, setup.local_ip, config.tap, **kw)
                )
                tunnel.glue.on_sa_change = tunnel._sa_change
                task_status.started(tunnel)
        finally:
            for s in socks:
                s.close()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(netdev.close_device, device)


def partial_run(fd, ep, s500, s4500, local_ip, tap, **kw):
    async def go(*, task_status=trio.TASK_STATUS_IGNORED):
        await run(fd, ep, s500, s4500, local_ip, tap=tap, task_status=task_status, **kw)

    return go


def cli_setup(
    server: bool, host: str | None, listen: str | None, psk: bytes, routes, *,
    transport: str = "udp", port: int | None = None,
) -> IkeSetup:  # fmt: skip
    """``-s --listen ADDR`` / ``-c HOST`` with ``--key-exchange ikev2``: one peer, the
    --key file as PSK, IDs = IP addresses (any authenticated ID accepted), traffic selectors
    everything (narrowed by nothing: one peer owns all prefixes), routes from --route.
    ``transport = "tcp"``: RFC 8229 on ``port`` (default TCP_PORT); a server listens there."""
    tcp_port = port or TCP_PORT
    from simpletun._errors import ConfigError

    endpoint = None
    if server:
        local_ip = listen
    else:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            info = socket.getaddrinfo(host, 500, fam, socket.SOCK_DGRAM)[0]
            with socket.socket(info[0], socket.SOCK_DGRAM) as s:
                s.connect(info[4])  # no packet: only asks which source address a route gives
                local_ip = s.getsockname()[0]
        except OSError as e:
            raise ConfigError(f"cannot reach the IKEv2 peer {host!r}: {e.strerror or e}") from None
        endpoint = (info[4][0], tcp_port if transport == "tcp" else IKE_PORT)
    every = ("0.0.0.0/0",) if ":" not in local_ip else ("::/0",)
    peer = IkePeerSpec(
        name="peer", identity=None, endpoint=endpoint, allowed_ips=every, local_ips=every,
        psk=psk,
    )  # fmt: skip
    listen_port = tcp_port if transport == "tcp" and server else None
    return IkeSetup(local_ip, None, None, (peer,), transport, listen_port)
