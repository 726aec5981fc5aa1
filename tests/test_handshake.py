"""The session handshake (docs/PROTOCOL.md) over trio in-memory streams and real sockets."""

import hashlib
import hmac
import struct
import time

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triotest import trio_test

from simpletun import handshake as hs
from simpletun._errors import HandshakeError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


async def run_both(client_coro, server_coro):
    """Run two coroutine functions concurrently; return their results or exceptions."""
    out = {}

    async def run(name, fn):
        try:
            out[name] = await fn()
        except Exception as e:  # collected for the test to inspect
            out[name] = e

    async with trio.open_nursery() as n:
        n.start_soon(run, "client", client_coro)
        n.start_soon(run, "server", server_coro)
    return out["client"], out["server"]


def socket_stream_pair():
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def handshake_pair(ckey=KEY, skey=KEY, ccipher="aes-128-cbc", scipher="aes-128-cbc"):
    c, s = socket_stream_pair()
    async with c, s:
        return await run_both(
            lambda: hs.client_handshake(c, ckey, ccipher),
            lambda: hs.server_handshake(s, skey, scipher),
        )


def frame(payload: bytes) -> bytes:
    return struct.pack(">H", len(payload)) + payload


def ctrl(msg_type: int, body: bytes) -> bytes:
    return frame(b"\0\0\0\0" + bytes([msg_type]) + body)


async def read_frame(stream) -> bytes:
    head = b""
    while len(head) < 2:
        head += await stream.receive_some(2 - len(head))
    (n,) = struct.unpack(">H", head)
    body = b""
    while len(body) < n:
        body += await stream.receive_some(n - len(body))
    return body


@pytest.mark.parametrize(
    "cipher,enc_len", [("aes-128-cbc", 16), ("aes-192-cbc", 24), ("aes-256-cbc", 32)]
)
@trio_test
async def test_success_gives_matching_direction_separated_sas(cipher, enc_len):
    client, server = await handshake_pair(ccipher=cipher, scipher=cipher)
    assert isinstance(client, hs.HandshakeResult), client
    assert isinstance(server, hs.HandshakeResult), server
    assert client.cipher == server.cipher == cipher
    # what one end sends with, the other receives with
    assert client.tx == server.rx
    assert client.rx == server.tx
    # and the two directions share nothing
    assert client.tx.spi != client.rx.spi
    assert client.tx.enc_key != client.rx.enc_key
    assert client.tx.auth_key != client.rx.auth_key
    for sa in (client.tx, client.rx):
        assert 256 <= sa.spi < 2**32
        assert len(sa.enc_key) == enc_len
        assert len(sa.auth_key) == 32
    assert client.tx.as_tuple() == (client.tx.spi, client.tx.enc_key, client.tx.auth_key)


@trio_test
async def test_keys_never_printed():
    client, _ = await handshake_pair()
    text = repr(client)
    assert client.tx.enc_key.hex() not in text and repr(client.tx.enc_key) not in text
    assert repr(client.tx.auth_key) not in text


@trio_test
async def test_every_connection_gets_new_keys_and_spis():
    results = [await handshake_pair() for _ in range(3)]
    keys = {r[0].tx.enc_key for r in results} | {r[0].rx.enc_key for r in results}
    spis = {r[0].tx.spi for r in results} | {r[0].rx.spi for r in results}
    assert len(keys) == 6
    assert len(spis) == 6


@trio_test
async def test_wrong_key_fails_on_both_ends_quickly():
    start = time.monotonic()
    client, server = await handshake_pair(ckey=KEY, skey=OTHER_KEY)
    assert time.monotonic() - start < 1.0
    for err in (client, server):
        assert isinstance(err, HandshakeError), err
        assert str(err).startswith("wrong key:")
        assert "same --key file" in str(err)
        assert err.code == hs.WRONG_KEY


