"""Small asyncio helpers shared by the adapters and services."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

_T = TypeVar("_T")
_U = TypeVar("_U")
_K = TypeVar("_K")
_V = TypeVar("_V")


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


class Batcher(Generic[_K, _V]):
    """Joins concurrent lookups of keys into batched calls of ``fetch(keys)``.

    A lookup starts a batch of its own at once while fewer than ``parallel`` batches run;
    otherwise it waits with the others that came meanwhile, and they go together (at most
    ``max_batch`` keys) as soon as a running batch ends. So a lone lookup waits for nothing,
    and under load one call serves many. Every answer comes from a call that started after
    the lookup was made: nothing is served from before it.

    ``fetch`` answers each key it was given with a value or an exception for that key alone;
    an exception it raises goes to every lookup of the batch. A lookup cancelled while it
    waits leaves its batch running for the others.
    """

    def __init__(
        self,
        fetch: Callable[[list[_K]], Awaitable[Mapping[_K, _V | Exception]]],
        *,
        parallel: int,
        max_batch: int,
        name: str,
    ) -> None:
        """``name`` names the batches' tasks."""
        if parallel < 1 or max_batch < 1:
            msg = f"parallel and max_batch must be at least 1, not {parallel} and {max_batch}"
            raise ValueError(msg)
        self._fetch = fetch
        self._parallel = parallel
        self._max_batch = max_batch
        self._name = name
        self._waiting: dict[_K, list[asyncio.Future[_V]]] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def get(self, key: _K) -> _V:
        """The value of ``key``, from a call started after this one was made."""
        future: asyncio.Future[_V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        self._start_if_free()
        return await future

    def _start_if_free(self) -> None:
        while self._waiting and len(self._running) < self._parallel:
            keys = list(itertools.islice(self._waiting, self._max_batch))
            batch = {key: self._waiting.pop(key) for key in keys}
            task = asyncio.get_running_loop().create_task(self._run(batch), name=self._name)
            self._running.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_if_free()

    async def _run(self, batch: dict[_K, list[asyncio.Future[_V]]]) -> None:
        try:
            answers = await self._fetch(list(batch))
        except Exception as exc:  # noqa: BLE001  # handed to every lookup of the batch
            answers = dict.fromkeys(batch, exc)
        except asyncio.CancelledError:
            for futures in batch.values():
                for future in futures:
                    future.cancel()
            raise
        for key, futures in batch.items():
            answer = (
                answers[key]
                if key in answers
                else LookupError(f"{self._name}: no answer for {key!r}")
            )
            for future in futures:
                if future.done():  # its lookup was cancelled
                    continue
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
