"""Session supervision: server and client loops over loopback TCP, with the real Rust pump and
SOCK_SEQPACKET socketpairs standing in for TUN devices (no root needed)."""

import logging
import socket
import struct
import time
from functools import partial

import pytest
import trio
from triotest import trio_test

from simpletun import handshake as hs
from simpletun import session
from simpletun._errors import ConfigError, HandshakeError
from simpletun.keys import generate_key
from simpletun.netdev import Device
from simpletun.session import Config

KEY = generate_key()


def ipv4_packet(payload: bytes, src="10.9.0.1", dst="10.9.0.2") -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + payload


class FakeDevice:
    """A packet socketpair: ``device`` goes to the tunnel, ``app`` is the 'kernel side'."""

    def __init__(self, name: str):
        self._dev, self.app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.app.setblocking(False)
        self.device = Device(fd=self._dev.fileno(), name=name)

    async def send(self, packet: bytes) -> None:
        await trio.lowlevel.wait_writable(self.app)
        self.app.send(packet)

    async def recv(self, timeout: float = 3.0) -> bytes:
        with trio.fail_after(timeout):
            while True:
                await trio.lowlevel.wait_readable(self.app)
                try:
                    return self.app.recv(65536)
                except BlockingIOError:
                    continue

    def close(self) -> None:
        self.app.close()
        self._dev.close()


@pytest.fixture
def devices():
    made = []

    def make(name):
        d = FakeDevice(name)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def server_config(**kw) -> Config:
    return Config(server=True, ifname="fake", host="127.0.0.1", port=0, **kw)


def client_config(port: int, **kw) -> Config:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    return Config(server=False, ifname="fake", host="127.0.0.1", port=port, **kw)


async def wait_for(predicate, timeout=5.0, what="condition"):
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def exchange(dev_a: FakeDevice, dev_b: FakeDevice, tag: bytes) -> None:
    """A packet written to one 'device' comes out of the other, both ways, unchanged."""
    p = ipv4_packet(b"a->b " + tag)
    await dev_a.send(p)
    assert await dev_b.recv() == p
    q = ipv4_packet(b"b->a " + tag, src="10.9.0.2", dst="10.9.0.1")
    await dev_b.send(q)
    assert await dev_a.recv() == q


# -- Config -------------------------------------------------------------------------------------


def test_config_defaults_and_frame_sizes():
    from simpletun._core import esp_encap_len

    c = Config(server=True, key=KEY)
    assert (c.port, c.mtu, c.cipher, c.tap, c.esp) == (55555, 1500, "aes-128-cbc", False, True)
    assert c.max_frame == esp_encap_len(1500)
    assert Config(server=True, key=KEY, tap=True).max_frame == esp_encap_len(1518)
    assert Config(server=True).max_frame == 1518  # plaintext
    assert Config(server=True, mtu=9000).max_frame == 9018
    assert "key=" not in repr(c)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"server": False}, "needs the server's address"),
        ({"server": True, "port": 70000}, "port must be 0-65535"),
        ({"server": False, "host": "h", "port": 0}, "port must be 1-65535"),
        ({"server": True, "mtu": 10}, "MTU must be 68-65000"),
        ({"server": True, "key": b"short"}, "32 bytes"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(**kw)


def test_offloads_on_the_userspace_data_plane_unless_switched_off(monkeypatch):
    monkeypatch.delenv("SIMPLETUN_OFFLOADS", raising=False)
    for transport in ("tcp", "udp", "raw"):
        assert Config(server=True, key=KEY, transport=transport).offloads
    kernel = Config(
        server=False, host="192.0.2.9", transport="udp", manual_keys="x", dataplane="kernel"
    )
    assert not kernel.offloads
    monkeypatch.setenv("SIMPLETUN_OFFLOADS", "0")
    assert not Config(server=True, key=KEY, transport="udp").offloads


def test_refused_tun_offloads_are_logged_once(monkeypatch, caplog):
    from simpletun import netdev

    monkeypatch.setattr(netdev, "_offloads_logged", False)
    with caplog.at_level(logging.INFO, logger="simpletun.netdev"):
        netdev._log_offloads("csum+tso+uso")  # all accepted: nothing to say
        netdev._log_offloads("csum+tso")
        netdev._log_offloads("none")
    said = [r.getMessage() for r in caplog.records if "TUN offloads" in r.getMessage()]
    assert said == ["TUN offloads: the kernel accepted csum+tso of csum+tso+uso"]


def test_backoff_doubles_from_100ms_to_a_2s_cap():
    c = Config(server=True)
    assert [c.backoff(n) for n in range(8)] == [0, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert c.backoff(10_000) == 2.0


def test_tune_socket_sets_nodelay_and_keepalive():
    with socket.socket() as s:
        session.tune_socket(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000


# -- end to end over loopback -------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-256-cbc"])
@trio_test
async def test_esp_tunnel_carries_packets_both_ways(devices, cipher):
    ds, dc = devices("srv"), devices("cli")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY, cipher=cipher), ds.device)
        client = await n.start(
            session.connect, client_config(server.port, key=KEY, cipher=cipher), dc.device
        )
        await wait_for(lambda: server.session and client.session, what="both sessions")
        await exchange(dc, ds, b"1")
        for i in range(20):
            await exchange(dc, ds, b"%d" % i)
        # SAs cross over, and the live counters show the traffic
        assert client.session.handshake.tx == server.session.handshake.rx
        assert client.session.handshake.rx == server.session.handshake.tx
        assert client.session.handshake.cipher == cipher
        assert server.sessions == client.sessions == 1
        csess, ssess = client.session, server.session
        n.cancel_scope.cancel()
    # Exact counts are read once the pumps have stopped (every batch counted), not live: a live
    # read can come before the last batch's counters are published.
    await csess.wait_ended()
    await ssess.wait_ended()
    assert csess.stats["tx_packets"] == 21
    assert ssess.stats["rx_packets"] == 21
    assert ssess.stats["tx_packets"] == csess.stats["rx_packets"] == 21
    assert csess.stats["drop_auth"] == 0


@trio_test
async def test_plaintext_wire_format_is_simpletun_c_framing(devices):
    """Length-prefixed raw packets, no handshake: what simpletun.c sends and expects."""
    ds = devices("srv")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(), ds.device)
        peer = trio.socket.socket()
        with peer:
            await peer.connect(("127.0.0.1", server.port))
            await wait_for(lambda: server.session, what="server session")
            p = ipv4_packet(b"from a simpletun.c client")
            await peer.send(struct.pack(">H", len(p)) + p)
            assert await ds.recv() == p
            q = ipv4_packet(b"to a simpletun.c client")
            await ds.send(q)
            got = b""
            with trio.fail_after(3):
                while len(got) < 2 + len(q):
                    got += await peer.recv(4096)
            assert got == struct.pack(">H", len(q)) + q
        n.cancel_scope.cancel()


