"""IKEv2 tunnels from config files (`key_exchange = "ikev2"`): `simpletun up` in two
namespaces, ping through the tunnel, `status --json` per peer with its Child SAs, `reload`
adding a peer while the first one's traffic continues, `down`."""

from __future__ import annotations

import json
import sys

import pytest

from simpletun import keys
from simpletun.ike.keys import public_key_text

from .lab import VETH_A_ADDR, VETH_B_ADDR, parse_ping
from .tunnel import DEV, simpletun_cmd

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

A_IN, B_IN = "10.252.1.1", "10.252.2.1"


def st(lab, ns, *args):
    return lab.run(ns, [simpletun_cmd(), *args], check=False, timeout=40)


def status(lab, ns) -> dict:
    proc = st(lab, ns, "status", DEV, "--json")
    return json.loads(proc.stdout)


def keyfile(path, key=None):
    key = key or keys.generate_key()
    path.write_text(keys.encode_key(key) + "\n")
    path.chmod(0o600)
    return key


@pytest.mark.parametrize("auth", ["psk", "ed25519"])
def test_up_ping_status_reload_down(lab, tmp_path, monkeypatch, auth):
    psk = tmp_path / "psk.key"
    keyfile(psk)
    ka, kb = tmp_path / "a.key", tmp_path / "b.key"
    pub_a = public_key_text(keyfile(ka)).strip()
    pub_b = public_key_text(keyfile(kb)).strip()
    if auth == "psk":
        auth_a, auth_b = f'psk_file = "{psk}"', f'psk_file = "{psk}"'
        ikey_a = ikey_b = ""
    else:
        auth_a, auth_b = f'public_key = "{pub_b}"', f'public_key = "{pub_a}"'
        ikey_a, ikey_b = f'private_key_file = "{ka}"\n', f'private_key_file = "{kb}"\n'
    resp = tmp_path / "a" / f"{DEV}.toml"
    resp.parent.mkdir()
    head_a = (
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{A_IN}/24"]\n'
        f'listen_address = "{VETH_A_ADDR}"\nlocal_id = "a.example"\n{ikey_a}\n'
        f'[[peer]]\nname = "b"\nidentity = "b.example"\nallowed_ips = ["10.252.2.0/24"]\n'
        f"{auth_a}\n"
    )
    resp.write_text(head_a)
    init = tmp_path / "b" / f"{DEV}.toml"
    init.parent.mkdir()
    init.write_text(
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{B_IN}/24"]\n'
        f'listen_address = "{VETH_B_ADDR}"\nlocal_id = "b.example"\n{ikey_b}\n'
        f'[[peer]]\nname = "a"\nidentity = "a.example"\nendpoint = "{VETH_A_ADDR}"\n'
        f'allowed_ips = ["10.252.1.0/24"]\n{auth_b}\n'
    )
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
    up = st(lab, lab.ns_a, "up", str(resp))
    assert up.returncode == 0, up.stderr
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
    up = st(lab, lab.ns_b, "up", str(init))
    assert up.returncode == 0, up.stderr
    try:
        lab.wait_ping(lab.ns_b, A_IN, 20)
        s = status(lab, lab.ns_b)
        (peer,) = s["peers"]
        assert s["key_exchange"] == "ikev2" and peer["ike_sa"] and peer["child_sas"], s
        assert peer["endpoint"] == f"{VETH_A_ADDR}:4500", peer
        child = peer["child_sas"][0]
        assert len(child["spi_in"]) == 8 and child["outbound"], child
        # per-SA sequence numbers from the data plane (pings went both ways)
        assert child["seq_out"] >= child["packets_out"] > 0 and child["seq_in"] > 0, child
        assert {sa["seq"] > 0 for sa in peer["sas"]} == {True}, peer["sas"]
        text = st(lab, lab.ns_b, "status", DEV)
        assert text.returncode == 0 and f"spi 0x{child['spi_out']}" in text.stdout.decode(), text
        # reload the responder with a second peer while a ping runs through the first
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
        ping = lab.spawn(
            lab.ns_b, ["ping", "-n", "-q", "-c", "30", "-i", "0.05", A_IN], name="ping"
        )
        resp.write_text(
            head_a + '\n[[peer]]\nname = "c"\nidentity = "c.example"\n'
            f'allowed_ips = ["10.252.3.0/24"]\npsk_file = "{psk}"\n'
        )
        rl = st(lab, lab.ns_a, "reload", DEV)
        assert rl.returncode == 0, rl.stderr
        ping.wait(20)
        sent, received, _ = parse_ping(ping.stdout())
        assert sent == 30 and received == 30, ping.stdout()
        sa = status(lab, lab.ns_a)
        names = {p["name"]: p for p in sa["peers"]}
        assert set(names) == {"b", "c"}, sa
        assert names["b"]["child_sas"] and not names["c"]["child_sas"], sa
        assert "10.252.3.0/24 dev st0" in lab.run(lab.ns_a, ["ip", "route"]).stdout.decode()
        # a transfer through peer b spans two more reloads: c removed, then added back
        spi_b = names["b"]["child_sas"][0]["spi_in"]
        c_back = head_a + (
            '\n[[peer]]\nname = "c"\nidentity = "c.example"\n'
            f'allowed_ips = ["10.252.3.0/24"]\npsk_file = "{psk}"\n'
        )

        def remove_c():
            resp.write_text(head_a)
            assert st(lab, lab.ns_a, "reload", DEV).returncode == 0
            assert {p["name"] for p in status(lab, lab.ns_a)["peers"]} == {"b"}

        def add_c_back():
            resp.write_text(c_back)
            assert st(lab, lab.ns_a, "reload", DEV).returncode == 0

        tx, rx = lab.tcp_transfer(
            (lab.ns_b, B_IN), (lab.ns_a, A_IN), 12 << 20, port=5301, between=[remove_c, add_c_back]
        )
        assert tx == rx, "12 MiB through b changed across reloads"
        sa = status(lab, lab.ns_a)
        names = {p["name"]: p for p in sa["peers"]}
        assert set(names) == {"b", "c"}, sa
        assert spi_b in {c["spi_in"] for c in names["b"]["child_sas"]}, "b was rekeyed by reload"
        assert not names["b"]["drops"], names["b"]
    finally:
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
        st(lab, lab.ns_b, "down", DEV)
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
        st(lab, lab.ns_a, "down", DEV)
    assert DEV not in lab.links(lab.ns_a)


