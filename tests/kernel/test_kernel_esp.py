"""simpletun's ESP against the Linux kernel's own ESP (xfrm), in a qemu guest running Debian's
kernel (this machine's kernel has no ESP). The guest kernel is configured with simpletun.xfrm;
the simpletun side is simpletun's Rust ESP core behind a TUN device (tests/kernel/peer.py).

One boot carries all scenarios (raw ESP and ESP-in-UDP, AES-128 and AES-256, ESN crossing
2^32); each test below checks one property of that run. The boot takes about a minute of
emulation (reported in the "netns checks" summary).
"""

from __future__ import annotations

import pytest

from .harness import boot, missing_prerequisites
from .scenarios import ESN_START, SCENARIOS, TRANSFER_BYTES

ESN_FLAG = 128


def _require() -> None:
    import os

    missing = missing_prerequisites()
    if not missing:
        return
    reason = "kernel-ESP harness prerequisites missing: " + "; ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


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


def _peer(run, sc) -> dict:
    return run.peer["pairs"][sc.name]


IDS = [sc.name for sc in SCENARIOS]


def test_boot(run, checked):
    checked.append(
        f"guest kernel {run.one('START')['kernel']}: qemu run {run.seconds:.0f} s "
        f"(scenarios {run.one('END')['seconds']} s of it)"
    )


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_ping_and_transfer(run, sc, checked):
    g = _guest(run, sc)
    assert g["ping_rc"] == 0, g["ping_tail"]
    assert "3 received" in g["ping_tail"][0]
    t = g["transfer"]
    assert "error" not in t, t
    assert t["bytes"] == TRANSFER_BYTES
    assert t["echoed_sha256"] == t["sent_sha256"]
    assert t["sent_sha256"] in run.peer["echo_sha256"]  # what the host side received
    checked.append(f"{sc.name}: ping 3/3, {TRANSFER_BYTES} B echoed, SHA-256 equal on both ends")


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_transport_on_the_wire(run, sc):
    """The kernel's packets reached simpletun over the scenario's transport only."""
    assert set(_peer(run, sc)["rx_via"]) == {sc.transport}
    assert run.peer["unknown_spi"] == 0


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_counters_agree(run, sc, checked):
    """Every packet one side sent was accepted by the other (bytes too), except the replay and
    forgery each side injected on the wire, which the other counted under the same names."""
    g, p = _guest(run, sc), _peer(run, sc)
    k_in, k_out = g["kernel_in"], g["kernel_out"]
    rx, tx = p["rx_stats"], p["tx_stats"]
    assert "error" not in g["injected"], g["injected"]
    assert (k_in["drop_replay"], k_in["drop_auth"]) == (1, 1)
    assert (rx["drop_replay"], rx["drop_auth"]) == (1, 1)
    # kernel -> simpletun: every packet decapsulated, same inner bytes.
    assert k_out["encap_packets"] == rx["decap_packets"] > 0
    assert k_out["encap_bytes"] == rx["decap_bytes"]
    # simpletun -> kernel: all but the forged one (its inner bytes: the 2nd packet's).
    assert k_in["decap_packets"] == tx["encap_packets"] - 1
    assert 0 < tx["encap_bytes"] - k_in["decap_bytes"] <= 1400
    assert g["kernel_out_keys_match"]
    checked.append(
        f"{sc.name}: kernel out {k_out['encap_packets']} = simpletun in; simpletun out "
        f"{tx['encap_packets']} = kernel in {k_in['decap_packets']} + 1 forged; replay/forgery "
        "counted 1/1 by both"
    )


@pytest.mark.parametrize("sc", [s for s in SCENARIOS if s.esn], ids=lambda s: s.name)
def test_esn_crosses_2_32(run, sc, checked):
    g, p = _guest(run, sc), _peer(run, sc)
    assert g["kernel_out"]["flags"] & ESN_FLAG and g["kernel_in"]["flags"] & ESN_FLAG
    assert g["kernel_out"]["esn"]["oseq_hi"] == 1  # the kernel sent past 2^32 ...
    assert g["kernel_in"]["esn"]["seq_hi"] == 1  # ... and accepted simpletun's past 2^32
    assert p["tx_seq"] > 2**32 and p["rx_highest_seq"] > 2**32
    assert p["tx_seq"] - ESN_START == p["tx_stats"]["encap_packets"]
    checked.append(
        f"{sc.name}: seq {ESN_START} -> {p['tx_seq']} (simpletun out), "
        f"-> {p['rx_highest_seq']} (kernel out), both sides accepted"
    )


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_cleanup_in_guest(run, sc):
    g = _guest(run, sc)
    assert sorted(g["dumped_spis"]) == sorted([sc.spi_g2h, sc.spi_h2g])
    assert g["dumped_policies"] == 2
    assert g["left_after_cleanup"] == 0


def test_xfrm_interface(run):
    x = run.one("XFRMI")
    assert "error" not in x, x
    assert x["if_id_7"] and x["ifindex"] > 0


def test_bench_kernel_in_guest(run, checked):
    """scripts/bench_kernel.py runs in the guest (correctness only; its figures are emulated):
    the kernel-ESP row carries iperf3 and ping traffic between two namespaces keyed from one
    manual key file, and the output says the figures are emulated."""
    b = run.one("BENCH")
    assert "error" not in b, b.get("error")
    assert b["rc"] == 0 and b["emulated"] is True
    rows = {r["config"]: r for r in b["rows"]}
    assert rows["bare veth"]["gbps"] > 0
    k = rows["kernel ESP (xfrm)"]
    assert "skipped" not in k, k
    assert k["gbps"] > 0 and k["pings"] == "3/3"
    assert k["sa_counters"]["encap_packets"] > 100 and k["sa_counters"]["drop_auth"] == 0
    assert "skipped" in rows["simpletun userspace ESP"]
    checked.append(
        f"bench in guest (emulated): kernel ESP {k['gbps']:.3f} Gbit/s, "
        f"{k['sa_counters']['encap_packets']} packets on the client's out SA"
    )
