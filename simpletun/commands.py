"""``simpletun up | down | reload | status``: running tunnels from config files (wg-quick style).

  simpletun up CONFIG|NAME [--foreground] [-d]   start (in the background unless --foreground,
                                                 which is what systemd runs); NAME means
                                                 /etc/simpletun/NAME.toml
  simpletun down NAME                            stop it (device, addresses and routes go)
  simpletun reload NAME                          re-read its file, apply route changes live
  simpletun status [NAME] [--json]               what it does, like `wg show`

Exit status of ``status``: 0 when every tunnel shown has its peer connected, 1 when one is
running but its peer is not connected, 3 when it (or any tunnel) is not running. Bad usage or a
bad config file: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from simpletun import configfile, control
from simpletun._errors import ConfigError

PROG = "simpletun"
NOT_RUNNING = 3

USAGE = f"""\
Usage:
  {PROG} up CONFIG|NAME [--foreground] [-d]
  {PROG} down NAME
  {PROG} reload NAME
  {PROG} status [NAME] [--json]
"""


def _error(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _split(argv: list[str], flags: set[str], max_pos: int, cmd: str) -> tuple[list[str], set[str]]:
    pos, seen = [], set()
    for a in argv:
        if a in ("-h", "--help"):
            raise _Help()
        if a.startswith("-"):
            if a not in flags:
                raise ConfigError(f"{cmd}: unknown option '{a}' (see {PROG} {cmd} -h)")
            seen.add(a)
        else:
            pos.append(a)
    if len(pos) > max_pos:
        raise ConfigError(f"{cmd}: unexpected argument '{pos[max_pos]}'")
    return pos, seen


class _Help(Exception):
    pass


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "up":
            return up(rest)
        if cmd == "down":
            return down(rest)
        if cmd == "reload":
            return reload(rest)
        return status(rest)
    except _Help:
        sys.stdout.write(USAGE)
        return 0
    except ConfigError as e:
        return _error(str(e), 2)


def _name_arg(pos: list[str], cmd: str) -> str:
    if not pos:
        raise ConfigError(f"{cmd} needs the tunnel's name: {PROG} {cmd} NAME")
    name = pos[0]
    if "/" in name or name.endswith(".toml"):
        name = configfile.resolve(name).stem
    from simpletun.config import check_ifname

    return check_ifname(name)


# -- up ---------------------------------------------------------------------------------------


def up(argv: list[str]) -> int:
    pos, flags = _split(argv, {"--foreground", "-d"}, 1, "up")
    if not pos:
        raise ConfigError(f"up needs a config: {PROG} up NAME (/etc/simpletun/NAME.toml) or a path")
    tf = configfile.load(pos[0])  # ConfigFileError: one line, exit 2
    from simpletun.cli import preflight

    preflight(tf.config)  # a bad manual key file, a kernel without ESP: one line, exit 2, now
    debug = "-d" in flags
    if "--foreground" in flags:
        return _foreground(tf, debug)
    return _background(tf, debug)


def _foreground(tf: configfile.TunnelFile, debug: bool) -> int:
    import trio

    from simpletun import cli, service

    limiter = cli._setup_logging(debug)
    svc = service.Service(tf)

    async def do_reload() -> None:
        await svc.reload()

    try:
        return trio.run(cli._run, svc.run, limiter, do_reload)
    except KeyboardInterrupt:
        return 0


def _background(tf: configfile.TunnelFile, debug: bool) -> int:
    name = tf.name
    try:
        control.request(name, {"cmd": "status"}, timeout=1.0)
    except control.NotRunning:
        pass
    else:
        return _error(f"{name} is already running (stop it first: {PROG} down {name})", 1)
    d = control.run_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = d / f"{name}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    argv = [sys.executable, "-m", "simpletun", "up", "--foreground", str(tf.path.resolve())]
    if debug:
        argv.append("-d")
    with os.fdopen(fd, "wb") as logf:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            errors = [ln for ln in lines if "error" in ln] or lines
            msg = errors[-1] if errors else f"exited {rc}"
            print(msg if msg.startswith(PROG) else f"{PROG}: error: {msg}", file=sys.stderr)
            return rc or 1
        try:
            reply = control.request(name, {"cmd": "status"}, timeout=1.0)
        except control.NotRunning:
            time.sleep(0.1)
            continue
        if reply.get("ok") and reply["status"].get("ready"):
            print(f"{PROG}: {name} is up (pid {proc.pid}; log {log_path})")
            return 0
        time.sleep(0.1)
    proc.terminate()
    return _error(f"{name} did not come up within 20 s (see {log_path})", 1)


# -- down / reload ----------------------------------------------------------------------------


def _ask(name: str, req: dict) -> dict | None:
    try:
        return control.request(name, req)
    except control.NotRunning:
        return None
    except OSError as e:
        raise ConfigError(
            f"cannot reach {name}'s control socket {control.socket_path(name)}: "
            f"{e.strerror or e} (run as root)"
        ) from None


def down(argv: list[str]) -> int:
    pos, _ = _split(argv, set(), 1, "down")
    name = _name_arg(pos, "down")
    reply = _ask(name, {"cmd": "stop"})
    if reply is None:
        return _error(f"{name} is not running (no control socket {control.socket_path(name)})", 1)
    pid = reply.get("pid")
    deadline = time.monotonic() + 10
    while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
        except OSError:
            break
        time.sleep(0.05)
    if pid and os.path.exists(f"/proc/{pid}/stat") and time.monotonic() >= deadline:
        return _error(f"{name} (pid {pid}) did not stop within 10 s", 1)
    print(f"{PROG}: {name} stopped")
    return 0


def reload(argv: list[str]) -> int:
    pos, _ = _split(argv, set(), 1, "reload")
    name = _name_arg(pos, "reload")
    reply = _ask(name, {"cmd": "reload"})
    if reply is None:
        return _error(f"{name} is not running (start it: {PROG} up {name})", 1)
    if not reply.get("ok"):
        return _error(f"reload of {name} failed: {reply.get('error')}", 1)
    parts = [
        f"routes added: {', '.join(reply['routes_added']) or 'none'}",
        f"removed: {', '.join(reply['routes_removed']) or 'none'}",
    ]
    if reply["needs_restart"]:
        parts.append(
            f"needs '{PROG} down {name}; {PROG} up {name}' for: "
            + ", ".join(reply["needs_restart"])
        )
    print(f"{PROG}: {name} reloaded ({'; '.join(parts)})")
    return 0


# -- status -----------------------------------------------------------------------------------


def status(argv: list[str]) -> int:
    pos, flags = _split(argv, {"--json"}, 1, "status")
    names = [_name_arg(pos, "status")] if pos else control.running_names()
    shown: list[dict] = []
    code = 0
    for name in names:
        reply = _ask(name, {"cmd": "status"})
        if reply is None:
            if pos:
                if "--json" in flags:
                    print(json.dumps({"interface": name, "running": False}))
                else:
                    print(f"{PROG}: {name} is not running", file=sys.stderr)
                return NOT_RUNNING
            continue
        st = reply["status"]
        st["running"] = True
        shown.append(st)
        if not st.get("up"):
            code = max(code, 1)
    if not shown:
        if "--json" in flags:
            print("[]")
        else:
            print(f"{PROG}: no tunnel is running", file=sys.stderr)
        return NOT_RUNNING
    if "--json" in flags:
        print(json.dumps(shown[0] if pos else shown, indent=2))
    else:
        print("\n\n".join(format_status(st) for st in shown))
    return code


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0, int(time.time() - t))
    return f"{s // 60} min {s % 60} s ago" if s >= 60 else f"{s} s ago"


def format_status(st: dict) -> str:
    lines = [f"interface: {st['interface']}"]
    proto = "TCP" if st["transport"] == "tcp" else "UDP"
    role = st["role"]
    if role == "server" and st.get("listen_port"):
        role = f"server, listening on {proto} port {st['listen_port']}"
    lines.append(f"  role: {role}; transport: {st['transport']}; data plane: {st['dataplane']}")
    lines.append(f"  {st['encryption']}, {st['mode'].upper()}, mtu {st['mtu']}")
    if st["addresses"]:
        lines.append(f"  addresses: {', '.join(st['addresses'])}")
    lines.append(f"  state: {'up' if st['up'] else 'down (peer not connected)'}")
    if st.get("last_exit_reason"):
        lines.append(f"  last session end: {st['last_exit_reason']}")
    for p in st["peers"]:
        lines.append("")
        lines.append(f"peer: {p.get('remote') or p.get('endpoint') or '(not connected)'}")
        if p.get("endpoint"):
            lines.append(f"  endpoint: {p['endpoint']}")
        lines.append(f"  allowed ips: {', '.join(p['allowed_ips']) or '(none routed)'}")
        manual = "manual keys" in st["encryption"]  # no handshake: the SAs since start
        label = "keyed (manual keys)" if manual else "latest handshake"
        lines.append(f"  {label}: {_ago(p['latest_handshake'])}")
        if p.get("connected"):
            lines.append(
                f"  transfer: {_bytes(p['rx_bytes'])} received ({p['rx_packets']} packets), "
                f"{_bytes(p['tx_bytes'])} sent ({p['tx_packets']} packets)"
            )
            for sa in p["sas"]:
                if "seq" in sa:
                    extra = f"seq {sa['seq']}"
                elif "highest_seq" in sa:
                    extra = f"{sa['packets']} packets, highest seq {sa['highest_seq']}"
                else:
                    extra = f"{sa['packets']} packets"
                lines.append(
                    f"  SA {sa['direction']}: spi {sa['spi']}, {extra}, age {sa['age']:.0f} s"
                )
            drops = ", ".join(f"{k}={v}" for k, v in p.get("drops", {}).items())
            lines.append(f"  drops: {drops or 'none'}")
    if st.get("drops"):  # the whole tunnel's: every peer's, and e.g. packets for no known SPI
        lines.append("")
        drops = ", ".join(f"{k}={v}" for k, v in st["drops"].items())
        lines.append(f"drops, whole tunnel: {drops}")
    return "\n".join(lines)
