"""``--dataplane kernel``: the tunnel's ESP runs in the Linux kernel (xfrm), not in simpletun's
Rust data plane.

simpletun's control plane still runs: it creates an xfrm interface (route-based, like the TUN
device) carrying the addresses and routes, installs the SAs (from a manual key file) and the
policies bound to that interface, holds the UDP encapsulation socket the kernel needs for
ESP-in-UDP, and removes all of it on exit (cancellation, SIGINT/SIGTERM/SIGHUP).
"""

from __future__ import annotations

import logging
import socket
import time

import trio

from simpletun import manual_keys, xfrm
from simpletun._errors import ConfigError

log = logging.getLogger("simpletun.kernel")

IF_ID = 0x5354  # "ST": the xfrm interface id binding policies and SAs to the device
UDP_ENCAP = 100  # socket option (level IPPROTO_UDP)
UDP_ENCAP_ESPINUDP = 2


def _endpoints(config) -> tuple[str, str]:
    """(local, remote) outer addresses: the client's peer is ``-c HOST``, the server's
    ``--peer HOST``; the local one is the server's ``--listen`` address or what the route to
    the peer picks."""
    remote_host = config.peer if config.server else config.host
    if not remote_host:
        raise ConfigError(
            "--dataplane kernel -s needs --peer HOST (the client's address: manual keying has "
            "no handshake to learn it)"
        )
    try:
        remote = socket.getaddrinfo(remote_host, None, type=socket.SOCK_DGRAM)[0][4][0]
    except OSError as e:
        raise ConfigError(f"cannot resolve the peer address {remote_host!r}: {e}") from None
    if config.server and config.host:
        return socket.getaddrinfo(config.host, None, type=socket.SOCK_DGRAM)[0][4][0], remote
    fam = socket.AF_INET6 if ":" in remote else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((remote, 9))
        local = s.getsockname()[0]
    return local, remote


def preflight(config) -> manual_keys.ManualKeys:
    """Everything checkable before anything is created; ConfigError (exit 2) otherwise, e.g.
    the kernel has no ESP: one line naming the missing option and --dataplane userspace."""
    from simpletun.config import check_manual_keys

    mk = check_manual_keys(config)
    peer = config.peer if config.server else config.host
    family = socket.AF_INET6 if peer and ":" in peer else socket.AF_INET
    xfrm.check_esp(family)  # KernelEspMissing (a ConfigError): the one line
    return mk


