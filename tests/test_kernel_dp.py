"""--dataplane kernel on this machine's kernel (XFRM netlink, no ESP): one clear line, exit 2."""

import os
import subprocess
import sys

import pytest
from skipping import skip

from simpletun import manual_keys
from simpletun._errors import ConfigError
from simpletun.config import Config


@pytest.fixture
def needs_root():
    if os.geteuid() != 0:
        skip("xfrm netlink needs root")


def _esp_missing() -> bool:
    from simpletun import xfrm

    try:
        xfrm.check_esp()
    except xfrm.KernelEspMissing:
        return True
    return False


def _keyfile(tmp_path, transport="esp-in-udp"):
    p = tmp_path / "mk.toml"
    p.write_text(manual_keys.generate(transport=transport))
    p.chmod(0o600)
    return str(p)


def _kernel_file(manual_keys_file: str) -> str:
    """A tunnel file for the kernel data plane (ESP-in-UDP, manual keys)."""
    return f"""
[interface]
address = ["10.9.0.2/24"]
transport = "udp"
dataplane = "kernel"
manual_keys_file = "{manual_keys_file}"

[[peer]]
endpoint = "127.0.0.1:4500"
allowed_ips = ["10.9.1.0/24"]
"""


def test_kernel_dataplane_needs_manual_keys_and_datagram_transport():
    with pytest.raises(ConfigError, match="--manual-keys"):
        Config(server=True, transport="udp", key=bytes(32), dataplane="kernel")
    with pytest.raises(ConfigError, match="not tcp"):
        Config(server=True, transport="tcp", manual_keys="x", dataplane="kernel")
    with pytest.raises(ConfigError, match="userspace or kernel"):
        Config(server=True, transport="udp", key=bytes(32), dataplane="dpdk")


def test_cli_kernel_without_esp_one_line_exit_2(tmp_path, needs_root):
    if not _esp_missing():
        skip("this kernel has ESP: the ESP-less path cannot be observed here")
    mk = _keyfile(tmp_path)
    cmd = [sys.executable, "-m", "simpletun", "-i", "stk0", "-s", "--listen", "127.0.0.1"]
    cmd += ["--peer", "127.0.0.2"]
    cmd += ["--transport", "udp", "--dataplane", "kernel", "--manual-keys", mk]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "CONFIG_INET_ESP" in lines[0] and "--dataplane userspace" in lines[0]
    assert "Traceback" not in done.stderr
    # nothing was left behind
    links = subprocess.run(["ip", "link", "show", "stk0"], capture_output=True)
    assert links.returncode != 0


def test_cli_kernel_transport_mismatch_one_line(tmp_path, needs_root):
    mk = _keyfile(tmp_path, transport="esp")
    cmd = [sys.executable, "-m", "simpletun", "-i", "stk0", "-c", "127.0.0.1"]
    cmd += ["--transport", "udp", "--dataplane", "kernel", "--manual-keys", mk]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "transport" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_configfile_dataplane_kernel(tmp_path):
    from pathlib import Path

    from simpletun import configfile

    mk = _keyfile(tmp_path)
    text = _kernel_file(mk)
    tf = configfile.loads(text, Path(tmp_path / "stk0.toml"))
    assert tf.config.dataplane == "kernel" and tf.config.manual_keys == mk
    assert tf.config.key is None


