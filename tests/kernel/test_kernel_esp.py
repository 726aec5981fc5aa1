"""simpletun's userspace ESP against the Linux kernel's own ESP (xfrm), both ends the real
product: in a qemu guest running Debian's kernel (this machine's kernel has no ESP),
``simpletun up --foreground`` with ``dataplane = "kernel"`` configures the guest kernel; on the
host, ``simpletun up --foreground`` runs the userspace data plane; both from one manual key file
per scenario (tests/kernel/harness.py, guest_main.py).

One boot carries all scenarios (raw ESP and ESP-in-UDP, AES-128 and AES-256, ESN crossing
2^32); each test below checks one property of that run. The boot takes a minute or two of
emulation (reported in the "kernel ESP checks" summary).
"""

from __future__ import annotations

import pytest
from skipping import skip

from .harness import boot, missing_prerequisites
from .scenarios import ESN_START, IKE, SCENARIOS, TRANSFER_BYTES

ESN_FLAG = 128


def _require() -> None:
    missing = missing_prerequisites()
    if missing:
        skip("kernel-ESP harness prerequisites missing: " + "; ".join(missing))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _require()
    r = boot("all", tmp_path_factory.mktemp("kesp"))
    assert r.qemu_rc == 0, r.guest_log[-3000:]
    assert r.lines.get("END"), "guest did not finish:\n" + r.guest_log[-3000:]
    return r


def _guest(run, sc) -> dict:
    (res,) = [x for x in run.lines["RESULT"] if x["scenario"] == sc.name]
    assert "error" not in res, res["error"]
    return res


def _host(run, sc) -> dict:
    """The host end's ``simpletun status --json``."""
    st = run.host["status"][sc.host_ifname]
    assert "error" not in st, st["error"] + run.host["logs"][sc.host_ifname]
    return st


def _peer_status(st: dict) -> tuple[dict, dict, dict]:
    """(peer, out SA, in SA) of a one-peer status."""
    (peer,) = st["peers"]
    out, inn = peer["sas"]
    assert (out["direction"], inn["direction"]) == ("out", "in")
    return peer, out, inn


IDS = [sc.name for sc in SCENARIOS]


def test_boot(run, checked):
    checked.append(
        f"guest kernel {run.one('START')['kernel']}: qemu run {run.seconds:.0f} s "
        f"(scenarios {run.one('END')['seconds']} s of it)"
    )


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_ping_and_transfer_both_directions(run, sc, checked):
    """Each side starts traffic: the host pings the kernel end and sends it a transfer (echoed
    back), then the guest pings the host and sends its own; SHA-256 equal at both ends."""
    g = _guest(run, sc)
    h = run.host["host_initiated"].get(sc.n)
    assert h is not None, "the guest never reported its tunnel ready:\n" + g.get("tunnel_log", "")
    assert h["ping_rc"] == 0 and "3 received" in h["ping_tail"][0], h
    assert "error" not in h, h
    assert h["echoed_sha256"] == h["sent_sha256"] == g["host_transfer"]["sha256"]
    assert g["ping_rc"] == 0, g["ping_tail"]
    assert "3 received" in g["ping_tail"][0]
    t = g["transfer"]
    assert "error" not in t, t
    assert t["bytes"] == TRANSFER_BYTES
    assert t["echoed_sha256"] == t["sent_sha256"]
    assert t["sent_sha256"] in run.host["echo_sha256"]  # what the host side received
    checked.append(
        f"{sc.name}: host->kernel ping 3/3 + {TRANSFER_BYTES} B echoed, kernel->host ping 3/3 + "
        f"{TRANSFER_BYTES} B echoed, SHA-256 equal on both ends (tunnel up in "
        f"{g['start_seconds']} s emulated)"
    )


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_transport_on_the_wire(run, sc):
    """Decoded on the host's tap: both directions' ESP used the scenario's transport only, the
    scenario's SPIs (and no frame an SPI of none)."""
    seen = {k: v for k, v in run.host["wire"].items() if int(k.split()[1], 16) in
            (sc.spi_g2h, sc.spi_h2g)}  # fmt: skip
    assert set(seen) == {
        f"g2h {sc.spi_g2h:#x} {sc.transport}",
        f"h2g {sc.spi_h2g:#x} {sc.transport}",
    }, seen
    assert run.host["wire_unknown_spi"] == 0


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_counters_agree(run, sc, checked):
    """Every packet one side sent was accepted by the other (bytes too), except the replay and
    forgery each side injected on the wire, which the other counted under the same names, in
    its own status: the kernel's (mapped xfrm counters) and simpletun's."""
    g = _guest(run, sc)
    gp, g_out, g_in = _peer_status(g["status"])
    hp, h_out, h_in = _peer_status(_host(run, sc))
    assert "error" not in g["injected"], g["injected"]
    assert sc.n in run.host["injected"] or str(sc.n) in run.host["injected"]
    assert gp["drops"] == {"replay": 1, "auth": 1}, gp
    assert hp["drops"] == {"replay": 1, "auth": 1}, hp
    # the kernel's own figures agree with what its status shows
    assert g["kernel_in"]["drop_replay"] == 1 and g["kernel_in"]["drop_auth"] == 1
    assert gp["tx_packets"] == g["kernel_out"]["encap_packets"]
    # kernel -> simpletun: every packet decapsulated, same inner bytes.
    assert gp["tx_packets"] == hp["rx_packets"] > 0
    assert gp["tx_bytes"] == hp["rx_bytes"]
    # simpletun -> kernel: every packet decapsulated (the forgery was a wire copy, not sent
    # by simpletun).
    assert hp["tx_packets"] == gp["rx_packets"] > 0
    assert hp["tx_bytes"] == gp["rx_bytes"]
    assert g["kernel_keys_match"]
    assert g["kernel_if_id"] == [0x5354, 0x5354]
    assert run.host["wire"][f"g2h {sc.spi_g2h:#x} {sc.transport}"] == gp["tx_packets"] + 2
    checked.append(
        f"{sc.name}: kernel out {gp['tx_packets']} = simpletun in; simpletun out "
        f"{hp['tx_packets']} = kernel in; replay/forgery counted 1/1 by both statuses"
    )


