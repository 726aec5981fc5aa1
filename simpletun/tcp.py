"""The TCP transport of the control plane: listening, connecting, socket options, and admission
of connections that have not yet proved the key.

Socket ownership is in one place: :func:`listen` yields listeners that are closed when its
context ends, :func:`open_connection` hands back a stream the caller closes with ``aclose`` (or
``socket.close``) exactly once, in :mod:`simpletun.session`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

import trio

from simpletun._errors import SimpletunError

log = logging.getLogger("simpletun.tcp")

# TCP keepalive: probe an idle connection after 10 s, every 5 s, give up after 3 misses; and
# drop a connection whose sent data stays unacknowledged for 30 s.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 30_000
# Connections allowed to be in the handshake at once (each is bounded by the handshake timeout),
# in all and from one source address. When full, the oldest such connection is dropped (of the
# same source if that source is at its own limit): a flood of idle connections can delay a real
# client by at most one handshake, never lock it out.
MAX_PENDING_HANDSHAKES = 32
MAX_PENDING_PER_SOURCE = 8


def format_peer(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tune_socket(sock, keepalive: int | None = None) -> None:
    """TCP_NODELAY (latency) and keepalive/user timeout (notice a dead peer within ~30 s);
    ``keepalive`` overrides the idle time before the first probe (a peer's
    ``persistent_keepalive``: also keeps NAT and firewall state alive)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive or KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def connect_error(e: BaseException) -> str:
    """A short reason from open_tcp_stream's failure (it wraps the per-address errors)."""
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    causes = getattr(e.__cause__, "exceptions", ())
    reasons = sorted({os.strerror(c.errno) for c in causes if isinstance(c, OSError) and c.errno})
    if reasons:
        return ", ".join(reasons)
    return getattr(e, "strerror", None) or str(e)


@contextlib.asynccontextmanager
async def listen(port: int, host: str | None) -> AsyncIterator[list[trio.SocketListener]]:
    """Listening sockets on ``port`` (all addresses, or ``host``), closed when the block ends."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise SimpletunError(f"cannot listen on TCP port {port}: {e.strerror or e}") from None
    try:
        yield listeners
    finally:
        for listener in listeners:
            listener.socket.close()


async def accept_loop(listener: trio.SocketListener, handle, nursery: trio.Nursery) -> None:
    """Accept forever, handing each connection to ``handle`` in ``nursery``."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:  # e.g. EMFILE: wait and retry rather than die
            log.error("accept failed: %s", e)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle, stream)


async def open_connection(
    host: str, port: int, timeout: float, keepalive: int | None = None
) -> tuple[trio.SocketStream, str]:
    """Connect and tune the socket; returns (stream, "host:port" of the peer).

    Raises OSError or trio.TooSlowError; the stream is closed on any failure here."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
    try:
        peer = format_peer(stream.socket.getpeername())
        tune_socket(stream.socket, keepalive)
    except OSError:
        stream.socket.close()
        raise
    return stream, peer


class Pending:
    """One admitted connection; :meth:`progressed` marks it as past the cheap checks."""

    __slots__ = ("source", "scope", "advanced")

    def __init__(self, source: str, scope: trio.CancelScope) -> None:
        self.source = source
        self.scope = scope
        self.advanced = False

    def progressed(self) -> None:
        self.advanced = True


class Admission:
    """Connections that have not proved the key yet, bounded in all and per source address.

    A new connection is always admitted; when a bound is reached one pending connection is
    cancelled to make room: of the same source when that source is at its own limit, and the
    oldest that has not sent a well-formed first message if there is one, else the oldest. So
    idle connections (the cheapest attack) only ever push out each other, and a real client
    that has sent its hello is pushed out only by a flood of well-formed hellos. Counts
    evictions in ``evicted``.
    """

    def __init__(
        self, limit: int = MAX_PENDING_HANDSHAKES, per_source: int = MAX_PENDING_PER_SOURCE
    ) -> None:
        self.limit = limit
        self.per_source = per_source
        self.evicted = 0
        self._pending: OrderedDict[Pending, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    @contextlib.contextmanager
    def admit(self, source: str, scope: trio.CancelScope) -> Iterator[Pending]:
        same = [p for p in self._pending if p.source == source]
        if len(same) >= self.per_source:
            self._evict(same)
        elif len(self._pending) >= self.limit:
            self._evict(list(self._pending))
        entry = Pending(source, scope)
        self._pending[entry] = None
        try:
            yield entry
        finally:
            self._pending.pop(entry, None)

    def _evict(self, candidates: list[Pending]) -> None:
        victim = next((p for p in candidates if not p.advanced), candidates[0])
        del self._pending[victim]
        victim.scope.cancel()
        self.evicted += 1
