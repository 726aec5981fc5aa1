"""simpletun.xfrm against this machine's own kernel (XFRM netlink, no ESP), in a lab namespace:
policies added/dumped/deleted for real, selector matching seen in XfrmOutNoStates, SAs refused
with the one-line ESP-missing error (or added/got/deleted where the kernel has ESP), messages
re-captured from the installed `ip xfrm` equal to the stored vectors."""

from __future__ import annotations

import errno
import socket

import pytest

from simpletun import xfrm
from simpletun._errors import ConfigError
from tests.xfrm import capture, vectors

from .conftest import require
from .lab import VETH_A_ADDR, VETH_B_ADDR

pytestmark = pytest.mark.netns

OUT = xfrm.Policy(
    xfrm.Selector.of("10.99.1.0/24", "10.99.2.0/24"),
    "out",
    (xfrm.Template(VETH_A_ADDR, VETH_B_ADDR, reqid=1),),
    priority=10,
)
IN = xfrm.Policy(
    xfrm.Selector.of("10.99.2.0/24", "10.99.1.0/24"),
    "in",
    (xfrm.Template(VETH_B_ADDR, VETH_A_ADDR, reqid=2),),
)


def _kernel_has_esp(ns: str) -> bool:
    try:
        xfrm.check_esp(netns=ns)
    except xfrm.KernelEspMissing:
        return False
    return True


def test_policies_add_dump_delete(lab, checked):
    ns = lab.ns_a
    xfrm.add_policy(OUT, netns=ns)
    xfrm.add_policy(IN, netns=ns)
    got = {p.dir: p for p in xfrm.dump_policies(netns=ns)}
    assert set(got) == {"in", "out"}
    assert got["out"].selector == OUT.selector and got["out"].priority == 10
    assert got["out"].templates == list(OUT.templates)
    assert got["in"].templates == list(IN.templates)
    # iproute2 decodes what we installed the same way.
    text = lab.run(ns, ["ip", "xfrm", "policy"]).stdout.decode()
    assert "src 10.99.1.0/24 dst 10.99.2.0/24" in text and "dir out priority 10" in text
    assert f"tmpl src {VETH_A_ADDR} dst {VETH_B_ADDR}" in text and "reqid 1 mode tunnel" in text
    with pytest.raises(xfrm.XfrmError) as e:
        xfrm.add_policy(OUT, netns=ns)
    assert e.value.code == errno.EEXIST
    xfrm.add_policy(
        xfrm.Policy(OUT.selector, "out", OUT.templates, priority=20), netns=ns, update=True
    )
    assert {p.dir: p.priority for p in xfrm.dump_policies(netns=ns)}["out"] == 20
    xfrm.delete_policy(OUT.selector, "out", netns=ns)
    assert [p.dir for p in xfrm.dump_policies(netns=ns)] == ["in"]
    xfrm.delete_policy(IN.selector, "in", netns=ns)
    assert xfrm.dump_policies(netns=ns) == []
    assert lab.run(ns, ["ip", "xfrm", "policy"]).stdout.decode().strip() == ""
    xfrm.add_policy(OUT, netns=ns)
    xfrm.add_policy(IN, netns=ns)
    xfrm.flush_policies(netns=ns)
    xfrm.flush_sas(netns=ns)
    assert xfrm.dump_policies(netns=ns) == []
    checked.append("2 policies added, dumped (ours and ip's view), updated, deleted, flushed")


def test_policy_bound_to_an_xfrm_interface_deleted_with_its_if_id(lab):
    """A policy with XFRMA_IF_ID (what the kernel data plane installs) is only found with its
    if_id: without it the kernel answers ENOENT (the policies stayed behind before), with it
    the policy goes; iproute2 agrees."""
    ns = lab.ns_a
    pol = xfrm.Policy(OUT.selector, "out", OUT.templates, if_id=0x5354)
    xfrm.add_policy(pol, netns=ns)
    with pytest.raises(xfrm.XfrmError) as e:
        xfrm.delete_policy(pol.selector, "out", netns=ns)
    assert e.value.code == errno.ENOENT
    assert "if_id 0x5354" in lab.run(ns, ["ip", "xfrm", "policy"]).stdout.decode()
    xfrm.delete_policy(pol.selector, "out", if_id=0x5354, netns=ns)
    assert xfrm.dump_policies(netns=ns) == []


