"""The PSK handshake over UDP control datagrams, as sans-IO state machines (no sockets)."""

import pytest

from simpletun import datagram as dg
from simpletun import handshake as hs
from simpletun._core import CONTROL_MARKER

KEY = bytes(range(32))
ADDR = ("192.0.2.7", 40000)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run(client, server, addr=ADDR):
    """Deliver messages both ways until done; returns (Accepted list, messages sent)."""
    accepted, msgs = [], 0
    out = client.current
    while out is not None and client.result is None:
        msgs += 1
        reply, acc = server.handle(out, addr)
        if acc:
            accepted.append(acc)
        if reply is None:
            break
        msgs += 1
        out = client.handle(reply)
    return accepted, msgs


def test_handshake_gives_mirrored_sas_and_server_holds_no_state_before_proof():
    server = dg.UdpServerHandshake(KEY)
    client = dg.UdpClientHandshake(KEY)
    hello = client.current
    assert hello[:4] == CONTROL_MARKER and len(hello) == dg.HELLO_MIN_LEN
    sh, acc = server.handle(hello, ADDR)
    assert acc is None and len(sh) == dg.SERVER_HELLO_LEN <= len(hello), "no amplification"
    assert server._accepted == {}, "no state for an unproven client"
    finish = client.handle(sh)
    assert len(finish) == dg.FINISH_LEN
    ack, acc = server.handle(finish, ADDR)
    assert acc is not None and acc.addr == ADDR
    assert client.handle(ack) is None and client.result is not None
    c, s = client.result, acc.result
    assert (c.tx, c.rx) == (s.rx, s.tx)
    assert c.tx.spi != c.rx.spi and min(c.tx.spi, c.rx.spi) >= hs.MIN_SPI


def test_retransmissions_are_answered_alike_and_install_once():
    server = dg.UdpServerHandshake(KEY)
    client = dg.UdpClientHandshake(KEY)
    sh1, _ = server.handle(client.current, ADDR)
    sh2, _ = server.handle(client.current, ADDR)
    assert sh1 == sh2, "a repeated ClientHello gets the same ServerHello (stateless)"
    finish = client.handle(sh1)
    assert client.handle(sh2) is None, "a duplicate ServerHello changes nothing"
    ack1, acc1 = server.handle(finish, ADDR)
    ack2, acc2 = server.handle(finish, ADDR)
    assert acc1 is not None and acc2 is None and ack1 == ack2
    client.handle(ack1)
    assert client.result is not None


def test_wrong_key_is_suspected_not_fatal_and_server_installs_nothing():
    server = dg.UdpServerHandshake(bytes(32))
    client = dg.UdpClientHandshake(KEY)
    accepted, _ = run(client, server)
    assert accepted == [] and client.result is None
    assert client.suspect is not None and client.suspect.code == hs.WRONG_KEY


def test_cipher_mismatch_reported_by_error_message():
    server = dg.UdpServerHandshake(KEY, "aes-256-cbc")
    client = dg.UdpClientHandshake(KEY, "aes-128-cbc")
    run(client, server)
    assert client.result is None and client.suspect.code == hs.CIPHER_MISMATCH
    assert "aes-256-cbc" in str(client.suspect)


def test_finish_from_another_address_or_too_late_does_not_verify():
    clock = Clock()
    server = dg.UdpServerHandshake(KEY, clock=clock)
    client = dg.UdpClientHandshake(KEY)
    finish = client.handle(server.handle(client.current, ADDR)[0])
    assert server.handle(finish, ("192.0.2.8", 40000)) == (None, None)
    clock.t += 2 * dg.COOKIE_PERIOD + 1
    assert server.handle(finish, ADDR) == (None, None)
    # One bucket later is still fine.
    client = dg.UdpClientHandshake(KEY)
    finish = client.handle(server.handle(client.current, ADDR)[0])
    clock.t += dg.COOKIE_PERIOD
    assert server.handle(finish, ADDR)[1] is not None


@pytest.mark.parametrize(
    "msg",
    [
        b"",
        b"\x00\x00\x00\x00",
        CONTROL_MARKER + bytes([hs.MSG_CLIENT_HELLO, hs.VERSION, 1]) + bytes(32),  # unpadded
        CONTROL_MARKER + bytes([hs.MSG_CLIENT_FINISH]) + bytes(64),  # bogus proof
        CONTROL_MARKER + bytes([hs.MSG_CLIENT_FINISH]) + bytes(10),
        CONTROL_MARKER + bytes([99]) + bytes(100),
        CONTROL_MARKER + bytes([hs.MSG_ERROR]),
        b"\x01\x02\x03\x04\x05\x06",
    ],
)
def test_junk_gets_no_answer_and_no_state(msg):
    server = dg.UdpServerHandshake(KEY)
    assert server.handle(msg, ADDR) == (None, None)
    assert server._accepted == {}


def test_forged_ack_or_server_hello_is_ignored_by_the_client():
    client = dg.UdpClientHandshake(KEY)
    assert client.handle(CONTROL_MARKER + bytes([dg.MSG_SERVER_ACK]) + bytes(32)) is None
    server = dg.UdpServerHandshake(KEY)
    client.handle(server.handle(client.current, ADDR)[0])
    assert client.handle(CONTROL_MARKER + bytes([dg.MSG_SERVER_ACK]) + bytes(32)) is None
    assert client.result is None


def test_cli_transport_flag(tmp_path, capsys):
    from simpletun import cli
    from simpletun.keys import encode_key, generate_key

    key = tmp_path / "key"
    key.write_text(encode_key(generate_key()) + "\n")
    key.chmod(0o600)
    config, _ = cli.parse_args(["-i", "tun0", "-s", "--key", str(key), "--transport", "udp"])
    assert (config.transport, config.port) == ("udp", 4500)
    config, _ = cli.parse_args(["-i", "tun0", "-c", "h", "--key", str(key), "--transport", "raw"])
    assert (config.transport, config.port) == ("raw", 4500)
    config, _ = cli.parse_args(["-i", "tun0", "-s", "--key", str(key)])
    assert (config.transport, config.port) == ("tcp", 55555)
    assert cli.main(["-i", "tun0", "-s", "--plaintext", "--transport", "udp"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "simpletun: error: --transport udp needs --key: plaintext (simpletun.c) is TCP only\n"
    )
    assert cli.main(["-i", "tun0", "-s", "--key", str(key), "--transport", "sctp"]) == 2
    assert "--transport" in capsys.readouterr().err
