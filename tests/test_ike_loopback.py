"""simpletun's IKEv2 initiator against its own responder, in memory (tests/ike_net.py): both
authentication methods, both DH groups, every IKE cipher, ESN, rekeys by either side (on
request and on lifetime), DPD, Delete, retransmission with backoff, duplicate requests, COOKIE,
INVALID_KE, half-open limits and timeouts, traffic selector narrowing, several peers, and 1000
initiators against one responder with bounded memory."""

from __future__ import annotations

import gc
import itertools
import random
import tracemalloc

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from ike_net import Net

from simpletun.ike import Endpoint, Identity, PeerConfig
from simpletun.ike import const as c
from simpletun.ike import crypto as cr
from simpletun.ike import message as m

PSK = b"loopback-psk-0123456789abcdef012"
I_IP, R_IP = "192.0.2.1", "192.0.2.2"


def configs(**kw):
    auth = kw.pop("auth", "psk")
    ikw = dict(name="r", local_ts=["10.1.0.0/24"], remote_ts=["10.2.0.0/24"],
               remote_addr=(R_IP, 500), local_addr=I_IP)  # fmt: skip
    rkw = dict(name="i", local_ts=["10.2.0.0/24"], remote_ts=["10.1.0.0/24"])
    if auth == "psk":
        ikw["psk"] = rkw["psk"] = PSK
    else:
        ki, kr = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        ikw.update(private_key=ki, remote_public_key=kr.public_key(),
                   local_id=Identity.parse("client.example"))  # fmt: skip
        rkw.update(private_key=kr, remote_public_key=ki.public_key(),
                   remote_id=Identity.parse("client.example"),
                   local_id=Identity.parse("keyid:0102030405"))  # fmt: skip
    for k, v in kw.items():
        if k.startswith("i_"):
            ikw[k[2:]] = v
        elif k.startswith("r_"):
            rkw[k[2:]] = v
        else:
            ikw[k] = rkw[k] = v
    return PeerConfig(**ikw), PeerConfig(**rkw)


def setup(ep_kw=None, **kw):
    net = Net()
    ini, res = configs(**kw)
    a = net.add(I_IP, Endpoint([ini]))
    b = net.add(R_IP, Endpoint([res], **(ep_kw or {})))
    return net, a, b, ini


def up(net, a, ini):
    net.call(a, a.ep.initiate(ini, net.now))
    return a.ep.find("r")[0]


def assert_pair(a, b):
    """Exactly one Child SA each side, the same SAs seen from both ends."""
    assert len(a.children) == 1 and len(b.children) == 1, (a.children, b.children)
    (x,) = a.children.values()
    (y,) = b.children.values()
    assert (x.spi_in, x.spi_out) == (y.spi_out, y.spi_in)
    assert (x.enc_out, x.auth_out, x.enc_in, x.auth_in) == (y.enc_in, y.auth_in, y.enc_out,
                                                            y.auth_out)  # fmt: skip
    assert x.suite == y.suite
    return x, y


SUITES = {
    "cbc128-x25519": cr.cbc_suite(128, c.DH_CURVE25519),
    "cbc256-p256": cr.cbc_suite(256, c.DH_ECP256),
    "gcm128-x25519": cr.gcm_suite(128, c.DH_CURVE25519),
    "gcm256-p256": cr.gcm_suite(256, c.DH_ECP256),
}


@pytest.mark.parametrize("auth", ["psk", "ed25519"])
@pytest.mark.parametrize("suite", list(SUITES))
def test_up(auth, suite):
    s = SUITES[suite]
    net, a, b, ini = setup(auth=auth, ike_suites=(s,), ep_kw={"responder_suites": (s,)})
    up(net, a, ini)
    x, _ = assert_pair(a, b)
    assert a.ups()[0].suite == b.ups()[0].suite == s.name()
    if auth == "ed25519":
        assert a.ups()[0].remote_id == "keyid:0102030405"
        assert b.ups()[0].remote_id == "client.example"
    assert x.local_ts == [m.TrafficSelector(7, 0, 0, 65535, bytes([10, 1, 0, 0]),
                                            bytes([10, 1, 0, 255]))]  # fmt: skip
    assert not a.downs() and not b.downs()


