"""IKEv2 over TCP (RFC 8229), simpletun against simpletun (strongSwan 5.9 has no RFC 8229):
`simpletun up FILE` with `transport = "tcp"` in two namespaces; ping, a SHA-256-checked
transfer with a Child SA rekey inside it, the TCP connection killed and re-opened by the
initiator with the IKE SA kept; the wire: the streams cut by the test's own decoder (the IKETCP
prefix, lengths that count themselves) and every frame decoded by tshark's isakmp and esp
dissectors (IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA, INFORMATIONAL; ESP with our SPIs), no
plaintext inner packet; both ends announce super-packets (private Notify in IKE_AUTH), so the
transfer crosses as ESP frames far larger than the MTU."""

from __future__ import annotations

import shutil

import pytest
from skipping import skip

from .ikefiles import A_IN, B_IN, tshark_fields, up_pair
from .lab import VETH_A, VETH_A_ADDR, VETH_B_ADDR, Capture, wait_until
from .pcapwire import read_pcap, tcp_streams, write_udp_pcap

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

PORT = 4500


def test_ikev2_over_tcp_ping_transfer_rekey_reconnect_and_wire(lab, tmp_path, monkeypatch):
    if shutil.which("tshark") is None:
        skip("tshark is not installed (scripts/setup.sh installs it)")
    cap = Capture(lab, lab.ns_a, VETH_A, tmp_path / "wire.pcap", f"tcp port {PORT}")
    down, status_of = up_pair(lab, tmp_path, monkeypatch, "tcp", rekey_time=4)
    try:
        lab.wait_ping(lab.ns_b, A_IN, 20)
        sent, received, _ = lab.ping(lab.ns_b, A_IN, count=10, interval=0.05)
        assert (sent, received) == (10, 10)
        s = status_of(lab.ns_b)
        assert s["transport"] == "tcp" and s["key_exchange"] == "ikev2", s
        (peer,) = s["peers"]
        ike_sa = peer["ike_sa"]
        assert peer["endpoint"] == f"{VETH_A_ADDR}:{PORT}", peer
        spis = {peer["child_sas"][0]["spi_out"]}

        def wait_rekey():
            def rekeyed():
                outs = {c["spi_out"] for c in status_of(lab.ns_b)["peers"][0]["child_sas"]}
                return outs - spis

            assert wait_until(rekeyed, 20, 0.2), "no Child SA rekey within 20 s"

        tx, rx = lab.tcp_transfer(
            (lab.ns_b, B_IN), (lab.ns_a, A_IN), 12 << 20, port=5302, between=[wait_rekey]
        )
        assert tx == rx, "12 MiB changed on the way through IKEv2 over TCP"
        # Every Child SA the initiator ever used outbound (for the wire check below).
        for c in status_of(lab.ns_b)["peers"][0]["child_sas"]:
            spis.add(c["spi_out"])
        old_ep = status_of(lab.ns_a)["peers"][0]["endpoint"]
        # Kill the initiator's TCP connection: it reconnects (new source port), the IKE SA
        # stays, the responder follows the new connection, traffic flows again.
        kill = lab.run(lab.ns_b, ["ss", "-K", "dst", VETH_A_ADDR, "dport", "=", str(PORT)])
        assert f"{VETH_A_ADDR}:{PORT}" in kill.stdout.decode(), kill.stdout
        lab.wait_ping(lab.ns_b, A_IN, 20)
        sent, received, _ = lab.ping(lab.ns_b, A_IN, count=10, interval=0.05)
        assert (sent, received) == (10, 10)
        sb, sa = status_of(lab.ns_b), status_of(lab.ns_a)
        assert sb["peers"][0]["ike_sa"] == ike_sa, "the IKE SA did not survive the reconnect"
        new_ep = sa["peers"][0]["endpoint"]
        assert new_ep != old_ep and new_ep.startswith(VETH_B_ADDR + ":"), (old_ep, new_ep)
        for c in sb["peers"][0]["child_sas"]:
            spis.add(c["spi_out"])
        for s in (sa, sb):
            drops = s["peers"][0]["drops"]
            assert not {k for k in drops if "auth" in k or "replay" in k}, drops
    finally:
        down()
        pcap = cap.stop()

    # RFC 8229 framing, by the test's own stdlib decoder (tests/netns/pcapwire.py; tshark 4.0's
    # "tcpencap" is Cisco's older TCP encapsulation, not RFC 8229): two connections from B,
    # each starting with IKETCP; lengths that count themselves cut each direction into whole
    # frames.
    assert cap.kernel_drops == 0, "the capture lost packets"
    streams = tcp_streams(read_pcap(pcap.read_bytes()), port=PORT)
    from_b = [s for s in streams if s.dst == VETH_A_ADDR and s.dport == PORT]
    assert len(from_b) == 2, [(s.src, s.sport, s.dst, s.dport) for s in streams]
    datagrams = []
    for s in streams:
        assert not s.holes, (s.sport, s.holes)
        data = s.data
        if s.dst == VETH_A_ADDR:
            assert data[:6] == b"IKETCP", data[:16]
            data = data[6:]
        else:
            assert data[:6] != b"IKETCP"  # only the side that opened the connection sends it
        off = 0
        while off + 2 <= len(data):
            n = int.from_bytes(data[off : off + 2], "big")
            assert n >= 2, (s.sport, off, n)
            datagrams.append((s.src, s.sport, s.dst, s.dport, data[off + 2 : off + n]))
            off += n
        assert off == len(data), (s.sport, off, len(data))
    # Both ends announced super-packets (a private Notify in IKE_AUTH): the 12 MiB crossed
    # mostly as ESP frames far larger than the MTU.
    from_b_bytes = sum(len(d[4]) for d in datagrams if d[0] == VETH_B_ADDR)
    assert from_b_bytes > 12 << 20, from_b_bytes
    assert max(len(d[4]) for d in datagrams) > 16000, "no super-packet crossed whole"
    # tshark's decoding of every frame (handed to it as the UDP-encapsulated datagram it would
    # be on port 4500, RFC 3948): IKE messages behind the non-ESP marker, ESP with our SPIs
    # (an ESP frame cut to its first 2 KiB: a UDP datagram holds less than a 64 KiB frame,
    # and the dissector reads only SPI and sequence number).
    frames = tmp_path / "frames.pcap"
    write_udp_pcap(frames, [(*d[:4], d[4][:2048]) for d in datagrams])
    rows = tshark_fields(frames, "isakmp.exchangetype", "esp.spi", "ip.src", "_ws.col.Protocol")
    assert len(rows) == len(datagrams)
    exch = {e for row in rows for e in row[0].split(",") if e}
    assert {"34", "35", "37"} <= exch, exch  # IKE_SA_INIT, IKE_AUTH, INFORMATIONAL (DPD)
    assert {"36"} <= exch, "no CREATE_CHILD_SA (rekey) seen"
    protos = {row[3] for row in rows}
    assert protos <= {"ISAKMP", "ESP"}, protos  # every frame is IKE or ESP, nothing else
    seen = {int(row[1], 16) for row in rows if row[1] and row[2] == VETH_B_ADDR}
    assert seen and seen <= {int(x, 16) for x in spis}, (seen, spis)
    assert len(seen) >= 2, "the rekey's new SPI never went on the wire"
    # No inner packet in the clear: no segment's payload holds a plaintext inner IPv4 header
    # between the tunnel addresses.
    inner = bytes([10, 254, 2, 1]) + bytes([10, 254, 1, 1])
    assert all(inner not in s.data for s in streams)


