"""The IKEv2 state machines (RFC 7296), sans-IO.

An :class:`Endpoint` holds every IKE SA of one local IKE speaker, as initiator and as
responder. It is driven by three calls, each returning a list of actions:

- ``receive(data, local, remote, now)`` for a UDP datagram that arrived on local port 500 or
  4500 (with the non-ESP marker on 4500, RFC 3948);
- ``tick(now)`` when ``next_deadline()`` has passed (retransmissions, half-open expiry, DPD,
  rekeys);
- ``initiate(peer, now)``, ``rekey_child``, ``rekey_ike``, ``dpd``, ``delete_ike``,
  ``delete_child`` for the caller's own requests.

Actions are :class:`Send` (a datagram), :class:`InstallChildSa` / :class:`RemoveChildSa` (for
the data plane) and :class:`IkeSaUp` / :class:`IkeSaDown` / :class:`IkeSaRekeyed` (events). No
sockets, no clock: ``now`` is a float of seconds from any monotonic clock.

Bad network input never raises out of ``receive``: it is counted in ``Endpoint.stats`` by
reason. A responder does no Diffie-Hellman and no signature work for an IKE_SA_INIT that fails
the cheap checks (syntax, proposal, KE group, COOKIE, half-open limit).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from simpletun.ike import const as c
from simpletun.ike import crypto as cr
from simpletun.ike import message as m
from simpletun.ike import ts as tsmod
from simpletun.ratelimit import SourceLimiter

log = logging.getLogger("simpletun.ike")


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Identity:
    id_type: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``10.0.0.1`` / ``fd00::1`` (IP), ``keyid:0a0b`` (KEY_ID), else FQDN (``@`` allowed)."""
        if text.startswith("keyid:"):
            return cls(c.ID_KEY_ID, bytes.fromhex(text[6:]))
        try:
            ip = ipaddress.ip_address(text)
            return cls(c.ID_IPV4_ADDR if ip.version == 4 else c.ID_IPV6_ADDR, ip.packed)
        except ValueError:
            return cls(c.ID_FQDN, text.lstrip("@").encode("ascii"))

    def __str__(self) -> str:
        return m.Id(c.PL_IDI, self.id_type, self.data).text()


DEFAULT_IKE = (
    cr.cbc_suite(128, c.DH_CURVE25519),
    cr.cbc_suite(256, c.DH_CURVE25519),
    cr.cbc_suite(128, c.DH_ECP256),
    cr.cbc_suite(256, c.DH_ECP256),
)
DEFAULT_CHILD = (cr.ChildSuite(128, False), cr.ChildSuite(256, False), cr.ChildSuite(192, False))


@dataclass
class PeerConfig:
    """One peer: who it is, how both ends authenticate, what it may tunnel."""

    name: str = "peer"
    local_ts: list[str] = field(default_factory=list)
    remote_ts: list[str] = field(default_factory=list)
    local_id: Identity | None = None  # default: our IP address
    remote_id: Identity | None = None  # None: any identity that authenticates
    psk: bytes | None = None
    private_key: ed25519.Ed25519PrivateKey | None = None
    remote_public_key: ed25519.Ed25519PublicKey | None = None
    ike_suites: tuple = DEFAULT_IKE
    child_suites: tuple = DEFAULT_CHILD
    pfs_group: int = c.DH_CURVE25519  # KE in CREATE_CHILD_SA for Child SA rekeys (0: none)
    remote_addr: tuple[str, int] | None = None  # initiator: where to send IKE_SA_INIT
    local_addr: str | None = None
    child_rekey_time: float | None = None  # soft lifetimes; None: only on request
    child_life_time: float | None = None  # hard; default 110 % of child_rekey_time
    ike_rekey_time: float | None = None
    rand_time: float = 0.0  # rekeys happen up to this many seconds early (random)
    dpd_delay: float | None = None
    # soft limits of each outbound Child SA: the data plane's to watch (the driver passes them
    # on with the SA and rekeys on its "sa_limit" event); the machine does not use them
    rekey_packets: int | None = None
    rekey_bytes: int | None = None
    retransmit_base: float = 1.0
    retransmit_tries: int = 5
    initial_contact: bool = True

    def auth_method(self) -> int:
        return c.AUTH_PSK if self.psk is not None else c.AUTH_DIGITAL_SIGNATURE


def _announces_super(notifies: dict) -> bool:
    n = notifies.get(c.N_SIMPLETUN_SUPER_PACKETS)
    return n is not None and n.data == c.SUPER_PACKETS_DATA


# ------------------------------------------------------------------------------ actions


@dataclass
class Send:
    data: bytes
    local_port: int
    remote: tuple[str, int]


@dataclass
class IkeSaUp:
    sa: str
    peer: str
    remote_id: str
    suite: str
    udp_encap: bool
    # both ends announced super-packets (N_SIMPLETUN_SUPER_PACKETS in IKE_AUTH)
    super_packets: bool = False


@dataclass
class IkeSaDown:
    sa: str
    peer: str
    reason: str


@dataclass
class IkeSaRekeyed:
    old: str
    new: str
    peer: str


@dataclass
class InstallChildSa:
    sa: str
    spi_in: int
    spi_out: int
    suite: cr.ChildSuite
    enc_in: bytes = field(repr=False)
    auth_in: bytes = field(repr=False)
    enc_out: bytes = field(repr=False)
    auth_out: bytes = field(repr=False)
    local_ts: list = field(default_factory=list)
    remote_ts: list = field(default_factory=list)
    encap: tuple | None = None  # (local_port, (remote ip, remote port)) for ESP-in-UDP
    rekey_of: int | None = None  # spi_in of the Child SA this one replaces
    # we initiated the exchange that made it. For a rekey: the initiator switches outbound
    # traffic to the new SA at once; the responder installs the new inbound SA at once but
    # keeps sending on the old one until that is deleted (RFC 7296 §2.8), so that no packet
    # reaches the initiator before it has the new inbound SA
    initiator: bool = True


@dataclass
class RemoveChildSa:
    sa: str
    spi_in: int
    spi_out: int
    reason: str


@dataclass
class ChildSaFailed:
    sa: str
    reason: str


# ------------------------------------------------------------------------------ state


@dataclass
class ChildSa:
    spi_in: int
    spi_out: int
    suite: cr.ChildSuite
    local_ts: list
    remote_ts: list
    created: float
    rekey_at: float | None = None
    rekeying: bool = False
    expires_at: float | None = None  # hard lifetime


@dataclass
class _ChildAnswer:
    error: int = 0
    data: bytes = b""
    sa: list = field(default_factory=list)
    ke: list = field(default_factory=list)
    ts: list = field(default_factory=list)
    install: tuple = ()


@dataclass
class Outstanding:
    msg_id: int
    datagram: bytes
    exchange: int
    on_response: Callable
    sent: float
    tries: int = 0
    next_at: float = 0.0


HALF_OPEN = "half-open"
INIT_SENT = "init-sent"
AUTH_SENT = "auth-sent"
ESTABLISHED = "established"
DEAD = "dead"


