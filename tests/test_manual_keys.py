"""Manual key files (simpletun.manual_keys): parsing, the one-line errors, and that both data
planes' SAs built from one file agree (a simpletun SA decapsulates what the peer's encrypts)."""

from __future__ import annotations

import os

import pytest

from simpletun import manual_keys as mk
from simpletun._errors import ConfigError

GOOD = """\
# simpletun manual keys
cipher = "cbc(aes)"
auth = "hmac(sha256)"
replay-window = 128
esn = true
transport = "esp-in-udp"
port = 4501

[client-to-server]
spi = 0x01000000
enc-key = "0x000102030405060708090a0b0c0d0e0f"
auth-key = "0x{a}"

[server-to-client]
spi = 0x01000001
enc-key = "0x{e256}"
auth-key = "0x{b}"
""".format(a="11" * 32, b="22" * 32, e256="33" * 32)


def test_parse_good_file():
    k = mk.parse(GOOD)
    assert k.client_to_server == mk.DirectionKeys(0x01000000, bytes(range(16)), b"\x11" * 32)
    assert k.server_to_client.spi == 0x01000001 and k.server_to_client.enc_key == b"\x33" * 32
    assert (k.replay_window, k.esn, k.transport, k.port) == (128, True, "esp-in-udp", 4501)
    assert k.outbound("server") == k.inbound("client") == k.server_to_client
    assert k.outbound("client") == k.inbound("server") == k.client_to_server


def test_defaults():
    text = GOOD.replace("replay-window = 128\n", "").replace("esn = true\n", "")
    text = text.replace('transport = "esp-in-udp"\n', "").replace("port = 4501\n", "")
    k = mk.parse(text)
    assert (k.replay_window, k.esn, k.transport, k.port) == (4096, False, "esp-in-udp", 4500)


def _bad(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("spi = ", "not a valid key file"),
        (_bad('cipher = "cbc(aes)"', 'cipher = "gcm(aes)"'), 'use "cbc(aes)"'),
        (_bad('auth = "hmac(sha256)"', 'auth = "hmac(sha1)"'), "HMAC-SHA-256-128"),
        (_bad("replay-window = 128", "replay-window = 8192"), "use 32 to 4096 packets"),
        (_bad("replay-window = 128", "replay-window = 0"), "use 32 to 4096 packets"),
        (_bad("esn = true", 'esn = "yes"'), "esn must be true or false"),
        (_bad('transport = "esp-in-udp"', 'transport = "tcp"'), 'use "esp" or "esp-in-udp"'),
        (_bad('transport = "esp-in-udp"', 'transport = "esp"'), "port is only for"),
        (_bad("port = 4501", "port = 70000"), "use 1 to 65535"),
        (_bad("replay-window", "replay-widow"), "unknown setting 'replay-widow'"),
        (_bad("spi = 0x01000000", "spi = 0x10"), "use 0x100 to 0xffffffff"),
        (_bad("spi = 0x01000001", "spi = 0x01000000"), "give each its own"),
        (_bad("0x000102030405060708090a0b0c0d0e0f", "0x0001"), "2 bytes (4 hex digits)"),
        (_bad("0x000102030405060708090a0b0c0d0e0f", "0xzz"), "not hexadecimal"),
        (_bad('auth-key = "0x' + "22" * 32, 'auth-key = "0x' + "11" * 32), "same key"),
        (_bad("[server-to-client]", "[server-to-klient]"), "unknown setting 'server-to-klient'"),
        (_bad("spi = 0x01000001\n", ""), "[server-to-client] has no spi"),
        (_bad('enc-key = "0x0001', 'enc-kee = "0x0001'), "unknown setting 'enc-kee'"),
    ],
)
def test_bad_file_one_line_error(text, fragment):
    with pytest.raises(ConfigError) as e:
        mk.parse(text, "keys.toml")
    msg = str(e.value)
    assert fragment in msg, msg
    assert msg.startswith("keys.toml") and "\n" not in msg


def test_missing_section():
    text = GOOD[: GOOD.index("[server-to-client]")]
    with pytest.raises(ConfigError, match=r"missing section \[server-to-client\]"):
        mk.parse(text)


