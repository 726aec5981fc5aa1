"""Manual keying files: the SPIs and keys of both directions of a tunnel, as ``ip xfrm`` takes
them, in one file both ends (and both data planes) read.

Format (TOML; keys and SPIs written as ``ip xfrm`` writes them)::

    # simpletun manual keys: copy this file to both ends (mode 0600)
    cipher = "cbc(aes)"            # AES-CBC (RFC 3602); the key length picks AES-128/192/256
    auth = "hmac(sha256)"          # HMAC-SHA-256-128 (RFC 4868), 32-byte keys
    replay-window = 4096           # 32 to 4096 packets
    esn = false                    # 64-bit extended sequence numbers (needs a window)
    transport = "esp-in-udp"       # or "esp" (IP protocol 50)
    port = 4500                    # esp-in-udp only: the UDP port of both ends

    [client-to-server]
    spi = 0x01000000
    enc-key = "0x000102030405060708090a0b0c0d0e0f"
    auth-key = "0x<64 hex digits>"
    # seq = 0xfffffffc             # optional: this direction's sequence numbers continue after
                                   # this one (default 0); for tests, e.g. ESN crossing 2^32

    [server-to-client]
    spi = 0x01000001
    enc-key = "0x..."
    auth-key = "0x..."

The server (``simpletun -s``) sends with ``server-to-client`` and receives with
``client-to-server``; the client the other way round. ``seq`` presets a direction at both of
its ends (the sender's first packet carries ``seq + 1``, the receiver's replay window starts
there), in the kernel (``XFRMA_REPLAY_ESN_VAL``, ``ip xfrm`` ``replay-oseq``/``replay-seq``) and
in simpletun's data plane alike; never lower it in a file whose keys were already used
(sequence numbers must not repeat under one key). Every problem is reported as one ConfigError
line naming the file, the setting and the fix.
"""

from __future__ import annotations

import secrets
import tomllib
from dataclasses import dataclass

from simpletun._errors import ConfigError

ENC_KEY_LENS = (16, 24, 32)
AUTH_KEY_LEN = 32
# Anti-replay windows both data planes accept: simpletun's core needs at least 32 (it always
# checks replay), the Linux kernel allows at most 4096 (an ESN bitmap of 128 words).
MIN_REPLAY_WINDOW = 32
MAX_REPLAY_WINDOW = 4096
DEFAULT_REPLAY_WINDOW = 4096
CIPHERS = ("cbc(aes)",)
AUTHS = ("hmac(sha256)",)
TRANSPORTS = ("esp", "esp-in-udp")
ROLES = ("server", "client")
DIRECTIONS = ("client-to-server", "server-to-client")
_TOP_KEYS = {"cipher", "auth", "replay-window", "esn", "transport", "port", *DIRECTIONS}
_DIR_KEYS = {"spi", "enc-key", "auth-key"}
_DIR_OPTIONAL = {"seq"}
MIN_SPI = 0x100  # SPIs 1-255 are reserved by IANA (RFC 4303 section 2.1)


@dataclass(frozen=True)
class DirectionKeys:
    spi: int
    enc_key: bytes
    auth_key: bytes
    seq: int = 0  # the last sequence number already used (the first packet carries seq + 1)


