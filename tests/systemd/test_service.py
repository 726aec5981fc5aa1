"""simpletun@.service under a real systemd (PID 1 of a lab, see lab.sh): installed with
``simpletun install-service``, then start (active only after READY=1), reload, a crash
(kill -9: restarted), stop (device and routes gone), and the journal's priorities.

Root; runs in CI. The lab's network namespace has only ``lo``: the server listens there and a
client with the wrong key connects to it over loopback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from .conftest import simpletun_cmd

UNIT_FILE = "/etc/systemd/system/simpletun@.service"
NAME = "st9"
UNIT = f"simpletun@{NAME}.service"
PORT = 55555
ADDRESS = "10.251.0.1/24"
ROUTE = "10.99.0.0/24"
ROUTE2 = "10.98.0.0/24"  # added by a reload
RECORDER = str(Path(__file__).with_name("notify_recorder.py"))
NOTIFY_SOCK = "/run/notify-recorder.sock"
NOTIFY_LOG = "/run/notify-recorder.log"
# The bounding set the unit grants: CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13).
CAPS = (1 << 10) | (1 << 12) | (1 << 13)

SERVER_TOML = f"""\
[interface]
name = "{NAME}"
mode = "tun"
address = ["{ADDRESS}"]
listen_port = {PORT}
key_file = "/etc/simpletun/{NAME}.key"

[[peer]]
allowed_ips = [{{routes}}]
"""

# A client of st9 with st9's key (st6.key is a copy of st9.key).
GOOD_CLIENT_TOML = f"""\
[interface]
name = "st6"
mode = "tun"
address = ["10.251.0.3/24"]
key_file = "/etc/simpletun/st6.key"

[[peer]]
allowed_ips = ["10.96.0.0/24"]
endpoint = "127.0.0.1:{PORT}"
"""

# A client of st9 whose key is not st9's: every handshake fails (logged as errors by st9).
CLIENT_TOML = f"""\
[interface]
name = "st7"
mode = "tun"
address = ["10.251.0.2/24"]
key_file = "/etc/simpletun/st7.key"