@pytest.mark.parametrize("bits", [128, 192, 256])
@pytest.mark.parametrize("transport", ["esp", "esp-in-udp"])
def test_generate_parses_and_has_fresh_keys(bits, transport):
    a = mk.parse(mk.generate(key_bits=bits, transport=transport))
    b = mk.parse(mk.generate(key_bits=bits, transport=transport))
    assert len(a.client_to_server.enc_key) == bits // 8 and a.transport == transport
    assert a.client_to_server.enc_key != b.client_to_server.enc_key


def test_load_checks_permissions(tmp_path):
    p = tmp_path / "keys.toml"
    p.write_text(GOOD)
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match="permissions 0644 are too open.*chmod 600"):
        mk.load(str(p))
    os.chmod(p, 0o600)
    assert mk.load(str(p)).port == 4501
    with pytest.raises(ConfigError, match="no such file"):
        mk.load(str(tmp_path / "nope"))


def test_both_planes_from_one_file_agree():
    """The server's userspace SAs and the client's kernel SAs come from the same file: SPIs,
    keys and parameters pair up, and simpletun's server decapsulates what a client SA built from
    the same file's keys encapsulates."""
    k = mk.parse(GOOD)
    s_out, s_in = k.security_associations("server")
    c_out, c_in = k.security_associations("client")
    kx_out, kx_in = k.xfrm_sas("client", "192.0.2.2", "192.0.2.1", reqid=4)
    assert (kx_out.spi, kx_out.enc_key, kx_out.auth_key) == (
        s_in.spi,
        k.client_to_server.enc_key,
        k.client_to_server.auth_key,
    )
    assert kx_in.spi == s_out.spi and kx_in.src == "192.0.2.1"
    assert kx_out.encap.sport == kx_out.encap.dport == 4501 and kx_out.esn
    assert kx_out.replay_window == 128
    inner = bytes.fromhex("4500001c000000004001f96ac0000201c0000202") + bytes(8)
    assert s_in.decap(c_out.encap(inner))[1] == inner
    assert c_in.decap(s_out.encap(inner))[1] == inner


def test_ip_xfrm_commands():
    cmds = mk.parse(GOOD).ip_xfrm_commands("client", "192.0.2.2", "192.0.2.1")
    assert cmds[0].startswith(
        "ip xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x01000000"
    )
    assert "auth-trunc 'hmac(sha256)' 0x" + "11" * 32 + " 128" in cmds[0]
    assert "flag esn" in cmds[0] and cmds[0].endswith("encap espinudp 4501 4501 0.0.0.0")


def test_seq_preset_parsed_and_bounded():
    text = mk.generate(esn=True, seq=2**32 - 4)
    k = mk.parse(text)
    assert k.client_to_server.seq == k.server_to_client.seq == 2**32 - 4
    out, inn = k.xfrm_sas("client", "192.0.2.1", "192.0.2.2")
    assert (out.oseq, out.oseq_hi, inn.seq, inn.seq_hi) == (2**32 - 4, 0, 2**32 - 4, 0)
    tx, rx = k.security_associations("server")
    assert tx.tx_seq == 2**32 - 4 and rx.rx_highest_seq == 2**32 - 4
    big = mk.parse(text.replace("seq = 0xfffffffc", "seq = 0x100000005"))
    o, i = big.xfrm_sas("server", "192.0.2.1", "192.0.2.2")
    assert (o.oseq, o.oseq_hi, i.seq, i.seq_hi) == (5, 1, 5, 1)
    assert "replay-oseq 0x5 replay-oseq-hi 0x1" in big.ip_xfrm_commands("server", "a", "b")[0]
    with pytest.raises(ConfigError, match="needs esn = true"):
        mk.parse(mk.generate(esn=False, seq=5).replace("seq = 0x5", "seq = 0x100000000"))
    with pytest.raises(ConfigError, match=r"seq = -1 is out of range"):
        mk.parse(text.replace("seq = 0xfffffffc", "seq = -1", 1))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(transport="tcp"), "not tcp"),
        (dict(key=bytes(32)), "exclude each other"),
        (dict(dataplane="kernel"), "--peer HOST"),
        (dict(tap=True, dataplane="kernel", peer="192.0.2.2"), "drop -a"),
    ],
)
def test_manual_keys_bad_combinations_one_line(kw, match):
    from simpletun.config import Config

    args = dict(server=True, transport="udp", manual_keys="/x", port=4500) | kw
    with pytest.raises(ConfigError, match=match) as e:
        Config(**args)
    assert "\n" not in str(e.value)