def test_selector_matching_counts_out_no_states(lab, checked):
    """A packet matching an outbound policy without SA is dropped and counted by the kernel
    (XfrmOutNoStates); one outside the selector is not."""
    ns = lab.ns_a
    lab.run(ns, ["ip", "route", "add", "10.99.2.0/24", "via", VETH_B_ADDR])
    lab.run(ns, ["ip", "route", "add", "10.99.3.0/24", "via", VETH_B_ADDR])
    lab.run(ns, ["ip", "addr", "add", "10.99.1.1/32", "dev", "lo"])
    pol = xfrm.Policy(
        xfrm.Selector.of("10.99.1.0/24", "10.99.2.0/24", proto=17, dport=9),
        "out",
        (xfrm.Template(VETH_A_ADDR, VETH_B_ADDR, reqid=1),),
    )
    xfrm.add_policy(pol, netns=ns)

    def send(dst: str, port: int) -> None:
        s = lab.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("10.99.1.1", 0))
            try:
                s.sendto(b"x" * 10, (dst, port))
            except OSError:
                pass  # EAGAIN: no SA for the policy (the drop is what is counted)
        finally:
            s.close()

    def nostates() -> int:
        return xfrm.xfrm_stat(ns)["XfrmOutNoStates"]

    n0 = nostates()
    for _ in range(3):
        send("10.99.2.7", 9)
    n1 = nostates()
    send("10.99.3.7", 9)  # other destination
    send("10.99.2.7", 10)  # other port
    n2 = nostates()
    assert n1 - n0 == 3
    assert n2 == n1
    checked.append(f"XfrmOutNoStates +{n1 - n0} for 3 matching packets, +0 for 2 outside")


def test_sa_add_get_dump_delete_or_esp_missing(lab, checked):
    ns = lab.ns_a
    sa = xfrm.SA(
        VETH_A_ADDR,
        VETH_B_ADDR,
        0x01000000,
        bytes(range(32)),
        bytes(range(32, 64)),
        reqid=1,
        replay_window=4096,
        esn=True,
        encap=xfrm.Encap(4500, 4500),
    )
    if not _kernel_has_esp(ns):
        with pytest.raises(xfrm.KernelEspMissing) as e:
            xfrm.add_sa(sa, netns=ns)
        msg = str(e.value)
        assert isinstance(e.value, ConfigError)
        assert "CONFIG_INET_ESP" in msg and "--dataplane userspace" in msg and "\n" not in msg
        assert xfrm.dump_sas(netns=ns) == []
        checked.append(f"kernel without ESP: {msg}")
        return
    xfrm.add_sa(sa, netns=ns)
    st = xfrm.get_sa(sa.dst, sa.spi, sa.src, netns=ns)
    assert (st.enc_key, st.auth_key, st.replay_window) == (sa.enc_key, sa.auth_key, 4096)
    assert [s.spi for s in xfrm.dump_sas(netns=ns)] == [sa.spi]
    xfrm.delete_sa(sa.dst, sa.spi, sa.src, netns=ns)
    assert xfrm.dump_sas(netns=ns) == []
    checked.append("kernel with ESP: SA added, got, dumped, deleted")


def test_malformed_sa_refused_with_kernel_reason(lab):
    """Validation the kernel does before the ESP type lookup: a 96-bit ICV request with a bad
    truncation length is refused with its extack text, not taken as 'ESP missing'."""
    sa = xfrm.SA(VETH_A_ADDR, VETH_B_ADDR, 0x01000001, bytes(16), bytes(32))
    msg = xfrm.build_newsa(sa)
    msg["attrs"][0][1]["alg_trunc_len"] = 300
    with pytest.raises(xfrm.XfrmError) as e:
        xfrm._request(msg, xfrm.XFRM_MSG_NEWSA, xfrm.FLAGS_ADD, lab.ns_a, "add SA")
    assert e.value.code == errno.EINVAL
    assert not isinstance(e.value, xfrm.KernelEspMissing)


def test_installed_iproute2_still_sends_the_vectors(checked):
    """Re-capture every case from the installed `ip xfrm`: the stored vectors are current."""
    require(capture.available())
    ref = vectors.load()
    for name, args in capture.CASES:
        got = capture.capture(args)
        assert len(got) == 1, name
        assert got[0] == ref[name][1:], f"ip xfrm {args}"
    checked.append(f"{len(capture.CASES)} `ip xfrm` captures equal the stored vectors")


@pytest.mark.parametrize("transport", ["esp", "esp-in-udp"])
@pytest.mark.parametrize("bits,esn", [(128, False), (256, True)])
def test_manual_keys_sas_equal_ip_xfrm(transport, bits, esn):
    """The SAs a manual key file gives the kernel data plane are byte for byte what iproute2
    sends for the file's equivalent `ip xfrm state add` commands."""
    from simpletun import manual_keys

    require(capture.available())
    keys = manual_keys.parse(manual_keys.generate(key_bits=bits, esn=esn, transport=transport))
    sas = keys.xfrm_sas("client", "192.0.2.2", "192.0.2.1", reqid=6)
    cmds = keys.ip_xfrm_commands("client", "192.0.2.2", "192.0.2.1", reqid=6)
    for sa, cmd in zip(sas, cmds, strict=True):
        args = cmd.removeprefix("ip xfrm ").replace("'", "")
        (got,) = capture.capture(args)
        ours = xfrm.encode(xfrm.build_newsa(sa), xfrm.XFRM_MSG_NEWSA, xfrm.FLAGS_ADD)
        assert got == (xfrm.XFRM_MSG_NEWSA, xfrm.FLAGS_ADD, ours[16:]), cmd
