"""A frame-aware man-in-the-middle TCP proxy for simpletun's wire protocol.

The client connects to the proxy; the proxy connects to the server and relays frames (2-byte
big-endian length + payload) both ways, whole frames at a time. The test arms *actions* on a
direction; each action applies to the next ESP data frame (control frames, i.e. payloads
starting with 4 zero bytes, pass untouched unless ``include_control``):

- ``dup``       send the frame twice (the copy must be dropped as a replay)
- ``corrupt``   flip one byte of the payload at ``offset`` (negative = from the end)
- ``truncate``  shorten the payload to ``length`` bytes, or by ``-length`` bytes when negative
                (the prefix is rewritten to match)
- ``hold``      keep the frame back and send it after the next one (reordering)
- ``swallow``   do not forward the frame
- ``capture``   forward it unchanged and keep a copy (``Action.frame``), to replay later

and :meth:`FrameProxy.inject` writes arbitrary bytes between two frames (a forged frame, a
replayed old frame, a huge length prefix with its body...).

Sockets are passed in already created (e.g. inside a network namespace), so the proxy itself
does not care where it runs. Stdlib only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

C2S = "c2s"  # client -> server
S2C = "s2c"  # server -> client


@dataclass
class Action:
    kind: str
    offset: int = -1
    length: int = 0
    include_control: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    frame: bytes | None = None  # the original payload the action applied to

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


@dataclass
class DirectionStats:
    frames: int = 0
    esp_frames: int = 0
    control_frames: int = 0
    bytes: int = 0
    injected: int = 0
    esp_seqs: list = field(default_factory=list)  # (spi, seq) of forwarded ESP frames (last 1000)
    controls: list = field(default_factory=list)  # payloads of the control frames seen


def is_control(payload: bytes) -> bool:
    return payload[:4] == b"\x00\x00\x00\x00"


class _Pipe:
    """One direction of one relayed connection."""

    def __init__(self, proxy: FrameProxy, direction: str, src: socket.socket, dst: socket.socket):
        self.proxy = proxy
        self.direction = direction
        self.src = src
        self.dst = dst
        self.send_lock = threading.Lock()
        self.held: bytes | None = None
        self.thread = threading.Thread(target=self._run, name=f"mitm-{direction}", daemon=True)

    def send_frame(self, payload: bytes) -> None:
        self.send_raw(struct.pack(">H", len(payload)) + payload)

    def send_raw(self, data: bytes) -> None:
        with self.send_lock:
            self.dst.sendall(data)

    def _run(self) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = self.src.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 2:
                    n = struct.unpack_from(">H", buf, 0)[0]
                    if len(buf) < 2 + n:
                        break
                    payload = bytes(buf[2 : 2 + n])
                    del buf[: 2 + n]
                    self._forward(payload)
        except OSError:
            pass
        finally:
            # half-close the other side so EOF propagates like through a plain TCP relay
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)

    def _forward(self, payload: bytes) -> None:
        stats = self.proxy.stats[self.direction]
        ctl = is_control(payload)
        stats.frames += 1
        stats.bytes += len(payload) + 2
        if ctl:
            stats.control_frames += 1
            stats.controls.append(payload)
        else:
            stats.esp_frames += 1
            if len(payload) >= 8:
                stats.esp_seqs.append(struct.unpack_from(">II", payload, 0))
                del stats.esp_seqs[:-1000]
        action = self.proxy._take_action(self.direction, ctl)
        if self.proxy.on_frame is not None:
            self.proxy.on_frame(self.direction, payload)
        if action is not None and action.kind == "hold":
            action.frame = payload
            self.held = payload  # sent after the next frame
            return
        out: list[bytes] = []
        if action is None:
            out.append(payload)
        else:
            action.frame = payload
            k = action.kind
            if k == "dup":
                out += [payload, payload]
            elif k == "corrupt":
                b = bytearray(payload)
                b[action.offset] ^= 0x5A
                out.append(bytes(b))
            elif k == "truncate":
                out.append(payload[: action.length])
            elif k == "capture":
                out.append(payload)
            elif k != "swallow":
                raise ValueError(f"unknown action {k}")
            action.done.set()
        if self.held is not None:
            # reorder: the frame that came after the held one goes first
            out.append(self.held)
            self.held = None
            self.proxy._held_released(self.direction)
        for p in out:
            self.send_frame(p)


class FrameProxy:
    """Relay simpletun frames between a listening socket and an upstream address.

    ``listener`` must be bound and listening; ``make_upstream()`` returns a fresh unconnected
    socket (created in the right namespace) and ``upstream`` is the server address. One
    connection is relayed at a time; when it ends the proxy accepts the next one (the client
    reconnects).
    """

    def __init__(
        self,
        listener: socket.socket,
        make_upstream: Callable[[], socket.socket],
        upstream: tuple[str, int],
    ):
        self.listener = listener
        self.make_upstream = make_upstream
        self.upstream = upstream
        self.stats = {C2S: DirectionStats(), S2C: DirectionStats()}
        self.on_frame: Callable[[str, bytes], None] | None = None
        self.connections = 0
        self._actions: dict[str, deque[Action]] = {C2S: deque(), S2C: deque()}
        self._hold_actions: dict[str, deque[Action]] = {C2S: deque(), S2C: deque()}
        self._lock = threading.Lock()
        self._pipes: dict[str, _Pipe] = {}
        self._socks: list[socket.socket] = []
        self._connected = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="mitm-accept", daemon=True)
        self._thread.start()

    # -- test API ----------------------------------------------------------------------------
    def arm(self, direction: str, kind: str, **kw) -> Action:
        """Apply ``kind`` to the next ESP frame going ``direction``; returns the Action."""
        action = Action(kind, **kw)
        with self._lock:
            self._actions[direction].append(action)
        return action

    def inject(self, direction: str, raw: bytes) -> None:
        """Write ``raw`` (prefix included, if any) into ``direction`` between two frames."""
        pipe = self.pipe(direction)
        pipe.send_raw(raw)
        self.stats[direction].injected += 1

    def inject_frame(self, direction: str, payload: bytes) -> None:
        self.inject(direction, struct.pack(">H", len(payload)) + payload)

    def pipe(self, direction: str, timeout: float = 10.0) -> _Pipe:
        with self._connected:
            if not self._connected.wait_for(lambda: direction in self._pipes, timeout):
                raise TimeoutError("no client connected through the proxy")
            return self._pipes[direction]

    def wait_connections(self, n: int, timeout: float) -> bool:
        with self._connected:
            return self._connected.wait_for(lambda: self.connections >= n, timeout)

    def cut(self) -> None:
        """Abort the current relayed connection (both sockets)."""
        with self._lock:
            socks, self._socks = self._socks, []
            self._pipes = {}
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.cut()
        self._thread.join(timeout=2)

    # -- internals ---------------------------------------------------------------------------
    def _take_action(self, direction: str, control: bool) -> Action | None:
        with self._lock:
            q = self._actions[direction]
            if q and (not control or q[0].include_control):
                a = q.popleft()
                if a.kind == "hold":
                    self._hold_actions[direction].append(a)
                return a
            return None

    def _held_released(self, direction: str) -> None:
        with self._lock:
            if self._hold_actions[direction]:
                self._hold_actions[direction].popleft().done.set()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            up = self.make_upstream()
            try:
                up.connect(self.upstream)
            except OSError:
                client.close()
                up.close()
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.cut()  # only one relayed connection at a time
            self.stats = {C2S: DirectionStats(), S2C: DirectionStats()}  # per connection
            c2s = _Pipe(self, C2S, client, up)
            s2c = _Pipe(self, S2C, up, client)
            with self._connected:
                self._socks = [client, up]
                self._pipes = {C2S: c2s, S2C: s2c}
                self.connections += 1
                self._connected.notify_all()
            c2s.thread.start()
            s2c.thread.start()
