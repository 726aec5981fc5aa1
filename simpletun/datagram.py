"""Datagram transports for the one-peer CLI: ESP-in-UDP (RFC 3948) and raw ESP (protocol 50).

The data plane is ``simpletun._core.DataPlane``: one UDP socket (the handshake, and the data in
``udp`` mode) plus, in ``raw`` mode, raw ESP sockets for the data. The PSK handshake of
``handshake.py`` runs over UDP control datagrams (payloads starting with the non-ESP marker),
specified in docs/PROTOCOL.md ("Over UDP"):

- the ClientHello is padded to ``HELLO_MIN_LEN`` so that the server never answers with more
  bytes than it got (no amplification);
- the server keeps no state for a client until the client has proved the key: its nonce is
  derived from a secret, the client's nonce, its address and a time bucket, and the ClientFinish
  repeats the client's nonce, so the server can rebuild the transcript;
- the client retransmits (ClientHello until a ServerHello, ClientFinish until the server's
  authenticated ServerAck); the server answers a repeated ClientFinish with the same ServerAck
  and installs SAs once per client nonce;
- an unauthenticated message is never fatal: a ServerHello with a bad MAC or an Error is noted
  and reported only if the handshake then times out.

The sans-IO state machines (:class:`UdpServerHandshake`, :class:`UdpClientHandshake`) are tested
without sockets; :func:`serve` and :func:`connect` are the trio supervisors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from functools import partial

import trio

from simpletun import handshake as hs
from simpletun._core import CONTROL_MARKER, ESP_IN_UDP_PORT, IPPROTO_ESP
from simpletun._errors import HandshakeError, SimpletunError
from simpletun.handshake import HandshakeResult, SaKeys

log = logging.getLogger("simpletun.datagram")

TRANSPORTS = ("tcp", "udp", "raw")
DEFAULT_UDP_PORT = ESP_IN_UDP_PORT
MSG_SERVER_ACK = 5
HELLO_LEN = 7 + hs.NONCE_LEN  # the ClientHello of the TCP protocol (transcript input)
HELLO_MIN_LEN = 96  # a UDP ClientHello is zero-padded to at least this
SERVER_HELLO_LEN = 7 + hs.NONCE_LEN + hs.MAC_LEN
FINISH_LEN = 5 + hs.MAC_LEN + hs.NONCE_LEN
ACK_LEN = 5 + hs.MAC_LEN
COOKIE_PERIOD = 30.0  # seconds per server-nonce time bucket; a ClientFinish may use two
RETRANSMIT = (0.25, 0.5, 1.0, 2.0)  # then every 2 s until the handshake timeout
OLD_SA_GRACE = 2.0  # seconds an inbound SA stays valid after it was replaced
DEAD_AFTER = 15.0  # client: sending but nothing authentic received for this long -> rehandshake
KEEPALIVE_EVERY = 20.0  # client, udp: NAT-keepalive (RFC 3948 2.3) interval
ALL_PREFIXES = ["0.0.0.0/0", "::/0"]


def _ack_mac(k: dict, th: bytes) -> bytes:
    return hmac.new(k["s_confirm"], th + b"simpletun udp ack", hashlib.sha256).digest()


def _error_msg(code: int, detail: int = 0) -> bytes:
    return CONTROL_MARKER + bytes([hs.MSG_ERROR, code, detail])


def _result(cipher: str, k: dict, client: bool) -> HandshakeResult:
    c2s = SaKeys(k["c2s_spi"], k["c2s_enc"], k["c2s_auth"])
    s2c = SaKeys(k["s2c_spi"], k["s2c_enc"], k["s2c_auth"])
    return HandshakeResult(cipher=cipher, tx=c2s if client else s2c, rx=s2c if client else c2s)


@dataclass
class Accepted:
    """A client that proved the key: its address, SAs (server view) and nonce."""

    addr: tuple[str, int]
    result: HandshakeResult
    nonce_c: bytes = field(repr=False)


class UdpServerHandshake:
    """The server side, stateless until a client proves the key. ``handle`` returns
    ``(reply or None, Accepted or None)`` for one received control message."""

    MAX_ACCEPTED = 256

    def __init__(self, key: bytes, cipher: str = hs.DEFAULT_CIPHER, *, clock=time.monotonic):
        if len(key) != 32:
            raise ValueError("the pre-shared key must be 32 bytes")
        self.key = key
        self.cipher = cipher
        self.cid = hs.cipher_id(cipher)
        self.clock = clock
        self._secret = secrets.token_bytes(32)
        # nonce_c -> (bucket, ack): clients already accepted (their repeats get the same ack)
        self._accepted: dict[bytes, tuple[int, bytes]] = {}

    def _bucket(self) -> int:
        return int(self.clock() // COOKIE_PERIOD)

    def _nonce_s(self, nonce_c: bytes, addr: tuple[str, int], bucket: int) -> bytes:
        msg = b"%s|%d|%d|" % (addr[0].encode(), addr[1], bucket) + nonce_c
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def _keys(self, nonce_c: bytes, nonce_s: bytes) -> tuple[bytes, bytes, dict]:
        hello = CONTROL_MARKER + bytes([hs.MSG_CLIENT_HELLO, hs.VERSION, self.cid]) + nonce_c
        head = CONTROL_MARKER + bytes([hs.MSG_SERVER_HELLO, hs.VERSION, self.cid]) + nonce_s
        th = hs.transcript_hash(hello, head)
        return head, th, hs.derive(self.key, self.cipher, nonce_c, nonce_s, th)

    def handle(self, payload: bytes, addr: tuple[str, int]) -> tuple[bytes | None, Accepted | None]:
        if len(payload) < 5 or payload[:4] != CONTROL_MARKER:
            return None, None
        kind = payload[4]
        if kind == hs.MSG_CLIENT_HELLO:
            return self._hello(payload, addr), None
        if kind == hs.MSG_CLIENT_FINISH and len(payload) == FINISH_LEN:
            return self._finish(payload, addr)
        if kind == hs.MSG_ERROR:
            err = hs._peer_error(payload, "client", self.cipher)
            log.info("client %s reports: %s", hs_peer(addr), err)
        else:
            log.debug(
                "ignoring a %d-byte control message of type %d from %s",
                len(payload),
                kind,
                hs_peer(addr),
            )
        return None, None

    def _hello(self, p: bytes, addr: tuple[str, int]) -> bytes | None:
        if len(p) < HELLO_MIN_LEN:
            log.debug("ignoring an unpadded %d-byte ClientHello from %s", len(p), hs_peer(addr))
            return None
        version, cid = p[5], p[6]
        if version != hs.VERSION:
            return _error_msg(hs.ERR_VERSION_MISMATCH, hs.VERSION)
        if cid != self.cid:
            log.warning(
                "client %s uses %s, we use %s", hs_peer(addr), hs._cipher_name(cid), self.cipher
            )
            return _error_msg(hs.ERR_CIPHER_MISMATCH, self.cid)
        nonce_c = p[7:HELLO_LEN]
        nonce_s = self._nonce_s(nonce_c, addr, self._bucket())
        head, th, k = self._keys(nonce_c, nonce_s)
        return head + hs._mac(k["s_confirm"], th)

    def _finish(self, p: bytes, addr: tuple[str, int]) -> tuple[bytes | None, Accepted | None]:
        mac, nonce_c = p[5 : 5 + hs.MAC_LEN], p[5 + hs.MAC_LEN :]
        now = self._bucket()
        for bucket in (now, now - 1):
            _head, th, k = self._keys(nonce_c, self._nonce_s(nonce_c, addr, bucket))
            if hmac.compare_digest(mac, hs._mac(k["c_confirm"], th)):
                break
        else:
            log.warning(
                "ClientFinish from %s does not verify (wrong key, or too late)", hs_peer(addr)
            )
            return None, None
        ack = CONTROL_MARKER + bytes([MSG_SERVER_ACK]) + _ack_mac(k, th)
        # Forget clients accepted in buckets whose ClientFinish can no longer verify.
        self._accepted = {n: v for n, v in self._accepted.items() if v[0] >= now - 1}
        if nonce_c in self._accepted:
            return self._accepted[nonce_c][1], None  # a repeat: same answer, no new SAs
        if len(self._accepted) >= self.MAX_ACCEPTED:
            self._accepted.pop(next(iter(self._accepted)))
        self._accepted[nonce_c] = (now, ack)
        return ack, Accepted(addr, _result(self.cipher, k, client=False), nonce_c)


class UdpClientHandshake:
    """The client side: ``first()`` is the ClientHello; feed every received control message
    to ``handle``, which returns the next message to (re)transmit or None; ``result`` is set
    once the server's ServerAck verified."""

    def __init__(self, key: bytes, cipher: str = hs.DEFAULT_CIPHER):
        if len(key) != 32:
            raise ValueError("the pre-shared key must be 32 bytes")
        self.key = key
        self.cipher = cipher
        self.cid = hs.cipher_id(cipher)
        self.nonce_c = secrets.token_bytes(hs.NONCE_LEN)
        self._hello = (
            CONTROL_MARKER + bytes([hs.MSG_CLIENT_HELLO, hs.VERSION, self.cid]) + self.nonce_c
        )
        self.current = self._hello + bytes(HELLO_MIN_LEN - HELLO_LEN)
        self._k: dict | None = None
        self._th = b""
        self.result: HandshakeResult | None = None
        # Unauthenticated trouble, reported only if the handshake then fails.
        self.suspect: HandshakeError | None = None

    def handle(self, p: bytes) -> bytes | None:
        if self.result is not None or len(p) < 5 or p[:4] != CONTROL_MARKER:
            return None
        kind = p[4]
        if kind == hs.MSG_ERROR:
            self.suspect = hs._peer_error(p, "server", self.cipher)
            return None
        if kind == hs.MSG_SERVER_HELLO and self._k is None and len(p) == SERVER_HELLO_LEN:
            if p[5] != hs.VERSION or p[6] != self.cid:
                self.suspect = hs.handshake_error(
                    hs.MALFORMED, "the server's ServerHello does not echo our version/cipher"
                )
                return None
            nonce_s, head, mac = p[7:HELLO_LEN], p[:HELLO_LEN], p[HELLO_LEN:]
            th = hs.transcript_hash(self._hello, head)
            k = hs.derive(self.key, self.cipher, self.nonce_c, nonce_s, th)
            if not hmac.compare_digest(mac, hs._mac(k["s_confirm"], th)):
                self.suspect = hs.handshake_error(
                    hs.WRONG_KEY,
                    "wrong key: the server's key confirmation does not match "
                    "(both ends must use the same --key file)",
                )
                return None
            self._k, self._th = k, th
            self.current = (
                CONTROL_MARKER
                + bytes([hs.MSG_CLIENT_FINISH])
                + hs._mac(k["c_confirm"], th)
                + self.nonce_c
            )
            return self.current
        if kind == MSG_SERVER_ACK and self._k is not None and len(p) == ACK_LEN:
            if hmac.compare_digest(p[5:], _ack_mac(self._k, self._th)):
                self.result = _result(self.cipher, self._k, client=True)
        return None