def _encap_socket(port: int, family: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
    return s


def _any(family: int) -> str:
    return "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"


class KernelTunnel:
    """A tunnel end whose ESP the kernel does; ``status()`` as for the userspace data plane."""

    def __init__(self, config, mk: manual_keys.ManualKeys, local: str, remote: str) -> None:
        self.config = config
        self.keys = mk
        self.local, self.remote = local, remote
        self.role = "server" if config.server else "client"
        self.port = mk.port if mk.transport == "esp-in-udp" else None
        self.sessions = 1
        self.handshake_failures = 0
        self.last_exit_reason = None
        self.device_recreated = 0
        self.started = time.monotonic()
        self.out_sa, self.in_sa = mk.xfrm_sas(self.role, local, remote, if_id=IF_ID)
        self.policies: list[xfrm.Policy] = []
        self.encap: socket.socket | None = None
        self.ifindex: int | None = None

        class _Dev:
            name = config.ifname

        self.device = _Dev()
        self.session = self

    # What service/cli read of a session.
    @property
    def peer(self) -> str:
        return self.remote

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def describe(self) -> str:
        return f"kernel ESP {self.local} <-> {self.remote}"

    def stats(self) -> dict:
        o = xfrm.get_sa(self.out_sa.dst, self.out_sa.spi, self.out_sa.src)
        i = xfrm.get_sa(self.in_sa.dst, self.in_sa.spi, self.in_sa.src)
        oc, ic = o.counters("out"), i.counters("in")
        return {
            "tx_packets": oc["encap_packets"],
            "tx_bytes": oc["encap_bytes"],
            "rx_packets": ic["decap_packets"],
            "rx_bytes": ic["decap_bytes"],
            "drop_replay": ic["drop_replay"],
            "drop_auth": ic["drop_auth"],
        }

    def counters_line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.stats().items())

    def status(self) -> dict:
        from simpletun import session as _session

        class _Hs:
            class tx:
                spi = self.out_sa.spi

            class rx:
                spi = self.in_sa.spi

        transport = self.config.transport
        st = _session.tunnel_status(
            self, transport, (self.remote, _Hs, self.stats(), self.duration)
        )
        st["dataplane"] = "kernel"
        st["encryption"] = self.keys.describe()
        st["listen_port"] = self.port
        return st

    # -- set-up and tear-down (blocking; run in a thread) --

    def install(self) -> None:
        from pyroute2 import IPRoute

        c = self.config
        fam = self.out_sa.family
        try:
            self.ifindex = xfrm.add_interface(c.ifname, IF_ID)
            with IPRoute() as ipr:
                ipr.link("set", index=self.ifindex, mtu=c.mtu, state="up")
                for a in c.addresses:
                    ipr.addr(
                        "add", index=self.ifindex, address=str(a.ip), prefixlen=a.network.prefixlen
                    )
                for r in c.routes:
                    ipr.route("add", dst=str(r), oif=self.ifindex)
            if self.port is not None:
                self.encap = _encap_socket(self.port, fam)
            xfrm.add_sa(self.out_sa)
            xfrm.add_sa(self.in_sa)
            inner_fams = {a.version for a in c.addresses} | {r.version for r in c.routes} or {4}
            for v in sorted(inner_fams):
                ifam = socket.AF_INET6 if v == 6 else socket.AF_INET
                sel = xfrm.Selector.of(_any(ifam), _any(ifam))
                for d, (s, t) in (
                    ("out", (self.local, self.remote)),
                    ("in", (self.remote, self.local)),
                ):
                    reqid = self.out_sa.reqid if d == "out" else self.in_sa.reqid
                    pol = xfrm.Policy(sel, d, (xfrm.Template(s, t, reqid),), if_id=IF_ID)
                    xfrm.add_policy(pol)
                    self.policies.append(pol)
        except BaseException:
            self.remove()
            raise
        log.info(
            "kernel data plane on %s: ESP %s %s <-> %s, SPIs out %#010x in %#010x",
            c.ifname,
            self.keys.transport,
            self.local,
            self.remote,
            self.out_sa.spi,
            self.in_sa.spi,
        )

    def remove(self) -> None:
        for pol in reversed(self.policies):
            try:
                xfrm.delete_policy(pol.selector, pol.dir)
            except Exception as e:
                log.warning("removing policy %s %s: %s", pol.dir, pol.selector, e)
        self.policies.clear()
        for sa in (self.out_sa, self.in_sa):
            try:
                xfrm.delete_sa(sa.dst, sa.spi, sa.src)
            except Exception:
                pass  # not installed
        if self.encap is not None:
            self.encap.close()
            self.encap = None
        if self.ifindex is not None:
            try:
                xfrm.delete_interface(self.config.ifname)
            except Exception as e:
                log.warning("removing %s: %s", self.config.ifname, e)
            self.ifindex = None


async def run(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Install the kernel tunnel, ``task_status.started(tunnel)``, hold it until cancelled,
    then remove SAs, policies, the encap socket and the interface."""
    mk = await trio.to_thread.run_sync(preflight, config)
    local, remote = await trio.to_thread.run_sync(_endpoints, config)
    t = KernelTunnel(config, mk, local, remote)
    await trio.to_thread.run_sync(t.install)
    try:
        task_status.started(t)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(t.remove)
            log.info("kernel data plane on %s removed", config.ifname)


__all__ = ["KernelTunnel", "preflight", "run"]
