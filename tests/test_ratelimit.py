"""Bounded logs: the rate limiter lets a burst of each message kind through, drops the rest and
summarises them when the window ends; memory stays bounded whatever the templates."""

import logging

from simpletun.ratelimit import RateLimitFilter, SourceLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(burst=3, window=10.0):
    clock = Clock()
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    limiter = RateLimitFilter(window=window, burst=burst, clock=clock)
    limiter.handler = handler
    handler.addFilter(limiter)
    log = logging.getLogger(f"simpletun.test.{id(handler)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, limiter, clock, lines


def test_burst_passes_rest_suppressed_then_summarised():
    log, limiter, clock, lines = make(burst=3)
    for i in range(1000):
        log.warning("handshake with %s failed: %s", f"10.0.0.{i % 250}", "bad")
    assert len(lines) == 3
    clock.t += 10.0
    limiter.flush()
    assert len(lines) == 4
    assert lines[-1].startswith("... 997 similar messages suppressed in the last 10 s: ")
    assert lines[-1].endswith("handshake with %s failed: %s")
    # a new window: the burst passes again
    log.warning("handshake with %s failed: %s", "x", "y")
    assert len(lines) == 5


def test_kinds_are_limited_separately_and_summary_only_when_something_was_dropped():
    log, limiter, clock, lines = make(burst=2)
    for _ in range(5):
        log.info("a %s", 1)
        log.info("b %s", 2)
    assert lines == ["a 1", "b 2", "a 1", "b 2"]
    log.info("c")
    clock.t += 11
    limiter.flush()
    summaries = [ln for ln in lines if "suppressed" in ln]
    assert len(summaries) == 2 and not any(ln.endswith(": c") for ln in summaries)


def test_expiry_also_happens_on_the_next_record_without_flush():
    log, limiter, clock, lines = make(burst=1)
    log.error("boom %d", 1)
    log.error("boom %d", 2)
    clock.t += 10
    log.error("boom %d", 3)
    assert lines == [
        "boom 1",
        "... 1 similar messages suppressed in the last 10 s: boom %d",
        "boom 3",
    ]


def test_memory_is_bounded_by_max_kinds():
    limiter = RateLimitFilter(max_kinds=16)
    for i in range(10_000):
        rec = logging.LogRecord("x", logging.INFO, __file__, 0, f"template {i}", (), None)
        limiter.filter(rec)
    assert len(limiter._kinds) <= 16


def test_source_limiter_per_source_burst_period_and_bounded_memory(caplog):
    lim = SourceLimiter(burst=2, period=60.0, max_sources=3)
    with caplog.at_level(logging.INFO, logger="simpletun"):
        got = [lim.allow("192.0.2.1", 0.0) for _ in range(4)]
    assert got == [True, True, False, False]
    assert lim.suppressed == 2
    assert [r.getMessage() for r in caplog.records] == [
        "further such messages from 192.0.2.1 suppressed for 60 s"
    ]
    assert lim.allow("192.0.2.2", 1.0), "another source has its own burst"
    assert not lim.allow("192.0.2.1", 59.0)
    assert lim.allow("192.0.2.1", 60.0), "a new period starts"
    for i in range(100):  # many sources: memory stays bounded
        lim.allow(f"198.51.100.{i}", 61.0)
    assert len(lim._seen) <= 3