@pytest.mark.parametrize("bits", [128, 192, 256])
@pytest.mark.parametrize("esn", [False, True])
def test_child_suites(bits, esn):
    net, a, b, ini = setup(child_suites=(cr.ChildSuite(bits, esn),))
    up(net, a, ini)
    x, _ = assert_pair(a, b)
    assert x.suite == cr.ChildSuite(bits, esn) and len(x.enc_in) == bits // 8


def test_esn_mismatch_gives_no_proposal_chosen():
    net, a, b, ini = setup(i_child_suites=(cr.ChildSuite(128, True),),
                           r_child_suites=(cr.ChildSuite(128, False),))  # fmt: skip
    up(net, a, ini)
    assert not a.children and "NO_PROP" in a.failures()[0].reason


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_rekeys_dpd_delete(side):
    net, a, b, ini = setup()
    up(net, a, ini)
    me, other = (a, b) if side == "initiator" else (b, a)
    name = "r" if me is a else "i"
    for _ in range(2):
        assert_pair(a, b)
        spi = next(iter(me.children))
        sa = me.ep.find(name)[0]
        net.call(me, me.ep.rekey_child(sa, spi, net.now))
        assert_pair(a, b)
        new = me.children[next(iter(me.children))]
        assert new.spi_in != spi and new.rekey_of == spi and new.suite.dh == c.DH_CURVE25519
        # who switches outbound at once (the exchange's initiator) and who waits
        assert new.initiator and not other.installs()[-1].initiator
    for _ in range(2):
        sa = me.ep.find(name)[0]
        net.call(me, me.ep.rekey_ike(sa, net.now))
        (new,) = me.ep.find(name)
        assert new is not sa and len(me.ep.sas) == 1 and len(other.ep.sas) == 1
        assert_pair(a, b)
    assert len(me.rekeys()) == 2 and len(other.rekeys()) == 2
    sa = me.ep.find(name)[0]
    before = len(net.wire)
    net.call(me, me.ep.dpd(sa, net.now))
    assert len(net.wire) == before + 2  # request, response
    net.call(me, me.ep.delete_ike(sa, net.now))
    assert not a.children and not b.children and not a.ep.sas and not b.ep.sas
    assert me.downs()[0].reason == "deleted by us"
    assert other.downs()[0].reason == "deleted by the peer"


def test_child_delete_keeps_ike_sa():
    net, a, b, ini = setup()
    sa = up(net, a, ini)
    net.call(a, a.ep.delete_child(sa, next(iter(a.children)), net.now))
    assert not a.children and not b.children and a.ep.find("r") and b.ep.find("i")
    assert b.removes()[0].reason == "deleted by the peer"


def test_rekey_on_lifetime():
    net, a, b, ini = setup(i_child_rekey_time=100.0, i_ike_rekey_time=250.0, i_rand_time=10.0,
                           r_child_rekey_time=130.0, r_rand_time=10.0)  # fmt: skip
    up(net, a, ini)
    start = net.now
    net.run(until=start + 1000)
    assert len(a.rekeys()) >= 3 and len(a.installs()) >= 10
    assert_pair(a, b)
    assert len(a.ep.sas) == 1 and len(b.ep.sas) == 1
    # zero-gap order: each new Child SA is installed before the one it replaces is removed
    seen = {}
    for i, e in enumerate(a.events):
        if hasattr(e, "spi_in"):
            seen.setdefault(e.spi_in, []).append((i, type(e).__name__))
    for e in a.installs():
        if e.rekey_of is not None:
            assert seen[e.rekey_of][-1][0] > seen[e.spi_in][0][0]


