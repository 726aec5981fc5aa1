"""Operating a tunnel from config files between two namespaces: `simpletun up` (background),
`status` over the control socket while traffic flows, `reload` changing routes live, device
recreation keeping routes (IPv4 and IPv6), a default route through the tunnel that keeps the
tunnel's own connection on the veth, and `down` leaving nothing behind."""

from __future__ import annotations

import json
import time

import pytest

from .lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A_ADDR, wait_until
from .tunnel import DEV, simpletun_cmd

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(run))
    monkeypatch.setenv("SIMPLETUN_CONFIG_DIR", str(tmp_path))
    return tmp_path


def server_file(d, key, routes=("10.99.0.0/24",)):
    p = d / "srv" / f"{DEV}.toml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(
        f'[interface]\naddress = ["{TUN_A_ADDR}/24", "fd00:251::1/64"]\nlisten_port = 55555\n'
        f'key_file = "{key}"\n\n[[peer]]\nallowed_ips = {json.dumps(list(routes))}\n'
    )
    return p


def client_file(d, key, routes):
    p = d / "cli" / f"{DEV}.toml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(
        f'[interface]\naddress = ["{TUN_B_ADDR}/24", "fd00:251::2/64"]\nkey_file = "{key}"\n\n'
        f'[[peer]]\nendpoint = "{VETH_A_ADDR}:55555"\nallowed_ips = {json.dumps(list(routes))}\n'
        "persistent_keepalive = 15\n"
    )
    return p


def st(lab, ns, *args, check=True):
    proc = lab.run(ns, [simpletun_cmd(), *args], check=False, timeout=40)
    if check and proc.returncode not in (0, 1, 3):
        raise AssertionError(f"simpletun {args}: exit {proc.returncode}: {proc.stderr!r}")
    return proc


def status(lab, ns) -> tuple[int, dict]:
    # the run dirs differ per namespace: each end has its own under the test's tmp dir
    proc = st(lab, ns, "status", DEV, "--json")
    return proc.returncode, json.loads(proc.stdout)


def routes(lab, ns, v6=False) -> str:
    argv = ["ip", "-6" if v6 else "-4", "-o", "route", "show"]
    return lab.run(ns, argv).stdout.decode()


def up_both(lab, dirs, keys, client_routes, monkeypatch):
    key = keys[0]
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-a"))
    a = st(lab, lab.ns_a, "up", str(server_file(dirs, key)))
    assert a.returncode == 0, a.stderr
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-b"))
    b = st(lab, lab.ns_b, "up", str(client_file(dirs, key, client_routes)))
    assert b.returncode == 0, b.stderr
    assert f"{DEV} is up (pid" in b.stdout.decode()
    lab.wait_ping(lab.ns_b, TUN_A_ADDR, 10)


def test_up_status_reload_recreate_down(lab_factory, dirs, keys, checked, monkeypatch):
    lab = lab_factory(ipv6=True)
    up_both(lab, dirs, keys, ["10.98.0.0/24", "fd00:98::/64"], monkeypatch)
    assert "10.98.0.0/24 dev st0" in routes(lab, lab.ns_b)
    assert "fd00:98::/64 dev st0" in routes(lab, lab.ns_b, v6=True)
    code, s1 = status(lab, lab.ns_b)
    assert code == 0 and s1["up"] and s1["role"] == "client", s1
    peer = s1["peers"][0]
    assert peer["endpoint"] == f"{VETH_A_ADDR}:55555" and peer["sas"][0]["spi"].startswith("0x")
    lab.ping(lab.ns_b, TUN_A_ADDR, count=10, interval=0.05)
    _, s2 = status(lab, lab.ns_b)
    p2 = s2["peers"][0]
    assert (
        p2["tx_packets"] >= peer["tx_packets"] + 10 and p2["rx_packets"] >= peer["rx_packets"] + 10
    )
    assert p2["sas"][0]["seq"] == p2["tx_packets"]
    text = st(lab, lab.ns_b, "status").stdout.decode()
    assert "interface: st0" in text and "latest handshake:" in text and "transfer:" in text

    # reload: a new route appears, a removed one goes, the session stays
    sessions = s2["sessions"]
    cfg = dirs / "cli" / f"{DEV}.toml"
    cfg.write_text(cfg.read_text().replace('"10.98.0.0/24"', '"10.97.0.0/24"'))
    r = st(lab, lab.ns_b, "reload", DEV)
    assert r.returncode == 0, r.stderr
    assert "10.97.0.0/24" in r.stdout.decode()
    assert "10.97.0.0/24 dev st0" in routes(lab, lab.ns_b)
    assert "10.98.0.0/24" not in routes(lab, lab.ns_b)
    _, s3 = status(lab, lab.ns_b)
    assert s3["sessions"] == sessions and s3["up"]

    # recreate: the device and every route come back (IPv4 and IPv6)
    lab.run(lab.ns_b, ["ip", "link", "del", DEV])
    assert wait_until(lambda: "10.97.0.0/24 dev st0" in routes(lab, lab.ns_b), 5)
    assert wait_until(lambda: "fd00:98::/64 dev st0" in routes(lab, lab.ns_b, v6=True), 5)
    lab.wait_ping(lab.ns_b, TUN_A_ADDR, 10)

    # down: nothing left; status says not running (exit 3)
    d = st(lab, lab.ns_b, "down", DEV)
    assert d.returncode == 0, d.stderr
    assert DEV not in lab.links(lab.ns_b)
    assert "10.97.0.0" not in routes(lab, lab.ns_b) and "fd00:98" not in routes(lab, lab.ns_b, True)
    assert st(lab, lab.ns_b, "status", DEV).returncode == 3
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-a"))
    code, sa = status(lab, lab.ns_a)
    assert code == 1 and not sa["up"], sa  # the server runs, its peer has gone
    assert st(lab, lab.ns_a, "down", DEV).returncode == 0
    checked.append(
        "up (background) both ends from TOML; status JSON counters rose by >= 10 packets with "
        "ping, SA seq = tx_packets; reload swapped 10.98/24 for 10.97/24 with the session kept; "
        "device deleted -> routes v4+v6 back; down -> device and routes gone, status exit 3; "
        "server without peer: status exit 1"
    )


