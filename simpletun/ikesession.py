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
- a peer we initiate to is re-initiated when its IKE SA goes down.

:class:`IkeGlue` is the socket-free part (tested with a fake data plane); :func:`run` adds
the sockets and trio tasks.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

import trio

from simpletun._errors import SimpletunError
from simpletun.ike import (
    Endpoint,
    IkeSaDown,
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
OLD_SA_GRACE = 2.0  # seconds a replaced inbound SA stays valid
REINITIATE_AFTER = 2.0  # seconds between an initiator's IKE SA going down and a new attempt


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
    port 4500, ``send500(data, addr)`` sends a datagram from port 500."""

    def __init__(self, ep: Endpoint, dp, udp: int, send500, local_ip: str, clock=time.monotonic):
        self.ep = ep
        self.dp = dp
        self.udp = udp
        self.send500 = send500
        self.local_ip = local_ip
        self.clock = clock
        self.peers: dict[str, PeerState] = {}
        self.down_initiators: dict[str, float] = {}  # peer name -> when to initiate again
        self.changed = trio.Event() if _in_trio() else None
        self.on_sa_change = None  # called after a Child SA is installed or removed
        for p in ep.peers:
            self._add_dp_peer(p)

    # -- peers ---------------------------------------------------------------------------

    def _add_dp_peer(self, p: PeerConfig) -> None:
        endpoint = (p.remote_addr[0], NATT_PORT) if p.remote_addr is not None else None
        self.peers[p.name] = PeerState(p, self.dp.add_peer(self.udp, list(p.remote_ts), endpoint))

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
        self.dp.remove_peer(st.dp_peer)

    def start(self, p: PeerConfig) -> list:
        if p.remote_addr is None:
            return []
        return self.handle(self.ep.initiate(p, self.clock()))

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
            if a.local_port == NATT_PORT and a.data == b"\xff":
                self.dp.send_keepalive(self.udp, a.remote)  # RFC 3948 NAT-keepalive
            elif a.local_port == NATT_PORT:
                self.dp.send_control(self.udp, a.remote, a.data)
            else:
                self.send500(a.data, a.remote)
        elif isinstance(a, IkeSaUp):
            st = self.peers.get(a.peer)
            if st is not None:
                st.ike_sa, st.remote_id = a.sa, a.remote_id
                self.down_initiators.pop(a.peer, None)
        elif isinstance(a, IkeSaDown):
            st = self.peers.get(a.peer)
            if st is not None and st.ike_sa == a.sa:
                st.ike_sa = None
                if st.config.remote_addr is not None:
                    self.down_initiators[a.peer] = self.clock() + REINITIATE_AFTER
        elif isinstance(a, InstallChildSa):
            self._install(a)
        elif isinstance(a, RemoveChildSa):
            self._remove(a)

    def _install(self, a: InstallChildSa) -> None:
        st = self._peer_of_sa(a.sa)
        if st is None:
            log.warning("Child SA %08x of unknown IKE SA %s not installed", a.spi_in, a.sa)
            return
        esn = a.suite.esn
        if a.encap is not None:  # first: a kernel SA needs the peer's address
            self.dp.set_endpoint(st.dp_peer, tuple(a.encap[1]))
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
        self.dp.set_outbound_sa(st.dp_peer, a.spi_out, a.enc_out, a.auth_out, esn=a.suite.esn)
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

    def on_event(self, ev) -> None:
        kind = ev[0]
        if kind == "control":
            _, tid, addr, payload = ev
            if tid == self.udp:
                self.receive(payload, NATT_PORT, (addr[0], addr[1]))
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
        for name, at in list(self.down_initiators.items()):
            if at <= now and name in self.peers and not self.peers[name].ike_sa:
                del self.down_initiators[name]
                if not any(s.peer is not None and s.peer.name == name for s in self.ep.sas.values()
                           if s.state != "dead"):  # fmt: skip
                    self.start(self.peers[name].config)

    def next_wakeup(self) -> float | None:
        times = [t for t in [self.ep.next_deadline(), *self.down_initiators.values()] if t]
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
    sock500: socket.socket,
    sock4500: socket.socket,
    local_ip: str,
    *,
    tap: bool = False,
    soft_seq: int | None = None,
    soft_bytes: int | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the IKE speaker ``ep`` with a DataPlane on ``tun_fd``; ``task_status.started``
    gets the :class:`IkeGlue`. The caller keeps (and closes) the sockets and the device.
    The data plane carries ESP-in-UDP only, so the endpoint always asks for UDP
    encapsulation (``force_encap``)."""
    ep.force_encap = True
    from simpletun._core import DataPlane
    from simpletun.datagram import _events, _watch_done

    kw = {k: v for k, v in (("soft_seq", soft_seq), ("soft_bytes", soft_bytes)) if v is not None}
    dp = DataPlane(tun_fd, tap=tap, **kw)
    s500 = trio.socket.from_stdlib_socket(sock500)
    try:
        udp = dp.add_udp(sock4500.fileno())

        def send500(data: bytes, addr) -> None:
            try:
                sock500.sendto(data, addr)
            except OSError as e:
                log.debug("sending to %s from port 500 failed: %s", addr, e)

        glue = IkeGlue(ep, dp, udp, send500, local_ip)
        glue.dp_obj = dp

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_events, dp, glue.on_event)
            nursery.start_soon(_watch_done, dp)
            nursery.start_soon(_recv, glue, s500, sock500.getsockname()[1])
            nursery.start_soon(_timers, glue)
            for p in list(ep.peers):
                glue.start(p)
            task_status.started(glue)
    finally:
        with trio.CancelScope(shield=True):
            _goodbye(locals().get("glue"), ep, lambda a: dp.send_control(udp, a.remote, a.data))
            await trio.to_thread.run_sync(dp.stop)


