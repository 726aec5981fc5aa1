"""The Linux kernel's ESP (xfrm), configured over XFRM netlink with pyroute2's machinery.

pyroute2 has no XFRM SA/policy API of its own, so the messages are defined here as ``nlmsg`` /
``nla`` classes mirroring ``include/uapi/linux/xfrm.h`` (x86_64 layouts: every C hole and tail
padding is an explicit pad field, because pyroute2 packs fields back to back).

What simpletun needs: add/update/delete/get/dump SAs (AES-CBC 128/192/256 + HMAC-SHA-256-128,
anti-replay windows up to 4096 and ESN, ESP-in-UDP, tunnel mode, optional if_id), add/delete/dump
policies with templates, xfrm interfaces, and SA counters under simpletun's own counter names.
Every call takes ``netns`` (a name under /var/run/netns, or None for the caller's namespace).

All functions block (netlink round trips); call them from a worker thread under trio.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink import nla as _nla
from pyroute2.netlink import nlmsg as _nlmsg

from simpletun._errors import ConfigError, SimpletunError
from simpletun.manual_keys import AUTH_KEY_LEN, ENC_KEY_LENS, MAX_REPLAY_WINDOW

NETLINK_XFRM = 6

# Message types (XFRM_MSG_*).
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D

# SA flags (xfrm_usersa_info.flags).
XFRM_STATE_ESN = 128
# Modes.
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
# Policy directions and actions.
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
DIRECTIONS = {"in": XFRM_POLICY_IN, "out": XFRM_POLICY_OUT, "fwd": XFRM_POLICY_FWD}

UDP_ENCAP_ESPINUDP = 2
XFRM_INF = 0xFFFF_FFFF_FFFF_FFFF
IPPROTO_ESP = 50

#: HMAC-SHA-256-128 (RFC 4868): the only integrity algorithm simpletun speaks.
AUTH_ALG = "hmac(sha256)"
AUTH_ICV_BITS = 128
ENC_ALG = "cbc(aes)"

# --------------------------------------------------------------------------------------------
# Structures (field lists; names are prefixed where structs nest).


def _selector(p: str = "sel_") -> list[tuple[str, str]]:
    return [
        (p + "daddr", "16s"),
        (p + "saddr", "16s"),
        (p + "dport", ">H"),
        (p + "dport_mask", ">H"),
        (p + "sport", ">H"),
        (p + "sport_mask", ">H"),
        (p + "family", "H"),
        (p + "prefixlen_d", "B"),
        (p + "prefixlen_s", "B"),
        (p + "proto", "B"),
        (p + "__pad", "3x"),
        (p + "ifindex", "i"),
        (p + "user", "I"),
    ]


def _id(p: str = "id_") -> list[tuple[str, str]]:
    return [(p + "daddr", "16s"), (p + "spi", ">I"), (p + "proto", "B"), (p + "__pad", "3x")]


_LFT_CFG = [
    ("lft_soft_byte_limit", "Q"),
    ("lft_hard_byte_limit", "Q"),
    ("lft_soft_packet_limit", "Q"),
    ("lft_hard_packet_limit", "Q"),
    ("lft_soft_add_expires_seconds", "Q"),
    ("lft_hard_add_expires_seconds", "Q"),
    ("lft_soft_use_expires_seconds", "Q"),
    ("lft_hard_use_expires_seconds", "Q"),
]
_LFT_CUR = [
    ("curlft_bytes", "Q"),
    ("curlft_packets", "Q"),
    ("curlft_add_time", "Q"),
    ("curlft_use_time", "Q"),
]
_STATS = [("stats_replay_window", "I"), ("stats_replay", "I"), ("stats_integrity_failed", "I")]

_USERSA_INFO = (
    _selector()
    + _id()
    + [("saddr", "16s")]
    + _LFT_CFG
    + _LFT_CUR
    + _STATS
    + [
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
        ("__pad", "7x"),
    ]
)
_USERSA_ID = [
    ("daddr", "16s"),
    ("spi", ">I"),
    ("family", "H"),
    ("proto", "B"),
    ("__pad", "x"),
]
_USERPOLICY_INFO = (
    _selector()
    + _LFT_CFG
    + _LFT_CUR
    + [
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad", "4x"),
    ]
)
_USERPOLICY_ID = _selector() + [("index", "I"), ("dir", "B"), ("__pad", "3x")]
_USER_TMPL = _id() + [
    ("family", "H"),
    ("__pad1", "2x"),
    ("saddr", "16s"),
    ("reqid", "I"),
    ("mode", "B"),
    ("share", "B"),
    ("optional", "B"),
    ("__pad2", "x"),
    ("aalgos", "I"),
    ("ealgos", "I"),
    ("calgos", "I"),
]


def _fixed_size(fields) -> int:
    """Bytes of a field list packed back to back (as pyroute2 does)."""
    return sum(struct.calcsize(f) for _, f in fields)


def _defaults(fields) -> dict:
    return {n: b"" for n, f in fields if f.endswith("s")}


def _rest_of_attr(self) -> bytes:
    """The attribute's payload after its fixed fields (keys, bitmaps, template arrays)."""
    fixed = _fixed_size(self.fields)
    start = self.offset + 4 + fixed
    return bytes(self.data[start : self.offset + self.length])