def test_retransmission_backoff_then_peer_dead():
    net, a, b, ini = setup(i_retransmit_base=1.0, i_retransmit_tries=4)
    sa = up(net, a, ini)
    net.drop = lambda src, dst, data: True  # the peer vanishes
    t0 = net.now
    times = []
    orig = net.handle

    def spy(node, actions):
        if node is a:
            times.extend(net.now - t0 for x in actions if hasattr(x, "data"))
        orig(node, actions)

    net.handle = spy
    net.call(a, a.ep.dpd(sa, net.now))
    net.run(until=t0 + 100)
    assert times == [0.0, 1.0, 3.0, 7.0, 15.0]  # 1, 2, 4, 8 s apart
    (down,) = a.downs()
    assert (
        "no response to INFORMATIONAL request" in down.reason and "4 retransmissions" in down.reason
    )
    assert not a.children and not a.ep.sas


def test_lost_packets_are_retransmitted():
    net, a, b, ini = setup()
    lost = itertools.count()
    net.drop = lambda src, dst, data: next(lost) in (0, 3, 5)  # request, responses, ...
    net.handle(a, a.ep.initiate(ini, net.now))
    net.run(until=net.now + 30)
    assert_pair(a, b)
    assert a.ep.stats["retransmitted"] >= 2


def test_duplicate_requests_get_the_cached_response():
    net, a, b, ini = setup()
    orig = net.step

    def dup_step():
        if net.queue:
            net.queue.append(net.queue[0])  # every datagram arrives twice
        return orig()

    net.step = dup_step
    net.drop = None
    net.handle(a, a.ep.initiate(ini, net.now))
    for _ in range(200):
        if not net.step():
            break
    net.step = orig
    net.run()
    assert_pair(a, b)
    assert b.ep.stats["init_retransmit_answered"] >= 1
    assert b.ep.stats["request_retransmit_answered"] >= 1
    assert len(b.installs()) == 1 and len(a.installs()) == 1


def test_cookie():
    net, a, b, ini = setup(ep_kw={"cookie_threshold": 0})
    up(net, a, ini)
    assert_pair(a, b)
    assert b.ep.stats["cookie_sent"] == 1
    inits = [m.parse_message(d) for _, _, d in net.wire if d[18] == c.IKE_SA_INIT]
    assert inits[1].summary() == "IKE_SA_INIT response 0 [ N(COOKIE) ]"
    assert inits[2].summary().startswith("IKE_SA_INIT request 0 [ N(COOKIE) SA KE No")


def test_bad_cookie_gets_a_new_cookie_and_no_state():
    ini, res = configs()
    ep = Endpoint([res], cookie_threshold=0)
    (send,) = Endpoint([ini]).initiate(ini, 0.0)
    msg = m.parse_message(send.data)
    msg.payloads.insert(0, m.Notify(c.N_COOKIE, b"\x00" * 33))
    out = ep.receive(m.encode_message(msg), (R_IP, 500), (I_IP, 500), 0.0)
    assert m.parse_message(out[0].data).summary() == "IKE_SA_INIT response 0 [ N(COOKIE) ]"
    assert ep.stats["cookie_invalid"] == 1 and not ep.sas


def test_invalid_ke_retry():
    p256 = cr.cbc_suite(128, c.DH_ECP256)
    x25519 = cr.cbc_suite(128, c.DH_CURVE25519)
    net, a, b, ini = setup(i_ike_suites=(p256, x25519), ep_kw={"responder_suites": (x25519,)})
    up(net, a, ini)
    assert_pair(a, b)
    assert b.ep.stats["invalid_ke"] == 1
    assert a.ups()[0].suite == x25519.name()


def test_half_open_timeout():
    net, a, b, ini = setup(ep_kw={"half_open_timeout": 5.0})
    net.drop = lambda src, dst, data: src == R_IP  # the initiator never hears back
    net.call(a, a.ep.initiate(ini, net.now))
    assert b.ep.half_open == 1 and len(b.ep.sas) == 1
    net.run(until=net.now + 6)
    assert b.ep.half_open == 0 and not b.ep.sas and not b.ep.by_init


