"""Session supervision with trio: the server and client loops around the Rust pump.

Each TCP connection is one session: (in ESP mode) a handshake in Python, then a
``simpletun._core.Pump`` moves packets between the device and the socket until the peer leaves,
an error ends it, it is replaced, or we are cancelled. The pump is always stopped before its
socket is closed, and only one pump at a time uses the device.

Reusable as a Python API::

    async with trio.open_nursery() as nursery:
        tunnel = await nursery.start(simpletun.session.run, Config(server=True, ifname="tun0",
                                                                  key=key))
        ...  # tunnel.port, tunnel.session.stats, tunnel.sessions
        nursery.cancel_scope.cancel()

``serve``/``connect`` take an already open device (anything with ``.fd``, ``.name`` and ``.tap``,
e.g. a socketpair end in tests) and leave it open; ``run`` opens and closes the real one.
"""

import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import trio

from simpletun import handshake, netdev
from simpletun._errors import ConfigError, HandshakeError, SimpletunError
from simpletun.handshake import DEFAULT_CIPHER, HandshakeResult

log = logging.getLogger("simpletun.session")

DEFAULT_PORT = 55555
DEFAULT_MTU = 1500
MIN_MTU = 68
MAX_MTU = 65000
# Ethernet header plus one VLAN tag: what a TAP frame adds to the MTU.
TAP_OVERHEAD = 18

# TCP keepalive: probe an idle connection after 10 s, every 5 s, give up after 3 misses; and
# drop a connection whose sent data stays unacknowledged for 30 s.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 30_000
# Connections allowed to be in the handshake at once (each is bounded by the handshake timeout).
MAX_PENDING_HANDSHAKES = 32


@dataclass(frozen=True)
class Config:
    """What a tunnel end is asked to do. ``key=None`` means plaintext (simpletun.c) mode."""

    server: bool
    ifname: str = "tun0"
    host: str | None = None  # client: the server to connect to; server: bind address or all
    port: int = DEFAULT_PORT
    tap: bool = False
    key: bytes | None = field(default=None, repr=False)
    cipher: str = DEFAULT_CIPHER
    mtu: int = DEFAULT_MTU
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    handshake_timeout: float = handshake.DEFAULT_TIMEOUT
    connect_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    transport: str = "tcp"  # "tcp" (here), "udp" or "raw" (simpletun.datagram)

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "udp", "raw"):
            raise ConfigError(f"transport must be tcp, udp or raw, got {self.transport!r}")
        if self.transport != "tcp" and self.key is None:
            raise ConfigError(
                f"--transport {self.transport} needs --key: plaintext (simpletun.c) is TCP only"
            )
        if not self.server and not self.host:
            raise ConfigError("a client needs the server's address (host)")
        if not (0 if self.server else 1) <= self.port <= 65535:
            raise ConfigError(f"port must be 1-65535 (a server may use 0: any), got {self.port}")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(f"mtu must be {MIN_MTU}-{MAX_MTU}, got {self.mtu}")
        if self.key is not None:
            if len(self.key) != 32:
                raise ConfigError("the key must be 32 bytes")
            handshake.cipher_id(self.cipher)

    @property
    def esp(self) -> bool:
        return self.key is not None

    @property
    def max_frame(self) -> int:
        """The largest frame payload the pump accepts from the peer."""
        if not self.esp:
            return self.mtu + TAP_OVERHEAD
        from simpletun._core import esp_encap_len

        return esp_encap_len(self.mtu + TAP_OVERHEAD if self.tap else self.mtu)

    def backoff(self, failures: int) -> float:
        """Delay before reconnect attempt number ``failures`` + 1 (0 → at once)."""
        if failures <= 0:
            return 0.0
        return min(self.backoff_initial * 2 ** min(failures - 1, 32), self.backoff_max)


