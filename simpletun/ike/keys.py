"""Ed25519 keys for IKEv2 signature authentication, WireGuard style: the private key is a
``simpletun genkey`` file (32 random bytes, base64), used as the Ed25519 seed; the public key
is 32 bytes in base64 (``simpletun pubkey < key``)."""

from __future__ import annotations

import base64
import binascii
import sys

from cryptography.hazmat.primitives.asymmetric import ed25519

from simpletun import keys
from simpletun._errors import ConfigError

PROG = "simpletun"
PUBKEY_USAGE = f"""\
Usage: {PROG} pubkey < KEYFILE
       {PROG} pubkey KEYFILE

Prints the Ed25519 public key (base64, one line) of a private key made by '{PROG} genkey'.
Give the public key to the peer; keep the private key file secret (mode 0600).
"""


def private_key(key: bytes) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(key)


def public_key_text(key: bytes) -> str:
    """The base64 public key of the 32-byte private key ``key``, with a newline."""
    pub = private_key(key).public_key().public_bytes_raw()
    return base64.b64encode(pub).decode("ascii") + "\n"


def load_public_key(text: str, where: str = "public key") -> ed25519.Ed25519PublicKey:
    """Parse a base64 public key as printed by ``simpletun pubkey``."""
    try:
        raw = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(
            f"{where}: not an Ed25519 public key (expected one line of base64 holding 32 "
            f"bytes); make one with: {PROG} pubkey < key"
        )
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def pubkey_main(argv: list[str]) -> int:
    """``simpletun pubkey``: exit 0, or 2 with one line on stderr."""
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(PUBKEY_USAGE)
        return 0
    try:
        if len(argv) > 1:
            raise ConfigError(f"pubkey takes at most one key file, got {len(argv)} arguments")
        if argv:
            try:
                key = keys.load_key(argv[0])
            except ConfigError as e:  # its messages speak of --key; here it is an argument
                raise ConfigError(str(e).replace(f"--key {argv[0]}", argv[0], 1)) from None
        else:
            if sys.stdin is None or sys.stdin.isatty():
                raise ConfigError(f"pubkey reads the private key on stdin: {PROG} pubkey < key")
            key = keys.decode_key(sys.stdin.read(4096), "stdin")
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(public_key_text(key))
    return 0
