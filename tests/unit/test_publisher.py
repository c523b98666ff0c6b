"""The event publisher over a real journal's event outbox, with a fake broker publish function.

The fake broker checks on every publish that no event it has not confirmed yet was dropped
from the journal: an event may be published twice, never acknowledged before it was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from volagent.adapters.mqtt import BrokerUnavailable
from volagent.engine.journal import AsyncJournal, journal_path
from volagent.engine.publisher import EventPublisher

HANG_S = 10.0
RETRY_S = 0.001


class Broker:
    """The broker's side of ``publish``: confirms, refuses or holds events as a test says."""

    def __init__(self, journal: AsyncJournal) -> None:
        self._journal = journal
        #: Every call, in order; confirmed events, in order.
        self.attempts: list[bytes] = []
        self.called = asyncio.Event()
        self.confirmed: list[bytes] = []
        #: Refuse every publish while set; refuse an event this many more times.
        self.down = False
        self.refusals: dict[bytes, int] = {}
        #: Confirm this many events at most; a publish past them waits for :meth:`allow`.
        self.limit: int | None = None
        self._more = asyncio.Event()
        #: The events of the test; those of them not confirmed yet that a publish found
        #: missing from the journal's outbox (acknowledged before they were sent).
        self.expected: list[bytes] = []
        self.lost: list[bytes] = []

    async def publish(self, body: bytes) -> None:
        self.attempts.append(body)
        self.called.set()
        if self.expected:
            outbox = {b for _, b in await self._journal.events_queued(100_000)}
            self.lost += [b for b in self.expected if b not in self.confirmed and b not in outbox]
        if self.down or self.refusals.get(body, 0) > 0:
            if not self.down:
                self.refusals[body] -= 1
            msg = "the broker is down"
            raise BrokerUnavailable(msg)
        while self.limit is not None and len(self.confirmed) >= self.limit:
            self._more.clear()
            await self._more.wait()
        self.confirmed.append(body)

    def allow(self, limit: int | None) -> None:
        """Confirm up to ``limit`` events in all (None: every one)."""
        self.limit = limit
        self._more.set()


async def queue(journal: AsyncJournal, count: int, *, prefix: str = "event") -> list[bytes]:
    """Queue ``count`` events in the journal's outbox (not handed to any publisher)."""
    bodies = [f"{prefix} {i}".encode() for i in range(count)]
    for body in bodies:
        await journal.queue_event("task", body)
    return bodies


async def hand_over(
    journal: AsyncJournal, publisher: EventPublisher, count: int, *, prefix: str = "event"
) -> list[bytes]:
    """Queue ``count`` events and hand each to the publisher, as the engine does."""
    bodies = []
    for i in range(count):
        body = f"{prefix} {i}".encode()
        publisher.queued(await journal.queue_event("task", body), body)
        bodies.append(body)
    return bodies


@asynccontextmanager
async def sending(publisher: EventPublisher) -> AsyncIterator[None]:
    """Run the publisher for the block; it must still be running at the end."""
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def wait_for(condition: asyncio.Event) -> None:
    async with asyncio.timeout(HANG_S):
        await condition.wait()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return journal_path(tmp_path / "state")


@pytest.fixture
async def journal(path: Path) -> AsyncIterator[AsyncJournal]:
    async with await AsyncJournal.open(path) as j:
        yield j


@pytest.fixture
def broker(journal: AsyncJournal) -> Broker:
    return Broker(journal)


# ------------------------------------------------------------------ order and acks


@pytest.mark.parametrize("ack_every", [1, 4, 64])
async def test_events_are_published_once_each_in_outbox_order_and_then_dropped(
    journal: AsyncJournal, broker: Broker, ack_every: int
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S, ack_every=ack_every)
    bodies = await queue(journal, 20)
    ids = [event_id for event_id, _ in await journal.events_queued(100)]
    broker.expected = bodies
    # Handed over out of order: the outbox order (the ids) is what counts.
    for index in [3, 0, 19, 1, 2, *range(4, 19)]:
        publisher.queued(ids[index], bodies[index])
    publisher.queued(ids[0], bodies[0])  # handing an event over twice changes nothing

    async with sending(publisher):
        assert await publisher.drain(HANG_S)

    assert broker.confirmed == bodies
    assert broker.attempts == bodies
    assert broker.lost == []
    assert (publisher.published, publisher.depth) == (20, 0)
    assert await journal.events_queued(100) == []