class Session:
    """One TCP connection's tunnel session; ``stats`` are the pump's live counters."""

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
        if self._final_stats is not None:
            return dict(self._final_stats)
        return dict(self.pump.stats) if self.pump is not None else {}

    @property
    def duration(self) -> float:
        return (self.ended_at or time.monotonic()) - self.started_at

    def describe(self) -> str:
        return "plaintext" if self.handshake is None else f"ESP {self.handshake.cipher}"

    def counters_line(self) -> str:
        """``session with PEER counters: k=v ...`` (drop counters only when non-zero)."""
        s = self.stats
        counters = " ".join(f"{k}={v}" for k, v in s.items() if v or not k.startswith("drop_"))
        return f"session with {self.peer} counters: {counters}"


class Tunnel:
    """Live state of a running server or client, handed out by ``task_status.started``."""

    def __init__(self, config: Config, device, port: int | None = None) -> None:
        self.config = config
        self.device = device
        self.port = port if port is not None else config.port
        self.session: Session | None = None
        self.sessions = 0  # sessions that completed a handshake (or, plaintext, connected)
        self.last_exit_reason: str | None = None
        self._lock = trio.Lock()

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
                    old = self.session
                    if old is not None:
                        old._replaced_by = peer
                        old._scope.cancel()
                        await old._done.wait()
                    sess.pump = self._start_pump(stream, result)
                    sess.started_at = time.monotonic()
                    self.session = sess
                    self.sessions += 1
                log.info("session with %s up (%s)", peer, sess.describe())
                await trio.lowlevel.wait_readable(sess.pump.done_fd)
        finally:
            with trio.CancelScope(shield=True):
                await self._end_session(sess, stream)
        return sess

    def _start_pump(self, stream: trio.SocketStream, result: HandshakeResult | None):
        from simpletun._core import Pump

        kwargs = {}
        if result is not None:
            kwargs = {"tx": result.tx.as_tuple(), "rx": result.rx.as_tuple()}
        return Pump(
            self.device.fd,
            stream.socket.fileno(),
            tap=self.config.tap,
            max_frame=self.config.max_frame,
            **kwargs,
        )

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
        sess._done.set()
        if pump is None:
            return
        self.last_exit_reason = sess.exit_reason
        log.info(
            "session with %s ended after %.1f s: %s", sess.peer, sess.duration, sess.exit_reason
        )
        log.debug("%s", sess.counters_line())


def _connect_error(e: BaseException) -> str:
    """A short reason from open_tcp_stream's failure (it wraps the per-address errors)."""
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    causes = getattr(e.__cause__, "exceptions", ())
    reasons = sorted({os.strerror(c.errno) for c in causes if isinstance(c, OSError) and c.errno})
    if reasons:
        return ", ".join(reasons)
    return getattr(e, "strerror", None) or str(e)


def format_peer(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tune_socket(sock) -> None:
    """TCP_NODELAY (latency) and keepalive/user timeout (notice a dead peer within ~30 s)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


# -- server -----------------------------------------------------------------------------------


async def serve(config: Config, device, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept clients forever on ``config.port``; a new authenticated session replaces the
    current one. ``task_status.started(tunnel)`` once listening."""
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as e:
        raise SimpletunError(
            f"cannot listen on TCP port {config.port}: {e.strerror or e}"
        ) from None
    port = listeners[0].socket.getsockname()[1]
    tunnel = Tunnel(config, device, port=port)
    log.info(
        "server on %s, listening on TCP port %d (%s)",
        device.name,
        port,
        f"ESP {config.cipher}" if config.esp else "plaintext",
    )

    pending = trio.CapacityLimiter(MAX_PENDING_HANDSHAKES)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            pending.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            log.warning("too many connections in handshake; dropping a new one")
            stream.socket.close()
            return
        await _serve_one(tunnel, stream, lambda: pending.release_on_behalf_of(stream))

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, handle, nursery)
            task_status.started(tunnel)
    finally:
        for listener in listeners:
            listener.socket.close()


