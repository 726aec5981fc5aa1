"""The tunnel device's life cycle: open it (simpletun._core.open_tun), configure it with
pyroute2 (MTU, addresses, up), and undo that when done.

All functions here block (netlink round trips); call them from a worker thread under trio.
"""

import errno
import hashlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field

from simpletun._errors import DeviceError

log = logging.getLogger("simpletun.netdev")

IFF_UP = 0x1

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What check_device() reports.
DEVICE_OK = "ok"
DEVICE_DOWN = "down"  # present but administratively down (or missing an address or route)
DEVICE_GONE = "gone"  # deleted, or replaced by another device of the same name


@dataclass
class Device:
    """An open TUN/TAP device. ``fd`` is the packet descriptor the pump reads and writes."""

    fd: int
    name: str
    tap: bool = False
    created: bool = False
    added: list[Address] = field(default_factory=list)
    ifindex: int = 0
    mtu: int = 1500
    addresses: tuple[Address, ...] = ()
    routes: tuple[Network, ...] = ()  # as installed: a default route is split in two halves
    routes_added: list[Network] = field(default_factory=list)
    pinned: list[dict] = field(default_factory=list)  # host routes to the peer, kept outside
    # TUN offloads (IFF_VNET_HDR) the kernel accepted, e.g. "csum+tso+uso"; None: not asked
    offloads: str | None = None
    # A multi-queue device (IFF_MULTI_QUEUE): the descriptors of queues 1.. (``fd`` is queue 0)
    queue_fds: list[int] = field(default_factory=list)

    @property
    def queues(self) -> int:
        return 1 + len(self.queue_fds)

    def __str__(self) -> str:
        return self.name


def _netlink_error(e: Exception) -> str:
    code = getattr(e, "code", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(e)


def stable_mac(address: Address) -> str:
    """A locally administered unicast MAC derived from the device's tunnel address.

    A TAP device created afresh gets a random MAC from the kernel, so after a restart the peer's
    ARP/neighbour entry points at a MAC that no longer exists until it times out. Deriving the
    MAC from the (unique) tunnel address keeps it the same across restarts.
    """
    digest = hashlib.sha256(b"simpletun tap " + str(address.ip).encode()).digest()
    octets = bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]
    return ":".join(f"{b:02x}" for b in octets)


def _route_spec(net: Network, ifindex: int) -> dict:
    """pyroute2 arguments of the route for ``net`` through device ``ifindex``."""
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    return {
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "oif": ifindex,
        "family": family,
    }


@dataclass
class Configured:
    """What :func:`configure` did: the device's index, and what it added (not what was there)."""

    ifindex: int
    addresses: list[Address]
    routes: list[Network]


def configure(
    name: str,
    *,
    mtu: int,
    addresses: tuple[Address, ...] = (),
    routes: tuple[Network, ...] = (),
    mac: str | None = None,
) -> Configured:
    """Set the MTU (and the MAC, if given), add ``addresses``, bring ``name`` up and route
    ``routes`` through it. Idempotent: what is already there is left alone (and not reported as
    added). Raises DeviceError naming the step that failed.
    """
    from pyroute2 import IPRoute, NetlinkError

    added: list[Address] = []
    routed: list[Network] = []
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise DeviceError(f"{name}: no such network device")
        index = found[0]
        try:
            ipr.link("set", index=index, mtu=mtu)
        except NetlinkError as e:
            raise DeviceError(f"{name}: cannot set MTU {mtu}: {_netlink_error(e)}") from None
        if mac is not None:
            try:
                ipr.link("set", index=index, address=mac)
            except NetlinkError as e:
                raise DeviceError(f"{name}: cannot set MAC {mac}: {_netlink_error(e)}") from None
        for addr in addresses:
            try:
                ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    log.debug("%s: address %s already present", name, addr)
                    continue
                raise DeviceError(
                    f"{name}: cannot add address {addr}: {_netlink_error(e)}"
                ) from None
            added.append(addr)
        try:
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise DeviceError(f"{name}: cannot bring the device up: {_netlink_error(e)}") from None
        for net in routes:
            try:
                ipr.route("add", **_route_spec(net, index))
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    log.debug("%s: route %s already present", name, net)
                    continue
                raise DeviceError(
                    f"{name}: cannot add route {net}: {_netlink_error(e)} "
                    "(is another route for it in the way?)"
                ) from None
            routed.append(net)
    return Configured(ifindex=index, addresses=added, routes=routed)


