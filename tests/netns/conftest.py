"""Fixtures of the two-namespace suite.

- Tests marked ``netns`` need root, ``ip``, ``/dev/net/tun`` (and the tunnel tests need the
  ``simpletun`` command and ``tcpdump``). When one is missing the test is skipped with the
  reason, except under ``CI=true``, where a missing prerequisite is a failure.
- ``checked`` collects one-line statements of what a test verified (figures included); they are
  printed in a "netns checks" section at the end of the run, pass or fail.
- ``lab_factory`` builds :class:`Lab` objects (two namespaces + veth) that are always torn
  down, also on failure and Ctrl-C.
"""

from __future__ import annotations

import pytest
from skipping import skip

from .lab import Lab, close_all_labs, missing_prerequisites

_CHECKS: dict[str, list[str]] = {}


def require(missing: list[str]) -> None:
    """Skip (or, under CI=true, fail) when prerequisites are missing."""
    if not missing:
        return
    skip("netns prerequisites missing: " + "; ".join(missing))


@pytest.fixture(autouse=True)
def _netns_prerequisites(request):
    if request.node.get_closest_marker("netns") is not None:
        require(missing_prerequisites())


@pytest.fixture
def checked(request) -> list[str]:
    lst: list[str] = []
    _CHECKS[request.node.nodeid] = lst
    return lst


@pytest.fixture
def lab_factory(tmp_path):
    labs: list[Lab] = []

    def make(**kw) -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}", **kw)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture
def lab(lab_factory) -> Lab:
    return lab_factory()


def pytest_sessionfinish(session, exitstatus):
    close_all_labs()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not any(_CHECKS.values()):
        return
    tr = terminalreporter
    tr.section("netns checks (what each test verified)")
    outcomes = {}
    for key in ("passed", "failed", "error", "skipped"):
        for rep in tr.stats.get(key, []):
            if getattr(rep, "when", "call") in ("call", "setup"):
                outcomes.setdefault(rep.nodeid, key.upper())
    for nodeid, lines in _CHECKS.items():
        if not lines:
            continue
        tr.write_line(f"{outcomes.get(nodeid, '?')} {nodeid}")
        for line in lines:
            tr.write_line(f"    - {line}")


def tunnel_prerequisites() -> list[str]:
    import shutil

    from .tunnel import simpletun_cmd

    missing = missing_prerequisites()
    if simpletun_cmd() is None:
        missing.append("the `simpletun` command is not installed (run scripts/setup.sh)")
    try:
        from simpletun import _core

        if not hasattr(_core, "DataPlane"):
            missing.append(
                "simpletun._core has no DataPlane (extension not built with the data plane)"
            )
    except ImportError as exc:
        missing.append(f"cannot import simpletun._core ({exc}); run scripts/setup.sh")
    if shutil.which("tcpdump") is None:
        missing.append("`tcpdump` not installed")
    return missing


@pytest.fixture
def tunnel_ready():
    """Skip (or fail under CI) when the tunnel cannot run here."""
    require(tunnel_prerequisites())


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Two different key files made by `simpletun genkey` (key, other)."""
    from .tunnel import genkey, simpletun_cmd

    require(["the `simpletun` command is not installed"] if simpletun_cmd() is None else [])
    d = tmp_path_factory.mktemp("keys")
    return genkey(d / "key"), genkey(d / "other.key")
