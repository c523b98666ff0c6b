from __future__ import annotations

import asyncio

import pytest

from volagent import aio


async def test_returns_the_result_when_not_cancelled() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await aio.uninterrupted(work()) == 7


async def test_raises_the_awaitables_own_error() -> None:
    async def fail() -> None:
        msg = "boom"
        raise ValueError(msg)

    with pytest.raises(ValueError, match="boom"):
        await aio.uninterrupted(fail())


async def test_a_cancellation_waits_for_the_work_then_is_raised() -> None:
    finished = asyncio.Event()
    release = asyncio.Event()

    async def work() -> None:
        await release.wait()
        finished.set()

    outer = asyncio.ensure_future(aio.uninterrupted(work()))
    await asyncio.sleep(0.01)
    outer.cancel()
    await asyncio.sleep(0.01)
    outer.cancel()  # a second cancellation does not cut the work short either
    await asyncio.sleep(0.01)
    assert not outer.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert finished.is_set()