def expand_routes(routes) -> tuple[Network, ...]:
    """A default route (``0.0.0.0/0``, ``::/0``) becomes its two halves (``0.0.0.0/1`` +
    ``128.0.0.0/1``), as OpenVPN's def1 does: more specific than the existing default route, so
    it wins without replacing it, and the original default is still there for the tunnel's own
    connection (see :func:`pin_host_route`) and comes back untouched on exit."""
    out: list[Network] = []
    for net in routes:
        if net.prefixlen == 0:
            out += list(net.subnets(prefixlen_diff=1))
        else:
            out.append(net)
    return tuple(dict.fromkeys(out))


def pin_host_route(address: str) -> dict | None:
    """Route ``address`` (the peer's outer address) the way it goes now, as a host route, so that
    routes through the tunnel added afterwards cannot capture the tunnel's own traffic. Returns
    what to remove at exit (None when the current path is already a host route, or local)."""
    import ipaddress as ip

    from pyroute2 import IPRoute, NetlinkError

    addr = ip.ip_address(address)
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    plen = addr.max_prefixlen
    with IPRoute() as ipr:
        try:
            got = ipr.route("get", dst=str(addr), family=family)
        except NetlinkError as e:
            raise DeviceError(f"no route to the peer {addr}: {_netlink_error(e)}") from None
        if not got:
            return None
        r = got[0]
        if r.get_attr("RTA_TYPE") == 2 or r["type"] == 2:  # RTN_LOCAL
            return None
        spec = {"dst": str(addr), "dst_len": plen, "family": family, "oif": r.get_attr("RTA_OIF")}
        gw = r.get_attr("RTA_GATEWAY")
        if gw:
            spec["gateway"] = gw
        try:
            ipr.route("add", **spec)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return None
            raise DeviceError(
                f"cannot pin the route to the peer {addr}: {_netlink_error(e)}"
            ) from None
    return spec


def unpin(spec: dict) -> None:
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.route("del", **spec)
        except NetlinkError as e:
            log.debug("could not remove the host route to %s: %s", spec["dst"], _netlink_error(e))


def set_routes(dev: Device, routes) -> tuple[list[Network], list[Network]]:
    """Make the routes through ``dev`` be ``routes`` (reload): add the new ones, remove those we
    added that are no longer wanted. Returns (added, removed)."""
    want = expand_routes(routes)
    gone = [r for r in dev.routes_added if r not in want]
    remove_routes(dev.name, dev.ifindex, gone)
    dev.routes_added = [r for r in dev.routes_added if r in want]
    done = configure(dev.name, mtu=dev.mtu, addresses=dev.addresses, routes=want)
    dev.routes = want
    dev.routes_added += [r for r in done.routes if r not in dev.routes_added]
    return done.routes, gone


# Bytes a datagram transport adds around an inner packet of length n (AES-CBC + 16-byte ICV):
# outer IP header, UDP header (ESP-in-UDP only), ESP header 8, IV 16, the ciphertext (n + 2
# trailer bytes padded to 16), ICV 16.
ESP_FIXED = 8 + 16 + 16
TAP_HEADER = 18  # Ethernet + one VLAN tag: what a TAP frame adds to the device MTU