def test_half_open_flood_costs_no_state_beyond_the_threshold():
    _, res = configs()
    ep = Endpoint([res], cookie_threshold=5, max_half_open=50)
    ini, _ = configs()
    src = Endpoint([ini])
    for i in range(500):
        (send,) = src.initiate(ini, 0.0)
        ep.receive(send.data, (R_IP, 500), (f"198.51.100.{i % 250}", 500), 0.0)
    assert ep.half_open == 5 and len(ep.sas) == 5
    assert ep.stats["cookie_sent"] == 495


def test_simultaneous_child_rekeys_are_retried():
    net, a, b, ini = setup()
    a.ep._rng, b.ep._rng = random.Random(1), random.Random(2)  # distinct retry delays
    sa_a = up(net, a, ini)
    sa_b = b.ep.find("i")[0]
    spi_a, spi_b = next(iter(a.children)), next(iter(b.children))
    # both ends start a rekey of the same Child SA before either request arrives
    net.handle(a, a.ep.rekey_child(sa_a, spi_a, net.now))
    net.handle(b, b.ep.rekey_child(sa_b, spi_b, net.now))
    net.run(until=net.now + 10)
    assert a.ep.stats["internal_error"] == 0 and b.ep.stats["internal_error"] == 0
    assert a.ep.stats["request_in_wrong_state"] == 0
    assert spi_a not in a.children and spi_b not in b.children  # the old one was replaced
    assert_pair(a, b)
    assert a.ep.find("r") and b.ep.find("i")


def test_nat_traversal_and_keepalives():
    # the initiator believes it is 10.0.0.99 (a NAT rewrote it to 192.0.2.1): both NAT-D checks
    # then see the NAT, the IKE SA floats to port 4500 with the non-ESP marker, ESP goes in UDP
    net, a, b, ini = setup(i_local_addr="10.0.0.99")
    sa = up(net, a, ini)
    x, y = assert_pair(a, b)
    assert x.encap == (4500, (R_IP, 4500)) and y.encap == (4500, (I_IP, 4500))
    assert a.ups()[0].udp_encap and b.ups()[0].udp_encap
    auth = [d for s, dst, d in net.wire if dst[1] == 4500]
    assert auth and all(d[:4] == c.NON_ESP_MARKER for d in auth)
    assert m.parse_message(auth[0][4:]).exchange == c.IKE_AUTH
    # idle: the side behind the NAT sends 0xFF keepalives every 20 s; the other counts them
    net.run(until=net.now + 65)
    assert a.ep.stats["nat_keepalive_sent"] == 3 and b.ep.stats["nat_keepalive"] == 3
    assert b.ep.stats["nat_keepalive_sent"] == 0
    net.call(a, a.ep.rekey_child(sa, x.spi_in, net.now))
    assert assert_pair(a, b)[0].encap == (4500, (R_IP, 4500))


def test_traffic_selector_narrowing():
    net, a, b, ini = setup(i_local_ts=["10.1.0.0/16"], i_remote_ts=["10.2.0.0/16"])
    up(net, a, ini)
    x, y = assert_pair(a, b)
    assert [str(t) for t in x.local_ts] == ["10.1.0.0/24"]
    assert [str(t) for t in x.remote_ts] == ["10.2.0.0/24"]
    assert [str(t) for t in y.local_ts] == ["10.2.0.0/24"]


def test_traffic_selectors_unacceptable():
    net, a, b, ini = setup(i_local_ts=["10.9.0.0/24"])
    up(net, a, ini)
    assert not a.children and not b.children
    assert "TS_UNACCEPT" in a.failures()[0].reason
    assert a.ep.find("r") and b.ep.find("i")  # the IKE SA stays


