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
from functools import partial

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


def make_interface(config) -> int:
    """The xfrm interface (if_id ``IF_ID``) named like the device, up, with the config's MTU,
    addresses and routes; returns its index (removed again if a step fails)."""
    from pyroute2 import IPRoute

    index = xfrm.add_interface(config.ifname, IF_ID)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=index, mtu=config.mtu, state="up")
            for a in config.addresses:
                ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
            for r in config.routes:
                ipr.route("add", dst=str(r), oif=index)
    except BaseException:
        remove_interface(config.ifname)
        raise
    return index


def remove_interface(name: str) -> None:
    try:
        xfrm.delete_interface(name)
    except Exception as e:
        log.warning("removing %s: %s", name, e)


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

    def _states(self):
        o = xfrm.get_sa(self.out_sa.dst, self.out_sa.spi, self.out_sa.src)
        i = xfrm.get_sa(self.in_sa.dst, self.in_sa.spi, self.in_sa.src)
        return o, i

    def stats(self, states=None) -> dict:
        o, i = states or self._states()
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
        o, i = self._states()
        st = _session.tunnel_status(
            self, transport, (self.remote, _Hs, self.stats((o, i)), self.duration)
        )
        out = o.counters("out") | {"tx_seq": o.sequence("out")}
        _session.overlay_sas(
            st["peers"][0], out, i.counters("in") | {"rx_highest_seq": i.sequence("in")}
        )
        st["dataplane"] = "kernel"
        st["encryption"] = self.keys.describe()
        st["listen_port"] = self.port
        return st

    # -- set-up and tear-down (blocking; run in a thread) --

    def install(self) -> None:
        c = self.config
        fam = self.out_sa.family
        try:
            self.ifindex = make_interface(c)
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
                xfrm.delete_policy(pol.selector, pol.dir, if_id=pol.if_id)
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
            remove_interface(self.config.ifname)
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


# -- IKEv2 keying the kernel's ESP --------------------------------------------------------------


class _KPeer:
    def __init__(self, pid: int, prefixes: list[str], endpoint) -> None:
        self.pid = pid
        self.prefixes = prefixes
        self.endpoint = tuple(endpoint) if endpoint is not None else None
        self.out: xfrm.SA | None = None
        self.inbound: dict[int, xfrm.SA] = {}
        self.policies: list[xfrm.Policy] = []
        self.reqid = 0x5300 + 2 * pid  # out; in is reqid + 1
        self.retired: dict[str, int] = {}  # counters of this peer's SAs already deleted


