"""Pre-shared key files: generating, writing and loading them.

A key file holds one line: 32 random bytes in standard base64 (44 characters). Like ssh with
private keys, a key file that group or others may access is refused.
"""

import base64
import binascii
import os
import secrets
import stat

from simpletun._errors import ConfigError

KEY_LEN = 32


def generate_key() -> bytes:
    """Return a new random pre-shared key."""
    return secrets.token_bytes(KEY_LEN)


def encode_key(key: bytes) -> str:
    """The key file's content for ``key``: base64 and a newline."""
    return base64.b64encode(key).decode("ascii") + "\n"


def decode_key(text: str, path: str = "key file") -> bytes:
    """Parse a key file's content; ConfigError says what is wrong with it."""
    line = text.strip()
    try:
        key = base64.b64decode(line.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        key = None
    if key is None or len(key) != KEY_LEN:
        raise ConfigError(
            f"{path}: not a simpletun key (expected one line of base64 holding {KEY_LEN} bytes); "
            "make one with: simpletun genkey > key"
        )
    return key


def read_secret_file(path: str, what: str, *, missing_hint: str = "", limit: int = 4096) -> bytes:
    """The bytes of a file holding secrets: a regular file accessible by its owner only.

    ``what`` names it in messages (``--key key``); every problem is one ConfigError line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file{missing_hint}") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{what}: permissions {mode:04o} are too open (group or others may access "
                f"the secrets); fix with: chmod 600 {path}"
            )
        try:
            return os.read(fd, limit)
        except OSError as e:
            raise ConfigError(f"{what}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def load_key(path: str) -> bytes:
    """Read and check a key file: it must be a regular file accessible by its owner only."""
    hint = f"; make one with: simpletun genkey > {path}"
    data = read_secret_file(path, f"--key {path}", missing_hint=hint)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = "\x00"
    return decode_key(text, f"--key {path}")


def write_key_to_fd(fd: int, key: bytes) -> str | None:
    """Write ``key`` as a key file to ``fd`` (normally stdout); see :func:`write_secret_to_fd`."""
    return write_secret_to_fd(fd, encode_key(key))


def write_secret_to_fd(fd: int, text: str) -> str | None:
    """Write a secret file's ``text`` to ``fd`` (normally stdout).

    When ``fd`` is a regular file it is first restricted to mode 0600 so that
    ``simpletun genkey > key`` gives a usable key file. Returns a warning to show the user, or
    None.
    """
    warning = None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        try:
            os.fchmod(fd, 0o600)
        except OSError as e:
            warning = f"could not restrict the key file to mode 0600 ({e.strerror}); run chmod 600"
    else:
        warning = (
            "the key is not going to a file; keep it secret and store it with mode 0600 "
            "(e.g. simpletun genkey > key)"
        )
    data = text.encode("ascii")
    while data:
        n = os.write(fd, data)
        data = data[n:]
    return warning
