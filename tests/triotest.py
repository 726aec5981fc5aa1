"""A decorator running an async test under trio (no pytest plugin needed)."""

import functools

import trio

#: A hang guard, not a speed target: a test still running after this long fails.
HANG_LIMIT_S = 20


def trio_test(fn):
    """Run an async test function under trio.run, failing it if it takes over HANG_LIMIT_S
    rather than hanging."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            with trio.fail_after(HANG_LIMIT_S):
                return await fn(*args, **kwargs)

        return trio.run(bounded)

    return wrapper