class _algo_base(_nla):
    """A fixed part followed by ``key`` bytes (xfrm_algo, xfrm_algo_auth)."""

    def encode(self):
        key = self.get("key", b"")
        super().encode()
        # pyroute2 has written header + fixed part (4-aligned); put the key right after the
        # fixed part and fix up the length.
        fixed = _fixed_size(self.fields)
        del self.data[self.offset + 4 + fixed :]
        self.data.extend(key)
        self.length = 4 + fixed + len(key)
        struct.pack_into("H", self.data, self.offset, self.length)
        pad = (-self.length) % 4
        self.data.extend(b"\0" * pad)

    def decode(self):
        super().decode()
        self["key"] = _rest_of_attr(self)


class xfrm_algo(_algo_base):
    fields = [("alg_name", "64s"), ("alg_key_len", "I")]
    defaults = {"alg_name": b""}


class xfrm_algo_auth(_algo_base):
    fields = [("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I")]
    defaults = {"alg_name": b""}


class xfrm_replay_state_esn(_algo_base):
    fields = [
        ("bmp_len", "I"),
        ("oseq", "I"),
        ("seq", "I"),
        ("oseq_hi", "I"),
        ("seq_hi", "I"),
        ("replay_window", "I"),
    ]
    defaults = {}

    def decode(self):
        _nla.decode(self)
        self["key"] = b""
        self["bmp"] = _rest_of_attr(self)


class xfrm_encap_tmpl(_nla):
    fields = [
        ("encap_type", "H"),
        ("encap_sport", ">H"),
        ("encap_dport", ">H"),
        ("__pad", "2x"),
        ("encap_oa", "16s"),
    ]
    defaults = {"encap_oa": b""}


class xfrm_tmpls(_nla):
    """XFRMA_TMPL: N ``xfrm_user_tmpl`` back to back, no per-item header."""

    fields = []

    def encode(self):
        blob = b"".join(_pack_tmpl(t) for t in self.get("templates", []))
        self["value"] = blob
        self.fields = [("value", "s")]
        super().encode()

    def decode(self):
        _nla.decode(self)
        blob = bytes(self.data[self.offset + 4 : self.offset + self.length])
        size = _fixed_size(_USER_TMPL)
        self["templates"] = [_unpack_tmpl(blob[i : i + size]) for i in range(0, len(blob), size)]


def _pack_tmpl(t: dict) -> bytes:
    out = b""
    for n, f in _USER_TMPL:
        if f.endswith("x"):
            out += struct.pack(f)
        else:
            out += struct.pack(f, t.get(n, b"" if f.endswith("s") else 0))
    return out


def _unpack_tmpl(b: bytes) -> dict:
    out, off = {}, 0
    for n, f in _USER_TMPL:
        if not f.endswith("x"):
            (out[n],) = struct.unpack_from(f, b, off)
        off += struct.calcsize(f)
    return out


class _addr_nla(_nla):
    fields = [("value", "16s")]
    defaults = {"value": b""}


class _u32_nla(_nla):
    fields = [("value", "I")]


class _mark_nla(_nla):
    fields = [("v", "I"), ("m", "I")]


class _lft_cur_nla(_nla):
    fields = _LFT_CUR


class _replay_nla(_nla):
    fields = [("oseq", "I"), ("seq", "I"), ("bitmap", "I")]


class _policy_type_nla(_nla):
    fields = [("type", "B"), ("__pad1", "x"), ("__pad2", "H")]


