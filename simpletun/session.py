"""Session supervision with trio: the server and client loops around the Rust data plane, and
the device kept in place while the tunnel is configured.

Each TCP connection is one session: (in ESP mode) a handshake in Python, then a
``simpletun._core.DataPlane`` with one stream transport carrying that connection and one peer
allowing everything (its SAs from the handshake; plaintext mode: no SA, raw frames) moves packets
between the device and the socket until the peer leaves (a ``closed`` event with the reason), an
error ends it, it is replaced, or we are cancelled. The data plane is always stopped before its
socket is closed, and only one data plane at a time uses the device.

Fail closed: nothing that arrives unauthenticated ends a tunnel end (a rejected handshake is
logged and retried with backoff), and while the tunnel runs its device, addresses and routes
stay in place, so traffic meant for the tunnel is dropped rather than routed in the clear. A
deleted or downed device is noticed within ``Config.device_check_interval`` and recreated or
repaired; if that is impossible the tunnel ends with a DeviceError (one line).

Reusable as a Python API::

    async with trio.open_nursery() as nursery:
        tunnel = await nursery.start(simpletun.session.run, Config(server=True, ifname="tun0",
                                                                  key=key))
        ...  # tunnel.port, tunnel.session.stats, tunnel.sessions
        nursery.cancel_scope.cancel()

``serve``/``connect`` take an already open device (anything with ``.fd``, ``.name`` and ``.tap``,
e.g. a socketpair end in tests) and leave it open; ``run`` opens, watches and closes the real one.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import trio

from simpletun import handshake, netdev, tcp
from simpletun._errors import DeviceError, HandshakeError, SimpletunError
from simpletun.config import (
    DEFAULT_MTU,
    DEFAULT_PORT,
    MAX_MTU,
    MIN_MTU,
    TAP_OVERHEAD,
    Config,
)
from simpletun.handshake import HandshakeResult
from simpletun.tcp import format_peer, tune_socket

log = logging.getLogger("simpletun.session")

# Two sessions from different addresses replacing each other within this many seconds means two
# clients share one key (they knock each other off): say so.
FLAP_WINDOW = 10.0
# A client session that lasted this long resets the reconnect backoff.
STABLE_SESSION = 10.0


# The 2-byte frame length's limit.
MAX_FRAME = 65535

# The data plane's counters a TCP session reports (names kept from the former single-peer pump).
_TRAFFIC = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "wire_tx_bytes", "wire_rx_bytes")


class TcpPlane:
    """One TCP session's data plane: the device, one stream connection, one peer."""

    def __init__(
        self, device, sock: socket.socket, config: Config, result: HandshakeResult | None
    ) -> None:
        from simpletun._core import DataPlane

        self.reason: str | None = None
        self.dp = DataPlane(device.fd, tap=config.tap, queue_fds=device.queue_fds)
        try:
            # Super-packets agreed: frames carry ESP packets of up to 64 KiB both ways.
            sup = result is not None and result.super_packets
            max_frame = MAX_FRAME if sup else config.max_frame
            t = self.dp.add_tcp(max_frame, plaintext=result is None, control=False)
            try:
                ep = tuple(sock.getpeername()[:2])
            except OSError:
                ep = ("0.0.0.0", 0)  # already gone: the close is reported at once
            self.dp.add_tcp_connection(t, sock.fileno(), ep)
            peer = self.dp.add_peer(t, ["0.0.0.0/0", "::/0"] if not config.tap else [], ep)
            if result is not None:
                self.dp.add_inbound_sa(peer, *result.rx.as_tuple())
                self.dp.set_outbound_sa(peer, *result.tx.as_tuple())
                if result.super_packets:
                    self.dp.set_peer_super(peer, True)
        except BaseException:
            self.dp.stop()
            raise

    async def wait_ended(self) -> None:
        """Return once the connection closed (``reason``) or the data plane ended."""
        while True:
            for e in self.dp.take_events():
                if e[0] == "closed":
                    self.reason = e[3]
                    return
                if e[0] == "no_sa":  # the only SA ran out of sequence numbers
                    self.reason = "sequence numbers exhausted; a new session is needed"
                    return
            if not self.dp.running:
                return
            async with trio.open_nursery() as n:

                async def wake(fd: int) -> None:
                    await trio.lowlevel.wait_readable(fd)
                    n.cancel_scope.cancel()

                n.start_soon(wake, self.dp.events_fd)
                n.start_soon(wake, self.dp.done_fd)

    def stop(self) -> None:
        self.dp.stop()

    @property
    def running(self) -> bool:
        return self.dp.running

    @property
    def exit_reason(self) -> str | None:
        return self.reason or self.dp.exit_reason

    @property
    def stats(self) -> dict:
        s = self.dp.stats
        out = {k: s[k] for k in _TRAFFIC}
        out.update((k, v) for k, v in s.items() if k.startswith("drop_"))
        return out


