"""Known answers for the IKEv2 key schedule (tests/vectors/ikev2_kdf.txt): a CAVS-format
SP 800-135 IKEv2 KDF sample (HMAC-SHA-1, exercising prf+ generically) and values dumped by
strongSwan 5.9.8's charon at log level 4 in runs against simpletun (HMAC-SHA-256, both DH
groups): SKEYSEED, SK_*, the PSK AUTH and the Child SA KEYMAT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_vectors import parse_vectors

from simpletun.ike import const as c
from simpletun.ike import crypto as cr

VECTORS = parse_vectors(
    (Path(__file__).parent / "vectors" / "ikev2_kdf.txt").read_text(), "ikev2_kdf.txt"
)
CAVS = [v for v in VECTORS if "hash" in v]
CHARON = [v for v in VECTORS if "hash" not in v]


def test_file_has_both_kinds():
    assert len(CAVS) >= 1 and len(CHARON) >= 2


@pytest.mark.parametrize("v", CAVS, ids=lambda v: v["case"])
def test_cavs_sp800_135(v):
    sha1 = hashlib.sha1
    seed = cr.skeyseed(v["ni"], v["nr"], v["g_ir"], sha1)
    assert seed == v["skeyseed"]
    n = len(v["dkm"])
    dkm = cr.prf_plus(seed, v["ni"] + v["nr"] + v["spi_i"] + v["spi_r"], n, sha1)
    assert dkm == v["dkm"]
    sk_d = dkm[:20]
    assert cr.prf_plus(sk_d, v["ni"] + v["nr"], n, sha1) == v["dkm_child"]
    assert cr.prf_plus(sk_d, v["g_ir_new"] + v["ni"] + v["nr"], n, sha1) == v["dkm_child_dh"]
    assert cr.rekey_skeyseed(sk_d, v["g_ir_new"], v["ni"], v["nr"], sha1) == v["skeyseed_rekey"]


def _suite(v) -> cr.IkeSuite:
    dh = c.DH_ECP256 if "ECP_256" in v["case"] else c.DH_CURVE25519
    return cr.cbc_suite(len(v["sk_ei"]) * 8, dh)


@pytest.mark.parametrize("v", CHARON, ids=lambda v: v["case"])
def test_charon_ike_keys(v):
    seed = cr.skeyseed(v["ni"], v["nr"], v["g_ir"])
    assert seed == v["skeyseed"]
    k = cr.ike_keys(seed, _suite(v), v["ni"], v["nr"], v["spi_i"], v["spi_r"])
    for name in ("d", "ai", "ar", "ei", "er", "pi", "pr"):
        assert getattr(k, name) == v[f"sk_{name}"], name


@pytest.mark.parametrize("v", CHARON, ids=lambda v: v["case"])
def test_charon_psk_auth(v):
    # octets = first message | peer's nonce | prf(SK_p, ID'): the initiator's with Nr and
    # SK_pi, the responder's with Ni and SK_pr
    oi, orr = v["octets_i"], v["octets_r"]
    assert oi[-32:] == cr.prf(v["sk_pi"], v["id_i"]) and oi[-64:-32] == v["nr"]
    assert orr[-32:] == cr.prf(v["sk_pr"], v["id_r"]) and orr[-64:-32] == v["ni"]
    assert cr.psk_auth(v["psk"], oi) == v["auth_i"]
    assert cr.psk_auth(v["psk"], orr) == v["auth_r"]


@pytest.mark.parametrize("v", CHARON, ids=lambda v: v["case"])
def test_charon_child_keymat(v):
    suite = cr.ChildSuite(len(v["child_enc_i"]) * 8, False)
    k = cr.child_keys(v["sk_d"], suite, v["ni"], v["nr"])
    assert (k.enc_i, k.auth_i, k.enc_r, k.auth_r) == (
        v["child_enc_i"], v["child_integ_i"], v["child_enc_r"], v["child_integ_r"],
    )  # fmt: skip


def test_prf_plus_limit():
    with pytest.raises(ValueError):
        cr.prf_plus(b"k", b"s", 255 * 32 + 1)