@dataclass(frozen=True)
class ManualKeys:
    client_to_server: DirectionKeys
    server_to_client: DirectionKeys
    replay_window: int = DEFAULT_REPLAY_WINDOW
    esn: bool = False
    transport: str = "esp-in-udp"
    port: int = 4500
    cipher: str = "cbc(aes)"
    auth: str = "hmac(sha256)"

    def outbound(self, role: str) -> DirectionKeys:
        """The keys ``role`` ("server" or "client") sends with."""
        _check_role(role)
        return self.server_to_client if role == "server" else self.client_to_server

    def inbound(self, role: str) -> DirectionKeys:
        """The keys ``role`` receives with."""
        _check_role(role)
        return self.client_to_server if role == "server" else self.server_to_client

    def security_associations(self, role: str):
        """(outbound, inbound) ``simpletun._core.SecurityAssociation`` for the userspace data
        plane."""
        from simpletun._core import SecurityAssociation

        o, i = self.outbound(role), self.inbound(role)
        out = SecurityAssociation(o.spi, o.enc_key, o.auth_key, self.replay_window, self.esn)
        inn = SecurityAssociation(i.spi, i.enc_key, i.auth_key, self.replay_window, self.esn)
        if o.seq:
            out._skip_tx_seq_to(o.seq)
        if i.seq:
            inn._skip_rx_seq_to(i.seq)
        return out, inn

    def install(self, dp, peer: int, role: str) -> None:
        """Give ``peer`` of the userspace data plane ``dp`` (``simpletun._core.DataPlane``)
        this file's SAs for ``role``: the inbound one first, then the outbound one."""
        o, i = self.outbound(role), self.inbound(role)
        common = dict(esn=self.esn)
        dp.add_inbound_sa(
            peer, i.spi, i.enc_key, i.auth_key, replay_window=self.replay_window,
            rx_seq=i.seq, **common,
        )  # fmt: skip
        dp.set_outbound_sa(peer, o.spi, o.enc_key, o.auth_key, tx_seq=o.seq, **common)

    @property
    def cipher_name(self) -> str:
        """simpletun's name of the cipher suite, e.g. ``aes-256-cbc`` (``aes-128/256-cbc``
        when the directions' keys differ in size)."""
        bits = sorted({len(d.enc_key) * 8 for d in (self.client_to_server, self.server_to_client)})
        return f"aes-{'/'.join(map(str, bits))}-cbc"

    def describe(self) -> str:
        return f"ESP {self.cipher_name} (manual keys)"

    def xfrm_sas(self, role: str, local: str, remote: str, *, reqid: int = 0, if_id=None):
        """(outbound, inbound) :class:`simpletun.xfrm.SA` for the kernel data plane, between
        the tunnel endpoints ``local`` and ``remote``."""
        from simpletun import xfrm

        encap = xfrm.Encap(self.port, self.port) if self.transport == "esp-in-udp" else None
        o, i = self.outbound(role), self.inbound(role)
        common = dict(replay_window=self.replay_window, esn=self.esn, encap=encap, if_id=if_id)
        m = 0xFFFFFFFF
        return (
            xfrm.SA(
                local, remote, o.spi, o.enc_key, o.auth_key, reqid=reqid,
                oseq=o.seq & m, oseq_hi=o.seq >> 32, **common,
            ),
            xfrm.SA(
                remote, local, i.spi, i.enc_key, i.auth_key, reqid=reqid + 1,
                seq=i.seq & m, seq_hi=i.seq >> 32, **common,
            ),
        )  # fmt: skip

    def ip_xfrm_commands(self, role: str, local: str, remote: str, *, reqid: int = 0) -> list[str]:
        """The ``ip xfrm state add`` commands installing the same SAs as :meth:`xfrm_sas`
        (for documentation and debugging; the tests check that both send the same bytes)."""
        out = []
        for src, dst, k, r, kind in (
            (local, remote, self.outbound(role), reqid, "replay-oseq"),
            (remote, local, self.inbound(role), reqid + 1, "replay-seq"),
        ):
            preset = ""
            if k.seq >> 32:
                preset = f" {kind} {k.seq & 0xFFFFFFFF:#x} {kind}-hi {k.seq >> 32:#x}"
            elif k.seq:
                preset = f" {kind} {k.seq:#x}"
            cmd = (
                f"ip xfrm state add src {src} dst {dst} proto esp spi {k.spi:#010x}"
                f" reqid {r} mode tunnel"
                f" replay-window {self.replay_window}{preset}"
                + (" flag esn" if self.esn else "")
                + f" auth-trunc 'hmac(sha256)' 0x{k.auth_key.hex()} 128"
                f" enc 'cbc(aes)' 0x{k.enc_key.hex()}"
            )
            if self.transport == "esp-in-udp":
                cmd += f" encap espinudp {self.port} {self.port} 0.0.0.0"
            out.append(cmd)
        return out


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")


def _hex_key(where: str, value, lens: tuple[int, ...], what: str) -> bytes:
    want = " or ".join(str(n * 2) for n in lens)
    fix = f'write it as "0x" followed by {want} hex digits'
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {what} must be a quoted hex string; {fix}")
    text = value.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{where}: {what} is not hexadecimal; {fix}") from None
    if len(key) not in lens:
        raise ConfigError(f"{where}: {what} is {len(key)} bytes ({len(text)} hex digits); {fix}")
    return key


def _int(where: str, value, lo: int, hi: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} = {value!r} is out of range; {fix}")
    return value


