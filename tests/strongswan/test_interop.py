"""simpletun's IKEv2 (sans-IO endpoint over UDP sockets) against strongSwan 5.9's charon.

Every test checks what charon itself reports: ``swanctl --list-sas`` (states, SPIs, algorithms)
and its level-4 log (the Child SA keys it derived, the notifications it sent or received).
"""

from __future__ import annotations

import re
import socket

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from netns.lab import VETH_B_ADDR, run_in_netns

from simpletun.ike import Endpoint, Identity, InstallChildSa
from simpletun.ike import const as c
from simpletun.ike import crypto as cr

pytestmark = pytest.mark.netns


def charon_child_spis(list_sas: str, state: str = "INSTALLED") -> list[tuple[int, int]]:
    """(charon's inbound SPI, charon's outbound SPI) of each Child SA in ``state``."""
    out, cur, spi_in = [], None, None
    for line in list_sas.splitlines():
        mh = re.match(r"^\s+\S+: #\d+, reqid \d+, (\w+),", line)
        if mh:
            cur = mh.group(1)
        mi = re.match(r"^\s+in\s+([0-9a-f]{8}),", line)
        if mi:
            spi_in = int(mi.group(1), 16)
        mo = re.match(r"^\s+out\s+([0-9a-f]{8}),", line)
        if mo and cur == state:
            out.append((spi_in, int(mo.group(1), 16)))
    return out


def assert_keys_match(charon, inst: InstallChildSa, we_initiated: bool) -> None:
    """charon's logged keys for this Child SA equal ours, direction by direction."""
    if we_initiated:
        want = {
            "encryption initiator key": inst.enc_out,
            "integrity initiator key": inst.auth_out,
            "encryption responder key": inst.enc_in,
            "integrity responder key": inst.auth_in,
        }
    else:
        want = {
            "encryption initiator key": inst.enc_in,
            "integrity initiator key": inst.auth_in,
            "encryption responder key": inst.enc_out,
            "integrity responder key": inst.auth_out,
        }
    # fmt: skip
    dumps = charon.child_keys()
    assert want in dumps, f"our keys for {inst.spi_in:08x} not among charon's {len(dumps)} dumps"


def assert_installed(charon, inst: InstallChildSa) -> str:
    sas = charon.list_sas()
    assert "ESTABLISHED" in sas and "INSTALLED, TUNNEL-in-UDP" in sas, sas
    assert (inst.spi_out, inst.spi_in) in charon_child_spis(sas), sas
    return sas


def ed_keys():
    k = ed25519.Ed25519PrivateKey.generate()
    pem = k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return k, pem, pub


@pytest.mark.parametrize(
    "ike,suites",
    [
        ("aes128-sha256-x25519", (cr.cbc_suite(128, c.DH_CURVE25519),)),
        ("aes256-sha256-ecp256", (cr.cbc_suite(256, c.DH_ECP256),)),
        ("aes256gcm16-prfsha256-x25519", (cr.gcm_suite(256, c.DH_CURVE25519),)),
    ],
)
@pytest.mark.parametrize("esp", ["aes128-sha256", "aes256-sha256"])
def test_we_initiate_psk(pair, ike, suites, esp):
    p = pair(ike=ike, esp=esp, peer_kw={"ike_suites": suites})
    p.up()
    inst = next(iter(p.drv.children.values()))
    assert inst.encap == (4500, (VETH_B_ADDR, 4500))  # libipsec forced NAT-T
    assert inst.suite.key_bits == int(esp[3:6])
    sas = assert_installed(p.charon, inst)
    assert_keys_match(p.charon, inst, we_initiated=True)
    algo = "AES_GCM_16-256" if "gcm" in ike else ("AES_CBC-128" if "128" in ike else "AES_CBC-256")
    assert algo in sas


