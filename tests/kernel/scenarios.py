"""The kernel-ESP interop scenarios, shared by the host side (tests/kernel/harness.py, the test)
and the guest side (tests/kernel/guest_main.py). Stdlib only (plus simpletun.manual_keys).

Topology (the host side in a namespace of its own, the guest behind a tap in it)::

    host netns: tap ktap0 10.99.0.1/24 + 10.99.0.<10+n> ---- guest NIC 10.99.0.2/24
                simpletun (userspace) per scenario:        simpletun --dataplane kernel per
                TUN kesp<n> 10.98.<n>.1/24                 scenario, one at a time: xfrm
                                                           interface ipsec<n> 10.98.<n>.2/24

Both ends of scenario ``n`` are the real product (``simpletun up --foreground FILE``), the host
one the server (listening on 10.99.0.<10+n>, its peer fixed at the guest's address), the guest
one the client, except in ``guest_server`` scenarios (the guest's kernel end is the server,
its peer fixed at the host's 10.99.0.1); both take their SAs from one manual key file per
scenario (``key_file``, written by the harness next to the tunnel files). Each scenario has its
own SPI pair and keys.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

HOST_OUTER = "10.99.0.1"
GUEST_OUTER = "10.99.0.2"
GUEST_MAC = "52:54:00:99:00:02"
ECHO_PORT = 5001  # the host's echo (guest-initiated transfer)
GUEST_ECHO_PORT = 5002  # the guest's echo (host-initiated transfer)
ENCAP_PORT = 4500
INNER_MTU = 1400
TRANSFER_BYTES = 96 * 1024

#: A sequence number just below 2^32: ESN scenarios start there so the traffic crosses 2^32.
ESN_START = 2**32 - 4


@dataclass(frozen=True)
class Scenario:
    n: int
    name: str
    transport: str  # "esp" (IP protocol 50) or "udp" (ESP-in-UDP, RFC 3948)
    key_bits: int
    esn: bool
    window: int
    ike: bool = False  # keyed by IKEv2 (the guest end initiates) instead of a manual key file
    guest_server: bool = (
        False  # the guest's kernel end is the server (--peer), the host's the client
    )

    @property
    def guest_role(self) -> str:
        return "server" if self.guest_server else "client"

    @property
    def host_addr(self) -> str:
        """The host's outer address of this scenario: a host server listens on its own one; a
        host client sends from the tap's primary address (what the route picks)."""
        return HOST_OUTER if self.guest_server else self.host_outer

    @property
    def key_path(self) -> str:
        """The key file's name (next to the tunnel files): manual keys, or the IKE PSK."""
        return f"{self.name}.psk" if self.ike else f"{self.name}.toml"

    @property
    def guest_inner(self) -> str:
        return f"10.98.{self.n}.2"

    @property
    def host_inner(self) -> str:
        return f"10.98.{self.n}.1"

    @property
    def host_outer(self) -> str:
        return f"10.99.0.{10 + self.n}"

    @property
    def host_ifname(self) -> str:  # also the host tunnel's name (its file's stem)
        return f"kesp{self.n}"

    @property
    def guest_ifname(self) -> str:
        return f"ipsec{self.n}"

    @property
    def cli_transport(self) -> str:
        return "udp" if self.transport == "udp" else "raw"

    @property
    def spi_base(self) -> int:  # client-to-server; server-to-client is spi_base + 1
        return 0x01000000 + self.n * 2

    @property
    def spi_g2h(self) -> int:  # guest (kernel) -> host (simpletun)
        return self.spi_base + (1 if self.guest_server else 0)

    @property
    def spi_h2g(self) -> int:  # host (simpletun) -> guest (kernel)
        return self.spi_base + (0 if self.guest_server else 1)

    def key_file(self) -> str:
        """A fresh manual key file (simpletun.manual_keys) for this scenario: the guest kernel
        is the client, the simpletun side the server; both configure themselves from it.
        IKEv2: a fresh pre-shared key (simpletun genkey's format)."""
        from simpletun import keys, manual_keys

        if self.ike:
            return keys.encode_key(keys.generate_key())

        return manual_keys.generate(
            key_bits=self.key_bits,
            replay_window=self.window,
            esn=self.esn,
            transport="esp-in-udp" if self.transport == "udp" else "esp",
            port=ENCAP_PORT,
            spi_base=self.spi_base,
            seq=ESN_START if self.esn else 0,
        )

    def tunnel_file(self, side: str) -> str:
        """The tunnel file of the host (``side="host"``, userspace) or the guest (``"guest"``,
        kernel data plane), naming ``<name>.toml`` in the same directory. The server listens on
        its scenario address with its peer fixed (manual keying has no handshake)."""
        if self.ike:
            return self._ike_file(side)
        common = f"""transport = "{self.cli_transport}"
manual_keys_file = "{self.name}.toml"
mtu = {INNER_MTU}
"""
        if side == ("guest" if self.guest_server else "host"):  # the server's file
            listen = GUEST_OUTER if self.guest_server else self.host_outer
            peer = self.host_addr if self.guest_server else GUEST_OUTER
            inner = self.guest_inner if self.guest_server else self.host_inner
            kernel = 'dataplane = "kernel"\n' if self.guest_server else ""
            return f"""[interface]
address = ["{inner}/24"]
listen_address = "{listen}"
listen_port = {ENCAP_PORT}
{kernel}{common}
[[peer]]
endpoint = "{peer}:{ENCAP_PORT}"
"""
        if side == "host":  # a client
            return f"""[interface]
address = ["{self.host_inner}/24"]
{common}
[[peer]]
endpoint = "{GUEST_OUTER}:{ENCAP_PORT}"
"""
        return f"""[interface]
address = ["{self.guest_inner}/24"]
dataplane = "kernel"
{common}
[[peer]]
endpoint = "{self.host_outer}:{ENCAP_PORT}"
"""

    def _ike_file(self, side: str) -> str:
        host = side == "host"
        me, peer = (
            (self.host_inner, self.guest_inner) if host else (self.guest_inner, self.host_inner)
        )
        my_outer, peer_outer = (
            (self.host_outer, GUEST_OUTER) if host else (GUEST_OUTER, self.host_outer)
        )
        return f"""[interface]
key_exchange = "ikev2"
address = ["{me}/24"]
listen_address = "{my_outer}"
mtu = {INNER_MTU}
{"" if host else 'dataplane = "kernel"'}

[[peer]]
name = "{"guest" if host else "host"}"
identity = "{peer_outer}"
{"" if host else f'endpoint = "{peer_outer}"'}
psk_file = "{self.key_path}"
allowed_ips = ["{peer}/32"]
local_ips = ["{me}/32"]
{"" if host else f"rekey_time = {IKE_REKEY_TIME}"}
"""


