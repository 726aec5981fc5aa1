"""What a tunnel end is asked to do (:class:`Config`) and the one place its values are checked.

The command line (``simpletun.cli``) and the Python API both build a :class:`Config`; every
check lives here, as a ``check_*`` function raising :class:`ConfigError` with the one line a user
sees (the CLI turns it into exit status 2).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from simpletun import handshake
from simpletun._errors import ConfigError
from simpletun.handshake import DEFAULT_CIPHER

DEFAULT_PORT = 55555
DEFAULT_MTU = 1500
MIN_MTU = 68
MAX_MTU = 65000
# Ethernet header plus one VLAN tag: what a TAP frame adds to the MTU.
TAP_OVERHEAD = 18
MAX_IFNAME = 15  # IFNAMSIZ - 1

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_ifname(text: str) -> str:
    if not text:
        raise ConfigError("the interface name is empty (e.g. -i tun0)")
    try:
        raw = text.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"interface name {text!r} is not valid text (use e.g. -i tun0)") from None
    if len(raw) > MAX_IFNAME:
        raise ConfigError(f"interface name {text!r} is too long (at most {MAX_IFNAME} bytes)")
    if text in (".", "..") or any(c in text for c in "/: \t\n\0"):
        raise ConfigError(f"invalid interface name {text!r} (no '/', ':' or spaces)")
    return text


def check_host(text: str) -> str:
    """An IP address (IPv6 optionally in brackets) or a DNS name; returns it without brackets.

    Names are checked as DNS would see them (labels of 1-63 characters, at most 253 in all,
    IDNA-encodable), so a bad one is refused here rather than failing on every reconnect.
    """
    fix = "give an IP address such as 192.0.2.1 or fd00::1, or a host name such as vpn.example.com"
    host = text.strip()
    if not host:
        raise ConfigError(f"the server address is empty ({fix})")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ConfigError(f"{text!r}: brackets are only for IPv6 addresses ({fix})") from None
        return inner
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    if len(shown) > 60:
        shown = shown[:57] + "..."
    bad = ConfigError(
        f"{shown!r} is not a valid host name: each dot-separated label needs 1-63 "
        f"characters and the name at most 253 ({fix})"
    )
    try:
        encoded = host.rstrip(".").encode("idna") if host != "." else b""
    except UnicodeError:
        raise bad from None
    labels = encoded.split(b".") if encoded else [b""]
    if len(encoded) > 253 or any(not 1 <= len(lb) <= 63 for lb in labels):
        raise bad
    return host


TRANSPORTS = ("tcp", "udp", "raw")


def check_transport(name: str) -> str:
    if name not in TRANSPORTS:
        raise ConfigError(f"transport must be tcp, udp or raw, got {name!r}")
    return name


DATAPLANES = ("userspace", "kernel")


def check_dataplane(name: str) -> str:
    if name not in DATAPLANES:
        raise ConfigError(f"dataplane must be userspace or kernel, got {name!r}")
    return name


def default_mtu(transport: str, host: str | None, *, tap: bool, server: bool) -> int:
    """The device MTU when none is given: 1500 over TCP (a stream carries packets of any size,
    nothing fragments); over UDP and raw ESP, the outer path's MTU (the device the route to the
    peer leaves by) less what ESP adds, so that no tunnel packet is fragmented. A server, whose
    peers may come over IPv6, assumes the larger IPv6 header."""
    if transport == "tcp":
        return DEFAULT_MTU
    from simpletun import netdev

    try:
        outer, ipv6 = netdev.path_mtu(None if server else host)
    except Exception:  # no route or name yet: assume an Ethernet path
        outer, ipv6 = DEFAULT_MTU, True
    mtu = netdev.datagram_mtu(outer, ipv6=ipv6 or server, udp=transport == "udp", tap=tap)
    return max(MIN_MTU, min(mtu, MAX_MTU))


def check_port(value: int, *, server: bool = False) -> int:
    if not (0 if server else 1) <= value <= 65535:
        allowed = "0-65535 (0: any free port)" if server else "1-65535"
        raise ConfigError(f"port must be {allowed}, got {value}")
    return value


def max_queues() -> int:
    """Most device queues: one device thread each, so no more than the CPUs this process may
    run on (at most 64)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_QUEUES))


MAX_QUEUES = 64


