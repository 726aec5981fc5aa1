"""IKEv2 cryptography: the transforms we support, Diffie-Hellman, prf+, the key schedule
(RFC 7296 §2.13-2.18), the encrypted payload (§3.14, RFC 5282 for AES-GCM) and AUTH (§2.15,
RFC 7427 with Ed25519 per RFC 8420)."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from simpletun.ike import const as c

PRF_LEN = 32  # PRF_HMAC_SHA2_256
INTEG_KEY_LEN = 32  # HMAC_SHA2_256_128
ICV_LEN = 16
KEY_PAD = b"Key Pad for IKEv2"


def prf(key: bytes, data: bytes, digest=hashlib.sha256) -> bytes:
    """PRF_HMAC_SHA2_256 (other HMAC digests only for known-answer tests)."""
    return hmac.new(key, data, digest).digest()


def prf_plus(key: bytes, seed: bytes, length: int, digest=hashlib.sha256) -> bytes:
    """prf+ (RFC 7296 §2.13): T1 | T2 | ... with Tn = prf(K, Tn-1 | S | n)."""
    if length > 255 * digest().digest_size:
        raise ValueError("prf+ cannot produce that much keying material")
    out = b""
    t = b""
    n = 1
    while len(out) < length:
        t = hmac.new(key, t + seed + bytes([n]), digest).digest()
        out += t
        n += 1
    return out[:length]


# ------------------------------------------------------------------------- Diffie-Hellman


class DhError(Exception):
    """The peer's public value is invalid."""


KE_LENGTHS = {c.DH_CURVE25519: 32, c.DH_ECP256: 64}


class DiffieHellman:
    def __init__(self, group: int):
        self.group = group
        if group == c.DH_CURVE25519:
            self._priv = x25519.X25519PrivateKey.generate()
            self.public = self._priv.public_key().public_bytes_raw()
        elif group == c.DH_ECP256:
            self._priv = ec.generate_private_key(ec.SECP256R1())
            n = self._priv.public_key().public_numbers()
            self.public = n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")
        else:
            raise ValueError(f"unsupported DH group {group}")

    def shared(self, peer: bytes) -> bytes:
        if len(peer) != KE_LENGTHS[self.group]:
            raise DhError(f"KE of {len(peer)} bytes for group {self.group}")
        try:
            if self.group == c.DH_CURVE25519:
                s = self._priv.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
                if s == bytes(32):
                    raise DhError("X25519 shared secret is all zero")
                return s
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + peer)
            return self._priv.exchange(ec.ECDH(), pub)
        except (ValueError, TypeError) as e:
            raise DhError(str(e)) from None


# ------------------------------------------------------------------------- IKE SA keys


@dataclass(frozen=True)
class IkeSuite:
    encr: int
    key_bits: int
    prf: int
    integ: int  # AUTH_NONE for AEAD
    dh: int

    @property
    def aead(self) -> bool:
        return self.encr == c.ENCR_AES_GCM_16

    @property
    def enc_key_len(self) -> int:
        return self.key_bits // 8 + (4 if self.aead else 0)

    @property
    def integ_key_len(self) -> int:
        return 0 if self.aead else INTEG_KEY_LEN

    def name(self) -> str:
        e = "AES_GCM_16" if self.aead else "AES_CBC"
        parts = [f"{e}_{self.key_bits}"]
        if not self.aead:
            parts.append("HMAC_SHA2_256_128")
        parts += ["PRF_HMAC_SHA2_256", c.TRANSFORM_NAMES[(c.TT_DH, self.dh)]]
        return "/".join(parts)


def cbc_suite(key_bits: int, dh: int) -> IkeSuite:
    """AES-CBC-<key_bits> / HMAC-SHA2-256-128 / PRF-HMAC-SHA2-256 / <dh>."""
    return IkeSuite(c.ENCR_AES_CBC, key_bits, c.PRF_HMAC_SHA2_256, c.AUTH_HMAC_SHA2_256_128, dh)


def gcm_suite(key_bits: int, dh: int) -> IkeSuite:
    """AES-GCM-16-<key_bits> / PRF-HMAC-SHA2-256 / <dh> (RFC 5282)."""
    return IkeSuite(c.ENCR_AES_GCM_16, key_bits, c.PRF_HMAC_SHA2_256, c.AUTH_NONE, dh)


@dataclass(frozen=True)
class ChildSuite:
    key_bits: int
    esn: bool
    dh: int = c.DH_NONE  # PFS group used by CREATE_CHILD_SA

    def name(self) -> str:
        s = f"AES_CBC_{self.key_bits}/HMAC_SHA2_256_128/{'EXT_SEQ' if self.esn else 'NO_EXT_SEQ'}"
        return s + (f"/{c.TRANSFORM_NAMES[(c.TT_DH, self.dh)]}" if self.dh else "")


@dataclass(frozen=True)
class IkeKeys:
    d: bytes
    ai: bytes
    ar: bytes
    ei: bytes
    er: bytes
    pi: bytes
    pr: bytes


def skeyseed(ni: bytes, nr: bytes, g_ir: bytes, digest=hashlib.sha256) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (§2.14)."""
    return prf(ni + nr, g_ir, digest)


def rekey_skeyseed(old_sk_d: bytes, g_ir: bytes, ni: bytes, nr: bytes, digest=hashlib.sha256):
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18)."""
    return prf(old_sk_d, g_ir + ni + nr, digest)


