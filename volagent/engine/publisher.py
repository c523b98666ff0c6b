"""Publishes task events to the broker, in order, from the journal's event outbox.

Every event is queued in the journal first (:meth:`~volagent.engine.journal.Journal.add_event`
numbers and stores it in one transaction) and handed to :meth:`EventPublisher.queued`. The
publisher sends them one at a time in outbox order and waits for each PUBACK, so a task's
events reach the broker in ``seq`` order. Confirmed events are dropped from the outbox in
batches: every ``ack_every`` events, once nothing new was queued for ``ack_idle_s``, and on
:meth:`EventPublisher.drain` (one journal transaction each, not one per event).
Events still queued when the agent stops (or dies) are loaded again by :meth:`load` and sent
at the next start: an event can be published twice, never lost.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import structlog

from volagent.engine.journal import AsyncJournal
from volagent.errors import VolagentError

_log = structlog.get_logger(__name__)

#: What :meth:`EventPublisher.run` is called in the daemon's task group.
TASK_NAME: Final = "event-publisher"

Publish = Callable[[bytes], Awaitable[None]]


class EventPublisher:
    """The event outbox's sender."""

    def __init__(
        self,
        journal: AsyncJournal,
        publish: Publish,
        *,
        retry_s: float = 1.0,
        ack_every: int = 64,
        ack_idle_s: float = 0.1,
    ) -> None:
        """Send with ``publish`` (which returns once the broker confirmed the event)."""
        self._journal = journal
        self._publish = publish
        self._retry_s = retry_s
        self._ack_every = ack_every
        self._ack_idle_s = ack_idle_s
        #: Confirmed by the broker, still in the journal's outbox.
        self._unacked: list[int] = []
        self._heap: list[tuple[int, bytes]] = []
        self._known: set[int] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._published = 0

    @property
    def depth(self) -> int:
        """Events queued and not yet confirmed by the broker."""
        return len(self._heap)

    @property
    def published(self) -> int:
        """Events confirmed by the broker since start."""
        return self._published

    def queued(self, event_id: int, body: bytes) -> None:
        """Hand over an event just queued in the journal under ``event_id``."""
        if event_id in self._known:
            return
        self._known.add(event_id)
        heapq.heappush(self._heap, (event_id, body))
        self._idle.clear()
        self._wake.set()

    async def load(self) -> int:
        """Take over the events left in the outbox by an earlier run; return how many."""
        loaded, after = 0, 0
        while True:
            batch = await self._journal.events_queued(1000, after=after)
            for event_id, body in batch:
                if event_id not in self._known:
                    self.queued(event_id, body)
                    loaded += 1
            if len(batch) < 1000:
                return loaded
            after = batch[-1][0]

    async def run(self) -> NoReturn:
        """Send queued events forever; a broker outage only delays them."""
        while True:
            if not self._heap:
                await self._idle_wait()
                continue
            event_id, body = self._heap[0]
            try:
                await self._publish(body)
            except VolagentError as exc:
                _log.warning("event publish failed; retrying", error=exc.message)
                await asyncio.sleep(self._retry_s)
                continue
            heapq.heappop(self._heap)
            self._known.discard(event_id)
            self._published += 1
            # Exactly the ids sent are dropped: an event queued in the journal but never
            # handed over stays there and is sent after the next start.
            self._unacked.append(event_id)
            if len(self._unacked) >= self._ack_every:
                await self._ack()

    async def _idle_wait(self) -> None:
        """Wait for an event; drop the confirmed ones from the outbox after ``ack_idle_s``."""
        self._idle.set()
        self._wake.clear()
        if not self._unacked:
            await self._wake.wait()
            return
        try:
            async with asyncio.timeout(self._ack_idle_s):
                await self._wake.wait()
        except TimeoutError:
            await self._ack()

    async def _ack(self) -> None:
        ids, self._unacked = self._unacked, []
        if not ids:
            return
        try:
            await self._journal.events_ack(ids)
        except BaseException:
            self._unacked = ids + self._unacked  # still confirmed; dropped at the next ack
            raise

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued event is confirmed (at most ``timeout_s``); return whether.

        The confirmed events are then dropped from the outbox, so that the next start does
        not send them again.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
                await self._ack()
        except TimeoutError:
            return False
        return True