@trio_test
async def test_plaintext_client_sends_nothing_but_frames(devices):
    dc = devices("cli")
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    async with trio.open_nursery() as n:
        await n.start(session.connect, client_config(port), dc.device)
        conn, _ = await listener.accept()
        with conn, listener:
            p = ipv4_packet(b"hello")
            await dc.send(p)
            with trio.fail_after(3):
                got = await conn.recv(4096)
            assert got == struct.pack(">H", len(p)) + p
        n.cancel_scope.cancel()


@trio_test
async def test_esp_client_fails_closed(devices):
    """Against a server that never completes the handshake, the client sends only ClientHello
    control frames, on every reconnect, even while packets wait in its device."""
    dc = devices("cli")
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    received = []
    config = client_config(port, key=KEY, handshake_timeout=0.2)
    async with trio.open_nursery() as n:
        client = await n.start(session.connect, config, dc.device)
        for i in range(3):
            await dc.send(ipv4_packet(b"secret %d" % i))
            conn, _ = await listener.accept()
            with conn:
                data = b""
                with trio.move_on_after(0.5):
                    while chunk := await conn.recv(4096):
                        data += chunk
            received.append(data)
        n.cancel_scope.cancel()
    listener.close()
    assert client.sessions == 0
    for data in received:
        assert len(data) == 2 + 39
        assert data[:7] == b"\x00\x27\x00\x00\x00\x00\x01"  # ClientHello, control frame
        assert b"secret" not in data


@trio_test
async def test_server_keeps_serving_after_a_client_leaves(devices):
    ds, dc1, dc2 = devices("srv"), devices("c1"), devices("c2")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY), ds.device)
        async with trio.open_nursery() as first:
            c1 = await first.start(session.connect, client_config(server.port, key=KEY), dc1.device)
            await wait_for(lambda: server.session and c1.session, what="first session")
            await exchange(dc1, ds, b"first")
            first.cancel_scope.cancel()
        # the first client is gone: the server notices the close and serves the next one
        await wait_for(lambda: server.session is None, what="server session end")
        assert server.last_exit_reason == "peer closed the connection"
        c2 = await n.start(session.connect, client_config(server.port, key=KEY), dc2.device)
        await wait_for(lambda: server.session and c2.session, what="second session")
        await exchange(dc2, ds, b"second")
        assert server.sessions == 2
        n.cancel_scope.cancel()