class KernelPlane:
    """What :class:`simpletun.ikesession.IkeGlue` drives, over the kernel's xfrm instead of the
    Rust data plane: a peer is a set of policies (its remote traffic selectors, bound to the
    xfrm interface ``IF_ID``) made once its endpoint is known, a Child SA's inbound half an
    inbound xfrm SA, its outbound half the outbound SA (the previous one deleted: the kernel
    sends on the newest SA matching the policy's template). ESP travels UDP-encapsulated on
    the IKE socket of port 4500 (``UDP_ENCAP``): the kernel takes ESP, IKE (non-ESP marker)
    stays with the socket. ``remove_inbound_sa(spi, grace)`` keeps the SA ``grace`` seconds.
    Not wired: the kernel's soft lifetimes (rekeys follow ``rekey_time`` only)."""

    def __init__(
        self, local_ip: str, sock4500: socket.socket, *, netns: str | None = None, timer=None
    ):
        import threading

        self.local_ip = local_ip
        self.sock = sock4500
        self.netns = netns
        self._timer = timer or threading.Timer  # (seconds, fn) -> a started-on-.start() timer
        self.peers_: dict[int, _KPeer] = {}
        self._next = 1
        self._timers: list = []

    # peers
    def add_peer(self, transport: int, prefixes: list[str], endpoint=None) -> int:
        pid = self._next
        self._next += 1
        self.peers_[pid] = _KPeer(pid, list(prefixes), endpoint)
        return pid

    def remove_peer(self, pid: int) -> None:
        p = self.peers_.pop(pid, None)
        if p is not None:
            self._drop_peer(p)

    def set_endpoint(self, pid: int, endpoint) -> None:
        p = self._peer(pid)
        ep = tuple(endpoint) if endpoint is not None else None
        if p.endpoint is not None and ep is not None and ep[0] != p.endpoint[0]:
            self._drop_policies(p)  # moved: policies are made again for the new address
        p.endpoint = ep

    def endpoint(self, pid: int):
        return self._peer(pid).endpoint

    def peers(self) -> list[int]:
        return list(self.peers_)

    def _peer(self, pid: int) -> _KPeer:
        from simpletun._errors import SimpletunError

        try:
            return self.peers_[pid]
        except KeyError:
            raise SimpletunError(f"no peer {pid}") from None

    # SAs
    def _sa(self, p: _KPeer, out: bool, spi: int, enc: bytes, auth: bytes, esn: bool) -> xfrm.SA:
        from simpletun._errors import SimpletunError

        if p.endpoint is None:
            raise SimpletunError(f"peer {p.pid} has no endpoint yet: no kernel SA")
        rip, rport = p.endpoint[0], p.endpoint[1] or ESPINUDP_PORT
        src, dst = (self.local_ip, rip) if out else (rip, self.local_ip)
        encap = xfrm.Encap(ESPINUDP_PORT, rport) if out else xfrm.Encap(rport, ESPINUDP_PORT)
        return xfrm.SA(
            src, dst, spi, enc, auth, reqid=p.reqid + (0 if out else 1),
            replay_window=manual_keys.DEFAULT_REPLAY_WINDOW, esn=esn, encap=encap, if_id=IF_ID,
        )  # fmt: skip

    def _ensure_policies(self, p: _KPeer) -> None:
        if p.policies:
            return
        rip = p.endpoint[0]
        for prefix in p.prefixes:
            fam = socket.AF_INET6 if ":" in prefix else socket.AF_INET
            for d, sel, (s, t), reqid in (
                ("out", xfrm.Selector.of(_any(fam), prefix), (self.local_ip, rip), p.reqid),
                ("in", xfrm.Selector.of(prefix, _any(fam)), (rip, self.local_ip), p.reqid + 1),
            ):
                pol = xfrm.Policy(sel, d, (xfrm.Template(s, t, reqid),), if_id=IF_ID)
                xfrm.add_policy(pol, netns=self.netns)
                p.policies.append(pol)

    def add_inbound_sa(self, pid, spi, enc_key, auth_key, *, replay_window=None, esn=False):
        p = self._peer(pid)
        sa = self._sa(p, False, spi, enc_key, auth_key, esn)
        xfrm.add_sa(sa, netns=self.netns)
        p.inbound[spi] = sa
        self._ensure_policies(p)

    def set_outbound_sa(self, pid, spi, enc_key, auth_key, *, esn=False):
        p = self._peer(pid)
        sa = self._sa(p, True, spi, enc_key, auth_key, esn)
        xfrm.add_sa(sa, netns=self.netns)  # the newest SA of the template carries traffic
        old, p.out = p.out, sa
        if old is not None:
            self._delete(old, p)
        self._ensure_policies(p)

    def clear_outbound_sa(self, pid: int) -> None:
        p = self._peer(pid)
        old, p.out = p.out, None
        if old is not None:
            self._delete(old, p)

    def remove_inbound_sa(self, spi: int, grace: float = 0.0) -> None:
        for p in self.peers_.values():
            sa = p.inbound.get(spi)
            if sa is None:
                continue

            def gone(p=p, spi=spi, sa=sa) -> None:
                if p.inbound.get(spi) is sa:
                    del p.inbound[spi]
                    self._delete(sa, p)

            if grace > 0:
                t = self._timer(grace, gone)
                t.daemon = True
                self._timers.append(t)
                t.start()
            else:
                gone()
            return

    def _delete(self, sa: xfrm.SA, p: _KPeer | None = None) -> None:
        """Delete an SA; its counters stay with peer ``p`` (status totals survive rekeys)."""
        if p is not None:
            try:
                st = xfrm.get_sa(sa.dst, sa.spi, sa.src, netns=self.netns)
            except Exception:
                st = None
            if st is not None:
                inbound = sa.dst == self.local_ip
                for k, v in _peer_counters(st, inbound).items():
                    p.retired[k] = p.retired.get(k, 0) + v
        try:
            xfrm.delete_sa(sa.dst, sa.spi, sa.src, netns=self.netns)
        except Exception as e:
            log.debug("deleting SA %#x: %s", sa.spi, e)

    def _drop_policies(self, p: _KPeer) -> None:
        for pol in p.policies:
            try:
                xfrm.delete_policy(pol.selector, pol.dir, if_id=IF_ID, netns=self.netns)
            except Exception as e:
                log.warning("removing policy %s %s: %s", pol.dir, pol.selector, e)
        p.policies.clear()

    def _drop_peer(self, p: _KPeer) -> None:
        self._drop_policies(p)
        for sa in [*([p.out] if p.out else []), *p.inbound.values()]:
            self._delete(sa)
        p.out = None
        p.inbound.clear()

    # datagrams on the IKE socket of port 4500
    def send_control(self, transport: int, remote, data: bytes) -> None:
        from simpletun._errors import SimpletunError

        try:
            self.sock.sendto(data, tuple(remote))
        except OSError as e:
            raise SimpletunError(f"send to {remote}: {e.strerror or e}") from None

    def send_keepalive(self, transport: int, remote) -> None:
        self.send_control(transport, remote, b"\xff")  # RFC 3948 NAT-keepalive

    # figures, as DataPlane reports them
    def sas(self) -> list[dict]:
        out = []
        for p in self.peers_.values():
            for sa, inbound in [*([(p.out, False)] if p.out else []),
                                *((x, True) for x in p.inbound.values())]:  # fmt: skip
                try:
                    st = xfrm.get_sa(sa.dst, sa.spi, sa.src, netns=self.netns)
                except Exception:
                    continue
                d = st.counters("in" if inbound else "out")
                d |= {"spi": sa.spi, "peer": p.pid, "inbound": inbound}
                d |= {"tx_seq": 0 if inbound else st.sequence("out")}
                d |= {"rx_highest_seq": st.sequence("in") if inbound else 0}
                out.append(d)
        return out

    def peer_stats(self, pid: int) -> dict:
        """The peer's totals over its SAs, deleted ones included (as the Rust data plane's)."""
        p = self._peer(pid)
        tot = {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0,
               "drop_replay": 0, "drop_auth": 0} | p.retired  # fmt: skip
        for d in self.sas():
            if d["peer"] == pid:
                for k, v in _peer_counters(d, d["inbound"]).items():
                    tot[k] += v
        return tot

    @property
    def stats(self) -> dict:
        tot: dict = {}
        for pid in self.peers_:
            for k, v in self.peer_stats(pid).items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        for p in self.peers_.values():
            self._drop_peer(p)


