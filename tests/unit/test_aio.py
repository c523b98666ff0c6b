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


# ------------------------------------------------------------------ Batcher


class Source:
    """A fetch function that records its calls and holds each until the test lets it go."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.values: dict[str, int] = {}
        self.errors: dict[str, Exception] = {}
        self.fails: Exception | None = None

    async def fetch(self, keys: list[str]) -> dict[str, int | Exception]:
        self.calls.append(keys)
        # What a key is worth when the call starts: a later call sees later values.
        answers: dict[str, int | Exception] = {k: self.values.get(k, 0) for k in keys}
        await self.release.wait()
        if self.fails is not None:
            raise self.fails
        answers.update({k: e for k, e in self.errors.items() if k in keys})
        return answers


def batcher(source: Source, *, parallel: int = 1, max_batch: int = 10) -> aio.Batcher[str, int]:
    return aio.Batcher(source.fetch, parallel=parallel, max_batch=max_batch, name="test")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_lookup_is_fetched_at_once() -> None:
    source = Source()
    source.values["a"] = 1
    assert await batcher(source).get("a") == 1
    assert source.calls == [["a"]]


async def test_lookups_made_while_the_calls_run_go_together_in_the_next() -> None:
    source = Source()
    source.release.clear()
    b = batcher(source, parallel=2)
    first = [asyncio.create_task(b.get(k)) for k in ("a", "b")]
    await settle()
    assert source.calls == [["a"], ["b"]]  # two at once, each alone
    later = [asyncio.create_task(b.get(k)) for k in ("c", "a", "d", "c")]
    await settle()
    assert len(source.calls) == 2  # both running: the four wait
    source.release.set()
    await asyncio.gather(*first, *later)
    assert source.calls == [["a"], ["b"], ["c", "a", "d"]]  # one call, each key once


async def test_an_answer_comes_from_a_call_started_after_the_lookup() -> None:
    source = Source()
    source.release.clear()
    b = batcher(source)
    source.values["a"] = 1
    old = asyncio.create_task(b.get("a"))
    await settle()
    source.values["a"] = 2  # changed after the running call read it
    new = asyncio.create_task(b.get("a"))
    await settle()
    source.release.set()
    assert (await old, await new) == (1, 2)
    assert source.calls == [["a"], ["a"]]


async def test_a_batch_holds_at_most_max_batch_keys() -> None:
    source = Source()
    source.release.clear()
    b = batcher(source, max_batch=2)
    tasks = [asyncio.create_task(b.get(k)) for k in "abcde"]
    await settle()
    source.release.set()
    await asyncio.gather(*tasks)
    assert source.calls == [["a"], ["b", "c"], ["d", "e"]]


async def test_an_error_for_one_key_goes_to_its_lookups_alone() -> None:
    source = Source()
    source.release.clear()
    source.errors["bad"] = KeyError("bad")
    b = batcher(source)
    first = asyncio.create_task(b.get("x"))
    await settle()
    rest = [asyncio.create_task(b.get(k)) for k in ("ok", "bad", "bad")]
    await settle()
    source.release.set()
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(r, KeyError) for r in results[1:])


async def test_a_failed_call_fails_every_lookup_of_its_batch_and_the_next_call_runs() -> None:
    source = Source()
    source.fails = RuntimeError("down")
    b = batcher(source)
    results = await asyncio.gather(b.get("a"), b.get("b"), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    source.fails = None
    assert await b.get("a") == 0


async def test_a_key_the_fetch_did_not_answer_is_a_lookup_error() -> None:
    async def forgetful(keys: list[str]) -> dict[str, int | Exception]:
        return {}

    b: aio.Batcher[str, int] = aio.Batcher(forgetful, parallel=1, max_batch=4, name="forgetful")
    with pytest.raises(LookupError, match="no answer for 'a'"):
        await b.get("a")


async def test_a_cancelled_lookup_leaves_the_call_to_the_others() -> None:
    source = Source()
    source.release.clear()
    b = batcher(source)
    busy = asyncio.create_task(b.get("x"))
    await settle()
    first = asyncio.create_task(b.get("a"))
    second = asyncio.create_task(b.get("a"))
    await settle()
    first.cancel()
    await settle()
    source.release.set()
    assert (await busy, await second) == (0, 0)
    assert first.cancelled()
    assert source.calls == [["x"], ["a"]]


def test_a_batcher_needs_room_for_one_call_of_one_key() -> None:
    source = Source()
    with pytest.raises(ValueError, match="at least 1"):
        batcher(source, parallel=0)
    with pytest.raises(ValueError, match="at least 1"):
        batcher(source, max_batch=0)