def hs_peer(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- sockets ------------------------------------------------------------------------------------


# <linux/in.h>, <linux/in6.h>: not all exported by the socket module.
_IP_MTU_DISCOVER = 10
_IPV6_MTU_DISCOVER = 23
_PMTUDISC_DONT = 0


SOCKET_BUFFER = 8 << 20  # bytes: absorbs bursts that would otherwise be lost (no backpressure)
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33


def _big_buffers(sock: socket.socket) -> None:
    """Large socket buffers (as root beyond net.core.[rw]mem_max, else up to them)."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _no_pmtu(sock: socket.socket) -> None:
    """Let the kernel fragment outer packets larger than the link MTU rather than fail them
    (and give the socket large buffers)."""
    _big_buffers(sock)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_DONT)
    else:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_DONT)


def udp_socket(host: str | None, port: int) -> socket.socket:
    """The one UDP socket: bound to ``host`` or dual-stack to all addresses."""
    if host is None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr: tuple = ("::", port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        addr = info[4]
    try:
        sock.bind(addr)
        _no_pmtu(sock)
        if sock.family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_DONT)
            except OSError:
                pass
    except OSError:
        sock.close()
        raise
    return sock


def raw_esp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_RAW, IPPROTO_ESP)
    try:
        _no_pmtu(sock)
    except OSError:
        sock.close()
        raise
    return sock


def _resolve(host: str, port: int) -> tuple[int, tuple[str, int]]:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as e:
        raise SimpletunError(f"cannot resolve the server address {host!r}: {e}") from None
    return info[0], (info[4][0], info[4][1])


# -- supervision --------------------------------------------------------------------------------


class DatagramSession:
    """The current peer session (for the CLI's SIGUSR1 report)."""

    def __init__(self, dp, peer: int, addr: tuple[str, int], result: HandshakeResult):
        self.dp = dp
        self.peer = peer
        self.addr = addr
        self.handshake = result
        self.started_at = time.monotonic()

    @property
    def stats(self) -> dict:
        """The peer's counters; {} once the peer or its data plane is gone."""
        try:
            return dict(self.dp.peer_stats(self.peer))
        except SimpletunError:
            return {}

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started_at

    def describe(self) -> str:
        return f"ESP {self.handshake.cipher}"

    def counters_line(self) -> str:
        s = self.stats
        counters = " ".join(f"{k}={v}" for k, v in s.items() if v or not k.startswith("drop_"))
        return f"session with {hs_peer(self.addr)} counters: {counters}"


class DatagramTunnel:
    """Live state of a datagram-transport server or client (``task_status.started`` value).

    The same object lives on when the device is recreated (the data plane restarts on the new
    device), so holders (the CLI, ``simpletun status``, the Python API) keep a valid view."""

    def __init__(self, config, transport: str, port: int) -> None:
        self.config = config
        self.transport = transport
        self.port = port
        self.dp = None
        self.device = None
        self._session: DatagramSession | None = None
        self._up = trio.Event()
        self.sessions = 0
        self.handshake_failures = 0
        self.device_recreated = 0
        self.last_exit_reason: str | None = None
        self.encryption: str | None = None  # status override (manual keys: the file's cipher)

    @property
    def session(self) -> DatagramSession | None:
        return self._session

    @session.setter
    def session(self, sess: DatagramSession | None) -> None:
        self._session = sess
        if sess is not None:
            self._up.set()
        elif self._up.is_set():
            self._up = trio.Event()

    async def wait_up(self) -> DatagramSession:
        """The current session, waiting (without polling) until there is one."""
        while self._session is None:
            await self._up.wait()
        return self._session

    def stats(self) -> dict:
        return dict(self.dp.stats) if self.dp is not None else {}

    def status(self) -> dict:
        """What ``simpletun status`` shows (``session.tunnel_status``, one place for both),
        with each SA's sequence number and counters from the data plane's SA table and the
        tunnel-wide drops (e.g. packets for an unknown SPI)."""
        from simpletun.session import overlay_sas, tunnel_status

        sess = self._session
        view = None
        if sess is not None:
            view = (hs_peer(sess.addr), sess.handshake, sess.stats, sess.duration)
        st = tunnel_status(self, self.transport, view)
        if self.dp is not None:
            if sess is not None:
                table = {(s["spi"], s["inbound"]): s for s in self.dp.sas()}
                out = table.get((sess.handshake.tx.spi, False), {})
                inn = table.get((sess.handshake.rx.spi, True), {})
                overlay_sas(st["peers"][0], out, inn)
            st["drops"] = {k[5:]: v for k, v in self.stats().items() if k.startswith("drop_") and v}
        return st


class _Plane:
    """A DataPlane with its UDP transport and (raw mode) raw ESP transports, and the sockets
    it was given (owned here, closed by ``close``)."""

    def __init__(
        self,
        device,
        tap: bool,
        udp: socket.socket,
        raw_families: tuple[int, ...],
        raw_bind: str | None = None,
        offload: bool = True,
    ):
        from simpletun._core import DataPlane

        self.socks = [udp]
        self.dp = DataPlane(device.fd, tap=tap, queue_fds=device.queue_fds)
        try:
            self.udp = self.dp.add_udp(udp.fileno(), offload=offload)
            self.raw: dict[int, int] = {}
            for fam in raw_families:
                try:
                    s = raw_esp_socket(fam)
                    if raw_bind is not None:  # only ESP to this address (--listen)
                        try:
                            s.bind((raw_bind, 0))
                        except OSError:
                            s.close()
                            raise
                except OSError as e:
                    if fam == socket.AF_INET6 and len(raw_families) > 1:
                        log.debug("no IPv6 raw ESP socket: %s", e)
                        continue
                    raise SimpletunError(
                        f"cannot open a raw ESP socket: {e.strerror or e}"
                    ) from None
                self.socks.append(s)
                self.raw[fam] = self.dp.add_raw_esp(s.fileno())
        except BaseException:
            self.close()
            raise

    def data_transport(self, host: str) -> tuple[int, int]:
        """(transport id, endpoint port) for data to ``host``."""
        if not self.raw:
            return self.udp, -1
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        if fam not in self.raw:
            raise SimpletunError(f"no raw ESP socket for {host}'s address family")
        return self.raw[fam], 0

    def close(self) -> None:
        self.dp.stop()
        for s in self.socks:
            s.close()


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    """The one error of our tasks, raised as itself (the CLI prints it as one line)."""
    leaves = []

    def walk(g):
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    if len(leaves) == 1 and isinstance(leaves[0], SimpletunError | OSError):
        return leaves[0]
    return group


async def _events(dp, handler) -> None:
    """Hand every event of the data plane to ``handler`` (synchronous), forever."""
    while True:
        await trio.lowlevel.wait_readable(dp.events_fd)
        for ev in dp.take_events():
            handler(ev)


async def _watch_done(dp) -> None:
    await trio.lowlevel.wait_readable(dp.done_fd)
    raise SimpletunError(f"the data plane ended: {dp.exit_reason}")


def _install(dp, peer: int, result: HandshakeResult, old_rx: int | None) -> None:
    """New inbound SA first, then switch outbound, then retire the old inbound SA."""
    dp.add_inbound_sa(peer, *result.rx.as_tuple())
    dp.set_outbound_sa(peer, *result.tx.as_tuple())
    if old_rx is not None and old_rx != result.rx.spi:
        try:
            dp.remove_inbound_sa(old_rx, OLD_SA_GRACE)
        except SimpletunError:
            pass


async def serve(config, device, *, task_status=trio.TASK_STATUS_IGNORED, tunnel=None) -> None:
    """Serve one peer at a time over UDP (or raw ESP, handshake over UDP)."""
    transport = config.transport
    try:
        udp = udp_socket(config.host, config.port)
    except OSError as e:
        raise SimpletunError(
            f"cannot listen on UDP port {config.port}: {e.strerror or e}"
        ) from None
    fams = (socket.AF_INET, socket.AF_INET6) if transport == "raw" else ()
    try:
        plane = _Plane(device, config.tap, udp, fams, offload=config.offloads)
    except BaseException:
        udp.close()
        raise
    port = udp.getsockname()[1]
    tunnel = tunnel or DatagramTunnel(config, transport, port)
    tunnel.dp, tunnel.device, tunnel.session = plane.dp, device, None
    server = UdpServerHandshake(config.key, config.cipher)
    log.info(
        "server on %s, listening on UDP port %d (ESP %s, %s)",
        device.name,
        port,
        config.cipher,
        "ESP-in-UDP" if transport == "udp" else "raw ESP data",
    )
    state: dict = {"peer": None, "rx": None}

    def on_event(ev) -> None:
        if ev[0] != "control":
            log.debug("data plane event %s", ev)
            return
        _, tid, addr, payload = ev
        if tid != plane.udp:
            return
        reply, accepted = server.handle(payload, addr)
        if accepted is not None:
            _accept(accepted)
        if reply is not None:
            try:
                plane.dp.send_control(plane.udp, addr, reply)
            except SimpletunError as e:
                log.debug("cannot answer %s: %s", hs_peer(addr), e)

    def _accept(a: Accepted) -> None:
        tid, port = plane.data_transport(a.addr[0])
        endpoint = (a.addr[0], a.addr[1] if port < 0 else port)
        old = state["peer"]
        if old is not None and tunnel.session is not None and tunnel.session.addr == a.addr:
            _install(plane.dp, old, a.result, state["rx"])  # the same client, rekeyed
        else:
            if old is not None:
                log.info(
                    "session with %s replaced by %s", hs_peer(tunnel.session.addr), hs_peer(a.addr)
                )
                log.debug("%s", tunnel.session.counters_line())
                plane.dp.remove_peer(old)
            state["peer"] = plane.dp.add_peer(tid, ALL_PREFIXES, endpoint)
            _install(plane.dp, state["peer"], a.result, None)
        state["rx"] = a.result.rx.spi
        tunnel.session = DatagramSession(plane.dp, state["peer"], a.addr, a.result)
        tunnel.sessions += 1
        log.info("session with %s up (ESP %s)", hs_peer(a.addr), a.result.cipher)
        log.debug(
            "handshake with %s ok: spi out 0x%08x in 0x%08x",
            hs_peer(a.addr),
            a.result.tx.spi,
            a.result.rx.spi,
        )

    await _serve_plane(plane, on_event, tunnel, task_status)


async def connect(config, device, *, task_status=trio.TASK_STATUS_IGNORED, tunnel=None) -> None:
    """Handshake with the server over UDP, then keep the tunnel up; re-handshake when the
    server stops answering (it restarted, or our SAs are gone)."""
    transport = config.transport
    family, server = await trio.to_thread.run_sync(_resolve, config.host, config.port)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        udp.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        _no_pmtu(udp)
        fams = (family,) if transport == "raw" else ()
        plane = _Plane(device, config.tap, udp, fams, offload=config.offloads)
    except BaseException:
        udp.close()
        raise
    tunnel = tunnel or DatagramTunnel(config, transport, config.port)
    tunnel.dp, tunnel.device, tunnel.session = plane.dp, device, None
    tid, port = plane.data_transport(server[0])
    endpoint = (server[0], server[1] if port < 0 else port)
    peer = plane.dp.add_peer(tid, ALL_PREFIXES, endpoint)
    log.info(
        "client on %s, server %s (ESP %s, %s)",
        device.name,
        hs_peer(server),
        config.cipher,
        "ESP-in-UDP" if transport == "udp" else "raw ESP data",
    )
    inbox_send, inbox = trio.open_memory_channel(64)

    def on_event(ev) -> None:
        if ev[0] == "control" and ev[1] == plane.udp:
            try:
                inbox_send.send_nowait(ev[3])
            except trio.WouldBlock:
                pass
        else:
            log.debug("data plane event %s", ev)

    def send(msg: bytes) -> None:
        try:
            plane.dp.send_control(plane.udp, server, msg)
        except SimpletunError as e:  # e.g. no route yet: the retransmission tries again
            log.debug("sending to %s failed: %s", hs_peer(server), e)

    async def one_handshake() -> HandshakeResult:
        c = UdpClientHandshake(config.key, config.cipher)
        waits = list(RETRANSMIT)
        with trio.move_on_after(config.handshake_timeout):
            while c.result is None:
                send(c.current)
                with trio.move_on_after(waits.pop(0) if waits else RETRANSMIT[-1]):
                    while c.result is None:
                        nxt = c.handle(await inbox.receive())
                        if nxt is not None:
                            send(nxt)
            return c.result
        if c.suspect is not None:
            raise c.suspect
        raise hs.handshake_error(
            hs.TIMEOUT,
            f"no handshake reply from the server within {config.handshake_timeout:g} s "
            "(is it simpletun with the same --transport?)",
        )

    async def supervise() -> None:
        failures = 0
        old_rx = None
        while True:
            delay = config.backoff(failures)
            if delay:
                await trio.sleep(delay)
            try:
                result = await one_handshake()
            except HandshakeError as e:
                # Never fatal: the rejection is not authenticated (see session.connect).
                failures += 1
                tunnel.handshake_failures += 1
                fatal_looking = getattr(e, "code", None) in hs.FATAL_CODES
                level = logging.ERROR if fatal_looking else logging.WARNING
                log.log(level, "handshake with %s failed: %s; retrying", hs_peer(server), e)
                continue
            _install(plane.dp, peer, result, old_rx)
            old_rx = result.rx.spi
            failures = 0
            tunnel.session = DatagramSession(plane.dp, peer, server, result)
            tunnel.sessions += 1
            log.info("session with %s up (ESP %s)", hs_peer(server), result.cipher)
            log.debug(
                "handshake with %s ok: spi out 0x%08x in 0x%08x",
                hs_peer(server),
                result.tx.spi,
                result.rx.spi,
            )
            await _until_dead(plane.dp, peer)
            log.warning(
                "no authentic packet from %s for %.0f s while sending; new handshake",
                hs_peer(server),
                DEAD_AFTER,
            )

    async def keepalives() -> None:
        while True:
            await trio.sleep(KEEPALIVE_EVERY)
            try:
                plane.dp.send_keepalive(plane.udp, server)
            except SimpletunError:
                pass

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_events, plane.dp, on_event)
            nursery.start_soon(_watch_done, plane.dp)
            if transport == "udp":
                nursery.start_soon(keepalives)
            task_status.started(tunnel)
            await supervise()
    except BaseExceptionGroup as g:
        raise _unwrap(g) from None
    finally:
        if tunnel.session is not None:
            log.debug("%s", tunnel.session.counters_line())
        await trio.to_thread.run_sync(plane.close)


async def manual(config, device, *, task_status=trio.TASK_STATUS_IGNORED, tunnel=None) -> None:
    """Manual keying (``--manual-keys FILE``): the SAs come from the key file (the same file a
    kernel end, ``--dataplane kernel``, reads), no handshake. The peer's address is fixed: the
    client's ``-c HOST``, the server's ``--peer HOST`` (without it, the server learns the
    client's address from its first authentic packet, as the data plane's roaming does).
    ESP-in-UDP uses the file's port at both ends (source and destination, as the kernel's
    encapsulation does)."""
    from simpletun.config import check_manual_keys

    mk = await trio.to_thread.run_sync(check_manual_keys, config)
    role = "server" if config.server else "client"
    transport = config.transport
    peer_host = config.peer if config.server else config.host
    family, addr = socket.AF_INET, None
    if peer_host is not None:
        family, addr = await trio.to_thread.run_sync(_resolve, peer_host, mk.port)
    elif config.host is not None:  # the server's --listen address picks the family
        family = _resolve(config.host, mk.port)[0]
    # udp: the data socket on the file's port; raw: an unused UDP socket (the data plane
    # wants one) on any port, the data on raw ESP sockets.
    bind_host = config.host if config.server else None
    try:
        if bind_host is None and family == socket.AF_INET:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("0.0.0.0", mk.port if transport == "udp" else 0))
                _no_pmtu(udp)
            except BaseException:
                udp.close()
                raise
        else:
            udp = udp_socket(bind_host, mk.port if transport == "udp" else 0)
    except OSError as e:
        raise SimpletunError(f"cannot bind UDP port {mk.port}: {e.strerror or e}") from None
    try:
        fams = (family,) if transport == "raw" else ()
        plane = _Plane(device, config.tap, udp, fams, raw_bind=bind_host, offload=config.offloads)
    except BaseException:
        udp.close()
        raise
    tunnel = tunnel or DatagramTunnel(config, transport, mk.port if transport == "udp" else 0)
    tunnel.dp, tunnel.device, tunnel.session = plane.dp, device, None
    tunnel.encryption = mk.describe()
    tid = plane.raw.get(family, plane.udp)
    endpoint = None
    if addr is not None:
        endpoint = (addr[0], mk.port if transport == "udp" else 0)
    peer = plane.dp.add_peer(tid, ALL_PREFIXES, endpoint)
    mk.install(plane.dp, peer, role)
    o, i = mk.outbound(role), mk.inbound(role)
    result = HandshakeResult(
        mk.cipher_name, SaKeys(o.spi, o.enc_key, o.auth_key), SaKeys(i.spi, i.enc_key, i.auth_key)
    )
    tunnel.session = DatagramSession(plane.dp, peer, endpoint or ("(learnt)", 0), result)
    tunnel.sessions += 1
    log.info(
        "%s on %s, manual keys %s (ESP %s, %s), peer %s, SPIs out 0x%08x in 0x%08x",
        role,
        device.name,
        config.manual_keys,
        mk.cipher_name,
        "ESP-in-UDP" if transport == "udp" else "raw ESP",
        hs_peer(endpoint) if endpoint else "learnt from its first authentic packet",
        o.spi,
        i.spi,
    )

    def on_event(ev) -> None:
        if ev[0] == "control":
            return  # no handshake with manual keys: control datagrams are ignored
        log.debug("data plane event %s", ev)

    await _serve_plane(plane, on_event, tunnel, task_status)