async def test_a_refused_publish_is_retried_and_the_order_is_kept(
    journal: AsyncJournal, broker: Broker
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S, ack_every=2)
    bodies = await hand_over(journal, publisher, 6)
    broker.expected = bodies
    broker.refusals = {bodies[0]: 2, bodies[3]: 3}  # at the start and in the middle

    async with sending(publisher):
        assert await publisher.drain(HANG_S)

    assert broker.confirmed == bodies
    e = bodies
    assert broker.attempts == [e[0], e[0], e[0], e[1], e[2], e[3], e[3], e[3], e[3], e[4], e[5]]
    assert broker.lost == []
    assert await journal.events_queued(100) == []


async def wait_for_attempts(broker: Broker, count: int) -> None:
    async with asyncio.timeout(HANG_S):
        while len(broker.attempts) < count:
            broker.called.clear()
            await broker.called.wait()


async def test_confirmed_events_leave_the_outbox_in_batches_and_unconfirmed_ones_stay(
    journal: AsyncJournal, broker: Broker
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S, ack_every=3)
    bodies = await hand_over(journal, publisher, 10)
    ids = [event_id for event_id, _ in await journal.events_queued(100)]
    broker.expected = bodies

    broker.allow(7)

    async with sending(publisher):
        await wait_for_attempts(broker, 8)
        # Seven confirmed, the eighth held by the broker: acknowledged up to the sixth.
        assert broker.confirmed == bodies[:7]
        assert [i for i, _ in await journal.events_queued(100)] == ids[6:]
        assert publisher.depth == 3
        broker.allow(None)
        assert await publisher.drain(HANG_S)

    assert broker.confirmed == bodies
    assert broker.lost == []
    assert await journal.events_queued(100) == []


async def test_confirmed_events_leave_the_outbox_once_nothing_new_comes_for_a_while(
    journal: AsyncJournal, broker: Broker
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S, ack_idle_s=0.2)
    bodies = await hand_over(journal, publisher, 3)
    broker.expected = bodies

    async with sending(publisher):
        await wait_for_attempts(broker, 3)
        # Confirmed, fewer than ack_every (64): still in the outbox right after.
        assert len(await journal.events_queued(100)) == 3
        async with asyncio.timeout(HANG_S):
            while await journal.events_queued(100):  # noqa: ASYNC110  # no drain(), no event to wait on
                await asyncio.sleep(0.01)
        assert broker.confirmed == bodies
    assert broker.lost == []


# ------------------------------------------------------------------ restarts


@pytest.mark.parametrize(("ack_every", "resent_from"), [(1, 3), (2, 2), (64, 0)])
async def test_events_a_stopped_publisher_left_are_sent_by_the_next_after_load(
    journal: AsyncJournal, ack_every: int, resent_from: int
) -> None:
    first_broker = Broker(journal)
    first = EventPublisher(journal, first_broker.publish, retry_s=RETRY_S, ack_every=ack_every)
    bodies = await hand_over(journal, first, 5)
    first_broker.expected = bodies
    first_broker.allow(3)  # the fourth is sent but never confirmed
    async with sending(first):
        await wait_for_attempts(first_broker, 4)
    assert first_broker.confirmed == bodies[:3]
    assert first_broker.lost == []

    second_broker = Broker(journal)
    second_broker.expected = bodies[3:]
    second = EventPublisher(journal, second_broker.publish, retry_s=RETRY_S, ack_every=ack_every)
    # What the first acknowledged is not sent again; the rest is, confirmed or not.
    assert await second.load() == 5 - resent_from
    async with sending(second):
        assert await second.drain(HANG_S)

    assert second_broker.confirmed == bodies[resent_from:]
    assert second_broker.lost == []
    assert await journal.events_queued(100) == []


