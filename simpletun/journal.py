"""Logs for journald: syslog priorities on stderr when stderr is the journal's stream.

Under systemd a service's stderr is usually connected to journald, which names that stream in
``$JOURNAL_STREAM`` (``device:inode``). :func:`stderr_is_journal` checks that it really is our
stderr; then :class:`JournalFormatter` (the CLI's log handler) prefixes every line with its
syslog priority ``<N>`` and no timestamp, and :func:`prefix_stderr_for_journal` gives the CLI's
own ``simpletun: error:`` / ``simpletun: warning:`` lines ``<3>`` / ``<4>``. journald reads the
prefix (``SyslogLevelPrefix=``, on by default), strips it and files the line at that priority,
so ``journalctl -p err`` finds the errors. Outside the journal nothing changes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys

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


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with ``<N>``, its syslog priority, so that journald files
    it at that priority (``journalctl -p err``). No timestamps: journald adds its own."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


_PREFIXED = re.compile(r"<[0-7]>")


class _JournalStderr(io.TextIOBase):
    """stderr when it is the journal: each line that has no ``<N>`` yet gets one, by the CLI's
    convention ``simpletun: error: ...`` -> ``<3>``, ``simpletun: warning: ...`` -> ``<4>``; other
    lines are left to journald's default (info). Complete lines are written at once."""

    def __init__(self, raw, prog: str) -> None:
        super().__init__()
        self._raw = raw
        self._rules = ((f"{prog}: error:", "<3>"), (f"{prog}: warning:", "<4>"))
        self._partial = ""

    def _prefix(self, line: str) -> str:
        if _PREFIXED.match(line):
            return line
        for start, prefix in self._rules:
            if line.startswith(start):
                return prefix + line
        return line

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self._raw.write("".join(self._prefix(line) + "\n" for line in lines))
            self._raw.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._raw.write(self._prefix(self._partial))
            self._partial = ""
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return self._raw.encoding


def prefix_stderr_for_journal(prog: str = "simpletun") -> bool:
    """When stderr is the journal, replace ``sys.stderr`` by a writer that gives ``<N>``
    priorities to error and warning lines (see :class:`_JournalStderr`); True if done."""
    if isinstance(sys.stderr, _JournalStderr) or not stderr_is_journal():
        return False
    sys.stderr = _JournalStderr(sys.stderr, prog)
    return True
