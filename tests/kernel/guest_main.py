"""Inside the qemu guest: configure the guest kernel's ESP with simpletun.xfrm for each scenario
of a group, run traffic through it against the host's simpletun side, print results.

For each scenario: SAs (both directions, from the scenario's manual key file, the same file the
host's simpletun side reads) and policies installed with simpletun.xfrm, 3 pings,
a TCP transfer echoed by the host (SHA-256 compared), then the kernel's SA counters (read back
with simpletun.xfrm) printed as one ``KESP-RESULT <json>`` line on the console; then the
scenario's SAs and policies are removed. Also creates and deletes an xfrm interface once.

Usage (guest only): python -m tests.kernel.guest_main GROUP NIC KEYS_DIR
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import traceback

from simpletun import manual_keys, xfrm

from .scenarios import (
    ECHO_PORT,
    ENCAP_PORT,
    ESN_START,
    GROUPS,
    GUEST_OUTER,
    HOST_INNER,
    HOST_OUTER,
    INNER_MTU,
    TRANSFER_BYTES,
    Scenario,
)


def emit(kind: str, obj: dict) -> None:
    print(f"KESP-{kind} {json.dumps(obj, sort_keys=True)}", flush=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def sas_for(sc: Scenario, keys_dir: str) -> tuple[xfrm.SA, xfrm.SA]:
    """The guest kernel's (outbound, inbound) SAs from the scenario's manual key file; ESN
    scenarios start just below 2^32 in both directions."""
    keys = manual_keys.load(os.path.join(keys_dir, f"{sc.name}.toml"))
    out, inn = keys.xfrm_sas("client", GUEST_OUTER, HOST_OUTER, reqid=sc.n * 2)
    if sc.esn:
        out = dataclasses.replace(out, oseq=ESN_START)
        inn = dataclasses.replace(inn, seq=ESN_START)
    return out, inn


def policies_for(sc: Scenario) -> list[xfrm.Policy]:
    g, h = f"{sc.guest_inner}/32", f"{HOST_INNER}/32"
    return [
        xfrm.Policy(
            xfrm.Selector.of(g, h),
            "out",
            (xfrm.Template(GUEST_OUTER, HOST_OUTER, reqid=sc.n * 2),),
        ),
        xfrm.Policy(
            xfrm.Selector.of(h, g),
            "in",
            (xfrm.Template(HOST_OUTER, GUEST_OUTER, reqid=sc.n * 2 + 1),),
        ),
    ]


def transfer(src: str) -> dict:
    data = hashlib.shake_256(b"simpletun kesp transfer " + src.encode()).digest(TRANSFER_BYTES)
    c = socket.create_connection((HOST_INNER, ECHO_PORT), timeout=30, source_address=(src, 0))
    with c:
        c.sendall(struct.pack("!I", len(data)) + data)
        got = bytearray()
        while len(got) < len(data):
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
    return {
        "sent_sha256": hashlib.sha256(data).hexdigest(),
        "echoed_sha256": hashlib.sha256(bytes(got)).hexdigest(),
        "bytes": len(got),
    }


ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def esp_offset(frame: bytes) -> int | None:
    """Offset of the ESP header in an Ethernet frame (raw ESP or ESP-in-UDP), else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 15) * 4
    proto = frame[23]
    if proto == 50:
        return 14 + ihl
    if proto == 17 and struct.unpack_from("!H", frame, 14 + ihl + 2)[0] == ENCAP_PORT:
        return 14 + ihl + 8
    return None


def inject(cap: socket.socket, nic: str, spi: int) -> dict:
    """Wire-level attack on the simpletun side: among the frames the kernel sent with ``spi``
    (captured on the NIC), re-send the 2nd verbatim (a replay) and a copy with its sequence
    number moved 1000 ahead (fresh, but its ICV no longer matches: a forgery)."""
    frames = []
    while True:
        try:
            frame, addr = cap.recvfrom(65535)
        except BlockingIOError:
            break
        off = esp_offset(frame)
        if addr[2] == PACKET_OUTGOING and off is not None:
            if struct.unpack_from("!I", frame, off)[0] == spi:
                frames.append((frame, off))
    if len(frames) < 2:
        return {"error": f"captured {len(frames)} ESP frames with SPI {spi:#x}"}
    frame, off = frames[1]
    cap.sendto(frame, (nic, 0))
    forged = bytearray(frame)
    seq = struct.unpack_from("!I", forged, off + 4)[0]
    struct.pack_into("!I", forged, off + 4, (seq + 1000) & 0xFFFFFFFF)
    if forged[23] == 17:
        struct.pack_into("!H", forged, off - 2, 0)  # no UDP checksum (as the kernel sends)
    cap.sendto(bytes(forged), (nic, 0))
    return {"replayed_seq": seq, "forged_seq": (seq + 1000) & 0xFFFFFFFF}


