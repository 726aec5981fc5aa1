"""``simpletun install-service`` and the journald priority prefixes, without a running systemd.

The lab suite (test_service.py) runs the unit for real; here: the written file, its ExecStart,
``systemd-analyze verify`` on it, bad usage, path quoting, ``configs/`` kept in sync, and the
``<N>`` prefixes on stderr when (and only when) stderr is the journal's stream.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from skipping import skip

from simpletun import configfile, journal, unit

from .conftest import simpletun_cmd

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_EXE = "/opt/simpletun/.venv/bin/simpletun"


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def need_systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        skip("systemd-analyze not installed (scripts/setup.sh installs systemd)")
    return path


def verify(path: Path) -> str:
    """``systemd-analyze verify`` output; it exits 0 on unknown keys and bad values and only
    prints warnings, so a clean unit is exit 0 *and* no output."""
    out = run(need_systemd_analyze(), "verify", str(path))
    return (
        f"exit {out.returncode}: {out.stdout}{out.stderr}"
        if out.returncode
        else (out.stdout + out.stderr).strip()
    )


def test_install_service_writes_the_unit_for_this_command(tmp_path):
    out = run(simpletun_cmd(), "install-service", "--unit-dir", str(tmp_path / "units"))
    assert out.returncode == 0, out.stderr
    path = tmp_path / "units" / "simpletun@.service"
    assert str(path) in out.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    assert exec_start == f"{os.path.abspath(simpletun_cmd())} up --foreground %i"
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rw",
        "ProtectSystem=strict",
        "RuntimeDirectory=simpletun",
        "RuntimeDirectoryPreserve=yes",
        "NoNewPrivileges=yes",
    ):
        assert line in text.splitlines(), line
    assert verify(path) == ""
    # Again: replaced in place, same content.
    assert (
        run(simpletun_cmd(), "install-service", f"--unit-dir={tmp_path / 'units'}").returncode == 0
    )
    assert path.read_text() == text


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a bad value or unknown key makes verify talk."""
    good = unit.render_unit(simpletun_cmd())
    for bad in (
        good.replace("ProtectHome=yes", "ProtectHome=maybe"),
        good.replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nNoNewPrivilege=yes"),
    ):
        (tmp_path / "simpletun@.service").write_text(bad)
        assert verify(tmp_path / "simpletun@.service") != ""


def test_exec_start_path_with_spaces_and_specials_verifies(tmp_path):
    bindir = tmp_path / "odd dir %n $HOME"
    bindir.mkdir()
    exe = bindir / "simpletun"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = unit.render_unit(str(exe))
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    assert line.startswith('"') and "%%n" in line and "$HOME" in line
    (tmp_path / "simpletun@.service").write_text(text)
    assert verify(tmp_path / "simpletun@.service") == ""
    with pytest.raises(unit.ServiceError):
        unit.exec_path("/opt/new\nline/simpletun")


def test_installation_under_home_or_tmp_stays_visible(monkeypatch):
    assert unit._under_home("/root/simpletun/.venv/bin/simpletun")
    assert unit._under_home("/home/ann/st/.venv/bin/simpletun")
    assert not unit._under_home("/opt/simpletun/.venv/bin/simpletun")
    assert not unit._under_home("/homeless/simpletun")
    for paths, want in (
        (["/opt/st/.venv/bin/simpletun", "/usr/bin/python3.11"], ("yes", "yes")),
        (["/root/st/.venv/bin/simpletun", "/usr/bin/python3.11"], ("read-only", "yes")),
        (["/opt/st/.venv/bin/simpletun", "/tmp/ci/src/simpletun"], ("yes", "no")),
    ):
        monkeypatch.setattr(unit, "_program_paths", lambda exe, paths=paths: paths)
        got = unit.placement_settings(paths[0])
        assert (got["protect_home"], got["private_tmp"]) == want, paths
    text = unit.render_unit(EXAMPLE_EXE, protect_home="read-only", private_tmp="no")
    assert {"ProtectHome=read-only", "PrivateTmp=no"} <= set(text.splitlines())