def check_queues(value: int) -> int:
    """``queues``/``--queues``: TUN queues (IFF_MULTI_QUEUE), one data-plane device thread each."""
    top = max_queues()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ConfigError(
            f"queues must be 1-{top} (one device thread per queue, at most one per CPU: "
            f"this machine has {top}), got {value!r}"
        )
    return value


def check_mtu(value: int) -> int:
    if not MIN_MTU <= value <= MAX_MTU:
        raise ConfigError(f"MTU must be {MIN_MTU}-{MAX_MTU}, got {value}")
    return value


def check_cipher(name: str) -> str:
    try:
        handshake.cipher_id(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return name


# Soft limits of a Child SA's outbound traffic (rekey_packets / rekey_bytes): the data plane
# starts a rekey there (and anyway before sequence numbers run out).
MAX_REKEY_PACKETS = 2**63
MAX_REKEY_BYTES = 2**63


def check_rekey_limit(name: str, value: int) -> int:
    """``rekey_packets`` (packets sent on the outbound SA) or ``rekey_bytes`` (inner bytes)."""
    top = MAX_REKEY_PACKETS if name == "rekey_packets" else MAX_REKEY_BYTES
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        what = "packets" if name == "rekey_packets" else "bytes"
        raise ConfigError(f"{name} must be 1-{top} ({what} on an outbound SA), got {value!r}")
    return value


def check_address(text: str) -> Address:
    example = "like 10.0.0.1/24 or fd00::1/64"
    if "/" not in text:
        raise ConfigError(f"expected an address with a prefix length ({example}), got {text!r}")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(f"not an address with a prefix length ({example}): {text!r}") from None


def check_route(text: str) -> Network:
    example = "like 10.1.0.0/16, 0.0.0.0/0 or fd00:1::/64"
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            net = ipaddress.ip_network(text, strict=False)
            raise ConfigError(f"route {text!r} has host bits set; did you mean {net}?") from None
        raise ConfigError(f"not a network prefix ({example}): {text!r}") from None


@dataclass(frozen=True)
class Config:
    """What a tunnel end is asked to do. ``key=None`` means plaintext (simpletun.c) mode."""

    server: bool
    ifname: str = "tun0"
    host: str | None = None  # client: the server to connect to; server: bind address or all
    port: int = DEFAULT_PORT
    tap: bool = False
    key: bytes | None = field(default=None, repr=False)
    cipher: str = DEFAULT_CIPHER
    mtu: int = DEFAULT_MTU
    addresses: tuple[Address, ...] = ()
    routes: tuple[Network, ...] = ()
    keepalive: int | None = None  # seconds of idleness before TCP keepalive probes (default 10)
    handshake_timeout: float = handshake.DEFAULT_TIMEOUT
    connect_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    # How often the device is checked (deleted, renamed, downed) besides when a pump fails.
    device_check_interval: float = 0.5
    transport: str = "tcp"  # "tcp" (simpletun.session), "udp" or "raw" (simpletun.datagram)
    ike: object | None = field(default=None, repr=False)  # ikesession.IkeSetup: IKEv2 keying
    dataplane: str = "userspace"  # or "kernel" (simpletun.kernel_dp: xfrm, manual keys)
    manual_keys: str | None = None  # manual key file (SPIs + keys per direction)
    # Manual keys, server: the client's fixed address (no handshake to learn it); the client's
    # is ``host``. Optional on the userspace data plane (learnt from the first authentic packet).
    peer: str | None = None
    # TUN/TAP queues (IFF_MULTI_QUEUE), one data-plane device thread each; 1: a plain device
    queues: int = 1

    def __post_init__(self) -> None:
        check_ifname(self.ifname)
        check_queues(self.queues)
        if self.queues > 1 and self.dataplane == "kernel":
            raise ConfigError(
                "--queues is for the userspace data plane (the kernel's xfrm interface has no "
                "TUN queues): drop --queues or use --dataplane userspace"
            )
        check_transport(self.transport)
        check_dataplane(self.dataplane)
        if self.dataplane == "kernel" and self.transport == "tcp":
            raise ConfigError("--dataplane kernel is for --transport udp or raw (ESP), not tcp")
        if self.dataplane == "kernel" and not self.manual_keys and self.ike is None:
            raise ConfigError(
                "--dataplane kernel needs --manual-keys FILE (the same file on both ends)"
            )
        if self.dataplane == "kernel" and self.tap:
            raise ConfigError(
                "--dataplane kernel carries IP packets (an xfrm interface, like TUN): drop -a"
            )
        if self.manual_keys is not None:
            if self.transport == "tcp":
                raise ConfigError("--manual-keys is for --transport udp or raw (ESP), not tcp")
            if self.key is not None or self.ike is not None:
                raise ConfigError(
                    "--manual-keys and --key exclude each other: manual keys need no handshake "
                    "(drop --key, or drop --manual-keys to run the handshake)"
                )
            if self.server and self.peer is None and self.dataplane == "kernel":
                raise ConfigError(
                    "--dataplane kernel -s needs --peer HOST (the client's address: manual "
                    "keying has no handshake to learn it)"
                )
        elif self.peer is not None:
            raise ConfigError(
                "--peer is for --manual-keys (a handshake learns the client's address)"
            )
        if self.peer is not None:
            if not self.server:
                raise ConfigError("--peer is for a server (-s); a client names its peer with -c")
            object.__setattr__(self, "peer", check_host(self.peer))
        keyed = self.key is not None or self.manual_keys is not None or self.ike is not None
        if self.transport != "tcp" and not keyed:
            raise ConfigError(
                f"--transport {self.transport} needs --key: plaintext (simpletun.c) is TCP only"
            )
        if not self.server and not self.host:
            raise ConfigError("a client needs the server's address (host)")
        if self.host is not None:
            object.__setattr__(self, "host", check_host(self.host))
        check_port(self.port, server=self.server)
        check_mtu(self.mtu)
        if self.key is not None:
            if len(self.key) != 32:
                raise ConfigError("the key must be 32 bytes")
            check_cipher(self.cipher)

    @property
    def esp(self) -> bool:
        """Encrypted (ESP): a handshake key, a manual key file or IKEv2; else plaintext."""
        return self.key is not None or self.manual_keys is not None or self.ike is not None

    @property
    def offloads(self) -> bool:
        """Use offloads on the userspace data plane: a TUN device with vnet headers (TSO/USO
        super-packets split into MTU-sized packets and received segments coalesced by the data
        plane, whatever the transport) and UDP GSO/GRO on the udp transport's socket; unless
        SIMPLETUN_OFFLOADS=0 is in the environment (for comparisons, or captures that need one
        ESP packet per frame)."""
        return self.dataplane == "userspace" and os.environ.get("SIMPLETUN_OFFLOADS", "1") != "0"

    @property
    def max_frame(self) -> int:
        """The largest frame payload the pump accepts from the peer."""
        if not self.esp:
            return self.mtu + TAP_OVERHEAD
        from simpletun._core import esp_encap_len

        return esp_encap_len(self.mtu + TAP_OVERHEAD if self.tap else self.mtu)

    def backoff(self, failures: int) -> float:
        """Delay before reconnect attempt number ``failures`` + 1 (0 → at once)."""
        if failures <= 0:
            return 0.0
        return min(self.backoff_initial * 2 ** min(failures - 1, 32), self.backoff_max)


def check_manual_keys(config: Config):
    """Read ``config``'s manual key file and check it against the tunnel (both data planes):
    transport, ESP-in-UDP port. Returns the ``manual_keys.ManualKeys``; ConfigError otherwise."""
    from simpletun import manual_keys

    mk = manual_keys.load(config.manual_keys)
    want = "esp-in-udp" if config.transport == "udp" else "esp"
    if mk.transport != want:
        raise ConfigError(
            f"--manual-keys {config.manual_keys}: transport = {mk.transport!r} but "
            f"--transport {config.transport}; set transport = {want!r} in the file"
        )
    if config.transport == "udp" and config.port != mk.port:
        raise ConfigError(
            f"--manual-keys {config.manual_keys}: port = {mk.port} but the tunnel uses UDP "
            f"port {config.port}; give both ends the file's port (-p {mk.port} / listen_port)"
        )
    if config.queues > 1 and mk.replay_window < MIN_QUEUES_WINDOW:
        raise ConfigError(
            f"--manual-keys {config.manual_keys}: replay-window = {mk.replay_window} is too "
            f"small for {config.queues} queues (their threads share one SA and send out of "
            f"order by a batch or more); set replay-window = {MIN_QUEUES_WINDOW} or more "
            "(default 4096) in the file, or use one queue"
        )
    return mk


# Replay window the peer needs when several device threads share one outbound SA: each
# reserves up to 64 sequence numbers at a time and may send after the others.
MIN_QUEUES_WINDOW = 1024