def test_multi_peer_identities_and_prefixes():
    net = Net()
    server_peers = [
        PeerConfig(
            name=f"c{i}",
            local_ts=["10.2.0.0/24"],
            remote_ts=[f"10.1.{i}.0/24"],
            psk=f"psk-of-client-{i}".encode(),
            remote_id=Identity.parse(f"c{i}.example"),
        )  # fmt: skip
        for i in range(3)
    ]
    b = net.add(R_IP, Endpoint(server_peers))
    clients = []
    for i in range(3):
        ip = f"192.0.2.{10 + i}"
        # client 2 claims client 0's prefix: narrowing must refuse it
        prefix = "10.1.0.0/24" if i == 2 else f"10.1.{i}.0/24"
        p = PeerConfig(name="srv", local_ts=[prefix], remote_ts=["10.2.0.0/24"],
                       psk=f"psk-of-client-{i}".encode(), local_id=Identity.parse(f"c{i}.example"),
                       remote_addr=(R_IP, 500), local_addr=ip)  # fmt: skip
        node = net.add(ip, Endpoint([p]))
        net.call(node, node.ep.initiate(p, net.now))
        clients.append((node, p))
    assert [len(n.children) for n, _ in clients] == [1, 1, 0]
    assert "TS_UNACCEPT" in clients[2][0].failures()[0].reason
    assert sorted(u.peer for u in b.ups()) == ["c0", "c1", "c2"]
    # client 1 reconnects (INITIAL_CONTACT): only its own old IKE SA is replaced
    node, p = clients[1]
    net.call(node, node.ep.initiate(p, net.now))
    downs = b.downs()
    assert [d.peer for d in downs] == ["c1"] and "INITIAL_CONTACT" in downs[0].reason
    assert len(b.ep.find("c0")) == 1 and len(b.ep.find("c1")) == 1


def test_wrong_psk():
    net, a, b, ini = setup(i_psk=b"a-different-psk-0123456789abcdef")
    up_actions = a.ep.initiate(ini, net.now)
    net.call(a, up_actions)
    (da,), (db,) = a.downs(), b.downs()
    assert "AUTHENTICATION_FAILED" in da.reason and "same PSK" in da.reason
    assert "PSK MAC does not verify" in db.reason
    assert not a.ep.sas and not b.ep.sas and not a.children and not b.children


def test_unknown_ed25519_key():
    net, a, b, ini = setup(auth="ed25519")
    b.ep.peers[0].remote_public_key = ed25519.Ed25519PrivateKey.generate().public_key()
    net.call(a, a.ep.initiate(ini, net.now))
    assert "AUTHENTICATION_FAILED" in a.downs()[0].reason
    assert "signature does not verify" in b.downs()[0].reason


def test_initiate_without_address_is_a_clear_error():
    with pytest.raises(ValueError, match="no remote address"):
        Endpoint([]).initiate(PeerConfig(psk=b"x"), 0.0)


def test_1000_initiators_bounded_memory():
    net = Net()
    res = PeerConfig(name="any", local_ts=["10.2.0.0/16"], remote_ts=["10.0.0.0/8"], psk=PSK)
    b = net.add(R_IP, Endpoint([res], cookie_threshold=50, max_half_open=200))
    nodes = []
    for i in range(1000):
        ip = f"198.18.{i // 250}.{i % 250 + 1}"
        p = PeerConfig(name="srv", local_ts=[f"10.{i // 250}.{i % 250}.0/24"],
                       remote_ts=["10.2.0.0/24"], psk=PSK, remote_addr=(R_IP, 500),
                       local_addr=ip, initial_contact=False)  # fmt: skip
        nodes.append((net.add(ip, Endpoint([p])), p))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for node, p in nodes:  # all start together: the responder sees many half-open SAs
        net.handle(node, node.ep.initiate(p, net.now))
    net.run(until=net.now + 60)  # those dropped at the half-open limit retransmit
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert sum(1 for n, _ in nodes if len(n.children) == 1) == 1000
    assert len(b.ep.sas) == 1000 and len(b.children) == 1000 and b.ep.half_open == 0
    assert b.ep.stats["cookie_sent"] > 0 and b.ep.stats["internal_error"] == 0
    assert b.ep.stats["half_open_limit"] > 0  # the bound was reached and held
    # memory of 1000 initiators + the responder's 1000 IKE SAs, the wire log included
    net.wire.clear()
    print(f"1000 IKE SAs: {grown / 1000:.0f} bytes per initiator+responder SA pair")
    assert grown < 1000 * 64 * 1024
    # and they all go away again
    for node, _ in nodes:
        (sa,) = node.ep.find("srv")
        net.handle(node, node.ep.delete_ike(sa, net.now))
    net.run()
    assert not b.ep.sas and not b.children and not b.ep.by_init


