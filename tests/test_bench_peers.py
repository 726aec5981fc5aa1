"""The pure parts of ``bench-tunnel.sh --peers`` (scripts/bench_peers.py, bench_tunnel.py):
version parsing, the OpenVPN and ``wg set`` command lines, device names, the throw-away PKI,
per-round ratios and the table's "not run" line. No root, nothing is started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_peers  # noqa: E402
import bench_tunnel  # noqa: E402


def test_versions_from_each_programs_version_output():
    ovpn = "OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO]\nlibrary versions: x\n"
    assert bench_peers.parse_version("openvpn", ovpn) == "2.6.14"
    wggo = "wireguard-go v0.0.20220316\n\nUserspace WireGuard daemon for linux-amd64.\n"
    assert bench_peers.parse_version("wireguard-go", wggo) == "0.0.20220316"
    assert bench_peers.parse_version("boringtun", "boringtun 0.7.1\n") == "0.7.1"
    assert bench_peers.parse_version("boringtun", "error: unknown flag") is None
    assert bench_peers.row_name("wireguard-go", "0.0.20220316") == (
        "wireguard-go 0.0.20220316 (Debian, pre-offload)"
    )
    assert bench_peers.row_name("openvpn", None) == "OpenVPN UDP AES-256-GCM"


def test_openvpn_is_udp_aes256gcm_tls_without_dco():
    pki = {"ca": Path("/t/ca.crt"), "cert": Path("/t/s.crt"), "key": Path("/t/s.key")}
    srv = bench_peers.openvpn_argv(
        "server", "prov1a", "10.250.0.1", "10.250.0.2", ("10.251.0.1", "10.251.0.2"), pki
    )
    cli = bench_peers.openvpn_argv(
        "client", "prov1b", "10.250.0.2", "10.250.0.1", ("10.251.0.2", "10.251.0.1"), pki
    )

    def opt(argv, name, n=1):
        i = argv.index(name)
        return argv[i + 1 : i + 1 + n]

    for argv in (srv, cli):
        assert opt(argv, "--proto") == ["udp"]
        assert opt(argv, "--data-ciphers") == ["AES-256-GCM"]
        assert "--disable-dco" in argv and "--secret" not in argv
        assert opt(argv, "--tun-mtu") == [str(bench_peers.PEER_MTU)]
    assert "--tls-server" in srv and opt(srv, "--dh") == ["none"] and "--tls-client" in cli
    assert opt(srv, "--ifconfig", 2) == ["10.251.0.1", "10.251.0.2"]
    assert opt(cli, "--remote", 2) == ["10.250.0.1", str(bench_peers.OVPN_PORT)]
    assert opt(srv, "--cert") == ["/t/s.crt"]


def test_wg_set_names_the_other_end_as_only_peer():
    argv = bench_peers.wg_set_argv(
        "prwg1a", Path("/t/a.key"), 51820, "PUBKEY=", "10.251.0.2", "10.250.0.2:51820"
    )
    assert argv == [
        *("wg", "set", "prwg1a", "listen-port", "51820", "private-key", "/t/a.key"),
        *("peer", "PUBKEY=", "allowed-ips", "10.251.0.2/32", "endpoint", "10.250.0.2:51820"),
    ]


def test_device_names_fit_ifnamsiz_and_differ_per_end_and_peer():
    names = set()
    for peer in bench_peers.PEERS:
        a, b = bench_peers.dev_names(peer, 4194304)
        assert a != b and len(a) <= 15 and len(b) <= 15 and a.startswith("pr")
        names |= {a, b}
    assert len(names) == 2 * len(bench_peers.PEERS)


def test_one_line_takes_the_last_line_shortened():
    assert bench_peers.one_line("a\nERROR: no tun\n\n") == "ERROR: no tun"
    assert bench_peers.one_line("") == "no output"
    assert len(bench_peers.one_line("x" * 500)) == 160


def test_throwaway_pki_verifies(tmp_path):
    pki = bench_peers.make_pki(tmp_path)
    for role in ("server", "client"):
        p = pki[role]
        proc = subprocess.run(
            ["openssl", "verify", "-CAfile", str(p["ca"]), str(p["cert"])],
            capture_output=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert p["key"].exists()
    assert bench_peers.make_pki(tmp_path) == pki  # made once


def test_ratios_are_medians_of_per_round_ratios_skipping_failed_rounds():
    def row(g, c):
        return {"gbps": g, "cpu_per_gb": c}

    rounds = [
        [row(10, None), row(2.0, 4.0), row(1.0, 20.0)],
        [row(10, None), row(3.0, 4.0), {"error": "x"}],
        [row(10, None), row(2.4, 5.0), row(0.8, 20.0)],
    ]
    tput, cpu = bench_peers.ratios(rounds, 1, 2)
    assert tput == 2.5  # median of 2.0 and 3.0; the round where the peer failed is left out
    assert cpu == (0.2 + 0.25) / 2
    assert bench_peers.ratios([[row(1, 1), {"error": "x"}]], 0, 1) is None


def test_table_says_why_a_peer_did_not_run():
    summary = bench_tunnel.summarize(
        [
            [
                {"config": "bare veth", "gbps": 10.0, "rtt1": 0.05, "rtt20": 0.05, "rtt100": 0.05},
                {"config": "boringtun 0.7.1", "error": "boringtun-cli is not installed"},
            ]
        ]
    )
    lines = bench_tunnel.table(summary)
    assert lines[-1].split() == "boringtun 0.7.1 not run: boringtun-cli is not installed".split()
    assert lines[2].startswith("bare veth")