@trio_test
async def test_cipher_mismatch_fails_on_both_ends_naming_both_ciphers():
    client, server = await handshake_pair(ccipher="aes-256-cbc", scipher="aes-128-cbc")
    assert isinstance(client, HandshakeError) and isinstance(server, HandshakeError)
    assert str(client) == (
        "cipher mismatch: the server uses aes-128-cbc, we use aes-256-cbc "
        "(pass the same --cipher on both ends)"
    )
    assert str(server) == (
        "cipher mismatch: the client uses aes-256-cbc, we use aes-128-cbc "
        "(pass the same --cipher on both ends)"
    )
    assert client.code == server.code == hs.CIPHER_MISMATCH


@trio_test
async def test_version_mismatch_answered_with_error_frame():
    c, s = trio.testing.memory_stream_pair()

    async def old_client():
        await c.send_all(ctrl(hs.MSG_CLIENT_HELLO, bytes([3, 1]) + bytes(32)))
        return await read_frame(c)

    reply, server = await run_both(old_client, lambda: hs.server_handshake(s, KEY))
    assert isinstance(server, HandshakeError)
    assert "version mismatch: the client speaks version 3, we speak 1 and 2" in str(server)
    assert reply == b"\0\0\0\0" + bytes([hs.MSG_ERROR, hs.ERR_VERSION_MISMATCH, 2])


@pytest.mark.parametrize(
    "c_super,s_super", [(True, True), (True, False), (False, True), (False, False)]
)
@trio_test
async def test_super_packets_agreed_only_when_both_announce(c_super, s_super):
    c, s = socket_stream_pair()
    async with c, s:
        client, server = await run_both(
            lambda: hs.client_handshake(c, KEY, super_packets=c_super),
            lambda: hs.server_handshake(s, KEY, super_packets=s_super),
        )
    assert isinstance(client, hs.HandshakeResult), client
    assert isinstance(server, hs.HandshakeResult), server
    assert client.super_packets == server.super_packets == (c_super and s_super)
    assert client.tx == server.rx and client.rx == server.tx


@trio_test
async def test_client_without_features_sends_exactly_version_1():
    """A client announcing nothing is byte-compatible with the old releases (39-byte hello)."""
    c, s = trio.testing.memory_stream_pair()

    async def server():
        return await read_frame(s)

    _, hello = await run_both(lambda: hs.client_handshake(c, KEY, timeout=0.2), server)
    assert len(hello) == 39 and hello[5] == 1


@trio_test
async def test_v2_hello_carries_features_and_server_agrees_to_known_ones_only():
    c, s = trio.testing.memory_stream_pair()

    async def new_client():
        await c.send_all(ctrl(hs.MSG_CLIENT_HELLO, bytes([2, 1]) + bytes(32) + bytes([0x81])))
        return await read_frame(c)

    reply, _ = await run_both(
        new_client, lambda: hs.server_handshake(s, KEY, super_packets=True, timeout=0.5)
    )
    assert len(reply) == 72
    assert reply[5] == 2 and reply[7 + 32] == hs.FEATURE_SUPER


@trio_test
async def test_old_server_turns_into_a_version_1_retry():
    """An old server (version 1 only) answers a version 2 hello with a version mismatch: the
    client raises OLD_SERVER, one line saying it retries without super-packets."""
    c, s = trio.testing.memory_stream_pair()

    async def old_server():
        hello = await read_frame(s)
        assert hello[5] == 2 and len(hello) == 40
        await s.send_all(ctrl(hs.MSG_ERROR, bytes([hs.ERR_VERSION_MISMATCH, 1])))

    client, _ = await run_both(lambda: hs.client_handshake(c, KEY, super_packets=True), old_server)
    assert isinstance(client, HandshakeError)
    assert client.code == hs.OLD_SERVER
    assert "older simpletun" in str(client) and "\n" not in str(client)