SCENARIOS = [
    Scenario(1, "esp-aes128", "esp", 128, False, 64),
    Scenario(2, "esp-aes256-esn", "esp", 256, True, 4096, guest_server=True),
    Scenario(3, "udp-aes128", "udp", 128, False, 64),
    Scenario(4, "udp-aes256-esn", "udp", 256, True, 1024),
]
#: The guest's Child SA rekey time (s): one rekey after the first checks, then traffic again.
IKE_REKEY_TIME = 12
#: A kernel-dataplane IKEv2 end (guest, initiator) against a userspace IKEv2 end (host).
IKE = Scenario(5, "ikev2", "udp", 128, False, 4096, ike=True)
GROUPS = {
    "esp": [s for s in SCENARIOS if s.transport == "esp"],
    "udp": [s for s in SCENARIOS if s.transport == "udp"],
    # One boot for everything: a guest boot plus the guest's Python start-up cost ~50 s emulated.
    "all": [*SCENARIOS, IKE],
}
BY_N = {s.n: s for s in [*SCENARIOS, IKE]}
BY_SPI = {spi: s for s in SCENARIOS for spi in (s.spi_g2h, s.spi_h2g)}


def esp_offset(frame: bytes) -> int | None:
    """Offset of the ESP header in an Ethernet frame (raw ESP or ESP-in-UDP), else None."""
    import struct

    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 15) * 4
    proto = frame[23]
    if proto == 50:
        return 14 + ihl
    if proto == 17 and len(frame) >= 14 + ihl + 16:
        if struct.unpack_from("!H", frame, 14 + ihl + 2)[0] == ENCAP_PORT:
            if frame[14 + ihl + 8 : 14 + ihl + 12] != b"\0\0\0\0":  # not an IKE marker
                return 14 + ihl + 8
    return None


def replay(frame: bytes, off: int) -> bytes:
    """The frame again, its ESP verbatim (a replay). An ESP-in-UDP copy gets UDP checksum 0
    (allowed over IPv4, as the kernel sends): a captured frame's checksum may be a partial one
    left to offload, which the receiver would drop before ESP."""
    import struct

    if frame[23] != 17:
        return frame
    copy = bytearray(frame)
    struct.pack_into("!H", copy, off - 2, 0)
    return bytes(copy)


def forge(frame: bytes, off: int) -> bytes:
    """A copy of an ESP frame with its sequence number moved 1000 ahead: fresh for the
    receiver's window, but its ICV no longer matches (a forgery)."""
    import struct

    forged = bytearray(frame)
    seq = struct.unpack_from("!I", forged, off + 4)[0]
    struct.pack_into("!I", forged, off + 4, (seq + 1000) & 0xFFFFFFFF)
    if forged[23] == 17:
        struct.pack_into("!H", forged, off - 2, 0)  # no UDP checksum (as the kernel sends)
    return bytes(forged)


def recv_exact(c: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a stream socket (the transfers' framing, both sides)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = c.recv(min(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"short read ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)
