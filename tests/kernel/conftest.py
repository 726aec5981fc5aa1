"""``checked``: one-line statements of what a kernel-ESP test verified, printed in a
"kernel ESP checks" section at the end of the run (pass or fail)."""

from __future__ import annotations

import pytest

_CHECKS: dict[str, list[str]] = {}


@pytest.fixture
def checked(request) -> list[str]:
    lst: list[str] = []
    _CHECKS[request.node.nodeid] = lst
    return lst


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not any(_CHECKS.values()):
        return
    tr = terminalreporter
    tr.section("kernel ESP checks (what each test verified)")
    outcomes = {}
    for key in ("passed", "failed", "error", "skipped"):
        for rep in tr.stats.get(key, []):
            if getattr(rep, "when", "call") in ("call", "setup"):
                outcomes.setdefault(rep.nodeid, key.upper())
    for nodeid, lines in _CHECKS.items():
        for line in lines:
            tr.write_line(f"{outcomes.get(nodeid, '?')} {nodeid}: {line}")
