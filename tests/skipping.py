"""One rule for skips: a test may skip only for a printed reason, and never under CI=true
(there, a missing prerequisite is a failure)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so not skipping", pytrace=False)
    print(f"skipping: {reason}")
    pytest.skip(reason)