@pytest.mark.parametrize(
    "ike,esp",
    [("aes128-sha256-x25519", "aes128-sha256"), ("aes256-sha256-ecp256", "aes256-sha256")],
)
def test_charon_initiates_psk(pair, ike, esp):
    p = pair(we_initiate=False, ike=ike, esp=esp)
    p.up()
    inst = next(iter(p.drv.children.values()))
    assert inst.encap is not None and inst.encap[0] == 4500
    assert_installed(p.charon, inst)
    assert_keys_match(p.charon, inst, we_initiated=False)


@pytest.mark.parametrize("we_initiate", [True, False], ids=["we-initiate", "charon-initiates"])
def test_ed25519_raw_public_keys(pair, we_initiate):
    ours, _, our_pub = ed_keys()
    theirs, their_pem, _ = ed_keys()
    p = pair(
        we_initiate=we_initiate,
        local_key_pem=their_pem,
        remote_pub_pem=our_pub,
        local_id="b.example",
        remote_id="a.example",
        peer_kw={
            "private_key": ours,
            "remote_public_key": theirs.public_key(),
            "local_id": Identity.parse("a.example"),
            "remote_id": Identity.parse("b.example"),
        },
    )
    p.up()
    inst = next(iter(p.drv.children.values()))
    sas = assert_installed(p.charon, inst)
    assert "local  'b.example'" in sas and "remote 'a.example'" in sas
    assert_keys_match(p.charon, inst, we_initiated=we_initiate)
    log = p.charon.log()
    assert "authentication of 'a.example' with ED25519 successful" in log


PFS = [("aes128-sha256-x25519", c.DH_CURVE25519), ("aes256-sha256-ecp256", c.DH_ECP256),
       ("aes128-sha256", 0)]  # fmt: skip


@pytest.mark.parametrize("esp,group", PFS, ids=["pfs-x25519", "pfs-p256", "no-pfs"])
def test_rekeys_initiated_by_us(pair, esp, group):
    p = pair(esp=esp, peer_kw={"pfs_group": group})
    sa = p.up()
    first = next(iter(p.drv.children.values()))
    p.drv.handle(p.ep.rekey_child(sa, first.spi_in, p.drv.now()))
    p.drv.run_until(lambda: first.spi_in not in p.drv.children, 10, "the old Child SA gone")
    (second,) = p.drv.children.values()
    assert second.rekey_of == first.spi_in and second.suite.dh == group
    sas = assert_installed(p.charon, second)
    assert (first.spi_out, first.spi_in) not in charon_child_spis(sas), sas
    assert_keys_match(p.charon, second, we_initiated=True)
    # now the IKE SA
    p.drv.handle(p.ep.rekey_ike(sa, p.drv.now()))
    p.drv.run_until(lambda: p.drv.rekeys() and sa.our_spi not in p.ep.sas, 10, "IKE rekey")
    (new,) = p.ep.find("charon")
    sas = p.charon.list_sas()
    assert f"{new.spi_i.hex()}_i {new.spi_r.hex()}_r*" in sas, sas
    assert sa.spi_i.hex() not in sas
    # the new IKE SA works: a DPD over it, and the Child SA still stands
    p.drv.handle(p.ep.dpd(new, p.drv.now()))
    p.drv.run_until(lambda: new.outstanding is None, 5, "DPD response on the new IKE SA")
    assert_installed(p.charon, second)


@pytest.mark.parametrize("esp,group", PFS, ids=["pfs-x25519", "pfs-p256", "no-pfs"])
def test_rekeys_initiated_by_charon(pair, esp, group):
    p = pair(esp=esp)
    sa = p.up()
    first = next(iter(p.drv.children.values()))
    p.charon.swanctl("--rekey", "--child", "net")
    p.drv.run_until(lambda: first.spi_in not in p.drv.children, 10, "charon's Child SA rekey")
    (second,) = p.drv.children.values()
    assert second.rekey_of == first.spi_in and second.suite.dh == group
    assert_installed(p.charon, second)
    assert_keys_match(p.charon, second, we_initiated=False)
    p.charon.swanctl("--rekey", "--ike", "peer")
    p.drv.run_until(lambda: p.drv.rekeys() and sa.our_spi not in p.ep.sas, 10, "IKE rekey")
    (new,) = p.ep.find("charon")
    assert not new.initiator  # charon initiated the rekey, so it is the new SA's initiator
    sas = p.charon.list_sas()
    assert f"{new.spi_i.hex()}_i* {new.spi_r.hex()}_r" in sas, sas
    assert_installed(p.charon, second)
    assert not p.drv.downs()