def ike_keys(seed: bytes, suite: IkeSuite, ni, nr, spi_i, spi_r) -> IkeKeys:
    el, il = suite.enc_key_len, suite.integ_key_len
    km = prf_plus(seed, ni + nr + spi_i + spi_r, 3 * PRF_LEN + 2 * il + 2 * el)
    parts = []
    pos = 0
    for n in (PRF_LEN, il, il, el, el, PRF_LEN, PRF_LEN):
        parts.append(km[pos : pos + n])
        pos += n
    return IkeKeys(*parts)


@dataclass(frozen=True)
class ChildKeys:
    """Keys of one Child SA: enc/auth of the initiator->responder and responder->initiator SAs."""

    enc_i: bytes
    auth_i: bytes
    enc_r: bytes
    auth_r: bytes


def child_keys(sk_d: bytes, suite: ChildSuite, ni: bytes, nr: bytes, g_ir: bytes = b""):
    el = suite.key_bits // 8
    km = prf_plus(sk_d, g_ir + ni + nr, 2 * (el + INTEG_KEY_LEN))
    a = el + INTEG_KEY_LEN
    return ChildKeys(km[:el], km[el:a], km[a : a + el], km[a + el :])


# ------------------------------------------------------------------------- SK payload


class IntegrityError(Exception):
    """The encrypted payload failed its integrity check or is malformed."""


def sk_overhead(suite: IkeSuite) -> tuple[int, int]:
    """(IV length, ICV length)."""
    return (8, 16) if suite.aead else (16, ICV_LEN)


def sk_encrypt(
    suite: IkeSuite, enc_key: bytes, integ_key: bytes, header_and_sk_header: bytes, plain: bytes
) -> bytes:
    """Return IV | ciphertext | ICV for the SK payload whose preceding message bytes (IKE
    header with the final length, SK generic header) are ``header_and_sk_header``."""
    if suite.aead:
        padlen = 0
        data = plain + bytes([padlen])
        iv = os.urandom(8)
        ct = AESGCM(enc_key[:-4]).encrypt(enc_key[-4:] + iv, data, header_and_sk_header)
        return iv + ct
    padlen = (-(len(plain) + 1)) % 16
    data = plain + bytes(padlen) + bytes([padlen])
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
    ct = enc.update(data) + enc.finalize()
    icv = hmac.new(integ_key, header_and_sk_header + iv + ct, hashlib.sha256).digest()[:ICV_LEN]
    return iv + ct + icv


def sk_decrypt(
    suite: IkeSuite, enc_key: bytes, integ_key: bytes, raw: bytes, sk_offset: int
) -> bytes:
    """Verify and decrypt the SK payload at ``sk_offset`` of message ``raw``; the plaintext
    chain (padding removed)."""
    ivl, icvl = sk_overhead(suite)
    body = raw[sk_offset + 4 :]
    if suite.aead:
        if len(body) < ivl + icvl + 1:
            raise IntegrityError("encrypted payload too short")
        iv = body[:ivl]
        try:
            data = AESGCM(enc_key[:-4]).decrypt(enc_key[-4:] + iv, body[ivl:], raw[: sk_offset + 4])
        except InvalidTag:
            raise IntegrityError("AES-GCM tag mismatch") from None
    else:
        if len(body) < ivl + 16 + icvl or (len(body) - ivl - icvl) % 16:
            raise IntegrityError(f"encrypted payload of {len(body)} bytes")
        mac = hmac.new(integ_key, raw[:-icvl], hashlib.sha256).digest()[:icvl]
        if not hmac.compare_digest(mac, raw[-icvl:]):
            raise IntegrityError("ICV mismatch")
        iv = body[:ivl]
        dec = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).decryptor()
        data = dec.update(body[ivl:-icvl]) + dec.finalize()
    padlen = data[-1]
    if padlen + 1 > len(data):
        raise IntegrityError("pad length longer than the plaintext")
    return data[: len(data) - padlen - 1]


# ------------------------------------------------------------------------- NAT-D, cookies


def natd_hash(spi_i: bytes, spi_r: bytes, ip: bytes, port: int) -> bytes:
    return hashlib.sha1(spi_i + spi_r + ip + struct.pack("!H", port)).digest()


# ------------------------------------------------------------------------- AUTH


def psk_auth(psk: bytes, octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(psk, KEY_PAD), octets)


def signed_octets(message: bytes, peer_nonce: bytes, sk_p: bytes, id_body: bytes) -> bytes:
    return message + peer_nonce + prf(sk_p, id_body)


def ed25519_auth(key: ed25519.Ed25519PrivateKey, octets: bytes) -> bytes:
    """RFC 7427 AUTH data: ASN.1 length | AlgorithmIdentifier | signature."""
    return bytes([len(c.ED25519_ALG_ID)]) + c.ED25519_ALG_ID + key.sign(octets)


def ed25519_verify(pub: ed25519.Ed25519PublicKey, data: bytes, octets: bytes) -> bool:
    if len(data) < 1 or data[0] != len(c.ED25519_ALG_ID):
        return False
    if data[1 : 1 + data[0]] != c.ED25519_ALG_ID:
        return False
    try:
        pub.verify(data[1 + data[0] :], octets)
        return True
    except InvalidSignature:
        return False