_SA_NLAS = (
    (0, "XFRMA_UNSPEC", "none"),
    (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
    (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
    (3, "XFRMA_ALG_COMP", "hex"),
    (4, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
    (5, "XFRMA_TMPL", "xfrm_tmpls"),
    (6, "XFRMA_SA", "hex"),
    (7, "XFRMA_POLICY", "hex"),
    (8, "XFRMA_SEC_CTX", "hex"),
    (9, "XFRMA_LTIME_VAL", "_lft_cur_nla"),
    (10, "XFRMA_REPLAY_VAL", "_replay_nla"),
    (11, "XFRMA_REPLAY_THRESH", "_u32_nla"),
    (12, "XFRMA_ETIMER_THRESH", "_u32_nla"),
    (13, "XFRMA_SRCADDR", "_addr_nla"),
    (14, "XFRMA_COADDR", "_addr_nla"),
    (15, "XFRMA_LASTUSED", "uint64"),
    (16, "XFRMA_POLICY_TYPE", "_policy_type_nla"),
    (17, "XFRMA_MIGRATE", "hex"),
    (18, "XFRMA_ALG_AEAD", "hex"),
    (19, "XFRMA_KMADDRESS", "hex"),
    (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
    (21, "XFRMA_MARK", "_mark_nla"),
    (22, "XFRMA_TFCPAD", "_u32_nla"),
    (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
    (24, "XFRMA_SA_EXTRA_FLAGS", "_u32_nla"),
    (25, "XFRMA_PROTO", "uint8"),
    (26, "XFRMA_ADDRESS_FILTER", "hex"),
    (27, "XFRMA_PAD", "hex"),
    (28, "XFRMA_OFFLOAD_DEV", "hex"),
    (29, "XFRMA_SET_MARK", "_u32_nla"),
    (30, "XFRMA_SET_MARK_MASK", "_u32_nla"),
    (31, "XFRMA_IF_ID", "_u32_nla"),
    (32, "XFRMA_MTIMER_THRESH", "_u32_nla"),
)


class _xfrm_msg(_nlmsg):
    nla_map = _SA_NLAS
    xfrm_algo = xfrm_algo
    xfrm_algo_auth = xfrm_algo_auth
    xfrm_replay_state_esn = xfrm_replay_state_esn
    xfrm_encap_tmpl = xfrm_encap_tmpl
    xfrm_tmpls = xfrm_tmpls
    _addr_nla = _addr_nla
    _u32_nla = _u32_nla
    _mark_nla = _mark_nla
    _lft_cur_nla = _lft_cur_nla
    _replay_nla = _replay_nla
    _policy_type_nla = _policy_type_nla


class xfrm_usersa_info(_xfrm_msg):
    fields = _USERSA_INFO
    defaults = _defaults(_USERSA_INFO)


class xfrm_usersa_id(_xfrm_msg):
    fields = _USERSA_ID
    defaults = _defaults(_USERSA_ID)


class xfrm_userpolicy_info(_xfrm_msg):
    fields = _USERPOLICY_INFO
    defaults = _defaults(_USERPOLICY_INFO)


class xfrm_userpolicy_id(_xfrm_msg):
    fields = _USERPOLICY_ID
    defaults = _defaults(_USERPOLICY_ID)


class xfrm_usersa_flush(_xfrm_msg):
    fields = [("proto", "B"), ("__pad", "3x")]


# --------------------------------------------------------------------------------------------
# Errors.


class XfrmError(SimpletunError):
    """The kernel refused an XFRM request. ``code`` is the errno, ``detail`` the extack text."""

    def __init__(self, message: str, code: int = 0, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class KernelEspMissing(ConfigError):
    """The running kernel has no ESP (CONFIG_INET_ESP / CONFIG_INET6_ESP unset or not loaded)."""


def esp_missing_message(family: int) -> str:
    option = "CONFIG_INET6_ESP" if family == socket.AF_INET6 else "CONFIG_INET_ESP"
    module = "esp6" if family == socket.AF_INET6 else "esp4"
    return (
        f"kernel ESP: this kernel has no {'IPv6' if module == 'esp6' else 'IPv4'} ESP "
        f"({option} is not set and module {module} is not available); "
        "use --dataplane userspace, which works on any kernel"
    )


# --------------------------------------------------------------------------------------------
# The user-facing description of SAs and policies.


def _addr(s) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(s)


def _family(a) -> int:
    return socket.AF_INET6 if a.version == 6 else socket.AF_INET


def _unpack_addr(b: bytes, family: int):
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(b[:16])
    return ipaddress.IPv4Address(b[:4])


@dataclass(frozen=True)
class Selector:
    """Traffic a policy (or an SA) applies to. ``proto`` 0 means any; ports 0 mean any."""

    src: ipaddress.IPv4Network | ipaddress.IPv6Network
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    proto: int = 0
    sport: int = 0
    dport: int = 0
    ifindex: int = 0

    @classmethod
    def of(cls, src, dst, **kw) -> Selector:
        return cls(ipaddress.ip_network(src), ipaddress.ip_network(dst), **kw)

    @property
    def family(self) -> int:
        return _family(self.src)

    def __str__(self) -> str:
        s = f"{self.src} -> {self.dst}"
        if self.proto:
            s += f" proto {self.proto}"
        if self.dport:
            s += f" dport {self.dport}"
        return s


@dataclass(frozen=True)
class Encap:
    """ESP-in-UDP (RFC 3948) ports of an SA."""

    sport: int = 4500
    dport: int = 4500
    oa: str | None = None  # NAT original address; None: unset (zeros)
    type: int = UDP_ENCAP_ESPINUDP


@dataclass(frozen=True)
class SA:
    """One ESP security association, tunnel mode, AES-CBC + HMAC-SHA-256-128.

    ``replay_window`` 0 means no anti-replay (the kernel's default); windows above 32 and ESN
    are sent as XFRMA_REPLAY_ESN_VAL. ``seq``/``seq_hi`` preset the inbound replay state and
    ``oseq``/``oseq_hi`` the outbound counter (tests crossing 2^32 use them).
    """

    src: str
    dst: str
    spi: int
    enc_key: bytes
    auth_key: bytes
    reqid: int = 0
    mode: int = XFRM_MODE_TUNNEL
    replay_window: int = 0
    esn: bool = False
    encap: Encap | None = None
    if_id: int | None = None
    selector: Selector | None = None
    seq: int = 0
    seq_hi: int = 0
    oseq: int = 0
    oseq_hi: int = 0
    flags: int = 0

    def __post_init__(self) -> None:
        src, dst = _addr(self.src), _addr(self.dst)
        if src.version != dst.version:
            raise ConfigError(f"SA {self.spi:#x}: src {src} and dst {dst} are different families")
        if not 0 < self.spi <= 0xFFFFFFFF or self.spi < 256:
            raise ConfigError(f"SA SPI {self.spi:#x} is out of range; use 0x100 to 0xffffffff")
        if len(self.enc_key) not in ENC_KEY_LENS:
            raise ConfigError(
                f"SA {self.spi:#x}: AES key is {len(self.enc_key)} bytes; use 16, 24 or 32"
            )
        if len(self.auth_key) != AUTH_KEY_LEN:
            raise ConfigError(
                f"SA {self.spi:#x}: HMAC-SHA-256 key is {len(self.auth_key)} bytes; use 32"
            )
        if not 0 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise ConfigError(
                f"SA {self.spi:#x}: replay window {self.replay_window} is out of range; "
                f"use 0 to {MAX_REPLAY_WINDOW}"
            )
        if self.esn and self.replay_window == 0:
            raise ConfigError(f"SA {self.spi:#x}: ESN needs a replay window; use 1 or more")

    @property
    def family(self) -> int:
        return _family(_addr(self.dst))

    @property
    def uses_esn_attr(self) -> bool:
        return self.esn or self.replay_window > 32 or bool(self.seq_hi or self.oseq_hi)


def _fill_selector(msg, sel: Selector | None, p: str = "sel_") -> None:
    """Write ``sel`` into the message's selector fields; None leaves an all-zero selector
    (family 0: what iproute2 sends for an SA without ``sel``)."""
    if sel is None:
        msg[p + "family"] = 0
        return
    msg[p + "daddr"] = sel.dst.network_address.packed
    msg[p + "saddr"] = sel.src.network_address.packed
    msg[p + "prefixlen_d"] = sel.dst.prefixlen
    msg[p + "prefixlen_s"] = sel.src.prefixlen
    msg[p + "family"] = sel.family
    msg[p + "proto"] = sel.proto
    if sel.dport:
        msg[p + "dport"], msg[p + "dport_mask"] = sel.dport, 0xFFFF
    if sel.sport:
        msg[p + "sport"], msg[p + "sport_mask"] = sel.sport, 0xFFFF
    msg[p + "ifindex"] = sel.ifindex


def _inf_lifetime(msg) -> None:
    for n in ("byte", "packet"):
        msg[f"lft_soft_{n}_limit"] = XFRM_INF
        msg[f"lft_hard_{n}_limit"] = XFRM_INF


def build_newsa(sa: SA) -> xfrm_usersa_info:
    """The XFRM_MSG_NEWSA/UPDSA body for ``sa``, in the attribute order iproute2 uses."""
    src, dst = _addr(sa.src), _addr(sa.dst)
    msg = xfrm_usersa_info()
    _fill_selector(msg, sa.selector)
    msg["id_daddr"] = dst.packed
    msg["id_spi"] = sa.spi
    msg["id_proto"] = IPPROTO_ESP
    msg["saddr"] = src.packed
    _inf_lifetime(msg)
    msg["reqid"] = sa.reqid
    msg["family"] = sa.family
    msg["mode"] = sa.mode
    flags = sa.flags | (XFRM_STATE_ESN if sa.esn else 0)
    msg["flags"] = flags
    msg["replay_window"] = 0 if sa.uses_esn_attr else sa.replay_window
    attrs = []
    attrs.append(
        (
            "XFRMA_ALG_AUTH_TRUNC",
            {
                "alg_name": AUTH_ALG.encode(),
                "alg_key_len": len(sa.auth_key) * 8,
                "alg_trunc_len": AUTH_ICV_BITS,
                "key": sa.auth_key,
            },
        )
    )
    attrs.append(
        (
            "XFRMA_ALG_CRYPT",
            {"alg_name": ENC_ALG.encode(), "alg_key_len": len(sa.enc_key) * 8, "key": sa.enc_key},
        )
    )
    if sa.encap is not None:
        attrs.append(
            (
                "XFRMA_ENCAP",
                {
                    "encap_type": sa.encap.type,
                    "encap_sport": sa.encap.sport,
                    "encap_dport": sa.encap.dport,
                    "encap_oa": _addr(sa.encap.oa).packed if sa.encap.oa else b"",
                },
            )
        )
    if sa.if_id is not None:
        attrs.append(("XFRMA_IF_ID", sa.if_id))
    if sa.uses_esn_attr:
        attrs.append(
            (
                "XFRMA_REPLAY_ESN_VAL",
                {
                    # iproute2 sends the bitmap length for the window, without the bitmap.
                    "bmp_len": (sa.replay_window + 31) // 32,
                    "oseq": sa.oseq,
                    "seq": sa.seq,
                    "oseq_hi": sa.oseq_hi,
                    "seq_hi": sa.seq_hi,
                    "replay_window": sa.replay_window,
                    "key": b"",
                },
            )
        )
    msg["attrs"] = attrs
    return msg


def build_sa_id(dst: str, spi: int, src: str | None = None) -> xfrm_usersa_id:
    """XFRM_MSG_DELSA/GETSA body (with XFRMA_SRCADDR when ``src`` is given, as iproute2)."""
    d = _addr(dst)
    msg = xfrm_usersa_id()
    msg["daddr"] = d.packed
    msg["spi"] = spi
    msg["family"] = _family(d)
    msg["proto"] = IPPROTO_ESP
    msg["attrs"] = [("XFRMA_SRCADDR", _addr(src).packed)] if src is not None else []
    return msg


@dataclass(frozen=True)
class Template:
    """What a policy demands: an ESP SA between ``src`` and ``dst`` (tunnel endpoints)."""

    src: str
    dst: str
    reqid: int = 0
    mode: int = XFRM_MODE_TUNNEL
    spi: int = 0


@dataclass(frozen=True)
class Policy:
    selector: Selector
    dir: str  # "in", "out" or "fwd"
    templates: tuple[Template, ...] = ()
    priority: int = 0
    index: int = 0
    action: int = XFRM_POLICY_ALLOW
    if_id: int | None = None

    def __post_init__(self) -> None:
        if self.dir not in DIRECTIONS:
            raise ConfigError(f"policy direction {self.dir!r}: use in, out or fwd")


def build_newpolicy(pol: Policy) -> xfrm_userpolicy_info:
    msg = xfrm_userpolicy_info()
    _fill_selector(msg, pol.selector)
    _inf_lifetime(msg)
    msg["priority"] = pol.priority
    msg["index"] = pol.index
    msg["dir"] = DIRECTIONS[pol.dir]
    msg["action"] = pol.action
    attrs = []
    if pol.templates:
        tmpls = []
        for t in pol.templates:
            s, d = _addr(t.src), _addr(t.dst)
            tmpls.append(
                {
                    "id_daddr": d.packed,
                    "id_spi": t.spi,
                    "id_proto": IPPROTO_ESP,
                    "family": _family(d),
                    "saddr": s.packed,
                    "reqid": t.reqid,
                    "mode": t.mode,
                    "aalgos": 0xFFFFFFFF,
                    "ealgos": 0xFFFFFFFF,
                    "calgos": 0xFFFFFFFF,
                }
            )
        attrs.append(("XFRMA_TMPL", {"templates": tmpls}))
    if pol.if_id is not None:
        attrs.append(("XFRMA_IF_ID", pol.if_id))
    msg["attrs"] = attrs
    return msg


def build_policy_id(selector: Selector, dir: str, if_id: int | None = None) -> xfrm_userpolicy_id:
    """A policy's id; a policy bound to an xfrm interface is only found with its ``if_id``
    (the kernel matches it too, as ``ip xfrm policy delete ... if_id N`` sends it)."""
    msg = xfrm_userpolicy_id()
    _fill_selector(msg, selector)
    msg["dir"] = DIRECTIONS[dir]
    msg["attrs"] = [] if if_id is None else [("XFRMA_IF_ID", if_id)]
    return msg


def encode(msg, msg_type: int, flags: int, seq: int = 0, pid: int = 0) -> bytes:
    """The whole netlink message (header included) as the socket would send it."""
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.reset()
    msg.encode()
    return bytes(msg.data)


#: Netlink flags of each operation, as iproute2 sends them.
FLAGS_ADD = NLM_F_REQUEST | NLM_F_ACK  # NEWSA/NEWPOLICY are exclusive by type
FLAGS_UPDATE = NLM_F_REQUEST | NLM_F_ACK
FLAGS_REQ = NLM_F_REQUEST | NLM_F_ACK
FLAGS_GET = NLM_F_REQUEST
FLAGS_DUMP = NLM_F_REQUEST | NLM_F_DUMP

_MSG_CLASSES = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_GETSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
}


def decode(data: bytes):
    """Decode one whole netlink message produced by :func:`encode` or the kernel."""
    msg_type = struct.unpack_from("H", data, 4)[0]
    cls = _MSG_CLASSES.get(msg_type, _nlmsg)
    msg = cls(bytes(data))
    msg.decode()
    return msg


# --------------------------------------------------------------------------------------------
# The socket.


def netlink_fd_in(netns: str, proto: int) -> int:
    """A netlink socket of ``proto`` created inside namespace ``netns`` (/run/netns/NAME).

    Created in a short-lived thread that joins the namespace (setns), so neither the caller's
    namespace nor the process is touched (pyroute2's own ``netns=`` forks a child instead).
    Returns the descriptor, to be handed to pyroute2 as ``fileno``.
    """
    import ctypes
    import threading

    box: dict = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["fd"] = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, proto).detach()
        except OSError as e:
            box["error"] = e

    t = threading.Thread(target=target, name=f"xfrm-netns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        e = box["error"]
        raise ConfigError(f"network namespace {netns}: {e.strerror or e}") from None
    return box["fd"]


def _socket(netns: str | None):
    from pyroute2.netlink.marshal import Marshal
    from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkSocket

    class _XfrmMarshal(Marshal):
        msg_map = dict(_MSG_CLASSES)

    class _AsyncXfrm(AsyncNetlinkSocket):
        marshal_class = _XfrmMarshal

    class _Xfrm(NetlinkSocket):
        async_class = _AsyncXfrm

    kw = {"fileno": netlink_fd_in(netns, NETLINK_XFRM)} if netns else {}
    return _Xfrm(family=NETLINK_XFRM, ext_ack=True, **kw)


def _request(msg, msg_type: int, flags: int, netns: str | None, what: str) -> list:
    from pyroute2 import NetlinkError

    try:
        with _socket(netns) as s:
            return list(s.nlm_request(msg, msg_type=msg_type, msg_flags=flags))
    except NetlinkError as e:
        detail = str(e.args[1]) if len(e.args) > 1 and e.args[1] else ""
        raise XfrmError(
            f"{what}: {os.strerror(e.code)}" + (f" ({detail})" if detail else ""),
            e.code,
            detail,
        ) from None


def _is_data(m) -> bool:
    return m["header"]["type"] in _MSG_CLASSES


def add_sa(sa: SA, *, netns: str | None = None, update: bool = False) -> None:
    """Install ``sa``. KernelEspMissing when the kernel has no ESP."""
    msg = build_newsa(sa)
    what = f"{'update' if update else 'add'} SA {sa.spi:#010x} {sa.src} -> {sa.dst}"
    try:
        if update:
            _request(msg, XFRM_MSG_UPDSA, FLAGS_UPDATE, netns, what)
        else:
            _request(msg, XFRM_MSG_NEWSA, FLAGS_ADD, netns, what)
    except XfrmError as e:
        if e.code == errno.EPROTONOSUPPORT:
            raise KernelEspMissing(esp_missing_message(sa.family)) from None
        raise


def update_sa(sa: SA, *, netns: str | None = None) -> None:
    add_sa(sa, netns=netns, update=True)


def delete_sa(dst: str, spi: int, src: str | None = None, *, netns: str | None = None) -> None:
    _request(build_sa_id(dst, spi, src), XFRM_MSG_DELSA, FLAGS_REQ, netns, f"delete SA {spi:#x}")


@dataclass
class SAState:
    """An SA as the kernel reports it (keys included), with its counters."""

    src: str
    dst: str
    spi: int
    reqid: int
    mode: int
    family: int
    flags: int
    replay_window: int
    enc_alg: str = ""
    enc_key: bytes = b""
    auth_alg: str = ""
    auth_key: bytes = b""
    icv_bits: int = 0
    encap: Encap | None = None
    if_id: int | None = None
    esn: dict | None = None
    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0
    replay: int = 0
    replay_window_drops: int = 0
    integrity_failed: int = 0
    attrs: dict = field(default_factory=dict)

    def sequence(self, direction: str) -> int:
        """``out``: the last sequence number sent; ``in``: the highest received (64-bit with
        ESN; from ``XFRMA_REPLAY_ESN_VAL``, 0 when the kernel did not report it)."""
        if direction not in ("in", "out"):
            raise ValueError("direction must be 'in' or 'out'")
        if not self.esn:
            return 0
        key = "oseq" if direction == "out" else "seq"
        return (self.esn[key + "_hi"] << 32) | self.esn[key]

    def counters(self, direction: str) -> dict[str, int]:
        """The kernel's counters under simpletun's names (``SecurityAssociation.stats`` keys).

        An SA is one direction: ``in`` (the kernel decapsulates) or ``out`` (it encapsulates).
        Replayed and out-of-window packets are both ``drop_replay``, as in simpletun.
        """
        if direction not in ("in", "out"):
            raise ValueError("direction must be 'in' or 'out'")
        pre = "decap" if direction == "in" else "encap"
        return {
            f"{pre}_packets": self.packets,
            f"{pre}_bytes": self.bytes,
            "drop_replay": self.replay + self.replay_window_drops,
            "drop_auth": self.integrity_failed,
        }


def _name(b) -> str:
    return bytes(b).split(b"\0", 1)[0].decode("ascii", "replace")


def parse_sa(m) -> SAState:
    fam = m["family"]
    st = SAState(
        src=str(_unpack_addr(m["saddr"], fam)),
        dst=str(_unpack_addr(m["id_daddr"], fam)),
        spi=m["id_spi"],
        reqid=m["reqid"],
        mode=m["mode"],
        family=fam,
        flags=m["flags"],
        replay_window=m["replay_window"],
        bytes=m["curlft_bytes"],
        packets=m["curlft_packets"],
        add_time=m["curlft_add_time"],
        use_time=m["curlft_use_time"],
        replay=m["stats_replay"],
        replay_window_drops=m["stats_replay_window"],
        integrity_failed=m["stats_integrity_failed"],
    )
    for name, value in m.get("attrs", []):
        st.attrs[name] = value
        if name == "XFRMA_ALG_CRYPT":
            st.enc_alg, st.enc_key = _name(value["alg_name"]), value["key"]
        elif name in ("XFRMA_ALG_AUTH_TRUNC", "XFRMA_ALG_AUTH"):
            st.auth_alg, st.auth_key = _name(value["alg_name"]), value["key"]
            st.icv_bits = value.get("alg_trunc_len", 96)
        elif name == "XFRMA_ENCAP":
            st.encap = Encap(
                value["encap_sport"],
                value["encap_dport"],
                str(_unpack_addr(value["encap_oa"], fam)) if any(value["encap_oa"]) else None,
                value["encap_type"],
            )
        elif name == "XFRMA_IF_ID":
            st.if_id = value
        elif name == "XFRMA_REPLAY_ESN_VAL":
            st.esn = {k: value[k] for k in ("oseq", "seq", "oseq_hi", "seq_hi", "replay_window")}
            st.replay_window = value["replay_window"]
    return st


def get_sa(dst: str, spi: int, src: str | None = None, *, netns: str | None = None) -> SAState:
    replies = _request(
        build_sa_id(dst, spi, src), XFRM_MSG_GETSA, FLAGS_GET, netns, f"get SA {spi:#x}"
    )
    for m in replies:
        if _is_data(m):
            return parse_sa(m)
    raise XfrmError(f"get SA {spi:#x}: no reply", errno.ENOENT)


def dump_sas(*, netns: str | None = None) -> list[SAState]:
    msg = xfrm_usersa_info()
    msg["attrs"] = []
    replies = _request(msg, XFRM_MSG_GETSA, FLAGS_DUMP, netns, "dump SAs")
    return [parse_sa(m) for m in replies if _is_data(m)]


def flush_sas(*, netns: str | None = None) -> None:
    msg = xfrm_usersa_flush()
    msg["proto"] = IPPROTO_ESP
    _request(msg, XFRM_MSG_FLUSHSA, FLAGS_REQ, netns, "flush SAs")


def add_policy(pol: Policy, *, netns: str | None = None, update: bool = False) -> None:
    t = XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY
    _request(build_newpolicy(pol), t, FLAGS_REQ, netns, f"add policy {pol.dir} {pol.selector}")


def delete_policy(
    selector: Selector, dir: str, *, if_id: int | None = None, netns: str | None = None
) -> None:
    _request(
        build_policy_id(selector, dir, if_id), XFRM_MSG_DELPOLICY, FLAGS_REQ, netns, "delete policy"
    )


@dataclass
class PolicyState:
    selector: Selector
    dir: str
    index: int
    priority: int
    action: int
    templates: list[Template]
    if_id: int | None = None


def parse_policy(m) -> PolicyState:
    fam = m["sel_family"]
    sel = Selector(
        ipaddress.ip_network(
            (str(_unpack_addr(m["sel_saddr"], fam)), m["sel_prefixlen_s"]), strict=False
        ),
        ipaddress.ip_network(
            (str(_unpack_addr(m["sel_daddr"], fam)), m["sel_prefixlen_d"]), strict=False
        ),
        proto=m["sel_proto"],
        sport=m["sel_sport"],
        dport=m["sel_dport"],
        ifindex=m["sel_ifindex"],
    )
    dirs = {v: k for k, v in DIRECTIONS.items()}
    tmpls, if_id = [], None
    for name, value in m.get("attrs", []):
        if name == "XFRMA_TMPL":
            for t in value["templates"]:
                tmpls.append(
                    Template(
                        str(_unpack_addr(t["saddr"], t["family"])),
                        str(_unpack_addr(t["id_daddr"], t["family"])),
                        t["reqid"],
                        t["mode"],
                        t["id_spi"],
                    )
                )
        elif name == "XFRMA_IF_ID":
            if_id = value
    return PolicyState(
        sel, dirs.get(m["dir"], str(m["dir"])), m["index"], m["priority"], m["action"], tmpls, if_id
    )


def dump_policies(*, netns: str | None = None) -> list[PolicyState]:
    msg = xfrm_userpolicy_info()
    msg["attrs"] = []
    replies = _request(msg, XFRM_MSG_GETPOLICY, FLAGS_DUMP, netns, "dump policies")
    return [parse_policy(m) for m in replies if _is_data(m)]


def flush_policies(*, netns: str | None = None) -> None:
    msg = _nlmsg()
    msg["attrs"] = []
    _request(msg, XFRM_MSG_FLUSHPOLICY, FLAGS_REQ, netns, "flush policies")


# --------------------------------------------------------------------------------------------
# xfrm interfaces (route-based, like a TUN device) and kernel checks.


def add_interface(
    name: str, if_id: int, *, link: str | None = None, netns: str | None = None
) -> int:
    """Create xfrm interface ``name`` with ``if_id``; returns its ifindex."""
    from pyroute2 import IPRoute, NetlinkError

    kw = {"fileno": netlink_fd_in(netns, 0)} if netns else {}  # NETLINK_ROUTE
    with IPRoute(**kw) as ipr:
        spec = {"ifname": name, "kind": "xfrm", "xfrm_if_id": if_id}
        if link is not None:
            spec["xfrm_link"] = ipr.link_lookup(ifname=link)[0]
        try:
            ipr.link("add", **spec)
        except NetlinkError as e:
            if e.code == errno.EOPNOTSUPP:
                raise KernelEspMissing(
                    f"xfrm interface {name}: this kernel has no xfrm interfaces "
                    "(CONFIG_XFRM_INTERFACE is not set); use --dataplane userspace"
                ) from None
            raise XfrmError(f"xfrm interface {name}: {os.strerror(e.code)}", e.code) from None
        return ipr.link_lookup(ifname=name)[0]


def delete_interface(name: str, *, netns: str | None = None) -> None:
    from pyroute2 import IPRoute

    kw = {"fileno": netlink_fd_in(netns, 0)} if netns else {}  # NETLINK_ROUTE
    with IPRoute(**kw) as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def check_esp(family: int = socket.AF_INET, *, netns: str | None = None) -> None:
    """Raise KernelEspMissing unless the kernel can hold an ESP SA of ``family``.

    Probes with a throwaway SA between documentation addresses, removed at once.
    """
    if family == socket.AF_INET6:
        src, dst = "2001:db8::1", "2001:db8::2"
    else:
        src, dst = "192.0.2.1", "192.0.2.2"
    probe = SA(src, dst, 0xFFFFFFF0, bytes(16), bytes(32))
    try:
        add_sa(probe, netns=netns)
    except XfrmError as e:
        if e.code != errno.EEXIST:
            raise
    delete_sa(dst, probe.spi, src, netns=netns)


def xfrm_stat(netns: str | None = None) -> dict[str, int]:
    """/proc/net/xfrm_stat of ``netns`` (the kernel's global XFRM error counters)."""
    if netns is None:
        text = open("/proc/net/xfrm_stat").read()
    else:
        import subprocess

        text = subprocess.run(
            ["ip", "netns", "exec", netns, "cat", "/proc/net/xfrm_stat"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = int(parts[1])
    return out
