"""Small asyncio helpers shared by the adapters and services."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


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