def test_invalid_ke_from_charon(pair, ike_log):
    # we offer X25519 first with its KE; charon accepts only P-256 and says so
    p = pair(ike="aes128-sha256-ecp256")
    p.up()
    assert "requesting ECP_256" in p.charon.log()
    msgs = [r.getMessage() for r in ike_log.records]
    assert "parsed IKE_SA_INIT response 0 [ N(INVAL_KE) ]" in msgs
    assert "ECP_256" in p.drv.ups()[0].suite


def test_dpd_by_charon(pair, ike_log):
    # each side sends DPD only after dpd_delay without inbound messages, so one side at a time
    p = pair(dpd_delay="1s")
    p.up()
    p.drv.run_for(2.5)
    assert p.charon.log().count("sending DPD request") >= 2
    ours = [r.getMessage() for r in ike_log.records]
    assert sum(x.startswith("parsed INFORMATIONAL request") for x in ours) >= 2
    assert sum(x.startswith("generating INFORMATIONAL response") for x in ours) >= 2
    assert not p.drv.downs() and "ESTABLISHED" in p.charon.list_sas()


def test_dpd_by_us(pair, ike_log):
    p = pair(peer_kw={"dpd_delay": 0.5})
    p.up()
    p.drv.run_for(1.8)
    assert p.charon.log().count("generating INFORMATIONAL response") >= 2
    ours = [r.getMessage() for r in ike_log.records]
    assert sum(x.startswith("parsed INFORMATIONAL response") for x in ours) >= 2
    assert not p.drv.downs()


def test_dpd_detects_dead_peer(pair):
    p = pair(peer_kw={"dpd_delay": 0.5})
    p.up()
    p.charon.proc.send_signal(19)  # SIGSTOP: charon stops answering
    try:
        p.drv.run_until(p.drv.downs, 10, "DPD to declare the peer dead")
    finally:
        p.charon.proc.send_signal(18)  # SIGCONT
    (down,) = p.drv.downs()
    assert "peer not responding" in down.reason
    assert not p.drv.children


def test_delete_by_us(pair):
    p = pair()
    sa = p.up()
    p.drv.handle(p.ep.delete_ike(sa, p.drv.now()))
    p.drv.run_until(p.drv.downs, 5, "our Delete answered")
    assert not p.drv.children
    sas = p.charon.list_sas()
    assert "ESTABLISHED" not in sas, sas
    assert "received DELETE for IKE_SA" in p.charon.log()


def test_delete_by_charon(pair):
    p = pair()
    p.up()
    proc = p.charon.swanctl_bg("--terminate", "--ike", "peer", "--timeout", "5")
    p.drv.run_until(p.drv.downs, 5, "charon's Delete")
    p.drv.run_until(lambda: proc.poll() is not None, 5, "swanctl --terminate")
    assert proc.returncode == 0, proc.stdout.read()
    assert p.drv.downs()[0].reason == "deleted by the peer"
    assert not p.drv.children


def test_charon_child_delete(pair):
    p = pair()
    p.up()
    proc = p.charon.swanctl_bg("--terminate", "--child", "net", "--timeout", "5")
    p.drv.run_until(lambda: not p.drv.children, 5, "charon's Child SA Delete")
    p.drv.run_until(lambda: proc.poll() is not None, 5, "swanctl --terminate")
    assert proc.returncode == 0, proc.stdout.read()
    assert "ESTABLISHED" in p.charon.list_sas() and "INSTALLED" not in p.charon.list_sas()
    assert p.ep.find("charon")  # the IKE SA stays


