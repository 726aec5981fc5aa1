"""Two IKEv2 tunnel files brought up with `simpletun up` in the two namespaces of a lab, and
tshark's decoding of captures: shared by the IKEv2 transport tests."""

from __future__ import annotations

import json
import subprocess

from simpletun import keys

from .lab import VETH_A_ADDR, VETH_B_ADDR
from .tunnel import DEV, simpletun_cmd

A_IN, B_IN = "10.254.1.1", "10.254.2.1"


def st(lab, ns, *args):
    return lab.run(ns, [simpletun_cmd(), *args], check=False, timeout=40)


def status(lab, ns) -> dict:
    return json.loads(st(lab, ns, "status", DEV, "--json").stdout)


def keyfile(path):
    path.write_text(keys.encode_key(keys.generate_key()) + "\n")
    path.chmod(0o600)


def tshark_fields(pcap, *fields: str) -> list[list[str]]:
    """tshark's own decoding of a capture: one row per packet, the fields' values."""
    argv = ["tshark", "-n", "-r", str(pcap), "-T", "fields"]
    argv += ["-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in fields:
        argv += ["-e", f]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    return [line.split("|") for line in p.stdout.splitlines()]


def up_pair(
    lab, tmp_path, monkeypatch, transport: str, *, rekey_time: int = 3600,
    addrs: tuple[str, str] = (VETH_A_ADDR, VETH_B_ADDR), extra_b: str = "",
):  # fmt: skip
    """`simpletun up` of two IKEv2 files: A responds (peer "b"), B initiates to A (peer "a");
    inner A_IN/24 and B_IN/24; returns (down(), status_of(ns))."""
    a_ip, b_ip = addrs
    ep = f"[{a_ip}]" if ":" in a_ip else a_ip
    psk = tmp_path / "psk.key"
    keyfile(psk)
    resp = tmp_path / "a" / f"{DEV}.toml"
    resp.parent.mkdir()
    resp.write_text(
        f'[interface]\nkey_exchange = "ikev2"\ntransport = "{transport}"\naddress = ["{A_IN}/24"]\n'
        f'listen_address = "{a_ip}"\nlocal_id = "a.example"\n\n'
        f'[[peer]]\nname = "b"\nidentity = "b.example"\nallowed_ips = ["10.254.2.0/24"]\n'
        f'psk_file = "{psk}"\n'
    )
    init = tmp_path / "b" / f"{DEV}.toml"
    init.parent.mkdir()
    init.write_text(
        f'[interface]\nkey_exchange = "ikev2"\ntransport = "{transport}"\naddress = ["{B_IN}/24"]\n'
        f'listen_address = "{b_ip}"\nlocal_id = "b.example"\n\n'
        f'[[peer]]\nname = "a"\nidentity = "a.example"\nendpoint = "{ep}"\n'
        f'allowed_ips = ["10.254.1.0/24"]\npsk_file = "{psk}"\nrekey_time = {rekey_time}\n{extra_b}'
    )
    for ns, f, run in ((lab.ns_a, resp, "run-a"), (lab.ns_b, init, "run-b")):
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / run))
        up = st(lab, ns, "up", str(f))
        assert up.returncode == 0, up.stderr

    def down():
        for ns, run in ((lab.ns_b, "run-b"), (lab.ns_a, "run-a")):
            monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / run))
            st(lab, ns, "down", DEV)

    def status_of(ns):
        monkeypatch.setenv(
            "SIMPLETUN_RUN_DIR", str(tmp_path / ("run-a" if ns == lab.ns_a else "run-b"))
        )
        return status(lab, ns)

    return down, status_of
