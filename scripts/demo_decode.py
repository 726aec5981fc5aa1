"""Decode a demo capture: what crossed the veth between the two namespaces.

    demo_decode.py PCAP PORT MARKER

Reassembles both directions of the tunnel's TCP connection from the pcap, splits them into
simpletun frames, names the handshake control frames, shows the first ESP frames (SPI,
sequence number, length) and checks the sequence numbers and that MARKER (a string that was
sent through the tunnel) never appears on the wire. Exit status 1 if a check fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "netns"))

import pcapwire  # noqa: E402

MSG_NAMES = {1: "ClientHello", 2: "ServerHello", 3: "ClientFinish", 4: "Error"}
SHOW = 4


def main() -> int:
    pcap, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    raw = Path(pcap).read_bytes()
    segs = pcapwire.read_pcap(raw)
    streams = [s for s in pcapwire.tcp_streams(segs, port=port) if s.data]
    ok = True
    print(f"  {len(segs)} TCP packets captured on the veth, port {port}")
    for st in streams:
        who = "client -> server" if st.dport == port else "server -> client"
        frames, rest = pcapwire.split_frames(st.data)
        print(
            f"\n  {who}  ({st.src}:{st.sport} -> {st.dst}:{st.dport}), {len(st.data)} bytes, "
            f"{len(frames)} frames"
        )
        if st.holes:
            print(f"    (capture incomplete: {len(st.holes)} hole(s))")
        shown = 0
        for i, f in enumerate(frames):
            if f.is_control:
                kind = MSG_NAMES.get(f.payload[4], f"type {f.payload[4]}")
                print(
                    f"    frame {i + 1:>3}: control  {kind:<13} {len(f.payload):>5} bytes "
                    f"(first 4 bytes zero: handshake)"
                )
            elif shown < SHOW:
                shown += 1
                print(
                    f"    frame {i + 1:>3}: ESP      SPI 0x{f.spi:08x}  seq {f.seq:<6} "
                    f"{len(f.payload):>5} bytes  ciphertext {f.payload[24:40].hex()}..."
                )
        s = pcapwire.esp_summary(frames)
        if s["esp"] > SHOW:
            print(f"    ... {s['esp'] - SHOW} more ESP frames")
        if s["esp"]:
            spis = ", ".join(f"0x{x:08x}" for x in s["spis"])
            order = "consecutive" if s["seq_increasing"] and not s["seq_gaps"] else "NOT in order"
            print(
                f"    ESP frames: {s['esp']}, SPI {spis}, seq {s['first_seq']}..{s['last_seq']}"
                f" ({order})"
            )
        good = (
            s["esp"] > 0
            and s["late_control"] == 0
            and s["seq_increasing"]
            and s["seq_gaps"] == 0
            and len(s["spis"]) == 1
        )
        ok &= good
    found = raw.count(marker)
    print(
        f"\n  the marker {marker.decode()!r} sent through the tunnel appears "
        f"{found} time(s) in the capture"
    )
    if found:
        print("  FAIL: inner plaintext is visible on the wire")
    ok &= found == 0 and len(streams) == 2
    print(f"\n  {'OK: only handshake control frames and ESP crossed the veth' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
