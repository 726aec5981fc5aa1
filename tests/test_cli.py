"""The simpletun command line: usage errors (exit 2, one line), -h, genkey, and (as root, in a
network namespace of our own) running, signals and the handshake's error reporting."""

import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from skipping import skip

from simpletun import cli
from simpletun.config import max_queues
from simpletun.keys import encode_key, generate_key, load_key

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "key"
    path.write_text(encode_key(generate_key()))
    path.chmod(0o600)
    return str(path)


def run_cli(*args, stdout=subprocess.PIPE, timeout=20):
    return subprocess.run(
        [sys.executable, "-m", "simpletun", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def assert_one_line_error(err: str, expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simpletun: error: "), err
    assert expected in lines[0], err
    assert "usage" not in err.lower()


# -- usage errors -------------------------------------------------------------------------------

BAD_INVOCATIONS = [
    (["-i", "tun0", "-s", "-p", "70000", "--plaintext"], "-p: port must be 1-65535, got 70000"),
    (["-i", "tun0", "-s", "-p", "0", "--plaintext"], "-p: port must be 1-65535, got 0"),
    (["-i", "tun0", "-s", "-p", "http", "--plaintext"], "-p: port must be a number 1-65535"),
    (["-i", "tun0", "-s", "-p"], "-p needs a value: -p PORT"),
    (["-i", "tun0", "-s", "-c", "10.0.0.1", "--plaintext"], "-s and -c are mutually exclusive"),
    (["-i", "tun0", "--plaintext"], "choose a mode: -s (server) or -c HOST (client)"),
    ([], "choose a mode"),
    (["-s", "--plaintext"], "-i IFNAME is required"),
    (["-i", "", "-s", "--plaintext"], "-i: the interface name is empty"),
    (["-i", "a-very-long-name0", "-s", "--plaintext"], "is too long (at most 15 bytes)"),
    (["-i", "tun/0", "-s", "--plaintext"], "invalid interface name"),
    (["-i", "tun0", "-c"], "-c needs a value: -c HOST"),
    (["-i", "tun0", "-s", "-u", "-a", "--plaintext"], "-u (TUN) and -a (TAP) are mutually"),
    (["-i", "tun0", "-s"], "no --key given: run 'simpletun genkey > key'"),
    (["-i", "tun0", "-c", "10.0.0.1"], "pass --key key, or use --plaintext"),
    (["-i", "tun0", "-s", "--key"], "--key needs a value: --key FILE"),
    (["-i", "tun0", "-s", "--plaintext", "--addr", "10.0.0.1"], "--addr: expected an address"),
    (["-i", "tun0", "-s", "--plaintext", "--addr", "10.0.0.999/24"], "--addr: not an address"),
    (["-i", "tun0", "-s", "--plaintext", "--addr", "fe80::1/129"], "--addr: not an address"),
    (["-i", "tun0", "-s", "--plaintext", "--mtu", "20"], "--mtu: MTU must be 68-65000, got 20"),
    (["-i", "tun0", "-s", "--plaintext", "--mtu", "1.5k"], "--mtu: MTU must be a number"),
    (["-i", "tun0", "-s", "--plaintext", "--mtu", "99999"], "--mtu: MTU must be 68-65000"),
    (["-i", "tun0", "-s", "--plaintext", "--cipher", "des"], "--cipher: unknown cipher 'des'"),
    (["-i", "tun0", "-s", "--plaintext", "--cipher", "aes-256-cbc"], "--cipher does not apply"),
    (["-i", "tun0", "-s", "--bogus"], "unknown option '--bogus' (see simpletun -h)"),
    (["-i", "tun0", "-s", "-x"], "unknown option '-x'"),
    (["-i", "tun0", "-s", "--plain"], "unknown option '--plain'"),  # no abbreviations
    (["-i", "tun0", "-s", "extra"], "unknown argument 'extra'"),
    (["-i", "tun0", "-s", "genkey"], "'genkey' must come first"),
    (["genkey", "now"], "genkey takes no arguments"),
    # host names that IDNA/DNS refuse: one line at parse time (before any device exists)
    (["-i", "tun0", "-c", "a..b", "--plaintext"], "-c: 'a..b' is not a valid host name"),
    (["-i", "tun0", "-c", ".", "--plaintext"], "-c: '.' is not a valid host name"),
    (["-i", "tun0", "-c", "x" * 64 + ".example", "--plaintext"], "label needs 1-63 characters"),
    (["-i", "tun0", "-c", "a." * 150, "--plaintext"], "the name at most 253"),
    (["-i", "tun0", "-c", "[10.0.0.1]", "--plaintext"], "brackets are only for IPv6 addresses"),
    (["-i", "tun0", "-c", "\udcff", "--plaintext"], "is not a valid host name"),
    (["-i", "tun\udcff", "-s", "--plaintext"], "is not valid text"),
    (["-i", "tun0", "-s", "--plaintext", "--route", "10.1.0.1/16"], "did you mean 10.1.0.0/16?"),
    (["-i", "tun0", "-s", "--plaintext", "--route", "nope"], "--route: not a network prefix"),
    # --queues: 1 to the CPUs this process may use (the message names the limit)
    (["-i", "tun0", "-s", "--plaintext", "--queues", "0"], "--queues: queues must be 1-"),
    (["-i", "tun0", "-s", "--plaintext", "--queues", "two"], "--queues: queues must be a number"),
    (
        ["-i", "tun0", "-s", "--plaintext", "--queues", str(max_queues() + 1)],
        f"--queues: queues must be 1-{max_queues()} (one device thread per queue",
    ),
]


@pytest.mark.parametrize(
    "argv,expected", BAD_INVOCATIONS, ids=[" ".join(a)[:60] for a, _ in BAD_INVOCATIONS]
)
def test_bad_invocation_exits_2_with_one_line(argv, expected, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, expected)


def test_key_with_plaintext_is_refused(keyfile, capsys):
    assert cli.main(["-i", "tun0", "-s", "--plaintext", "--key", keyfile]) == 2
    assert_one_line_error(capsys.readouterr().err, "--key and --plaintext are mutually exclusive")


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("missing", "no such file; make one with: simpletun genkey >"),
        ("open", "permissions 0644 are too open"),
        ("group", "permissions 0640 are too open"),
        ("garbage", "not a simpletun key"),
        ("dir", "not a regular file"),
    ],
)
def test_bad_key_file_exits_2_with_one_line(tmp_path, setup, expected, capsys):
    path = tmp_path / "key"
    if setup == "dir":
        path.mkdir()
    elif setup != "missing":
        path.write_text("garbage\n" if setup == "garbage" else encode_key(generate_key()))
        path.chmod({"open": 0o644, "group": 0o640, "garbage": 0o600}[setup])
    assert cli.main(["-i", "tun0", "-c", "10.0.0.1", "--key", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, expected)


def test_too_open_key_tells_how_to_fix(tmp_path, capsys):
    path = tmp_path / "key"
    path.write_text(encode_key(generate_key()))
    path.chmod(0o644)
    assert cli.main(["-i", "tun0", "-s", "--key", str(path)]) == 2
    assert f"fix with: chmod 600 {path}" in capsys.readouterr().err


def test_subprocess_usage_error_is_one_line():
    r = run_cli("-i", "tun0", "-s", "-p", "70000")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == "simpletun: error: -p: port must be 1-65535, got 70000\n"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_exits_0_and_lists_every_option(flag):
    r = run_cli(flag)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith("Usage:")
    for opt in ["-i IFNAME", "-s", "-c HOST", "-p PORT", "-u", "-a", "-d", "-h", "--key FILE"]:
        assert opt in r.stdout
    for opt in ["--plaintext", "--addr CIDR", "--mtu N", "--cipher NAME", "genkey", "55555"]:
        assert opt in r.stdout


def test_help_wins_over_missing_arguments(capsys):
    assert cli.main(["-h"]) == 0
    assert cli.main(["-i", "tun0", "-h"]) == 0
    assert "Usage:" in capsys.readouterr().out


# -- valid invocations --------------------------------------------------------------------------


def test_full_client_invocation_parses(keyfile):
    config, debug = cli.parse_args(
        "-i tun7 -c vpn.example -p 4000 -a -d --key".split()
        + [keyfile]
        + "--cipher aes-256-cbc --addr 10.9.0.2/24 --addr fd00::2/64 --mtu 1400".split()
    )
    assert debug is True
    assert config.server is False
    assert (config.ifname, config.host, config.port) == ("tun7", "vpn.example", 4000)
    assert config.tap is True
    assert config.key == load_key(keyfile)
    assert config.cipher == "aes-256-cbc"
    assert [str(a) for a in config.addresses] == ["10.9.0.2/24", "fd00::2/64"]
    assert config.mtu == 1400


def test_ikev2_over_tcp_invocations_parse(keyfile):
    """--key-exchange ikev2 --transport tcp: RFC 8229 on TCP 4500 by default, -p to change it;
    a server listens there, a client connects there. Without --transport: UDP 500/4500."""
    base = ["-i", "tun7", "--key", keyfile, "--key-exchange", "ikev2"]
    srv, _ = cli.parse_args([*base, "-s", "--listen", "192.0.2.1", "--transport", "tcp"])
    assert (srv.transport, srv.port, srv.ike.transport, srv.ike.listen_port) == (
        "tcp", 4500, "tcp", 4500,
    )  # fmt: skip
    cl, _ = cli.parse_args([*base, "-c", "127.0.0.1", "--transport", "tcp", "-p", "443"])
    assert cl.ike.peers[0].endpoint == ("127.0.0.1", 443) and cl.ike.listen_port is None
    assert cl.transport == "tcp"
    udp, _ = cli.parse_args([*base, "-c", "127.0.0.1"])
    assert udp.transport == "udp" and udp.ike.peers[0].endpoint == ("127.0.0.1", 500)
    # and the classic default stays TCP with simpletun's own handshake
    classic, _ = cli.parse_args(["-i", "tun7", "--key", keyfile, "-c", "127.0.0.1"])
    assert classic.transport == "tcp" and classic.ike is None


def test_ikev2_on_the_kernel_data_plane_parses_and_its_limits_are_one_line(keyfile, tmp_path):
    base = ["-i", "tun7", "--key", keyfile, "--key-exchange", "ikev2", "--dataplane", "kernel"]
    cl, _ = cli.parse_args([*base, "-c", "127.0.0.1"])
    assert (cl.dataplane, cl.transport) == ("kernel", "udp")
    with pytest.raises(cli.UsageError, match="runs ESP-in-UDP: drop --transport raw"):
        cli.parse_args([*base, "-c", "127.0.0.1", "--transport", "raw"])
    with pytest.raises(cli.UsageError, match="negotiates its keys: drop --manual-keys"):
        cli.parse_args([*base, "-c", "127.0.0.1", "--manual-keys", str(tmp_path / "k")])


def test_simpletun_c_style_flags_parse():
    # getopt style: combined flags and attached values, as simpletun.c accepted
    config, debug = cli.parse_args(["-itun0", "-sdu", "-p4000", "--plaintext"])
    assert (config.ifname, config.server, config.port, config.tap, debug) == (
        "tun0",
        True,
        4000,
        False,
        True,
    )
    assert config.key is None  # plaintext
    config, debug = cli.parse_args(["-i", "tap0", "-c", "192.0.2.1", "--plaintext"])
    assert (config.port, config.mtu, config.tap, debug) == (55555, 1500, False, False)


# -- genkey -------------------------------------------------------------------------------------


def test_genkey_to_file_is_private_and_loadable(tmp_path):
    path = tmp_path / "key"
    old = os.umask(0o022)
    try:
        with open(path, "w") as f:  # what the shell does for "> key"
            r = run_cli("genkey", stdout=f)
    finally:
        os.umask(old)
    assert r.returncode == 0
    assert r.stderr == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=\n", text)
    assert len(load_key(str(path))) == 32


def test_genkey_to_pipe_warns_and_keys_differ():
    a, b = run_cli("genkey"), run_cli("genkey")
    assert a.returncode == b.returncode == 0
    assert a.stdout != b.stdout
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=\n", a.stdout)
    assert a.stderr.startswith("simpletun: warning: ")
    assert "0600" in a.stderr and a.stderr.count("\n") == 1


def test_genkey_help():
    r = run_cli("genkey", "-h")
    assert r.returncode == 0 and "simpletun genkey > KEYFILE" in r.stdout


# -- running (root, inside a network namespace created here) ------------------------------------


def need_netns():
    why = None
    if os.geteuid() != 0:
        why = "needs root (TUN devices, network namespaces)"
    elif not os.path.exists("/dev/net/tun"):
        why = "needs /dev/net/tun"
    elif shutil.which("ip") is None:
        why = "needs the ip command (iproute2)"
    if why:
        skip(why)


@pytest.fixture
def netns():
    need_netns()
    name = f"stcli-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    procs = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Netns(name, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


class Netns:
    def __init__(self, name, procs):
        self.name, self.procs = name, procs

    def start(self, *args):
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-m", "simpletun", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        p.log = b""
        self.procs.append(p)
        return p

    def ip(self, *args):
        return subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)

    def link_exists(self, dev):
        return self.ip("link", "show", dev).returncode == 0


def wait_log(p, pattern, timeout=10.0, count=1):
    """Read p's stderr until ``pattern`` has appeared ``count`` times; return all of it."""
    deadline = time.monotonic() + timeout
    fd = p.stderr.fileno()
    while p.log.count(pattern.encode()) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} in log within {timeout} s:\n{p.log.decode()}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"exited without logging {pattern!r}:\n{p.log.decode()}")
            p.log += chunk
    return p.log.decode()