def test_up_kernel_without_esp_one_line_exit_2(tmp_path, needs_root):
    if not _esp_missing():
        skip("this kernel has ESP: the ESP-less path cannot be observed here")
    mk = _keyfile(tmp_path)
    conf = tmp_path / "stk0.toml"
    conf.write_text(_kernel_file(mk))
    env = dict(os.environ, SIMPLETUN_RUN_DIR=str(tmp_path / "run"))
    for extra in ([], ["--foreground"]):
        cmd = [sys.executable, "-m", "simpletun", "up", str(conf), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "CONFIG_INET_ESP" in lines[0] and "--dataplane userspace" in lines[0]
        assert subprocess.run(["ip", "link", "show", "stk0"], capture_output=True).returncode


def test_status_maps_xfrm_counters_onto_simpletun_names(tmp_path, monkeypatch):
    from simpletun import kernel_dp, xfrm

    mk = manual_keys.load(_keyfile(tmp_path))
    c = Config(server=False, host="192.0.2.9", transport="udp", dataplane="kernel", manual_keys="x")
    t = kernel_dp.KernelTunnel(c, mk, "192.0.2.1", "192.0.2.9")

    def fake_get_sa(dst, spi, src=None):
        out = spi == t.out_sa.spi
        return xfrm.SAState(
            src, dst, spi, 0, 1, 2, 0, 4096,
            bytes=100 if out else 200, packets=1 if out else 2,
            replay=0 if out else 3, replay_window_drops=0 if out else 1,
            integrity_failed=0 if out else 5,
        )  # fmt: skip

    monkeypatch.setattr(xfrm, "get_sa", fake_get_sa)
    st = t.status()
    assert st["dataplane"] == "kernel" and st["transport"] == "udp"
    peer = st["peers"][0]
    assert (peer["tx_packets"], peer["tx_bytes"]) == (1, 100)
    assert (peer["rx_packets"], peer["rx_bytes"]) == (2, 200)
    assert peer["drops"] == {"replay": 4, "auth": 5}
    assert [s["spi"] for s in peer["sas"]] == [f"0x{t.out_sa.spi:08x}", f"0x{t.in_sa.spi:08x}"]


def _ike_kernel_file(tmp_path) -> str:
    from simpletun import keys

    psk = tmp_path / "peer.psk"
    psk.write_text(keys.encode_key(keys.generate_key()))
    psk.chmod(0o600)
    return """
[interface]
key_exchange = "ikev2"
dataplane = "kernel"
address = ["10.9.0.2/24"]
listen_address = "127.0.0.1"

[[peer]]
name = "gw"
endpoint = "127.0.0.2"
psk_file = "peer.psk"
allowed_ips = ["10.9.1.0/24"]
"""


def test_ikev2_file_with_kernel_dataplane_runs_run_ike(tmp_path):
    from pathlib import Path

    from simpletun import configfile, kernel_dp, service

    tf = configfile.loads(_ike_kernel_file(tmp_path), Path(tmp_path / "stk0.toml"))
    assert tf.config.dataplane == "kernel" and tf.config.ike is not None
    assert service.runner(tf.config) is kernel_dp.run_ike
    with pytest.raises(configfile.ConfigFileError, match="manual_keys_file"):
        configfile.loads(
            _ike_kernel_file(tmp_path).replace(
                "[interface]", '[interface]\nmanual_keys_file = "x"'
            ),
            Path(tmp_path / "stk0.toml"),
        )


def test_up_ikev2_kernel_without_esp_one_line_exit_2(tmp_path, needs_root):
    if not _esp_missing():
        skip("this kernel has ESP: the ESP-less path cannot be observed here")
    conf = tmp_path / "stk0.toml"
    conf.write_text(_ike_kernel_file(tmp_path))
    env = dict(os.environ, SIMPLETUN_RUN_DIR=str(tmp_path / "run"))
    done = subprocess.run(
        [sys.executable, "-m", "simpletun", "up", "--foreground", str(conf)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CONFIG_INET_ESP" in lines[0], done.stderr
    assert subprocess.run(["ip", "link", "show", "stk0"], capture_output=True).returncode


def test_status_text_of_a_manual_keys_server(tmp_path, monkeypatch):
    """`simpletun status` (text) of a kernel-dataplane manual-keys server: UDP port, the keys'
    cipher, no handshake, the SAs' sequence numbers."""
    from simpletun import commands, kernel_dp, xfrm

    mk = manual_keys.load(_keyfile(tmp_path))
    c = Config(server=True, host="192.0.2.1", peer="192.0.2.9", transport="udp",
               dataplane="kernel", manual_keys="x", port=4500)  # fmt: skip
    t = kernel_dp.KernelTunnel(c, mk, "192.0.2.1", "192.0.2.9")

    def fake_get_sa(dst, spi, src=None):
        esn = {"oseq": 9, "oseq_hi": 1, "seq": 7, "seq_hi": 0, "replay_window": 4096}
        return xfrm.SAState(src, dst, spi, 0, 1, 2, 0, 4096, esn=esn, packets=3, bytes=300)

    monkeypatch.setattr(xfrm, "get_sa", fake_get_sa)
    text = commands.format_status(t.status())
    assert "listening on UDP port 4500" in text and "data plane: kernel" in text
    assert "ESP aes-256-cbc (manual keys)" in text and "keyed (manual keys):" in text
    assert f"seq {2**32 + 9}" in text and "highest seq 7" in text


def test_cli_ikev2_kernel_without_esp_one_line_exit_2(tmp_path, needs_root):
    from simpletun import keys

    if not _esp_missing():
        skip("this kernel has ESP: the ESP-less path cannot be observed here")
    k = tmp_path / "k"
    k.write_text(keys.encode_key(keys.generate_key()))
    k.chmod(0o600)
    cmd = [sys.executable, "-m", "simpletun", "-i", "stk0", "-s", "--listen", "127.0.0.1"]
    cmd += ["--key", str(k), "--key-exchange", "ikev2", "--dataplane", "kernel"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CONFIG_INET_ESP" in lines[0], done.stderr
    assert subprocess.run(["ip", "link", "show", "stk0"], capture_output=True).returncode
