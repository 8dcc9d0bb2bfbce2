"""Bounded concurrency with plain errors.

trio nurseries raise ExceptionGroup; callers of the store layer expect one SnapfsError they
can report in one line. `run_all` runs calls concurrently (at most `limit` at a time) and, if
any failed, raises the first failure itself (outer cancellation propagates untouched).
"""

import contextlib
from collections.abc import Awaitable, Callable, Iterable

import trio


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@contextlib.asynccontextmanager
async def plain_errors_nursery():
    """A nursery whose failure is raised as the first error itself, as run_all does."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        failures = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if not failures:
            raise
        raise failures[0] from None


async def run_all(calls: Iterable[Callable[[], Awaitable[object]]], limit: int) -> None:
    limiter = trio.CapacityLimiter(limit)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with limiter:
            await call()

    async with plain_errors_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)
