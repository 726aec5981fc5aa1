"""The IKEv2 codec and the responder's handling of malformed input: round trips, strongSwan-style
summaries, every truncation, every corrupted byte, bad lengths, unknown critical payloads
(with the notification RFC 7296 asks for), never an exception, never state for garbage."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ike_net import Net

from simpletun.ike import Endpoint, PeerConfig, Send
from simpletun.ike import const as c
from simpletun.ike import message as m
from simpletun.ike import ts as tsmod

PSK = b"k" * 32
I_IP, R_IP = "192.0.2.1", "192.0.2.2"


def peers():
    ini = PeerConfig(name="r", local_ts=["10.1.0.0/24"], remote_ts=["10.2.0.0/24"], psk=PSK,
                     remote_addr=(R_IP, 500), local_addr=I_IP)  # fmt: skip
    res = PeerConfig(name="i", local_ts=["10.2.0.0/24"], remote_ts=["10.1.0.0/24"], psk=PSK)
    return ini, res


def init_request() -> bytes:
    ini, _ = peers()
    (send,) = Endpoint([ini]).initiate(ini, 0.0)
    return send.data


def respond(ep: Endpoint, data: bytes, port: int = 500) -> list:
    return ep.receive(data, (R_IP, port), (I_IP, port), 0.0)


def replies(actions) -> list[m.Message]:
    return [m.parse_message(a.data) for a in actions if isinstance(a, Send)]


def test_round_trip_every_payload():
    sel = tsmod.from_prefix("10.0.0.0/8")
    payloads = [
        m.Notify(c.N_COOKIE, b"\x01" * 20),
        m.SA(
            [
                m.Proposal(
                    1,
                    c.PROTO_ESP,
                    b"\x00\x00\x01\x00",
                    [
                        m.Transform(c.TT_ENCR, c.ENCR_AES_CBC, 256),
                        m.Transform(c.TT_INTEG, c.AUTH_HMAC_SHA2_256_128),
                        m.Transform(c.TT_ESN, c.ESN_YES),
                    ],
                )
            ]
        ),  # fmt: skip
        m.KE(31, b"\x09" * 32),
        m.Nonce(b"n" * 32),
        m.Id(c.PL_IDI, c.ID_FQDN, b"a.example"),
        m.Id(c.PL_IDR, c.ID_KEY_ID, b"\x01\x02"),
        m.Auth(c.AUTH_PSK, b"a" * 32),
        m.TS(c.PL_TSI, [sel]),
        m.TS(c.PL_TSR, [sel, tsmod.from_prefix("fd00::/64")]),
        m.Delete(c.PROTO_ESP, [b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"]),
        m.Delete(c.PROTO_IKE),
        m.Vendor(b"simpletun"),
        m.Notify(c.N_REKEY_SA, b"", c.PROTO_ESP, b"\x00\x00\x01\x00"),
    ]
    msg = m.Message(b"i" * 8, b"r" * 8, c.CREATE_CHILD_SA, c.FLAG_INITIATOR, 7, payloads)
    raw = m.encode_message(msg)
    back = m.parse_message(raw)
    assert back.payloads == payloads
    assert (back.spi_i, back.spi_r, back.exchange, back.msg_id) == (b"i" * 8, b"r" * 8, 36, 7)
    assert m.encode_message(back) == raw
    assert back.summary() == (
        "CREATE_CHILD_SA request 7 [ N(COOKIE) SA KE No IDi IDr AUTH TSi TSr D D V N(REKEY_SA) ]"
    )


def test_summary_like_strongswan():
    assert m.parse_message(init_request()).summary() == (
        "IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) N(NATD_D_IP) ]"
    )


def test_every_truncation_is_dropped_without_state():
    data = init_request()
    ep = Endpoint([peers()[1]])
    for n in range(len(data)):
        assert respond(ep, data[:n]) == []
    assert ep.stats["malformed_header"] == len(data)
    assert not ep.sas and ep.half_open == 0 and ep.stats["internal_error"] == 0


def test_every_truncation_with_matching_length_gets_invalid_syntax():
    data = init_request()
    ep = Endpoint([peers()[1]])
    for n in range(c.IKE_HEADER_LEN, len(data)):
        t = bytearray(data[:n])
        struct.pack_into("!I", t, 24, n)
        for r in replies(respond(ep, bytes(t))):
            assert r.is_response and r.spi_r == bytes(8)
            assert [p.notify_type for p in r.payloads] == [c.N_INVALID_SYNTAX], n
    assert not ep.sas and ep.half_open == 0 and ep.stats["internal_error"] == 0


def test_every_corrupted_byte():
    data = init_request()
    ep = Endpoint([peers()[1]], cookie_threshold=10**6)
    for i in range(len(data)):
        for x in (0x01, 0x80, 0xFF):
            t = bytearray(data)
            t[i] ^= x
            t[0:8] = struct.pack("!Q", i * 4 + x + 1)  # distinct SPIi: no duplicate detection
            respond(ep, bytes(t))
    assert ep.stats["internal_error"] == 0
    # a flipped byte inside a nonce or KE may still be valid: state stays bounded either way
    assert ep.half_open == len(ep.sas) <= 3 * len(data)


def test_bad_lengths():
    data = bytearray(init_request())
    ep = Endpoint([peers()[1]])
    # first payload (SA) claims to be longer than the message
    first = c.IKE_HEADER_LEN
    for bad in (0, 1, 3, 0xFFFF):
        t = bytearray(data)
        struct.pack_into("!H", t, first + 2, bad)
        (r,) = replies(respond(ep, bytes(t)))
        assert [p.notify_type for p in r.payloads] == [c.N_INVALID_SYNTAX]
    assert not ep.sas


def _with_extra_payload(critical: bool) -> bytes:
    msg = m.parse_message(init_request())
    msg.payloads.append(m.Unknown(200, b"whatever", critical))
    return m.encode_message(msg)


def test_unknown_critical_payload_is_refused():
    ep = Endpoint([peers()[1]])
    (r,) = replies(respond(ep, _with_extra_payload(True)))
    (n,) = r.payloads
    assert n.notify_type == c.N_UNSUPPORTED_CRITICAL_PAYLOAD and n.data == bytes([200])
    assert not ep.sas


def test_unknown_noncritical_payload_is_ignored():
    ep = Endpoint([peers()[1]])
    (r,) = replies(respond(ep, _with_extra_payload(False)))
    assert r.get(c.PL_SA) is not None and len(ep.sas) == 1


def test_major_version_3():
    t = bytearray(init_request())
    t[17] = 0x30
    ep = Endpoint([peers()[1]])
    (r,) = replies(respond(ep, bytes(t)))
    assert [p.notify_type for p in r.payloads] == [c.N_INVALID_MAJOR_VERSION]
    assert not ep.sas


def test_no_proposal_chosen():
    ini, res = peers()
    gcm_only = Endpoint([res], responder_suites=(cr_gcm(),))
    (r,) = replies(respond(gcm_only, init_request()))
    assert [p.notify_type for p in r.payloads] == [c.N_NO_PROPOSAL_CHOSEN]
    assert not gcm_only.sas and gcm_only.stats["no_proposal_chosen"] == 1


def cr_gcm():
    from simpletun.ike import crypto as cr

    return cr.gcm_suite(256, c.DH_CURVE25519)


def exchange_of(data: bytes) -> int:
    if data[:4] == c.NON_ESP_MARKER:
        data = data[4:]
    return data[18] if len(data) > 18 else -1


def _auth_stage():
    """A responder with one half-open SA and the initiator's IkeSa, IKE_AUTH not sent yet."""
    net = Net()
    ini, res = peers()
    a = net.add(I_IP, Endpoint([ini]))
    b = net.add(R_IP, Endpoint([res]))
    net.drop = lambda src, dst, data: exchange_of(data) == c.IKE_AUTH
    net.call(a, a.ep.initiate(ini, net.now))
    (sa,) = a.ep.sas.values()
    assert b.ep.half_open == 1
    return net, a, b, sa


