"""simpletun.xfrm's encoding (no root): byte-identical to what iproute2's `ip xfrm` sends
(tests/vectors/xfrm_ip.txt, captured with strace), decode round trips, input checks."""

from __future__ import annotations

import pytest

from simpletun import xfrm
from simpletun._errors import ConfigError
from tests.xfrm import vectors

REF = vectors.load()


@pytest.mark.parametrize("name", sorted(vectors.ours()))
def test_bytes_equal_iproute2(name):
    args, t, f, payload = REF[name]
    assert vectors.encoded(name) == (t, f, payload), f"ip xfrm {args}"


def test_every_vector_has_an_encoding():
    assert set(REF) == set(vectors.ours())


@pytest.mark.parametrize("key", [bytes(16), bytes(24), bytes(range(32))])
@pytest.mark.parametrize("window,esn", [(0, False), (32, False), (64, False), (4096, True)])
def test_sa_round_trip(key, window, esn):
    sa = xfrm.SA(
        "2001:db8::1",
        "2001:db8::2",
        0x01000000,
        key,
        bytes(range(100, 132)),
        reqid=9,
        replay_window=window,
        esn=esn,
        encap=xfrm.Encap(4500, 4501),
        if_id=3,
        seq=5,
        seq_hi=1 if esn else 0,
    )
    st = xfrm.parse_sa(xfrm.decode(xfrm.encode(xfrm.build_newsa(sa), xfrm.XFRM_MSG_NEWSA, 5)))
    assert (st.src, st.dst, st.spi, st.reqid) == (sa.src, sa.dst, sa.spi, 9)
    assert (st.enc_alg, st.enc_key) == ("cbc(aes)", key)
    assert (st.auth_alg, st.auth_key, st.icv_bits) == ("hmac(sha256)", sa.auth_key, 128)
    assert st.encap == xfrm.Encap(4500, 4501)
    assert st.if_id == 3
    assert st.replay_window == window
    assert bool(st.flags & xfrm.XFRM_STATE_ESN) == esn
    if window > 32 or esn:
        assert st.esn["seq"] == 5 and st.esn["seq_hi"] == sa.seq_hi


def test_policy_round_trip():
    pol = xfrm.Policy(
        xfrm.Selector.of("10.1.0.0/24", "10.2.0.0/16", proto=17, dport=53),
        "in",
        (xfrm.Template("192.0.2.2", "192.0.2.1", reqid=2), xfrm.Template("::1", "::2", 3)),
        priority=7,
        if_id=4,
    )
    st = xfrm.parse_policy(
        xfrm.decode(xfrm.encode(xfrm.build_newpolicy(pol), xfrm.XFRM_MSG_NEWPOLICY, 5))
    )
    assert (st.selector, st.dir, st.priority, st.if_id) == (pol.selector, "in", 7, 4)
    assert st.templates == list(pol.templates)


def test_counters_use_simpletun_names():
    st = xfrm.SAState("a", "b", 1, 0, 1, 2, 0, 32, bytes=100, packets=2, replay=1)
    st.replay_window_drops, st.integrity_failed = 2, 5
    assert st.counters("in") == {
        "decap_packets": 2,
        "decap_bytes": 100,
        "drop_replay": 3,
        "drop_auth": 5,
    }
    assert set(st.counters("out")) == {"encap_packets", "encap_bytes", "drop_replay", "drop_auth"}


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(enc_key=bytes(15)), "AES key is 15 bytes; use 16, 24 or 32"),
        (dict(auth_key=bytes(20)), "HMAC-SHA-256 key is 20 bytes; use 32"),
        (dict(replay_window=8192), "replay window 8192 is out of range; use 0 to 4096"),
        (dict(esn=True), "ESN needs a replay window"),
        (dict(spi=5), "SPI 0x5 is out of range"),
        (dict(dst="::1"), "different families"),
    ],
)
def test_bad_sa_is_a_config_error(kw, fragment):
    args = dict(src="192.0.2.1", dst="192.0.2.2", spi=0x100, enc_key=bytes(16), auth_key=bytes(32))
    args.update(kw)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        xfrm.SA(**args)


def test_esp_missing_message_names_option_and_fallback():
    import socket

    msg4 = xfrm.esp_missing_message(socket.AF_INET)
    msg6 = xfrm.esp_missing_message(socket.AF_INET6)
    assert "CONFIG_INET_ESP " in msg4 and "--dataplane userspace" in msg4
    assert "CONFIG_INET6_ESP" in msg6 and "\n" not in msg6
