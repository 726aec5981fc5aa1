"""A two-namespace lab with a simpletun tunnel end in each, built from Python.

Makes two network namespaces joined by a veth pair (simpletun.lab), writes a config file for
each end, runs each end inside its namespace (simpletun.spawn), waits until the peer is
connected, pings through the tunnel, prints both ends' status, and tears everything down, also
on errors or Ctrl-C. Run as root:

    .venv/bin/python examples/lab_tunnel.py

Use it as a starting point for your own loopback tests of routes and firewalls.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import simpletun
from simpletun import keys
from simpletun.lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A_ADDR, Lab, missing_prerequisites

SERVER = """\
[interface]
address = ["{tun_a}/24"]
listen_port = 55555
key_file = "{key}"
"""

CLIENT = """\
[interface]
address = ["{tun_b}/24"]
key_file = "{key}"

[[peer]]
endpoint = "{veth_a}:55555"
allowed_ips = ["10.99.0.0/24"]
"""


def main() -> int:
    missing = missing_prerequisites()
    if missing:
        print("lab_tunnel: cannot run here: " + "; ".join(missing), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="simpletun-lab-") as tmp, Lab(tmp) as lab:
        d = Path(tmp)
        os.environ["SIMPLETUN_RUN_DIR"] = str(d / "run")  # control sockets of this lab only
        key = d / "psk"
        keys.write_key_to_fd(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), keys.generate_key())
        fmt = {"tun_a": TUN_A_ADDR, "tun_b": TUN_B_ADDR, "veth_a": VETH_A_ADDR, "key": key}
        (d / "lab-a.toml").write_text(SERVER.format(**fmt))
        (d / "lab-b.toml").write_text(CLIENT.format(**fmt))
        server = simpletun.spawn(d / "lab-a.toml", netns=lab.ns_a)
        client = simpletun.spawn(d / "lab-b.toml", netns=lab.ns_b)
        try:
            status = client.wait_up(timeout=20)
            sent, got, rtt = lab.ping(lab.ns_b, TUN_A_ADDR, count=5, interval=0.1)
            print(f"ping {TUN_A_ADDR} through the tunnel: {got}/{sent}, avg {rtt} ms")
            status = client.status()
            peer = status["peers"][0]
            print(
                f"client {status['interface']}: up={status['up']} {status['encryption']}, "
                f"tx {peer['tx_packets']} packets, rx {peer['rx_packets']} packets, "
                f"SA out {peer['sas'][0]['spi']} seq {peer['sas'][0]['seq']}"
            )
            srv = server.status()
            print(f"server {srv['interface']}: up={srv['up']}, {srv['sessions']} session(s)")
            routes = lab.run(lab.ns_b, ["ip", "route", "show", "dev", "lab-b"]).stdout.decode()
            print("client routes:", " | ".join(routes.strip().splitlines()))
            return 0 if got == sent else 1
        finally:
            client.stop()
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
