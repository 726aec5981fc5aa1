"""simpletun: a Linux VPN tunnel with a Rust ESP data plane and a trio control plane."""

from simpletun._core import (
    DROP_REASONS,
    ESP_MAX_OVERHEAD,
    FrameDecoder,
    SecurityAssociation,
    encode_frame,
    esp_encap_len,
)
from simpletun._errors import (
    AuthenticationError,
    ConfigError,
    DeviceError,
    EspError,
    FrameError,
    FrameTooLargeError,
    HandshakeError,
    MalformedPacketError,
    ReplayError,
    SequenceExhaustedError,
    SimpletunError,
    UnknownSpiError,
)
from simpletun.api import BlockingTunnel, TunnelHandle, TunnelProcess, open_tunnel, spawn
from simpletun.session import Config, Tunnel, connect, run, serve

__all__ = [
    "BlockingTunnel",
    "TunnelHandle",
    "TunnelProcess",
    "open_tunnel",
    "spawn",
    "Config",
    "Tunnel",
    "connect",
    "run",
    "serve",
    "DROP_REASONS",
    "ESP_MAX_OVERHEAD",
    "AuthenticationError",
    "ConfigError",
    "DeviceError",
    "EspError",
    "FrameDecoder",
    "FrameError",
    "FrameTooLargeError",
    "HandshakeError",
    "MalformedPacketError",
    "ReplayError",
    "SecurityAssociation",
    "SequenceExhaustedError",
    "SimpletunError",
    "UnknownSpiError",
    "encode_frame",
    "esp_encap_len",
]
