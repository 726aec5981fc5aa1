"""tests/vectors/xfrm_ip.txt (what iproute2 sends) and simpletun.xfrm's encoding of each case."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from simpletun import xfrm

PATH = Path(__file__).resolve().parent.parent / "vectors" / "xfrm_ip.txt"

A32 = bytes([0x11] * 32)
K16, K24, K32 = bytes([0x22] * 16), bytes([0x23] * 24), bytes([0x24] * 32)
_SA = dict(src="192.0.2.1", dst="192.0.2.2", spi=0x01000000, auth_key=A32, reqid=1)
_OUT = xfrm.Policy(
    xfrm.Selector.of("10.1.0.0/24", "10.2.0.0/24"),
    "out",
    (xfrm.Template("192.0.2.1", "192.0.2.2", reqid=1),),
)


def load() -> dict[str, tuple[str, int, int, bytes]]:
    """name -> (args, type, flags, payload)."""
    out, cur = {}, {}
    for line in PATH.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.partition(" ")
        if key == "name":
            cur = {"name": rest}
        elif key == "args":
            cur["args"] = rest
        elif key == "msg":
            t, f = rest.split()
            cur["type"], cur["flags"] = int(t, 0), int(f, 0)
        else:
            out[cur["name"]] = (cur["args"], cur["type"], cur["flags"], bytes.fromhex(line))
    return out


def ours() -> dict[str, tuple[int, int, object]]:
    """name -> (type, flags, message object) built with simpletun.xfrm."""
    sa = xfrm.SA(enc_key=K16, **_SA)
    return {
        "sa_aes128": (xfrm.XFRM_MSG_NEWSA, xfrm.FLAGS_ADD, xfrm.build_newsa(sa)),
        "sa_aes192": (
            xfrm.XFRM_MSG_NEWSA,
            xfrm.FLAGS_ADD,
            xfrm.build_newsa(xfrm.SA(enc_key=K24, **_SA)),
        ),
        "sa_aes256_window32": (
            xfrm.XFRM_MSG_NEWSA,
            xfrm.FLAGS_ADD,
            xfrm.build_newsa(xfrm.SA(enc_key=K32, replay_window=32, **_SA)),
        ),
        "sa_aes256_esn4096": (
            xfrm.XFRM_MSG_NEWSA,
            xfrm.FLAGS_ADD,
            xfrm.build_newsa(xfrm.SA(enc_key=K32, replay_window=4096, esn=True, **_SA)),
        ),
        "sa_encap": (
            xfrm.XFRM_MSG_NEWSA,
            xfrm.FLAGS_ADD,
            xfrm.build_newsa(xfrm.SA(enc_key=K16, encap=xfrm.Encap(4500, 4501), **_SA)),
        ),
        "sa_if_id": (
            xfrm.XFRM_MSG_NEWSA,
            xfrm.FLAGS_ADD,
            xfrm.build_newsa(xfrm.SA(enc_key=K16, if_id=7, **_SA)),
        ),
        "sa_update": (xfrm.XFRM_MSG_UPDSA, xfrm.FLAGS_UPDATE, xfrm.build_newsa(sa)),
        "sa_delete": (
            xfrm.XFRM_MSG_DELSA,
            xfrm.FLAGS_REQ,
            xfrm.build_sa_id("192.0.2.2", 0x01000000, "192.0.2.1"),
        ),
        "sa_get": (
            xfrm.XFRM_MSG_GETSA,
            xfrm.FLAGS_GET,
            xfrm.build_sa_id("192.0.2.2", 0x01000000, "192.0.2.1"),
        ),
        "policy_out": (xfrm.XFRM_MSG_NEWPOLICY, xfrm.FLAGS_ADD, xfrm.build_newpolicy(_OUT)),
        "policy_in_prio": (
            xfrm.XFRM_MSG_NEWPOLICY,
            xfrm.FLAGS_ADD,
            xfrm.build_newpolicy(
                xfrm.Policy(
                    xfrm.Selector.of("10.2.0.0/24", "10.1.0.0/24"),
                    "in",
                    (xfrm.Template("192.0.2.2", "192.0.2.1", reqid=2),),
                    priority=100,
                )
            ),
        ),
        "policy_v6_proto": (
            xfrm.XFRM_MSG_NEWPOLICY,
            xfrm.FLAGS_ADD,
            xfrm.build_newpolicy(
                xfrm.Policy(
                    xfrm.Selector(
                        ipaddress.ip_network("2001:db8:1::/64"),
                        ipaddress.ip_network("2001:db8:2::/64"),
                        proto=17,
                        dport=53,
                    ),
                    "out",
                    (xfrm.Template("2001:db8::1", "2001:db8::2", reqid=3),),
                )
            ),
        ),
        "policy_if_id": (
            xfrm.XFRM_MSG_NEWPOLICY,
            xfrm.FLAGS_ADD,
            xfrm.build_newpolicy(xfrm.Policy(_OUT.selector, "out", _OUT.templates, if_id=7)),
        ),
        "policy_delete": (
            xfrm.XFRM_MSG_DELPOLICY,
            xfrm.FLAGS_REQ,
            xfrm.build_policy_id(_OUT.selector, "out"),
        ),
    }


def encoded(name: str) -> tuple[int, int, bytes]:
    """(type, flags, payload after the header) of our encoding of case ``name``."""
    t, f, msg = ours()[name]
    data = xfrm.encode(msg, t, f)
    return t, f, data[16:]
