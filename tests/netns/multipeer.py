"""Helper process for the multi-peer test: ``server`` (a real TUN device with four UDP peers,
each allowed 10.9.k.0/24) or ``clients`` (four data planes on SOCK_SEQPACKET "devices" that
craft ICMP echo requests and read the replies). SAs are installed directly from a seed (this
tests the data plane, not the handshake). Prints one JSON line with the results."""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import signal
import socket
import struct
import subprocess
import sys

from simpletun import _core

PEERS = 4


def keys(k: int, direction: str) -> tuple[bytes, bytes]:
    h = hashlib.sha256(f"multipeer {k} {direction}".encode()).digest()
    return h[:16], hashlib.sha256(h).digest()


def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_request(src: str, dst: str, ident: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"multipeer" * 4
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        ident,
        0,
        64,
        1,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + icmp


def server(args) -> int:
    fd, name, _created = _core.open_tun(args.dev)
    subprocess.run(["ip", "addr", "add", "10.9.0.1/16", "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", args.port))
    dp = _core.DataPlane(fd)
    tr = dp.add_udp(udp.fileno())
    peers = {}
    for k in range(1, PEERS + 1):
        p = dp.add_peer(tr, [f"10.9.{k}.0/24"])
        dp.add_inbound_sa(p, 0x1000 + k, *keys(k, "c2s"))
        dp.set_outbound_sa(p, 0x2000 + k, *keys(k, "s2c"))
        peers[k] = p
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    print("ready", flush=True)
    signal.sigwait([signal.SIGTERM])
    out = {
        "total": dict(dp.stats),
        "peers": {k: dict(dp.peer_stats(p)) for k, p in peers.items()},
        "endpoints": {k: dp.endpoint(p) for k, p in peers.items()},
    }
    dp.stop()
    print(json.dumps(out), flush=True)
    return 0


def clients(args) -> int:
    ends = {}
    for k in range(1, PEERS + 1):
        app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 0))
        dp = _core.DataPlane(dev.fileno())
        dev.close()
        tr = dp.add_udp(udp.fileno())
        p = dp.add_peer(tr, ["10.9.0.0/16"], (args.server, args.port))
        dp.set_outbound_sa(p, 0x1000 + k, *keys(k, "c2s"))
        dp.add_inbound_sa(p, 0x2000 + k, *keys(k, "s2c"))
        ends[k] = (app, udp, dp)

    def replies(k: int, timeout: float) -> list[tuple[str, int]]:
        app = ends[k][0]
        got = []
        while select.select([app], [], [], timeout)[0]:
            pkt = app.recv(65536)
            if len(pkt) >= 28 and pkt[9] == 1 and pkt[20] == 0:  # ICMP echo reply
                got.append((socket.inet_ntoa(pkt[16:20]), struct.unpack("!H", pkt[24:26])[0]))
            else:
                got.append(("other", -1))
            timeout = 0.3
        return got

    result: dict = {"replies": {}, "spoof": {}}
    # Each honest client pings the server from its own prefix and must get exactly its reply.
    for k in range(1, PEERS):
        ends[k][0].send(echo_request(f"10.9.{k}.2", "10.9.0.1", 100 + k))
        result["replies"][k] = replies(k, 5.0)
    # Client 4 claims client 1's address: nobody may get a reply.
    ends[4][0].send(echo_request("10.9.1.2", "10.9.0.1", 999))
    for k in range(1, PEERS + 1):
        result["spoof"][k] = replies(k, 1.0 if k == 1 else 0.2)
    for app, udp, dp in ends.values():
        dp.stop()
        app.close()
        udp.close()
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["server", "clients"])
    ap.add_argument("--dev", default="mp0")
    ap.add_argument("--server", default="10.250.0.1")
    ap.add_argument("--port", type=int, default=4500)
    args = ap.parse_args(argv)
    return server(args) if args.role == "server" else clients(args)


if __name__ == "__main__":
    sys.exit(main())
