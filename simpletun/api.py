"""Scripted tunnels: the public Python API.

trio programs use :func:`open_tunnel`::

    import simpletun, trio

    async def main():
        async with simpletun.open_tunnel("/etc/simpletun/st0.toml") as t:   # or a Config
            await t.wait_up()                      # the peer is connected (no polling)
            print(t.status()["peers"][0]["rx_bytes"])
            await t.set_routes(["10.1.0.0/16"])    # live, like `simpletun reload`
        # closed: device, addresses and routes are gone

    trio.run(main)

Scripts without trio use :class:`BlockingTunnel` (the same, run in a background thread)::

    with simpletun.BlockingTunnel(config) as t:
        t.wait_up(timeout=10)
        print(t.status())

and :func:`spawn` runs a tunnel end as its own process, optionally inside a network namespace
(what ``simpletun up --foreground`` does), talking to it over its control socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path

import trio

from simpletun import configfile, control, netdev, session
from simpletun._errors import SimpletunError
from simpletun.config import Config, check_route

Spec = Config | configfile.TunnelFile | str | os.PathLike


def _as_file(spec: Spec) -> configfile.TunnelFile | None:
    if isinstance(spec, Config):
        return None
    if isinstance(spec, configfile.TunnelFile):
        return spec
    return configfile.load(os.fspath(spec))


class TunnelHandle:
    """A running tunnel end inside this trio program (from :func:`open_tunnel`)."""

    def __init__(self, tunnel: session.Tunnel, service=None) -> None:
        self._tunnel = tunnel
        self._service = service

    @property
    def tunnel(self) -> session.Tunnel:
        return self._tunnel

    async def wait_up(self, timeout: float | None = None, peer: str | None = None) -> None:
        """Until the peer is connected (a session runs; for IKEv2, until ``peer`` — any peer
        if None — has a Child SA); TooSlowError after ``timeout``."""
        args = () if peer is None else (peer,)
        if peer is not None and not hasattr(self._tunnel, "apply_peers"):
            raise SimpletunError("peer= names an IKEv2 peer; this tunnel has one peer")
        if timeout is None:
            await self._tunnel.wait_up(*args)
            return
        with trio.fail_after(timeout):
            await self._tunnel.wait_up(*args)

    async def reload(self, spec: configfile.TunnelFile | str | os.PathLike | None = None) -> dict:
        """Apply a changed config live, as ``simpletun reload`` does: routes and (IKEv2) peers
        added, removed or changed; the other peers' SAs and traffic are untouched. ``spec``:
        a parsed file or a path (default: re-read the tunnel's own file). Returns what changed,
        ``{"ok": False, "error": ...}`` if the new config is refused."""
        if self._service is None:
            raise SimpletunError("reload needs a tunnel opened from a config file")
        new = None if spec is None else _as_file(spec)
        return await self._service.reload(new)

    def status(self) -> dict:
        """The same data as ``simpletun status --json``."""
        return self._service.status() if self._service else self._tunnel.status()

    @property
    def stats(self) -> dict:
        """The current session's counters ({} while the peer is not connected)."""
        return self._tunnel.stats()

    async def set_routes(self, prefixes: Iterable[str | ipaddress._BaseNetwork]) -> None:
        """Route exactly these prefixes through the tunnel (the peer's allowed IPs), live."""
        nets = tuple(check_route(str(p)) for p in prefixes)
        await trio.to_thread.run_sync(netdev.set_routes, self._tunnel.device, nets)
        self._tunnel.config = replace(self._tunnel.config, routes=nets)


@contextlib.asynccontextmanager
async def open_tunnel(spec: Spec) -> AsyncIterator[TunnelHandle]:
    """Run a tunnel end (a :class:`Config`, a parsed file or a path) until the block ends.

    A config file also gets its control socket (``simpletun status NAME`` sees it) and its
    post_up/pre_down commands."""
    tf = _as_file(spec)
    async with trio.open_nursery() as nursery:
        if tf is None:
            from simpletun.service import runner

            handle = TunnelHandle(await nursery.start(runner(spec), spec))
        else:
            from simpletun.service import Service

            svc = await nursery.start(Service(tf).run)
            handle = TunnelHandle(svc.tunnel, svc)
        try:
            yield handle
        finally:
            nursery.cancel_scope.cancel()


class BlockingTunnel:
    """:func:`open_tunnel` for code without trio: the tunnel runs in a background thread.

    Use as a context manager, or call :meth:`close`. Errors of the tunnel (e.g. the device
    cannot be made) are raised from the constructor or from :meth:`close`."""

    def __init__(self, spec: Spec, start_timeout: float = 30.0) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._handle: TunnelHandle | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, args=(spec,), daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise SimpletunError(f"the tunnel did not start within {start_timeout} s")
        if self._error is not None:
            raise self._error

    def _main(self, spec: Spec) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with open_tunnel(spec) as handle:
                self._handle = handle
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(run)
        except BaseException as e:  # reported to the caller's thread
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            self._error = e
        finally:
            self._ready.set()

    def _call(self, fn, *args):
        if self._handle is None or not self._thread.is_alive():
            raise SimpletunError("the tunnel is not running") from self._error
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def wait_up(self, timeout: float | None = None, peer: str | None = None) -> None:
        self._call(self._handle.wait_up, timeout, peer)

    def reload(self, spec=None) -> dict:
        return self._call(self._handle.reload, spec)

    def status(self) -> dict:
        return self._call(_sync_to_async(self._handle.status))

    @property
    def stats(self) -> dict:
        return self._call(_sync_to_async(lambda: self._handle.stats))

    def set_routes(self, prefixes) -> None:
        self._call(self._handle.set_routes, list(prefixes))

    def close(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        if self._error is not None and not isinstance(self._error, KeyboardInterrupt):
            raise self._error

    def __enter__(self) -> BlockingTunnel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sync_to_async(fn):
    async def call():
        return fn()

    return call


class TunnelProcess:
    """A tunnel end run as its own process (:func:`spawn`)."""

    def __init__(self, popen: subprocess.Popen, name: str) -> None:
        self.popen = popen
        self.name = name

    def status(self) -> dict:
        reply = control.request(self.name, {"cmd": "status"})
        return reply["status"]

    def wait_up(self, timeout: float = 30.0) -> dict:
        """Until the peer is connected; returns the status. SimpletunError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise SimpletunError(f"{self.name} exited with status {self.popen.returncode}")
            try:
                st = self.status()
                if st.get("up"):
                    return st
            except control.NotRunning:
                pass
            time.sleep(0.05)
        raise SimpletunError(f"{self.name}: peer not connected within {timeout} s")

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        return self.popen.wait(timeout)


def spawn(config_file: str | os.PathLike, *, netns: str | None = None, log=None) -> TunnelProcess:
    """Run ``simpletun up --foreground CONFIG`` (inside network namespace ``netns`` if given)."""
    tf = configfile.load(os.fspath(config_file))
    argv = [sys.executable, "-m", "simpletun", "up", "--foreground", str(Path(tf.path).resolve())]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL, stderr=log
    )
    return TunnelProcess(popen, tf.name)


__all__ = ["BlockingTunnel", "TunnelHandle", "TunnelProcess", "open_tunnel", "spawn"]
