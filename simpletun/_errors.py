"""Exception classes of simpletun.

They are defined here, in Python, and raised by the Rust extension through a single mapping
(``rust/python/src/errors.rs``).
"""


class SimpletunError(Exception):
    """Base class of every simpletun error."""


class EspError(SimpletunError):
    """An ESP packet was rejected or could not be produced."""


class AuthenticationError(EspError):
    """The packet's ICV did not verify: wrong key, corruption or forgery."""


class ReplayError(EspError):
    """The packet's sequence number was already received or is left of the replay window."""


class MalformedPacketError(EspError, ValueError):
    """The packet is structurally invalid: bad length, padding or trailer."""


class UnknownSpiError(EspError):
    """No security association matches the packet's SPI."""


class SequenceExhaustedError(EspError):
    """The SA's outbound sequence numbers are used up; it must be replaced with fresh keys."""


class FrameError(SimpletunError, ValueError):
    """A length-prefixed frame could not be decoded or encoded."""


class FrameTooLargeError(FrameError):
    """A frame's length prefix exceeds the decoder's bound.

    ``frames`` holds the good frames decoded by the same ``feed`` call, in order; the oversized
    frame's bytes are skipped and the decoder stays usable.
    """

    frames: list


class ConfigError(SimpletunError, ValueError):
    """Bad input from the user: a flag, key, or configuration value."""


class HandshakeError(SimpletunError):
    """The session handshake failed (wrong key, protocol violation, timeout).

    ``code`` says why, machine-readably: ``wrong_key``, ``cipher_mismatch``,
    ``version_mismatch``, ``malformed``, ``timeout`` or ``closed`` (see simpletun.handshake).
    """

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


class DeviceError(SimpletunError, OSError):
    """A TUN/TAP device could not be opened or configured."""
