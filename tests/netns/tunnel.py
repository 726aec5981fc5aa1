"""The suite's tunnel helpers are the public :mod:`simpletun.lab.tunnel` (``.tunnel`` here)."""

from simpletun.lab.tunnel import *  # noqa: F403
from simpletun.lab.tunnel import (  # noqa: F401
    DEV,
    PORT,
    XFER,
    TunnelPair,
    counter,
    drops,
    genkey,
    session_counters,
    simpletun_cmd,
)
