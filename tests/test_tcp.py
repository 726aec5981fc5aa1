"""Admission of connections that have not proved the key: always admit the newest, push out
idle ones first, bound each source."""

import trio
from triotest import trio_test

from simpletun.tcp import Admission


def scopes(n):
    return [trio.CancelScope() for _ in range(n)]


@trio_test
async def test_full_table_evicts_the_oldest_idle_not_the_newest():
    adm = Admission(limit=4, per_source=4)
    ss = scopes(6)
    ctx = [adm.admit(f"10.0.0.{i}", s) for i, s in enumerate(ss[:4])]
    entries = [c.__enter__() for c in ctx]
    entries[0].progressed()  # the oldest has sent a real hello: it is kept
    c4 = adm.admit("10.0.0.9", ss[4])
    c4.__enter__()
    assert [s.cancel_called for s in ss[:5]] == [False, True, False, False, False]
    assert adm.evicted == 1 and len(adm) == 4


@trio_test
async def test_all_progressed_then_the_oldest_goes():
    adm = Admission(limit=2, per_source=2)
    ss = scopes(3)
    held = [adm.admit(f"h{i}", s) for i, s in enumerate(ss[:2])]  # keep the contexts alive
    for c in held:
        c.__enter__().progressed()
    held.append(adm.admit("h9", ss[2]))
    held[-1].__enter__()
    assert [s.cancel_called for s in ss] == [True, False, False]


@trio_test
async def test_one_source_cannot_take_more_than_its_share():
    adm = Admission(limit=32, per_source=3)
    attacker = scopes(10)
    held = [adm.admit("192.0.2.66", s) for s in attacker]
    for c in held:
        c.__enter__()
    assert sum(not s.cancel_called for s in attacker) == 3
    honest = trio.CancelScope()
    held.append(adm.admit("192.0.2.10", honest))
    held[-1].__enter__()
    assert not honest.cancel_called
    assert len(adm) == 4


@trio_test
async def test_leaving_frees_the_slot():
    adm = Admission(limit=1, per_source=1)
    a, b = scopes(2)
    with adm.admit("x", a):
        pass
    with adm.admit("x", b):
        assert len(adm) == 1
    assert not a.cancel_called and not b.cancel_called and len(adm) == 0
