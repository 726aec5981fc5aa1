"""ESP-in-UDP (RFC 3948) and raw ESP (IP protocol 50) between two namespaces, IPv4 and IPv6
outer addresses: ping, a 50 MiB SHA-256-checked transfer, and a capture decoded by tcpdump that
must show only ESP (``UDP-encap: ESP(spi=..,seq=..)`` / ``ESP(spi=..,seq=..)``) with gap-free
sequence numbers per SPI and never the inner plaintext (a 256 KiB marked transfer)."""

from __future__ import annotations

import secrets

import pytest

from .dgtunnel import DatagramPair, add_ipv6_outer, decode_esp
from .lab import TUN_A_ADDR, VETH_A, Capture, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

CASES = [("udp", False), ("udp", True), ("raw", False), ("raw", True)]


@pytest.mark.parametrize(
    ("transport", "ipv6"), CASES, ids=[f"{t}-{'v6' if v6 else 'v4'}" for t, v6 in CASES]
)
def test_datagram_tunnel_ping_transfer_and_wire(
    lab_factory, keys, tmp_path, checked, transport, ipv6
):
    lab = lab_factory(ipv6=ipv6)
    if ipv6:
        add_ipv6_outer(lab)
    # With UDP GSO a captured frame holds a run of ESP packets (segmented after the capture
    # point), which tcpdump decodes as one: this capture runs without offloads; the offload
    # path is test_offloads.py.
    env = {"SIMPLETUN_OFFLOADS": "0"} if transport == "udp" else None
    t = DatagramPair(lab, transport=transport, ipv6=ipv6, key_a=keys[0], mtu=1400, env=env)
    t.start(timeout=20)
    sent, got, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=5, interval=0.05)
    assert got == sent == 5, t.logs()

    tx, rx = t.transfer(50 * 1024 * 1024, timeout=120)
    assert tx["sha256"] == rx["sha256"] and rx["bytes"] == 50 * 1024 * 1024

    proto = "esp" if transport == "raw" else "udp port 4500"
    bpf = f"ip6 and {proto}" if ipv6 else f"ip and {proto}"
    if transport == "raw":
        bpf = "ip6 proto 50" if ipv6 else "ip proto 50"
    cap = Capture(lab, lab.ns_a, VETH_A, tmp_path / "wire.pcap", bpf)
    marker = "SIMPLETUN-SECRET-" + secrets.token_hex(8)
    tx2, rx2 = t.transfer(256 * 1024, marker=marker, seed=2, timeout=60)
    assert rx2["marker_seen"] and tx2["sha256"] == rx2["sha256"]
    path = cap.stop()
    server_log = t.server.stderr()
    t.stop()
    assert cap.kernel_drops == 0, "tcpdump lost packets; the sequence cannot be checked"
    raw = path.read_bytes()
    assert marker.encode() not in raw, "inner plaintext visible on the wire"

    rows = decode_esp(str(path))  # ValueError on anything that is not ESP
    want = "UDP-encap: ESP(" if transport == "udp" else "ESP("
    assert all(want in r[4] for r in rows)
    if transport == "raw":
        assert not any("UDP" in r[4] for r in rows)
    by_spi: dict[int, list[int]] = {}
    for _src, _dst, spi, seq, _line in rows:
        by_spi.setdefault(spi, []).append(seq)
    assert len(by_spi) == 2, f"one SPI per direction expected: {sorted(by_spi)}"
    for spi, seqs in by_spi.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap in SPI {spi:#x}"
        assert spi >= 256
    assert "session with" in server_log
    checked.append(
        f"{transport} {'IPv6' if ipv6 else 'IPv4'} outer: ping 5/5, 50 MiB SHA-256 equal; "
        f"capture of {len(rows)} packets, all tcpdump-decoded {want.rstrip('(')} with "
        f"gap-free seqs on SPIs {', '.join(hex(s) for s in by_spi)}; marker absent"
    )


def test_udp_wrong_key_is_said_and_retried_and_server_stays(lab, keys, checked):
    """A rejection is not authenticated, so the client says why and keeps retrying (with its
    device in place) rather than exiting; the server keeps serving."""
    t = DatagramPair(lab, transport="udp", key_a=keys[0], key_b=keys[1])
    t.start_server()
    client = t.start_client()
    assert wait_until(lambda: client.stderr().count("wrong key") >= 2, 40), t.logs()
    err = client.stderr()
    line = next(ln for ln in err.splitlines() if "wrong key" in ln)
    assert "same --key file" in line and line.endswith("; retrying"), err
    assert "Traceback" not in err
    assert client.alive() and t.server.alive(), t.logs()
    assert "does not verify" not in t.server.stderr()  # the client never sent a ClientFinish
    t.stop()
    checked.append(f"udp wrong key: client still running, said {line.strip()!r}; server running")
