"""The DataPlane binding without root: SOCK_SEQPACKET socket pairs stand in for TUN devices
(they keep packet boundaries), ESP-in-UDP runs on loopback."""

import os
import select
import socket
import struct
import time

import pytest

from simpletun import _core
from simpletun._errors import ConfigError

K1 = (bytes(range(16)), bytes(range(32)))
K2 = (bytes(range(1, 17)), bytes(range(2, 34)))


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
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
    return hdr + payload


def recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    r, _, _ = select.select([sock], [], [], timeout)
    assert r, "nothing arrived"
    return sock.recv(65536)


def wait_for(pred, what: str, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


class End:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.udp = socket.socket(fam, socket.SOCK_DGRAM)
        self.udp.bind((host, 0))
        self.addr = self.udp.getsockname()[:2]
        self.dp = _core.DataPlane(dev.fileno())
        dev.close()  # the data plane holds its own duplicate
        self.tr = self.dp.add_udp(self.udp.fileno())

    def close(self) -> None:
        self.dp.stop()
        self.app.close()
        self.udp.close()


@pytest.fixture
def pair():
    a, b = End(), End()
    pa = a.dp.add_peer(a.tr, ["10.0.2.0/24"], b.addr)
    pb = b.dp.add_peer(b.tr, ["10.0.1.0/24"])
    a.dp.set_outbound_sa(pa, 0x1000, *K1)
    b.dp.add_inbound_sa(pb, 0x1000, *K1)
    b.dp.set_outbound_sa(pb, 0x2000, *K2)
    a.dp.add_inbound_sa(pa, 0x2000, *K2)
    yield a, b, pa, pb
    a.close()
    b.close()


def test_constants_come_from_rust():
    assert _core.CONTROL_MARKER == b"\0\0\0\0"
    assert _core.MIN_SPI == 256
    assert _core.AUTH_KEY_LEN == 32
    assert _core.ENC_KEY_LENS == (16, 24, 32)
    assert _core.ESP_IN_UDP_PORT == 4500
    assert "spoofed" in _core.DP_DROP_REASONS and "no_route" in _core.DP_DROP_REASONS


def test_packets_both_ways_roaming_and_counters(pair):
    a, b, pa, pb = pair
    assert b.dp.endpoint(pb) is None
    pkt = ipv4("10.0.1.5", "10.0.2.7", b"hello over udp")
    a.app.send(pkt)
    assert recv(b.app) == pkt
    assert b.dp.endpoint(pb) == a.addr  # learnt from the authenticated packet
    back = ipv4("10.0.2.7", "10.0.1.5", b"reply")
    b.app.send(back)
    assert recv(a.app) == back
    assert a.dp.peer_stats(pa)["tx_packets"] == 1
    assert b.dp.stats["rx_packets"] == 1
    sas = {(s["spi"], s["inbound"]): s for s in b.dp.sas()}
    assert sas[(0x1000, True)]["decap_packets"] == 1
    assert sas[(0x2000, False)]["encap_packets"] == 1
    # No route, spoofed source.
    a.app.send(ipv4("10.0.1.5", "192.168.1.1", b"x"))
    wait_for(lambda: a.dp.stats["drop_no_route"] == 1, "no_route")
    a.app.send(ipv4("10.0.9.9", "10.0.2.7", b"x"))
    wait_for(lambda: b.dp.peer_stats(pb)["drop_spoofed"] == 1, "spoofed")


def test_control_messages_and_events(pair):
    a, b, pa, pb = pair
    msg = _core.CONTROL_MARKER + b"\x01hi"
    a.dp.send_control(a.tr, b.addr, msg)
    r, _, _ = select.select([b.dp.events_fd], [], [], 5)
    assert r
    assert b.dp.take_events() == [("control", b.tr, a.addr, msg)]
    r, _, _ = select.select([b.dp.events_fd], [], [], 0)
    assert not r, "the events fd is quiet once drained"
    b.dp.clear_outbound_sa(pb)
    b.dp.set_endpoint(pb, a.addr)
    b.app.send(ipv4("10.0.2.7", "10.0.1.5", b"x"))
    select.select([b.dp.events_fd], [], [], 5)
    assert b.dp.take_events() == [("no_sa", pb)]
    with pytest.raises(ConfigError, match="non-ESP marker"):
        a.dp.send_control(a.tr, b.addr, b"\x00\x00\x10\x00esp")


def test_configuration_errors(pair):
    a, _b, pa, _pb = pair
    with pytest.raises(ConfigError, match="not an IPv4/IPv6 prefix"):
        a.dp.add_peer(a.tr, ["10.0.0.0/40"])
    with pytest.raises(ConfigError, match="already allowed"):
        a.dp.add_peer(a.tr, ["10.0.2.0/24"])
    with pytest.raises(ConfigError, match="reserved"):
        a.dp.add_inbound_sa(pa, 5, *K1)
    with pytest.raises(ConfigError, match="already installed"):
        a.dp.add_inbound_sa(pa, 0x2000, *K2)
    with pytest.raises(ConfigError, match="not an IP address"):
        a.dp.set_endpoint(pa, ("example.com", 4500))
    with pytest.raises(ConfigError, match="not a UDP socket"):
        r, w = os.pipe()
        try:
            a.dp.add_udp(r)
        finally:
            os.close(r)
            os.close(w)


def test_tcp_stream_transport():
    """Two data planes over one TCP connection on loopback (2-byte frames)."""
    ends = []
    for _ in range(2):
        app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dp = _core.DataPlane(dev.fileno())
        dev.close()
        ends.append((app, dp, dp.add_tcp()))
    lst = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    (app_a, a, ta), (app_b, b, tb) = ends
    a.add_tcp_connection(ta, c.fileno(), s.getsockname()[:2])
    b.add_tcp_connection(tb, s.fileno(), c.getsockname()[:2])
    pa = a.add_peer(ta, ["0.0.0.0/0"], s.getsockname()[:2])
    pb = b.add_peer(tb, ["10.0.1.0/24"], c.getsockname()[:2])
    a.set_outbound_sa(pa, 0x1000, *K1)
    b.add_inbound_sa(pb, 0x1000, *K1)
    pkt = ipv4("10.0.1.5", "10.0.2.7", b"over tcp frames")
    for _ in range(100):
        app_a.send(pkt)
    for _ in range(100):
        assert recv(app_b) == pkt
    # the counter follows the device write: wait for it rather than race it
    wait_for(lambda: b.peer_stats(pb)["rx_packets"] == 100, "b counts the 100 packets")
    with pytest.raises(ConfigError, match="not a stream"):
        a.remove_tcp_connection(99, c.getsockname()[:2])
    c_addr = c.getsockname()[:2]
    c.close()
    assert a.remove_tcp_connection(ta, s.getsockname()[:2])
    closed: list = []
    wait_for(
        lambda: (
            closed.extend(e for e in b.take_events() if e[0] == "closed")
            or closed == [("closed", tb, c_addr, "peer closed the connection")]
        ),
        "b sees the close, with its reason",
    )
    for app, dp, _ in ends:
        dp.stop()
        app.close()
    s.close()
    lst.close()
