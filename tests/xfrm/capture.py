"""Capture the netlink messages iproute2's ``ip xfrm`` sends (strace), as an independent
encoding of XFRM requests. Used by the vector tests and by ``python -m tests.xfrm.capture``
(which regenerates tests/vectors/xfrm_ip.txt)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

_SEND = re.compile(
    r"nlmsg_len=(\d+), nlmsg_type=(0x[0-9a-f]+|\d+)[^,]*, nlmsg_flags=(0x[0-9a-f]+|\d+)[^,]*,"
    r" nlmsg_seq=\d+, nlmsg_pid=\d+\}, \"((?:\\x[0-9a-f]{2})*)\""
)

# (name, ip xfrm arguments). Keys and addresses are fixed so the vectors are stable.
K16, K24, K32 = "0x" + "22" * 16, "0x" + "23" * 24, "0x" + "24" * 32
A32 = "0x" + "11" * 32
_SA = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x01000000 reqid 1 mode tunnel"
CASES = [
    ("sa_aes128", f"{_SA} auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K16}"),
    ("sa_aes192", f"{_SA} auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K24}"),
    (
        "sa_aes256_window32",
        f"{_SA} replay-window 32 auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K32}",
    ),
    (
        "sa_aes256_esn4096",
        f"{_SA} replay-window 4096 flag esn auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K32}",
    ),
    (
        "sa_encap",
        f"{_SA} auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K16}"
        " encap espinudp 4500 4501 0.0.0.0",
    ),
    ("sa_if_id", f"{_SA} auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K16} if_id 7"),
    (
        "sa_update",
        f"state update src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x01000000 reqid 1 mode tunnel"
        f" auth-trunc hmac(sha256) {A32} 128 enc cbc(aes) {K16}",
    ),
    ("sa_delete", "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x01000000"),
    ("sa_get", "state get src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x01000000"),
    (
        "policy_out",
        "policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir out"
        " tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel",
    ),
    (
        "policy_in_prio",
        "policy add src 10.2.0.0/24 dst 10.1.0.0/24 dir in priority 100"
        " tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 2 mode tunnel",
    ),
    (
        "policy_v6_proto",
        "policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 proto udp dport 53 dir out"
        " tmpl src 2001:db8::1 dst 2001:db8::2 proto esp reqid 3 mode tunnel",
    ),
    (
        "policy_if_id",
        "policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir out if_id 7"
        " tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel",
    ),
    ("policy_delete", "policy delete src 10.1.0.0/24 dst 10.2.0.0/24 dir out"),
]


def capture(args: str) -> list[tuple[int, int, bytes]]:
    """Run ``ip xfrm ARGS`` under strace in a throwaway namespace; return what it sent as
    (type, flags, payload after the 16-byte header) per message (the header's seq/pid vary)."""
    ns = "stcap-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "trace")
            subprocess.run(
                ["strace", "-X", "raw", "-e", "trace=sendmsg", "-xx", "-s", "65535", "-o", out]
                + ["ip", "-n", ns, "xfrm"]
                + args.split(),
                capture_output=True,
            )
            text = open(out).read()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    msgs = []
    for m in _SEND.finditer(text):
        length, typ, flags, hexs = m.groups()
        payload = bytes.fromhex(hexs.replace("\\x", ""))
        assert int(length) == 16 + len(payload), (length, len(payload))
        msgs.append((int(typ, 0), int(flags, 0), payload))
    return msgs


def available() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("not root")
    for tool in ("strace", "ip"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` not installed")
    return missing


def main() -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "vectors", "xfrm_ip.txt")
    lines = [
        "# Netlink messages iproute2 sends for `ip xfrm ...` (captured with strace -X raw -xx by",
        "# tests/xfrm/capture.py; header seq/pid omitted). One block per case:",
        "# name / args / type flags / payload hex.",
    ]
    ver = subprocess.run(["ip", "-V"], capture_output=True, text=True).stdout.strip()
    lines.append(f"# {ver}")
    for name, args in CASES:
        msgs = capture(args)
        if len(msgs) != 1:
            sys.exit(f"{name}: expected one message, got {len(msgs)}")
        typ, flags, payload = msgs[0]
        lines += ["", f"name {name}", f"args {args}", f"msg {typ:#x} {flags:#x}", payload.hex()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