@trio_test
async def test_version_1_client_gets_a_version_1_server_hello():
    c, s = trio.testing.memory_stream_pair()

    async def old_client():
        await c.send_all(ctrl(hs.MSG_CLIENT_HELLO, bytes([1, 1]) + bytes(32)))
        return await read_frame(c)

    reply, _ = await run_both(
        old_client, lambda: hs.server_handshake(s, KEY, super_packets=True, timeout=0.5)
    )
    assert len(reply) == 71 and reply[5] == 1


@trio_test
async def test_client_reports_version_error_from_server():
    c, s = trio.testing.memory_stream_pair()

    async def new_server():
        await read_frame(s)
        await s.send_all(ctrl(hs.MSG_ERROR, bytes([hs.ERR_VERSION_MISMATCH, 7])))

    client, _ = await run_both(lambda: hs.client_handshake(c, KEY), new_server)
    assert isinstance(client, HandshakeError)
    assert "the server speaks version 7, we speak 1" in str(client)
    assert client.code == hs.VERSION_MISMATCH


class AppendToSend(trio.abc.Stream):
    """Wraps a stream; appends ``extra`` to the n-th send_all, as a peer's data plane would
    right behind its last handshake message."""

    def __init__(self, inner, n, extra):
        self.inner, self.n, self.extra, self.count = inner, n, extra, 0

    async def send_all(self, data):
        self.count += 1
        if self.count == self.n:
            data = data + self.extra
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self):
        await self.inner.send_eof()

    async def aclose(self):
        await self.inner.aclose()


@trio_test
async def test_server_reads_exactly_the_handshake_frames():
    data_frame = frame(b"\x00\x00\x01\x00" + b"esp-packet" * 20)
    c, s = socket_stream_pair()
    async with c, s:
        client_stream = AppendToSend(c, 2, data_frame)  # 2nd send = ClientFinish
        client, server = await run_both(
            lambda: hs.client_handshake(client_stream, KEY),
            lambda: hs.server_handshake(s, KEY),
        )
        assert isinstance(server, hs.HandshakeResult), server
        assert isinstance(client, hs.HandshakeResult), client
        # everything after ClientFinish is still in the socket for the data plane
        with trio.fail_after(1):
            left = await s.socket.recv(4096)
        assert left == data_frame


@trio_test
async def test_client_reads_exactly_the_handshake_frames():
    data_frame = frame(b"\x00\x00\x02\x00" + b"x" * 50)
    c, s = socket_stream_pair()
    async with c, s:
        server_stream = AppendToSend(s, 1, data_frame)  # 1st send = ServerHello
        client, server = await run_both(
            lambda: hs.client_handshake(c, KEY),
            lambda: hs.server_handshake(server_stream, KEY),
        )
        assert isinstance(client, hs.HandshakeResult), client
        with trio.fail_after(1):
            left = await c.socket.recv(4096)
        assert left == data_frame


HELLO_BODY = bytes([hs.VERSION, 1]) + bytes(32)
MALFORMED_REPLY = b"\0\0\0\0" + bytes([hs.MSG_ERROR, hs.ERR_MALFORMED, 0])