@pytest.mark.parametrize("sc", [s for s in SCENARIOS if s.esn], ids=lambda s: s.name)
def test_esn_crosses_2_32(run, sc, checked):
    """Both directions started at the key file's seq = 2^32-4: each side sent past 2^32 and
    the other accepted it (its status shows the 64-bit numbers)."""
    g = _guest(run, sc)
    assert g["kernel_out"]["flags"] & ESN_FLAG and g["kernel_in"]["flags"] & ESN_FLAG
    assert g["kernel_out"]["esn"]["oseq_hi"] == 1  # the kernel sent past 2^32 ...
    assert g["kernel_in"]["esn"]["seq_hi"] == 1  # ... and accepted simpletun's past 2^32
    _, g_out, g_in = _peer_status(g["status"])
    hp, h_out, h_in = _peer_status(_host(run, sc))
    assert g_out["seq"] > 2**32 and g_in["highest_seq"] > 2**32
    assert h_out["seq"] > 2**32 and h_in["highest_seq"] > 2**32
    assert h_out["seq"] - ESN_START == h_out["packets"] == hp["tx_packets"]
    assert g_out["seq"] == h_in["highest_seq"]  # the kernel's last packet arrived last
    checked.append(
        f"{sc.name}: seq {ESN_START} -> {h_out['seq']} (simpletun out, kernel accepted), "
        f"-> {g_out['seq']} (kernel out, simpletun accepted)"
    )


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_status_and_cleanup(run, sc):
    """Both statuses name the data plane, transport and the file's SPIs; on SIGTERM both ends
    exit 0 and leave nothing: no SAs, no policies, no devices."""
    g = _guest(run, sc)
    gst, hst = g["status"], _host(run, sc)
    assert (gst["dataplane"], hst["dataplane"]) == ("kernel", "userspace")
    assert gst["transport"] == hst["transport"] == sc.cli_transport
    assert {gst["role"], hst["role"]} == {"server", "client"} and gst["role"] == sc.guest_role
    assert g["interface_kind"] == "xfrm"
    _, g_out, g_in = _peer_status(gst)
    _, h_out, h_in = _peer_status(hst)
    assert (g_out["spi"], g_in["spi"]) == (f"0x{sc.spi_g2h:08x}", f"0x{sc.spi_h2g:08x}")
    assert (h_out["spi"], h_in["spi"]) == (f"0x{sc.spi_h2g:08x}", f"0x{sc.spi_g2h:08x}")
    assert "manual keys" in gst["encryption"] and f"aes-{sc.key_bits}-cbc" in gst["encryption"]
    assert gst["encryption"] == hst["encryption"]
    assert sorted(g["dumped_spis"]) == sorted([sc.spi_g2h, sc.spi_h2g])
    assert g["dumped_policies"] == 2
    assert g["exit_rc"] == 0, g["tunnel_log"]
    assert g["left_after_exit"] == 0 and not g["interface_left"]
    assert run.host["exit"][sc.host_ifname] == 0, run.host["logs"][sc.host_ifname]
    assert not run.host["device_left"][sc.host_ifname]