def test_one_tcp_responder_many_initiators(lab, tmp_path, monkeypatch):
    """Three `simpletun up` initiators (each its own address, identity, PSK and prefix) over TCP
    to one responder with three peers: each pings through its own Child SA on its own
    connection; the responder's status shows three endpoints on TCP, and killing one peer's
    connection leaves the other two untouched."""
    import json

    from simpletun import keys

    from .tunnel import simpletun_cmd

    def cmd(ns, *args):
        return lab.run(ns, [simpletun_cmd(), *args], check=False, timeout=40)

    resp = tmp_path / "a" / "st0.toml"
    resp.parent.mkdir()
    head = (
        '[interface]\nkey_exchange = "ikev2"\ntransport = "tcp"\n'
        'address = ["10.254.1.1/24", "10.254.1.2/24", "10.254.1.3/24"]\n'
        f'listen_address = "{VETH_A_ADDR}"\nlocal_id = "gw.example"\n'
    )
    text = head
    inits = []
    for i in (1, 2, 3):
        psk = tmp_path / f"p{i}.key"
        psk.write_text(keys.encode_key(keys.generate_key()) + "\n")
        psk.chmod(0o600)
        ip = VETH_B_ADDR if i == 1 else f"10.250.0.{10 + i}"
        if i > 1:
            lab.run(lab.ns_b, ["ip", "addr", "add", f"{ip}/24", "dev", "veth-b"])
        text += (
            f'\n[[peer]]\nname = "p{i}"\nidentity = "p{i}.example"\n'
            f'allowed_ips = ["10.254.{10 + i}.0/24"]\nlocal_ips = ["10.254.1.{i}/32"]\n'
            f'psk_file = "{psk}"\n'
        )
        f = tmp_path / "b" / f"st{i}.toml"
        f.parent.mkdir(exist_ok=True)
        f.write_text(
            f'[interface]\nname = "st{i}"\nkey_exchange = "ikev2"\ntransport = "tcp"\n'
            f'address = ["10.254.{10 + i}.1/24"]\nlisten_address = "{ip}"\n'
            f'local_id = "p{i}.example"\n\n[[peer]]\nname = "gw"\nidentity = "gw.example"\n'
            f'endpoint = "{VETH_A_ADDR}"\nallowed_ips = ["10.254.1.{i}/32"]\npsk_file = "{psk}"\n'
        )
        inits.append((f"st{i}", f, ip))
    resp.write_text(text)
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
    assert cmd(lab.ns_a, "up", str(resp)).returncode == 0
    monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
    try:
        for _name, f, _ip in inits:
            up = cmd(lab.ns_b, "up", str(f))
            assert up.returncode == 0, up.stderr
        for i in (1, 2, 3):
            lab.wait_ping(lab.ns_b, f"10.254.1.{i}", 20)
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
        s = json.loads(cmd(lab.ns_a, "status", "st0", "--json").stdout)
        peers = {p["name"]: p for p in s["peers"]}
        assert set(peers) == {"p1", "p2", "p3"}
        eps = {p["endpoint"].rpartition(":")[0] for p in peers.values()}
        assert eps == {VETH_B_ADDR, "10.250.0.12", "10.250.0.13"}, eps
        assert all(p["child_sas"] for p in peers.values()), peers
        assert s["ike_counters"]["tcp_accepted"] >= 3, s["ike_counters"]
        sa_of = {n: p["ike_sa"] for n, p in peers.items()}
        # p2's connection is killed: p2 reconnects, p1 and p3 keep theirs
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
        kill = lab.run(lab.ns_b, ["ss", "-K", "src", "10.250.0.12", "dport", "=", "4500"])
        assert "10.250.0.12" in kill.stdout.decode(), kill.stdout
        for i in (1, 2, 3):
            lab.wait_ping(lab.ns_b, f"10.254.1.{i}", 20)
            sent, received, _ = lab.ping(lab.ns_b, f"10.254.1.{i}", count=5, interval=0.05)
            assert (sent, received) == (5, 5), i
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
        s2 = json.loads(cmd(lab.ns_a, "status", "st0", "--json").stdout)
        peers2 = {p["name"]: p for p in s2["peers"]}
        assert {n: p["ike_sa"] for n, p in peers2.items()} == sa_of
        assert peers2["p1"]["endpoint"] == peers["p1"]["endpoint"]
        assert peers2["p3"]["endpoint"] == peers["p3"]["endpoint"]
        assert peers2["p2"]["endpoint"] != peers["p2"]["endpoint"]
    finally:
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-b"))
        for name, _f, _ip in inits:
            cmd(lab.ns_b, "down", name)
        monkeypatch.setenv("SIMPLETUN_RUN_DIR", str(tmp_path / "run-a"))
        cmd(lab.ns_a, "down", "st0")
