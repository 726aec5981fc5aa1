"""Two simpletun ends keyed by IKEv2 over the v2 data plane (simpletun.ikesession), in two
namespaces: ping, a SHA-256-checked TCP transfer, and a Child SA rekey (data-plane soft
sequence limit) during the transfer with no packet lost."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ed25519

from simpletun import ikesession
from simpletun.ike import Endpoint, Identity, PeerConfig

from .lab import VETH_A_ADDR, VETH_B_ADDR, Lab, run_in_netns

pytestmark = pytest.mark.netns

NET_A = "10.251.1.0/24"
NET_B = "10.251.2.0/24"


def open_tun(ns: str, name: str, addr: str, route: str) -> int:
    def make():
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
        return fd

    fd = run_in_netns(ns, make)
    os.system(f"ip -n {ns} addr add {addr}/32 dev {name}")
    os.system(f"ip -n {ns} link set {name} mtu 1400 up")
    os.system(f"ip -n {ns} route add {route} dev {name} src {addr}")
    return fd


def transfer(lab: Lab, nbytes: int) -> tuple[str, str]:
    """nbytes from A's inner address to B's over TCP; (sent, received) SHA-256."""
    return lab.tcp_transfer((lab.ns_a, A_IN), (lab.ns_b, B_IN), nbytes, timeout=60)


A_IN, B_IN = "10.251.1.1", "10.251.2.1"


def make_peers(auth: str):
    if auth == "psk":
        psk = os.urandom(32)
        ka = {"psk": psk}
        kb = {"psk": psk}
    else:
        a, b = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        ka = {"private_key": a, "remote_public_key": b.public_key()}
        kb = {"private_key": b, "remote_public_key": a.public_key()}
    pa = PeerConfig(
        name="b", local_ts=[NET_A], remote_ts=[NET_B], local_addr=VETH_A_ADDR,
        remote_addr=(VETH_B_ADDR, 500), local_id=Identity.parse("a.example"),
        remote_id=Identity.parse("b.example"), retransmit_base=0.5, **ka,
    )  # fmt: skip
    pb = PeerConfig(
        name="a", local_ts=[NET_B], remote_ts=[NET_A], local_addr=VETH_B_ADDR,
        local_id=Identity.parse("b.example"), remote_id=Identity.parse("a.example"), **kb,
    )  # fmt: skip
    return pa, pb


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "lab", tag="ikw")
    try:
        yield lab
    finally:
        lab.close()


def run_pair(lab, auth, body, soft_seq=None):
    pa, pb = make_peers(auth)
    fa = open_tun(lab.ns_a, "ike0", A_IN, NET_B)
    fb = open_tun(lab.ns_b, "ike0", B_IN, NET_A)
    sa = run_in_netns(lab.ns_a, lambda: ikesession.ike_sockets(VETH_A_ADDR))
    sb = run_in_netns(lab.ns_b, lambda: ikesession.ike_sockets(VETH_B_ADDR))
    out = {}

    async def main():
        async with trio.open_nursery() as n:
            gb = await n.start(
                lambda **kw: ikesession.run(fb, Endpoint([pb]), *sb, VETH_B_ADDR, **kw)
            )
            ga = await n.start(
                lambda **kw: ikesession.run(
                    fa, Endpoint([pa]), *sa, VETH_A_ADDR, soft_seq=soft_seq, **kw
                )
            )
            with trio.fail_after(15):
                while not ga.peers["b"].children or not gb.peers["a"].children:
                    await trio.sleep(0.05)
            out["result"] = await trio.to_thread.run_sync(body, ga, gb)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for s in (*sa, *sb):
            s.close()
        os.close(fa)
        os.close(fb)
    return out["result"]


@pytest.mark.parametrize("auth", ["psk", "ed25519"])
def test_ikev2_ping_and_transfer(lab, auth):
    def body(ga, gb):
        sent, rx, _ = lab.ping(lab.ns_a, B_IN, count=5, interval=0.1)
        assert (sent, rx) == (5, 5)
        tx_hash, rx_hash = transfer(lab, 4 << 20)
        assert tx_hash == rx_hash
        st = ga.status()[0]
        assert st["ike_sa"] and st["child_sas"] and st["stats"]["tx_packets"] > 0
        return ga.dp.stats

    stats = run_pair(lab, auth, body)
    assert stats.get("rx_packets", 1) > 0


def test_ikev2_child_rekey_during_transfer_no_loss(lab):
    def body(ga, gb):
        first = set(ga.peers["b"].children)
        tx_hash, rx_hash = transfer(lab, 8 << 20)
        assert tx_hash == rx_hash
        sent, rx, _ = lab.ping(lab.ns_a, B_IN, count=20, interval=0.05)
        assert (sent, rx) == (20, 20)
        now = set(ga.peers["b"].children)
        assert now and not (now <= first), "no Child SA rekey happened"
        return dict(ga.dp.stats), dict(gb.dp.stats)

    sa, sb = run_pair(lab, "psk", body, soft_seq=2000)
    for s in (sa, sb):
        drops = {k: v for k, v in s.items() if k.startswith("drop_") and v}
        assert not {k for k in drops if "auth" in k or "replay" in k or "no_sa" in k}, drops


def test_three_peers_on_one_responder(lab):
    """One responder (namespace B) with three peers, each its own identity, PSK and prefix;
    three initiators in A on three addresses. Every peer pings through its own Child SA, and a
    peer's packets arrive only from its own prefix."""
    n = 3
    pb_list, inits = [], []
    for i in range(1, n + 1):
        psk = os.urandom(32)
        ip = VETH_A_ADDR if i == 1 else f"10.250.0.{10 + i}"
        if i > 1:
            os.system(f"ip -n {lab.ns_a} addr add {ip}/24 dev veth-a")
        net = f"10.251.{10 + i}.0/24"
        pa = PeerConfig(
            name="gw", local_ts=[net], remote_ts=[NET_B], local_addr=ip,
            remote_addr=(VETH_B_ADDR, 500), local_id=Identity.parse(f"p{i}.example"),
            psk=psk, retransmit_base=0.5,
        )  # fmt: skip
        pb_list.append(
            PeerConfig(
                name=f"p{i}",
                local_ts=[NET_B],
                remote_ts=[net],
                local_addr=VETH_B_ADDR,
                remote_id=Identity.parse(f"p{i}.example"),
                psk=psk,
            )  # fmt: skip
        )
        fd = open_tun(lab.ns_a, f"ike{i}", f"10.251.{10 + i}.1", NET_B)
        if i > 1:  # one route per device: the ping binds to its device
            os.system(f"ip -n {lab.ns_a} route del {NET_B} dev ike{i}")
            os.system(
                f"ip -n {lab.ns_a} route add {NET_B} dev ike{i} metric {i} src 10.251.{10 + i}.1"
            )
        socks = run_in_netns(lab.ns_a, lambda ip=ip: ikesession.ike_sockets(ip))
        inits.append((fd, pa, socks, ip))
    fb = open_tun(lab.ns_b, "ike0", B_IN, NET_A)
    for i in range(2, n + 1):
        os.system(f"ip -n {lab.ns_b} route add 10.251.{10 + i}.0/24 dev ike0 src {B_IN}")
    os.system(f"ip -n {lab.ns_b} route add 10.251.11.0/24 dev ike0 src {B_IN}")
    sb = run_in_netns(lab.ns_b, lambda: ikesession.ike_sockets(VETH_B_ADDR))
    out = {}

    def pings():
        res = []
        for i in range(1, n + 1):
            p = lab.run(
                lab.ns_a,
                ["ping", "-n", "-q", "-c", "5", "-i", "0.1", "-W", "2", "-I", f"ike{i}", B_IN],
                check=False,
            )
            res.append(p.stdout.decode())
        return res

    async def main():
        async with trio.open_nursery() as nur:
            gb = await nur.start(
                lambda **kw: ikesession.run(fb, Endpoint(pb_list), *sb, VETH_B_ADDR, **kw)
            )
            for fd, pa, socks, ip in inits:
                await nur.start(
                    lambda fd=fd, pa=pa, socks=socks, ip=ip, **kw: ikesession.run(
                        fd, Endpoint([pa]), *socks, ip, **kw
                    )
                )
            with trio.fail_after(20):
                while not all(st.children for st in gb.peers.values()):
                    await trio.sleep(0.05)
            out["pings"] = await trio.to_thread.run_sync(pings)
            out["status"] = gb.status()
            nur.cancel_scope.cancel()

    from .lab import parse_ping

    try:
        trio.run(main)
    finally:
        for fd, _pa, socks, _ip in inits:
            for s in socks:
                s.close()
            os.close(fd)
        for s in sb:
            s.close()
        os.close(fb)
    for text in out["pings"]:
        assert parse_ping(text)[:2] == (5, 5), text
    peers = {p["name"]: p for p in out["status"]}
    assert set(peers) == {"p1", "p2", "p3"}
    eps = {p["endpoint"] for p in peers.values()}
    assert eps == {f"{VETH_A_ADDR}:4500", "10.250.0.12:4500", "10.250.0.13:4500"}, eps
    for p in peers.values():
        assert p["remote_id"].endswith(".example") and len(p["child_sas"]) == 1, p
        assert p["stats"]["rx_packets"] >= 5 and not p["stats"].get("drop_not_allowed"), p
