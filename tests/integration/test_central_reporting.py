"""Central reporting end to end: a real journal, the real client, a real (misbehaving) server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.central import CentralServer, Request
from volagent import __version__
from volagent.adapters.central import CentralClient
from volagent.engine.journal import AsyncJournal, OutboxEntry, journal_path
from volagent.errors import StorageUnavailable, VolagentError
from volagent.services.reporter import (
    OP_HEARTBEAT,
    OP_PUT_VOLUME,
    Heartbeat,
    Reporter,
    heartbeat_body,
)

VOLS = [f"0f6c8f0e-5d6b-4a43-9a57-2d2c3b1e4f{i:02x}" for i in range(4)]
CN = "44454c4c-3800-1048-8052-b3c04f4e4b31"
GUARD_S = 60.0  # hang guard only


class Seen:
    """Things a callback saw, with a way to wait until there are enough of them."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, *item: Any) -> None:
        self.items.append(item[0] if len(item) == 1 else item)
        self._changed.set()

    async def at_least(self, n: int) -> None:
        async with asyncio.timeout(GUARD_S):
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def server() -> AsyncIterator[CentralServer]:
    async with CentralServer() as srv:
        yield srv


@contextlib.asynccontextmanager
async def running(service: Reporter | Heartbeat) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(service.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reporter(journal: AsyncJournal, client: CentralClient, **kw: Any) -> Reporter:
    return Reporter(journal, client, backoff_initial_s=0.02, backoff_max_s=0.2, poll_s=0.05, **kw)


async def queue(journal: AsyncJournal, uuid: str) -> int:
    """Save a new generation of a volume with report=True, as the engine does."""
    generation = await journal.bump_generation(uuid)
    body = json.dumps({"uuid": uuid, "generation": generation}).encode()
    assert await journal.save_volume(uuid, generation, body, now=datetime.now(UTC), report=True)
    return generation


async def drained(journal: AsyncJournal, *, down_to: int = 0) -> None:
    """Wait until the outbox holds ``down_to`` reports (deliveries are dropped after the 2xx)."""
    async with asyncio.timeout(GUARD_S):
        while await journal.outbox_depth() > down_to:  # noqa: ASYNC110 -- the journal has no change notification
            await asyncio.sleep(0.02)


def per_volume(requests: list[Request]) -> dict[str, list[int]]:
    """The generations each volume's reports carried, in arrival order."""
    out: dict[str, list[int]] = {}
    for r in requests:
        if r.path.startswith("/volumes/"):
            body = r.json()
            assert r.path == f"/volumes/{body['uuid']}"
            out.setdefault(body["uuid"], []).append(body["generation"])
    return out


def each(volumes: list[str], generations: list[int]) -> dict[str, list[int]]:
    return {v: list(generations) for v in volumes}


def collapsed(generations: list[int]) -> list[int]:
    return [g for i, g in enumerate(generations) if i == 0 or generations[i - 1] != g]


def taken_count(n: int) -> Callable[[list[Request]], bool]:
    return lambda reqs: sum(r.taken for r in reqs if r.path.startswith("/volumes/")) >= n


async def test_an_outage_loses_nothing_and_keeps_order(
    tmp_path: Path, server: CentralServer
) -> None:
    errors = Seen()
    delivered = Seen()
    await server.stop()  # refusing connections
    async with (
        await AsyncJournal.open(journal_path(tmp_path)) as journal,
        CentralClient(server.url, token_file=None, timeout_s=10) as client,
    ):
        rep = reporter(journal, client, on_error=errors.add, on_delivered=delivered.add)
        async with running(rep) as task:
            for _ in range(3):
                for v in VOLS:
                    await queue(journal, v)
                rep.kick()
            await errors.at_least(3 * len(VOLS))
            server.answer(500)
            await server.start()
            await server.wait_until(lambda reqs: len(reqs) >= 2 * len(VOLS))
            for v in VOLS:
                await queue(journal, v)
            rep.kick()
            server.answer(200)
            await server.wait_until(taken_count(4 * len(VOLS)), GUARD_S)
            await drained(journal)
            assert not task.done()
    assert {op for op, _ in errors.items} == {OP_PUT_VOLUME}
    assert all(err.retryable for _, err in errors.items)
    assert delivered.items == [200] * 4 * len(VOLS)
    # Each report taken exactly once, in queue order; the refused ones came before, in order.
    assert per_volume(server.taken()) == each(VOLS, [1, 2, 3, 4])
    sent = per_volume(server.requests)
    assert {v: collapsed(g) for v, g in sent.items()} == each(VOLS, [1, 2, 3, 4])
    assert any(len(g) > 4 for g in sent.values())  # some were answered 500 and sent again


async def test_a_409_counts_as_delivered_and_the_token_is_sent(
    tmp_path: Path, server: CentralServer
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    delivered = Seen()
    server.answer(409)
    async with (
        await AsyncJournal.open(journal_path(tmp_path)) as journal,
        CentralClient(server.url, token_file=token, timeout_s=10) as client,
    ):
        rep = reporter(journal, client, on_delivered=delivered.add)
        async with running(rep):
            for _ in range(2):
                for v in VOLS[:2]:
                    await queue(journal, v)
            rep.kick()
            await delivered.at_least(4)
            await drained(journal)
    assert delivered.items == [409] * 4
    assert per_volume(server.requests) == each(VOLS[:2], [1, 2])  # none sent twice
    assert {r.headers["Authorization"] for r in server.requests} == {"Bearer s3cret"}


async def test_timeouts_are_retried_and_repeat_only_the_same_report(
    tmp_path: Path, server: CentralServer
) -> None:
    server.hang()
    async with (
        await AsyncJournal.open(journal_path(tmp_path)) as journal,
        CentralClient(server.url, token_file=None, timeout_s=0.2) as client,
    ):
        rep = reporter(journal, client)
        async with running(rep):
            for _ in range(3):
                await queue(journal, VOLS[0])
            rep.kick()
            await server.wait_until(lambda reqs: len(reqs) >= 3)
            server.answer(200)
            await drained(journal)
    sent = per_volume(server.requests)[VOLS[0]]
    assert sent[:3] == [1, 1, 1]  # the head, sent again after each timeout
    assert collapsed(sent) == [1, 2, 3]
    assert per_volume(server.taken()) == {VOLS[0]: [1, 2, 3]}


async def test_a_refused_volume_does_not_hold_back_the_others(
    tmp_path: Path, server: CentralServer
) -> None:
    bad, *good = VOLS
    server.answer_path(f"/volumes/{bad}", 400)
    errors = Seen()
    async with (
        await AsyncJournal.open(journal_path(tmp_path)) as journal,
        CentralClient(server.url, token_file=None, timeout_s=10) as client,
    ):
        # batch=1: one volume in flight at a time, and the refused one comes first in the queue.
        rep = reporter(journal, client, batch=1, on_error=errors.add)
        async with running(rep):
            for v in VOLS:
                await queue(journal, v)
                await queue(journal, v)
            rep.kick()
            await server.wait_until(taken_count(2 * len(good)))
            await errors.at_least(2)
            # The server has answered the last good report; the reporter drops it right after.
            await drained(journal, down_to=2)
            assert await journal.outbox_depth() == 2  # the refused volume's two reports stay
            server.answer_path(f"/volumes/{bad}", None)
            await drained(journal)
    assert per_volume(server.taken()) == each(VOLS, [1, 2])
    assert set(per_volume(server.requests)[bad]) == {1, 2}
    assert all(err.details["status"] == 400 for _, err in errors.items)


class SlowPeekJournal(AsyncJournal):
    """A journal whose outbox reads take long to come back, so deliveries end meanwhile."""

    async def outbox_peek(self, limit: int, *, per_volume: int | None = None) -> list[OutboxEntry]:
        heads = await super().outbox_peek(limit, per_volume=per_volume)
        await asyncio.sleep(0.1)
        return heads


async def test_a_stale_outbox_read_never_sends_a_report_again(
    tmp_path: Path, server: CentralServer
) -> None:
    server.delay_s = 0.03  # each report is in flight while the next outbox read is made
    async with (
        await SlowPeekJournal.open(journal_path(tmp_path)) as journal,
        CentralClient(server.url, token_file=None, timeout_s=10) as client,
    ):
        for _ in range(4):
            await queue(journal, VOLS[0])
        rep = Reporter(journal, client, poll_s=0.005)
        async with running(rep):
            await drained(journal)
    assert per_volume(server.requests) == each(VOLS[:1], [1, 2, 3, 4])


async def test_kick_wakes_the_reporter(tmp_path: Path, server: CentralServer) -> None:
    async with (
        await AsyncJournal.open(journal_path(tmp_path)) as journal,
        CentralClient(server.url, token_file=None, timeout_s=10) as client,
    ):
        rep = Reporter(journal, client, poll_s=3600)
        async with running(rep):
            await asyncio.sleep(0.1)  # the reporter found the outbox empty and waits
            await queue(journal, VOLS[0])
            await asyncio.sleep(0.2)
            assert server.requests == []  # nothing looks again before the hour is up...
            rep.kick()  # ...except a kick
            await server.wait_until(taken_count(1))
            await drained(journal)


async def test_a_restart_mid_outage_loses_nothing(tmp_path: Path, server: CentralServer) -> None:
    path = journal_path(tmp_path)
    vols = VOLS[:3]
    server.hang()
    # First agent: the heads go out and hang; the reporter is cancelled with them in flight.
    async with (
        await AsyncJournal.open(path) as journal,
        CentralClient(server.url, token_file=None, timeout_s=GUARD_S) as client,
    ):
        rep = reporter(journal, client)
        async with running(rep):
            for _ in range(2):
                for v in vols:
                    await queue(journal, v)
            rep.kick()
            await server.wait_until(lambda reqs: len(reqs) == len(vols))
        assert await journal.outbox_depth() == 2 * len(vols)
    in_flight = server.requests[:]
    assert per_volume(in_flight) == each(vols, [1])
    assert all(r.status is None for r in in_flight)
    # The central API is down while the second agent starts and queues more.
    await server.stop()
    server.answer(200)
    errors = Seen()
    async with (
        await AsyncJournal.open(path) as journal,
        CentralClient(server.url, token_file=None, timeout_s=10) as client,
    ):
        rep = reporter(journal, client, on_error=errors.add)
        async with running(rep):
            for v in vols:
                assert await queue(journal, v) == 3
            rep.kick()
            await errors.at_least(len(vols))
            await server.start()
            await drained(journal)
    assert per_volume(server.taken()) == each(vols, [1, 2, 3])
    # The only repeat is the report that was in flight when the first reporter was cancelled.
    assert per_volume(server.requests) == each(vols, [1, 1, 2, 3])


async def test_heartbeats_keep_going_through_an_outage(server: CentralServer) -> None:
    errors = Seen()
    calls = 0

    async def payload() -> Mapping[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            msg = "zfs does not answer"
            raise StorageUnavailable(msg)  # a beat is skipped, not the loop
        return heartbeat_body(
            CN,
            __version__,
            datetime.now(UTC),
            {"size_bytes": 10, "free_bytes": 4},
            3,
            broker_connected=True,
        )

    def beats(reqs: list[Request]) -> list[Request]:
        return [r for r in reqs if r.path == f"/nodes/{CN}/heartbeat" and r.taken]

    async with CentralClient(server.url, token_file=None, timeout_s=10) as client:
        hb = Heartbeat(client, CN, payload, 0.05, on_error=errors.add)
        async with running(hb) as task:
            await server.wait_until(lambda reqs: len(beats(reqs)) >= 3)
            await server.stop()
            await errors.at_least(2)
            assert hb.consecutive_failures >= 2
            before = len(server.requests)
            await server.start()
            await server.wait_until(lambda reqs: len(beats(reqs[before:])) >= 3)
            assert hb.consecutive_failures == 0
            assert not task.done()
    assert all(r.method == "POST" for r in server.requests)
    for r in beats(server.requests):
        doc = r.json()
        assert set(doc) == {"cn", "agent_version", "ts", "pool", "volumes", "broker"}
        assert (doc["cn"], doc["agent_version"], doc["volumes"], doc["broker"]) == (
            CN,
            __version__,
            3,
            "connected",
        )
        assert doc["pool"] == {"size_bytes": 10, "free_bytes": 4}
        assert doc["ts"].endswith("Z")
    assert {op for op, _ in errors.items} == {OP_HEARTBEAT}
    assert all(isinstance(err, VolagentError) for _, err in errors.items)