async def _accept_loop(listener: trio.SocketListener, handle, nursery: trio.Nursery) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:  # e.g. EMFILE: wait and retry rather than die
            log.error("accept failed: %s", e)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle, stream)


async def _serve_one(tunnel: Tunnel, stream: trio.SocketStream, handshake_done) -> None:
    try:
        result = await _server_handshake(tunnel.config, stream)
    finally:
        handshake_done()
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


async def _server_handshake(config: Config, stream: trio.SocketStream) -> "_Accepted | None":
    """Handshake with a new client; None (connection closed, reason logged) on failure."""
    try:
        peer = format_peer(stream.socket.getpeername())
        tune_socket(stream.socket)
    except OSError as e:  # the client already left
        log.debug("dropping a connection that closed at once: %s", e)
        stream.socket.close()
        return None
    log.debug("accepted connection from %s", peer)
    result = None
    if config.esp:
        try:
            result = await handshake.server_handshake(
                stream, config.key, config.cipher, timeout=config.handshake_timeout
            )
        except HandshakeError as e:
            log.error("handshake with %s failed: %s", peer, e)
            stream.socket.close()
            return None
        except BaseException:
            stream.socket.close()
            raise
        log.debug(
            "handshake with %s ok: spi out 0x%08x in 0x%08x", peer, result.tx.spi, result.rx.spi
        )
    return _Accepted(peer, result)


# -- client -----------------------------------------------------------------------------------


async def connect(config: Config, device, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Connect to the server and keep reconnecting (capped exponential backoff) forever.

    ``task_status.started(tunnel)`` at once. Raises HandshakeError when the server rejects
    our configuration (wrong key, cipher or protocol version): retrying cannot help then.
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
        log.debug("connecting to %s", target)
        try:
            with trio.fail_after(config.connect_timeout):
                stream = await trio.open_tcp_stream(config.host, config.port)
        except (OSError, trio.TooSlowError) as e:
            failures += 1
            why = _connect_error(e)
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "cannot connect to %s: %s; retrying", target, why)
            continue
        try:
            peer = format_peer(stream.socket.getpeername())
            tune_socket(stream.socket)
        except OSError as e:
            stream.socket.close()
            failures += 1
            log.debug("connection to %s lost at once: %s", target, e)
            continue
        log.debug("connected to %s", peer)
        result = None
        if config.esp:
            try:
                result = await handshake.client_handshake(
                    stream, config.key, config.cipher, timeout=config.handshake_timeout
                )
            except HandshakeError as e:
                stream.socket.close()
                if getattr(e, "code", None) in handshake.FATAL_CODES:
                    raise
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "handshake with %s failed: %s; retrying", peer, e)
                continue
            except BaseException:
                stream.socket.close()
                raise
            log.debug(
                "handshake with %s ok: spi out 0x%08x in 0x%08x",
                peer,
                result.tx.spi,
                result.rx.spi,
            )
        sess = await tunnel.run_session(stream, peer, result)
        # Reset the backoff after a successful session, but do not spin if sessions keep
        # ending at once (e.g. two clients with the same key replacing each other).
        failures = 0 if sess.duration >= 1.0 else 1


# -- both, with the real device ---------------------------------------------------------------


async def run(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Open and configure the device, run the server or client until cancelled, then release
    the device (a device we created disappears)."""
    device = await trio.to_thread.run_sync(
        lambda: netdev.open_device(
            config.ifname, tap=config.tap, mtu=config.mtu, addresses=config.addresses
        )
    )
    try:
        if config.server:
            await serve(config, device, task_status=task_status)
        else:
            await connect(config, device, task_status=task_status)
    finally:
        # The pumps are stopped by now (the loops' finally blocks ran); the fd can go.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(netdev.close_device, device)


__all__ = ["DEFAULT_PORT", "Config", "Session", "Tunnel", "connect", "run", "serve"]