@pytest.mark.parametrize(
    "garbage,expected,reply",
    [
        # A plaintext (simpletun.c) client's first packet, an IPv4 header: no Error message
        # back, since it would land in that peer's device.
        (
            frame(bytes.fromhex("4500001c00000000400100000a0000010a000002") + bytes(8)),
            "sent a data frame instead of a handshake message (is it running with --plaintext?)",
            None,
        ),
        (b"\xff\xff" + b"x" * 100, "sent a 65535-byte frame instead of a handshake", None),
        (frame(b""), "data frame", None),
        (frame(b"\0\0\0\0"), "data frame", None),
        (ctrl(hs.MSG_CLIENT_HELLO, HELLO_BODY[:20]), "ClientHello of 25 bytes", MALFORMED_REPLY),
        (ctrl(hs.MSG_CLIENT_HELLO, HELLO_BODY + b"x"), "ClientHello of 40 bytes", MALFORMED_REPLY),
        (ctrl(hs.MSG_CLIENT_HELLO, b"\x01"), "ClientHello too short", MALFORMED_REPLY),
        (
            ctrl(hs.MSG_CLIENT_FINISH, bytes(32)),
            "expected ClientHello, got type 3",
            MALFORMED_REPLY,
        ),
        (ctrl(99, b""), "expected ClientHello, got type 99", MALFORMED_REPLY),
    ],
)
@trio_test
async def test_server_rejects_garbage(garbage, expected, reply):
    c, s = trio.testing.memory_stream_pair()

    async def bad_client():
        await c.send_all(garbage)
        data = b""
        while chunk := await c.receive_some():
            data += chunk
        return data

    async def server():
        async with s:
            return await hs.server_handshake(s, KEY, timeout=2)

    got, err = await run_both(bad_client, server)
    assert isinstance(err, HandshakeError), err
    assert expected in str(err)
    assert err.code == hs.MALFORMED
    # a peer speaking the handshake is told, so that it can say so too
    assert got == (frame(reply) if reply else b"")


@pytest.mark.parametrize(
    "partial",
    [b"", b"\x00", frame(b"\0\0\0\0\x01\x01\x01" + bytes(32))[:20]],
    ids=["nothing", "half-length", "truncated-hello"],
)
@trio_test
async def test_server_reports_truncated_handshake(partial):
    c, s = trio.testing.memory_stream_pair()

    async def quitter():
        await c.send_all(partial)
        await c.aclose()

    _, server = await run_both(quitter, lambda: hs.server_handshake(s, KEY, timeout=2))
    assert isinstance(server, HandshakeError)
    assert str(server) == "peer closed the connection during the handshake"
    assert server.code == hs.CLOSED


@trio_test
async def test_server_times_out_silent_client():
    c, s = trio.testing.memory_stream_pair()
    start = time.monotonic()
    with pytest.raises(HandshakeError, match="did not complete the handshake within 0.2 s") as e:
        await hs.server_handshake(s, KEY, timeout=0.2)
    assert time.monotonic() - start < 1
    assert e.value.code == hs.TIMEOUT


@trio_test
async def test_client_times_out_silent_server():
    c, s = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeError, match="no handshake reply from the server within 0.2 s"):
        await hs.client_handshake(c, KEY, timeout=0.2)


@pytest.mark.parametrize(
    "reply,expected",
    [
        (ctrl(hs.MSG_SERVER_HELLO, bytes([1, 1]) + bytes(10)), "ServerHello of 17 bytes"),
        (ctrl(hs.MSG_SERVER_HELLO, bytes([1, 3]) + bytes(64)), "does not echo"),
        (ctrl(hs.MSG_CLIENT_HELLO, HELLO_BODY), "expected ServerHello, got type 1"),
        (frame(b"\x45" + bytes(40)), "data frame"),
        (ctrl(hs.MSG_ERROR, bytes([hs.ERR_MALFORMED, 0])), "rejected our handshake message"),
        (ctrl(hs.MSG_ERROR, bytes([200, 0])), "aborted the handshake (error code 200)"),
        (ctrl(hs.MSG_ERROR, b""), "aborted the handshake (error code 0)"),
    ],
)
@trio_test
async def test_client_rejects_bad_server_replies(reply, expected):
    c, s = trio.testing.memory_stream_pair()

    async def bad_server():
        await read_frame(s)
        await s.send_all(reply)

    client, _ = await run_both(lambda: hs.client_handshake(c, KEY, timeout=2), bad_server)
    assert isinstance(client, HandshakeError), client
    assert expected in str(client)