class IkeSa:
    def __init__(self, ep: Endpoint, initiator: bool, our_spi: bytes, peer: PeerConfig | None):
        self.ep = ep
        self.initiator = initiator
        self.our_spi = our_spi
        self.peer_spi = bytes(8)
        self.peer = peer
        self.state = INIT_SENT if initiator else HALF_OPEN
        self.suite: cr.IkeSuite | None = None
        self.keys: cr.IkeKeys | None = None
        self.dh: cr.DiffieHellman | None = None
        self.ni = b""
        self.nr = b""
        self.init_req = b""
        self.init_resp = b""
        self.cookie = b""
        self.remote: tuple[str, int] = ("0.0.0.0", c.IKE_PORT)
        self.local_ip = "0.0.0.0"
        self.local_port = c.IKE_PORT
        self.natt = False
        self.local_nat = False  # we are behind a NAT: send NAT keepalives (RFC 3948 §4)
        self.last_sent = 0.0
        self.next_out_id = 0
        self.next_in_id = 0
        self.outstanding: Outstanding | None = None
        self.queue: list[Callable[[float], None]] = []
        # (message ID, the request as received, our response): for retransmitted requests
        self.last_response: tuple[int, bytes, bytes] | None = None
        self.children: dict[int, ChildSa] = {}
        self.created = 0.0
        self.last_recv = 0.0
        self.expires: float | None = None
        self.rekey_at: float | None = None
        self.remote_id = ""
        self.want_sig_hash = False
        self.peer_sig_hash = False
        self.super_packets = False  # both ends announced super-packets in IKE_AUTH
        self.replaced_by: IkeSa | None = None

    # identity of this SA in events and logs
    @property
    def name(self) -> str:
        return f"{self.spi_i.hex()}_i{'*' if self.initiator else ''} {self.spi_r.hex()}_r" + (
            "" if self.initiator else "*"
        )

    @property
    def spi_i(self) -> bytes:
        return self.our_spi if self.initiator else self.peer_spi

    @property
    def spi_r(self) -> bytes:
        return self.peer_spi if self.initiator else self.our_spi

    # keys of the direction we send / receive
    def _out_keys(self):
        k = self.keys
        return (k.ei, k.ai) if self.initiator else (k.er, k.ar)

    def _in_keys(self):
        k = self.keys
        return (k.er, k.ar) if self.initiator else (k.ei, k.ai)

    def frame(self, msg: bytes) -> Send:
        self.last_sent = self.ep.now
        data = c.NON_ESP_MARKER + msg if self.local_port == c.NATT_PORT else msg
        return Send(data, self.local_port, self.remote)

    def encrypt(self, exchange: int, msg_id: int, response: bool, payloads: list) -> bytes:
        flags = (c.FLAG_INITIATOR if self.initiator else 0) | (c.FLAG_RESPONSE if response else 0)
        msg = m.Message(self.spi_i, self.spi_r, exchange, flags, msg_id, inner=payloads)
        log.debug("generating %s", _Summary(msg))
        first, chain = m.encode_chain(payloads)
        ivl, icvl = cr.sk_overhead(self.suite)
        if self.suite.aead:
            ctl = len(chain) + 1 + icvl
        else:
            ctl = (len(chain) + 1 + 15) // 16 * 16 + icvl
        sk_len = 4 + ivl + ctl
        head = m.encode_header(msg, c.PL_SK, c.IKE_HEADER_LEN + sk_len)
        head += m.GENERIC.pack(first, 0, sk_len)
        enc, integ = self._out_keys()
        return head + cr.sk_encrypt(self.suite, enc, integ, head, chain)

    def decrypt(self, msg: m.Message) -> bool:
        """Verify and decrypt ``msg`` in place (msg.inner); False (counted) if it fails."""
        if not msg.payloads or msg.payloads[-1].type != c.PL_SK or self.keys is None:
            self.ep.count("unencrypted_message")
            return False
        sk = msg.payloads[-1]
        enc, integ = self._in_keys()
        try:
            plain = cr.sk_decrypt(self.suite, enc, integ, msg.raw, sk.offset)
        except cr.IntegrityError as e:
            self.ep.count("integrity_failed")
            log.debug("dropping message of %s: %s", self.name, e)
            return False
        try:
            msg.inner = m.parse_chain(sk.first, plain)
        except m.ParseError as e:
            self.ep.count("malformed_encrypted")
            log.debug("dropping message of %s: %s", self.name, e.reason)
            msg.inner = None
            msg.parse_error = e  # type: ignore[attr-defined]
            return False
        return True


class _Summary:
    """Formats a message's summary only if the debug line is actually emitted."""

    __slots__ = ("msg",)

    def __init__(self, msg: m.Message):
        self.msg = msg

    def __str__(self) -> str:
        return self.msg.summary()


def _rand_spi4(used) -> int:
    while True:
        spi = struct.unpack("!I", os.urandom(4))[0]
        if spi >= 256 and spi not in used:
            return spi


# ------------------------------------------------------------------------------ proposals


def _ike_proposal(num: int, s: cr.IkeSuite, spi: bytes = b"") -> m.Proposal:
    t = [m.Transform(c.TT_ENCR, s.encr, s.key_bits), m.Transform(c.TT_PRF, s.prf)]
    if not s.aead:
        t.append(m.Transform(c.TT_INTEG, s.integ))
    t.append(m.Transform(c.TT_DH, s.dh))
    return m.Proposal(num, c.PROTO_IKE, spi, t)


def _esp_proposal(num: int, s: cr.ChildSuite, spi: int, dh: int = 0) -> m.Proposal:
    t = [
        m.Transform(c.TT_ENCR, c.ENCR_AES_CBC, s.key_bits),
        m.Transform(c.TT_INTEG, c.AUTH_HMAC_SHA2_256_128),
    ]
    if dh:
        t.append(m.Transform(c.TT_DH, dh))
    t.append(m.Transform(c.TT_ESN, c.ESN_YES if s.esn else c.ESN_NO))
    return m.Proposal(num, c.PROTO_ESP, struct.pack("!I", spi), t)


def _has(p: m.Proposal, ttype: int, tid: int, keylen: int | None = None) -> bool:
    return any(
        t.type == ttype and t.id == tid and t.key_length == keylen and not t.unknown_attribute
        for t in p.transforms
    )


def select_ike(proposals: list[m.Proposal], suites, spi_size: int):
    """First (proposal, suite) acceptable to us: all transform types must match one suite."""
    for p in proposals:
        if p.protocol != c.PROTO_IKE or len(p.spi) != spi_size or (spi_size and not any(p.spi)):
            continue
        for s in suites:
            if (
                _has(p, c.TT_ENCR, s.encr, s.key_bits)
                and _has(p, c.TT_PRF, s.prf)
                and (_has(p, c.TT_INTEG, s.integ) if not s.aead else not p.of_type(c.TT_INTEG))
                and _has(p, c.TT_DH, s.dh)
            ):
                return p, s
    return None, None


def select_esp(proposals: list[m.Proposal], suites, with_dh: bool):
    """First (proposal, suite) acceptable: with_dh=False (IKE_AUTH) ignores DH transforms; with
    it, a proposal's DH groups must include one we support (or NONE) and suite.dh says which."""
    for p in proposals:
        if p.protocol != c.PROTO_ESP or len(p.spi) != 4 or struct.unpack("!I", p.spi)[0] < 256:
            continue  # SPIs 0-255 are reserved (RFC 4303 §2.1)
        dhs = [t.id for t in p.of_type(c.TT_DH)]
        dh = 0
        if with_dh and dhs and c.DH_NONE not in dhs:
            ok = [g for g in dhs if g in cr.KE_LENGTHS]
            if not ok:
                continue
            dh = ok[0]
        esns = [t.id for t in p.of_type(c.TT_ESN)] or [c.ESN_NO]
        for s in suites:
            if (
                _has(p, c.TT_ENCR, c.ENCR_AES_CBC, s.key_bits)
                and _has(p, c.TT_INTEG, c.AUTH_HMAC_SHA2_256_128)
                and (c.ESN_YES if s.esn else c.ESN_NO) in esns
            ):
                return p, cr.ChildSuite(s.key_bits, s.esn, dh)
    return None, None


# ------------------------------------------------------------------------------ endpoint