class Session:
    """One TCP connection's tunnel session; ``stats`` are the data plane's live counters."""

    def __init__(self, peer: str, result: HandshakeResult | None) -> None:
        self.peer = peer
        self.handshake = result
        self.pump = None
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.exit_reason: str | None = None
        self._final_stats: dict | None = None
        self._scope = trio.CancelScope()
        self._replaced_by: str | None = None
        self._done = trio.Event()

    @property
    def running(self) -> bool:
        return self.pump is not None and self.ended_at is None

    @property
    def stats(self) -> dict:
        """Live counters while running; once ended, the final counters (all flushed)."""
        if self._final_stats is not None:
            return dict(self._final_stats)
        return dict(self.pump.stats) if self.pump is not None else {}

    @property
    def duration(self) -> float:
        return (self.ended_at or time.monotonic()) - self.started_at

    @property
    def device_failed(self) -> bool:
        return (self.exit_reason or "").startswith("device")

    async def wait_ended(self) -> None:
        await self._done.wait()

    def describe(self) -> str:
        return "plaintext" if self.handshake is None else f"ESP {self.handshake.cipher}"

    def counters_text(self) -> str:
        """``k=v ...`` (drop counters only when non-zero)."""
        s = self.stats
        return " ".join(f"{k}={v}" for k, v in s.items() if v or not k.startswith("drop_"))

    def counters_line(self) -> str:
        """``session with PEER counters: k=v ...``."""
        return f"session with {self.peer} counters: {self.counters_text()}"


