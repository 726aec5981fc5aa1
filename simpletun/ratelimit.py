"""Bounded logs: repeated messages are rate-limited and summarised.

A flood (bad connections, forged handshakes, a flapping peer) must not turn into a flood of log
lines. :class:`RateLimitFilter` lets through the first ``burst`` (20) records of each message
template (the ``%``-format string, so the same event from many sources counts as one kind) in
every ``window`` seconds and drops the rest; when the window ends, one line says how many were
dropped::

    simpletun: ... 5123 similar messages suppressed in the last 10 s: handshake with %s failed: %s

Records at ERROR and above are limited the same way (an attacker can make errors too), but each
kind's first record always passes. :class:`SourceLimiter` adds a per-source-address limit that
code asks before logging an event unauthenticated input can trigger (the IKE endpoint does).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

_log = logging.getLogger("simpletun")

DEFAULT_WINDOW = 10.0
DEFAULT_BURST = 20


@dataclass
class _Kind:
    start: float
    passed: int = 0
    suppressed: int = 0
    level: int = logging.INFO


class RateLimitFilter(logging.Filter):
    """A handler filter: at most ``burst`` records per message template per ``window`` s."""

    def __init__(
        self,
        window: float = DEFAULT_WINDOW,
        burst: int = DEFAULT_BURST,
        clock=time.monotonic,
        max_kinds: int = 1024,
    ) -> None:
        super().__init__()
        self.window = window
        self.burst = burst
        self.clock = clock
        self.max_kinds = max_kinds
        self._kinds: dict[tuple[str, str], _Kind] = {}
        self._emitting_summary = False
        self.handler: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self._emitting_summary or getattr(record, "ratelimit_summary", False):
            return True
        now = self.clock()
        self._expire(now)
        key = (record.name, str(record.msg))
        kind = self._kinds.get(key)
        if kind is None:
            if len(self._kinds) >= self.max_kinds:  # bounded memory, whatever the templates
                self._kinds.pop(next(iter(self._kinds)))
            kind = self._kinds[key] = _Kind(start=now)
        if kind.passed < self.burst:
            kind.passed += 1
            return True
        kind.suppressed += 1
        kind.level = max(kind.level, record.levelno)
        return False

    def flush(self) -> None:
        """Summarise windows that have ended (call now and then, e.g. every second)."""
        self._expire(self.clock())

    def _expire(self, now: float) -> None:
        ended = [k for k, v in self._kinds.items() if now - v.start >= self.window]
        for key in ended:
            kind = self._kinds.pop(key)
            if kind.suppressed:
                self._summary(key, kind, now)

    def _summary(self, key: tuple[str, str], kind: _Kind, now: float) -> None:
        name, template = key
        text = template if len(template) <= 120 else template[:117] + "..."
        record = logging.LogRecord(
            name,
            min(kind.level, logging.WARNING),
            __file__,
            0,
            "... %d similar messages suppressed in the last %.0f s: %s",
            (kind.suppressed, min(now - kind.start, self.window), text),
            None,
        )
        record.ratelimit_summary = True
        if self.handler is not None:
            self._emitting_summary = True
            try:
                self.handler.handle(record)
            finally:
                self._emitting_summary = False


class SourceLimiter:
    """Per source (the IKE endpoint's): at most ``burst`` log lines per source address per
    ``period`` seconds for events that unauthenticated input can trigger, decided by the caller
    with :meth:`allow` before it logs; memory bounded by ``max_sources``. The handler-wide
    :class:`RateLimitFilter` still applies to what passes."""

    def __init__(
        self,
        burst: int = 5,
        period: float = 60.0,
        max_sources: int = 4096,
        logger: logging.Logger | None = None,
    ):
        self.burst, self.period, self.max_sources = burst, period, max_sources
        self.log = logger or _log
        self._seen: dict[str, tuple[float, int]] = {}
        self.suppressed = 0

    def allow(self, source: str, now: float) -> bool:
        start, n = self._seen.get(source, (now, 0))
        if now - start >= self.period:
            start, n = now, 0
        if n >= self.burst:
            self.suppressed += 1
            return False
        if len(self._seen) >= self.max_sources and source not in self._seen:
            self._seen.clear()
        self._seen[source] = (start, n + 1)
        if n + 1 == self.burst:
            self.log.info(
                "further such messages from %s suppressed for %.0f s", source, self.period
            )
        return True