ESPINUDP_PORT = 4500


def _peer_counters(sa, inbound: bool) -> dict[str, int]:
    """An SA's counters (an ``SAState`` or a ``sas()`` row) under a peer's names."""
    c = sa.counters("in" if inbound else "out") if isinstance(sa, xfrm.SAState) else sa
    if inbound:
        return {"rx_packets": c["decap_packets"], "rx_bytes": c["decap_bytes"],
                "drop_replay": c["drop_replay"], "drop_auth": c["drop_auth"]}  # fmt: skip
    return {"tx_packets": c["encap_packets"], "tx_bytes": c["encap_bytes"]}


def preflight_ike(config) -> None:
    """A kernel-dataplane IKEv2 tunnel: the kernel must have ESP (one line otherwise)."""
    family = socket.AF_INET6 if ":" in config.ike.local_ip else socket.AF_INET
    xfrm.check_esp(family)


async def run_ike(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """``key_exchange = "ikev2"`` with ``dataplane = "kernel"``: the xfrm interface with the
    config's addresses and routes, the IKE sockets (4500 with ``UDP_ENCAP``), the IKE endpoint
    driving a :class:`KernelPlane`; ``task_status.started`` gets an ``IkeTunnel``. On exit the
    IKE SAs are deleted (the peer is told), then every SA and policy, then the interface."""
    from simpletun import ikesession
    from simpletun.ike import Endpoint

    setup = config.ike
    await trio.to_thread.run_sync(preflight_ike, config)

    class _Dev:
        name = config.ifname

    await trio.to_thread.run_sync(make_interface, config)
    try:
        s500, s4500 = ikesession.ike_sockets(setup.local_ip)
        try:
            s4500.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
            plane = KernelPlane(setup.local_ip, s4500)
            ep = Endpoint([ikesession.peer_config(setup, sp) for sp in setup.peers])
            tunnel = ikesession.IkeTunnel(config, _Dev)
            log.info(
                "IKEv2 on %s (kernel data plane), %s UDP 500/4500, %d peer(s)",
                config.ifname, setup.local_ip, len(setup.peers),
            )  # fmt: skip
            try:
                async with trio.open_nursery() as n:
                    tunnel.glue = await n.start(
                        partial(ikesession.run_with_plane, plane, ep, s500, s4500, setup.local_ip)
                    )
                    tunnel.glue.on_sa_change = tunnel._sa_change
                    task_status.started(tunnel)
            finally:
                with trio.CancelScope(shield=True):  # cancelled is how it normally ends
                    await trio.to_thread.run_sync(plane.stop)
        finally:
            s500.close()
            s4500.close()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_interface, config.ifname)
            log.info("kernel data plane on %s removed", config.ifname)


__all__ = ["KernelPlane", "KernelTunnel", "preflight", "preflight_ike", "run", "run_ike"]