def test_ikev2_keys_the_kernel_data_plane(run, checked):
    """simpletun's own IKEv2 (the guest end, initiator, ``dataplane = "kernel"``) negotiates a
    Child SA with a userspace IKEv2 end (the host) and installs it into the kernel: traffic
    both ways with equal SHA-256, both statuses show the same SPI pair (crossed), the kernel
    holds exactly those two SAs (UDP-encapsulated, on the xfrm interface), the ESP on the
    wire used them only, and SIGTERM leaves nothing behind."""
    g = _guest(run, IKE)
    assert g["status"]["up"], g["tunnel_log"]
    h = run.host["host_initiated"].get(IKE.n)
    assert h is not None and "error" not in h, (h, g["tunnel_log"])
    assert h["ping_rc"] == 0 and h["echoed_sha256"] == h["sent_sha256"]
    assert h["sent_sha256"] == g["host_transfer"]["sha256"]
    assert g["ping_rc"] == 0 and "3 received" in g["ping_tail"][0], g["ping_tail"]
    t = g["transfer"]
    assert "error" not in t and t["echoed_sha256"] == t["sent_sha256"], t
    assert t["sent_sha256"] in run.host["echo_sha256"]
    # right after the Child SA came up, both statuses show the same SPI pair (crossed)
    gst, hst = g["first_status"], h["status"]
    assert (gst["dataplane"], hst["dataplane"]) == ("kernel", "userspace")
    (gp0,), (hup,) = gst["peers"], hst["peers"]
    (gc,), (hc,) = gp0["child_sas"], hup["child_sas"]
    assert (gc["spi_in"], gc["spi_out"]) == (hc["spi_out"], hc["spi_in"])
    first = {int(gc["spi_in"], 16), int(gc["spi_out"], 16)}
    # after the rekey (the guest's rekey_time): one new Child SA, traffic on it, in the kernel
    assert g["ping_after_rekey_rc"] == 0
    t2 = g["transfer_after_rekey"]
    assert "error" not in t2 and t2["echoed_sha256"] == t2["sent_sha256"], t2
    (gp,) = g["status_after_rekey"]["peers"]
    (gc2,) = gp["child_sas"]
    assert gc2["outbound"] and gc2["packets_in"] > 0 and gc2["packets_out"] > 0
    now = {int(gc2["spi_in"], 16), int(gc2["spi_out"], 16)}
    assert not now & first
    assert {x["spi"] for x in g["kernel_sas"]} == now  # the old pair was deleted
    assert all(x["if_id"] == 0x5354 and x["encap"] for x in g["kernel_sas"])
    assert g["dumped_policies"] == 2
    assert first | now <= set().union(*run.host["wire_ike"].values())
    assert set(run.host["wire_ike"]) == {"g2h udp", "h2g udp"}
    assert not gp["drops"], gp
    # the counters at the end (the guest said goodbye: the host's Child SA is gone, its
    # counters stay), over both Child SAs: every packet one side sent, the other accepted
    (hp,) = _host(run, IKE)["peers"]
    assert not hp["child_sas"] and hp["ike_sa"] is None  # the guest's IKE delete arrived
    assert gp["tx_packets"] == hp["rx_packets"] > 0 and hp["tx_packets"] == gp["rx_packets"] > 0
    assert g["exit_rc"] == 0 and g["left_after_exit"] == 0 and not g["interface_left"]
    assert g["interface_kind"] == "xfrm"
    checked.append(
        f"IKEv2 kernel <-> userspace: Child SA {gc['spi_in']}/{gc['spi_out']} in both statuses "
        f"(up {g['up_seconds']} s emulated after start), pings + {TRANSFER_BYTES} B both ways "
        f"SHA-256 equal; rekeyed to {gc2['spi_in']}/{gc2['spi_out']} (only it left in the "
        f"kernel), traffic again; kernel out {gp['tx_packets']} = simpletun in over both; "
        "nothing left after SIGTERM"
    )


def test_xfrm_interface(run):
    x = run.one("XFRMI")
    assert "error" not in x, x
    assert x["if_id_7"] and x["ifindex"] > 0


def test_bench_kernel_in_guest(run, checked):
    """scripts/bench_kernel.py runs in the guest (correctness only; its figures are emulated):
    the kernel-ESP row and the simpletun row (the real CLI) carry iperf3 and ping traffic
    between two namespaces keyed from one manual key file, and the output says the figures
    are emulated."""
    b = run.one("BENCH")
    assert "error" not in b, b.get("error")
    assert b["rc"] == 0 and b["emulated"] is True
    rows = {r["config"]: r for r in b["rows"]}
    assert rows["bare veth"]["gbps"] > 0
    k = rows["kernel ESP (xfrm)"]
    assert "skipped" not in k, k
    assert k["gbps"] > 0 and k["pings"] == "3/3"
    assert k["sa_counters"]["encap_packets"] > 100 and k["sa_counters"]["drop_auth"] == 0
    u = rows["simpletun userspace ESP"]
    assert "skipped" not in u, u
    assert u["gbps"] > 0 and u["pings"] == "3/3"
    assert u["sa_counters"]["tx_packets"] > 100 and u["sa_counters"].get("drop_auth", 0) == 0
    checked.append(
        f"bench in guest (emulated): kernel ESP {k['gbps']:.3f} Gbit/s "
        f"({k['sa_counters']['encap_packets']} packets on the client's out SA), simpletun "
        f"userspace ESP {u['gbps']:.3f} Gbit/s ({u['sa_counters']['tx_packets']} packets), "
        "one key file"
    )