@pytest.mark.parametrize("transport", ["udp", "tcp", "raw"])
def test_cli_key_exchange_ikev2_server_and_client(lab, tmp_path, transport):
    """`simpletun -s --listen ADDR --key-exchange ikev2` and `-c HOST --key-exchange ikev2`
    with the same --key file: the IKEv2 tunnel comes up and carries pings; over UDP (default),
    TCP (RFC 8229, on a -p port of our choosing) and raw ESP."""
    k = tmp_path / "k"
    keyfile(k)
    common = ["--key-exchange", "ikev2", "--key", str(k), "-i", "ikc0", "-d"]
    if transport != "udp":
        common += ["--transport", transport]
    if transport == "tcp":
        common += ["-p", "4433"]
    srv = lab.spawn(
        lab.ns_a,
        [simpletun_cmd(), "-s", "--listen", VETH_A_ADDR, "--addr", "10.253.0.1/24", *common],
        name="srv",
    )
    cli = lab.spawn(
        lab.ns_b, [simpletun_cmd(), "-c", VETH_A_ADDR, "--addr", "10.253.0.2/24", *common],
        name="cli",
    )  # fmt: skip
    try:
        lab.wait_ping(lab.ns_b, "10.253.0.1", 20)
        sent, received, _ = lab.ping(lab.ns_b, "10.253.0.1", count=10, interval=0.05)
        assert (sent, received) == (10, 10)
    finally:
        cli.stop()
        srv.stop()
    assert "Child SA" in srv.stderr() and "installed" in srv.stderr(), srv.stderr()[-2000:]
    if transport == "tcp":
        assert "TCP 4433 (RFC 8229)" in srv.stderr(), srv.stderr()[-2000:]
        assert f"TCP connection to peer ({VETH_A_ADDR}:4433) up" in cli.stderr()


def test_cli_key_exchange_ikev2_usage_errors(tmp_path):
    import subprocess

    k = tmp_path / "k"
    keyfile(k)
    for extra, msg in (
        (["-s"], "needs --listen"),
        (["-c", "192.0.2.1", "-p", "4501"], "-p unless --transport tcp"),
        (["-c", "192.0.2.1", "--key-exchange", "ike"], "must be psk or ikev2"),
    ):
        argv = [simpletun_cmd(), "-i", "x0", "--key", str(k), "--key-exchange", "ikev2", *extra]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr


API_SCRIPT = """
import json, sys, trio, simpletun

async def main(path, path2):
    async with simpletun.open_tunnel(path) as t:
        await t.wait_up(timeout=20, peer="a")
        spi = t.status()["peers"][0]["child_sas"][0]["spi_in"]
        assert "rx_packets" in t.stats, t.stats
        r1 = await t.reload(path2)
        names1 = sorted(p["name"] for p in t.status()["peers"])
        r2 = await t.reload(path)
        st = t.status()
        print(json.dumps({"spi": spi, "r1": r1, "names1": names1, "r2": r2,
                          "names2": sorted(p["name"] for p in st["peers"]),
                          "spis": [c["spi_in"] for c in st["peers"][0]["child_sas"]]}))

trio.run(main, sys.argv[1], sys.argv[2])
"""