async def _recv(glue: IkeGlue, sock, port: int) -> None:
    """IKE datagrams of one (trio) socket to the endpoint."""
    while True:
        data, addr = await sock.recvfrom(65535)
        glue.receive(data, port, (addr[0], addr[1]))


async def _timers(glue: IkeGlue) -> None:
    """The endpoint's timers (retransmissions, lifetimes, DPD) and re-initiations."""
    while True:
        glue.changed = trio.Event()
        wake = glue.next_wakeup()
        delay = 1.0 if wake is None else max(0.0, wake - time.monotonic())
        with trio.move_on_after(min(delay, 1.0)):
            await glue.changed.wait()
        glue.tick()


def _goodbye(glue: IkeGlue | None, ep: Endpoint, send4500) -> None:
    """On exit: delete every IKE SA, telling the peers (port 4500 messages via ``send4500``)."""
    for st in list(getattr(glue, "peers", {}).values()):
        for sa in ep.find(st.config.name):
            for a in ep.delete_ike(sa, time.monotonic()):
                if isinstance(a, Send) and a.local_port == NATT_PORT:
                    try:
                        send4500(a)
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


@dataclass(frozen=True)
class IkeSetup:
    local_ip: str
    local_id: str | None
    private_key: bytes | None = field(default=None, repr=False)  # 32 bytes (simpletun genkey)
    peers: tuple[IkePeerSpec, ...] = ()


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
            "transport": "udp",
            "dataplane": c.dataplane,
            "key_exchange": "ikev2",
            "listen_address": c.ike.local_ip,
            "listen_port": NATT_PORT,
            "mtu": c.mtu,
            "addresses": [str(a) for a in c.addresses],
            "up": any(p["child_sas"] for p in peers),
            "peers": peers,
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
        s500, s4500 = ike_sockets(setup.local_ip)
        try:
            ep = Endpoint([peer_config(setup, sp) for sp in setup.peers])
            tunnel = IkeTunnel(config, device)
            log.info(
                "IKEv2 on %s, %s UDP 500/4500, %d peer(s)",
                device.name, setup.local_ip, len(setup.peers),
            )  # fmt: skip
            async with trio.open_nursery() as n:
                tunnel.glue = await n.start(
                    partial_run(device.fd, ep, s500, s4500, setup.local_ip, config.tap)
                )
                tunnel.glue.on_sa_change = tunnel._sa_change
                task_status.started(tunnel)
        finally:
            s500.close()
            s4500.close()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(netdev.close_device, device)


def partial_run(fd, ep, s500, s4500, local_ip, tap):
    async def go(*, task_status=trio.TASK_STATUS_IGNORED):
        await run(fd, ep, s500, s4500, local_ip, tap=tap, task_status=task_status)

    return go


def cli_setup(server: bool, host: str | None, listen: str | None, psk: bytes, routes) -> IkeSetup:
    """``-s --listen ADDR`` / ``-c HOST`` with ``--key-exchange ikev2``: one peer, the
    --key file as PSK, IDs = IP addresses (any authenticated ID accepted), traffic selectors
    everything (narrowed by nothing: one peer owns all prefixes), routes from --route."""
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
        endpoint = (info[4][0], 500)
    every = ("0.0.0.0/0",) if ":" not in local_ip else ("::/0",)
    peer = IkePeerSpec(
        name="peer", identity=None, endpoint=endpoint, allowed_ips=every, local_ips=every,
        psk=psk,
    )  # fmt: skip
    return IkeSetup(local_ip, None, None, (peer,))
