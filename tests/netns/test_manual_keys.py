"""Manual keying on the userspace data plane (``--manual-keys FILE``, no handshake) between two
namespaces: ESP-in-UDP and raw ESP, AES-128 and AES-256, one case with ESN preset just below
2^32 (the key file's ``seq``) so the traffic crosses it. Each side starts traffic (the server
pings first, to the client's fixed ``--peer`` address), a 2 MiB SHA-256-checked transfer, the
wire decoded by tcpdump (only the file's SPIs, the first sequence number is the file's
``seq + 1``, ESN: the low 32 bits wrap), and each side's packet counters equal to what the
other sent."""

from __future__ import annotations

import os

import pytest

from simpletun import manual_keys

from .dgtunnel import decode_esp
from .lab import TUN_A_ADDR, TUN_B_ADDR, VETH_A, VETH_A_ADDR, VETH_B_ADDR, Capture
from .tunnel import DEV, session_counters, simpletun_cmd

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("tunnel_ready")]

ESN_START = 2**32 - 4
CASES = [("udp", 128, False), ("raw", 256, False), ("udp", 256, True), ("raw", 128, True)]


def write_keys(path, transport: str, bits: int, esn: bool) -> str:
    text = manual_keys.generate(
        key_bits=bits,
        replay_window=1024 if esn else 64,
        esn=esn,
        transport="esp-in-udp" if transport == "udp" else "esp",
        seq=ESN_START if esn else 0,
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return str(path)


def spawn_pair(lab, mk: str, transport: str, *, server_peer: bool = True):
    common = ["-i", DEV, "-d", "--transport", transport, "--manual-keys", mk, "--mtu", "1400"]
    s_argv = [simpletun_cmd(), *common, "-s", "--addr", f"{TUN_A_ADDR}/24"]
    if server_peer:
        s_argv += ["--peer", VETH_B_ADDR]
    server = lab.spawn(lab.ns_a, s_argv, name="server")
    server.wait_for_output(r"manual keys", timeout=15)
    c_argv = [simpletun_cmd(), *common, "-c", VETH_A_ADDR, "--addr", f"{TUN_B_ADDR}/24"]
    client = lab.spawn(lab.ns_b, c_argv, name="client")
    client.wait_for_output(r"manual keys", timeout=15)
    return server, client


def logs(*procs) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.stderr()[-3000:]}" for p in procs)


@pytest.mark.parametrize(
    ("transport", "bits", "esn"),
    CASES,
    ids=[f"{t}-aes{b}{'-esn' if e else ''}" for t, b, e in CASES],
)
def test_manual_keys_userspace_both_ways(lab, tmp_path, checked, transport, bits, esn):
    mk_path = write_keys(tmp_path / "mk.toml", transport, bits, esn)
    mk = manual_keys.load(mk_path)
    bpf = "ip proto 50" if transport == "raw" else "udp port 4500"
    cap = Capture(lab, lab.ns_a, VETH_A, tmp_path / "wire.pcap", bpf)
    server, client = spawn_pair(lab, mk_path, transport)
    try:
        # the server speaks first: no handshake, the client's address is fixed (--peer)
        sent, got, _ = lab.ping(lab.ns_a, TUN_B_ADDR, count=3, interval=0.1)
        assert got == sent == 3, logs(server, client)
        sent, got, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=3, interval=0.1)
        assert got == sent == 3, logs(server, client)
        tx, rx = lab.tcp_transfer((lab.ns_b, TUN_B_ADDR), (lab.ns_a, TUN_A_ADDR), 2 << 20)
        assert tx == rx, logs(server, client)
        # one more round trip each way: everything sent before it has arrived (FIFO per
        # direction), so the counters read at exit are of a quiet tunnel
        for ns, dst in ((lab.ns_b, TUN_A_ADDR), (lab.ns_a, TUN_B_ADDR)):
            assert lab.ping(ns, dst, count=1)[1] == 1
    finally:
        server.stop()
        client.stop()
    path = cap.stop()
    rows = decode_esp(str(path))
    by_spi: dict[int, list[int]] = {}
    for _src, _dst, spi, seq, line in rows:
        assert ("UDP-encap" in line) == (transport == "udp"), line
        by_spi.setdefault(spi, []).append(seq)
    c2s, s2c = mk.client_to_server.spi, mk.server_to_client.spi
    assert set(by_spi) == {c2s, s2c}
    first = (ESN_START + 1) & 0xFFFFFFFF if esn else 1
    for spi, seqs in by_spi.items():
        assert seqs[0] == first, f"SPI {spi:#x} starts at {seqs[0]:#x}"
        if esn:  # the low 32 bits on the wire wrapped: the traffic crossed 2^32
            assert 0 in seqs or 1 in seqs, f"SPI {spi:#x} did not cross 2^32"
    (sc,) = session_counters(server.stderr())
    (cc,) = session_counters(client.stderr())
    assert sc["tx_packets"] == cc["rx_packets"] > 0 and cc["tx_packets"] == sc["rx_packets"] > 0
    checked.append(
        f"{transport} AES-{bits}{' ESN from 2^32-4' if esn else ''}: pings both ways, 2 MiB "
        f"SHA-256 equal, {len(rows)} ESP packets on SPIs {c2s:#x}/{s2c:#x}, first seq "
        f"{first:#x}, counters equal across the ends"
    )


def test_manual_keys_userspace_server_learns_client(lab, tmp_path):
    """Without --peer, the userspace server answers the client's address once it has heard an
    authentic packet from it."""
    mk_path = write_keys(tmp_path / "mk.toml", "udp", 128, False)
    server, client = spawn_pair(lab, mk_path, "udp", server_peer=False)
    try:
        sent, got, _ = lab.ping(lab.ns_b, TUN_A_ADDR, count=3, interval=0.1)
        assert got == sent == 3, logs(server, client)
    finally:
        server.stop()
        client.stop()