def test_api_wait_up_for_a_peer_and_reload_adds_and_removes_one(lab, tmp_path, monkeypatch):
    """The Python API on an IKEv2 tunnel: wait_up(peer=...) without polling, reload(path)
    adding a peer and reload back removing it, the first peer's Child SA untouched."""
    psk = tmp_path / "psk.key"
    keyfile(psk)
    resp = tmp_path / "a" / f"{DEV}.toml"
    resp.parent.mkdir()
    resp.write_text(
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{A_IN}/24"]\n'
        f'listen_address = "{VETH_A_ADDR}"\nlocal_id = "a.example"\n\n'
        f'[[peer]]\nname = "b"\nidentity = "b.example"\nallowed_ips = ["10.252.2.0/24"]\n'
        f'psk_file = "{psk}"\n'
    )
    head_b = (
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{B_IN}/24"]\n'
        f'listen_address = "{VETH_B_ADDR}"\nlocal_id = "b.example"\n\n'
        f'[[peer]]\nname = "a"\nidentity = "a.example"\nendpoint = "{VETH_A_ADDR}"\n'
        f'allowed_ips = ["10.252.1.0/24"]\npsk_file = "{psk}"\n'
    )
    init = tmp_path / "b" / f"{DEV}.toml"
    init.parent.mkdir()
    init.write_text(head_b)
    init2 = tmp_path / "b2" / f"{DEV}.toml"
    init2.parent.mkdir()
    init2.write_text(
        head_b + '\n[[peer]]\nname = "x"\nidentity = "x.example"\n'
        f'allowed_ips = ["10.252.9.0/24"]\npsk_file = "{psk}"\n'
    )
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
    up = st(lab, lab.ns_a, "up", str(resp))
    assert up.returncode == 0, up.stderr
    try:
        env = {"SIMPLETUN_RUN_DIR": str(tmp_path / "run-b"), "PATH": "/usr/sbin:/usr/bin:/bin"}
        cmd = [sys.executable, "-c", API_SCRIPT, str(init), str(init2)]
        p = lab.spawn(lab.ns_b, cmd, name="api-ikev2", env=env)
        assert p.wait(60) == 0, p.stderr()
        out = json.loads(p.stdout().strip().splitlines()[-1])
        assert out["r1"]["ok"] and out["r1"]["peers_added"] == ["x"], out
        assert out["names1"] == ["a", "x"], out
        assert out["r2"]["ok"] and out["r2"]["peers_removed"] == ["x"], out
        assert out["names2"] == ["a"], out
        assert out["spi"] in out["spis"], out  # peer a kept its Child SA through both reloads
        assert DEV not in lab.links(lab.ns_b)
    finally:
        st(lab, lab.ns_a, "down", DEV)


def test_default_route_through_an_ikev2_tunnel_keeps_it_up(lab, tmp_path, monkeypatch):
    """allowed_ips = 0.0.0.0/0 on the initiator, whose responder is reached through a gateway
    (not on-link): the endpoint is pinned as a host route along the old path first, so IKE and
    ESP-in-UDP to the responder never enter the tunnel itself."""
    far = "198.51.100.1"  # the responder's IKE address, off-link for B: via its default route
    lab.run(lab.ns_a, ["ip", "addr", "add", f"{far}/32", "dev", "lo"])
    lab.run(lab.ns_b, ["ip", "route", "replace", "default", "via", VETH_A_ADDR])
    psk = tmp_path / "psk.key"
    keyfile(psk)
    resp = tmp_path / "a" / f"{DEV}.toml"
    resp.parent.mkdir()
    resp.write_text(
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{A_IN}/24"]\n'
        f'listen_address = "{far}"\nlocal_id = "a.example"\n\n'
        f'[[peer]]\nname = "b"\nidentity = "b.example"\nallowed_ips = ["10.252.2.0/24"]\n'
        f'psk_file = "{psk}"\n'
    )
    init = tmp_path / "b" / f"{DEV}.toml"
    init.parent.mkdir()
    init.write_text(
        f'[interface]\nkey_exchange = "ikev2"\naddress = ["{B_IN}/24"]\n'
        f'listen_address = "{VETH_B_ADDR}"\nlocal_id = "b.example"\n\n'
        f'[[peer]]\nname = "a"\nidentity = "a.example"\nendpoint = "{far}"\n'
        f'allowed_ips = ["0.0.0.0/0"]\npsk_file = "{psk}"\n'
    )

    def route_dev(dst: str) -> str:
        out = lab.run(lab.ns_b, ["ip", "route", "get", dst]).stdout.decode()
        return out.split(" dev ")[1].split()[0]

    veth = route_dev(far)
    assert veth != DEV
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
    assert st(lab, lab.ns_a, "up", str(resp)).returncode == 0
    try:
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
        up = st(lab, lab.ns_b, "up", str(init))
        assert up.returncode == 0, up.stderr
        lab.wait_ping(lab.ns_b, A_IN, 20)
        assert route_dev("192.0.2.77") == DEV  # the default route does go through the tunnel
        assert route_dev(far) == veth  # but not the tunnel's own packets
        ping = lab.run(lab.ns_b, ["ping", "-n", "-q", "-c", "10", "-i", "0.05", A_IN])
        assert parse_ping(ping.stdout.decode())[1] == 10, ping.stdout
        s = status(lab, lab.ns_b)
        assert s["peers"][0]["child_sas"], s
        st(lab, lab.ns_b, "down", DEV)
        routes = lab.run(lab.ns_b, ["ip", "route"]).stdout.decode()
        assert far not in routes, routes  # the pinned host route went with the tunnel
    finally:
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
        st(lab, lab.ns_b, "down", DEV)
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
        st(lab, lab.ns_a, "down", DEV)
