"""A man-in-the-middle between client and server (ESP, TUN): the client in B connects to a
frame-aware proxy in A (tests/netns/mitm.py), which relays to the server on A's loopback.

Each test tampers with the frames of one session, checks that ping keeps working, then cuts the
connection so that both ends log the session's counters (``-d``: "session with PEER counters:
..."), and asserts that exactly the bad frames were dropped, each under its reason. The client
reconnects by itself for the next test.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from .conftest import require, tunnel_prerequisites
from .lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A_ADDR, Lab, wait_until
from .mitm import C2S, S2C, FrameProxy
from .tunnel import PORT, TunnelPair, counter, drops, session_counters

pytestmark = pytest.mark.netns

PROXY_PORT = 55560


class Mitm:
    def __init__(self, lab: Lab, proxy: FrameProxy, t: TunnelPair):
        self.lab = lab
        self.proxy = proxy
        self.t = t

    def begin(self) -> None:
        """Wait for a fresh session through the proxy, with traffic flowing."""
        self.t.wait_up(15)
        self.srv_sessions = len(session_counters(self.t.server.stderr()))
        self.cli_sessions = len(session_counters(self.t.client.stderr()))
        self.connections = self.proxy.connections

    def ping(self, count: int = 1, wait: float = 1.0) -> int:
        return self.lab.ping(self.lab.ns_b, TUN_A_ADDR, count=count, interval=0.05, wait=wait)[1]

    def end(self) -> tuple[dict, dict]:
        """Cut the proxied connection; returns the (server, client) counters of the session."""
        assert self.t.server.alive(), f"the server died\n{self.t.logs()}"
        assert self.t.client.alive(), f"the client died\n{self.t.logs()}"
        assert self.proxy.connections == self.connections, "the session was not the same one"
        self.proxy.cut()

        def ended():
            srv = session_counters(self.t.server.stderr())
            cli = session_counters(self.t.client.stderr())
            if len(srv) > self.srv_sessions and len(cli) > self.cli_sessions:
                return srv[self.srv_sessions], cli[self.cli_sessions]
            return None

        got = wait_until(ended, 10)
        assert got, f"no session-end counters logged after the cut\n{self.t.logs()}"
        return got


@pytest.fixture(scope="module")
def mitm(tmp_path_factory, keys):
    require(tunnel_prerequisites())
    lab = Lab(tmp_path_factory.mktemp("mitm"))
    proxy = None
    try:
        listener = lab.socket_in(lab.ns_a, socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((VETH_A_ADDR, PROXY_PORT))
        listener.listen(4)
        proxy = FrameProxy(
            listener,
            lambda: lab.socket_in(lab.ns_a, socket.AF_INET, socket.SOCK_STREAM),
            ("127.0.0.1", PORT),
        )
        t = TunnelPair(lab, key_a=keys[0], client_port=PROXY_PORT)
        t.start()
        yield Mitm(lab, proxy, t)
    finally:
        if proxy is not None:
            proxy.close()
        lab.close()


@pytest.fixture
def m(mitm):
    mitm.begin()
    return mitm


def _spi_seq(m: Mitm, direction: str = C2S) -> tuple[int, int]:
    return m.proxy.stats[direction].esp_seqs[-1]


def test_duplicated_frame_dropped_as_replay(m, checked):
    a = m.proxy.arm(C2S, "dup")
    assert m.ping(1) == 1
    assert a.wait(2)
    assert m.ping(3) == 3
    srv, cli = m.end()
    assert drops(srv) == {"drop_replay": 1}, srv
    assert drops(cli) == {}
    spi, seq = struct.unpack_from(">II", a.frame)
    checked.append(
        f"frame SPI 0x{spi:08x} seq {seq} sent twice: server drop_replay=1, "
        "nothing else dropped; ping 1/1 then 3/3"
    )


@pytest.mark.parametrize(
    "offset,reason,what",
    [
        (-1, "drop_auth", "last ICV byte"),
        (40, "drop_auth", "a ciphertext byte"),
        (12, "drop_auth", "an IV byte"),
        (4, "drop_auth", "the top sequence number byte"),
        (0, "drop_unknown_spi", "the first SPI byte"),
    ],
    ids=["icv", "ciphertext", "iv", "seq", "spi"],
)
def test_corrupted_frame_dropped(m, checked, offset, reason, what):
    a = m.proxy.arm(C2S, "corrupt", offset=offset)
    assert m.ping(1, wait=0.5) == 0, "the corrupted echo request was answered"
    assert a.wait(1)
    assert m.ping(3) == 3, "the tunnel stopped carrying good traffic"
    srv, cli = m.end()
    assert drops(srv) == {reason: 1}, srv
    checked.append(f"flipped {what}: server {reason}=1 and nothing else; ping 0/1 then 3/3")


@pytest.mark.parametrize(
    "length,what",
    [
        (20, "20 bytes (shorter than an ESP header+IV+ICV)"),
        (-7, "7 bytes less (not a whole number of AES blocks)"),
    ],
    ids=["tiny", "unaligned"],
)
def test_truncated_frame_dropped_as_bad_length(m, checked, length, what):
    a = m.proxy.arm(C2S, "truncate", length=length)  # negative: that many bytes short
    assert m.ping(1, wait=0.5) == 0
    assert a.wait(1)
    assert m.ping(3) == 3
    srv, _ = m.end()
    assert drops(srv) == {"drop_bad_length": 1}, srv
    checked.append(
        f"frame cut to {what}, prefix rewritten: server drop_bad_length=1; ping 0/1 then 3/3"
    )


def test_reordered_frames_are_both_accepted(m, checked):
    a = m.proxy.arm(C2S, "hold")
    sent, got, _ = m.lab.ping(m.lab.ns_b, TUN_A_ADDR, count=3, interval=0.2, wait=1.5)
    assert a.wait(2), "the held frame was never released"
    assert got == 3, "a frame that arrived out of order (inside the replay window) was lost"
    srv, _ = m.end()
    assert drops(srv) == {}, srv
    spi, seq = struct.unpack_from(">II", a.frame)
    checked.append(
        f"seq {seq} delivered after seq {seq + 1} (swapped): both accepted, no drop, ping 3/3"
    )


def test_replayed_old_frame_dropped_as_replay(m, checked):
    a = m.proxy.arm(C2S, "capture")
    assert m.ping(1) == 1 and a.wait(1)
    assert m.ping(5) == 5
    m.proxy.inject_frame(C2S, a.frame)
    assert m.ping(3) == 3
    srv, _ = m.end()
    assert drops(srv) == {"drop_replay": 1}, srv
    _, seq = struct.unpack_from(">II", a.frame)
    checked.append(
        f"frame seq {seq} captured and re-injected after 5 more pings: server "
        "drop_replay=1; ping 3/3"
    )


def test_injected_frames_dropped_under_their_reasons(m, checked):
    assert m.ping(2) == 2
    spi, seq = _spi_seq(m)
    body = os.urandom(16 + 64 + 16)  # IV, 4 blocks, ICV: a well-formed length
    forged = [
        (struct.pack(">II", spi, seq + 1000) + body, "drop_auth", "forged frame, right SPI"),
        (struct.pack(">II", spi ^ 0x5A5A, seq + 1) + body, "drop_unknown_spi", "unknown SPI"),
        (b"\x00\x00\x00\x00\x01" + os.urandom(40), "drop_control", "control frame mid-session"),
        (struct.pack(">II", spi, seq + 2) + os.urandom(10), "drop_bad_length", "18-byte frame"),
    ]
    for payload, _, _ in forged:
        m.proxy.inject_frame(C2S, payload)
    assert m.ping(3) == 3
    forwarded = m.proxy.stats[C2S].esp_frames
    srv, cli = m.end()
    expect = {}
    for _, reason, _ in forged:
        expect[reason] = expect.get(reason, 0) + 1
    assert drops(srv) == expect, srv
    # what the server delivered is exactly what the proxy relayed, none of the injected frames
    assert counter(srv, "rx_packets") == forwarded
    for _, reason, what in forged:
        checked.append(f"injected {what}: server {reason}=1")
    checked.append(
        f"no injected frame was delivered: server rx_packets={forwarded} = ESP frames "
        "the proxy relayed; ping 3/3"
    )


def _super_agreed(m: Mitm) -> bool:
    """Both ends agreed super-packets in the relayed handshake (version 2, features bit 1)."""
    from simpletun import handshake

    sh = m.proxy.stats[S2C].controls[0]
    return sh[5] == handshake.VERSION_FEATURES and bool(sh[7 + handshake.NONCE_LEN] & 1)


def test_oversized_length_prefix_refused_without_crash(m, checked):
    from simpletun._core import esp_encap_len

    # With super-packets agreed both ends take frames up to the 2-byte length's 65535: no
    # length prefix is oversized then, and such frames of random bytes are unknown SPIs.
    agreed = _super_agreed(m)
    max_frame = 65535 - 1 if agreed else esp_encap_len(1500)
    pid = m.t.server.pid
    rss0 = _rss_kib(pid)
    n = 200
    for i in range(n):
        size = 65535 if i % 2 else max_frame + 1
        m.proxy.inject(C2S, struct.pack(">H", size) + os.urandom(size))
    assert m.ping(3) == 3, "the stream lost sync after skipping oversized frames"
    rss1 = _rss_kib(pid)
    srv, _ = m.end()
    assert drops(srv) == {"drop_unknown_spi" if agreed else "drop_oversize": n}, srv
    assert m.t.server.alive()
    assert rss1 - rss0 < 8 * 1024, f"server RSS grew by {rss1 - rss0} KiB"
    checked.append(
        f"{n} frames with length prefixes {max_frame + 1} (max frame {max_frame} + 1) and 65535,"
        f" bodies included ({n // 2 * (65537 + max_frame + 3) // 1024} KiB): server "
        f"{'drop_unknown_spi (super-packets agreed)' if agreed else 'drop_oversize'}={n}, "
        f"still running, RSS {rss0} -> {rss1} KiB; stream in sync, ping 3/3"
    )


def test_corruption_towards_the_client_is_counted_by_the_client(m, checked):
    a = m.proxy.arm(S2C, "corrupt", offset=-1)
    assert m.ping(1, wait=0.5) == 0, "the corrupted echo reply reached ping"
    assert a.wait(1)
    d = m.proxy.arm(S2C, "dup")
    assert m.ping(1) == 1 and d.wait(1)
    assert m.ping(3) == 3
    srv, cli = m.end()
    assert drops(cli) == {"drop_auth": 1, "drop_replay": 1}, cli
    assert drops(srv) == {}
    checked.append(
        "server->client: corrupted reply -> client drop_auth=1, duplicated reply -> "
        "client drop_replay=1, server no drops; ping 3/3"
    )


def _session_keys(m: Mitm) -> dict:
    """The session's SA keys, as a MITM holding the pre-shared key derives them from the
    handshake it relayed (docs/PROTOCOL.md key schedule)."""
    from simpletun import handshake, keys

    ch = m.proxy.stats[C2S].controls[0]
    sh = m.proxy.stats[S2C].controls[0]
    assert ch[4] == handshake.MSG_CLIENT_HELLO and sh[4] == handshake.MSG_SERVER_HELLO
    n = handshake.NONCE_LEN
    head = sh[: -handshake.MAC_LEN]  # version 1 or 2 (with the features byte)
    th = handshake.transcript_hash(ch, head)
    psk = keys.load_key(str(m.t.key_a))
    return handshake.derive(psk, "aes-128-cbc", ch[7 : 7 + n], sh[7 : 7 + n], th)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _icmp_echo(src: str, dst: str, payload: bytes) -> bytes:
    icmp = struct.pack(">BBHHH", 8, 0, 0, 0x5354, 1) + payload
    icmp = icmp[:2] + struct.pack(">H", _checksum(icmp)) + icmp[4:]
    hdr = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0x4000, 64, 1, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    hdr = hdr[:10] + struct.pack(">H", _checksum(hdr)) + hdr[12:]
    return hdr + icmp


def _esp(k: dict, seq: int, inner: bytes, nh: int, *, bad_pad: bool = False) -> bytes:
    """An ESP packet built from scratch (RFC 4303, AES-CBC + HMAC-SHA-256-128) with the
    session's c2s keys: authentic, so only what is inside can be wrong."""
    import hmac

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    padlen = -(len(inner) + 2) % 16
    assert padlen > 0
    pad = bytes(padlen) if bad_pad else bytes(range(1, padlen + 1))
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(k["c2s_enc"]), modes.CBC(iv)).encryptor()
    ct = enc.update(inner + pad + bytes([padlen, nh])) + enc.finalize()
    body = struct.pack(">II", k["c2s_spi"], seq) + iv + ct
    return body + hmac.new(k["c2s_auth"], body, "sha256").digest()[:16]