def datagram_mtu(outer_mtu: int, *, ipv6: bool, udp: bool, tap: bool = False) -> int:
    """The largest device MTU whose packets fit one outer datagram of ``outer_mtu`` bytes."""
    room = outer_mtu - (40 if ipv6 else 20) - (8 if udp else 0) - ESP_FIXED
    inner = (room // 16) * 16 - 2
    return inner - (TAP_HEADER if tap else 0)


def path_mtu(host: str | None) -> tuple[int, bool]:
    """(MTU of the device the route to ``host`` leaves by, whether it is IPv6); for no host (a
    server), the device of the IPv4 default route, else 1500."""
    import ipaddress as ip

    from pyroute2 import IPRoute, NetlinkError

    dst = "0.0.0.0" if host is None else host
    try:
        addr = ip.ip_address(dst)
    except ValueError:
        infos = socket.getaddrinfo(dst, None, type=socket.SOCK_DGRAM)
        addr = ip.ip_address(infos[0][4][0])
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(addr), family=family) if host else []
            oif = routes[0].get_attr("RTA_OIF") if routes else None
            if oif is None:
                default = [r for r in ipr.get_routes(family=family, table=254) if r["dst_len"] == 0]
                oif = default[0].get_attr("RTA_OIF") if default else None
            if oif is None:
                return 1500, addr.version == 6
            link = ipr.get_links(oif)[0]
            return link.get_attr("IFLA_MTU") or 1500, addr.version == 6
        except (NetlinkError, IndexError):
            return 1500, addr.version == 6


def check_device(dev: Device) -> str:
    """DEVICE_OK, DEVICE_DOWN (up flag, an address or a route missing) or DEVICE_GONE."""
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ipr:
        try:
            links = ipr.get_links(dev.ifindex) if dev.ifindex else []
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise DeviceError(
                    f"{dev.name}: cannot read its state: {_netlink_error(e)}"
                ) from None
            links = []
        if not links or links[0].get_attr("IFLA_IFNAME") != dev.name:
            return DEVICE_GONE
        if not links[0]["flags"] & IFF_UP:
            return DEVICE_DOWN
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=dev.ifindex)
        }
        if any((str(a.ip), a.network.prefixlen) not in have for a in dev.addresses):
            return DEVICE_DOWN
        if dev.routes:
            present = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=family, oif=dev.ifindex, table=254):
                    present.add((r.get_attr("RTA_DST"), r["dst_len"]))
            for net in dev.routes:
                if (str(net.network_address), net.prefixlen) not in present:
                    return DEVICE_DOWN
    return DEVICE_OK


def remove_routes(name: str, ifindex: int, routes: list[Network]) -> None:
    """Best effort: delete routes this process added."""
    if not routes:
        return
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ipr:
        for net in routes:
            try:
                ipr.route("del", **_route_spec(net, ifindex))
            except NetlinkError as e:
                log.debug("%s: could not remove route %s: %s", name, net, _netlink_error(e))


def remove_addresses(name: str, addresses: list[Address]) -> None:
    """Best effort: delete addresses this process added to a device it did not create."""
    if not addresses:
        return
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return
        for addr in addresses:
            try:
                ipr.addr(
                    "del", index=found[0], address=str(addr.ip), prefixlen=addr.network.prefixlen
                )
            except NetlinkError as e:
                log.debug("%s: could not remove address %s: %s", name, addr, _netlink_error(e))