@pytest.mark.parametrize(
    "args, status, fragment",
    [
        (["--bogus"], 2, "unknown argument '--bogus'"),
        (["--unit-dir"], 2, "--unit-dir needs a value"),
        (["--unit-dir", "/proc/1/simpletun-units"], 1, "cannot write simpletun@.service"),
    ],
)
def test_install_service_bad_usage_is_one_line(args, status, fragment):
    out = run(simpletun_cmd(), "install-service", *args)
    assert out.returncode == status, out
    assert out.stderr.startswith("simpletun: error: ") and fragment in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_install_service_help():
    out = run(simpletun_cmd(), "install-service", "-h")
    assert out.returncode == 0 and "systemctl enable --now simpletun@NAME" in out.stdout


def test_configs_are_in_sync(tmp_path):
    """configs/simpletun@.service is exactly what install-service writes for an installation
    in /opt/simpletun/.venv; the example configs parse."""
    assert (REPO / "configs" / "simpletun@.service").read_text() == unit.render_unit(EXAMPLE_EXE)
    assert not list((REPO / "configs").glob("simpletun-*.service")), "stale example units"
    key = tmp_path / "st0.key"
    with open(key, "wb") as f:
        subprocess.run([simpletun_cmd(), "genkey"], stdout=f, check=True, timeout=30)
    for name in ("server.toml", "client.toml"):
        text = (REPO / "configs" / name).read_text().replace("/etc/simpletun/st0.key", str(key))
        tf = configfile.loads(text, tmp_path / "st0.toml")
        assert tf.config.ifname == "st0"


def _journal_run(tmp_path, *args: str, stream: str | None) -> str:
    """Run simpletun with stderr to a file; JOURNAL_STREAM = that file's dev:ino (stream="self"),
    a value naming something else, or unset; return what it wrote to stderr."""
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if stream == "self":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif stream is not None:
            env["JOURNAL_STREAM"] = stream
        subprocess.run(
            [simpletun_cmd(), *args], stderr=f, stdout=subprocess.DEVNULL, env=env, timeout=60
        )
    return err.read_text()


def test_errors_get_err_priority_only_when_stderr_is_the_journal(tmp_path):
    bad = ["up", str(tmp_path / "missing.toml")]
    journal = _journal_run(tmp_path, *bad, stream="self")
    assert journal.startswith("<3>simpletun: error: ") and journal.count("\n") == 1, journal
    plain = _journal_run(tmp_path, *bad, stream=None)
    assert plain == journal[3:]
    # Inherited from a service but stderr is elsewhere (a shell in the unit): no prefixes.
    assert _journal_run(tmp_path, *bad, stream="1:1") == plain
    assert _journal_run(tmp_path, *bad, stream="garbage") == plain
    # install-service errors too.
    assert _journal_run(tmp_path, "install-service", "--x", stream="self").startswith(
        "<3>simpletun: error: "
    )


def test_journal_formatter_priorities():
    fmt = journal.JournalFormatter("simpletun: %(message)s")

    def line(level, msg="m"):
        return fmt.format(logging.LogRecord("simpletun", level, __file__, 1, msg, (), None))

    assert line(logging.DEBUG) == "<7>simpletun: m"
    assert line(logging.INFO) == "<6>simpletun: m"
    assert line(logging.WARNING) == "<4>simpletun: m"
    assert line(logging.ERROR) == "<3>simpletun: m"
    assert line(logging.CRITICAL) == "<2>simpletun: m"
    assert line(logging.ERROR, "a\nb") == "<3>simpletun: a\n<3>b"


def test_journal_stderr_prefixes_whole_lines():
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    w = journal._JournalStderr(sink, "simpletun")
    w.write("simpletun: err")
    assert sink.text == ""  # held until the line is complete
    w.write("or: bad\n<6>simpletun: info line\nsimpletun: warning: w\nplain\n")
    w.write("simpletun: error: last")
    w.flush()
    assert sink.text == (
        "<3>simpletun: error: bad\n<6>simpletun: info line\n<4>simpletun: warning: w\nplain\n"
        "<3>simpletun: error: last"
    )
