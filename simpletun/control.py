"""The control socket of a running tunnel: ``/run/simpletun/NAME.sock`` (root only).

One JSON object per line each way. Requests: ``{"cmd": "status"}``, ``{"cmd": "reload"}``,
``{"cmd": "stop"}``; every reply has ``"ok"`` and, on failure, ``"error"``. ``simpletun status``,
``reload`` and ``down`` are clients of it; the running process serves it (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

RUN_DIR_ENV = "SIMPLETUN_RUN_DIR"
DEFAULT_RUN_DIR = "/run/simpletun"
MAX_REQUEST = 4096


class NotRunning(Exception):
    """No tunnel of that name answers on its control socket."""


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR))


def socket_path(name: str) -> Path:
    return run_dir() / f"{name}.sock"


def _prepare_dir(d: Path) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(d, 0o700)


Handler = Callable[[dict], Awaitable[dict]]


async def serve(name: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the control socket until cancelled; the socket file is removed at the end.

    Refuses to start when another live process already serves ``name``."""
    path = socket_path(name)
    _prepare_dir(path.parent)
    if path.exists():
        try:
            request(name, {"cmd": "status"}, timeout=1.0)
        except NotRunning:
            path.unlink(missing_ok=True)  # stale, from a process that was killed
        else:
            from simpletun._errors import SimpletunError

            raise SimpletunError(
                f"tunnel {name} is already running (control socket {path}); "
                f"stop it first: simpletun down {name}"
            )
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_handle, stream, handler)
    finally:
        path.unlink(missing_ok=True)
        sock.close()


async def _handle(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        buf = b""
        with trio.move_on_after(5):
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                buf += chunk
        try:
            req = json.loads(buf.split(b"\n", 1)[0] or b"null")
            if not isinstance(req, dict):
                raise ValueError("not an object")
            reply = await handler(req)
        except ValueError as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def request(name: str, req: dict, timeout: float = 5.0) -> dict:
    """Blocking client: send ``req`` to tunnel ``name``; NotRunning if nobody answers."""
    path = socket_path(name)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise NotRunning(name) from None
            raise
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf:
        raise NotRunning(name)
    return json.loads(buf)


def running_names() -> list[str]:
    d = run_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.sock"))
