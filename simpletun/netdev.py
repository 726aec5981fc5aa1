"""The tunnel device's life cycle: open it (simpletun._core.open_tun), configure it with
pyroute2 (MTU, addresses, up), and undo that when done.

All functions here block (netlink round trips); call them from a worker thread under trio.
"""

import errno
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass, field

from simpletun._errors import DeviceError

log = logging.getLogger("simpletun.netdev")

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass
class Device:
    """An open TUN/TAP device. ``fd`` is the packet descriptor the pump reads and writes."""

    fd: int
    name: str
    tap: bool = False
    created: bool = False
    added: list[Address] = field(default_factory=list)

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


def configure(
    name: str, *, mtu: int, addresses: tuple[Address, ...] = (), mac: str | None = None
) -> list[Address]:
    """Set the MTU (and the MAC, if given), add ``addresses`` and bring ``name`` up.

    Returns the addresses actually added (those already present are left alone and not
    returned). Raises DeviceError naming the step that failed.
    """
    from pyroute2 import IPRoute, NetlinkError

    added: list[Address] = []
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
    return added


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
    ifname: str, *, tap: bool = False, mtu: int = 1500, addresses: tuple[Address, ...] = ()
) -> Device:
    """Open (creating if needed) and configure the device; DeviceError if either fails."""
    from simpletun._core import open_tun

    try:
        fd, name, created = open_tun(ifname, tap)
    except DeviceError:
        raise
    except OSError as e:
        raise DeviceError(str(e)) from None
    # Only a TAP device we created gets our MAC; a pre-existing one keeps its own.
    mac = stable_mac(addresses[0]) if tap and created and addresses else None
    try:
        added = configure(name, mtu=mtu, addresses=addresses, mac=mac)
    except BaseException:
        os.close(fd)
        raise
    kind = "TAP" if tap else "TUN"
    log.debug("%s device %s %s, mtu %d", kind, name, "created" if created else "attached", mtu)
    return Device(fd=fd, name=name, tap=tap, created=created, added=added)


def close_device(dev: Device) -> None:
    """Release the device: a device this process created vanishes as its descriptor closes;
    on a pre-existing device the addresses we added are removed."""
    if not dev.created and dev.added:
        try:
            remove_addresses(dev.name, dev.added)
        except Exception as e:  # cleanup must not mask the real exit path
            log.debug("%s: address clean-up failed: %s", dev.name, e)
    if dev.fd >= 0:
        os.close(dev.fd)
        dev.fd = -1
