"""IKEv2 tunnels (`simpletun up FILE`, simpletun against simpletun) over raw ESP (IP protocol
50, IKE on UDP 500 without forced encapsulation) with IPv4 and IPv6 outer addresses, and over
ESP-in-UDP and TCP (RFC 8229) with IPv6 outer addresses: ping, a SHA-256-checked transfer, and
the capture decoded by tshark (ESP where the transport says, with our SPIs, IKE where it says,
no inner packet in the clear)."""

from __future__ import annotations

import shutil

import pytest
from skipping import skip

from .dgtunnel import VETH_A_ADDR6, VETH_B_ADDR6, add_ipv6_outer
from .ikefiles import A_IN, B_IN, tshark_fields, up_pair
from .lab import VETH_A, VETH_A_ADDR, VETH_B_ADDR, Capture
from .pcapwire import read_pcap, tcp_streams

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

CASES = [("raw", False), ("raw", True), ("udp", True), ("tcp", True)]
FIELDS = (
    "ip.src", "ipv6.src", "ip.proto", "ipv6.nxt", "udp.srcport", "udp.dstport", "tcp.srcport",
    "tcp.dstport", "esp.spi", "isakmp.exchangetype",
)  # fmt: skip


@pytest.mark.parametrize(
    ("transport", "ipv6"), CASES, ids=[f"{t}-{'v6' if v6 else 'v4'}" for t, v6 in CASES]
)
def test_ikev2_transports_and_outer_families(lab_factory, tmp_path, monkeypatch, transport, ipv6):
    if shutil.which("tshark") is None:
        skip("tshark is not installed (scripts/setup.sh installs it)")
    lab = lab_factory(ipv6=ipv6)
    if ipv6:
        add_ipv6_outer(lab)
    a_ip, b_ip = (VETH_A_ADDR6, VETH_B_ADDR6) if ipv6 else (VETH_A_ADDR, VETH_B_ADDR)
    if transport == "udp":
        # With UDP GSO a captured frame holds a run of ESP packets (the stack segments after
        # the capture point) and tshark sees one: one ESP packet per frame needs no offloads.
        monkeypatch.setenv("SIMPLETUN_OFFLOADS", "0")
    cap = Capture(lab, lab.ns_a, VETH_A, tmp_path / "wire.pcap", "ip or ip6")
    down, status_of = up_pair(lab, tmp_path, monkeypatch, transport, addrs=(a_ip, b_ip))
    try:
        lab.wait_ping(lab.ns_b, A_IN, 20)
        sent, received, _ = lab.ping(lab.ns_b, A_IN, count=10, interval=0.05)
        assert (sent, received) == (10, 10)
        tx, rx = lab.tcp_transfer((lab.ns_b, B_IN), (lab.ns_a, A_IN), 4 << 20, port=5303)
        assert tx == rx, "4 MiB changed on the way"
        sa, sb = status_of(lab.ns_a), status_of(lab.ns_b)
        assert sa["transport"] == sb["transport"] == transport, sa
        (pa,), (pb,) = sa["peers"], sb["peers"]
        host, _, port = pa["endpoint"].rpartition(":")
        assert host.strip("[]") == b_ip, pa["endpoint"]
        assert port == {"raw": "0", "udp": "4500"}.get(transport, port), pa["endpoint"]
        spis = {int(c["spi_out"], 16) for p in (pa, pb) for c in p["child_sas"]}
        for p in (pa, pb):
            assert not {k for k in p["drops"] if "auth" in k or "replay" in k}, p["drops"]
    finally:
        down()
        pcap = cap.stop()
    rows = [dict(zip(FIELDS, r, strict=False)) for r in tshark_fields(pcap, *FIELDS)]
    src = "ipv6.src" if ipv6 else "ip.src"
    ours = [r for r in rows if r[src] in (a_ip, b_ip)]
    # no inner packet in the clear anywhere (tshark would show the inner header's addresses)
    assert not [r for r in rows if {A_IN, B_IN} & set(r["ip.src"].split(","))], "plaintext"
    if transport == "tcp":
        # everything on TCP 4500, nothing on UDP; the frames cut by our own RFC 8229 decoder
        # (tshark 4.0 has none: see test_ikev2_tcp): IKE behind the marker, ESP with our SPIs
        assert not [r for r in ours if r["udp.srcport"]], "UDP used by an IKEv2-over-TCP tunnel"
        assert all(4500 in (int(r["tcp.srcport"]), int(r["tcp.dstport"])) for r in ours
                   if r["tcp.srcport"])  # fmt: skip
        streams = tcp_streams(read_pcap(pcap.read_bytes()), port=4500)
        seen, esp_bytes = set(), 0
        for st in streams:
            data = st.data[6:] if st.dst == a_ip else st.data
            off = 0
            while off + 2 <= len(data):
                ln = int.from_bytes(data[off : off + 2], "big")
                assert ln >= 6, ln
                if data[off + 2 : off + 6] != b"\0\0\0\0":
                    seen.add(int.from_bytes(data[off + 2 : off + 6], "big"))
                    esp_bytes += ln - 2
                off += ln
        # (by bytes: with super-packets agreed the 4 MiB cross in a few hundred ESP frames)
        assert esp_bytes > 4 << 20 and seen <= spis, (esp_bytes, seen, spis)
        return
    esp = [r for r in ours if r["esp.spi"]]
    ike = [r for r in ours if r["isakmp.exchangetype"]]
    seen = {int(x, 16) for r in esp for x in r["esp.spi"].split(",")}
    assert seen and seen <= spis, (seen, spis)
    assert len(esp) > 1000
    if transport == "raw":
        # ESP is IP protocol 50 itself; IKE stays on UDP 500 (no NAT, nothing forced)
        proto = "ipv6.nxt" if ipv6 else "ip.proto"
        assert all(r[proto] == "50" and not r["udp.srcport"] for r in esp), esp[:3]
        assert ike and all(r["udp.srcport"] == r["udp.dstport"] == "500" for r in ike), ike
        assert not [r for r in ours if "4500" in (r["udp.srcport"], r["udp.dstport"])]
        # `down` tells the peer with an INFORMATIONAL Delete, on port 500 too
        assert "37" in {r["isakmp.exchangetype"] for r in ike}, "no Delete on shutdown"
    else:
        assert all(r["udp.srcport"] == r["udp.dstport"] == "4500" for r in esp), esp[:3]
        assert {"34", "35"} <= {r["isakmp.exchangetype"] for r in ike}