async def test_load_keeps_events_already_handed_over_once(
    journal: AsyncJournal, broker: Broker
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S)
    left = await queue(journal, 3, prefix="left")
    handed = await hand_over(journal, publisher, 2, prefix="handed")

    assert await publisher.load() == 3
    assert await publisher.load() == 0
    assert publisher.depth == 5
    async with sending(publisher):
        assert await publisher.drain(HANG_S)
    assert broker.confirmed == left + handed


async def test_load_takes_over_more_events_than_one_batch_and_none_is_lost(
    journal: AsyncJournal, broker: Broker
) -> None:
    left = await queue(journal, 1005, prefix="left")
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S)
    loaded = await publisher.load()
    fresh = await hand_over(
        journal, publisher, 1, prefix="fresh"
    )  # a task's event made after the start

    async with sending(publisher):
        assert await publisher.drain(HANG_S)

    outbox = [body for _, body in await journal.events_queued(10_000)]
    assert (loaded, broker.confirmed, outbox) == (1005, left + fresh, [])


async def test_an_event_in_the_outbox_but_never_handed_over_is_not_acknowledged(
    journal: AsyncJournal, broker: Broker
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S, ack_every=1)
    [orphan] = await queue(journal, 1, prefix="orphan")
    handed = await hand_over(journal, publisher, 1, prefix="handed")
    broker.expected = [orphan, *handed]

    async with sending(publisher):
        assert await publisher.drain(HANG_S)

    # Either sent or still waiting in the journal for the next load(): not dropped unsent.
    outbox = [body for _, body in await journal.events_queued(100)]
    assert orphan in broker.confirmed or outbox == [orphan]
    assert handed[0] in broker.confirmed


# ------------------------------------------------------------------ drain


async def test_drain_is_false_while_the_broker_is_down_and_true_once_all_are_confirmed(
    journal: AsyncJournal, broker: Broker
) -> None:
    publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S)
    assert await publisher.drain(0.01)  # nothing queued
    broker.down = True
    bodies = await hand_over(journal, publisher, 3)
    broker.expected = bodies

    async with sending(publisher):
        await wait_for_attempts(broker, 2)  # refused and retried
        assert not await publisher.drain(0.05)
        assert publisher.depth == 3
        assert [b for _, b in await journal.events_queued(100)] == bodies
        broker.down = False
        assert await publisher.drain(HANG_S)

    assert broker.confirmed == bodies
    assert set(broker.attempts[:-2]) == {bodies[0]}
    assert (publisher.published, publisher.depth) == (3, 0)
    assert broker.lost == []
    assert await journal.events_queued(100) == []


class SlowAckJournal(AsyncJournal):
    """A journal whose acknowledgements take a while, so events are queued meanwhile."""

    async def events_ack(self, ids: list[int]) -> int:  # type: ignore[override]  # same call, slower
        await asyncio.sleep(0.05)
        return await super().events_ack(ids)


async def test_an_event_queued_while_acknowledging_is_sent_without_another_wake_up(
    path: Path,
) -> None:
    async with await SlowAckJournal.open(path) as journal:
        broker = Broker(journal)
        publisher = EventPublisher(journal, broker.publish, retry_s=RETRY_S, ack_every=64)
        async with sending(publisher):
            first = b"first"
            publisher.queued(await journal.queue_event("task", first), first)
            await asyncio.sleep(0.01)  # sent; its acknowledgement is under way
            second = b"second"
            publisher.queued(await journal.queue_event("task", second), second)
            async with asyncio.timeout(HANG_S):
                while broker.confirmed != [first, second]:  # noqa: ASYNC110  # no event to wait on
                    await asyncio.sleep(0.01)
            assert await publisher.drain(HANG_S)
            assert await journal.events_queued(10) == []