[[peer]]
allowed_ips = ["10.97.0.0/24"]
endpoint = "127.0.0.1:{PORT}"
"""

BAD_TOML = """\
[interface]
name = "st8"
mode = "tunnel"
address = ["10.252.0.1/24"]
listen_port = 55556
plaintext = true
"""


def server_toml(*routes: str) -> str:
    return SERVER_TOML.format(routes=", ".join(f'"{r}"' for r in routes))


def link(lab, name: str) -> dict | None:
    """``ip -j link show NAME`` (None when there is no such device)."""
    out = lab.run("ip", "-j", "link", "show", name, check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def routes(lab, dev: str) -> set[str]:
    out = lab.run("ip", "-j", "route", "show", "dev", dev, check=False)
    return {r["dst"] for r in json.loads(out.stdout or "[]")} if out.returncode == 0 else set()


def addresses(lab, dev: str) -> set[str]:
    out = lab.run("ip", "-j", "addr", "show", "dev", dev, check=False)
    if out.returncode != 0:
        return set()
    return {
        f"{a['local']}/{a['prefixlen']}" for i in json.loads(out.stdout) for a in i["addr_info"]
    }


def journal_records(lab, unit: str, *extra: str) -> list[dict]:
    out = lab.journal("-u", unit, "-o", "json", *extra)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def own_lines(records: list[dict]) -> list[dict]:
    """Records written by simpletun itself (not by systemd about the unit)."""
    return [r for r in records if r.get("SYSLOG_IDENTIFIER") == "simpletun"]


def proc_status(lab, pid: str) -> dict[str, str]:
    text = lab.run("cat", f"/proc/{pid}/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.fixture(scope="module")
def installed(sysd_lab):
    """``simpletun install-service`` run inside the lab, configs and keys in /etc/simpletun."""
    lab = sysd_lab
    out = lab.run(simpletun_cmd(), "install-service")
    assert UNIT_FILE in out.stdout, out.stdout
    lab.run("systemctl", "daemon-reload")
    lab.run(
        "sh",
        "-c",
        f"umask 077; mkdir -p /etc/simpletun; {simpletun_cmd()} genkey > "
        f"/etc/simpletun/{NAME}.key; {simpletun_cmd()} genkey > /etc/simpletun/st7.key",
    )
    lab.write(f"/etc/simpletun/{NAME}.toml", server_toml(ROUTE), 0o600)
    lab.write("/etc/simpletun/st7.toml", CLIENT_TOML, 0o600)
    lab.write("/etc/simpletun/st6.toml", GOOD_CLIENT_TOML, 0o600)
    lab.write("/etc/simpletun/st8.toml", BAD_TOML, 0o600)
    return lab


def test_installed_unit_verifies(installed):
    lab = installed
    text = lab.run("cat", UNIT_FILE).stdout
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    assert exec_start == f"{simpletun_cmd()} up --foreground %i"
    for path in (UNIT_FILE, f"/etc/systemd/system/{UNIT}"):
        out = lab.run("systemd-analyze", "verify", path if path == UNIT_FILE else UNIT, check=False)
        # verify exits 0 even for unknown keys or bad values: it only prints warnings.
        assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), (
            f"systemd-analyze verify {path}: exit {out.returncode}\n{out.stdout}{out.stderr}"
        )
    security = lab.run("systemd-analyze", "security", "--no-pager", UNIT, check=False).stdout
    overall = [line for line in security.splitlines() if "Overall exposure" in line]
    print(f"systemd-analyze security {UNIT}: {overall[0].strip() if overall else security[-300:]}")


def test_lifecycle(installed):
    lab = installed

    # 1. READY=1 only once device, address and route are up, and the unit is "activating"
    # until systemd gets it: a drop-in points NOTIFY_SOCKET at a recorder, which freezes the
    # sender on each message and notes the device's state; READY=1 never reaches systemd.
    lab.run(
        "systemd-run",
        "--unit=notify-recorder",
        sys.executable,
        RECORDER,
        NOTIFY_SOCK,
        NOTIFY_LOG,
        NAME,
    )
    lab.wait_for(
        "the recorder's socket",
        lambda: lab.run("test", "-S", NOTIFY_SOCK, check=False).returncode == 0,
    )
    lab.write(
        f"/run/systemd/system/{UNIT}.d/recorder.conf",
        f"[Service]\nEnvironment=NOTIFY_SOCKET={NOTIFY_SOCK}\n",
    )
    lab.run("systemctl", "daemon-reload")
    lab.run("systemctl", "start", "--no-block", UNIT)

    def ready_record():
        out = lab.run("cat", NOTIFY_LOG, check=False).stdout
        recs = [json.loads(line) for line in out.splitlines()]
        return [r for r in recs if "READY=1" in r["fields"]]

    ready = lab.wait_for("READY=1 at the recorder", ready_record)[0]
    assert ready["device"] and ADDRESS in ready["addresses"] and ROUTE in ready["routes"], ready
    st = lab.show(UNIT, "ActiveState", "SubState")
    assert (st["ActiveState"], st["SubState"]) == ("activating", "start"), st
    assert link(lab, NAME) is not None
    print(f"READY=1 sent with the device up: {ready}")
    lab.run("systemctl", "stop", UNIT)  # before the recorder, which may hold it stopped
    lab.run("systemctl", "stop", "notify-recorder.service")
    lab.run("rm", "-r", f"/run/systemd/system/{UNIT}.d")
    lab.run("systemctl", "daemon-reload")

    # 2. A blocking start returns once READY=1 arrived: by then device, address, route are up.
    lab.run("systemctl", "start", UNIT)
    st = lab.show(UNIT, "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts")
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert st["StatusText"], "no STATUS= from the daemon"
    assert link(lab, NAME) is not None
    assert ADDRESS in addresses(lab, NAME)
    assert ROUTE in routes(lab, NAME)
    pid1 = st["MainPID"]
    ifindex1 = link(lab, NAME)["ifindex"]
    print(f"active: MainPID={pid1} StatusText={st['StatusText']!r}")

    # The hardening is in effect (and the tunnel works under it): only CAP_NET_ADMIN,
    # CAP_NET_RAW and CAP_NET_BIND_SERVICE, no new privileges, a root-only runtime directory.
    status = proc_status(lab, pid1)
    assert int(status["CapBnd"], 16) == CAPS, status["CapBnd"]
    assert int(status["CapEff"], 16) & ~CAPS == 0, status["CapEff"]
    assert status["NoNewPrivs"].strip() == "1"
    assert lab.run("stat", "-c", "%a %U", "/run/simpletun").stdout.split() == ["700", "root"]

    # 3. Errors at error priority: a client with the wrong key makes st9's handshakes fail.
    lab.run("systemctl", "start", "--no-block", "simpletun@st7.service")

    def handshake_errors():
        return [
            r
            for r in own_lines(journal_records(lab, UNIT, "-p", "err"))
            if "handshake" in r["MESSAGE"]
        ]

    errs = lab.wait_for("a handshake error in st9's journal", handshake_errors)
    lab.run("systemctl", "stop", "simpletun@st7.service")
    assert all(r["PRIORITY"] == "3" for r in errs), errs
    assert errs[0]["MESSAGE"].startswith("simpletun: "), errs[0]["MESSAGE"]
    print(f"journalctl -u {UNIT} -p err: {errs[0]['MESSAGE']}")

    # 3b. The data plane under the hardened unit: a client with st9's key connects, packets it
    # routes through its tunnel reach st9 (its counters, read over the control socket in
    # /run/simpletun); STATUS= follows the peer.
    lab.run("cp", f"/etc/simpletun/{NAME}.key", "/etc/simpletun/st6.key")
    lab.run("systemctl", "start", "simpletun@st6.service")
    lab.wait_for(
        "st9's StatusText saying the peer is connected",
        lambda: "connected" in lab.show(UNIT, "StatusText")["StatusText"],
    )
    lab.wait_for(
        "st6 connected",
        lambda: lab.run(simpletun_cmd(), "status", "st6", check=False).returncode == 0,
    )
    send = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    send += "for _ in range(5): s.sendto(bytes(100), ('10.96.0.1', 9))"
    lab.run(sys.executable, "-c", send)

    def server_status():
        out = lab.run(simpletun_cmd(), "status", NAME, "--json", check=False)
        return out.returncode, json.loads(out.stdout)

    lab.wait_for(
        "5 packets at st9", lambda: server_status()[1]["peers"][0].get("rx_packets", 0) >= 5
    )
    code, st9 = server_status()
    peer = st9["peers"][0]
    assert code == 0 and st9["up"] and peer["connected"], st9
    assert peer["rx_bytes"] >= 5 * 128 and len(peer["sas"]) == 2, peer
    print(f"st9 status over the control socket: rx_packets={peer['rx_packets']} sas={peer['sas']}")
    lab.run("systemctl", "stop", "simpletun@st6.service")

    # /run/simpletun is shared: stopping st6 must leave st9's control socket in place.
    def peer_gone():
        code, st = server_status()
        return (code, st) if code == 1 else None

    code, st9 = lab.wait_for("st9 without its peer", peer_gone)
    assert st9["running"] and not st9["up"], st9

    # 4. Reload (SIGHUP): same process, the config re-read (a new route), "reload" logged.
    lab.write(f"/etc/simpletun/{NAME}.toml", server_toml(ROUTE, ROUTE2), 0o600)
    lab.run("systemctl", "reload", UNIT)
    lab.wait_for(f"route {ROUTE2} after reload", lambda: ROUTE2 in routes(lab, NAME))
    assert lab.wait_for(
        "'reload' logged by the daemon",
        lambda: [
            r
            for r in own_lines(journal_records(lab, UNIT, f"_PID={pid1}"))
            if "reload" in r["MESSAGE"].lower()
        ],
    )
    assert "Reloaded" in lab.journal("-u", UNIT, "-o", "cat")
    st = lab.show(UNIT, "ActiveState", "MainPID")
    assert (st["ActiveState"], st["MainPID"]) == ("active", pid1), st
    assert link(lab, NAME)["ifindex"] == ifindex1, "reload recreated the device"
    assert ROUTE in routes(lab, NAME)

    # 5. A crash (kill -9) is restarted: NRestarts=1, a new process, the device recreated.
    lab.run("kill", "-9", pid1)
    lab.wait_for("NRestarts=1", lambda: lab.show(UNIT, "NRestarts")["NRestarts"] == "1")
    lab.run("systemctl", "start", UNIT)  # returns when the new process is READY
    st = lab.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts")
    assert (st["ActiveState"], st["SubState"], st["NRestarts"]) == ("active", "running", "1"), st
    assert st["MainPID"] not in ("0", pid1), st
    dev = link(lab, NAME)
    assert dev is not None and dev["ifindex"] != ifindex1, "device not recreated"
    assert {ROUTE, ROUTE2} <= routes(lab, NAME)

    # 6. Stop: inactive, device, addresses and routes gone.
    lab.run("systemctl", "stop", UNIT)
    st = lab.show(UNIT, "ActiveState", "Result")
    assert (st["ActiveState"], st["Result"]) == ("inactive", "success"), st
    assert link(lab, NAME) is None, f"device {NAME} still there after stop"
    all_routes = lab.run("ip", "route", "show", "table", "all").stdout
    assert "10.99.0.0/24" not in all_routes and "10.98.0.0/24" not in all_routes, all_routes

    # 7. The journal has simpletun's lines at their levels: info at info (6), no "<N>" left in
    # the text, no timestamps of our own.
    mine = own_lines(journal_records(lab, UNIT))
    assert mine, "nothing from simpletun in the journal"
    info = [r for r in mine if r["PRIORITY"] == "6"]
    assert info, [(r["PRIORITY"], r["MESSAGE"]) for r in mine]
    for r in mine:
        assert r["MESSAGE"].startswith("simpletun: "), r["MESSAGE"]
    print(
        f"journal of {UNIT}: {len(mine)} lines from simpletun, priorities "
        f"{sorted({r['PRIORITY'] for r in mine})}"
    )


def test_bad_config_fails_once_with_one_error_line(installed):
    lab = installed
    unit = "simpletun@st8.service"
    out = lab.run("systemctl", "start", unit, check=False)
    assert out.returncode != 0
    st = lab.show(unit, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert st["ActiveState"] == "failed" and st["Result"] == "exit-code", st
    assert st["ExecMainStatus"] == "2", st
    # RestartPreventExitStatus=2: a bad config is not restarted over and over.
    assert st["NRestarts"] == "0", st
    errs = own_lines(journal_records(lab, unit, "-p", "err"))
    assert len(errs) == 1, errs
    assert errs[0]["PRIORITY"] == "3"
    message = errs[0]["MESSAGE"]
    assert message.startswith("simpletun: error: ") and "mode" in message, message
    assert len(own_lines(journal_records(lab, unit))) == 1, "more than the one error line"
    print(f"journalctl -u {unit} -p err: {message}")
    lab.run("systemctl", "reset-failed", unit)


def test_server_on_a_privileged_port(installed):
    """listen_port 443 (TCP 443 passes most firewalls): the unit keeps CAP_NET_BIND_SERVICE."""
    lab = installed
    toml = (
        '[interface]\naddress = ["10.253.0.1/24"]\nlisten_port = 443\n'
        'key_file = "/etc/simpletun/st5.key"\n'
    )
    lab.write("/etc/simpletun/st5.toml", toml, 0o600)
    lab.run("cp", f"/etc/simpletun/{NAME}.key", "/etc/simpletun/st5.key")
    unit = "simpletun@st5.service"
    out = lab.run("systemctl", "start", unit, check=False)
    assert out.returncode == 0, lab.journal("-u", unit, "-o", "cat")
    listening = lab.run("ss", "-Htln", "sport = :443").stdout
    assert ":443" in listening, listening
    lab.run("systemctl", "stop", unit)


@pytest.mark.parametrize("transport, port", [("udp", 4510), ("raw", 4511)])
def test_datagram_transports_run_under_the_unit(installed, transport, port):
    """ESP-in-UDP and raw ESP (a raw IP socket for protocol 50: CAP_NET_RAW) servers start."""
    lab = installed
    name = f"st{port - 4500}"
    lab.run("cp", f"/etc/simpletun/{NAME}.key", f"/etc/simpletun/{name}.key")
    toml = (
        f'[interface]\naddress = ["10.254.{port - 4500}.1/24"]\nlisten_port = {port}\n'
        f'transport = "{transport}"\nkey_file = "/etc/simpletun/{name}.key"\n'
    )
    lab.write(f"/etc/simpletun/{name}.toml", toml, 0o600)
    unit = f"simpletun@{name}.service"
    try:
        out = lab.run("systemctl", "start", unit, check=False)
        assert out.returncode == 0, lab.journal("-u", unit, "-o", "cat")
        pid = lab.show(unit, "MainPID")["MainPID"]
        sockets = lab.run("ss", "-Hawunp").stdout
        local = {line.split()[4] for line in sockets.splitlines() if f"pid={pid}," in line}
        assert any(a.endswith(f":{port}") for a in local), sockets
        if transport == "raw":  # the raw IP socket for ESP (protocol 50)
            assert any(a.endswith(":50") for a in local), sockets
    finally:
        lab.run("systemctl", "stop", unit, check=False)