@trio_test
async def test_new_authenticated_session_replaces_the_old_one(devices):
    ds, dc = devices("srv"), devices("cli")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY), ds.device)
        # an older client: handshakes by hand, then just holds the connection
        old = await trio.open_tcp_stream("127.0.0.1", server.port)
        await hs.client_handshake(old, KEY)
        await wait_for(lambda: server.session, what="old session")
        old_peer = server.session.peer
        old_session = server.session
        client = await n.start(session.connect, client_config(server.port, key=KEY), dc.device)
        await wait_for(
            lambda: server.session is not None and server.session.peer != old_peer,
            what="replacement",
        )
        # the server closed the old connection, and the new client carries traffic
        with trio.fail_after(3):
            assert await old.receive_some(100) == b""
        await old.aclose()
        assert old_session.exit_reason.startswith("replaced by a new session from 127.0.0.1:")
        await wait_for(lambda: client.session, what="client session")
        await exchange(dc, ds, b"new")
        assert server.sessions == 2
        n.cancel_scope.cancel()


@trio_test
async def test_unauthenticated_connection_does_not_disturb_the_session(devices):
    ds, dc = devices("srv"), devices("cli")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY), ds.device)
        await n.start(session.connect, client_config(server.port, key=KEY), dc.device)
        await wait_for(lambda: server.session, what="session")
        current = server.session
        intruder = await trio.open_tcp_stream("127.0.0.1", server.port)
        with pytest.raises(HandshakeError, match="wrong key"):
            await hs.client_handshake(intruder, generate_key())
        await intruder.aclose()
        assert server.session is current
        await exchange(dc, ds, b"still up")
        n.cancel_scope.cancel()


@trio_test
async def test_client_reconnects_when_the_server_restarts(devices):
    ds, dc = devices("srv"), devices("cli")
    async with trio.open_nursery() as n:
        async with trio.open_nursery() as first:
            server = await first.start(session.serve, server_config(key=KEY), ds.device)
            port = server.port
            client = await n.start(
                session.connect,
                Config(server=False, ifname="fake", host="127.0.0.1", port=port, key=KEY),
                dc.device,
            )
            await wait_for(lambda: server.session and client.session, what="first session")
            await exchange(dc, ds, b"before")
            first.cancel_scope.cancel()
        await wait_for(lambda: client.session is None, what="client to notice")
        await trio.sleep(1.0)  # server down for a while: the client retries with backoff
        restarted = time.monotonic()
        again = await n.start(
            session.serve,
            Config(server=True, ifname="fake", host="127.0.0.1", port=port, key=KEY),
            ds.device,
        )
        await wait_for(lambda: again.session and client.session, timeout=5, what="resumed")
        assert time.monotonic() - restarted < 2.5  # backoff capped at 2 s
        await exchange(dc, ds, b"after")
        assert client.sessions == 2
        n.cancel_scope.cancel()


@trio_test
async def test_wrong_key_client_retries_says_why_and_server_keeps_serving(devices, caplog):
    """A rejection is not authenticated (anyone can send one), so it never ends the client: it
    is logged at error level and retried with backoff; the server keeps serving others."""
    ds, bad, good = devices("srv"), devices("bad"), devices("good")
    caplog.set_level(logging.INFO, logger="simpletun")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY), ds.device)
        wrong = await n.start(
            session.connect, client_config(server.port, key=generate_key()), bad.device
        )

        def client_errors():
            return [
                r
                for r in caplog.records
                if r.name == "simpletun.session"
                and r.levelno == logging.ERROR
                and "wrong key: the server's key confirmation does not match" in r.getMessage()
            ]

        await wait_for(lambda: len(client_errors()) >= 2, what="two rejected attempts")
        assert client_errors()[0].getMessage().endswith("; retrying")
        assert wrong.session is None and wrong.handshake_failures >= 2
        assert any("wrong key: the client" in r.getMessage() for r in caplog.records)
        client = await n.start(session.connect, client_config(server.port, key=KEY), good.device)
        await wait_for(lambda: client.session, what="good session")
        await exchange(good, ds, b"ok")
        assert wrong.session is None
        n.cancel_scope.cancel()


@trio_test
async def test_cipher_mismatch_client_retries_and_says_why(devices, caplog):
    ds, dc = devices("srv"), devices("cli")
    caplog.set_level(logging.INFO, logger="simpletun")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY), ds.device)
        client = await n.start(
            session.connect, client_config(server.port, key=KEY, cipher="aes-192-cbc"), dc.device
        )
        await wait_for(lambda: client.handshake_failures >= 2, what="two rejected attempts")
        msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("cipher mismatch: the server uses aes-128" in m for m in msgs), msgs
        assert client.session is None and server.session is None
        n.cancel_scope.cancel()