def test_default_route_through_the_tunnel_keeps_the_tunnel_up(
    lab_factory, dirs, keys, checked, monkeypatch
):
    lab = lab_factory(ipv6=True)
    lab.run(lab.ns_b, ["ip", "route", "add", "default", "via", VETH_A_ADDR])
    before = routes(lab, lab.ns_b)
    up_both(lab, dirs, keys, ["0.0.0.0/0"], monkeypatch)
    r = routes(lab, lab.ns_b)
    assert "0.0.0.0/1 dev st0" in r and "128.0.0.0/1 dev st0" in r, r
    assert f"{VETH_A_ADDR} via" in r or f"{VETH_A_ADDR} dev veth-b" in r, r
    got = lab.run(lab.ns_b, ["ip", "-o", "route", "get", "10.253.0.9"]).stdout.decode()
    assert "dev st0" in got, got  # everything else goes into the tunnel
    got = lab.run(lab.ns_b, ["ip", "-o", "route", "get", VETH_A_ADDR]).stdout.decode()
    assert "dev veth-b" in got, got  # but the tunnel's own connection does not
    sent, recv, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=5, interval=0.1)
    assert recv == 5
    time.sleep(1.0)
    _, s = status(lab, lab.ns_b)
    assert s["up"] and s["sessions"] == 1, s  # no reconnect loop through its own tunnel
    assert st(lab, lab.ns_b, "down", DEV).returncode == 0
    assert routes(lab, lab.ns_b) == before, "routes not restored after down"
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-a"))
    st(lab, lab.ns_a, "down", DEV)
    checked.append(
        "allowed_ips 0.0.0.0/0: installed as 0.0.0.0/1 + 128.0.0.0/1 on st0 and a host route to "
        "the server via the veth; other traffic -> st0, tunnel connection -> veth, one session, "
        "ping 5/5; after down the route table is exactly as before"
    )


def test_udp_tunnel_from_config_files(lab, dirs, keys, checked, monkeypatch):
    """transport = "udp" in the files: up, status (same fields), the MTU from the path, down."""
    key = keys[0]
    srv = dirs / "srv" / f"{DEV}.toml"
    srv.parent.mkdir(exist_ok=True)
    srv.write_text(
        f'[interface]\naddress = ["{TUN_A_ADDR}/24"]\nlisten_port = 4500\ntransport = "udp"\n'
        f'key_file = "{key}"\n'
    )
    cli = dirs / "cli" / f"{DEV}.toml"
    cli.parent.mkdir(exist_ok=True)
    cli.write_text(
        f'[interface]\naddress = ["{TUN_B_ADDR}/24"]\ntransport = "udp"\nkey_file = "{key}"\n\n'
        f'[[peer]]\nendpoint = "{VETH_A_ADDR}"\nallowed_ips = ["10.96.0.0/24"]\n'
    )
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-a"))
    assert st(lab, lab.ns_a, "up", str(srv)).returncode == 0
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-b"))
    b = st(lab, lab.ns_b, "up", str(cli))
    assert b.returncode == 0, b.stderr
    lab.wait_ping(lab.ns_b, TUN_A_ADDR, 20)
    code, s = status(lab, lab.ns_b)
    assert code == 0 and s["transport"] == "udp" and s["up"], s
    assert s["mtu"] == 1422, s  # veth MTU 1500 less IPv4 + UDP + ESP
    assert "10.96.0.0/24 dev st0" in routes(lab, lab.ns_b)
    assert s["peers"][0]["endpoint"] == f"{VETH_A_ADDR}:4500"
    assert st(lab, lab.ns_b, "down", DEV).returncode == 0
    assert DEV not in lab.links(lab.ns_b)
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(dirs / "run-a"))
    assert st(lab, lab.ns_a, "down", DEV).returncode == 0
    checked.append(
        f"transport=udp from TOML: up, status JSON up with mtu {s['mtu']} (derived), "
        "route on st0, down"
    )