def test_peer_needs_manual_keys_and_a_server():
    from simpletun.config import Config

    with pytest.raises(ConfigError, match="--peer is for --manual-keys"):
        Config(server=True, transport="udp", key=bytes(32), peer="192.0.2.2")
    with pytest.raises(ConfigError, match="--peer is for a server"):
        Config(server=False, host="192.0.2.1", transport="udp", manual_keys="/x", peer="x")


def test_check_manual_keys_transport_and_port(tmp_path):
    from simpletun.config import Config, check_manual_keys

    p = tmp_path / "mk.toml"
    p.write_text(mk.generate(transport="esp-in-udp", port=4600))
    p.chmod(0o600)
    c = Config(server=False, host="192.0.2.1", transport="udp", manual_keys=str(p), port=4600)
    assert check_manual_keys(c).port == 4600
    with pytest.raises(ConfigError, match="port = 4600"):
        check_manual_keys(Config(server=False, host="192.0.2.1", transport="udp",
                                 manual_keys=str(p), port=4500))  # fmt: skip
    with pytest.raises(ConfigError, match="transport = 'esp-in-udp' but --transport raw"):
        check_manual_keys(Config(server=False, host="192.0.2.1", transport="raw",
                                 manual_keys=str(p)))  # fmt: skip


def test_cli_manual_keys_bad_combo_exit_2(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "mk.toml"
    p.write_text(mk.generate(transport="esp"))
    p.chmod(0o600)
    base = [sys.executable, "-m", "simpletun", "-i", "stm0", "--manual-keys", str(p)]
    for extra, want in (
        (["-c", "192.0.2.1", "--transport", "udp"], "transport = 'esp'"),
        (["-c", "192.0.2.1", "--transport", "raw", "--cipher", "aes-256-cbc"], "drop --cipher"),
        (["-s", "--transport", "tcp"], "not tcp"),
    ):
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done
        assert len(done.stderr.strip().splitlines()) == 1 and want in done.stderr, done.stderr


def test_tunnel_file_manual_keys_server_with_fixed_peer(tmp_path):
    from pathlib import Path

    from simpletun import configfile

    text = """
[interface]
address = ["10.9.0.1/24"]
transport = "raw"
listen_port = 4500
manual_keys_file = "mk.toml"

[[peer]]
endpoint = "192.0.2.7"
allowed_ips = ["10.9.1.0/24"]
"""
    tf = configfile.loads(text, Path(tmp_path / "stm0.toml"))
    c = tf.config
    assert c.server and c.peer == "192.0.2.7" and c.manual_keys == str(tmp_path / "mk.toml")
    assert c.dataplane == "userspace" and c.key is None and c.esp
    with pytest.raises(configfile.ConfigFileError, match="cipher.*manual_keys_file"):
        configfile.loads(text.replace("[interface]", '[interface]\ncipher = "aes-256-cbc"'),
                         Path(tmp_path / "stm0.toml"))  # fmt: skip


def test_genkey_manual_writes_a_private_key_file(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "mk.toml"
    with open(out, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "simpletun", "genkey", "--manual", "--bits", "128", "--esn",
             "--transport", "esp"], stdout=f, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out.stat().st_mode & 0o777) == 0o600
    k = mk.load(str(out))
    assert (k.esn, k.transport, k.cipher_name) == (True, "esp", "aes-128-cbc")
    bad = subprocess.run([sys.executable, "-m", "simpletun", "genkey", "--manual", "--bits", "5"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_queues_need_a_wide_replay_window(tmp_path):
    from simpletun.config import MIN_QUEUES_WINDOW, Config, check_manual_keys, max_queues

    if max_queues() < 2:
        pytest.skip("one CPU: --queues 2 is refused before the key file is read")
    for window, ok in ((MIN_QUEUES_WINDOW - 1, False), (MIN_QUEUES_WINDOW, True)):
        p = tmp_path / f"mk{window}.toml"
        p.write_text(mk.generate(transport="esp", replay_window=window))
        p.chmod(0o600)
        c = Config(server=False, host="192.0.2.1", transport="raw", manual_keys=str(p), queues=2)
        if ok:
            assert check_manual_keys(c).replay_window == window
        else:
            with pytest.raises(ConfigError, match=f"replay-window = {window} is too small for 2"):
                check_manual_keys(c)
        one = Config(server=False, host="192.0.2.1", transport="raw", manual_keys=str(p))
        assert check_manual_keys(one).replay_window == window
