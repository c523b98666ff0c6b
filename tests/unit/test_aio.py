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


async def test_both_returns_the_two_results_of_work_done_at_once() -> None:
    started: list[str] = []

    async def read(name: str) -> str:
        started.append(name)
        await asyncio.sleep(0.05)
        assert len(started) == 2  # the other one started meanwhile
        return name.upper()

    assert await aio.both(read("a"), read("b")) == ("A", "B")


async def test_both_raises_the_first_error_itself_and_cancels_the_other() -> None:
    other_cancelled = asyncio.Event()

    async def fails() -> int:
        await asyncio.sleep(0.01)
        msg = "bad"
        raise ValueError(msg)

    async def slow() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            other_cancelled.set()
            raise
        return 1

    for args in ((fails(), slow()), (slow(), fails())):
        other_cancelled.clear()
        with pytest.raises(ValueError, match="bad"):
            await aio.both(*args)
        assert other_cancelled.is_set()


async def test_a_cancelled_both_cancels_its_two_reads() -> None:
    cancelled: list[str] = []

    async def slow(name: str) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    waiting = asyncio.create_task(aio.both(slow("a"), slow("b")))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert sorted(cancelled) == ["a", "b"]
