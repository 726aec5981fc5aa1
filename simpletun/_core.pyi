"""Type stubs of the simpletun._core extension (Rust, PyO3)."""

from collections.abc import Sequence
from typing import Final, Literal

# -- protocol constants (defined once, in rust/core/src/proto.rs and esp.rs) -----------------
CONTROL_MARKER: Final[bytes]
NAT_KEEPALIVE: Final[bytes]
MIN_SPI: Final[int]
AUTH_KEY_LEN: Final[int]
ENC_KEY_LENS: Final[tuple[int, ...]]
ESP_IN_UDP_PORT: Final[int]
IPPROTO_ESP: Final[int]
ESP_MAX_OVERHEAD: Final[int]
DROP_REASONS: Final[tuple[str, ...]]
DP_DROP_REASONS: Final[tuple[str, ...]]

def esp_encap_len(inner_len: int) -> int: ...
def encode_frame(payload: bytes) -> bytes: ...
def open_tun(name: str, tap: bool = False) -> tuple[int, str, bool]: ...

class SecurityAssociation:
    def __init__(
        self,
        spi: int,
        enc_key: bytes,
        auth_key: bytes,
        replay_window: int = 4096,
        esn: bool = False,
    ) -> None: ...
    def encap(self, inner: bytes, next_header: int | None = None) -> bytes: ...
    def decap(self, esp: bytes) -> tuple[int, bytes]: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def spi(self) -> int: ...
    @property
    def esn(self) -> bool: ...
    @property
    def replay_window(self) -> int: ...
    @property
    def enc_key_bits(self) -> int: ...
    @property
    def tx_seq(self) -> int: ...
    @property
    def rx_highest_seq(self) -> int: ...
    def _skip_tx_seq_to(self, last: int) -> None: ...

class FrameDecoder:
    def __init__(self, max_frame: int = 65535) -> None: ...
    def feed(self, chunk: bytes) -> list[bytes]: ...
    @property
    def buffered(self) -> int: ...
    @property
    def max_frame(self) -> int: ...

SaParams = tuple[int, bytes, bytes]

class Pump:
    """The single-peer TCP data plane (device <-> one connected stream socket)."""

    def __init__(
        self,
        tun_fd: int,
        sock_fd: int,
        *,
        tap: bool = False,
        tx: SaParams | None = None,
        rx: SaParams | None = None,
        replay_window: int = 4096,
        esn: bool = False,
        max_frame: int = 65535,
    ) -> None: ...
    def stop(self) -> None: ...
    @property
    def done_fd(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def exit_reason(self) -> str | None: ...
    @property
    def stats(self) -> dict[str, int]: ...

Endpoint = tuple[str, int]
ControlEvent = tuple[Literal["control"], int, Endpoint, bytes]
NoSaEvent = tuple[Literal["no_sa"], int]
SaLimitEvent = tuple[Literal["sa_limit"], int, int, int, int]
# ("closed", transport, endpoint, reason): a stream connection ended (peer closed/reset, error).
ClosedEvent = tuple[Literal["closed"], int, Endpoint, str]
Event = ControlEvent | NoSaEvent | SaLimitEvent | ClosedEvent

class DataPlane:
    """Data plane v2: one TUN/TAP device, datagram transports, peers and an SA table.

    Threads start at once and run without the GIL; descriptors given to it are duplicated
    (the caller keeps and closes its own).
    """

    def __init__(
        self,
        tun_fd: int,
        *,
        tap: bool = False,
        soft_seq: int | None = None,
        soft_bytes: int | None = None,
        queue_len: int = 1024,
    ) -> None: ...
    def add_udp(self, sock_fd: int) -> int: ...
    def add_raw_esp(self, sock_fd: int) -> int: ...
    def add_tcp(
        self,
        max_frame: int = 65535,
        *,
        plaintext: bool = False,
        control: bool = True,
        rfc8229: bool = False,
    ) -> int: ...
    def add_tcp_connection(
        self, transport: int, sock_fd: int, endpoint: Endpoint, *, opened_by_us: bool = False
    ) -> None: ...
    def remove_tcp_connection(self, transport: int, endpoint: Endpoint) -> bool: ...
    def add_peer(
        self, transport: int, allowed: Sequence[str], endpoint: Endpoint | None = None
    ) -> int: ...
    def remove_peer(self, peer: int) -> None: ...
    def set_endpoint(self, peer: int, endpoint: Endpoint | None) -> None: ...
    def endpoint(self, peer: int) -> Endpoint | None: ...
    def add_inbound_sa(
        self,
        peer: int,
        spi: int,
        enc_key: bytes,
        auth_key: bytes,
        *,
        replay_window: int = 4096,
        esn: bool = False,
    ) -> None: ...
    def set_outbound_sa(
        self,
        peer: int,
        spi: int,
        enc_key: bytes,
        auth_key: bytes,
        *,
        esn: bool = False,
        soft_packets: int | None = None,
        soft_bytes: int | None = None,
    ) -> None: ...
    def clear_outbound_sa(self, peer: int) -> None: ...
    def remove_inbound_sa(self, spi: int, grace: float = 0.0) -> None: ...
    def send_control(self, transport: int, endpoint: Endpoint, payload: bytes) -> None: ...
    def send_keepalive(self, transport: int, endpoint: Endpoint) -> None: ...
    @property
    def events_fd(self) -> int: ...
    def take_events(self, max: int = 256) -> list[Event]: ...
    @property
    def stats(self) -> dict[str, int]: ...
    def peer_stats(self, peer: int) -> dict[str, int]: ...
    def peers(self) -> list[int]: ...
    def sas(self) -> list[dict[str, int | bool]]: ...
    def stop(self) -> None: ...
    @property
    def done_fd(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def exit_reason(self) -> str | None: ...
