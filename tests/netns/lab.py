"""The suite's lab is the public :mod:`simpletun.lab` (kept importable here as ``.lab``)."""

from simpletun.lab import *  # noqa: F403
from simpletun.lab import __all__  # noqa: F401