class Tunnel:
    """Live state of a running server or client, handed out by ``task_status.started``."""

    def __init__(self, config: Config, device, port: int | None = None) -> None:
        self.config = config
        self.device = device
        self.port = port if port is not None else config.port
        self.session: Session | None = None
        self.sessions = 0  # sessions that completed a handshake (or, plaintext, connected)
        self.last_exit_reason: str | None = None
        self.handshake_failures = 0  # rejected or failed handshakes (never fatal)
        self.evicted = 0  # unauthenticated connections dropped to make room (server)
        self.device_recreated = 0
        self.device_repaired = 0
        self.flaps = 0  # replacements soon after a replacement (two clients, one key)
        self._lock = trio.Lock()
        self._device_ready = trio.Event()
        self._device_ready.set()
        self._check_device = trio.Event()
        self._up = trio.Event()  # set while a session runs
        self._last_replace: tuple[float, str] | None = None  # (when, replaced peer)
        # Client: the server is an older release (handshake version 1): announce nothing.
        self.old_server = False

    def announces_super(self) -> bool:
        """Whether our handshake announces super-packets: only with a TUN device whose
        offloads include TSO (so a super-packet can be written to it whole)."""
        offloads = getattr(self.device, "offloads", None) or ""
        return "tso" in offloads.split("+") and not self.old_server

    def stats(self) -> dict:
        """The current session's pump counters ({} between sessions)."""
        return self.session.stats if self.session is not None else {}

    async def run_session(
        self, stream: trio.SocketStream, peer: str, result: HandshakeResult | None
    ) -> Session:
        """Run the pump on ``stream`` until the session ends; replaces any current session.

        The stream is closed on return. Fail closed: in ESP mode there is no pump without SAs.
        """
        if self.config.esp and result is None:
            raise AssertionError("refusing to run an ESP tunnel without SAs")
        sess = Session(peer, result)
        try:
            with sess._scope:
                async with self._lock:
                    await self._device_ready.wait()
                    old = self.session
                    if old is not None:
                        self._note_replacement(old.peer, peer)
                        old._replaced_by = peer
                        old._scope.cancel()
                        await old._done.wait()
                    sess.pump = self._start_pump(stream, result)
                    sess.started_at = time.monotonic()
                    self.session = sess
                    self.sessions += 1
                    self._up.set()
                log.info("session with %s up (%s)", peer, sess.describe())
                await sess.pump.wait_ended()
        finally:
            with trio.CancelScope(shield=True):
                await self._end_session(sess, stream)
        return sess

    def _note_replacement(self, old_peer: str, new_peer: str) -> None:
        """Warn when sessions keep replacing each other: two clients share one key."""
        now = time.monotonic()
        last, self._last_replace = self._last_replace, (now, old_peer)
        if last is not None and now - last[0] < FLAP_WINDOW:
            self.flaps += 1
            log.warning(
                "sessions keep replacing each other (%s by %s): two clients are probably using "
                "the same key; each new session ends the other. Give every client its own "
                "server and key (peer identities come with IKEv2)",
                old_peer,
                new_peer,
            )

    def _start_pump(self, stream: trio.SocketStream, result: HandshakeResult | None) -> TcpPlane:
        return TcpPlane(self.device, stream.socket, self.config, result)

    async def _end_session(self, sess: Session, stream: trio.SocketStream) -> None:
        pump = sess.pump
        if pump is not None:
            await trio.to_thread.run_sync(pump.stop)
            sess._final_stats = dict(pump.stats)
            sess.exit_reason = pump.exit_reason
        stream.socket.close()
        if sess._replaced_by is not None:
            sess.exit_reason = f"replaced by a new session from {sess._replaced_by}"
        elif sess.exit_reason is None:
            sess.exit_reason = "stopped"
        sess.ended_at = time.monotonic()
        if self.session is sess:
            self.session = None
            self._up = trio.Event()
        sess._done.set()
        if pump is None:
            return
        self.last_exit_reason = sess.exit_reason
        if sess.device_failed:
            self._check_device.set()  # look at the device now, not at the next tick
        log.info(
            "session with %s ended after %.1f s: %s", sess.peer, sess.duration, sess.exit_reason
        )
        log.debug("session with %s counters: %s", sess.peer, sess.counters_text())

    async def wait_up(self) -> Session:
        """Return the running session, waiting (without polling) until there is one."""
        while self.session is None:
            await self._up.wait()
        return self.session

    def status(self) -> dict:
        """What ``simpletun status`` shows (see :func:`tunnel_status`)."""
        sess = self.session
        view = None
        if sess is not None:
            view = (sess.peer, sess.handshake, sess.stats, sess.duration)
        return tunnel_status(self, "tcp", view)

    async def wait_device_ready(self) -> None:
        await self._device_ready.wait()

    async def watch_device(self) -> None:
        """Keep the real device in place: repair it when downed or stripped, recreate it when
        deleted. Raises DeviceError when that is impossible."""
        interval = self.config.device_check_interval
        while True:
            with trio.move_on_after(interval):
                await self._check_device.wait()
            self._check_device = trio.Event()
            state = await trio.to_thread.run_sync(netdev.check_device, self.device)
            if state == netdev.DEVICE_OK:
                continue
            name = self.device.name
            if state == netdev.DEVICE_DOWN:
                log.warning("device %s was downed or lost an address or route; restoring it", name)
                try:
                    await trio.to_thread.run_sync(netdev.repair_device, self.device)
                except DeviceError as e:
                    raise DeviceError(f"cannot restore device {name}: {e}") from None
                self.device_repaired += 1
                continue
            log.warning("device %s was deleted; recreating it", name)
            self._device_ready = trio.Event()
            async with self._lock:
                if self.session is not None:
                    self.session._scope.cancel()
                    await self.session._done.wait()
                try:
                    self.device = await trio.to_thread.run_sync(netdev.reopen_device, self.device)
                except DeviceError as e:
                    raise DeviceError(f"cannot recreate device {name}: {e}") from None
                self.device_recreated += 1
                self._device_ready.set()
            log.info("device %s recreated and configured", name)