def test_rekey_packets_from_the_file_rekeys_during_a_transfer(lab, tmp_path, monkeypatch):
    """A peer's `rekey_packets` reaches the data plane: an 8 MiB transfer (some 6000 packets
    each way) rekeys the Child SA every 2000 packets, and nothing is lost or rejected."""
    down, status_of = up_pair(lab, tmp_path, monkeypatch, "udp", extra_b="rekey_packets = 2000\n")
    try:
        lab.wait_ping(lab.ns_b, A_IN, 20)
        first = {c["spi_out"] for c in status_of(lab.ns_b)["peers"][0]["child_sas"]}
        tx, rx = lab.tcp_transfer((lab.ns_b, B_IN), (lab.ns_a, A_IN), 8 << 20, port=5304)
        assert tx == rx
        sent, received, _ = lab.ping(lab.ns_b, A_IN, count=10, interval=0.05)
        assert (sent, received) == (10, 10)
        (pb,) = status_of(lab.ns_b)["peers"]
        now = {c["spi_out"] for c in pb["child_sas"]}
        assert now and not now & first, "no rekey from rekey_packets"
        out = [c for c in pb["child_sas"] if c["outbound"]]
        # the outbound SA in use carried a fraction of what the peer sent: rekeyed on the way
        assert out and out[0]["seq_out"] * 2 < pb["tx_packets"], (out, pb["tx_packets"])
        for s in (status_of(lab.ns_a), status_of(lab.ns_b)):
            drops = s["peers"][0]["drops"]
            assert not {k for k in drops if "auth" in k or "replay" in k or "no_sa" in k}, drops
    finally:
        down()
