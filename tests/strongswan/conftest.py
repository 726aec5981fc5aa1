"""Fixtures of the strongSwan interop suite: a two-namespace lab with charon (kernel-libipsec)
in namespace B and simpletun's sans-IO IKEv2 endpoint, driven over real UDP sockets, in A.

Needs root, iproute2 and strongSwan 5.9 (scripts/setup.sh installs it). When something is
missing the tests are skipped with the reason, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import logging

import pytest
from netns.lab import VETH_A_ADDR, VETH_B_ADDR, Lab, missing_prerequisites
from skipping import skip

from simpletun.ike import Endpoint, PeerConfig

from .charon import Charon, missing
from .driver import Driver

A_INNER = "10.78.1.0/24"
B_INNER = "10.78.2.0/24"
PSK = "simpletun-interop-psk-0123456789"


@pytest.fixture(autouse=True)
def _prerequisites():
    lacking = missing_prerequisites() + missing()
    if lacking:
        skip("strongSwan interop prerequisites missing: " + "; ".join(lacking))


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "lab", tag="ike")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def ike_log(caplog):
    caplog.set_level(logging.DEBUG, logger="simpletun.ike")
    return caplog


class Pair:
    """charon in B, our endpoint in A; ``peer`` is our PeerConfig for charon."""

    def __init__(self, lab, tmp_path, *, we_initiate=True, peer_kw=None, ep_kw=None, **charon_kw):
        charon_kw.setdefault("psk", PSK if "local_key_pem" not in charon_kw else None)
        self.charon = Charon(
            lab,
            lab.ns_b,
            tmp_path / "charon",
            local=VETH_B_ADDR,
            remote="%any" if we_initiate else VETH_A_ADDR,
            remote_id=charon_kw.pop("remote_id", VETH_A_ADDR),
            local_ts=B_INNER,
            remote_ts=A_INNER,
            inner_addr="10.78.2.1",
            **charon_kw,
        )
        kw = dict(
            name="charon",
            local_ts=[A_INNER],
            remote_ts=[B_INNER],
            local_addr=VETH_A_ADDR,
            remote_addr=(VETH_B_ADDR, 500) if we_initiate else None,
            retransmit_base=0.5,
            retransmit_tries=3,
        )
        if "local_key_pem" not in charon_kw:
            kw["psk"] = PSK.encode()
        kw.update(peer_kw or {})
        self.peer = PeerConfig(**kw)
        self.ep = Endpoint([self.peer], **(ep_kw or {}))
        self.drv = Driver(lab.ns_a, VETH_A_ADDR, self.ep)

    def close(self):
        self.drv.close()

    def up(self, timeout: float = 10.0):
        """Bring IKE SA + Child SA up (from whichever side initiates); returns our IkeSa."""
        if self.peer.remote_addr is not None:
            self.drv.handle(self.ep.initiate(self.peer, self.drv.now()))
        else:
            self.initiator_proc = self.charon.initiate()
        self.drv.run_until(
            lambda: self.drv.children or self.drv.downs() or self.drv.failures(),
            timeout,
            "the IKE SA and Child SA",
        )
        assert not self.drv.downs(), self.drv.downs()
        assert not self.drv.failures(), self.drv.failures()
        return self.ep.find("charon")[0]


@pytest.fixture
def pair(lab, tmp_path):
    made = []

    def make(**kw) -> Pair:
        p = Pair(lab, tmp_path / f"p{len(made)}", **kw)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()