def parse(text: str, path: str = "manual key file") -> ManualKeys:
    """Parse a manual key file's content; one ConfigError line for any problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"{path}: not a valid key file ({e}); see simpletun.manual_keys"
        ) from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting {unknown[0]!r}; use: {', '.join(sorted(_TOP_KEYS))}"
        )
    cipher = doc.get("cipher", "cbc(aes)")
    if cipher not in CIPHERS:
        raise ConfigError(f'{path}: cipher {cipher!r} is not supported; use "cbc(aes)"')
    auth = doc.get("auth", "hmac(sha256)")
    if auth not in AUTHS:
        raise ConfigError(
            f'{path}: auth {auth!r} is not supported; use "hmac(sha256)" (HMAC-SHA-256-128)'
        )
    window = _int(
        f"{path}: replay-window",
        doc.get("replay-window", DEFAULT_REPLAY_WINDOW),
        MIN_REPLAY_WINDOW,
        MAX_REPLAY_WINDOW,
        f"use {MIN_REPLAY_WINDOW} to {MAX_REPLAY_WINDOW} packets",
    )
    esn = doc.get("esn", False)
    if not isinstance(esn, bool):
        raise ConfigError(f"{path}: esn must be true or false")
    transport = doc.get("transport", "esp-in-udp")
    if transport not in TRANSPORTS:
        raise ConfigError(f'{path}: transport {transport!r}: use "esp" or "esp-in-udp"')
    if "port" in doc and transport != "esp-in-udp":
        raise ConfigError(f'{path}: port is only for transport = "esp-in-udp"; remove it')
    port = _int(f"{path}: port", doc.get("port", 4500), 1, 65535, "use 1 to 65535 (4500)")
    dirs = []
    for d in DIRECTIONS:
        sec = doc.get(d)
        if not isinstance(sec, dict):
            raise ConfigError(f"{path}: missing section [{d}] (spi, enc-key, auth-key)")
        unknown = sorted(set(sec) - _DIR_KEYS - _DIR_OPTIONAL)
        if unknown:
            raise ConfigError(
                f"{path}: [{d}] unknown setting {unknown[0]!r}; use: spi, enc-key, auth-key, seq"
            )
        for k in sorted(_DIR_KEYS):
            if k not in sec:
                raise ConfigError(f"{path}: [{d}] has no {k}")
        spi = _int(
            f"{path}: [{d}] spi",
            sec["spi"],
            MIN_SPI,
            0xFFFFFFFF,
            "use 0x100 to 0xffffffff (e.g. spi = 0x01000000)",
        )
        enc = _hex_key(f"{path}: [{d}]", sec["enc-key"], ENC_KEY_LENS, "enc-key (AES)")
        ak = _hex_key(f"{path}: [{d}]", sec["auth-key"], (AUTH_KEY_LEN,), "auth-key (HMAC-SHA-256)")
        limit = 2**64 - 2 if esn else 2**32 - 2
        seq = _int(
            f"{path}: [{d}] seq",
            sec.get("seq", 0),
            0,
            limit,
            f"use 0 to {limit:#x}" + ("" if esn else " (beyond 2^32 needs esn = true)"),
        )
        dirs.append(DirectionKeys(spi, enc, ak, seq))
    if dirs[0].spi == dirs[1].spi:
        raise ConfigError(f"{path}: both directions use SPI {dirs[0].spi:#x}; give each its own")
    if dirs[0].enc_key == dirs[1].enc_key or dirs[0].auth_key == dirs[1].auth_key:
        raise ConfigError(
            f"{path}: both directions use the same key; each direction needs its own keys "
            "(make a fresh file with simpletun.manual_keys.generate)"
        )
    return ManualKeys(dirs[0], dirs[1], window, esn, transport, port, cipher, auth)


def generate(
    *,
    key_bits: int = 256,
    replay_window: int = DEFAULT_REPLAY_WINDOW,
    esn: bool = False,
    transport: str = "esp-in-udp",
    port: int = 4500,
    spi_base: int = 0x01000000,
    seq: int = 0,
) -> str:
    """A new manual key file's content with random keys."""
    if key_bits not in (128, 192, 256):
        raise ConfigError(f"AES key size {key_bits}: use 128, 192 or 256")
    lines = [
        "# simpletun manual keys: copy this file to both ends (mode 0600)",
        'cipher = "cbc(aes)"',
        'auth = "hmac(sha256)"',
        f"replay-window = {replay_window}",
        f"esn = {'true' if esn else 'false'}",
        f'transport = "{transport}"',
    ]
    if transport == "esp-in-udp":
        lines.append(f"port = {port}")
    for i, d in enumerate(DIRECTIONS):
        lines += [
            "",
            f"[{d}]",
            f"spi = {spi_base + i:#010x}",
            f'enc-key = "0x{secrets.token_hex(key_bits // 8)}"',
            f'auth-key = "0x{secrets.token_hex(AUTH_KEY_LEN)}"',
        ]
        if seq:
            lines.append(f"seq = {seq:#x}")
    text = "\n".join(lines) + "\n"
    parse(text, "generated key file")  # the generator never writes what the parser refuses
    return text


def load(path: str) -> ManualKeys:
    """Read and check a manual key file: a regular file accessible by its owner only."""
    from simpletun.keys import read_secret_file

    data = read_secret_file(path, f"--manual-keys {path}", limit=65536)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--manual-keys {path}: not a text file") from None
    return parse(text, f"--manual-keys {path}")
