"""The session handshake: three control frames that turn the pre-shared key into two SAs.

Specified in docs/PROTOCOL.md. Works on any trio stream (a SocketStream in real use) and reads
exactly the handshake frames, so data frames that follow stay in the socket for the Rust pump.
"""

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from simpletun._core import AUTH_KEY_LEN, CONTROL_MARKER, MIN_SPI
from simpletun._errors import HandshakeError

VERSION = 1
# Version 2 (TCP only) = version 1 + a features byte after the nonce in ClientHello and
# ServerHello. A client sends it only when it has a feature to announce (else exactly version
# 1); a server accepts both and answers in the client's version.
VERSION_FEATURES = 2
# Feature bits. SUPER: TCP TSO super-packets travel whole, one ESP packet each (docs/DESIGN.md,
# issue 9); announced only by an end whose TUN device accepted TSO.
FEATURE_SUPER = 0x01
KNOWN_FEATURES = FEATURE_SUPER
NONCE_LEN = 32
MAC_LEN = 32
MAX_CONTROL_FRAME = 256
DEFAULT_TIMEOUT = 5.0

# Cipher suite id on the wire -> (name, encryption key length). The integrity algorithm is
# always HMAC-SHA-256-128 with a 32-byte key.
CIPHERS = {1: ("aes-128-cbc", 16), 2: ("aes-192-cbc", 24), 3: ("aes-256-cbc", 32)}
CIPHER_IDS = {name: cid for cid, (name, _) in CIPHERS.items()}
DEFAULT_CIPHER = "aes-128-cbc"

MSG_CLIENT_HELLO = 1
MSG_SERVER_HELLO = 2
MSG_CLIENT_FINISH = 3
MSG_ERROR = 4

ERR_WRONG_KEY = 1
ERR_CIPHER_MISMATCH = 2
ERR_VERSION_MISMATCH = 3
ERR_MALFORMED = 4

# HandshakeError.code values. The first three are configuration mismatches that retrying
# cannot fix.
WRONG_KEY = "wrong_key"
CIPHER_MISMATCH = "cipher_mismatch"
VERSION_MISMATCH = "version_mismatch"
# The server rejected our version 2 ClientHello and speaks version 1 (a release without
# features): retry with a version 1 ClientHello (features off).
OLD_SERVER = "old_server"
MALFORMED = "malformed"
TIMEOUT = "timeout"
CLOSED = "closed"
FATAL_CODES = frozenset({WRONG_KEY, CIPHER_MISMATCH, VERSION_MISMATCH})

_KEY_HINT = "both ends must use the same --key file"
_CIPHER_HINT = "pass the same --cipher on both ends"


def handshake_error(code: str, message: str) -> HandshakeError:
    """A HandshakeError carrying a machine-readable ``code`` (one of the constants above)."""
    return HandshakeError(message, code)


@dataclass(frozen=True)
class SaKeys:
    """One direction's SA parameters (SPI and keys) for the data plane's SecurityAssociation."""

    spi: int
    enc_key: bytes = field(repr=False)
    auth_key: bytes = field(repr=False)

    def as_tuple(self) -> tuple[int, bytes, bytes]:
        return (self.spi, self.enc_key, self.auth_key)


@dataclass(frozen=True)
class HandshakeResult:
    """What a successful handshake yields: the cipher and the SAs of both directions."""

    cipher: str
    tx: SaKeys
    rx: SaKeys
    # Both ends announced super-packets (TCP handshake version 2, FEATURE_SUPER).
    super_packets: bool = False


def cipher_id(name: str) -> int:
    try:
        return CIPHER_IDS[name]
    except KeyError:
        raise ValueError(
            f"unknown cipher {name!r}; choose one of {', '.join(CIPHER_IDS)}"
        ) from None


def _cipher_name(cid: int) -> str:
    return CIPHERS[cid][0] if cid in CIPHERS else f"unknown cipher #{cid}"


# -- key schedule -----------------------------------------------------------------------------


def transcript_hash(client_hello: bytes, server_hello_head: bytes) -> bytes:
    """SHA-256 over the ClientHello payload and the ServerHello payload without its MAC."""
    return hashlib.sha256(client_hello + server_hello_head).digest()


def _spi(raw: bytes) -> int:
    return MIN_SPI + int.from_bytes(raw, "big") % (2**32 - MIN_SPI)