def test_authentic_forgeries_dropped_by_trailer_and_inner_checks(m, checked):
    """With the pre-shared key, the MITM derives the session keys and forges authentic packets
    into sequence numbers it swallowed: a valid echo request is delivered (positive control of
    the forging), a dummy packet (next header 59) is silently discarded, bad padding bytes are
    dropped as bad_padding and an IPv6 packet labelled IPv4 as bad_inner."""
    k = _session_keys(m)
    assert k["c2s_spi"] == _spi_seq(m)[0], "derived SPI differs from the one on the wire"
    seqs = []
    for _ in range(4):
        a = m.proxy.arm(C2S, "swallow")
        assert m.ping(1, wait=0.3) == 0
        assert a.wait(1)
        seqs.append(struct.unpack_from(">I", a.frame, 4)[0])
    echo = _icmp_echo(TUN_B_ADDR, TUN_A_ADDR, b"forged-by-the-mitm-" + bytes(18))
    ipv6 = bytes([0x60]) + bytes(39 + 25)
    forged = [
        (_esp(k, seqs[0], echo, 4), "valid echo request", "delivered"),
        (_esp(k, seqs[1], echo, 59), "dummy packet (next header 59)", "discarded, not counted"),
        (_esp(k, seqs[2], echo, 4, bad_pad=True), "bad padding bytes", "drop_bad_padding=1"),
        (_esp(k, seqs[3], ipv6, 4), "IPv6 packet with next header 4", "drop_bad_inner=1"),
    ]
    for payload, _, _ in forged:
        m.proxy.inject_frame(C2S, payload)
    assert m.ping(3) == 3
    relayed = m.proxy.stats[C2S].esp_frames - len(seqs)  # minus the swallowed ones
    srv, _ = m.end()
    assert drops(srv) == {"drop_bad_padding": 1, "drop_bad_inner": 1}, srv
    assert counter(srv, "rx_packets") == relayed + 1, "the valid forged packet was not delivered"
    for _, what, result in forged:
        checked.append(f"authentic forged {what} in a swallowed seq: {result}")
    checked.append(f"server rx_packets={relayed + 1} = {relayed} relayed + the valid forgery")


def test_connection_cut_mid_frame_recovers(m, checked):
    assert m.ping(1) == 1
    n_conn = m.proxy.connections
    m.proxy.inject(C2S, struct.pack(">H", 1000) + os.urandom(300))  # a frame cut short
    time.sleep(0.2)
    m.proxy.cut()
    assert m.proxy.wait_connections(n_conn + 1, 10), "the client did not reconnect"
    took = m.t.wait_up(10)
    assert m.t.server.alive() and m.t.client.alive()
    checked.append(
        f"stream cut 300 bytes into a 1000-byte frame: both ends survive, client "
        f"reconnected, ping again after {took:.2f} s"
    )


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
