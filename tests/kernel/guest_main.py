"""Inside the qemu guest: configure the guest kernel's ESP with simpletun.xfrm for each scenario
of a group, run traffic through it against the host's simpletun side, print results.

For each scenario: SAs (both directions) and policies installed with simpletun.xfrm, 3 pings,
a TCP transfer echoed by the host (SHA-256 compared), then the kernel's SA counters (read back
with simpletun.xfrm) printed as one ``KESP-RESULT <json>`` line on the console; then the
scenario's SAs and policies are removed. Also creates and deletes an xfrm interface once.

Usage (guest only): python -m tests.kernel.guest_main GROUP NIC
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import traceback

from simpletun import xfrm

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


def sas_for(sc: Scenario) -> tuple[xfrm.SA, xfrm.SA]:
    encap = xfrm.Encap(ENCAP_PORT, ENCAP_PORT) if sc.transport == "udp" else None
    common = dict(replay_window=sc.window, esn=sc.esn, encap=encap)
    out = xfrm.SA(
        GUEST_OUTER,
        HOST_OUTER,
        sc.spi_g2h,
        sc.enc_g2h,
        sc.auth_g2h,
        reqid=sc.n * 2,
        oseq=ESN_START if sc.esn else 0,
        **common,
    )
    inn = xfrm.SA(
        HOST_OUTER,
        GUEST_OUTER,
        sc.spi_h2g,
        sc.enc_h2g,
        sc.auth_h2g,
        reqid=sc.n * 2 + 1,
        seq=ESN_START if sc.esn else 0,
        **common,
    )
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


def run_scenario(sc: Scenario, nic: str) -> dict:
    res: dict = {"scenario": sc.name}
    sh("ip", "addr", "add", f"{sc.guest_inner}/32", "dev", "lo")
    sh(
        "ip", "route", "replace", f"{HOST_INNER}/32", "via", HOST_OUTER, "dev", nic,
        "src", sc.guest_inner, "mtu", str(INNER_MTU),
    )  # fmt: skip
    out, inn = sas_for(sc)
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
    try:
        r = subprocess.run(
            ["ping", "-c", "3", "-W", "5", "-I", sc.guest_inner, HOST_INNER],
            capture_output=True,
            text=True,
        )
        res["ping_rc"] = r.returncode
        res["ping_tail"] = r.stdout.strip().splitlines()[-2:]
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


def main() -> None:
    group, nic = sys.argv[1], sys.argv[2]
    t0 = time.monotonic()
    emit("START", {"group": group, "kernel": os.uname().release})
    for sc in GROUPS[group]:
        try:
            emit("RESULT", run_scenario(sc, nic))
        except Exception:
            emit("RESULT", {"scenario": sc.name, "error": traceback.format_exc()})
    if group in ("esp", "all"):
        emit("XFRMI", xfrm_interface_check(nic))
    emit("END", {"seconds": round(time.monotonic() - t0, 1)})


if __name__ == "__main__":
    main()