def test_charon_demands_cookie(pair, lab, ike_log):
    p = pair(cookie_threshold=1)
    # one half-open IKE SA at charon: an initiator that never answers
    other = Endpoint([p.peer])
    (send,) = [a for a in other.initiate(p.peer, 0.0) if hasattr(a, "data")]

    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("10.250.0.1", 0))
        return s

    s = run_in_netns(lab.ns_a, make)
    try:
        s.sendto(send.data, (VETH_B_ADDR, 500))
        s.settimeout(3)
        s.recvfrom(2048)  # charon's answer: it now holds one half-open SA
        p.up()
    finally:
        s.close()
    msgs = [r.getMessage() for r in ike_log.records]
    assert "parsed IKE_SA_INIT response 0 [ N(COOKIE) ]" in msgs
    assert any(x.startswith("generating IKE_SA_INIT request 0 [ N(COOKIE) SA KE No") for x in msgs)
    assert "generating IKE_SA_INIT response 0 [ N(COOKIE) ]" in p.charon.log()
    assert_installed(p.charon, next(iter(p.drv.children.values())))


def test_we_demand_cookie(pair):
    p = pair(we_initiate=False, ep_kw={"cookie_threshold": 0})
    p.up()
    assert p.ep.stats["cookie_sent"] >= 1
    assert "parsed IKE_SA_INIT response 0 [ N(COOKIE) ]" in p.charon.log()
    assert_installed(p.charon, next(iter(p.drv.children.values())))


def test_wrong_psk_we_initiate(pair):
    p = pair(peer_kw={"psk": b"not-the-right-psk-at-all-0123456"})
    p.drv.handle(p.ep.initiate(p.peer, p.drv.now()))
    p.drv.run_until(p.drv.downs, 10, "the refusal")
    (down,) = p.drv.downs()
    assert "AUTHENTICATION_FAILED" in down.reason and "same PSK" in down.reason
    log = p.charon.log()
    assert "MAC mismatched" in log and "N(AUTH_FAILED)" in log


def test_wrong_psk_charon_initiates(pair):
    p = pair(we_initiate=False, peer_kw={"psk": b"not-the-right-psk-at-all-0123456"})
    p.charon.initiate()
    p.drv.run_until(p.drv.downs, 10, "our refusal")
    (down,) = p.drv.downs()
    assert "PSK MAC does not verify" in down.reason
    p.drv.run_for(0.3)
    assert "received AUTHENTICATION_FAILED notify error" in p.charon.log()


def test_unknown_ed25519_key_refused(pair):
    ours, _, _ = ed_keys()
    theirs, their_pem, _ = ed_keys()
    _, _, stranger_pub = ed_keys()
    p = pair(
        local_key_pem=their_pem,
        remote_pub_pem=stranger_pub,  # charon does not know our key
        local_id="b.example",
        remote_id="a.example",
        peer_kw={
            "private_key": ours,
            "remote_public_key": theirs.public_key(),
            "local_id": Identity.parse("a.example"),
        },
    )
    p.drv.handle(p.ep.initiate(p.peer, p.drv.now()))
    p.drv.run_until(p.drv.downs, 10, "the refusal")
    assert "AUTHENTICATION_FAILED" in p.drv.downs()[0].reason
    assert "N(AUTH_FAILED)" in p.charon.log()