def derive(
    key: bytes, cipher: str, nonce_c: bytes, nonce_s: bytes, th: bytes
) -> dict[str, bytes | int]:
    """The key schedule of docs/PROTOCOL.md: SPIs, SA keys and confirmation keys."""
    enc_len = CIPHERS[cipher_id(cipher)][1]
    prk = hmac.new(nonce_c + nonce_s, key, hashlib.sha256).digest()

    def expand(label: str, length: int) -> bytes:
        info = b"simpletun v1 " + label.encode("ascii") + th
        return HKDFExpand(hashes.SHA256(), length, info).derive(prk)

    out: dict[str, bytes | int] = {
        "c2s_spi": _spi(expand("c2s spi", 4)),
        "s2c_spi": _spi(expand("s2c spi", 4)),
        "c2s_enc": expand("c2s enc", enc_len),
        "c2s_auth": expand("c2s auth", AUTH_KEY_LEN),
        "s2c_enc": expand("s2c enc", enc_len),
        "s2c_auth": expand("s2c auth", AUTH_KEY_LEN),
        "c_confirm": expand("client confirm", MAC_LEN),
        "s_confirm": expand("server confirm", MAC_LEN),
    }
    if out["s2c_spi"] == out["c2s_spi"]:
        out["s2c_spi"] = MIN_SPI + (out["s2c_spi"] - MIN_SPI + 1) % (2**32 - MIN_SPI)
    return out


def _mac(confirm_key: bytes, th: bytes) -> bytes:
    return hmac.new(confirm_key, th, hashlib.sha256).digest()


# -- framing ----------------------------------------------------------------------------------