def overlay_sas(peer: dict, out: dict, inn: dict) -> None:
    """Put an SA table's figures on a status peer's ``sas`` (one place for both data planes):
    ``out``: ``tx_seq`` (the last sequence number sent), ``encap_packets``; ``inn``:
    ``rx_highest_seq``, ``decap_packets`` and ``drop_<reason>``; missing keys are left alone."""
    for sa in peer.get("sas", []):
        src = out if sa["direction"] == "out" else inn
        if sa["direction"] == "out":
            if "tx_seq" in src:
                sa["seq"] = src["tx_seq"]
            if "encap_packets" in src:
                sa["packets"] = src["encap_packets"]
        else:
            if "rx_highest_seq" in src:
                sa["highest_seq"] = src["rx_highest_seq"]
            if "decap_packets" in src:
                sa["packets"] = src["decap_packets"]
            drops = {k[5:]: v for k, v in src.items() if k.startswith("drop_") and v}
            if drops:
                sa["drops"] = drops


def tunnel_status(t, transport: str, session) -> dict:
    """The data of ``simpletun status --json`` for a tunnel end ``t`` (a :class:`Tunnel` or a
    ``datagram.DatagramTunnel``); ``session`` is None or (remote peer, HandshakeResult or None,
    counters, age in seconds). Plain data, JSON-serialisable; one place for both transports."""
    c = t.config
    peer: dict = {
        "endpoint": None if c.server else f"{c.host}:{c.port}",
        "allowed_ips": [str(r) for r in c.routes],
        "connected": session is not None,
        "latest_handshake": None,
        "sas": [],
    }
    if session is not None:
        remote, hs, stats, duration = session
        age = round(duration, 3)
        peer["remote"] = remote
        peer["latest_handshake"] = round(time.time() - duration, 3)
        peer["session_age"] = age
        for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
            peer[k] = stats.get(k, 0)
        peer["drops"] = {k[5:]: v for k, v in stats.items() if k.startswith("drop_") and v}
        if hs is not None:
            # outbound: the sequence number is the count of packets encapsulated
            out_sa = {"direction": "out", "spi": f"0x{hs.tx.spi:08x}", "age": age}
            out_sa["seq"] = stats.get("tx_packets", 0)
            in_sa = {"direction": "in", "spi": f"0x{hs.rx.spi:08x}", "age": age}
            in_sa["packets"] = stats.get("rx_packets", 0)
            peer["sas"] = [out_sa, in_sa]
    return {
        "interface": getattr(t.device, "name", c.ifname),
        "mode": "tap" if c.tap else "tun",
        "role": "server" if c.server else "client",
        "transport": transport,
        "dataplane": "userspace",
        "listen_port": t.port if c.server else None,
        "encryption": getattr(t, "encryption", None)
        or (f"ESP {c.cipher}" if c.esp else "plaintext"),
        "mtu": c.mtu,
        "addresses": [str(a) for a in c.addresses],
        "up": session is not None,
        "sessions": t.sessions,
        "handshake_failures": t.handshake_failures,
        "last_exit_reason": t.last_exit_reason,
        "device_recreated": t.device_recreated,
        "device_repaired": getattr(t, "device_repaired", 0),
        "peers": [peer],
    }


# -- server -----------------------------------------------------------------------------------


