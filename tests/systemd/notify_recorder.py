"""A stand-in for systemd's notification socket, run inside the lab by the tests (stdlib only).

Usage: notify_recorder.py SOCKET LOG DEVICE

Binds a datagram socket at SOCKET (the unit under test gets ``NOTIFY_SOCKET=SOCKET`` from a
drop-in, so its READY=1 never reaches systemd and the unit stays "activating"). For every message
it stops the sender (SIGSTOP, pid from SCM_CREDENTIALS), records the state of DEVICE at that
moment (exists, addresses, routes), lets the sender go on (SIGCONT) and appends one JSON line to
LOG: {"pid", "fields", "device", "addresses", "routes"}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys


def ip_json(*args: str):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    return json.loads(out.stdout or "[]") if out.returncode == 0 else None


def device_state(dev: str) -> dict:
    links = ip_json("addr", "show", "dev", dev)
    if not links:
        return {"device": False, "addresses": [], "routes": []}
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in links[0].get("addr_info", [])]
    routes = [r["dst"] for r in ip_json("route", "show", "dev", dev) or []]
    return {"device": True, "addresses": addrs, "routes": routes}


def main() -> int:
    path, log, dev = sys.argv[1:4]
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    creds = struct.calcsize("3i")
    while True:
        data, ancdata, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(creds))
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:creds])[0]
        stopped = False
        if pid > 1:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped = True
            except OSError:
                pass
        try:
            record = {"pid": pid, "fields": data.decode(errors="replace").split("\n")}
            record.update(device_state(dev))
        finally:
            if stopped:
                os.kill(pid, signal.SIGCONT)
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
