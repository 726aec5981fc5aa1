"""The public Python API and the examples, run as a user would: the two-namespace lab example,
a trio program driving a client end (open_tunnel), and the blocking facade in a plain script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A_ADDR
from .tunnel import DEV, TunnelPair

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_lab_example_runs_and_cleans_up(checked):
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "lab_tunnel.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"ping {TUN_A_ADDR} through the tunnel: 5/5" in p.stdout, p.stdout
    assert "client lab-b: up=True ESP aes-128-cbc" in p.stdout and "10.99.0.0/24" in p.stdout
    # the example's namespaces are named after its PID (other tests may run labs meanwhile)
    left = [n.name for n in Path("/run/netns").glob(f"*-{proc.pid}-*")]
    assert not left, f"the example left namespaces behind: {left}"
    checked.append("examples/lab_tunnel.py: " + " / ".join(p.stdout.strip().splitlines()[:2]))


def client_toml(tmp_path, key) -> Path:
    cfg = tmp_path / f"{DEV}.toml"
    cfg.write_text(
        f'[interface]\naddress = ["{TUN_B_ADDR}/24"]\nkey_file = "{key}"\n\n'
        f'[[peer]]\nendpoint = "{VETH_A_ADDR}:55555"\nallowed_ips = ["10.99.0.0/24"]\n'
    )
    return cfg


def test_trio_program_drives_a_client_end(lab, keys, tmp_path, checked):
    t = TunnelPair(lab, key_a=keys[0])
    t.start_server()
    cfg = client_toml(tmp_path, keys[0])
    env = {"SIMPLETUN_RUN_DIR": str(tmp_path / "run"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    script = str(EXAMPLES / "scripted_client.py")
    p = lab.spawn(lab.ns_b, [sys.executable, script, str(cfg)], name="scripted", env=env)
    assert p.wait(60) == 0, p.stderr()
    lines = [json.loads(ln) for ln in p.stdout().splitlines() if ln.startswith("{")]
    assert "peer connected" in p.stdout()
    assert lines[0]["routes"] == ["10.99.0.0/24", "10.77.0.0/24"]
    assert "tx_packets" in lines[1]["stats"]
    assert DEV not in lab.links(lab.ns_b), "closing the tunnel must remove its device"
    checked.append(f"open_tunnel: waited for the peer, set_routes live, stats {lines[1]['stats']}")


BLOCKING = """
import sys
from simpletun import BlockingTunnel
with BlockingTunnel(sys.argv[1]) as t:
    t.wait_up(timeout=20)
    st = t.status()
    print("UP", st["up"], st["peers"][0]["sas"][0]["spi"])
"""


def test_blocking_facade_in_a_plain_script(lab, keys, tmp_path, checked):
    t = TunnelPair(lab, key_a=keys[0])
    t.start_server()
    cfg = client_toml(tmp_path, keys[0])
    env = {"SIMPLETUN_RUN_DIR": str(tmp_path / "run"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    p = lab.spawn(lab.ns_b, [sys.executable, "-c", BLOCKING, str(cfg)], name="blocking", env=env)
    assert p.wait(60) == 0, p.stderr()
    assert "UP True 0x" in p.stdout(), p.stdout()
    assert DEV not in lab.links(lab.ns_b)
    checked.append(f"BlockingTunnel: {p.stdout().strip()}")
