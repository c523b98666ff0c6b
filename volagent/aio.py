"""Small asyncio helpers shared by the adapters and services."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")
_U = TypeVar("_U")


async def uninterrupted(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end even when cancelled meanwhile; such a cancellation comes after.

    For work that must not be left half done (reaping a killed child, restarting a zone): the
    awaitable runs to completion, then a cancellation received while waiting is raised; if
    there was none, its result is returned (or its exception raised).
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


async def both(first: Awaitable[_T], second: Awaitable[_U]) -> tuple[_T, _U]:
    """Await two independent reads at once; return both results.

    The first error cancels the other and is raised as it is (not in an ExceptionGroup, so
    that callers catch our errors as usual); a cancellation cancels both. Neither outlives
    the call.
    """
    one, two = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        await asyncio.wait([one, two], return_when=asyncio.FIRST_EXCEPTION)
    finally:
        one.cancel()  # no-op for a finished task
        two.cancel()
        await asyncio.wait([one, two])
    for task in (one, two):
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return one.result(), two.result()
