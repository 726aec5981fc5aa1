"""systemd integration that needs no library: ``sd_notify`` over ``$NOTIFY_SOCKET``.

:func:`notify` sends ``READY=1``, ``STATUS=...``, ``RELOADING=1``, ``STOPPING=1`` and the like to
the service manager when it asked for them (``Type=notify``), and does nothing otherwise.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=2 peers up"``); False when not under a
    service manager that listens, or when sending fails (never raises)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not fields:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True
