"""A tiny TCP sender/receiver that hashes what it moves (run inside a namespace).

    xfer.py recv HOST PORT [--timeout S]
        listen, accept one connection, read to EOF; print one JSON line
        {"role": "recv", "bytes": N, "sha256": ..., "seconds": ..., "marker_seen": bool}
        (it prints {"role": "recv", "listening": true} first, once it listens)
    xfer.py send HOST PORT --bytes N [--seed S] [--marker TEXT] [--timeout S] [--source-port P]
        connect (retrying until the timeout), send N pseudo-random bytes (a seeded RNG) or, with
        --marker, TEXT repeated up to N bytes; then half-close and wait for the receiver to
        close; print {"role": "send", "bytes": N, "sha256": ..., "seconds": ...}

With --text the lines are human-readable instead (the "listening" line stays recognisable).
Exit status 0 on success, 1 on a timeout or an error (reported in the JSON "error" field).
Stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import time

CHUNK = 1 << 20


TEXT = False  # --text: one human-readable line instead of JSON


def _print(obj: dict) -> None:
    if TEXT:
        if obj.get("listening"):
            line = "listening"
        elif "error" in obj:
            line = f"{obj['role']}: ERROR after {obj['bytes']} bytes: {obj['error']}"
        else:
            verb = "sent    " if obj["role"] == "send" else "received"
            line = f"{verb} {obj['bytes']} bytes in {obj['seconds']:.2f} s  sha256 {obj['sha256']}"
            if "marker_seen" in obj:
                line += f"  (marker {'received' if obj['marker_seen'] else 'NOT received'})"
    else:
        line = json.dumps(obj)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def recv(args: argparse.Namespace) -> int:
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.host, args.port))
    ls.listen(1)
    ls.settimeout(args.timeout)
    _print({"role": "recv", "listening": True})
    h = hashlib.sha256()
    n = 0
    marker = args.marker.encode() if args.marker else None
    marker_seen = False
    tail = b""
    try:
        conn, _ = ls.accept()
        conn.settimeout(args.timeout)
        start = time.monotonic()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            h.update(view[:k])
            n += k
            if marker and not marker_seen:
                window = tail + bytes(view[:k])
                marker_seen = marker in window
                tail = window[-len(marker) :]
        secs = time.monotonic() - start
        conn.close()
    except OSError as exc:
        _print({"role": "recv", "bytes": n, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    out = {"role": "recv", "bytes": n, "sha256": h.hexdigest(), "seconds": round(secs, 3)}
    if marker:
        out["marker_seen"] = marker_seen
    _print(out)
    return 0


def _payload(args: argparse.Namespace):
    left = args.bytes
    if args.marker:
        block = (args.marker.encode() + b"\n") * (CHUNK // (len(args.marker) + 1) + 1)
        while left > 0:
            piece = block[: min(left, CHUNK)]
            left -= len(piece)
            yield piece
        return
    rng = random.Random(args.seed)
    while left > 0:
        piece = rng.randbytes(min(left, CHUNK))
        left -= len(piece)
        yield piece


def send(args: argparse.Namespace) -> int:
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    deadline = time.monotonic() + args.timeout
    while True:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            if args.source_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", args.source_port))
            s.connect((args.host, args.port))
            break
        except OSError as exc:
            s.close()
            if time.monotonic() > deadline:
                _print({"role": "send", "bytes": 0, "error": f"connect: {exc}"})
                return 1
            time.sleep(0.1)
    s.settimeout(max(1.0, deadline - time.monotonic()))
    h = hashlib.sha256()
    n = 0
    start = time.monotonic()
    try:
        for piece in _payload(args):
            h.update(piece)
            s.sendall(piece)
            n += len(piece)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):  # wait for the receiver to have read everything and closed
            pass
    except OSError as exc:
        _print({"role": "send", "bytes": n, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    secs = time.monotonic() - start
    _print({"role": "send", "bytes": n, "sha256": h.hexdigest(), "seconds": round(secs, 3)})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", choices=["send", "recv"])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--bytes", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--marker", default=None)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--source-port", type=int, default=0, help="send: bind to this port")
    ap.add_argument("--text", action="store_true", help="human-readable output instead of JSON")
    args = ap.parse_args(argv)
    global TEXT
    TEXT = args.text
    return recv(args) if args.role == "recv" else send(args)


if __name__ == "__main__":
    sys.exit(main())
