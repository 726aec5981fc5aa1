"""The kernel-ESP interop scenarios, shared by the host side (tests/kernel/peer.py, the test)
and the guest side (tests/kernel/guest_main.py). Stdlib only.

Topology (host side in a namespace of its own, the guest behind a tap in it)::

    host netns: tap ktap0 10.99.0.1/24 ---- guest NIC 10.99.0.2/24 (kernel ESP via xfrm)
                tun kesp0 10.98.0.1/16      guest lo: 10.98.<n>.2/32 per scenario
                (simpletun ESP core in the peer helper between kesp0 and the wire)

Both sides take their SAs from one manual key file per scenario (``Scenario.key_file``, written
by the harness). Scenario ``n``'s inner traffic is 10.98.<n>.2 (guest) <-> 10.98.0.1 (host
stack, behind the helper). Each scenario has its own SPI pair and keys; one scenario's policies
are installed in the guest at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST_OUTER = "10.99.0.1"
GUEST_OUTER = "10.99.0.2"
HOST_INNER = "10.98.0.1"
GUEST_MAC = "52:54:00:99:00:02"
ECHO_PORT = 5001
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

    @property
    def guest_inner(self) -> str:
        return f"10.98.{self.n}.2"

    @property
    def spi_g2h(self) -> int:  # guest (kernel) -> host (simpletun)
        return 0x01000000 + self.n * 2

    @property
    def spi_h2g(self) -> int:  # host (simpletun) -> guest (kernel)
        return 0x01000000 + self.n * 2 + 1

    def key_file(self) -> str:
        """A fresh manual key file (simpletun.manual_keys) for this scenario: the guest kernel
        is the client, the simpletun side the server; both configure themselves from it."""
        from simpletun import manual_keys

        return manual_keys.generate(
            key_bits=self.key_bits,
            replay_window=self.window,
            esn=self.esn,
            transport="esp-in-udp" if self.transport == "udp" else "esp",
            port=ENCAP_PORT,
            spi_base=self.spi_g2h,
        )


SCENARIOS = [
    Scenario(1, "esp-aes128", "esp", 128, False, 64),
    Scenario(2, "esp-aes256-esn", "esp", 256, True, 4096),
    Scenario(3, "udp-aes128", "udp", 128, False, 64),
    Scenario(4, "udp-aes256-esn", "udp", 256, True, 1024),
]
GROUPS = {
    "esp": [s for s in SCENARIOS if s.transport == "esp"],
    "udp": [s for s in SCENARIOS if s.transport == "udp"],
    # One boot for everything: a guest boot plus the guest's Python start-up cost ~50 s emulated.
    "all": SCENARIOS,
}
BY_N = {s.n: s for s in SCENARIOS}
