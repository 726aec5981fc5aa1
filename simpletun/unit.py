"""``simpletun install-service``: the systemd template unit ``simpletun@.service``.

``systemctl enable --now simpletun@wg0`` then runs ``simpletun up --foreground wg0``, the tunnel
of ``/etc/simpletun/wg0.toml``, as a ``Type=notify`` service (READY=1 once the tunnel is up,
``systemctl reload`` = SIGHUP = reload the config, restarted after a crash, not after a bad
config, exit status 2).

The unit's ``ExecStart`` is the absolute path of the ``simpletun`` command that ran
``install-service`` (e.g. ``/opt/simpletun/.venv/bin/simpletun``): run it again after moving the
installation. The service runs as root, but with only ``CAP_NET_ADMIN`` (devices, addresses,
routes, XFRM), ``CAP_NET_RAW`` (raw ESP sockets) and ``CAP_NET_BIND_SERVICE`` (a port below 1024,
e.g. TCP 443, or IKE's UDP 500/4500) in its bounding set, ``/dev/net/tun`` as its
only device, a read-only file system except its runtime directory ``/run/simpletun`` (control
sockets, mode 0700), no access to home directories (read-only when the installation or its
interpreter lives under one, e.g. a pyenv Python in /root), a private /tmp (unless the installation
is there), and the usual kernel, namespace and system call restrictions.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROG = "simpletun"
UNIT_NAME = "simpletun@.service"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
CONFIG_DIR = "/etc/simpletun"
RUNTIME_DIR = "simpletun"  # below /run
HOME_DIRS = ("/home", "/root", "/run/user")  # hidden by ProtectHome=yes
TMP_DIRS = ("/tmp", "/var/tmp")  # private (empty) with PrivateTmp

USAGE = f"""\
Usage: {PROG} install-service [--unit-dir DIR]

Writes the systemd template unit {UNIT_NAME} into DIR (default {DEFAULT_UNIT_DIR}), with
ExecStart= the absolute path of this {PROG} command. Then:

  systemctl daemon-reload
  systemctl enable --now {PROG}@NAME      # runs the tunnel of {CONFIG_DIR}/NAME.toml
  systemctl reload {PROG}@NAME            # re-reads the config (SIGHUP)
  journalctl -u {PROG}@NAME -p err        # its errors
"""

UNIT_TEMPLATE = """\
# {unit_name}, written by `{prog} install-service`: ExecStart= is the path of
# the command that wrote it (run it again after moving the installation). Local changes:
# `systemctl edit {prog}@NAME` (drop-ins survive a re-install).
# `systemctl enable --now {prog}@wg0` runs the tunnel configured in {config_dir}/wg0.toml.
[Unit]
Description=simpletun VPN tunnel %I ({config_dir}/%i.toml)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} up --foreground %i
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=1
# Exit status 2 is a bad config or command line: restarting cannot fix it.
RestartPreventExitStatus=2
TimeoutStopSec=20

# Control sockets live in /run/simpletun (root only). Shared by every instance, so it is kept
# when one instance stops.
RuntimeDirectory={runtime_dir}
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
UMask=0077

# Least privilege: root, but only what a tunnel needs. CAP_NET_ADMIN: TUN/TAP devices,
# addresses, routes, rules, XFRM states and policies; CAP_NET_RAW: raw ESP sockets;
# CAP_NET_BIND_SERVICE: a listen_port below 1024 (e.g. 443), IKE's UDP 500 and 4500.
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp={private_tmp}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

# Characters that need no quoting in an ExecStart= path.
_PLAIN = re.compile(r"[A-Za-z0-9/._+:@,=-]+")