def test_forged_old_message_id_gets_no_answer():
    net, a, b, ini = setup()
    up(net, a, ini)
    (req,) = [d for _, dst, d in net.wire if dst[0] == R_IP and d[18] == c.IKE_AUTH]
    forged = bytearray(req)
    forged[-1] ^= 1
    assert b.ep.receive(bytes(forged), (R_IP, 500), (I_IP, 500), net.now) == []
    assert b.ep.stats["old_message_id"] == 1
    (again,) = b.ep.receive(req, (R_IP, 500), (I_IP, 500), net.now)
    assert m.parse_message(again.data).exchange == c.IKE_AUTH  # the genuine one is answered


@pytest.mark.parametrize("esn", [False, True])
def test_negotiated_keys_carry_esp_through_the_rust_core(esn):
    """The Child SAs both ends install, fed to simpletun's Rust ESP core, carry packets both
    ways (ESN too, which libipsec lacks, so it is tested here)."""
    from simpletun import SecurityAssociation

    net, a, b, ini = setup(child_suites=(cr.ChildSuite(256, esn),))
    up(net, a, ini)
    x, y = assert_pair(a, b)
    ping = bytes.fromhex("4500001c00004000400100000a0100010a020001") + b"\x08" + bytes(7)
    for src, dst in ((x, y), (y, x)):
        tx = SecurityAssociation(src.spi_out, src.enc_out, src.auth_out, esn=esn)
        rx = SecurityAssociation(dst.spi_in, dst.enc_in, dst.auth_in, esn=esn)
        for _ in range(3):
            assert rx.decap(tx.encap(ping)) == (4, ping)
        assert rx.stats["decap_packets"] == 3 and rx.esn == esn


def test_failed_authentications_are_rate_limited_in_the_log(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="simpletun.ike")
    net, a, b, ini = setup(i_psk=b"a-different-psk-0123456789abcdef")
    for _ in range(20):
        net.call(a, a.ep.initiate(ini, net.now))
    assert len(b.downs()) == 20  # every event still reaches the caller
    lines = [r.getMessage() for r in caplog.records if r.name == "simpletun.ike"]
    responder_lines = [x for x in lines if "PSK MAC does not verify" in x]
    assert len(responder_lines) == 5
    assert sum("further such messages from 192.0.2.1 suppressed" in x for x in lines) == 1
    assert b.ep._log_limit.suppressed == 15


def test_hard_lifetime_without_rekey():
    # the peer never answers the rekey: at the hard lifetime the Child SA goes all the same
    net, a, b, ini = setup(i_child_rekey_time=100.0, i_child_life_time=150.0,
                           i_retransmit_tries=10)  # fmt: skip
    start = net.now
    up(net, a, ini)
    (spi,) = a.children
    net.drop = lambda src, dst, data: src == I_IP and data[18] == c.CREATE_CHILD_SA
    net.run(until=start + 149)
    assert spi in a.children and a.ep.stats["retransmitted"] >= 3  # rekey pending
    net.run(until=start + 151)
    assert spi not in a.children and a.removes()[-1].reason == "hard lifetime expired"
    assert not a.downs()


def test_initiator_rejects_responder_auth_and_says_so():
    net, a, b, ini = setup(auth="ed25519")
    ini.remote_public_key = ed25519.Ed25519PrivateKey.generate().public_key()
    net.call(a, a.ep.initiate(ini, net.now))
    assert "signature does not verify" in a.downs()[0].reason
    assert "AUTHENTICATION_FAILED" in b.downs()[0].reason  # told by an INFORMATIONAL
    assert not a.ep.sas and not b.ep.sas and not b.children
