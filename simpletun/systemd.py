"""systemd integration that needs no library: ``sd_notify`` over ``$NOTIFY_SOCKET``.

:func:`notify` sends ``READY=1``, ``STATUS=...``, ``RELOADING=1``, ``STOPPING=1`` and the like to
the service manager when it asked for them (``Type=notify``), and does nothing otherwise.

Logs for journald: when stderr is the journal's stream (:func:`stderr_is_journal`),
:class:`JournalFormatter` prefixes each line with its syslog priority ``<N>``, which journald
reads (``SyslogLevelPrefix=``, on by default) so that ``journalctl -p err`` finds the errors.
"""

from __future__ import annotations

import logging
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


# Syslog priorities (sd-daemon.h's SD_ERR etc.) of Python's logging levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def stderr_is_journal() -> bool:
    """True when stderr is journald's stream for this service: ``$JOURNAL_STREAM`` is set and
    names stderr's ``device:inode`` (so a child started with another stderr is not fooled)."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: ERROR -> 3 (err), WARNING -> 4, INFO -> 6,
    DEBUG -> 7."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def journal_prefix(priority: int) -> str:
    """``"<N>"`` (journald's SyslogLevelPrefix) when stderr goes to the journal, else ``""``."""
    return f"<{priority}>" if stderr_is_journal() else ""


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with ``<N>``, its syslog priority, so that journald files
    it at that priority (``journalctl -p err``). No timestamps: journald adds its own."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))
