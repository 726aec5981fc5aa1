"""The IKEv2 <-> data plane glue (simpletun.ikesession.IkeGlue) without sockets: two glues over
fake data planes, datagrams passed in memory; and the ikev2 config-file checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simpletun import configfile, ikesession, keys
from simpletun._errors import ConfigError
from simpletun.ike import Endpoint, Identity, PeerConfig
from simpletun.ike import const as c
from simpletun.ikesession import NATT_PORT, Backoff, IkeGlue


class FakeDp:
    def __init__(self):
        self.calls: list = []
        self.peers_: dict = {}
        self.inbound: dict = {}
        self.outbound: dict = {}
        self.n = 0

    def add_peer(self, tid, allowed, endpoint=None):
        self.n += 1
        self.peers_[self.n] = [list(allowed), endpoint]
        return self.n

    def remove_peer(self, p):
        self.peers_.pop(p)

    def set_endpoint(self, p, ep):
        self.peers_[p][1] = ep

    def set_peer_super(self, p, on):
        self.super_ = {**getattr(self, "super_", {}), p: on}

    def endpoint(self, p):
        return self.peers_[p][1]

    def add_inbound_sa(self, peer, spi, enc, auth, esn=False):
        self.calls.append(("in", spi))
        self.inbound[spi] = peer

    def set_outbound_sa(self, peer, spi, enc, auth, esn=False, **limits):
        self.calls.append(("out", spi))
        self.limits = limits
        self.outbound[peer] = spi

    def clear_outbound_sa(self, peer):
        self.outbound.pop(peer, None)

    def remove_inbound_sa(self, spi, grace=0.0):
        self.calls.append(("rm", spi, grace))

    def send_keepalive(self, tid, remote):
        self.wire.append(("ka", remote, b"\xff"))

    def send_control(self, tid, remote, data):
        self.wire.append((NATT_PORT, remote, data))

    def peer_stats(self, p):
        return {}

    def remove_tcp_connection(self, tid, addr):
        self.calls.append(("rm_tcp", tuple(addr)))
        return True

    def sas(self):
        return []


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def pair(raw: bool = False, b_ike_ip: str = "192.0.2.2"):
    """Two glues: A initiates to B. ``raw``: ESP on a raw transport (id 2), no forced
    encapsulation; ``b_ike_ip``: the address B believes it has (another one fakes a NAT)."""
    psk = os.urandom(32)
    clock = Clock()
    pa = PeerConfig(name="b", local_ts=["10.1.0.0/24"], remote_ts=["10.2.0.0/24"],
                    local_addr="192.0.2.1", remote_addr=("192.0.2.2", 500), psk=psk,
                    local_id=Identity.parse("a.example"))  # fmt: skip
    pb = PeerConfig(name="a", local_ts=["10.2.0.0/24"], remote_ts=["10.1.0.0/24"],
                    local_addr=b_ike_ip, psk=psk,
                    remote_id=Identity.parse("a.example"))  # fmt: skip
    wire: list = []
    glues = {}
    for ip, peer in (("192.0.2.1", pa), ("192.0.2.2", pb)):
        dp = FakeDp()
        dp.wire = wire
        ep = Endpoint([peer], force_encap=not raw)
        send500 = lambda d, r, w=wire: w.append((500, r, d))  # noqa: E731
        local = b_ike_ip if ip == "192.0.2.2" else ip
        glues[ip] = IkeGlue(ep, dp, 1, send500, local, clock=clock, esp=2 if raw else None)
        glues[ip].src = ip
    return glues["192.0.2.1"], glues["192.0.2.2"], wire, clock


def pump(a, b, wire):
    for _ in range(50):
        if not wire:
            return
        port, remote, data = wire.pop(0)
        if port == "ka":
            continue
        dst = a if remote[0] == a.src else b
        src = b if dst is a else a
        if port == NATT_PORT:
            dst.on_event(("control", 1, (src.src, NATT_PORT), data))
        else:
            dst.receive(data, 500, (src.src, 500))


def test_glue_installs_inbound_before_outbound_and_rekeys_on_sa_limit():
    a, b, wire, clock = pair()
    a.start(a.ep.peers[0])
    pump(a, b, wire)
    sb, sa_ = b.peers["a"], a.peers["b"]
    assert sa_.children and sb.children
    # the responder's data-plane peer learned the initiator's NAT-T endpoint
    assert b.dp.endpoint(sb.dp_peer) == ("192.0.2.1", NATT_PORT)
    assert a.dp.peers_[sa_.dp_peer][0] == ["10.2.0.0/24"]
    (spi_in,) = sa_.children
    assert a.dp.calls[:2] == [("in", spi_in), ("out", sa_.children[spi_in].spi_out)]
    first_out = a.dp.outbound[sa_.dp_peer]
    # the data plane says the outbound SA is near its limit: a Child SA rekey follows
    a.on_event(("sa_limit", sa_.dp_peer, first_out, 1 << 31, 0))
    pump(a, b, wire)
    assert a.dp.outbound[sa_.dp_peer] != first_out
    assert b.dp.outbound[sb.dp_peer] != b.dp.calls[1][1]
    for dp in (a.dp, b.dp):
        # every new inbound SA was installed before any outbound switch to its pair, and old
        # inbound SAs are removed with a grace period
        rms = [c for c in dp.calls if c[0] == "rm"]
        assert rms and all(c[2] > 0 for c in rms), dp.calls
        ins = [c[1] for c in dp.calls if c[0] == "in"]
        assert len(ins) == 2
    assert spi_in not in sa_.children and len(sa_.children) == 1
    st = a.status()[0]
    assert st["ike_sa"] and st["child_sas"][0]["outbound"]


def test_initiator_reinitiates_after_its_ike_sa_goes_down():
    a, b, wire, clock = pair()
    a.start(a.ep.peers[0])
    pump(a, b, wire)
    (sa,) = a.ep.find("b")
    a.handle(a.ep.delete_ike(sa, clock()))
    pump(a, b, wire)
    assert not a.peers["b"].ike_sa and "b" in a.down_initiators
    clock.t += 5
    a.tick()
    pump(a, b, wire)
    assert a.peers["b"].ike_sa and a.peers["b"].children


def _fail_until_down(a, wire, clock) -> float:
    """Drop everything A sends and run its timers until its initiation to "b" gives up;
    returns the delay A then waits before initiating again."""
    for _ in range(100):
        wire.clear()
        if "b" in a.down_initiators:
            return a.down_initiators["b"] - clock.t
        clock.t = max(clock.t, a.next_wakeup())
        a.tick()
    raise AssertionError("the initiation never gave up")


def test_backoff_is_exponential_capped_jittered_and_resets():
    import random

    b = Backoff(initial=1.0, cap=8.0, jitter=0.25, rng=random.Random(7))
    got = [b.next() for _ in range(7)]
    for d, want in zip(got, [1, 2, 4, 8, 8, 8, 8], strict=True):
        assert 0.75 * want <= d <= want, got
    assert len(set(got[3:])) > 1, "no jitter"
    b.reset()
    assert b.next() <= 1.0
    assert Backoff(jitter=0.0).next() == 1.0


def test_failed_initiations_back_off_and_success_resets():
    a, b, wire, clock = pair()
    a.new_backoff = lambda: Backoff(initial=1.0, cap=60.0, jitter=0.0)
    a.start(a.ep.peers[0])
    assert _fail_until_down(a, wire, clock) == 1.0  # an initiation that never came up
    clock.t += 1.0
    a.tick()  # initiates again
    assert a.ep.sas and "b" not in a.down_initiators
    assert _fail_until_down(a, wire, clock) == 2.0
    clock.t += 2.0
    a.tick()
    pump(a, b, wire)  # B answers this time
    assert a.peers["b"].ike_sa and a.backoffs["b"].failures == 0


def test_peer_soft_limits_go_with_every_outbound_sa():
    a, b, wire, clock = pair()
    a.peers["b"].config.rekey_packets = 5000
    a.peers["b"].config.rekey_bytes = 1 << 20
    a.start(a.ep.peers[0])
    pump(a, b, wire)
    assert a.dp.limits == {"soft_packets": 5000, "soft_bytes": 1 << 20}
    assert b.dp.limits == {}  # B's peer has none: the data plane's own limits apply
    a.on_event(("sa_limit", a.peers["b"].dp_peer, a.dp.outbound[a.peers["b"].dp_peer], 5000, 0))
    pump(a, b, wire)
    assert a.dp.limits == {"soft_packets": 5000, "soft_bytes": 1 << 20}  # the rekeyed SA too


def test_raw_esp_no_encapsulation_endpoints_without_port():
    a, b, wire, clock = pair(raw=True)
    a.start(a.ep.peers[0])
    ports = []
    for _ in range(20):
        ports += [w[0] for w in wire]
        pump(a, b, wire)
    assert a.peers["b"].children and b.peers["a"].children
    assert set(ports) == {500}, "IKE left port 500 although there is no NAT"
    assert a.dp.endpoint(a.peers["b"].dp_peer) == ("192.0.2.2", 0)
    assert b.dp.endpoint(b.peers["a"].dp_peer) == ("192.0.2.1", 0)


def test_raw_esp_refuses_a_child_sa_behind_a_nat(caplog):
    a, b, wire, clock = pair(raw=True, b_ike_ip="192.0.2.99")  # B's NAT-D sees a NAT
    a.start(a.ep.peers[0])
    for _ in range(20):
        pump(a, b, wire)
    assert not a.peers["b"].children and not b.peers["a"].children
    assert a.dp.inbound == {} and b.dp.inbound == {}
    assert a.stats.get("child_sa_refused_nat", 0) + b.stats.get("child_sa_refused_nat", 0) >= 1
    assert "raw ESP cannot cross it" in caplog.text


def pair_tcp():
    a, b, wire, clock = pair()
    for g in (a, b):
        g.stream = True
        g.ep.natt_from_start = True
        g.port = 40000
    a.peers["b"].config.remote_addr = ("192.0.2.2", 4500)
    return a, b, wire, clock


def pump_tcp(a, b, wire):
    """Stream mode: A is at (192.0.2.1, a.port) on its connection, B at (192.0.2.2, 4500)."""
    for _ in range(50):
        if not wire:
            return
        port, remote, data = wire.pop(0)
        assert port == NATT_PORT and data[:4] == c.NON_ESP_MARKER, (port, data[:8])
        if remote[0] == b.src:
            b.on_event(("control", 1, (a.src, a.port), data))
        else:
            assert remote == (a.src, a.port), remote
            a.on_event(("control", 1, (b.src, 4500), data))


def test_tcp_initiator_connects_first_then_everything_goes_on_the_stream():
    a, b, wire, clock = pair_tcp()
    a.start(a.ep.peers[0])
    assert not wire and [p.name for p in a.due_connects()] == ["b"]
    assert a.due_connects() == []  # in progress
    assert b.accepted((a.src, a.port))
    a.connected("b")
    assert wire and wire[0][2][:4] == c.NON_ESP_MARKER  # IKE_SA_INIT, non-ESP marker
    pump_tcp(a, b, wire)
    assert a.peers["b"].children and b.peers["a"].children
    # the data-plane peer of the initiator is addressed by the connection's endpoint
    assert a.dp.endpoint(a.peers["b"].dp_peer) == ("192.0.2.2", 4500)
    assert b.dp.endpoint(b.peers["a"].dp_peer) == (a.src, a.port)
    # no NAT keepalives on a stream, however long it is quiet
    clock.t += 25
    a.tick()
    b.tick()
    assert all(d != b"\xff" for _, _, d in wire)
    pump_tcp(a, b, wire)


@pytest.mark.parametrize("a_super,b_super", [(True, True), (True, False), (False, True)])
def test_tcp_super_packets_agreed_by_a_private_notify_in_ike_auth(a_super, b_super):
    """Each end announces super-packets (N_SIMPLETUN_SUPER_PACKETS, a private-use status type,
    in IKE_AUTH) when its driver says so; the data plane gets the flag only when both did."""
    a, b, wire, clock = pair_tcp()
    a.ep.super_packets, b.ep.super_packets = a_super, b_super
    a.start(a.ep.peers[0])
    a.due_connects()
    b.accepted((a.src, a.port))
    a.connected("b")
    pump_tcp(a, b, wire)
    both = a_super and b_super
    assert a.dp.super_[a.peers["b"].dp_peer] is both
    assert b.dp.super_[b.peers["a"].dp_peer] is both
    assert 40960 <= c.N_SIMPLETUN_SUPER_PACKETS <= 65535


def test_tcp_reconnect_keeps_the_ike_sa_and_the_responder_follows():
    a, b, wire, clock = pair_tcp()
    a.new_backoff = lambda: Backoff(initial=1.0, jitter=0.0)
    a.start(a.ep.peers[0])
    a.due_connects()
    b.accepted((a.src, a.port))
    a.connected("b")
    pump_tcp(a, b, wire)
    sa_a, sa_b = a.peers["b"].ike_sa, b.peers["a"].ike_sa
    # the connection breaks: A reconnects after its backoff, from a new port
    a.on_event(("closed", 1, ("192.0.2.2", 4500), "peer reset the connection"))
    b.on_event(("closed", 1, (a.src, a.port), "peer reset the connection"))
    assert a.due_connects() == []
    clock.t += 1.0
    assert [p.name for p in a.due_connects()] == ["b"]
    a.port = 40001
    b.accepted((a.src, a.port))
    a.connected("b")  # DPD on the existing IKE SA tells B of the new connection
    assert len(wire) == 1
    pump_tcp(a, b, wire)
    assert (a.peers["b"].ike_sa, b.peers["a"].ike_sa) == (sa_a, sa_b)
    (ike_b,) = b.ep.find("a")
    assert ike_b.remote == (a.src, 40001)
    # and B's ESP goes to the new connection at once (not only after A's first ESP packet)
    assert b.dp.endpoint(b.peers["a"].dp_peer) == (a.src, 40001)
    # a connection that never carries an IKE SA is closed after STREAM_IDLE; the used one stays
    assert b.accepted(("203.0.113.9", 5555))
    clock.t += ikesession.STREAM_IDLE + 1
    b.tick()
    assert ("rm_tcp", ("203.0.113.9", 5555)) in b.dp.calls
    assert ("rm_tcp", (a.src, 40001)) not in b.dp.calls
    assert b.stats["tcp_idle_closed"] == 1
    b.on_event(("closed", 1, ("203.0.113.7", 7), "the stream did not start with the IKETCP prefix"))
    assert b.stats["tcp_bad_prefix"] == 1 and b.peers["a"].ike_sa == sa_b


def test_tcp_responder_lost_state_means_a_new_ike_sa(monkeypatch):
    a, b, wire, clock = pair_tcp()
    a.start(a.ep.peers[0])
    a.due_connects()
    a.connected("b")
    pump_tcp(a, b, wire)
    old = a.peers["b"].ike_sa
    # B restarts (no state): after a reconnect A's DPD goes unanswered, the SA dies, A
    # initiates a new one
    dp2 = FakeDp()
    dp2.wire = wire
    ep2 = Endpoint(b.ep.peers, force_encap=True, natt_from_start=True)
    b2 = IkeGlue(ep2, dp2, 1, None, b.src, clock=clock, stream=True)
    b2.src = b.src
    a.on_event(("closed", 1, ("192.0.2.2", 4500), "peer closed the connection"))
    clock.t += 1.0
    a.due_connects()
    a.connected("b")
    for _ in range(200):
        pump_tcp(a, b2, wire)
        if a.peers["b"].ike_sa not in (None, old):
            break
        clock.t = max(clock.t + 0.1, a.next_wakeup() or 0)
        a.tick()
    assert a.peers["b"].ike_sa not in (None, old) and b2.peers["a"].children
    monkeypatch.setattr(ikesession, "MAX_STREAMS", 1)
    assert b2.accepted(("203.0.113.1", 1)) and not b2.accepted(("203.0.113.2", 2))
    assert b2.stats["tcp_refused"] == 1


def test_tcp_connect_failures_back_off():
    a, b, wire, clock = pair_tcp()
    a.new_backoff = lambda: Backoff(initial=1.0, cap=4.0, jitter=0.0)
    a.start(a.ep.peers[0])
    delays = []
    for _ in range(4):
        (p,) = a.due_connects()
        a.connect_failed(p.name, "connection refused")
        delays.append(a.want_connect["b"] - clock.t)
        clock.t = a.want_connect["b"]
    assert delays == [1.0, 2.0, 4.0, 4.0] and not wire
    assert a.stats["tcp_connect_failed"] == 4


def test_ike_sa_rekey_moves_the_peer_to_the_new_sa_and_its_loss_reinitiates():
    a, b, wire, clock = pair()
    a.start(a.ep.peers[0])
    pump(a, b, wire)
    (old,) = a.ep.find("b")
    a.handle(a.ep.rekey_ike(old, clock()))
    pump(a, b, wire)
    (new,) = a.ep.find("b")
    assert new.name != old.name and a.peers["b"].ike_sa == new.name
    a.handle(a.ep.delete_ike(new, clock()))
    pump(a, b, wire)
    assert "b" in a.down_initiators  # the rekeyed SA going down is noticed too


def write(tmp: Path, body: str) -> Path:
    p = tmp / "st0.toml"
    p.write_text(body)
    return p


def _key(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.write_text(keys.encode_key(keys.generate_key()) + "\n")
    p.chmod(0o600)
    return p


HEAD = (
    '[interface]\nkey_exchange = "ikev2"\naddress = ["10.9.0.1/24"]\nlisten_address = "192.0.2.1"\n'
)


def test_ikev2_file_with_three_peers(tmp_path):
    psk = _key(tmp_path, "psk")
    priv = _key(tmp_path, "priv")
    from simpletun.ike.keys import public_key_text

    pub = public_key_text(keys.load_key(str(_key(tmp_path, "other")))).strip()
    text = HEAD + f'private_key_file = "{priv}"\n'
    for i, auth in enumerate(
        (f'psk_file = "{psk}"', f'public_key = "{pub}"', f'psk_file = "{psk}"')
    ):
        text += (
            f'\n[[peer]]\nidentity = "p{i}.example"\nallowed_ips = ["10.9.{i + 1}.0/24"]\n{auth}\n'
        )
    text += 'endpoint = "198.51.100.7"\n'
    tf = configfile.loads(text, tmp_path / "st0.toml")
    setup = tf.config.ike
    assert [sp.name for sp in setup.peers] == ["p0.example", "p1.example", "p2.example"]
    assert setup.peers[1].public_key is not None and setup.peers[0].psk is not None
    assert setup.peers[2].endpoint == ("198.51.100.7", 500)
    assert setup.peers[0].local_ips[0].__str__() == "10.9.0.0/24"
    assert [str(r) for r in tf.config.routes] == ["10.9.1.0/24", "10.9.2.0/24", "10.9.3.0/24"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ('\n[[peer]]\nallowed_ips = ["10.9.1.0/24"]\npsk_file = "PSK"\n'
         '\n[[peer]]\nidentity = "b"\nallowed_ips = ["10.9.2.0/24"]\npsk_file = "PSK"\n',
         "set identity"),
        ('\n[[peer]]\nidentity = "b"\nallowed_ips = ["10.9.1.0/24"]\n', "needs psk_file"),
        ('\n[[peer]]\nidentity = "b"\nallowed_ips = ["10.9.1.0/24"]\npublic_key = "eA=="\n',
         "needs private_key_file"),
        ('\n[[peer]]\nidentity = "b"\nauth = "rsa"\nallowed_ips = ["10.9.1.0/24"]\n',
         'must be "psk" or "ed25519"'),
        ('listen_port = 500\n[[peer]]\nidentity = "b"\nallowed_ips = ["10.9.1.0/24"]\n',
         "does not apply"),
        ('dataplane = "kernel"\ntransport = "raw"\n[[peer]]\nidentity = "b"\n'
         'allowed_ips = ["10.9.1.0/24"]\npsk_file = "PSK"\n', "runs ESP-in-UDP"),
        ('dataplane = "kernel"\n[[peer]]\nidentity = "b"\nallowed_ips = ["10.9.1.0/24"]\n'
         'psk_file = "PSK"\nrekey_packets = 5000\n', "rekeys by rekey_time"),
    ],
)  # fmt: skip
def test_ikev2_file_errors_are_one_line(tmp_path, extra, message):
    psk = _key(tmp_path, "psk")
    with pytest.raises(ConfigError) as e:
        configfile.loads(HEAD + extra.replace("PSK", str(psk)), tmp_path / "st0.toml")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "st0.toml:" in str(e.value)


def test_ikev2_file_over_tcp_and_raw(tmp_path):
    psk = _key(tmp_path, "psk")
    peer = f'\n[[peer]]\nidentity = "b"\nallowed_ips = ["10.9.1.0/24"]\npsk_file = "{psk}"\n'
    # a responder peer: listens on TCP 4500 unless listen_port says otherwise
    tf = configfile.loads(HEAD + 'transport = "tcp"\n' + peer, tmp_path / "st0.toml")
    c = tf.config
    assert (c.transport, c.port, c.ike.transport, c.ike.listen_port) == ("tcp", 4500, "tcp", 4500)
    tf = configfile.loads(HEAD + 'transport = "tcp"\nlisten_port = 443\n' + peer, tmp_path / "a")
    assert tf.config.ike.listen_port == 443 and tf.config.port == 443
    # an initiator only: connects to the endpoint's port (default 4500), listens nowhere
    tf = configfile.loads(
        HEAD + 'transport = "tcp"\n' + peer + 'endpoint = "198.51.100.7"\n', tmp_path / "b"
    )
    assert tf.config.ike.peers[0].endpoint == ("198.51.100.7", 4500)
    assert tf.config.ike.listen_port is None
    # raw ESP: IKE on UDP 500 (the endpoint's default port), ESP as protocol 50
    tf = configfile.loads(
        HEAD + 'transport = "raw"\n' + peer + 'endpoint = "198.51.100.7"\n', tmp_path / "c"
    )
    assert tf.config.transport == tf.config.ike.transport == "raw"
    assert tf.config.ike.peers[0].endpoint == ("198.51.100.7", 500)
    # soft limits per peer
    tf = configfile.loads(
        HEAD + peer + "rekey_packets = 100000\nrekey_bytes = 1073741824\n", tmp_path / "d"
    )
    sp = tf.config.ike.peers[0]
    assert (sp.rekey_packets, sp.rekey_bytes) == (100000, 1 << 30)
    for bad, message in (
        ("rekey_packets = 0", "rekey_packets must be 1-"),
        ("rekey_bytes = -5", "rekey_bytes must be 1-"),
        ('rekey_bytes = "1G"', "rekey_bytes"),
    ):
        with pytest.raises(ConfigError) as e:
            configfile.loads(HEAD + peer + bad + "\n", tmp_path / "st0.toml")
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    for extra, message in (
        ('transport = "gre"\n', 'use "udp"'),
        ('transport = "tcp"\nlisten_port = 70000\n', "port must be"),
    ):
        with pytest.raises(ConfigError) as e:
            configfile.loads(HEAD + extra + peer, tmp_path / "st0.toml")
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_ike_keys_refused_without_ikev2(tmp_path):
    k = _key(tmp_path, "k")
    text = f'[interface]\nlisten_port = 4000\nkey_file = "{k}"\n[[peer]]\nidentity = "x"\n'
    with pytest.raises(ConfigError, match='needs key_exchange = "ikev2"'):
        configfile.loads(text, tmp_path / "st0.toml")


class FakeKernel:
    """simpletun.xfrm's SA and policy calls, recorded (this machine's kernel has no ESP)."""

    def __init__(self, monkeypatch):
        from simpletun import xfrm

        self.sas: dict = {}
        self.policies: list = []
        self.log: list = []
        monkeypatch.setattr(xfrm, "add_sa", self.add_sa)
        monkeypatch.setattr(xfrm, "delete_sa", self.delete_sa)
        monkeypatch.setattr(xfrm, "add_policy", lambda p, netns=None: self.policies.append(p))
        monkeypatch.setattr(xfrm, "delete_policy", self.delete_policy)
        monkeypatch.setattr(xfrm, "get_sa", self.get_sa)

    def add_sa(self, sa, netns=None):
        self.log.append(("add", sa.spi, sa.src))
        self.sas[(sa.dst, sa.spi)] = sa

    def delete_sa(self, dst, spi, src=None, netns=None):
        self.log.append(("del", spi))
        del self.sas[(dst, spi)]

    def delete_policy(self, sel, d, if_id=None, netns=None):
        (p,) = [p for p in self.policies if (p.selector, p.dir, p.if_id) == (sel, d, if_id)]
        self.policies.remove(p)

    def get_sa(self, dst, spi, src=None, netns=None):
        from simpletun import xfrm

        sa = self.sas[(dst, spi)]
        return xfrm.SAState(sa.src, dst, spi, sa.reqid, 1, 2, 0, sa.replay_window, packets=7)


def test_ikev2_child_sas_go_to_kernel_sas_and_policies(monkeypatch):
    """With the kernel data plane (kernel_dp.KernelPlane) the glue's Child SA installs become
    xfrm SAs (UDP-encapsulated, on the xfrm interface) and policies for the peer's traffic
    selectors; a rekey adds the new inbound SA before the new outbound one, deletes the old
    outbound SA at the switch and the old inbound one after the grace period; stop() removes
    everything."""
    from simpletun import kernel_dp

    kern = FakeKernel(monkeypatch)
    a, b, wire, clock = pair()

    class Sock:
        def sendto(self, data, remote):
            wire.append((NATT_PORT, remote, data))

    timers: list = []

    class Timer:
        def __init__(self, secs, fn):
            self.secs, self.fn = secs, fn
            timers.append(self)

        def start(self):
            pass

        def cancel(self):
            pass

    plane = kernel_dp.KernelPlane("192.0.2.1", Sock(), timer=Timer)
    a = IkeGlue(a.ep, plane, 1, lambda d, r: wire.append((500, r, d)), "192.0.2.1", clock=clock)
    a.src = "192.0.2.1"
    a.start(a.ep.peers[0])
    pump(a, b, wire)
    st = a.peers["b"]
    ((spi_in, view),) = st.children.items()
    inbound = kern.sas[("192.0.2.1", spi_in)]
    outbound = kern.sas[("192.0.2.2", view.spi_out)]
    assert (inbound.src, outbound.src) == ("192.0.2.2", "192.0.2.1")
    for sa in (inbound, outbound):
        assert sa.if_id == kernel_dp.IF_ID and sa.encap.sport == sa.encap.dport == NATT_PORT
    assert {(str(p.selector.src), str(p.selector.dst), p.dir) for p in kern.policies} == {
        ("0.0.0.0/0", "10.2.0.0/24", "out"),
        ("10.2.0.0/24", "0.0.0.0/0", "in"),
    }
    out_pol = next(p for p in kern.policies if p.dir == "out")
    assert out_pol.templates[0].reqid == outbound.reqid
    assert kern.log[:2] == [("add", spi_in, "192.0.2.2"), ("add", view.spi_out, "192.0.2.1")]
    # rekey: new inbound, then new outbound, old outbound deleted at the switch
    kern.log.clear()
    a._rekey_out(st.dp_peer, view.spi_out, "test")
    pump(a, b, wire)
    ((new_in, new_view),) = st.children.items()
    assert new_in != spi_in
    adds = [x for x in kern.log if x[0] == "add"]
    assert adds == [("add", new_in, "192.0.2.2"), ("add", new_view.spi_out, "192.0.2.1")]
    assert kern.log.index(("del", view.spi_out)) > kern.log.index(adds[1])
    assert ("192.0.2.1", spi_in) in kern.sas  # still valid during the grace period ...
    (t,) = timers
    assert t.secs > 0
    t.fn()
    assert ("192.0.2.1", spi_in) not in kern.sas  # ... then gone
    status = a.status()[0]
    assert status["child_sas"][0]["packets_in"] == 7
    # the peer's totals keep what the deleted SAs carried (7 packets each in the fake)
    stats = plane.peer_stats(st.dp_peer)
    assert (stats["tx_packets"], stats["rx_packets"]) == (14, 14)
    plane.stop()
    assert kern.sas == {} and kern.policies == []