def finish(p, timeout=5.0):
    rc = p.wait(timeout)
    p.log += p.stderr.read()
    return rc, p.log.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0_within_1s_and_removes_the_device(netns, keyfile, sig):
    p = netns.start("-i", "stt0", "-s", "--key", keyfile, "--addr", "10.77.0.1/24", "--mtu", "1400")
    wait_log(p, "listening on TCP port 55555")
    link = netns.ip("-o", "link", "show", "stt0").stdout
    assert "mtu 1400" in link and ",UP" in link
    assert "10.77.0.1/24" in netns.ip("-o", "addr", "show", "dev", "stt0").stdout
    start = time.monotonic()
    p.send_signal(sig)
    rc, log = finish(p)
    assert time.monotonic() - start < 1.0
    assert rc == 0, log
    assert not netns.link_exists("stt0")


def test_tap_mac_is_stable_across_restarts(netns):
    """A restarted TAP server must come back with the same MAC, or the peer's neighbour entry
    would point at a vanished address and traffic would stall until it expired."""
    macs = []
    for _ in range(2):
        p = netns.start("-i", "stm0", "-a", "-s", "--plaintext", "--addr", "10.78.0.1/24")
        wait_log(p, "listening on TCP port 55555")
        link = netns.ip("-o", "link", "show", "stm0").stdout
        macs.append(re.search(r"link/ether ([0-9a-f:]{17})", link).group(1))
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0
    assert macs[0] == macs[1]
    first = int(macs[0][:2], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast


def test_client_retrying_exits_0_on_sigterm(netns, keyfile):
    p = netns.start("-i", "stt1", "-c", "127.0.0.1", "-p", "5999", "--key", keyfile, "-d")
    log = wait_log(p, "reconnecting to 127.0.0.1:5999 in 0.2 s")
    assert "cannot connect to 127.0.0.1:5999" in log
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, log = finish(p)
    assert time.monotonic() - start < 1.0
    assert rc == 0, log
    assert not netns.link_exists("stt1")


def test_existing_device_is_kept_and_our_address_removed(netns):
    assert netns.ip("tuntap", "add", "dev", "keep0", "mode", "tun").returncode == 0
    p = netns.start("-i", "keep0", "-s", "--plaintext", "--addr", "10.78.0.1/24")
    wait_log(p, "listening on TCP port")
    assert "10.78.0.1/24" in netns.ip("-o", "addr", "show", "dev", "keep0").stdout
    p.send_signal(signal.SIGTERM)
    rc, log = finish(p)
    assert rc == 0, log
    assert netns.link_exists("keep0")
    assert "10.78.0.1" not in netns.ip("-o", "addr", "show", "dev", "keep0").stdout


def test_wrong_key_is_reported_plainly_and_the_client_keeps_its_device(netns, keyfile, tmp_path):
    """A wrong key is said in one line on both ends within a second; the client keeps retrying
    (the rejection is not authenticated) and keeps its device, so nothing leaks in the clear."""
    other = tmp_path / "other"
    other.write_text(encode_key(generate_key()))
    other.chmod(0o600)
    server = netns.start("-i", "sts0", "-s", "-p", "6001", "--key", keyfile)
    wait_log(server, "listening on TCP port 6001")
    start = time.monotonic()
    client = netns.start("-i", "stc0", "-c", "127.0.0.1", "-p", "6001", "--key", str(other))
    log = wait_log(client, "wrong key: the server's key confirmation does not match", count=2)
    assert time.monotonic() - start < 5  # including the interpreter's start-up
    assert "(both ends must use the same --key file); retrying" in log
    wait_log(server, "wrong key", timeout=1)
    assert server.poll() is None and client.poll() is None
    assert netns.link_exists("stc0"), "the client must keep its device while it runs"
    for p in (client, server):
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0
    assert not netns.link_exists("stc0")


def test_debug_logs_session_events(netns, keyfile):
    server = netns.start("-i", "sts1", "-s", "-p", "6002", "--key", keyfile, "-d")
    wait_log(server, "listening on TCP port 6002")
    client = netns.start("-i", "stc1", "-c", "127.0.0.1", "-p", "6002", "--key", keyfile, "-d")
    clog = wait_log(client, "session with 127.0.0.1:6002 up")
    assert re.search(r"handshake with 127\.0\.0\.1:6002 ok: spi out 0x[0-9a-f]{8} in 0x", clog)
    slog = wait_log(server, " up (ESP aes-128-cbc)")
    assert "accepted connection from 127.0.0.1:" in slog
    assert re.search(r"handshake with 127\.0\.0\.1:\d+ ok: spi out 0x[0-9a-f]{8} in 0x", slog)
    server.send_signal(signal.SIGTERM)
    assert finish(server)[0] == 0
    clog = wait_log(client, "cannot connect to 127.0.0.1:6002: Connection refused; retrying")
    # the server closed the connection (FIN, or RST if our packets were still unread)
    assert re.search(r"ended after [\d.]+ s: (peer closed the connection|socket error)", clog), clog
    assert "reconnecting to 127.0.0.1:6002 in 0." in clog
    assert "counters: tx_packets=" in clog
    client.send_signal(signal.SIGINT)
    assert finish(client)[0] == 0


def test_sigusr1_logs_live_counters_without_ending_the_session(netns, keyfile):
    server = netns.start("-i", "sts4", "-s", "-p", "6004", "--key", keyfile)
    wait_log(server, "listening on TCP port 6004")
    client = netns.start("-i", "stc4", "-c", "127.0.0.1", "-p", "6004", "--key", keyfile)
    wait_log(client, "session with 127.0.0.1:6004 up")
    client.send_signal(signal.SIGUSR1)
    clog = wait_log(client, "(up ")
    assert re.search(
        r"session with 127\.0\.0\.1:6004 counters: tx_packets=\d+ tx_bytes=\d+ rx_packets=\d+", clog
    ), clog
    assert "aes-128-cbc" in clog.splitlines()[-1]
    assert client.poll() is None and "ended after" not in clog
    client.send_signal(signal.SIGUSR1)
    assert "counters:" in wait_log(client, "(up ", count=2)
    client.send_signal(signal.SIGTERM)
    rc, clog = finish(client)
    assert rc == 0 and "ended after" in clog, clog
    server.send_signal(signal.SIGTERM)
    assert finish(server)[0] == 0


def test_cipher_mismatch_is_reported_plainly(netns, keyfile):
    server = netns.start("-i", "sts2", "-s", "-p", "6003", "--key", keyfile)
    wait_log(server, "listening on TCP port 6003")
    client = netns.start(
        "-i", "stc2", "-c", "127.0.0.1", "-p", "6003", "--key", keyfile, "--cipher", "aes-256-cbc"
    )
    wait_log(client, "cipher mismatch: the server uses aes-128-cbc, we use aes-256-cbc")
    wait_log(server, "cipher mismatch: the client uses aes-256-cbc", timeout=1)
    assert client.poll() is None
    for p in (client, server):
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0


def test_client_resumes_when_the_server_is_killed_and_restarted(netns, keyfile):
    args = ("-s", "-p", "6004", "--key", keyfile)
    server = netns.start("-i", "sts3", *args)
    wait_log(server, "listening on TCP port 6004")
    client = netns.start("-i", "stc3", "-c", "127.0.0.1", "-p", "6004", "--key", keyfile)
    wait_log(client, "session with 127.0.0.1:6004 up")
    server.kill()
    finish(server)
    time.sleep(0.5)  # down for a while
    restarted = time.monotonic()
    server = netns.start("-i", "sts3", *args)
    wait_log(server, "session with 127.0.0.1:", timeout=5)
    log = wait_log(client, "session with 127.0.0.1:6004 up (ESP aes-128-cbc)", 5, count=2)
    assert time.monotonic() - restarted < 5
    assert client.poll() is None
    # without -d the client logs the session end and the outage once, concisely
    assert "session with 127.0.0.1:6004 ended after" in log
    assert log.count("cannot connect") <= 1
    assert "reconnecting" not in log
    for p in (server, client):
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0


def test_undecodable_argv_bytes_are_one_line_not_a_traceback(tmp_path):
    """Bytes that are not UTF-8 in argv (as a shell passes them) end in one line, exit 2."""
    import subprocess

    cmd = str(Path(sys.executable).parent / "simpletun")
    for argv in (
        [b"-i", b"tun0", b"-c", b"a\xff.example", b"--plaintext"],
        [b"-i", b"t\xfe", b"-s"],
    ):
        p = subprocess.run([cmd.encode(), *argv], capture_output=True, timeout=30)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.decode(errors="replace").splitlines()
        assert len(lines) == 1 and lines[0].startswith("simpletun: error: "), p.stderr
        assert "Traceback" not in p.stderr.decode(errors="replace")


def test_listen_address_for_a_server_only():
    config, _ = cli.parse_args(["-i", "tun0", "-s", "--listen", "[::1]", "--plaintext"])
    assert config.host == "::1" and config.server
    with pytest.raises(cli.UsageError, match="--listen is for a server"):
        cli.parse_args(["-i", "tun0", "-c", "h", "--listen", "::1", "--plaintext"])
    with pytest.raises(cli.UsageError, match="brackets are only for IPv6"):
        cli.parse_args(["-i", "tun0", "-s", "--listen", "[10.0.0.1]", "--plaintext"])


def test_bracketed_ipv6_server_address_is_accepted():
    config, _ = cli.parse_args(["-i", "tun0", "-c", "[fd00::1]", "--plaintext"])
    assert config.host == "fd00::1"