async def _serve_plane(plane, on_event, tunnel, task_status) -> None:
    """Run a server plane until cancelled or it ends: its events to ``on_event``; on the way
    out the session's counters are logged and the plane closed."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_events, plane.dp, on_event)
            nursery.start_soon(_watch_done, plane.dp)
            task_status.started(tunnel)
    except BaseExceptionGroup as g:
        raise _unwrap(g) from None
    finally:
        if tunnel.session is not None:
            log.debug("%s", tunnel.session.counters_line())
        await trio.to_thread.run_sync(plane.close)


async def _until_dead(dp, peer: int) -> None:
    """Return once we have sent to ``peer`` but heard nothing authentic for DEAD_AFTER s."""
    last_rx = dp.peer_stats(peer)["last_rx_ms"]
    tx_mark = dp.peer_stats(peer)["tx_packets"]
    quiet_since = time.monotonic()
    while True:
        await trio.sleep(1.0)
        s = dp.peer_stats(peer)
        if s["last_rx_ms"] != last_rx:
            last_rx, tx_mark, quiet_since = s["last_rx_ms"], s["tx_packets"], time.monotonic()
        elif time.monotonic() - quiet_since >= DEAD_AFTER and s["tx_packets"] > tx_mark:
            return


async def _until_device_gone(device, interval: float) -> None:
    """Return when ``device`` was deleted; restore it when downed or stripped."""
    from simpletun import netdev

    while True:
        await trio.sleep(interval)
        state = await trio.to_thread.run_sync(netdev.check_device, device)
        if state == netdev.DEVICE_GONE:
            return
        if state == netdev.DEVICE_DOWN:
            log.warning(
                "device %s was downed or lost an address or route; restoring it", device.name
            )
            await trio.to_thread.run_sync(netdev.repair_device, device)


async def run(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Like ``session.run`` for the datagram transports: open the device (with its routes),
    serve or connect, and keep the device in place: a deleted device is recreated (the data
    plane restarts on it; peers re-handshake), a downed one restored."""
    from simpletun import netdev, session

    tunnel = None
    while True:
        device = await trio.to_thread.run_sync(session._open, config)
        gone = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    if config.manual_keys is not None:
                        loop = partial(manual, tunnel=tunnel)
                    else:
                        loop = partial(serve if config.server else connect, tunnel=tunnel)
                    started = await nursery.start(loop, config, device)
                    if tunnel is None:
                        tunnel = started
                        task_status.started(tunnel)
                    await _until_device_gone(device, config.device_check_interval)
                    gone = True
                    nursery.cancel_scope.cancel()
            except* SimpletunError:
                # the data plane ends when its device goes: recreate it, or re-raise the error
                state = await trio.to_thread.run_sync(netdev.check_device, device)
                if state != netdev.DEVICE_GONE:
                    raise
                gone = True
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(netdev.close_device, device)
        if not gone:
            return
        log.warning("device %s was deleted; recreating it", config.ifname)
        if tunnel is not None:
            tunnel.device_recreated += 1