@trio_test
async def test_cancellation_stops_the_pumps_quickly(devices):
    ds, dc = devices("srv"), devices("cli")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            server = await n.start(session.serve, server_config(key=KEY), ds.device)
            client = await n.start(session.connect, client_config(server.port, key=KEY), dc.device)
            await wait_for(lambda: server.session and client.session, what="sessions")
            pumps = [server.session.pump, client.session.pump]
            sessions = [server.session, client.session]
            start = time.monotonic()
            scope.cancel()
    assert time.monotonic() - start < 1.0
    assert not any(p.running for p in pumps)
    # each was stopped, unless the other end's stop closed its connection first
    reasons = sorted(s.exit_reason for s in sessions)
    assert reasons in (["stopped", "stopped"], ["peer closed the connection", "stopped"])
    assert all(s.ended_at is not None and not s.running for s in sessions)
    # the devices are still open (serve/connect do not own them)
    await exchange_local(ds)


async def exchange_local(dev: FakeDevice) -> None:
    await dev.send(b"x")
    assert dev._dev.recv(10) == b"x"


@trio_test
async def test_listen_failure_is_a_clear_error(devices):
    ds = devices("srv")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot listen on TCP port {port}: "):
            await session.serve(
                Config(server=True, ifname="x", host="127.0.0.1", port=port), ds.device
            )


@trio_test
async def test_two_clients_with_one_key_are_named_and_back_off(devices, caplog):
    """Two clients sharing a key knock each other off; the server says why, and the clients'
    backoff grows instead of flapping ~10 times a second."""
    ds, d1, d2 = devices("srv"), devices("c1"), devices("c2")
    caplog.set_level(logging.INFO, logger="simpletun")
    async with trio.open_nursery() as n:
        server = await n.start(session.serve, server_config(key=KEY), ds.device)
        real = {
            "backoff_initial": 0.1,
            "backoff_max": 2.0,
        }  # the defaults, not the tests' fast ones
        c1 = await n.start(session.connect, client_config(server.port, key=KEY, **real), d1.device)
        c2 = await n.start(session.connect, client_config(server.port, key=KEY, **real), d2.device)
        await wait_for(lambda: server.flaps >= 2, what="two flaps", timeout=10)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "two clients are probably using" in r.getMessage()
        ]
        assert warnings, "the server did not say why sessions keep replacing each other"
        await trio.sleep(2.0)  # the backoff reaches its cap
        started = server.sessions
        await trio.sleep(4.0)
        # before: ~9 replacements a second; now each client waits the capped 2 s
        assert server.sessions - started <= 6, "clients keep flapping without backing off"
        assert c1.sessions + c2.sessions >= 3
        n.cancel_scope.cancel()


@trio_test
async def test_client_falls_back_to_version_1_for_an_old_server(devices, caplog):
    """A client whose device accepted TSO announces super-packets (handshake version 2); an
    old server (version 1 only) answers with a version mismatch: the client says so in one
    warning and reconnects at once with version 1, and the session comes up."""
    dc = devices("cli")
    dev = Device(fd=dc.device.fd, name="cli", offloads="csum+tso")
    caplog.set_level(logging.INFO, logger="simpletun")
    versions: list[int] = []

    async def old_server(stream: trio.SocketStream) -> None:
        head = await stream.receive_some(2)
        (n,) = struct.unpack(">H", head)
        hello = b""
        while len(hello) < n:
            hello += await stream.receive_some(n - len(hello))
        versions.append(hello[5])
        if hello[5] != 1:
            err = b"\0\0\0\0" + bytes([hs.MSG_ERROR, hs.ERR_VERSION_MISMATCH, 1])
            await stream.send_all(struct.pack(">H", len(err)) + err)
            return

        class Replay(trio.abc.Stream):  # hand the hello already read to the real server
            def __init__(self):
                self.buf = head + hello

            async def receive_some(self, max_bytes=None):
                if self.buf:
                    out, self.buf = self.buf[:max_bytes], self.buf[max_bytes:]
                    return out
                return await stream.receive_some(max_bytes)

            async def send_all(self, data):
                await stream.send_all(data)

            async def wait_send_all_might_not_block(self):
                pass

            async def send_eof(self):
                pass

            async def aclose(self):
                pass

        result = await hs.server_handshake(Replay(), KEY, super_packets=True)
        assert not result.super_packets
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        (listener,) = await n.start(partial(trio.serve_tcp, old_server, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        client = await n.start(session.connect, client_config(port, key=KEY), dev)
        await wait_for(lambda: client.session, what="a session after the fallback")
        assert versions == [2, 1], versions
        assert client.old_server and not client.announces_super()
        warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("older simpletun" in m and "retrying with version 1" in m for m in warn), warn
        n.cancel_scope.cancel()