class ServiceError(Exception):
    """A problem the user must fix; ``status`` is the exit status (2 usage, 1 runtime)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def find_executable(argv0: str | None = None) -> str:
    """The absolute path of the ``simpletun`` console script that is running (``sys.argv[0]``),
    or, under ``python -m simpletun``, the one next to the interpreter (a venv's ``bin/``) or on
    ``PATH``. Raises ServiceError when there is none."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    candidates = []
    if argv0 and os.path.basename(argv0) == PROG:
        candidates.append(argv0)
    candidates.append(os.path.join(os.path.dirname(sys.executable), PROG))
    found = shutil.which(PROG)
    if found:
        candidates.append(found)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise ServiceError(
        f"cannot find the installed '{PROG}' command: run install-service with it, e.g. "
        f"/opt/simpletun/.venv/bin/{PROG} install-service",
        2,
    )


def exec_path(path: str) -> str:
    """``path`` written as the command of an ExecStart= line: quoted if needed, ``%`` escaped
    (specifiers apply to the command; ``$`` expansion does not)."""
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in path):
        raise ServiceError(f"the path {path!r} contains control characters; install elsewhere", 2)
    escaped = path.replace("%", "%%")
    if _PLAIN.fullmatch(path):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _under_home(path: str) -> bool:
    return _under(path, HOME_DIRS)


def _program_paths(exe: str) -> list[str]:
    """Where the program lives: the script, the interpreter, the environment, the package."""
    import simpletun

    return [
        exe,
        os.path.realpath(exe),
        os.path.realpath(sys.executable),
        os.path.realpath(sys.prefix),
        os.path.realpath(os.path.dirname(simpletun.__file__)),
    ]


def placement_settings(exe: str) -> dict[str, str]:
    """``ProtectHome=`` and ``PrivateTmp=`` values that keep the program visible to its service:
    ``ProtectHome=read-only`` when it lives under a home directory (``yes`` would hide it),
    ``PrivateTmp=no`` when it lives under /tmp or /var/tmp (a private /tmp would hide it)."""
    paths = _program_paths(exe)
    return {
        "protect_home": "read-only" if any(_under(p, HOME_DIRS) for p in paths) else "yes",
        "private_tmp": "no" if any(_under(p, TMP_DIRS) for p in paths) else "yes",
    }


def render_unit(exe: str, protect_home: str = "yes", private_tmp: str = "yes") -> str:
    """The text of ``simpletun@.service`` running ``exe``."""
    return UNIT_TEMPLATE.format(
        unit_name=UNIT_NAME,
        prog=PROG,
        exec_start=exec_path(exe),
        config_dir=CONFIG_DIR,
        runtime_dir=RUNTIME_DIR,
        protect_home=protect_home,
        private_tmp=private_tmp,
    )


def install(unit_dir: str = DEFAULT_UNIT_DIR, exe: str | None = None) -> Path:
    """Write the unit into ``unit_dir`` (created if missing) atomically, mode 0644; return its
    path."""
    exe = find_executable() if exe is None else exe
    text = render_unit(exe, **placement_settings(exe))
    directory = Path(unit_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / UNIT_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{UNIT_NAME}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def main(argv: list[str]) -> int:
    """``simpletun install-service [--unit-dir DIR]``."""
    unit_dir = DEFAULT_UNIT_DIR
    args = list(argv)
    try:
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                sys.stdout.write(USAGE)
                return 0
            if arg == "--unit-dir" or arg.startswith("--unit-dir="):
                value = arg.partition("=")[2] if "=" in arg else (args.pop(0) if args else "")
                if not value:
                    raise ServiceError("--unit-dir needs a value: --unit-dir DIR", 2)
                unit_dir = value
                continue
            raise ServiceError(
                f"install-service: unknown argument '{arg}' (see {PROG} install-service -h)", 2
            )
        exe = find_executable()
        try:
            path = install(unit_dir, exe)
        except OSError as e:
            message = f"cannot write {UNIT_NAME} into {unit_dir}: {e.strerror or e}"
            raise ServiceError(message) from None
    except ServiceError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    print(f"installed {path} (ExecStart={exe} up --foreground %i)")
    print(f"next: systemctl daemon-reload && systemctl enable --now {PROG}@NAME")
    print(f"      (NAME = the config {CONFIG_DIR}/NAME.toml)")
    return 0
