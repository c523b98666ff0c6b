"""Publishes task events to the broker, in order, from the journal's event outbox.

Every event is queued in the journal first (:meth:`~volagent.engine.journal.Journal.add_event`
numbers and stores it in one transaction) and handed to :meth:`EventPublisher.queued`. The
publisher sends them one at a time in outbox order and waits for each PUBACK, so a task's
events reach the broker in ``seq`` order; once confirmed, events are dropped from the outbox.
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
    ) -> None:
        """Send with ``publish`` (which returns once the broker confirmed the event)."""
        self._journal = journal
        self._publish = publish
        self._retry_s = retry_s
        self._ack_every = ack_every
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
        published: list[int] = []
        while True:
            if not self._heap:
                if published:
                    await self._journal.events_ack(published)
                    published = []
                    continue  # events queued during that await are in the heap: look again
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
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
            published.append(event_id)
            if len(published) >= self._ack_every:
                await self._journal.events_ack(published)
                published = []

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued event is confirmed (at most ``timeout_s``); return whether."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
