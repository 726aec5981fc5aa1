"""Key files: format, permission checks (as ssh does), genkey's writing to stdout."""

import base64
import os
import stat

import pytest

from simpletun._errors import ConfigError
from simpletun.keys import KEY_LEN, decode_key, encode_key, generate_key, load_key, write_key_to_fd


def make_key_file(path, content: str, mode: int = 0o600) -> str:
    path.write_text(content)
    os.chmod(path, mode)
    return str(path)


def test_generated_keys_are_random_and_32_bytes():
    a, b = generate_key(), generate_key()
    assert len(a) == KEY_LEN == 32
    assert a != b


def test_key_file_format_is_one_base64_line():
    key = bytes(range(32))
    text = encode_key(key)
    assert text == base64.b64encode(key).decode() + "\n"
    assert len(text) == 45 and text.count("\n") == 1
    assert decode_key(text) == key


def test_load_key_round_trip(tmp_path):
    key = generate_key()
    path = make_key_file(tmp_path / "key", encode_key(key))
    assert load_key(path) == key


def test_load_key_accepts_owner_read_only(tmp_path):
    key = generate_key()
    path = make_key_file(tmp_path / "key", encode_key(key), 0o400)
    assert load_key(path) == key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o610])
def test_load_key_refuses_group_or_other_access(tmp_path, mode):
    path = make_key_file(tmp_path / "key", encode_key(generate_key()), mode)
    with pytest.raises(ConfigError) as e:
        load_key(path)
    msg = str(e.value)
    assert f"permissions {mode:04o} are too open" in msg
    assert f"chmod 600 {path}" in msg
    assert "\n" not in msg


def test_load_key_missing_file_suggests_genkey(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"no such file; make one with: simpletun genkey >"):
        load_key(path)


def test_load_key_directory(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key(str(tmp_path))


@pytest.mark.parametrize(
    "content",
    [
        "",
        "\n",
        "not base64 at all!\n",
        base64.b64encode(bytes(16)).decode() + "\n",  # too short
        base64.b64encode(bytes(33)).decode() + "\n",  # too long
        base64.b64encode(bytes(32)).decode()[:-2] + "\n",  # truncated
        base64.b64encode(bytes(32)).decode() + "\n" + base64.b64encode(bytes(32)).decode(),
        "é" * 44,
    ],
)
def test_load_key_bad_content(tmp_path, content):
    path = make_key_file(tmp_path / "key", content)
    with pytest.raises(ConfigError, match="not a simpletun key") as e:
        load_key(path)
    assert "simpletun genkey > key" in str(e.value)


def test_load_key_binary_content(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not a simpletun key"):
        load_key(str(path))


def test_load_key_tolerates_surrounding_whitespace(tmp_path):
    key = generate_key()
    path = make_key_file(tmp_path / "key", "  " + encode_key(key).strip() + "\r\n\n")
    assert load_key(path) == key


def test_write_key_to_regular_file_restricts_mode(tmp_path):
    path = tmp_path / "key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.fchmod(fd, 0o644)  # what a shell's "> key" gives with umask 022
    key = generate_key()
    try:
        warning = write_key_to_fd(fd, key)
    finally:
        os.close(fd)
    assert warning is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(str(path)) == key


def test_write_key_to_pipe_warns():
    r, w = os.pipe()
    key = generate_key()
    try:
        warning = write_key_to_fd(w, key)
        os.close(w)
        data = os.read(r, 100)
    finally:
        os.close(r)
    assert decode_key(data.decode()) == key
    assert warning is not None and "0600" in warning