async def serve(config: Config, device, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept clients forever on ``config.port``; a new authenticated session replaces the
    current one. ``task_status.started(tunnel)`` once listening."""
    async with tcp.listen(config.port, config.host) as listeners:
        port = listeners[0].socket.getsockname()[1]
        tunnel = Tunnel(config, device, port=port)
        log.info(
            "server on %s, listening on TCP port %d (%s)",
            device.name,
            port,
            f"ESP {config.cipher}" if config.esp else "plaintext",
        )
        admission = tcp.Admission()

        async def handle(stream: trio.SocketStream) -> None:
            await _serve_one(tunnel, admission, stream)

        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(tcp.accept_loop, listener, handle, nursery)
            task_status.started(tunnel)


async def _serve_one(tunnel: Tunnel, admission: tcp.Admission, stream: trio.SocketStream) -> None:
    try:
        peer = format_peer(stream.socket.getpeername())
        tune_socket(stream.socket, tunnel.config.keepalive)
    except OSError as e:  # the client already left
        log.debug("dropping a connection that closed at once: %s", e)
        stream.socket.close()
        return
    result = None
    scope = trio.CancelScope()
    with scope:
        with admission.admit(_host_of(peer), scope) as pending:
            result = await _server_handshake(tunnel, stream, peer, pending.progressed)
    tunnel.evicted = admission.evicted
    if scope.cancelled_caught:
        log.debug("dropped %s: unauthenticated, and its slot was needed", peer)
        tunnel.handshake_failures += 1
        stream.socket.close()
        return
    if result is None:
        return
    try:
        await tunnel.run_session(stream, result.peer, result.sas)
    except (SimpletunError, OSError) as e:
        log.error("session with %s failed: %s", result.peer, e)


@dataclass(frozen=True)
class _Accepted:
    peer: str
    sas: HandshakeResult | None


def _host_of(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


async def _server_handshake(
    tunnel: Tunnel, stream: trio.SocketStream, peer: str, on_hello=None
) -> _Accepted | None:
    """Handshake with a new client; None (connection closed, reason logged) on failure."""
    config = tunnel.config
    log.debug("accepted connection from %s", peer)
    result = None
    if config.esp:
        try:
            result = await handshake.server_handshake(
                stream,
                config.key,
                config.cipher,
                timeout=config.handshake_timeout,
                on_hello=on_hello,
                super_packets=tunnel.announces_super(),
            )
        except HandshakeError as e:
            tunnel.handshake_failures += 1
            log.error("handshake with %s failed: %s", peer, e)
            stream.socket.close()
            return None
        except BaseException:
            stream.socket.close()
            raise
        log.debug(
            "handshake with %s ok: spi out 0x%08x in 0x%08x%s",
            peer,
            result.tx.spi,
            result.rx.spi,
            ", super-packets" if result.super_packets else "",
        )
    return _Accepted(peer, result)


# -- client -----------------------------------------------------------------------------------


async def connect(config: Config, device, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Connect to the server and keep reconnecting (capped exponential backoff) forever.

    ``task_status.started(tunnel)`` at once. Nothing from the network ends this loop: a
    rejected handshake (wrong key, cipher or version — or a forged message claiming so) is
    logged and retried with backoff, since an unauthenticated message must not be able to end
    the tunnel.
    """
    tunnel = Tunnel(config, device)
    target = format_peer((config.host, config.port))
    log.info(
        "client on %s, server %s (%s)",
        device.name,
        target,
        f"ESP {config.cipher}" if config.esp else "plaintext",
    )
    task_status.started(tunnel)
    failures = 0
    while True:
        delay = config.backoff(failures)
        if delay:
            log.debug("reconnecting to %s in %.1f s", target, delay)
            await trio.sleep(delay)
        await tunnel.wait_device_ready()
        log.debug("connecting to %s", target)
        try:
            stream, peer = await tcp.open_connection(
                config.host, config.port, config.connect_timeout, config.keepalive
            )
        except (OSError, trio.TooSlowError) as e:
            failures += 1
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "cannot connect to %s: %s; retrying", target, tcp.connect_error(e))
            continue
        log.debug("connected to %s", peer)
        result = None
        if config.esp:
            try:
                result = await handshake.client_handshake(
                    stream,
                    config.key,
                    config.cipher,
                    timeout=config.handshake_timeout,
                    super_packets=tunnel.announces_super(),
                )
            except HandshakeError as e:
                stream.socket.close()
                if getattr(e, "code", None) == handshake.OLD_SERVER and not tunnel.old_server:
                    # Fall back to version 1 at once (for this process's lifetime).
                    tunnel.old_server = True
                    log.warning("handshake with %s: %s", peer, e)
                    continue
                failures += 1
                tunnel.handshake_failures += 1
                # A configuration mismatch is worth an error (the operator must act); it is
                # still retried, as the message saying so is not authenticated.
                fatal_looking = getattr(e, "code", None) in handshake.FATAL_CODES
                level = logging.ERROR if fatal_looking else logging.WARNING
                log.log(level, "handshake with %s failed: %s; retrying", peer, e)
                continue
            except BaseException:
                stream.socket.close()
                raise
            log.debug(
                "handshake with %s ok: spi out 0x%08x in 0x%08x%s",
                peer,
                result.tx.spi,
                result.rx.spi,
                ", super-packets" if result.super_packets else "",
            )
        sess = await tunnel.run_session(stream, peer, result)
        # Reset the backoff after a session that lasted, but back off further when sessions
        # keep ending soon (e.g. two clients with the same key replacing each other).
        failures = 0 if sess.duration >= STABLE_SESSION else failures + 1