@trio_test
async def test_replayed_server_hello_from_earlier_connection_is_rejected():
    # Record a real ServerHello ...
    c, s = trio.testing.memory_stream_pair()
    recorded = {}

    async def recording_client():
        await c.send_all(ctrl(hs.MSG_CLIENT_HELLO, HELLO_BODY))
        recorded["server_hello"] = await read_frame(c)

    await run_both(recording_client, lambda: hs.server_handshake(s, KEY, timeout=0.3))
    # ... and play it to a new client: its nonce differs, so the confirmation cannot verify.
    c, s = trio.testing.memory_stream_pair()

    async def replaying_server():
        await read_frame(s)
        await s.send_all(frame(recorded["server_hello"]))

    client, _ = await run_both(lambda: hs.client_handshake(c, KEY), replaying_server)
    assert isinstance(client, HandshakeError)
    assert client.code == hs.WRONG_KEY


@trio_test
async def test_replayed_client_finish_from_earlier_connection_is_rejected():
    c, s = trio.testing.memory_stream_pair()
    sent = []

    class Recorder(AppendToSend):
        async def send_all(self, data):
            sent.append(bytes(data))
            await self.inner.send_all(data)

    client, server = await run_both(
        lambda: hs.client_handshake(Recorder(c, 0, b""), KEY), lambda: hs.server_handshake(s, KEY)
    )
    assert isinstance(server, hs.HandshakeResult)
    hello, finish = sent
    # A replay of the whole client side to a new server: the new server nonce breaks it.
    c, s = trio.testing.memory_stream_pair()

    async def replayer():
        await c.send_all(hello)
        await read_frame(c)
        await c.send_all(finish)
        return await read_frame(c)

    reply, server = await run_both(replayer, lambda: hs.server_handshake(s, KEY))
    assert isinstance(server, HandshakeError)
    assert server.code == hs.WRONG_KEY
    assert reply == b"\0\0\0\0" + bytes([hs.MSG_ERROR, hs.ERR_WRONG_KEY, 0])


# -- key schedule -------------------------------------------------------------------------------

VECTOR = {
    "th": "d173c239f9460aa64a9903bf91e695191cdab4562deaae070c8a78032e10912a",
    "c2s_spi": 0x499A120D,
    "s2c_spi": 0xEF509E34,
    "c2s_enc": "0dce2b4a26e4933db4d4fea98395ea1d",
    "c2s_auth": "a8ea4837e23692c2c1d5bcea7d9095be550e25bbe431cc68c54e37c90130d6b5",
    "s2c_enc": "718995bdbac8ceae9437672d7f308ef7",
    "s2c_auth": "a2aaf17a3dcebd7e7894b5dc32fce8d5d7d2cdf2a04f22454337b6688172994b",
    "server_mac": "f9fc78cde15ecd7a793ee90223bcba928cb6192f5debca26cdc7e4016d781f07",
    "client_mac": "20919c36c81f33d20f433071659caad1f117b0fd980a5b9512e52eb709ec8b1f",
}


def vector_inputs():
    key = bytes(range(32))
    nonce_c, nonce_s = bytes(range(0x20, 0x40)), bytes(range(0x40, 0x60))
    hello = b"\0\0\0\0" + bytes([1, 1, 1]) + nonce_c
    head = b"\0\0\0\0" + bytes([2, 1, 1]) + nonce_s
    return key, nonce_c, nonce_s, hello, head