class Endpoint:
    def __init__(
        self,
        peers: list[PeerConfig],
        *,
        responder_suites=DEFAULT_IKE,
        cookie_threshold: int = 10,
        max_half_open: int = 1000,
        half_open_timeout: float = 30.0,
        keepalive_interval: float = 20.0,
        rng: random.Random | None = None,
        force_encap: bool = False,
        natt_from_start: bool = False,
    ):
        self.peers = list(peers)
        self.responder_suites = responder_suites
        self.cookie_threshold = cookie_threshold
        self.max_half_open = max_half_open
        self.half_open_timeout = half_open_timeout
        self.keepalive_interval = keepalive_interval
        # always UDP-encapsulate ESP (RFC 7296 2.23: a host may pretend to be behind a NAT by
        # sending a NAT_DETECTION_SOURCE_IP that matches nothing; strongSwan's encap=yes):
        # for a data plane that carries ESP-in-UDP only
        self.force_encap = force_encap
        # every IKE message we initiate carries the non-ESP marker from IKE_SA_INIT on, to the
        # peer's own port (RFC 8229 TCP encapsulation: one stream, no port 500)
        self.natt_from_start = natt_from_start
        # announce super-packets in IKE_AUTH (the driver sets it: a stream transport and a
        # TUN device that accepted TSO)
        self.super_packets = False
        self.now = 0.0  # time of the call being handled
        self._log_limit = SourceLimiter(logger=log)
        self.sas: dict[bytes, IkeSa] = {}
        self.by_init: dict[tuple[bytes, tuple], bytes] = {}  # (SPIi, remote) -> our SPI
        self.half_open = 0
        self.stats: Counter = Counter()
        self.child_spis: set[int] = set()
        self._secret = os.urandom(32)
        self._secret_version = 0
        self._rng = rng or random.Random()
        self._actions: list = []

    def count(self, reason: str) -> None:
        self.stats[reason] += 1

    def _emit(self, action, quiet: bool = False) -> None:
        if quiet:
            pass
        elif isinstance(action, IkeSaUp):
            log.info(
                "IKE SA %s with %s (%s) established, %s%s",
                action.sa, action.peer, action.remote_id, action.suite,
                ", UDP-encapsulated" if action.udp_encap else "",
            )  # fmt: skip
        elif isinstance(action, IkeSaDown):
            log.info("IKE SA %s with %s down: %s", action.sa, action.peer, action.reason)
        elif isinstance(action, InstallChildSa):
            log.info(
                "Child SA %08x_i %08x_o of %s installed, ESP:%s, %s === %s",
                action.spi_in, action.spi_out, action.sa, action.suite.name(),
                tsmod.describe(action.local_ts), tsmod.describe(action.remote_ts),
            )  # fmt: skip
        elif isinstance(action, RemoveChildSa):
            log.info(
                "Child SA %08x_i %08x_o of %s removed: %s",
                action.spi_in, action.spi_out, action.sa, action.reason,
            )  # fmt: skip
        elif isinstance(action, ChildSaFailed):
            log.info("Child SA of %s not established: %s", action.sa, action.reason)
        elif isinstance(action, IkeSaRekeyed):
            log.info("IKE SA %s of %s rekeyed into %s", action.old, action.peer, action.new)
        self._actions.append(action)

    def _take(self) -> list:
        out, self._actions = self._actions, []
        return out

    def _new_spi8(self) -> bytes:
        while True:
            spi = os.urandom(8)
            if spi != bytes(8) and spi not in self.sas:
                return spi

    # ---------------------------------------------------------------- public API

    def initiate(self, peer: PeerConfig, now: float) -> list:
        self.now = now
        if peer.remote_addr is None:
            raise ValueError(f"peer {peer.name} has no remote address to initiate to")
        sa = IkeSa(self, True, self._new_spi8(), peer)
        sa.remote = (peer.remote_addr[0], peer.remote_addr[1])
        sa.local_ip = peer.local_addr or "0.0.0.0"
        if self.natt_from_start:
            sa.local_port, sa.natt = c.NATT_PORT, True
        sa.created = sa.last_recv = now
        sa.want_sig_hash = peer.private_key is not None or peer.remote_public_key is not None
        self.sas[sa.our_spi] = sa
        sa.ni = os.urandom(32)
        self._send_init(sa, peer.ike_suites[0].dh, now)
        return self._take()

    def receive(self, data: bytes, local: tuple[str, int], remote: tuple[str, int], now: float):
        self.now = now
        try:
            self._receive(bytes(data), local, remote, now)
        except Exception:  # a bug must not take the daemon down: count it, log it
            self.count("internal_error")
            log.exception("internal error handling a datagram from %s", remote)
        return self._take()

    def tick(self, now: float) -> list:
        self.now = now
        for sa in list(self.sas.values()):
            try:
                self._tick_sa(sa, now)
            except Exception:
                self.count("internal_error")
                log.exception("internal error in timers of %s", sa.name)
        return self._take()

    def next_deadline(self) -> float | None:
        best = None
        for sa in self.sas.values():
            for t in self._deadlines(sa):
                if t is not None and (best is None or t < best):
                    best = t
        return best

    def find(self, peer_name: str) -> list[IkeSa]:
        return [
            s
            for s in self.sas.values()
            if s.peer is not None and s.peer.name == peer_name and s.state == ESTABLISHED
        ]

    def rekey_child(self, sa: IkeSa, spi_in: int, now: float) -> list:
        self._queue(sa, lambda t: self._req_rekey_child(sa, spi_in, t), now)
        return self._take()

    def rekey_ike(self, sa: IkeSa, now: float) -> list:
        self._queue(sa, lambda t: self._req_rekey_ike(sa, t), now)
        return self._take()

    def dpd(self, sa: IkeSa, now: float) -> list:
        self._queue(sa, lambda t: self._req_dpd(sa, t), now)
        return self._take()

    def delete_ike(self, sa: IkeSa, now: float, reason: str = "deleted by us") -> list:
        self._queue(sa, lambda t: self._req_delete_ike(sa, t, reason), now)
        return self._take()

    def delete_child(self, sa: IkeSa, spi_in: int, now: float) -> list:
        self._queue(sa, lambda t: self._req_delete_child(sa, spi_in, t), now)
        return self._take()

    # ---------------------------------------------------------------- timers

    def _deadlines(self, sa: IkeSa):
        if sa.outstanding is not None:
            yield sa.outstanding.next_at
        if sa.expires is not None:
            yield sa.expires
        for ch in sa.children.values():
            if ch.expires_at is not None:
                yield ch.expires_at
        if sa.state == ESTABLISHED and sa.outstanding is None:
            if sa.peer and sa.peer.dpd_delay:
                yield sa.last_recv + sa.peer.dpd_delay
            if sa.local_nat and sa.natt:
                yield sa.last_sent + self.keepalive_interval
            if sa.rekey_at is not None and sa.replaced_by is None:
                yield sa.rekey_at
            for ch in sa.children.values():
                if ch.rekey_at is not None and not ch.rekeying:
                    yield ch.rekey_at

    def _tick_sa(self, sa: IkeSa, now: float) -> None:
        if sa.state == DEAD:
            return
        if sa.expires is not None and now >= sa.expires:
            self._kill(sa, "half-open IKE SA timed out" if sa.state == HALF_OPEN else "expired")
            return
        for ch in list(sa.children.values()):
            if ch.expires_at is not None and now >= ch.expires_at:
                self._expire_child(sa, ch, now)
        o = sa.outstanding
        if o is not None and now >= o.next_at:
            if o.tries >= sa.peer.retransmit_tries:
                ex = c.EXCHANGE_NAMES.get(o.exchange, str(o.exchange))
                self._kill(
                    sa,
                    f"peer not responding: no response to {ex} request {o.msg_id} "
                    f"after {o.tries} retransmissions",
                )
                return
            o.tries += 1
            o.next_at = now + sa.peer.retransmit_base * (2**o.tries)
            self.count("retransmitted")
            log.debug("retransmit %d of request with message ID %d", o.tries, o.msg_id)
            self._emit(sa.frame(o.datagram))
            return
        if sa.state != ESTABLISHED or sa.outstanding is not None:
            return
        p = sa.peer
        if sa.rekey_at is not None and now >= sa.rekey_at and sa.replaced_by is None:
            sa.rekey_at = None
            self._queue(sa, lambda t: self._req_rekey_ike(sa, t), now)
            return
        for ch in list(sa.children.values()):
            if ch.rekey_at is not None and now >= ch.rekey_at and not ch.rekeying:
                ch.rekey_at = None
                spi = ch.spi_in
                self._queue(sa, lambda t, spi=spi: self._req_rekey_child(sa, spi, t), now)
                return
        if p.dpd_delay and now >= sa.last_recv + p.dpd_delay:
            self._queue(sa, lambda t: self._req_dpd(sa, t), now)
            return
        if sa.local_nat and sa.natt and now >= sa.last_sent + self.keepalive_interval:
            sa.last_sent = now
            self.count("nat_keepalive_sent")
            self._emit(Send(b"\xff", c.NATT_PORT, sa.remote))

    def _expire_child(self, sa: IkeSa, ch: ChildSa, now: float) -> None:
        """Hard lifetime reached without a rekey: remove it now, then tell the peer."""
        sa.children.pop(ch.spi_in, None)
        self.child_spis.discard(ch.spi_in)
        self._emit(RemoveChildSa(sa.name, ch.spi_in, ch.spi_out, "hard lifetime expired"))
        spi = struct.pack("!I", ch.spi_in)
        self._queue(
            sa,
            lambda t: self._request(
                sa, c.INFORMATIONAL, [m.Delete(c.PROTO_ESP, [spi])], lambda msg, t2: None, t
            ),
            now,
        )

    def _soft(self, base: float | None, now: float, rand: float) -> float | None:
        if base is None:
            return None
        return now + base - self._rng.uniform(0, rand)

    # ---------------------------------------------------------------- requests of ours

    def _queue(self, sa: IkeSa, fn, now: float) -> None:
        self.now = now
        if sa.state == DEAD:
            return
        sa.queue.append(fn)
        self._pump(sa, now)

    def _pump(self, sa: IkeSa, now: float) -> None:
        while sa.outstanding is None and sa.queue and sa.state == ESTABLISHED:
            sa.queue.pop(0)(now)

    def _request(self, sa: IkeSa, exchange: int, payloads: list, on_response, now: float):
        mid = sa.next_out_id
        sa.next_out_id += 1
        raw = sa.encrypt(exchange, mid, False, payloads)
        sa.outstanding = Outstanding(
            mid, raw, exchange, on_response, now, next_at=now + sa.peer.retransmit_base
        )
        self._emit(sa.frame(raw))

    def _send_init(self, sa: IkeSa, group: int, now: float) -> None:
        p = sa.peer
        sa.dh = cr.DiffieHellman(group)
        suites = [s for s in p.ike_suites if s.dh == group] + [
            s for s in p.ike_suites if s.dh != group
        ]
        props = [_ike_proposal(i + 1, s) for i, s in enumerate(suites)]
        payloads: list = []
        if sa.cookie:
            payloads.append(m.Notify(c.N_COOKIE, sa.cookie))
        payloads += [m.SA(props), m.KE(group, sa.dh.public), m.Nonce(sa.ni)]
        payloads += self._natd(sa, sa.our_spi, bytes(8))
        if sa.want_sig_hash:
            payloads.append(
                m.Notify(c.N_SIGNATURE_HASH_ALGORITHMS, struct.pack("!HH", 2, c.HASH_IDENTITY))
            )
        msg = m.Message(sa.our_spi, bytes(8), c.IKE_SA_INIT, c.FLAG_INITIATOR, 0, payloads)
        raw = m.encode_message(msg)
        log.debug("generating %s", _Summary(msg))
        sa.init_req = raw
        sa.next_out_id = 1
        sa.outstanding = Outstanding(
            0, raw, c.IKE_SA_INIT, None, now, next_at=now + p.retransmit_base
        )
        self._emit(sa.frame(raw))

    def _natd(self, sa: IkeSa, spi_i: bytes, spi_r: bytes) -> list:
        try:
            lip = ipaddress.ip_address(sa.local_ip).packed
            rip = ipaddress.ip_address(sa.remote[0]).packed
        except ValueError:
            return []
        src = cr.natd_hash(spi_i, spi_r, lip, sa.local_port)
        if self.force_encap:
            src = os.urandom(len(src))
        return [
            m.Notify(c.N_NAT_DETECTION_SOURCE_IP, src),
            m.Notify(
                c.N_NAT_DETECTION_DESTINATION_IP, cr.natd_hash(spi_i, spi_r, rip, sa.remote[1])
            ),
        ]

    def _check_natd(self, sa: IkeSa, msg: m.Message, remote, local) -> bool | None:
        """True if a NAT is detected, None if the peer sent no NAT-D."""
        srcs = [p for p in msg.payloads if p.type == c.PL_NOTIFY
                and p.notify_type == c.N_NAT_DETECTION_SOURCE_IP]  # fmt: skip
        dst = msg.notifies().get(c.N_NAT_DETECTION_DESTINATION_IP)
        if not srcs or dst is None:
            return None
        try:
            rip = ipaddress.ip_address(remote[0]).packed
            lip = ipaddress.ip_address(local[0]).packed
        except ValueError:
            return True
        want_src = cr.natd_hash(msg.spi_i, msg.spi_r, rip, remote[1])
        want_dst = cr.natd_hash(msg.spi_i, msg.spi_r, lip, local[1])
        remote_nat = all(s.data != want_src for s in srcs)
        local_nat = dst.data != want_dst
        sa.local_nat = local_nat or self.force_encap
        if self.force_encap:
            return True
        if remote_nat:
            log.debug("remote host is behind NAT")
        if local_nat:
            log.debug("local host is behind NAT")
        return remote_nat or local_nat

    def _auth_payload(self, sa: IkeSa, octets: bytes) -> m.Auth:
        p = sa.peer
        if p.psk is not None:
            return m.Auth(c.AUTH_PSK, cr.psk_auth(p.psk, octets))
        return m.Auth(c.AUTH_DIGITAL_SIGNATURE, cr.ed25519_auth(p.private_key, octets))

    def _verify_auth(self, p: PeerConfig, auth: m.Auth, octets: bytes) -> str | None:
        """None if the peer's AUTH verifies, else why not."""
        if p.psk is not None:
            if auth.method != c.AUTH_PSK:
                return f"peer used AUTH method {auth.method}, we expect a PSK (method 2)"
            if hmac.compare_digest(auth.data, cr.psk_auth(p.psk, octets)):
                return None
            return "the PSK MAC does not verify: the two ends have different PSKs"
        if auth.method != c.AUTH_DIGITAL_SIGNATURE:
            return f"peer used AUTH method {auth.method}, we expect an Ed25519 signature (14)"
        if p.remote_public_key is None:
            return "no public key configured for this peer"
        if cr.ed25519_verify(p.remote_public_key, auth.data, octets):
            return None
        return "the Ed25519 signature does not verify with the peer's configured public key"

    def _local_id(self, sa: IkeSa, ptype: int) -> m.Id:
        ident = sa.peer.local_id or Identity.parse(sa.local_ip)
        return m.Id(ptype, ident.id_type, ident.data)

    def _child_payloads(self, sa: IkeSa, spi_in: int, dh: int) -> list:
        p = sa.peer
        props = [_esp_proposal(i + 1, s, spi_in, dh) for i, s in enumerate(p.child_suites)]
        return [
            m.SA(props),
            m.TS(c.PL_TSI, [tsmod.from_prefix(x) for x in p.local_ts]),
            m.TS(c.PL_TSR, [tsmod.from_prefix(x) for x in p.remote_ts]),
        ]

    def _req_dpd(self, sa: IkeSa, now: float) -> None:
        def done(msg, t):
            pass

        self._request(sa, c.INFORMATIONAL, [], done, now)

    def _req_delete_ike(self, sa: IkeSa, now: float, reason: str) -> None:
        def done(msg, t):
            self._kill(sa, reason, notify_children=True)

        self._request(sa, c.INFORMATIONAL, [m.Delete(c.PROTO_IKE)], done, now)

    def _req_delete_child(self, sa: IkeSa, spi_in: int, now: float, reason="deleted by us"):
        ch = sa.children.get(spi_in)
        if ch is None:
            return

        def done(msg, t):
            if sa.children.pop(spi_in, None) is not None:
                self.child_spis.discard(spi_in)
                self._emit(RemoveChildSa(sa.name, ch.spi_in, ch.spi_out, reason))

        self._request(
            sa, c.INFORMATIONAL, [m.Delete(c.PROTO_ESP, [struct.pack("!I", spi_in)])], done, now
        )

    def _req_rekey_child(self, sa: IkeSa, spi_in: int, now: float) -> None:
        old = sa.children.get(spi_in)
        if old is None:
            return
        old.rekeying = True
        p = sa.peer
        new_spi = _rand_spi4(self.child_spis)
        self.child_spis.add(new_spi)
        ni = os.urandom(32)
        dh = cr.DiffieHellman(p.pfs_group) if p.pfs_group else None
        payloads: list = [m.Notify(c.N_REKEY_SA, b"", c.PROTO_ESP, struct.pack("!I", spi_in))]
        cp = self._child_payloads(sa, new_spi, p.pfs_group)
        payloads += [cp[0], m.Nonce(ni)]
        if dh:
            payloads.append(m.KE(dh.group, dh.public))
        payloads += cp[1:]

        def done(msg, t):
            old.rekeying = False
            ch = self._child_from_response(sa, msg, new_spi, ni, dh, t, rekey_of=old)
            if ch is None:
                self.child_spis.discard(new_spi)
                if c.N_TEMPORARY_FAILURE in msg.notifies():  # a collision: try again soon
                    old.rekey_at = t + self._rng.uniform(1.0, 3.0)
                return
            self._queue(sa, lambda t2: self._req_delete_child(sa, spi_in, t2, "rekeyed"), t)

        self._request(sa, c.CREATE_CHILD_SA, payloads, done, now)

    def _child_from_response(self, sa, msg, new_spi, ni, dh, now, rekey_of=None):
        """Our Child SA request got ``msg``: install the Child SA or say why not."""
        ns = msg.notifies()
        for ntype in ns:
            if ntype < 16384:
                self._emit(ChildSaFailed(sa.name, f"peer answered {c.NOTIFY_NAMES.get(ntype)}"))
                return None
        sa_pl, nonce = msg.get(c.PL_SA), msg.get(c.PL_NONCE)
        tsi, tsr = msg.get(c.PL_TSI), msg.get(c.PL_TSR)
        if sa_pl is None or tsi is None or tsr is None or (ni and nonce is None):
            self._emit(ChildSaFailed(sa.name, "peer's Child SA response lacks SA/TS payloads"))
            return None
        prop, suite = select_esp(sa_pl.proposals, sa.peer.child_suites, with_dh=dh is not None)
        if prop is None or len(sa_pl.proposals) != 1:
            self._emit(ChildSaFailed(sa.name, "peer chose a Child SA proposal we did not offer"))
            return None
        g_ir = b""
        if dh is not None:
            ke = msg.get(c.PL_KE)
            if ke is None or ke.group != dh.group or suite.dh != dh.group:
                self._emit(ChildSaFailed(sa.name, "peer's CREATE_CHILD_SA response lacks our KE"))
                return None
            try:
                g_ir = dh.shared(ke.data)
            except cr.DhError as e:
                self._emit(ChildSaFailed(sa.name, f"bad KE: {e}"))
                return None
        local = [tsmod.from_prefix(x) for x in sa.peer.local_ts]
        remote = [tsmod.from_prefix(x) for x in sa.peer.remote_ts]
        if not tsmod.within(tsi.selectors, local) or not tsmod.within(tsr.selectors, remote):
            self._emit(ChildSaFailed(sa.name, "peer's traffic selectors exceed what we offered"))
            return None
        if ni:
            nr = nonce.data
        else:
            ni, nr = sa.ni, sa.nr
        keys = cr.child_keys(sa.keys.d, suite, ni, nr, g_ir)
        spi_out = struct.unpack("!I", prop.spi)[0]
        return self._install(
            sa, new_spi, spi_out, suite, keys, tsi.selectors, tsr.selectors, True, now, rekey_of
        )

    def _install(self, sa, spi_in, spi_out, suite, keys, ts_i, ts_r, we_init, now, rekey_of):
        if we_init:
            enc_out, auth_out, enc_in, auth_in = keys.enc_i, keys.auth_i, keys.enc_r, keys.auth_r
            lts, rts = ts_i, ts_r
        else:
            enc_in, auth_in, enc_out, auth_out = keys.enc_i, keys.auth_i, keys.enc_r, keys.auth_r
            lts, rts = ts_r, ts_i
        p = sa.peer
        ch = ChildSa(spi_in, spi_out, suite, lts, rts, now)
        ch.rekey_at = self._soft(p.child_rekey_time, now, p.rand_time)
        life = p.child_life_time
        if life is None and p.child_rekey_time is not None:
            life = 1.1 * p.child_rekey_time
        ch.expires_at = now + life if life is not None else None
        sa.children[spi_in] = ch
        self.child_spis.add(spi_in)
        encap = (sa.local_port, sa.remote) if sa.natt else None
        self._emit(
            InstallChildSa(
                sa.name,
                spi_in,
                spi_out,
                suite,
                enc_in,
                auth_in,
                enc_out,
                auth_out,
                lts,
                rts,
                encap,
                rekey_of.spi_in if rekey_of else None,
                we_init,
            )  # fmt: skip
        )
        return ch

    def _req_rekey_ike(self, sa: IkeSa, now: float) -> None:
        p = sa.peer
        new_spi = self._new_spi8()
        group = sa.suite.dh
        dh = cr.DiffieHellman(group)
        ni = os.urandom(32)
        suites = [sa.suite] + [s for s in p.ike_suites if s != sa.suite and s.dh == group]
        props = [_ike_proposal(i + 1, s, new_spi) for i, s in enumerate(suites)]
        payloads = [m.SA(props), m.Nonce(ni), m.KE(group, dh.public)]

        def done(msg, t):
            if any(n < 16384 for n in msg.notifies()):
                names = ", ".join(c.NOTIFY_NAMES.get(n, str(n)) for n in msg.notifies())
                log.info("IKE SA %s: peer declined the rekey (%s)", sa.name, names)
                if c.N_TEMPORARY_FAILURE in msg.notifies():  # a collision: try again soon
                    sa.rekey_at = t + self._rng.uniform(1.0, 3.0)
                return
            sa_pl, nonce, ke = msg.get(c.PL_SA), msg.get(c.PL_NONCE), msg.get(c.PL_KE)
            if sa_pl is None or nonce is None or ke is None or len(sa_pl.proposals) != 1:
                log.info("IKE SA %s: malformed IKE rekey response", sa.name)
                return
            prop, suite = select_ike(sa_pl.proposals, suites, 8)
            if prop is None or ke.group != group:
                log.info("IKE SA %s: peer chose an IKE proposal we did not offer", sa.name)
                return
            try:
                g_ir = dh.shared(ke.data)
            except cr.DhError as e:
                log.info("IKE SA %s: bad KE in rekey response: %s", sa.name, e)
                return
            new = IkeSa(self, True, new_spi, p)
            new.peer_spi = prop.spi
            seed = cr.rekey_skeyseed(sa.keys.d, g_ir, ni, nonce.data)
            self._adopt(sa, new, suite, seed, ni, nonce.data, t)
            self._queue(sa, lambda t2: self._req_delete_ike(sa, t2, "rekeyed"), t)

        self._request(sa, c.CREATE_CHILD_SA, payloads, done, now)

    def _adopt(self, old: IkeSa, new: IkeSa, suite, seed, ni, nr, now) -> None:
        """Make ``new`` (from a rekey of ``old``) established and move the Child SAs to it."""
        new.suite = suite
        new.keys = cr.ike_keys(seed, suite, ni, nr, new.spi_i, new.spi_r)
        new.ni, new.nr = ni, nr
        new.state = ESTABLISHED
        new.remote, new.local_ip, new.local_port, new.natt = (
            old.remote, old.local_ip, old.local_port, old.natt,
        )  # fmt: skip
        new.remote_id = old.remote_id
        new.local_nat = old.local_nat
        new.created = new.last_recv = now
        new.rekey_at = self._soft(old.peer.ike_rekey_time, now, old.peer.rand_time)
        new.children = old.children
        old.children = {}
        old.replaced_by = new
        old.rekey_at = None
        self.sas[new.our_spi] = new
        self._emit(IkeSaRekeyed(old.name, new.name, old.peer.name))

    # ---------------------------------------------------------------- input

    def _receive(self, data: bytes, local, remote, now: float) -> None:
        if local[1] == c.NATT_PORT:
            if data == b"\xff":
                self.count("nat_keepalive")
                return
            if data[:4] != c.NON_ESP_MARKER:
                self.count("esp_on_ike_path")
                return
            data = data[4:]
        try:
            msg = m.parse_header(data)
        except m.ParseError as e:
            self.count("malformed_header")
            log.debug("dropping datagram from %s: %s", remote, e.reason)
            if e.notify == c.N_INVALID_MAJOR_VERSION and len(data) >= c.IKE_HEADER_LEN:
                self._reply_unprotected(data, e.notify, b"", local, remote)
            return
        try:
            msg.payloads = m.parse_chain(msg._first, data, c.IKE_HEADER_LEN, outer=True)
        except m.ParseError as e:
            self.count("malformed")
            log.debug("dropping message from %s: %s", remote, e.reason)
            if msg.exchange == c.IKE_SA_INIT and not msg.is_response:
                self._reply_unprotected(data, e.notify, e.data, local, remote)
            return
        if msg.exchange == c.IKE_SA_INIT and not msg.is_response:
            if msg.spi_r != bytes(8):
                self.count("init_with_spi_r")
                return
            log.debug("parsed %s", _Summary(msg))
            self._respond_init(msg, local, remote, now)
            return
        our = msg.spi_r if msg.from_initiator else msg.spi_i
        sa = self.sas.get(our)
        if sa is None or sa.state == DEAD:
            self.count("unknown_spi")
            return
        if msg.from_initiator == sa.initiator or (sa.peer_spi != bytes(8) and
                                                   (msg.spi_r if sa.initiator else msg.spi_i)
                                                   != sa.peer_spi):  # fmt: skip
            self.count("spi_mismatch")
            return
        if msg.exchange == c.IKE_SA_INIT:
            self._init_response(sa, msg, local, remote, now)
            return
        if msg.is_response:
            self._handle_response(sa, msg, local, remote, now)
        else:
            self._handle_request(sa, msg, local, remote, now)

    def _reply_unprotected(self, data, notify, ndata, local, remote) -> None:
        """Answer a malformed IKE_SA_INIT request with an error notification (no state)."""
        spi_i = data[:8]
        if spi_i == bytes(8):
            return
        msg_id = struct.unpack_from("!I", data, 20)[0]
        exch = data[18]
        reply = m.Message(spi_i, bytes(8), exch, c.FLAG_RESPONSE, msg_id, [m.Notify(notify, ndata)])
        log.debug("generating %s", _Summary(reply))
        raw = m.encode_message(reply)
        if local[1] == c.NATT_PORT:
            raw = c.NON_ESP_MARKER + raw
        self._emit(Send(raw, local[1], remote))

    # ---------------------------------------------------------------- responder: IKE_SA_INIT

    def _cookie(self, msg: m.Message, nonce: bytes, remote, version: int) -> bytes:
        secret = self._secret if version == self._secret_version else b""
        ip = ipaddress.ip_address(remote[0]).packed
        h = hashlib.sha256(nonce + ip + msg.spi_i + secret).digest()
        return bytes([version]) + h

    def _respond_init(self, msg: m.Message, local, remote, now: float) -> None:
        def reply(payloads, spi_r=bytes(8)):
            r = m.Message(msg.spi_i, spi_r, c.IKE_SA_INIT, c.FLAG_RESPONSE, 0, payloads)
            log.debug("generating %s", _Summary(r))
            raw = m.encode_message(r)
            self._emit(Send(c.NON_ESP_MARKER + raw if local[1] == c.NATT_PORT else raw,
                            local[1], remote))  # fmt: skip
            return raw

        key = (msg.spi_i, tuple(remote))
        existing = self.by_init.get(key)
        if existing is not None:
            sa = self.sas.get(existing)
            if sa is not None and sa.state == HALF_OPEN and sa.init_req == msg.raw:
                self.count("init_retransmit_answered")
                self._emit(sa.frame(sa.init_resp))
                return
            if sa is not None and sa.state != HALF_OPEN:
                self.count("init_retransmit_late")
                return
        if msg.msg_id != 0:
            self.count("init_bad_msgid")
            return
        sa_pl, ke, nonce = msg.get(c.PL_SA), msg.get(c.PL_KE), msg.get(c.PL_NONCE)
        if sa_pl is None or ke is None or nonce is None:
            self.count("init_missing_payloads")
            reply([m.Notify(c.N_INVALID_SYNTAX)])
            return
        # cheap checks before any DH: COOKIE, proposal, KE group, half-open bound
        if self.half_open >= self.cookie_threshold:
            got = msg.notifies().get(c.N_COOKIE)
            ok = got is not None and msg.payloads[0] is got and len(got.data) == 33
            if ok:
                ok = (
                    hmac.compare_digest(
                        got.data, self._cookie(msg, nonce.data, remote, got.data[0])
                    )
                    and got.data[0] == self._secret_version
                )
            if not ok:
                self.count("cookie_sent" if got is None else "cookie_invalid")
                reply([m.Notify(c.N_COOKIE, self._cookie(msg, nonce.data, remote,
                                                          self._secret_version))])  # fmt: skip
                return
        prop, suite = select_ike(sa_pl.proposals, self.responder_suites, 0)
        if prop is None:
            self.count("no_proposal_chosen")
            if self._log_limit.allow(remote[0], now):
                log.info(
                    "no acceptable IKE proposal from %s: received %s", remote[0],
                    ", ".join(p.describe() for p in sa_pl.proposals),
                )  # fmt: skip
            reply([m.Notify(c.N_NO_PROPOSAL_CHOSEN)])
            return
        if ke.group != suite.dh:
            # a proposal with the peer's KE group may be acceptable too
            alt = [s for s in self.responder_suites if s.dh == ke.group]
            p2, s2 = select_ike(sa_pl.proposals, alt, 0) if alt else (None, None)
            if p2 is None:
                self.count("invalid_ke")
                reply([m.Notify(c.N_INVALID_KE_PAYLOAD, struct.pack("!H", suite.dh))])
                return
            prop, suite = p2, s2
        if len(ke.data) != cr.KE_LENGTHS[suite.dh]:
            self.count("bad_ke_length")
            reply([m.Notify(c.N_INVALID_SYNTAX)])
            return
        if self.half_open >= self.max_half_open:
            self.count("half_open_limit")
            return
        # the expensive part
        sa = IkeSa(self, False, self._new_spi8(), None)
        sa.peer_spi = msg.spi_i
        sa.remote = tuple(remote)
        sa.local_ip, sa.local_port = local[0], local[1]
        sa.natt = local[1] == c.NATT_PORT
        sa.suite = suite
        sa.ni = nonce.data
        sa.nr = os.urandom(32)
        dh = cr.DiffieHellman(suite.dh)
        try:
            g_ir = dh.shared(ke.data)
        except cr.DhError as e:
            self.count("bad_ke")
            log.debug("bad KE from %s: %s", remote, e)
            reply([m.Notify(c.N_INVALID_SYNTAX)])
            return
        nat = self._check_natd(sa, msg, remote, local)
        if nat:
            sa.natt = True
        sa.peer_sig_hash = c.N_SIGNATURE_HASH_ALGORITHMS in msg.notifies()
        sa.keys = cr.ike_keys(
            cr.skeyseed(sa.ni, sa.nr, g_ir), suite, sa.ni, sa.nr, sa.spi_i, sa.spi_r
        )
        chosen = m.Proposal(prop.number, c.PROTO_IKE, b"", _ike_proposal(1, suite).transforms)
        payloads = [m.SA([chosen]), m.KE(suite.dh, dh.public), m.Nonce(sa.nr)]
        if nat is not None:
            payloads += self._natd(sa, sa.spi_i, sa.spi_r)
        if sa.peer_sig_hash:
            payloads.append(
                m.Notify(c.N_SIGNATURE_HASH_ALGORITHMS, struct.pack("!HH", 2, c.HASH_IDENTITY))
            )
        sa.init_req = msg.raw
        sa.init_resp = reply(payloads, sa.our_spi)
        sa.next_in_id = 1
        sa.created = sa.last_recv = now
        sa.expires = now + self.half_open_timeout
        self.sas[sa.our_spi] = sa
        self.by_init[key] = sa.our_spi
        sa._init_key = key  # type: ignore[attr-defined]
        self.half_open += 1

    # ---------------------------------------------------------------- initiator: IKE_SA_INIT

    def _init_response(self, sa: IkeSa, msg: m.Message, local, remote, now: float) -> None:
        if sa.state != INIT_SENT or not msg.is_response or msg.msg_id != 0:
            self.count("unexpected_init_response")
            return
        log.debug("parsed %s", _Summary(msg))
        ns = msg.notifies()
        if c.N_COOKIE in ns:
            cookie = ns[c.N_COOKIE].data
            if not 1 <= len(cookie) <= 64 or sa.cookie == cookie:
                self.count("bad_cookie_request")
                return
            log.info("peer %s demands a COOKIE: retrying IKE_SA_INIT", remote[0])
            sa.cookie = cookie
            self._send_init(sa, sa.dh.group, now)
            return
        if c.N_INVALID_KE_PAYLOAD in ns:
            d = ns[c.N_INVALID_KE_PAYLOAD].data
            group = struct.unpack("!H", d[:2])[0] if len(d) >= 2 else 0
            if group in [s.dh for s in sa.peer.ike_suites] and group != sa.dh.group:
                log.info("peer %s wants DH group %d: retrying IKE_SA_INIT", remote[0], group)
                self._send_init(sa, group, now)
            else:
                self._kill(sa, f"peer asked for DH group {group}, which we do not offer")
            return
        errors = [n for n in ns if n < 16384]
        if errors:
            names = ", ".join(c.NOTIFY_NAMES.get(n, str(n)) for n in errors)
            self._kill(sa, f"peer refused IKE_SA_INIT: {names}")
            return
        sa_pl, ke, nonce = msg.get(c.PL_SA), msg.get(c.PL_KE), msg.get(c.PL_NONCE)
        if sa_pl is None or ke is None or nonce is None or len(sa_pl.proposals) != 1:
            self.count("init_response_malformed")
            return
        prop, suite = select_ike(sa_pl.proposals, sa.peer.ike_suites, 0)
        if prop is None or suite.dh != sa.dh.group or ke.group != suite.dh:
            self._kill(sa, "peer chose an IKE proposal we did not offer")
            return
        try:
            g_ir = sa.dh.shared(ke.data)
        except cr.DhError as e:
            self._kill(sa, f"peer's KE is invalid: {e}")
            return
        sa.peer_spi = msg.spi_r
        sa.suite = suite
        sa.nr = nonce.data
        sa.init_resp = msg.raw
        sa.peer_sig_hash = c.N_SIGNATURE_HASH_ALGORITHMS in ns
        sa.keys = cr.ike_keys(
            cr.skeyseed(sa.ni, sa.nr, g_ir), suite, sa.ni, sa.nr, sa.spi_i, sa.spi_r
        )
        sa.outstanding = None
        sa.last_recv = now
        if self._check_natd(sa, msg, remote, (sa.local_ip, sa.local_port)):
            sa.natt = True
            if sa.local_port != c.NATT_PORT:  # float from 500 (RFC 7296 2.23)
                sa.local_port = c.NATT_PORT
                sa.remote = (sa.remote[0], c.NATT_PORT)
        # IKE_AUTH request
        p = sa.peer
        idi = self._local_id(sa, c.PL_IDI)
        octets = cr.signed_octets(sa.init_req, sa.nr, sa.keys.pi, idi.body())
        payloads: list = [idi]
        if p.initial_contact:
            payloads.append(m.Notify(c.N_INITIAL_CONTACT))
        if self.super_packets:
            payloads.append(m.Notify(c.N_SIMPLETUN_SUPER_PACKETS, c.SUPER_PACKETS_DATA))
        if p.remote_id is not None:
            payloads.append(m.Id(c.PL_IDR, p.remote_id.id_type, p.remote_id.data))
        payloads.append(self._auth_payload(sa, octets))
        child_spi = _rand_spi4(self.child_spis)
        self.child_spis.add(child_spi)
        payloads += self._child_payloads(sa, child_spi, 0)
        sa.state = AUTH_SENT

        def done(resp, t):
            self._auth_response(sa, resp, child_spi, t)

        # _request needs ESTABLISHED-independent path: build directly
        mid = sa.next_out_id
        sa.next_out_id += 1
        raw = sa.encrypt(c.IKE_AUTH, mid, False, payloads)
        sa.outstanding = Outstanding(
            mid, raw, c.IKE_AUTH, done, now, next_at=now + p.retransmit_base
        )
        self._emit(sa.frame(raw))

    def _auth_response(self, sa: IkeSa, msg: m.Message, child_spi: int, now: float) -> None:
        ns = msg.notifies()
        p = sa.peer
        if c.N_AUTHENTICATION_FAILED in ns:
            self.child_spis.discard(child_spi)
            self._kill(
                sa,
                "peer refused our authentication (AUTHENTICATION_FAILED): "
                + (
                    "check that both ends use the same PSK"
                    if p.psk is not None
                    else "check that the peer has our public key and our ID"
                ),  # fmt: skip
            )
            return
        idr, auth = msg.get(c.PL_IDR), msg.get(c.PL_AUTH)
        if idr is None or auth is None:
            errs = [c.NOTIFY_NAMES.get(n, str(n)) for n in ns if n < 16384]
            self.child_spis.discard(child_spi)
            self._kill(sa, "peer's IKE_AUTH response lacks IDr/AUTH" +
                       (f" ({', '.join(errs)})" if errs else ""))  # fmt: skip
            return
        peer_id = Identity(idr.id_type, idr.data)
        if p.remote_id is not None and peer_id != p.remote_id:
            self.child_spis.discard(child_spi)
            self._kill(sa, f"peer identified as '{peer_id}', we expect '{p.remote_id}'")
            return
        octets = cr.signed_octets(sa.init_resp, sa.ni, sa.keys.pr, idr.body())
        why = self._verify_auth(p, auth, octets)
        if why is not None:
            self.child_spis.discard(child_spi)
            # tell the responder (RFC 7296 §2.21.2), without waiting for an answer
            raw = sa.encrypt(c.INFORMATIONAL, sa.next_out_id, False,
                             [m.Notify(c.N_AUTHENTICATION_FAILED)])  # fmt: skip
            self._emit(sa.frame(raw))
            self._kill(sa, f"authentication of peer '{peer_id}' failed: {why}")
            return
        sa.remote_id = str(peer_id)
        sa.super_packets = self.super_packets and _announces_super(ns)
        self._established(sa, now)
        ch = self._child_from_response(sa, msg, child_spi, b"", None, now)
        if ch is None:
            self.child_spis.discard(child_spi)
        self._pump(sa, now)

    def _established(self, sa: IkeSa, now: float) -> None:
        sa.state = ESTABLISHED
        sa.expires = None
        sa.dh = None
        p = sa.peer
        sa.rekey_at = self._soft(p.ike_rekey_time, now, p.rand_time)
        self._emit(
            IkeSaUp(sa.name, p.name, sa.remote_id, sa.suite.name(), sa.natt, sa.super_packets)
        )

    # ---------------------------------------------------------------- responses to our requests

    def _handle_response(self, sa: IkeSa, msg: m.Message, local, remote, now) -> None:
        o = sa.outstanding
        if o is None or msg.msg_id != o.msg_id or msg.exchange != o.exchange:
            self.count("unexpected_response")
            return
        if not sa.decrypt(msg):
            return
        log.debug("parsed %s", _Summary(msg))
        sa.outstanding = None
        sa.last_recv = now
        self._float(sa, local, remote)
        o.on_response(msg, now)
        self._pump(sa, now)

    def _float(self, sa: IkeSa, local, remote) -> None:
        """An authenticated message: follow the peer's address/port (NAT mapping changes)."""
        if tuple(remote) != sa.remote or local[1] != sa.local_port:
            sa.remote = tuple(remote)
            sa.local_port = local[1]
            if local[1] == c.NATT_PORT:
                sa.natt = True

    # ---------------------------------------------------------------- requests from the peer

    def _handle_request(self, sa: IkeSa, msg: m.Message, local, remote, now) -> None:
        if sa.last_response is not None and msg.msg_id == sa.last_response[0]:
            # only a byte-identical retransmission gets the cached response (no decryption)
            if msg.raw == sa.last_response[1]:
                self.count("request_retransmit_answered")
                self._emit(sa.frame(sa.last_response[2]))
            else:
                self.count("old_message_id")
            return
        if msg.msg_id != sa.next_in_id:
            self.count("invalid_message_id")
            return
        if not sa.decrypt(msg):
            err = getattr(msg, "parse_error", None)
            if err is not None:  # authentic but malformed: tell the peer
                self._respond(sa, msg, [m.Notify(err.notify, err.data)])
            return
        log.debug("parsed %s", _Summary(msg))
        sa.last_recv = now
        self._float(sa, local, remote)
        if msg.exchange == c.IKE_AUTH and sa.state == HALF_OPEN:
            self._respond_auth(sa, msg, now)
        elif sa.state != ESTABLISHED:
            self.count("request_in_wrong_state")
        elif msg.exchange == c.INFORMATIONAL:
            self._respond_info(sa, msg, now)
        elif msg.exchange == c.CREATE_CHILD_SA:
            self._respond_create(sa, msg, now)
        else:
            self.count("unexpected_exchange")
            self._respond(sa, msg, [m.Notify(c.N_INVALID_SYNTAX)])

    def _respond(self, sa: IkeSa, msg: m.Message, payloads: list) -> None:
        raw = sa.encrypt(msg.exchange, msg.msg_id, True, payloads)
        sa.last_response = (msg.msg_id, msg.raw, raw)
        sa.next_in_id = msg.msg_id + 1
        self._emit(sa.frame(raw))

    def _respond_auth(self, sa: IkeSa, msg: m.Message, now: float) -> None:
        idi, auth = msg.get(c.PL_IDI), msg.get(c.PL_AUTH)
        self.half_open -= 1
        self.by_init.pop(getattr(sa, "_init_key", None), None)
        sa.state = AUTH_SENT  # no longer half-open; established or dead below
        if idi is None or auth is None:
            self._respond(sa, msg, [m.Notify(c.N_AUTHENTICATION_FAILED)])
            self._kill(sa, "IKE_AUTH request without IDi/AUTH (EAP is not supported)")
            return
        peer_id = Identity(idi.id_type, idi.data)
        octets = cr.signed_octets(sa.init_req, sa.nr, sa.keys.pi, idi.body())
        peer, why = None, f"no peer is configured for identity '{peer_id}'"
        for p in self.peers:
            if p.remote_id is not None and p.remote_id != peer_id:
                continue
            if p.remote_addr is not None and p.remote_addr[0] != sa.remote[0]:
                continue
            why = self._verify_auth(p, auth, octets)
            if why is None:
                peer = p
                break
        if peer is None:
            self.count("authentication_failed")
            self._respond(sa, msg, [m.Notify(c.N_AUTHENTICATION_FAILED)])
            sa.peer = sa.peer or PeerConfig(name=str(peer_id))
            self._kill(sa, f"authentication of '{peer_id}' from {sa.remote[0]} failed: {why}")
            return
        sa.peer = peer
        sa.remote_id = str(peer_id)
        idr = self._local_id(sa, c.PL_IDR)
        want = msg.get(c.PL_IDR)
        if want is not None and peer.local_id is not None:
            if Identity(want.id_type, want.data) != peer.local_id:
                log.info("peer asked for our ID '%s', we are '%s'",
                         Identity(want.id_type, want.data), peer.local_id)  # fmt: skip
        my_octets = cr.signed_octets(sa.init_resp, sa.ni, sa.keys.pr, idr.body())
        payloads: list = [idr, self._auth_payload(sa, my_octets)]
        if self.super_packets and _announces_super(msg.notifies()):
            sa.super_packets = True
            payloads.append(m.Notify(c.N_SIMPLETUN_SUPER_PACKETS, c.SUPER_PACKETS_DATA))
        child = self._negotiate_child(sa, msg, False, sa.ni, sa.nr)
        if child is not None:
            if child.error:
                payloads.append(m.Notify(child.error, child.data))
            else:
                payloads += child.sa + child.ts
        self._respond(sa, msg, payloads)
        self._established(sa, now)
        if c.N_INITIAL_CONTACT in msg.notifies():
            for other in list(self.sas.values()):
                if (other is not sa and other.state == ESTABLISHED and other.peer is peer
                        and other.remote_id == sa.remote_id):  # fmt: skip
                    self._kill(other, "replaced by a new IKE SA (INITIAL_CONTACT)", True)
        if child is not None:
            if child.error:
                self._emit(ChildSaFailed(sa.name, c.NOTIFY_NAMES.get(child.error, "?")))
            else:
                self._install(sa, *child.install, now=now, rekey_of=None)

    def _negotiate_child(self, sa, msg, with_dh, ni, nr):
        """Responder side of a Child SA: a :class:`_ChildAnswer` (``error`` set, or the response
        payloads and the arguments of ``_install``); None if the request has no SA payload."""
        sa_pl, tsi, tsr = msg.get(c.PL_SA), msg.get(c.PL_TSI), msg.get(c.PL_TSR)
        if sa_pl is None:
            return None
        if tsi is None or tsr is None:
            return _ChildAnswer(error=c.N_INVALID_SYNTAX)
        p = sa.peer
        prop, suite = select_esp(sa_pl.proposals, p.child_suites, with_dh)
        if prop is None:
            log.info(
                "no acceptable ESP proposal: received %s",
                ", ".join(x.describe() for x in sa_pl.proposals),
            )
            return _ChildAnswer(error=c.N_NO_PROPOSAL_CHOSEN)
        ts_i = tsmod.narrow(tsi.selectors, [tsmod.from_prefix(x) for x in p.remote_ts])
        ts_r = tsmod.narrow(tsr.selectors, [tsmod.from_prefix(x) for x in p.local_ts])
        if not ts_i or not ts_r:
            log.info(
                "traffic selectors %s === %s unacceptable for peer %s",
                tsmod.describe(tsi.selectors), tsmod.describe(tsr.selectors), p.name,
            )  # fmt: skip
            return _ChildAnswer(error=c.N_TS_UNACCEPTABLE)
        ke_out: list = []
        g_ir = b""
        if suite.dh:
            ke = msg.get(c.PL_KE)
            if ke is None or ke.group != suite.dh:
                return _ChildAnswer(error=c.N_INVALID_KE_PAYLOAD,
                                    data=struct.pack("!H", suite.dh))  # fmt: skip
            dh = cr.DiffieHellman(suite.dh)
            try:
                g_ir = dh.shared(ke.data)
            except cr.DhError:
                return _ChildAnswer(error=c.N_INVALID_SYNTAX)
            ke_out = [m.KE(suite.dh, dh.public)]
        spi_in = _rand_spi4(self.child_spis)
        self.child_spis.add(spi_in)
        spi_out = struct.unpack("!I", prop.spi)[0]
        chosen = _esp_proposal(prop.number, suite, spi_in, suite.dh)
        keys = cr.child_keys(sa.keys.d, suite, ni, nr, g_ir)
        return _ChildAnswer(
            sa=[m.SA([chosen])],
            ke=ke_out,
            ts=[m.TS(c.PL_TSI, ts_i), m.TS(c.PL_TSR, ts_r)],
            install=(spi_in, spi_out, suite, keys, ts_i, ts_r, False),
        )

    def _respond_info(self, sa: IkeSa, msg: m.Message, now: float) -> None:
        if c.N_AUTHENTICATION_FAILED in msg.notifies():
            self._respond(sa, msg, [])
            self._kill(sa, "peer refused our authentication (AUTHENTICATION_FAILED): check "
                       "that the peer has our public key / PSK and expects our ID")  # fmt: skip
            return
        dels = msg.all(c.PL_DELETE)
        if any(d.protocol == c.PROTO_IKE for d in dels):
            self._respond(sa, msg, [])
            self._kill(sa, "deleted by the peer", notify_children=True)
            return
        out = []
        for d in dels:
            if d.protocol != c.PROTO_ESP:
                continue
            mine = []
            for spi in d.spis:
                spi_out = struct.unpack("!I", spi)[0]
                for ch in list(sa.children.values()):
                    if ch.spi_out == spi_out:
                        del sa.children[ch.spi_in]
                        self.child_spis.discard(ch.spi_in)
                        mine.append(struct.pack("!I", ch.spi_in))
                        self._emit(RemoveChildSa(sa.name, ch.spi_in, ch.spi_out,
                                                 "deleted by the peer"))  # fmt: skip
            if mine:
                out.append(m.Delete(c.PROTO_ESP, mine))
        self._respond(sa, msg, out)

    def _respond_create(self, sa: IkeSa, msg: m.Message, now: float) -> None:
        sa_pl, nonce = msg.get(c.PL_SA), msg.get(c.PL_NONCE)
        if sa_pl is None or nonce is None:
            self._respond(sa, msg, [m.Notify(c.N_INVALID_SYNTAX)])
            return
        if sa.outstanding is not None and sa.outstanding.exchange == c.CREATE_CHILD_SA:
            # simultaneous rekeys are not handled: let the peer retry later
            self._respond(sa, msg, [m.Notify(c.N_TEMPORARY_FAILURE)])
            return
        if sa_pl.proposals and sa_pl.proposals[0].protocol == c.PROTO_IKE:
            self._respond_rekey_ike(sa, msg, nonce, now)
            return
        rekey = msg.notifies().get(c.N_REKEY_SA)
        old = None
        if rekey is not None:
            if len(rekey.spi) != 4:
                self._respond(sa, msg, [m.Notify(c.N_INVALID_SYNTAX)])
                return
            spi_out = struct.unpack("!I", rekey.spi)[0]
            old = next((ch for ch in sa.children.values() if ch.spi_out == spi_out), None)
            if old is None:
                self._respond(sa, msg, [m.Notify(c.N_CHILD_SA_NOT_FOUND, b"", c.PROTO_ESP,
                                                 rekey.spi)])  # fmt: skip
                return
        nr = os.urandom(32)
        child = self._negotiate_child(sa, msg, True, nonce.data, nr)
        if child.error:
            self._respond(sa, msg, [m.Notify(child.error, child.data)])
            return
        self._respond(sa, msg, child.sa + [m.Nonce(nr)] + child.ke + child.ts)
        self._install(sa, *child.install, now=now, rekey_of=old)

    def _respond_rekey_ike(self, sa: IkeSa, msg: m.Message, nonce, now: float) -> None:
        ke = msg.get(c.PL_KE)
        prop, suite = select_ike(msg.get(c.PL_SA).proposals, sa.peer.ike_suites, 8)
        if prop is None:
            self._respond(sa, msg, [m.Notify(c.N_NO_PROPOSAL_CHOSEN)])
            return
        if ke is None or ke.group != suite.dh:
            self._respond(sa, msg, [m.Notify(c.N_INVALID_KE_PAYLOAD, struct.pack("!H", suite.dh))])
            return
        dh = cr.DiffieHellman(suite.dh)
        try:
            g_ir = dh.shared(ke.data)
        except cr.DhError:
            self._respond(sa, msg, [m.Notify(c.N_INVALID_SYNTAX)])
            return
        new = IkeSa(self, False, self._new_spi8(), sa.peer)
        new.peer_spi = prop.spi
        nr = os.urandom(32)
        chosen = m.Proposal(prop.number, c.PROTO_IKE, new.our_spi,
                            _ike_proposal(1, suite).transforms)  # fmt: skip
        self._respond(sa, msg, [m.SA([chosen]), m.Nonce(nr), m.KE(suite.dh, dh.public)])
        seed = cr.rekey_skeyseed(sa.keys.d, g_ir, nonce.data, nr)
        self._adopt(sa, new, suite, seed, nonce.data, nr, now)

    # ---------------------------------------------------------------- teardown

    def _kill(self, sa: IkeSa, reason: str, notify_children: bool = True) -> None:
        if sa.state == DEAD:
            return
        if sa.state == HALF_OPEN:
            self.half_open -= 1
            self.by_init.pop(getattr(sa, "_init_key", None), None)
        sa.state = DEAD
        sa.outstanding = None
        sa.queue.clear()
        for ch in list(sa.children.values()):
            self.child_spis.discard(ch.spi_in)
            if notify_children:
                self._emit(RemoveChildSa(sa.name, ch.spi_in, ch.spi_out, reason))
        sa.children.clear()
        self.sas.pop(sa.our_spi, None)
        peer = sa.peer.name if sa.peer else "?"
        # failures of SAs a remote host opened but never completed: rate-limited log lines
        unproven = not sa.initiator and sa.keys is not None and sa.remote_id == ""
        quiet = unproven and not self._log_limit.allow(sa.remote[0], self.now)
        if sa.replaced_by is None:
            self._emit(IkeSaDown(sa.name, peer, reason), quiet)
        else:
            log.info("old IKE SA %s of %s removed: %s", sa.name, peer, reason)