def _ping_proc(lab, count: int, interval: float):
    import subprocess

    return subprocess.Popen(
        ["ip", "netns", "exec", lab.ns_a, "ping", "-n", "-q", "-c", str(count), "-i",
         str(interval), "-W", "2", "-I", "10.78.1.1", "10.78.2.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("we_initiate", [True, False], ids=["we-initiate", "charon-initiates"])
def test_ping_over_esp_in_udp_across_rekeys(pair, lab, we_initiate):
    """Real traffic: ping from A's TUN through simpletun's ESP core (UDP 4500) to charon's
    libipsec and back, while the Child SA is rekeyed by us and then by charon, and then the
    IKE SA by us and by charon: no reply lost."""
    import os

    from netns.lab import parse_ping

    from .driver import open_tun

    p = pair(we_initiate=we_initiate, esp="aes128-sha256-x25519")
    fd = open_tun(lab.ns_a, "iketun0")
    try:
        for argv in (
            ["ip", "addr", "add", "10.78.1.1/24", "dev", "iketun0"],
            ["ip", "link", "set", "iketun0", "mtu", "1400", "up"],
            ["ip", "route", "add", "10.78.2.0/24", "dev", "iketun0"],
        ):
            lab.run(lab.ns_a, argv)
        p.drv.attach_tun(fd)
        sa = p.up()
        first = next(iter(p.drv.children.values()))
        proc = _ping_proc(lab, 120, 0.05)
        p.drv.run_for(1.0)
        p.drv.handle(p.ep.rekey_child(sa, first.spi_in, p.drv.now()))
        p.drv.run_until(lambda: first.spi_in not in p.drv.children, 5, "our rekey")
        second = next(iter(p.drv.children.values()))
        p.drv.run_for(0.5)
        p.charon.swanctl("--rekey", "--child", "net")
        p.drv.run_until(lambda: second.spi_in not in p.drv.children, 5, "charon's rekey")
        # IKE SA rekeys by each side: the Child SA moves to the new IKE SA, traffic goes on
        p.drv.run_for(0.3)
        p.drv.handle(p.ep.rekey_ike(sa, p.drv.now()))
        p.drv.run_until(lambda: sa.our_spi not in p.ep.sas, 5, "our IKE rekey")
        (sa2,) = p.ep.find("charon")
        p.drv.run_for(0.3)
        p.charon.swanctl("--rekey", "--ike", "peer")
        p.drv.run_until(lambda: sa2.our_spi not in p.ep.sas, 5, "charon's IKE rekey")
        assert proc.poll() is None  # all four rekeys happened while the ping ran
        p.drv.run_until(lambda: proc.poll() is not None, 15, "ping to finish")
        sent, received, _ = parse_ping(proc.stdout.read())
        assert sent == 120 and received == 120, (sent, received, p.drv.esp_stats)
        assert len(p.drv.rekeys()) == 2 and not p.drv.downs()
        st = p.drv.esp_stats
        assert st["tx"] >= 120 and st["rx"] >= 120 and st["rx_dropped"] == 0
        sas = p.charon.list_sas()
        (third,) = p.drv.children.values()
        assert_installed(p.charon, third)
        assert re.search(r"in  [0-9a-f]{8},\s+\d+ bytes,\s+[1-9]\d* packets", sas), sas
    finally:
        os.close(fd)


def test_we_refuse_charons_key(pair):
    ours, _, our_pub = ed_keys()
    _, their_pem, _ = ed_keys()
    stranger, _, _ = ed_keys()
    p = pair(
        local_key_pem=their_pem,
        remote_pub_pem=our_pub,
        local_id="b.example",
        remote_id="a.example",
        peer_kw={
            "private_key": ours,
            "remote_public_key": stranger.public_key(),  # not charon's key
            "local_id": Identity.parse("a.example"),
        },
    )
    p.drv.handle(p.ep.initiate(p.peer, p.drv.now()))
    p.drv.run_until(p.drv.downs, 10, "our refusal")
    assert "signature does not verify" in p.drv.downs()[0].reason
    told = "parsed INFORMATIONAL request 2 [ N(AUTH_FAILED) ]"
    p.drv.run_until(lambda: told in p.charon.log(), 5, "charon told")
    p.drv.run_until(lambda: "IKE_SA deleted" in p.charon.log(), 5, "charon's IKE SA deleted")
    assert "ESTABLISHED" not in p.charon.list_sas()
