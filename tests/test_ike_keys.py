"""``simpletun pubkey``: the Ed25519 public key of a genkey file, and its parsing."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import pytest

from simpletun import keys
from simpletun._errors import ConfigError
from simpletun.ike import keys as ikekeys


def run(argv, stdin: str | None):
    return subprocess.run(
        [sys.executable, "-m", "simpletun", *argv], input=stdin, capture_output=True, text=True
    )


def test_pubkey_of_a_genkey_file(tmp_path):
    key = keys.generate_key()
    p = run(["pubkey"], keys.encode_key(key))
    assert p.returncode == 0 and p.stderr == ""
    pub = ikekeys.load_public_key(p.stdout)
    # the printed key verifies what the private key signs
    pub.verify(ikekeys.private_key(key).sign(b"octets"), b"octets")
    path = tmp_path / "key"
    path.write_text(keys.encode_key(key))
    os.chmod(path, 0o600)
    assert run(["pubkey", str(path)], None).stdout == p.stdout
    assert len(base64.b64decode(p.stdout)) == 32


@pytest.mark.parametrize("stdin", ["", "not base64!", base64.b64encode(b"x" * 31).decode()])
def test_pubkey_bad_input_is_one_line_exit_2(stdin):
    p = run(["pubkey"], stdin)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "genkey" in p.stderr and "Traceback" not in p.stderr


def test_pubkey_open_file_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text(keys.encode_key(keys.generate_key()))
    os.chmod(path, 0o644)
    p = run(["pubkey", str(path)], None)
    assert p.returncode == 2 and "chmod 600" in p.stderr and "--key" not in p.stderr


def test_pubkey_help():
    p = run(["pubkey", "-h"], None)
    assert p.returncode == 0 and "Ed25519 public key" in p.stdout


def test_load_public_key_rejects_junk():
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        ikekeys.load_public_key("AAAA")


def test_main_usage_mentions_pubkey(monkeypatch):
    from simpletun import cli

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["-h"]) == 0
    assert "pubkey < KEYFILE" in out.getvalue()
