"""A tunnel run from its config file (``simpletun up``): the tunnel, its control socket,
post-up/pre-down commands, reload, and the service manager's notifications.

Under systemd (``Type=notify``) ``READY=1`` is sent once the device, its addresses and routes and
(server) the listener are up; ``STATUS=`` tells whether the peer is connected; ``RELOADING=1`` /
``STOPPING=1`` frame a reload and the shutdown.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import replace

import trio

from simpletun import configfile, control, netdev, session, systemd
from simpletun._errors import ConfigError, SimpletunError

log = logging.getLogger("simpletun.service")

# Changes a reload cannot apply to a running tunnel (they need `down` + `up`).
RESTART_FIELDS = (
    "server", "ifname", "host", "port", "tap", "key", "cipher", "mtu", "addresses", "transport",
    "queues",
)  # fmt: skip


def runner(config):
    """The tunnel loop for the config's transport."""
    if getattr(config, "dataplane", "userspace") == "kernel":
        from simpletun import kernel_dp

        return kernel_dp.run_ike if getattr(config, "ike", None) is not None else kernel_dp.run
    if getattr(config, "ike", None) is not None:
        from simpletun import ikesession

        return ikesession.run_config
    if config.transport == "tcp":
        return session.run
    from simpletun import datagram

    return datagram.run


class Service:
    """A running tunnel from a file: ``tunnel`` is the live :class:`session.Tunnel`."""

    def __init__(self, tf: configfile.TunnelFile) -> None:
        self.file = tf
        self.tunnel: session.Tunnel | None = None
        self._cancel = trio.CancelScope()
        self._reload_lock = trio.Lock()
        self.ready = False  # device, addresses, routes, listener up and post_up done

    @property
    def name(self) -> str:
        return self.file.name

    def stop(self) -> None:
        self._cancel.cancel()

    def status(self) -> dict:
        st = self.tunnel.status() if self.tunnel is not None else {"up": False}
        st["ready"] = self.ready
        st["config"] = str(self.file.path)
        st["pid"] = __import__("os").getpid()
        return st

    async def reload(self, new: configfile.TunnelFile | None = None) -> dict:
        """Re-read the file (or take ``new``) and apply what can change live (routes; IKEv2
        peers); name what needs a restart. The running sessions are not disturbed."""
        async with self._reload_lock:
            systemd.notify("RELOADING=1")
            try:
                if new is None:
                    new = await trio.to_thread.run_sync(configfile.load, str(self.file.path))
            except ConfigError as e:
                log.error("reload failed, keeping the running configuration: %s", e)
                systemd.notify("READY=1")
                return {"ok": False, "error": str(e)}
            old = self.file.config
            needs = [f for f in RESTART_FIELDS if getattr(old, f) != getattr(new.config, f)]
            added: list = []
            removed: list = []
            if new.config.routes != old.routes and self.tunnel is not None:
                dev = self.tunnel.device
                try:
                    added, removed = await trio.to_thread.run_sync(
                        netdev.set_routes, dev, new.config.routes
                    )
                except SimpletunError as e:  # e.g. a route in the way: keep running as before
                    log.error("reload failed, routes left as they were: %s", e)
                    systemd.notify("READY=1")
                    return {"ok": False, "error": str(e)}
                self.tunnel.config = replace(self.tunnel.config, routes=new.config.routes)
            peer_changes: dict = {}
            if getattr(new.config, "ike", None) is not None and hasattr(self.tunnel, "apply_peers"):
                peer_changes = self.tunnel.apply_peers(new.config.ike)
            keep = {f: getattr(old, f) for f in needs}
            self.file = replace(new, config=replace(new.config, **keep))
            log.info(
                "reloaded %s: routes +%s -%s%s",
                self.file.path,
                [str(r) for r in added] or "none",
                [str(r) for r in removed] or "none",
                f"; needs a restart to apply: {', '.join(needs)}" if needs else "",
            )
            systemd.notify("READY=1", self._status_line())
            return {
                "ok": True,
                "routes_added": [str(r) for r in added],
                "routes_removed": [str(r) for r in removed],
                "needs_restart": needs,
                **peer_changes,
            }

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "reload":
            return await self.reload()
        if cmd == "stop":
            log.info("stop requested over the control socket")
            self.stop()
            return {"ok": True, "pid": self.status()["pid"]}
        return {"ok": False, "error": f"unknown command {cmd!r} (status, reload, stop)"}

    def _status_line(self) -> str:
        t = self.tunnel
        if t is None:
            return "STATUS=starting"
        if hasattr(t, "apply_peers"):
            peers = t.status()["peers"]
            up = sum(1 for p in peers if p["child_sas"])
            return f"STATUS={up} of {len(peers)} IKEv2 peer(s) up"
        if t.session is not None:
            return f"STATUS=peer {t.session.peer} connected ({t.sessions} session(s) so far)"
        why = f"; last: {t.last_exit_reason}" if t.last_exit_reason else ""
        return f"STATUS=waiting for the peer ({t.handshake_failures} failed handshake(s){why})"

    def _hooks(self, which: str, commands: tuple[str, ...]) -> None:
        for cmd in commands:
            line = cmd.replace("%i", self.name)
            log.info("%s: %s", which, line)
            done = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True)
            if done.returncode != 0:
                err = (done.stderr or done.stdout).strip().splitlines()
                raise SimpletunError(
                    f"{which} command failed (exit {done.returncode}): {line}"
                    + (f": {err[-1]}" if err else "")
                )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop` (or cancellation). pre_down runs before the device goes."""
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, self.name, self.handle)
            self.tunnel = await nursery.start(runner(self.file.config), self.file.config)
            try:
                with self._cancel:
                    await trio.to_thread.run_sync(self._hooks, "post_up", self.file.post_up)
                    self.ready = True
                    systemd.notify("READY=1", self._status_line())
                    log.info("%s is up (%s)", self.name, self.file.path)
                    task_status.started(self)
                    last = None
                    while True:
                        line = self._status_line()
                        if line != last:
                            systemd.notify(line)
                            last = line
                        await trio.sleep(1.0)
            finally:
                with trio.CancelScope(shield=True):
                    systemd.notify("STOPPING=1")
                    try:
                        await trio.to_thread.run_sync(self._hooks, "pre_down", self.file.pre_down)
                    except SimpletunError as e:
                        log.error("%s", e)
                nursery.cancel_scope.cancel()