def test_unknown_critical_payload_inside_sk():
    net, a, b, sa = _auth_stage()
    raw = sa.encrypt(c.IKE_AUTH, 1, False, [m.Unknown(201, b"x", True)])
    (send,) = b.ep.receive(raw, (R_IP, 500), (I_IP, 500), net.now)
    resp = m.parse_message(send.data)
    assert sa.decrypt(resp)
    (n,) = resp.inner
    assert n.notify_type == c.N_UNSUPPORTED_CRITICAL_PAYLOAD and n.data == bytes([201])


def test_truncated_and_corrupted_ike_auth():
    net, a, b, sa = _auth_stage()
    (req,) = [w for w in net.wire if exchange_of(w[2]) == c.IKE_AUTH]
    data = req[2]
    for n in range(len(data)):
        assert b.ep.receive(data[:n], (R_IP, 500), (I_IP, 500), net.now) == []
    for i in range(len(data)):
        t = bytearray(data)
        t[i] ^= 0x40
        out = replies(b.ep.receive(bytes(t), (R_IP, 500), (I_IP, 500), net.now))
        if i == 17:  # the version byte: RFC 7296 §2.5 says answer INVALID_MAJOR_VERSION
            assert [p.notify_type for p in out[0].payloads] == [c.N_INVALID_MAJOR_VERSION]
        else:
            assert out == [], i
    assert b.ep.stats["internal_error"] == 0 and b.ep.stats["integrity_failed"] > 0
    # the genuine message still works afterwards
    out = b.ep.receive(data, (R_IP, 500), (I_IP, 500), net.now)
    assert any(isinstance(x, Send) for x in out) and b.ep.find("i")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from([500, 4500]))
def test_fuzz_random_datagrams(data, port):
    ep = Endpoint([peers()[1]])
    ep.receive(data, (R_IP, port), (I_IP, port), 0.0)
    ep.receive(c.NON_ESP_MARKER + data, (R_IP, port), (I_IP, port), 0.0)
    assert ep.stats["internal_error"] == 0


_TEMPLATE = init_request()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_TEMPLATE) - 1), st.integers(0, 255)), max_size=8))
def test_fuzz_mutated_init(mutations):
    t = bytearray(_TEMPLATE)
    for i, v in mutations:
        t[i] = v
    ep = Endpoint([peers()[1]])
    for r in replies(respond(ep, bytes(t))):
        assert r.is_response
    assert ep.stats["internal_error"] == 0 and len(ep.sas) <= 1


def test_reserved_esp_spi_is_not_chosen():
    from simpletun.ike import crypto as cr
    from simpletun.ike.machine import _esp_proposal, select_esp

    suites = (cr.ChildSuite(128, False),)
    for spi, ok in ((0, False), (255, False), (256, True)):
        prop, _ = select_esp([_esp_proposal(1, suites[0], spi)], suites, False)
        assert (prop is not None) == ok, spi
