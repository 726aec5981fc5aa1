"""Fixtures of the systemd suite (``tests/systemd/``).

``sysd_lab`` is a real systemd booted as PID 1 of its own namespaces (``lab.sh``) for the whole
module, always shut down. A test that needs it is skipped with the reason when this machine
cannot run a lab (not root, no systemd, ...), except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from skipping import skip

from .lab import SystemdLab, close_all_labs, missing_prerequisites


def require(missing: list[str]) -> None:
    if not missing:
        return
    skip("systemd lab prerequisites missing: " + "; ".join(missing))


def simpletun_cmd() -> str:
    """The installed ``simpletun`` console script (the README installs it into ``.venv``)."""
    return str(Path(sys.executable).parent / "simpletun")


@pytest.fixture(scope="module")
def sysd_lab():
    missing = missing_prerequisites()
    if not os.access(simpletun_cmd(), os.X_OK):
        missing.append(f"no {simpletun_cmd()} (run scripts/setup.sh)")
    require(missing)
    lab = SystemdLab().start()
    try:
        yield lab
    finally:
        lab.close()


def pytest_sessionfinish(session, exitstatus):
    close_all_labs()
