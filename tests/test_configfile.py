# ruff: noqa: E501
"""Config files: good ones become the same Config the flags would make, bad ones are refused in
one line naming the file, line, key and fix, and a parsed file dumps back to the same tunnel."""

from __future__ import annotations

import ipaddress

import pytest

from simpletun import cli, configfile
from simpletun.config import max_queues
from simpletun.configfile import ConfigFileError
from simpletun.keys import encode_key, generate_key


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "st0.key"
    p.write_text(encode_key(generate_key()))
    p.chmod(0o600)
    return p


def write(tmp_path, text: str, name: str = "st0.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


SERVER = """\
[interface]
address = ["10.0.0.1/24", "fd00::1/64"]
listen_port = 55555
key_file = "st0.key"
cipher = "aes-256-cbc"
mtu = 1400
post_up = ["echo %i up"]

[[peer]]
allowed_ips = ["10.1.0.0/16", "fd00:1::/64"]
persistent_keepalive = 25
"""


def test_server_file_gives_the_config_the_flags_give(tmp_path, keyfile):
    tf = configfile.load(str(write(tmp_path, SERVER)))
    c = tf.config
    assert (c.server, c.ifname, c.port, c.cipher, c.mtu, c.tap) == (
        True, "st0", 55555, "aes-256-cbc", 1400, False,
    )  # fmt: skip
    assert c.key == configfile.keys.load_key(str(keyfile))
    assert c.routes == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00:1::/64"))
    assert c.keepalive == 25 and tf.post_up == ("echo %i up",)
    flags, _ = cli.parse_args(
        ["-i", "st0", "-s", "--key", str(keyfile), "--cipher", "aes-256-cbc", "--mtu", "1400",
         "--addr", "10.0.0.1/24", "--addr", "fd00::1/64",
         "--route", "10.1.0.0/16", "--route", "fd00:1::/64"]
    )  # fmt: skip
    from dataclasses import replace

    assert replace(c, keepalive=None) == flags


def test_client_file_with_ipv6_endpoint_and_name_resolution(tmp_path, keyfile):
    text = f"""
[interface]
name = "vpn1"
mode = "tap"
key_file = "{keyfile}"
address = ["10.0.0.2/24"]

[[peer]]
endpoint = "[fd00::7]:4444"
allowed_ips = ["0.0.0.0/0"]
"""
    tf = configfile.load(str(write(tmp_path, text)))
    assert (tf.config.server, tf.config.host, tf.config.port, tf.name) == (
        False,
        "fd00::7",
        4444,
        "vpn1",
    )
    assert tf.config.tap


def test_round_trip(tmp_path, keyfile):
    tf = configfile.load(str(write(tmp_path, SERVER)))
    again = configfile.loads(configfile.dumps(tf), tf.path)
    assert again.config == tf.config and again.peers == tf.peers and again.post_up == tf.post_up


def test_name_resolves_in_the_config_dir(tmp_path, keyfile, monkeypatch):
    monkeypatch.setenv("SIMPLETUN_CONFIG_DIR", str(tmp_path))
    write(tmp_path, SERVER)
    assert configfile.load("st0").path == tmp_path / "st0.toml"


BAD = [
    ('[interface]\nmut = 1400\nlisten_port = 1\nplaintext = true\n', ":2: [interface] mut: unknown key (known keys: name,"),
    ('[interface]\nmtu = "1400"\nlisten_port = 1\nplaintext = true\n', ":2: [interface] mtu: must be an integer, got '1400'"),
    ('[interface]\nmtu = 10\nlisten_port = 1\nplaintext = true\n', ":2: [interface] mtu: MTU must be 68-65000, got 10"),
    ('[interface]\nlisten_port = 1\n', "no key_file: run 'simpletun genkey > /etc/simpletun/KEY'"),
    ('[interface]\nplaintext = true\n', "set listen_port (server) or give the [[peer]] an endpoint"),
    ('[interface]\nplaintext = true\nlisten_port = 5\n[[peer]]\nendpoint = "h:5"\n', "listen_port: a tunnel either listens"),
    ('[interface]\nplaintext = true\n[[peer]]\nendpoint = "a..b:5"\n', ":4: [[peer]] #1 endpoint: 'a..b' is not a valid host name"),
    ('[interface]\nplaintext = true\nlisten_port = 5\n[[peer]]\nallowed_ips = ["10.0.0.1/8"]\n', "allowed_ips: route '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
    ('[interface]\nplaintext = true\nlisten_port = 5\n[[peer]]\n[[peer]]\n', "only one [[peer]] per tunnel in this version"),
    ('[interface]\nplaintext = true\nlisten_port = 5\ntransport = "quic"\n', "transport: 'quic' is not available in this version"),
    ('[interface]\nplaintext = true\nlisten_port = 5\nmode = "tcp"\n', 'mode: must be "tun" or "tap"'),
    ('[interface]\nplaintext = true\nlisten_port = 5\nkey_file = "x"\n', "plaintext = true and key_file exclude each other"),
    ('[interface]\nlisten_port = 5\nkey_file = "nope.key"\n', "key_file: "),
    ('[interface\n', "not valid TOML: "),
    ('[interface]\nplaintext = true\nlisten_port = 5\n[peer]\n', "write peers as [[peer]] tables"),
    ('[interfaces]\n', "unknown table [interfaces]"),
    ('[[peer]]\nendpoint = "x:1"\n', "no [interface] table"),
    ('[interface]\nplaintext = true\nlisten_port = 5\nname = "a/b"\n', "name: invalid interface name"),
    ('[interface]\nplaintext = true\nlisten_port = 5\nqueues = 0\n', ":4: [interface] queues: queues must be 1-"),
    ('[interface]\nplaintext = true\nlisten_port = 5\nqueues = "2"\n', "queues: must be an integer"),
    (f'[interface]\nplaintext = true\nlisten_port = 5\nqueues = {max_queues() + 1}\n', f"queues must be 1-{max_queues()}"),
]  # fmt: skip


@pytest.mark.parametrize("text,expected", BAD, ids=[e[:40] for _, e in BAD])
def test_bad_files_are_one_line_naming_file_line_key(tmp_path, text, expected, capsys):
    p = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as e:
        configfile.load(str(p))
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    assert expected in msg, msg
    # the CLI: one line, exit 2
    assert cli.main(["up", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_missing_file_and_bad_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIMPLETUN_CONFIG_DIR", str(tmp_path))
    assert cli.main(["up", "nothere"]) == 2
    assert "nothere.toml: no such config file" in capsys.readouterr().err
    assert cli.main(["up"]) == 2
    assert cli.main(["down"]) == 2
    assert cli.main(["status", "--bogus"]) == 2
    assert "unknown option '--bogus'" in capsys.readouterr().err


def test_datagram_mtu_leaves_room_for_esp():
    from simpletun.netdev import datagram_mtu

    assert datagram_mtu(1500, ipv6=False, udp=True) == 1422
    assert datagram_mtu(1500, ipv6=False, udp=False) == 1438
    assert datagram_mtu(1500, ipv6=True, udp=True) == 1406
    assert datagram_mtu(1500, ipv6=False, udp=True, tap=True) == 1404
    # the check: the largest packet plus ESP fits the outer MTU exactly or with < 16 to spare
    from simpletun._core import esp_encap_len

    for outer in (1280, 1400, 1500, 9000):
        for v6, udp in ((False, True), (True, True), (False, False), (True, False)):
            m = datagram_mtu(outer, ipv6=v6, udp=udp)
            wire = (40 if v6 else 20) + (8 if udp else 0) + esp_encap_len(m)
            assert outer - 16 < wire <= outer, (outer, v6, udp, m, wire)


def test_udp_file_defaults_port_4500_and_an_mtu_from_the_path(tmp_path, keyfile):
    text = f"""
[interface]
transport = "udp"
key_file = "{keyfile}"

[[peer]]
endpoint = "127.0.0.1"
"""
    tf = configfile.load(str(write(tmp_path, text)))
    assert tf.config.transport == "udp" and tf.config.port == 4500
    # the route to 127.0.0.1 leaves by lo (MTU 65536): capped at the largest MTU we allow
    assert tf.config.mtu == 65000
    again = configfile.loads(configfile.dumps(tf), tf.path)
    assert again.config == tf.config


def test_queues_key_reaches_the_config_and_defaults_to_one(tmp_path, keyfile):
    base = f'[interface]\nlisten_port = 4500\ntransport = "udp"\nkey_file = "{keyfile}"\n'
    assert configfile.load(str(write(tmp_path, base))).config.queues == 1
    p = write(tmp_path, base + "queues = 1\n", "st1.toml")
    assert configfile.load(str(p)).config.queues == 1
    if max_queues() >= 2:
        p = write(tmp_path, base + "queues = 2\n", "st2.toml")
        assert configfile.load(str(p)).config.queues == 2
