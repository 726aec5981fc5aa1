"""An independent reference ESP (RFC 4303) for the tests, built on the ``cryptography`` package.

It shares no code with simpletun: it is what the tests compare the Rust core against, in both
directions (our encap -> reference decap, reference encap -> our decap).

Wire format (tunnel mode, no outer IP header)::

    SPI(4) | seq low 32 bits(4) | IV(16) | AES-CBC(inner | pad 1,2,3.. | pad len | nh) | ICV(16)

ICV = HMAC-SHA-256 truncated to 128 bits (RFC 4868) over SPI .. ciphertext, followed by the high
32 bits of the sequence number when ESN is on (RFC 4303 section 2.2.1; they are never sent).

Unlike a real implementation, the reference takes the IV and the full sequence number from the
caller, and it can produce wrong padding on purpose (``pad=`` / ``pad_len=``), so the tests can
build authentic packets with bad trailers.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
IV_LEN = 16
ICV_LEN = 16
HEADER_LEN = 8
#: header + IV + one cipher block + ICV
MIN_PACKET_LEN = HEADER_LEN + IV_LEN + BLOCK + ICV_LEN


class RefError(Exception):
    """The reference rejected a packet."""


class RefAuthError(RefError):
    pass


class RefMalformedError(RefError):
    pass


def default_padding(n: int) -> bytes:
    """RFC 4303 section 2.4 default padding: 1, 2, 3, ..."""
    return bytes(range(1, n + 1))


def min_pad_len(inner_len: int) -> int:
    """The fewest pad bytes that make ``inner | pad | padlen | nh`` a whole number of blocks."""
    return (-(inner_len + 2)) % BLOCK


def cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    assert len(data) % BLOCK == 0
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    assert len(data) % BLOCK == 0
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(data) + dec.finalize()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = chmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


@dataclass(frozen=True)
class Decapped:
    spi: int
    seq: int
    next_header: int
    inner: bytes
    #: the pad bytes as found in the packet (between the inner packet and the pad length byte)
    padding: bytes
    iv: bytes
    #: the decrypted payload: inner | padding | pad length | next header
    plaintext: bytes


@dataclass(frozen=True)
class RefSA:
    """One direction of an SA: keys, SPI and whether ESN is on."""

    spi: int
    enc_key: bytes
    auth_key: bytes
    esn: bool = False

    def icv(self, authed: bytes, seq: int) -> bytes:
        tail = struct.pack(">I", seq >> 32) if self.esn else b""
        return hmac_sha256(self.auth_key, authed + tail)[:ICV_LEN]

    def encap(
        self,
        inner: bytes,
        *,
        seq: int,
        iv: bytes,
        next_header: int,
        pad: bytes | None = None,
        pad_len: int | None = None,
        extra_pad_blocks: int = 0,
    ) -> bytes:
        """Build an ESP packet with sequence number ``seq`` (full 64 bits with ESN).

        By default the padding is the minimal RFC 4303 default padding. ``extra_pad_blocks``
        adds whole blocks of default padding (still valid: RFC 4303 allows up to 255 pad bytes).
        ``pad`` replaces the pad bytes and ``pad_len`` the pad length byte (to build packets with
        wrong trailers); the payload must still come out a whole number of blocks.
        """
        if not self.esn:
            assert 0 <= seq < 1 << 32, "without ESN the sequence number is 32 bits"
        assert 0 <= seq < 1 << 64
        assert len(iv) == IV_LEN
        if pad is None:
            pad = default_padding(min_pad_len(len(inner)) + BLOCK * extra_pad_blocks)
        if pad_len is None:
            pad_len = len(pad)
        plaintext = inner + pad + bytes([pad_len, next_header])
        assert len(plaintext) % BLOCK == 0, "payload must be a whole number of blocks"
        header = struct.pack(">II", self.spi, seq & 0xFFFFFFFF)
        authed = header + iv + cbc_encrypt(self.enc_key, iv, plaintext)
        return authed + self.icv(authed, seq)

    def decap(self, packet: bytes, *, seq_hi: int = 0, strict_padding: bool = True) -> Decapped:
        """Check and decrypt ``packet``. With ESN, ``seq_hi`` is the high 32 bits the receiver
        assumes for it. ``strict_padding`` requires the default padding 1, 2, 3, ...."""
        n = len(packet)
        if n < MIN_PACKET_LEN or (n - HEADER_LEN - IV_LEN - ICV_LEN) % BLOCK:
            raise RefMalformedError(f"bad length {n}")
        spi, seq_low = struct.unpack(">II", packet[:HEADER_LEN])
        if spi != self.spi:
            raise RefAuthError(f"SPI {spi:#x} is not {self.spi:#x}")
        seq = (seq_hi << 32 | seq_low) if self.esn else seq_low
        authed, icv = packet[:-ICV_LEN], packet[-ICV_LEN:]
        if not hmac.compare_digest(self.icv(authed, seq), icv):
            raise RefAuthError("ICV mismatch")
        iv = packet[HEADER_LEN : HEADER_LEN + IV_LEN]
        plaintext = cbc_decrypt(self.enc_key, iv, authed[HEADER_LEN + IV_LEN :])
        pad_len, next_header = plaintext[-2], plaintext[-1]
        if pad_len + 2 > len(plaintext):
            raise RefMalformedError(f"pad length {pad_len} exceeds the payload")
        inner_len = len(plaintext) - 2 - pad_len
        padding = plaintext[inner_len:-2]
        if strict_padding and padding != default_padding(pad_len):
            raise RefMalformedError(f"padding {padding.hex()} is not 1, 2, 3, ...")
        return Decapped(
            spi=spi,
            seq=seq,
            next_header=next_header,
            inner=plaintext[:inner_len],
            padding=padding,
            iv=iv,
            plaintext=plaintext,
        )


def encap_len(inner_len: int) -> int:
    """Length of the ESP packet with minimal padding."""
    return HEADER_LEN + IV_LEN + inner_len + min_pad_len(inner_len) + 2 + ICV_LEN


def ipv4_packet(length: int, fill: int = 0xAB) -> bytes:
    """``length`` bytes that start like an IPv4 header (version nibble 4); at least 1 byte."""
    assert length >= 1
    return bytes([0x45]) + bytes([fill]) * (length - 1)


def ipv6_packet(length: int, fill: int = 0xCD) -> bytes:
    """``length`` bytes that start like an IPv6 header (version nibble 6); at least 1 byte."""
    assert length >= 1
    return bytes([0x60]) + bytes([fill]) * (length - 1)
