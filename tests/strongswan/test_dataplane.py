"""simpletun's IKEv2 wired to the v2 Rust data plane (simpletun.ikesession) against charon:
as initiator and as responder, a 10 MiB TCP transfer through the tunnel with equal SHA-256,
and charon's own counters showing the ESP it decrypted."""

from __future__ import annotations

import os
import re

import pytest
import trio
from netns.lab import VETH_A_ADDR, VETH_B_ADDR, run_in_netns

from simpletun import ikesession
from simpletun.ike import Endpoint, PeerConfig

from .charon import Charon
from .conftest import A_INNER, B_INNER, PSK
from .driver import open_tun

pytestmark = pytest.mark.netns

A_IN, B_IN = "10.78.1.1", "10.78.2.1"


def _transfer(lab, nbytes: int) -> tuple[str, str]:
    return lab.tcp_transfer((lab.ns_a, A_IN), (lab.ns_b, B_IN), nbytes, port=5202)


@pytest.mark.parametrize("we_initiate", [True, False], ids=["we-initiate", "charon-initiates"])
def test_10mib_through_the_data_plane(lab, tmp_path, we_initiate):
    charon = Charon(
        lab, lab.ns_b, tmp_path / "charon", local=VETH_B_ADDR,
        remote="%any" if we_initiate else VETH_A_ADDR, remote_id=VETH_A_ADDR,
        local_ts=B_INNER, remote_ts=A_INNER, inner_addr=B_IN, psk=PSK,
    )  # fmt: skip
    peer = PeerConfig(
        name="charon", local_ts=[A_INNER], remote_ts=[B_INNER], local_addr=VETH_A_ADDR,
        remote_addr=(VETH_B_ADDR, 500) if we_initiate else None, psk=PSK.encode(),
        retransmit_base=0.5,
    )  # fmt: skip
    fd = open_tun(lab.ns_a, "iketun0")
    for argv in (
        ["ip", "addr", "add", f"{A_IN}/24", "dev", "iketun0"],
        ["ip", "link", "set", "iketun0", "mtu", "1400", "up"],
        ["ip", "route", "add", B_INNER, "dev", "iketun0"],
    ):
        lab.run(lab.ns_a, argv)
    socks = run_in_netns(lab.ns_a, lambda: ikesession.ike_sockets(VETH_A_ADDR))
    out = {}

    async def main():
        async with trio.open_nursery() as n:
            glue = await n.start(
                lambda **kw: ikesession.run(fd, Endpoint([peer]), *socks, VETH_A_ADDR, **kw)
            )
            if not we_initiate:
                await trio.to_thread.run_sync(lambda: charon.initiate(wait=True))
            with trio.fail_after(15):
                while not glue.peers["charon"].children:
                    await trio.sleep(0.05)
            out["hashes"] = await trio.to_thread.run_sync(_transfer, lab, 10 << 20)
            out["status"] = glue.status()
            out["sas"] = await trio.to_thread.run_sync(charon.list_sas)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for s in socks:
            s.close()
        os.close(fd)
    tx, rx = out["hashes"]
    assert tx == rx
    (st,) = out["status"]
    assert st["ike_sa"] and len(st["child_sas"]) == 1
    assert st["stats"]["tx_packets"] > 7000 and st["stats"]["rx_packets"] > 0
    log = charon.log()
    spi_out = st["child_sas"][0]["spi_out"]
    assert "CHILD_SA net{1} established" in log, log[-2000:]
    assert spi_out in log
    # charon's own counter of the ESP it decrypted on that SA: the 10 MiB and more
    m = re.search(r"in  ([0-9a-f]{8}),\s+(\d+) bytes,\s+(\d+) packets", out["sas"])
    assert m, out["sas"]
    assert int(m.group(1), 16) == int(spi_out, 16) and int(m.group(2)) >= 10 << 20, out["sas"]


CASES = [(True, False), (False, False), (True, True), (False, True)]


@pytest.mark.parametrize(
    ("we_initiate", "ipv6"), CASES,
    ids=[f"{'we' if w else 'charon'}-initiate{'s' if not w else ''}-{'v6' if v6 else 'v4'}"
         for w, v6 in CASES],
)  # fmt: skip
def test_simpletun_up_config_against_charon_10mib(lab, tmp_path, monkeypatch, we_initiate, ipv6):
    """The product path: `simpletun up FILE` (key_exchange = "ikev2") against charon, a
    10 MiB transfer with equal SHA-256, `status --json` and charon's counters agreeing; with
    IPv4 and with IPv6 outer addresses (ESP-in-UDP over IPv6 between charon's libipsec and the
    Rust data plane)."""
    import json

    from netns.dgtunnel import VETH_A_ADDR6, VETH_B_ADDR6, add_ipv6_outer
    from netns.lab import Lab
    from netns.tunnel import simpletun_cmd

    from simpletun import keys

    a_ip, b_ip = VETH_A_ADDR, VETH_B_ADDR
    if ipv6:
        lab = Lab(tmp_path / "lab6", tag="ike6", ipv6=True)
        add_ipv6_outer(lab)
        a_ip, b_ip = VETH_A_ADDR6, VETH_B_ADDR6

    key = keys.generate_key()
    kf = tmp_path / "psk.key"
    kf.write_text(keys.encode_key(key) + "\n")
    kf.chmod(0o600)
    charon = Charon(
        lab, lab.ns_b, tmp_path / "charon", local=b_ip,
        remote="%any" if we_initiate else a_ip, remote_id=a_ip,
        local_ts=B_INNER, remote_ts=A_INNER, inner_addr=B_IN, psk="0x" + key.hex(),
    )  # fmt: skip
    conf = tmp_path / "st0.toml"
    endpoint = f"[{b_ip}]" if ipv6 else b_ip
    conf.write_text(
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{A_IN}/24"]\nmtu = 1400\n'
        f'listen_address = "{a_ip}"\n\n[[peer]]\nname = "charon"\n'
        f'identity = "{b_ip}"\nallowed_ips = ["{B_INNER}"]\npsk_file = "{kf}"\n'
        + (f'endpoint = "{endpoint}"\n' if we_initiate else "")
    )
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run"))
    up = lab.run(lab.ns_a, [simpletun_cmd(), "up", str(conf)], check=False, timeout=40)
    assert up.returncode == 0, up.stderr
    try:
        if not we_initiate:
            charon.initiate(wait=True)
        lab.wait_ping(lab.ns_a, B_IN, 20)
        tx, rx = _transfer(lab, 10 << 20)
        assert tx == rx
        s = json.loads(
            lab.run(lab.ns_a, [simpletun_cmd(), "status", "st0", "--json"], check=False).stdout
        )
        (peer,) = s["peers"]
        (child,) = peer["child_sas"]
        sas = charon.list_sas()
        m = re.search(r"in  ([0-9a-f]{8}),\s+(\d+) bytes,\s+(\d+) packets", sas)
        assert m and m.group(1) == child["spi_out"] and int(m.group(2)) >= 10 << 20, sas
        assert "INSTALLED, TUNNEL-in-UDP" in sas, sas
        assert (b_ip in sas) and peer["endpoint"].strip("[").startswith(b_ip), (sas, peer)
    finally:
        lab.run(lab.ns_a, [simpletun_cmd(), "down", "st0"], check=False, timeout=40)
        if ipv6:
            lab.close()