def run_scenario(sc: Scenario, nic: str, keys_dir: str) -> dict:
    res: dict = {"scenario": sc.name}
    sh("ip", "addr", "add", f"{sc.guest_inner}/32", "dev", "lo")
    sh(
        "ip", "route", "replace", f"{HOST_INNER}/32", "via", HOST_OUTER, "dev", nic,
        "src", sc.guest_inner, "mtu", str(INNER_MTU),
    )  # fmt: skip
    out, inn = sas_for(sc, keys_dir)
    xfrm.add_sa(out)
    xfrm.add_sa(inn)
    for p in policies_for(sc):
        xfrm.add_policy(p)
    encap_sock = None
    if sc.transport == "udp":
        # Inbound ESP-in-UDP needs a UDP_ENCAP socket on the port (what an IKE daemon holds).
        encap_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        encap_sock.bind(("0.0.0.0", ENCAP_PORT))
        encap_sock.setsockopt(socket.IPPROTO_UDP, 100, 2)  # UDP_ENCAP, UDP_ENCAP_ESPINUDP
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.bind((nic, 0))
    cap.setblocking(False)
    try:
        r = subprocess.run(
            ["ping", "-c", "3", "-W", "5", "-I", sc.guest_inner, HOST_INNER],
            capture_output=True,
            text=True,
        )
        res["ping_rc"] = r.returncode
        res["ping_tail"] = r.stdout.strip().splitlines()[-2:]
        res["injected"] = inject(cap, nic, sc.spi_g2h)
        cap.close()
        try:
            res["transfer"] = transfer(sc.guest_inner)
        except OSError as e:
            res["transfer"] = {"error": str(e)}
        g_out = xfrm.get_sa(out.dst, out.spi, out.src)
        g_in = xfrm.get_sa(inn.dst, inn.spi, inn.src)
        res["kernel_out"] = g_out.counters("out") | {"esn": g_out.esn, "flags": g_out.flags}
        res["kernel_in"] = g_in.counters("in") | {"esn": g_in.esn, "flags": g_in.flags}
        res["kernel_out_keys_match"] = (g_out.enc_key, g_out.auth_key) == (
            out.enc_key,
            out.auth_key,
        )
        res["dumped_spis"] = sorted(s.spi for s in xfrm.dump_sas())
        res["dumped_policies"] = len(xfrm.dump_policies())
    finally:
        cap.close()
        if encap_sock is not None:
            encap_sock.close()
        for p in policies_for(sc):
            xfrm.delete_policy(p.selector, p.dir)
        xfrm.delete_sa(out.dst, out.spi, out.src)
        xfrm.delete_sa(inn.dst, inn.spi, inn.src)
        sh("ip", "addr", "del", f"{sc.guest_inner}/32", "dev", "lo")
    res["left_after_cleanup"] = len(xfrm.dump_sas()) + len(xfrm.dump_policies())
    return res


def xfrm_interface_check(nic: str) -> dict:
    try:
        idx = xfrm.add_interface("ipsec7", 7, link=nic)
        sh("ip", "link", "set", "ipsec7", "up")
        kind = sh("ip", "-d", "link", "show", "ipsec7")
        xfrm.delete_interface("ipsec7")
        return {"ifindex": idx, "if_id_7": "if_id 0x7" in kind or "if_id 7" in kind}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def bench() -> dict:
    """scripts/bench_kernel.py in the guest, for correctness only (emulated timings): its kernel
    ESP row keys two guest namespaces from one manual key file and moves iperf3 traffic."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_kernel.py")
    spec = importlib.util.spec_from_file_location("bench_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        rc = mod.main(
            ["--time", "1", "--pings", "3", "--interval", "0.2", "--emulated", "--esn"]
            + ["--json", "/tmp/bench.json", "--png", "/tmp/bench.png"]
        )
        with open("/tmp/bench.json") as f:
            return {"rc": rc} | json.load(f)
    except Exception:
        return {"error": traceback.format_exc()}


def main() -> None:
    group, nic, keys_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    t0 = time.monotonic()
    emit("START", {"group": group, "kernel": os.uname().release})
    for sc in GROUPS[group]:
        try:
            emit("RESULT", run_scenario(sc, nic, keys_dir))
        except Exception:
            emit("RESULT", {"scenario": sc.name, "error": traceback.format_exc()})
    if group in ("esp", "all"):
        emit("XFRMI", xfrm_interface_check(nic))
    if group == "all":
        emit("BENCH", bench())
    emit("END", {"seconds": round(time.monotonic() - t0, 1)})


if __name__ == "__main__":
    main()