def test_key_schedule_matches_protocol_md_vector_by_independent_hkdf():
    key, nonce_c, nonce_s, hello, head = vector_inputs()
    th = hashlib.sha256(hello + head).digest()
    assert th.hex() == VECTOR["th"]

    def x(label, n):  # RFC 5869 HKDF (extract + expand) as PROTOCOL.md states it
        return HKDF(
            hashes.SHA256(), n, salt=nonce_c + nonce_s, info=b"simpletun v1 " + label + th
        ).derive(key)

    assert 256 + int.from_bytes(x(b"c2s spi", 4), "big") % (2**32 - 256) == VECTOR["c2s_spi"]
    assert 256 + int.from_bytes(x(b"s2c spi", 4), "big") % (2**32 - 256) == VECTOR["s2c_spi"]
    for name in ("c2s_enc", "s2c_enc"):
        assert x(name.replace("_", " ").encode(), 16).hex() == VECTOR[name]
    for name in ("c2s_auth", "s2c_auth"):
        assert x(name.replace("_", " ").encode(), 32).hex() == VECTOR[name]
    smac = hmac.new(x(b"server confirm", 32), th, hashlib.sha256).hexdigest()
    cmac = hmac.new(x(b"client confirm", 32), th, hashlib.sha256).hexdigest()
    assert smac == VECTOR["server_mac"] and cmac == VECTOR["client_mac"]

    # and the implementation agrees
    k = hs.derive(key, "aes-128-cbc", nonce_c, nonce_s, th)
    assert hs.transcript_hash(hello, head).hex() == VECTOR["th"]
    for name in ("c2s_spi", "s2c_spi"):
        assert k[name] == VECTOR[name]
    for name in ("c2s_enc", "s2c_enc", "c2s_auth", "s2c_auth"):
        assert k[name].hex() == VECTOR[name]


def test_protocol_md_carries_the_same_vector():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    for name, value in VECTOR.items():
        shown = f"0x{value:08x}" if isinstance(value, int) else value
        assert shown in doc, name


def test_spis_are_at_least_256_and_distinct_even_on_collision(monkeypatch):
    assert hs._spi(b"\0\0\0\0") == 256
    assert hs._spi((2**32 - 256).to_bytes(4, "big")) == 256
    assert hs._spi(b"\xff\xff\xff\xff") == 255 + 256
    assert max(hs._spi(i.to_bytes(4, "big")) for i in range(2**32 - 300, 2**32)) < 2**32
    monkeypatch.setattr(hs, "_spi", lambda raw: 2**32 - 1)
    k = hs.derive(KEY, "aes-128-cbc", bytes(32), bytes(32), bytes(32))
    assert k["c2s_spi"] == 2**32 - 1
    assert k["s2c_spi"] == 256


def test_cipher_is_bound_into_the_keys():
    a = hs.derive(KEY, "aes-256-cbc", bytes(32), bytes(32), bytes(32))
    th2 = hashlib.sha256(b"other transcript").digest()
    b = hs.derive(KEY, "aes-256-cbc", bytes(32), bytes(32), th2)
    assert a["c2s_enc"] != b["c2s_enc"] and a["c_confirm"] != b["c_confirm"]


# -- robustness ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_server_survives_arbitrary_bytes(data):
    async def main():
        c, s = trio.testing.memory_stream_pair()

        async def fuzzer():
            await c.send_all(data)
            await c.aclose()

        with trio.fail_after(5):
            _, server = await run_both(fuzzer, lambda: hs.server_handshake(s, KEY, timeout=2))
        assert isinstance(server, HandshakeError), server
        assert server.code in (hs.MALFORMED, hs.CLOSED, hs.VERSION_MISMATCH, hs.CIPHER_MISMATCH)

    trio.run(main)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_client_survives_arbitrary_bytes(data):
    async def main():
        c, s = trio.testing.memory_stream_pair()

        async def fuzzer():
            await read_frame(s)
            await s.send_all(data)
            await s.aclose()

        with trio.fail_after(5):
            client, _ = await run_both(lambda: hs.client_handshake(c, KEY, timeout=2), fuzzer)
        assert isinstance(client, HandshakeError), client

    trio.run(main)


def test_bad_arguments_are_programming_errors():
    async def main():
        c, _ = trio.testing.memory_stream_pair()
        with pytest.raises(ValueError, match="32 bytes"):
            await hs.client_handshake(c, b"short")
        with pytest.raises(ValueError, match="unknown cipher"):
            await hs.client_handshake(c, KEY, "des")

    trio.run(main)