def open_device(
    ifname: str,
    *,
    tap: bool = False,
    mtu: int = 1500,
    addresses: tuple[Address, ...] = (),
    routes: tuple[Network, ...] = (),
    offload: bool = False,
    queues: int = 1,
) -> Device:
    """Open (creating if needed) and configure the device; DeviceError if either fails.
    ``offload`` (TUN only, for the userspace data plane): open it with vnet headers and
    TSO/USO so that reads and writes move super-packets of up to 64 KiB; a kernel that refuses
    vnet headers gets a plain device. ``queues`` > 1: a multi-queue device (IFF_MULTI_QUEUE),
    one descriptor per queue."""
    from simpletun._core import open_tun, open_tun_offload, open_tun_queues

    routes = expand_routes(routes)
    offloads = None
    queue_fds: list[int] = []
    try:
        opened = None
        if queues > 1:
            try:
                fds, name, created, offloads = opened = open_tun_queues(
                    ifname, queues, tap=tap, offload=offload and not tap
                )
            except DeviceError as e:
                if not offload or tap:
                    raise
                log.debug("TUN offloads: opening %s with vnet headers failed (%s)", ifname, e)
                fds, name, created, offloads = opened = open_tun_queues(ifname, queues, tap=tap)
            if offloads is not None:
                _log_offloads(offloads)
            fd, queue_fds = fds[0], fds[1:]
        elif offload and not tap:
            try:
                fd, name, created, offloads = opened = open_tun_offload(ifname)
                _log_offloads(offloads)
            except DeviceError as e:
                # A kernel without IFF_VNET_HDR; a real problem fails again just below.
                log.debug("TUN offloads: opening %s with vnet headers failed (%s)", ifname, e)
        if opened is None:
            fd, name, created = open_tun(ifname, tap)
    except DeviceError:
        raise
    except OSError as e:
        raise DeviceError(str(e)) from None
    # Only a TAP device we created gets our MAC; a pre-existing one keeps its own.
    mac = stable_mac(addresses[0]) if tap and created and addresses else None
    try:
        done = configure(name, mtu=mtu, addresses=addresses, routes=routes, mac=mac)
    except BaseException:
        for q in (fd, *queue_fds):
            os.close(q)
        raise
    kind = "TAP" if tap else "TUN"
    log.debug("%s device %s %s, mtu %d", kind, name, "created" if created else "attached", mtu)
    if queue_fds:
        log.info("%s device %s: %d queues", kind, name, 1 + len(queue_fds))
    return Device(
        fd=fd,
        name=name,
        tap=tap,
        created=created,
        added=done.addresses,
        ifindex=done.ifindex,
        mtu=mtu,
        addresses=addresses,
        routes=routes,
        routes_added=done.routes,
        offloads=offloads,
        queue_fds=queue_fds,
    )


_FULL_OFFLOADS = "csum+tso+uso"
_offloads_logged = False


def _log_offloads(accepted: str) -> None:
    """Say once per process when the kernel refused some TUN offload (the tunnel works, with
    more per-packet work: USO needs Linux 6.2)."""
    global _offloads_logged
    if accepted != _FULL_OFFLOADS and not _offloads_logged:
        _offloads_logged = True
        log.info("TUN offloads: the kernel accepted %s of %s", accepted, _FULL_OFFLOADS)


def repair_device(dev: Device) -> None:
    """Put back what is missing on a present device (up flag, addresses, routes, MTU)."""
    done = configure(dev.name, mtu=dev.mtu, addresses=dev.addresses, routes=dev.routes)
    if not dev.created:
        dev.added += [a for a in done.addresses if a not in dev.added]
    dev.routes_added += [r for r in done.routes if r not in dev.routes_added]


def reopen_device(dev: Device) -> Device:
    """After the device was deleted: close our descriptor and open and configure it anew."""
    _close_fds(dev)
    new = open_device(
        dev.name,
        tap=dev.tap,
        mtu=dev.mtu,
        addresses=dev.addresses,
        routes=dev.routes,
        offload=dev.offloads is not None,
        queues=dev.queues,
    )
    new.created = new.created or dev.created
    new.pinned = dev.pinned
    return new


def _close_fds(dev: Device) -> None:
    for q in dev.queue_fds:
        os.close(q)
    dev.queue_fds = []
    if dev.fd >= 0:
        os.close(dev.fd)
        dev.fd = -1


def close_device(dev: Device) -> None:
    """Release the device: a device this process created vanishes as its descriptor closes;
    on a pre-existing device the routes and addresses we added are removed."""
    for spec in dev.pinned:
        try:
            unpin(spec)
        except Exception as e:
            log.debug("%s: clean-up failed: %s", dev.name, e)
    dev.pinned = []
    if not dev.created:
        try:
            remove_routes(dev.name, dev.ifindex, dev.routes_added)
            remove_addresses(dev.name, dev.added)
        except Exception as e:  # cleanup must not mask the real exit path
            log.debug("%s: clean-up failed: %s", dev.name, e)
    _close_fds(dev)