def control_frame(msg_type: int, body: bytes) -> bytes:
    payload = CONTROL_MARKER + bytes([msg_type]) + body
    return struct.pack(">H", len(payload)) + payload


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.receive_some(n - len(buf))
        except (trio.BrokenResourceError, OSError) as e:
            raise handshake_error(CLOSED, f"connection lost during the handshake: {e}") from None
        if not chunk:
            raise handshake_error(CLOSED, "peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


async def _send(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        raise handshake_error(CLOSED, f"connection lost during the handshake: {e}") from None


async def _send_error(stream: trio.abc.SendStream, code: int, detail: int = 0) -> None:
    """Best effort: tell the peer why we give up, so that it can say so too."""
    with trio.move_on_after(0.5):
        try:
            await stream.send_all(control_frame(MSG_ERROR, bytes([code, detail])))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _receive_message(
    stream: trio.abc.Stream, peer: str, cipher: str, sent: int = VERSION
) -> tuple[int, bytes]:
    """Read one control frame; returns (type, payload including the marker and type)."""
    (length,) = struct.unpack(">H", await _receive_exactly(stream, 2))
    # A peer that sends something other than a control frame does not speak this handshake
    # (e.g. a --plaintext peer would write an Error message into its device): no Error for it.
    if length > MAX_CONTROL_FRAME:
        raise handshake_error(
            MALFORMED,
            f"the {peer} sent a {length}-byte frame instead of a handshake message "
            "(is it running with --plaintext, or not simpletun at all?)",
        )
    payload = await _receive_exactly(stream, length)
    if len(payload) < 5 or payload[:4] != CONTROL_MARKER:
        raise handshake_error(
            MALFORMED,
            f"the {peer} sent a data frame instead of a handshake message "
            "(is it running with --plaintext?)",
        )
    msg_type = payload[4]
    if msg_type == MSG_ERROR:
        raise _peer_error(payload, peer, cipher, sent)
    return msg_type, payload


def _peer_error(payload: bytes, peer: str, cipher: str, sent: int = VERSION) -> HandshakeError:
    """Turn a received Error message into the HandshakeError this side reports."""
    body = payload[5:]
    code = body[0] if body else 0
    detail = body[1] if len(body) > 1 else 0
    if code == ERR_WRONG_KEY:
        return handshake_error(
            WRONG_KEY, f"wrong key: the {peer} could not verify our key confirmation ({_KEY_HINT})"
        )
    if code == ERR_CIPHER_MISMATCH:
        return handshake_error(
            CIPHER_MISMATCH,
            f"cipher mismatch: the {peer} uses {_cipher_name(detail)}, we use {cipher} "
            f"({_CIPHER_HINT})",
        )
    if code == ERR_VERSION_MISMATCH and sent == VERSION_FEATURES and detail == VERSION:
        return handshake_error(
            OLD_SERVER,
            f"the {peer} runs an older simpletun (handshake version {VERSION}, no super-packets); "
            f"retrying with version {VERSION}, super-packets off",
        )
    if code == ERR_VERSION_MISMATCH:
        return handshake_error(
            VERSION_MISMATCH,
            f"protocol version mismatch: the {peer} speaks version {detail}, we speak "
            f"{VERSION}; run the same simpletun release on both ends",
        )
    if code == ERR_MALFORMED:
        return handshake_error(MALFORMED, f"the {peer} rejected our handshake message as malformed")
    return handshake_error(MALFORMED, f"the {peer} aborted the handshake (error code {code})")


async def _malformed(stream: trio.abc.Stream, peer: str, what: str) -> HandshakeError:
    await _send_error(stream, ERR_MALFORMED)
    return handshake_error(MALFORMED, f"malformed handshake message from the {peer}: {what}")


# -- the two roles ----------------------------------------------------------------------------


def _check_args(key: bytes, cipher: str) -> int:
    if len(key) != 32:
        raise ValueError("the pre-shared key must be 32 bytes")
    return cipher_id(cipher)


async def client_handshake(
    stream: trio.abc.Stream,
    key: bytes,
    cipher: str = DEFAULT_CIPHER,
    *,
    timeout=DEFAULT_TIMEOUT,
    super_packets: bool = False,
) -> HandshakeResult:
    """Run the client side; raises HandshakeError (with ``.code``) on any failure.

    ``super_packets``: announce super-packets (a version 2 ClientHello); an old server answers
    with a version mismatch, raised as code ``OLD_SERVER`` (retry without)."""
    cid = _check_args(key, cipher)
    return await _within(
        timeout,
        _client(stream, key, cid, FEATURE_SUPER if super_packets else 0),
        f"no handshake reply from the server within {timeout:g} s "
        "(is it simpletun in ESP mode, not --plaintext?)",
    )


async def server_handshake(
    stream: trio.abc.Stream,
    key: bytes,
    cipher: str = DEFAULT_CIPHER,
    *,
    timeout=DEFAULT_TIMEOUT,
    on_hello=None,
    super_packets: bool = False,
) -> HandshakeResult:
    """Run the server side; raises HandshakeError (with ``.code``) on any failure.

    ``on_hello()`` is called once a well-formed ClientHello of our version and cipher has
    arrived (admission control uses it to tell real clients from idle connections).
    ``super_packets``: we support them (agreed if a version 2 client announces them too)."""
    cid = _check_args(key, cipher)
    return await _within(
        timeout,
        _server(stream, key, cid, on_hello, FEATURE_SUPER if super_packets else 0),
        f"the client did not complete the handshake within {timeout:g} s",
    )


async def _within(timeout: float, handshake, message: str) -> HandshakeResult:
    """Await the ``handshake`` coroutine, or raise a TIMEOUT HandshakeError with ``message``."""
    with trio.move_on_after(timeout):
        return await handshake
    raise handshake_error(TIMEOUT, message)


async def _client(stream: trio.abc.Stream, key: bytes, cid: int, features: int) -> HandshakeResult:
    cipher = _cipher_name(cid)
    nonce_c = secrets.token_bytes(NONCE_LEN)
    version = VERSION_FEATURES if features else VERSION
    extra = bytes([features]) if features else b""
    hello = CONTROL_MARKER + bytes([MSG_CLIENT_HELLO, version, cid]) + nonce_c + extra
    await _send(stream, struct.pack(">H", len(hello)) + hello)

    msg_type, payload = await _receive_message(stream, "server", cipher, version)
    if msg_type != MSG_SERVER_HELLO:
        raise await _malformed(stream, "server", f"expected ServerHello, got type {msg_type}")
    head_len = 7 + NONCE_LEN + len(extra)
    if len(payload) != head_len + MAC_LEN:
        raise await _malformed(stream, "server", f"ServerHello of {len(payload)} bytes")
    peer_version, peer_cid = payload[5], payload[6]
    if peer_version != version or peer_cid != cid:
        raise await _malformed(stream, "server", "ServerHello does not echo our version/cipher")
    agreed = payload[7 + NONCE_LEN] if extra else 0
    if agreed & ~features:
        raise await _malformed(stream, "server", f"ServerHello agrees to features {agreed:#x}")
    nonce_s = payload[7 : 7 + NONCE_LEN]
    head, server_mac = payload[:head_len], payload[head_len:]

    th = transcript_hash(hello, head)
    k = derive(key, cipher, nonce_c, nonce_s, th)
    if not hmac.compare_digest(server_mac, _mac(k["s_confirm"], th)):
        await _send_error(stream, ERR_WRONG_KEY)
        raise handshake_error(
            WRONG_KEY, f"wrong key: the server's key confirmation does not match ({_KEY_HINT})"
        )
    await _send(stream, control_frame(MSG_CLIENT_FINISH, _mac(k["c_confirm"], th)))
    return HandshakeResult(
        cipher=cipher,
        tx=SaKeys(k["c2s_spi"], k["c2s_enc"], k["c2s_auth"]),
        rx=SaKeys(k["s2c_spi"], k["s2c_enc"], k["s2c_auth"]),
        super_packets=bool(agreed & FEATURE_SUPER),
    )


async def _server(
    stream: trio.abc.Stream, key: bytes, cid: int, on_hello=None, features: int = 0
) -> HandshakeResult:
    cipher = _cipher_name(cid)
    msg_type, hello = await _receive_message(stream, "client", cipher)
    if msg_type != MSG_CLIENT_HELLO:
        raise await _malformed(stream, "client", f"expected ClientHello, got type {msg_type}")
    if len(hello) < 7:
        raise await _malformed(stream, "client", "ClientHello too short")
    version, peer_cid = hello[5], hello[6]
    if version not in (VERSION, VERSION_FEATURES):
        await _send_error(stream, ERR_VERSION_MISMATCH, VERSION_FEATURES)
        raise handshake_error(
            VERSION_MISMATCH,
            f"protocol version mismatch: the client speaks version {version}, we speak "
            f"{VERSION} and {VERSION_FEATURES}; run the same simpletun release on both ends",
        )
    extra = 1 if version == VERSION_FEATURES else 0
    if len(hello) != 7 + NONCE_LEN + extra:
        raise await _malformed(stream, "client", f"ClientHello of {len(hello)} bytes")
    if peer_cid != cid:
        await _send_error(stream, ERR_CIPHER_MISMATCH, cid)
        raise handshake_error(
            CIPHER_MISMATCH,
            f"cipher mismatch: the client uses {_cipher_name(peer_cid)}, we use {cipher} "
            f"({_CIPHER_HINT})",
        )
    nonce_c = hello[7 : 7 + NONCE_LEN]
    # Unknown feature bits (a newer client) are not agreed to.
    agreed = hello[7 + NONCE_LEN] & features & KNOWN_FEATURES if extra else 0
    if on_hello is not None:
        on_hello()
    nonce_s = secrets.token_bytes(NONCE_LEN)
    head = CONTROL_MARKER + bytes([MSG_SERVER_HELLO, version, cid]) + nonce_s
    if extra:
        head += bytes([agreed])
    th = transcript_hash(hello, head)
    k = derive(key, cipher, nonce_c, nonce_s, th)
    server_hello = head + _mac(k["s_confirm"], th)
    await _send(stream, struct.pack(">H", len(server_hello)) + server_hello)

    msg_type, finish = await _receive_message(stream, "client", cipher)
    if msg_type != MSG_CLIENT_FINISH or len(finish) != 5 + MAC_LEN:
        raise await _malformed(stream, "client", "expected a ClientFinish")
    if not hmac.compare_digest(finish[5:], _mac(k["c_confirm"], th)):
        await _send_error(stream, ERR_WRONG_KEY)
        raise handshake_error(
            WRONG_KEY, f"wrong key: the client's key confirmation does not match ({_KEY_HINT})"
        )
    return HandshakeResult(
        cipher=cipher,
        tx=SaKeys(k["s2c_spi"], k["s2c_enc"], k["s2c_auth"]),
        rx=SaKeys(k["c2s_spi"], k["c2s_enc"], k["c2s_auth"]),
        super_packets=bool(agreed & FEATURE_SUPER),
    )