# -- both, with the real device ---------------------------------------------------------------


def _pin_peer(config: Config) -> list[dict]:
    """A client whose routes cover its server's address (e.g. a default route through the
    tunnel) first pins a host route to the server along the current path: otherwise the
    tunnel's own connection would be routed into the tunnel. An IKEv2 tunnel does the same for
    every peer it initiates to (its IKE and ESP-in-UDP go to that endpoint)."""
    if not config.routes:
        return []
    ike = getattr(config, "ike", None)
    if ike is not None:
        targets = [sp.endpoint for sp in ike.peers if sp.endpoint is not None]
    elif config.server:
        return []
    else:
        targets = [(config.host, config.port)]
    import ipaddress

    routes = netdev.expand_routes(config.routes)
    pins: list[dict] = []
    try:
        for host, port in targets:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError:
                continue  # resolved (and retried) by the connect loop; nothing to pin yet
            for info in infos:
                addr = ipaddress.ip_address(info[4][0])
                if any(addr.version == r.version and addr in r for r in routes):
                    pin = netdev.pin_host_route(str(addr))
                    if pin:
                        pins.append(pin)
                    break
    except BaseException:
        for pin in pins:
            netdev.unpin(pin)
        raise
    return pins


def _open(config: Config):
    pinned = _pin_peer(config)
    try:
        device = netdev.open_device(
            config.ifname,
            tap=config.tap,
            mtu=config.mtu,
            addresses=config.addresses,
            routes=config.routes,
            offload=config.offloads,
            queues=config.queues,
        )
    except BaseException:
        for pin in pinned:
            netdev.unpin(pin)
        raise
    device.pinned.extend(pinned)
    return device


async def run(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Open and configure the device, run the server or client until cancelled while keeping
    the device in place, then release it (a device we created disappears)."""
    device = await trio.to_thread.run_sync(_open, config)
    tunnel = None
    try:
        async with trio.open_nursery() as nursery:
            loop = serve if config.server else connect
            tunnel = await nursery.start(loop, config, device)
            nursery.start_soon(tunnel.watch_device)
            task_status.started(tunnel)
    finally:
        # The pumps are stopped by now (the loops' finally blocks ran); the fd can go.
        with trio.CancelScope(shield=True):
            current = tunnel.device if tunnel is not None else device
            await trio.to_thread.run_sync(netdev.close_device, current)


__all__ = [
    "DEFAULT_MTU",
    "DEFAULT_PORT",
    "MAX_MTU",
    "MIN_MTU",
    "TAP_OVERHEAD",
    "Config",
    "Session",
    "Tunnel",
    "connect",
    "run",
    "serve",
]
