"""Generic helpers shared by the test modules. Keep this small."""

from __future__ import annotations

import pytest

#: Keys for tests that do not care which keys they use.
ENC_KEY = bytes(range(0x10, 0x20))
AUTH_KEY = bytes(range(0x40, 0x60))
SPI = 0x01000000


@pytest.fixture
def sa_pair():
    """Factory: ``sa_pair(**kw) -> (tx, rx, ref)``: two of our SAs with the same parameters (one
    sends, one receives) and the reference SA (``tests/esp_reference.py``) with the same keys.
    Keyword arguments are those of ``SecurityAssociation``; unset keys and SPI get the defaults
    above, the rest the extension's own defaults."""
    from esp_reference import RefSA

    from simpletun import SecurityAssociation

    def make(**kw):
        kw.setdefault("spi", SPI)
        kw.setdefault("enc_key", ENC_KEY)
        kw.setdefault("auth_key", AUTH_KEY)
        ref = RefSA(kw["spi"], kw["enc_key"], kw["auth_key"], kw.get("esn", False))
        return SecurityAssociation(**kw), SecurityAssociation(**kw), ref

    return make
