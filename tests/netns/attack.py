"""Attacks on a simpletun end, run inside a lab namespace (by the hostile-network tests and
scripts/soak.sh). Each mode runs for ``--seconds`` and prints one JSON line of what it did.

  idle HOST PORT [--conns N]     keep N idle TCP connections open, reopening each one as soon as
                                 it is dropped (no key needed): the lock-out attempt
  garbage HOST PORT              connect, send an 0xffff length prefix and junk, repeat
  forge-udp PORT --mode M        the same over UDP (the datagram transports' handshake):
                                 M = error or random
  forge-server PORT --mode M     answer every ClientHello in the server's place with
                                 M = error (a 9-byte Error frame), random (a random ServerHello)
                                 or recorded (a real ServerHello for another session's hello,
                                 made with the real key: what a recording would hold)

Only ever points at the lab's own addresses. Stdlib (plus simpletun for ``recorded``).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import time

ERROR_FRAME = bytes.fromhex("000700000000040103")  # Error, code 3 (version mismatch)


def idle(host: str, port: int, conns: int, seconds: float) -> dict:
    sel = selectors.DefaultSelector()
    opened = dropped = failed = 0
    live: set[socket.socket] = set()
    deadline = time.monotonic() + seconds

    def open_one() -> None:
        nonlocal opened, failed
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            return
        opened += 1
        live.add(s)
        sel.register(s, selectors.EVENT_READ)

    while time.monotonic() < deadline:
        while len(live) < conns and time.monotonic() < deadline:
            before = len(live)
            open_one()
            if len(live) == before:
                time.sleep(0.01)
                break
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # dropped by the server (or refused): reopen at once
                sel.unregister(s)
                live.discard(s)
                s.close()
                dropped += 1
    for s in live:
        s.close()
    return {"mode": "idle", "opened": opened, "dropped": dropped, "failed": failed}


def garbage(host: str, port: int, seconds: float) -> dict:
    sent = failed = 0
    deadline = time.monotonic() + seconds
    junk = b"\xff\xff" + os.urandom(64)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(junk)
                sent += 1
                s.settimeout(0.05)
                try:
                    s.recv(100)
                except OSError:
                    pass
        except OSError:
            failed += 1
            time.sleep(0.01)
    return {"mode": "garbage", "connections": sent, "failed": failed}


def _recorded_hello(key_file: str) -> bytes:
    """A genuine ServerHello from the real key, for a ClientHello other than the victim's."""
    from simpletun import handshake as hs
    from simpletun.keys import load_key

    key = load_key(key_file)
    cid = hs.CIPHER_IDS[hs.DEFAULT_CIPHER]
    nonce_c, nonce_s = os.urandom(hs.NONCE_LEN), os.urandom(hs.NONCE_LEN)
    hello = hs.CONTROL_MARKER + bytes([hs.MSG_CLIENT_HELLO, hs.VERSION, cid]) + nonce_c
    head = hs.CONTROL_MARKER + bytes([hs.MSG_SERVER_HELLO, hs.VERSION, cid]) + nonce_s
    th = hs.transcript_hash(hello, head)
    k = hs.derive(key, hs.DEFAULT_CIPHER, nonce_c, nonce_s, th)
    payload = head + hs._mac(k["s_confirm"], th)
    return struct.pack(">H", len(payload)) + payload


def forge_server(port: int, mode: str, seconds: float, key_file: str | None) -> dict:
    recorded = _recorded_hello(key_file) if mode == "recorded" else None
    answered = 0
    deadline = time.monotonic() + seconds
    with socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) as srv:
        srv.settimeout(0.2)
        print(json.dumps({"listening": port}), flush=True)
        while time.monotonic() < deadline:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(2 + 39)  # the ClientHello
                    if mode == "error":
                        reply = ERROR_FRAME
                    elif mode == "random":
                        body = b"\0\0\0\0" + bytes([2, 1, 1]) + os.urandom(64)
                        reply = struct.pack(">H", len(body)) + body
                    else:
                        reply = recorded
                    conn.sendall(reply)
                    answered += 1
                    conn.recv(100)  # whatever the client says, then close
                except OSError:
                    pass
    return {"mode": f"forge-{mode}", "answered": answered}


def forge_udp(port: int, mode: str, seconds: float) -> dict:
    answered = 0
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("", port))
        s.settimeout(0.2)
        print(json.dumps({"listening": port}), flush=True)
        while time.monotonic() < deadline:
            try:
                _, addr = s.recvfrom(2048)
            except TimeoutError:
                continue
            if mode == "error":
                reply = ERROR_FRAME[2:]  # the same Error message, without the TCP length
            else:
                reply = b"\0\0\0\0" + bytes([2, 1, 1]) + os.urandom(64)
            s.sendto(reply, addr)
            answered += 1
    return {"mode": f"forge-udp-{mode}", "answered": answered}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("idle")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("--conns", type=int, default=32)
    g = sub.add_parser("garbage")
    g.add_argument("host")
    g.add_argument("port", type=int)
    f = sub.add_parser("forge-server")
    f.add_argument("port", type=int)
    f.add_argument("--mode", choices=["error", "random", "recorded"], required=True)
    f.add_argument("--key")
    u = sub.add_parser("forge-udp")
    u.add_argument("port", type=int)
    u.add_argument("--mode", choices=["error", "random"], required=True)
    for sp in (a, g, f, u):
        sp.add_argument("--seconds", type=float, default=10.0)
    ns = p.parse_args()
    if ns.cmd == "idle":
        out = idle(ns.host, ns.port, ns.conns, ns.seconds)
    elif ns.cmd == "garbage":
        out = garbage(ns.host, ns.port, ns.seconds)
    elif ns.cmd == "forge-udp":
        out = forge_udp(ns.port, ns.mode, ns.seconds)
    else:
        out = forge_server(ns.port, ns.mode, ns.seconds, ns.key)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
