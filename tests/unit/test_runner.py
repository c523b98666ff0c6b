"""The runner over a real journal: lanes per volume, the concurrency cap, deadlines, timeouts.

Services are a fake handler (this is the engine's own logic); events go to a recording emitter.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from volagent.config import LimitsConfig
from volagent.domain.events import EventState
from volagent.domain.tasks import AnyTask, decode_task
from volagent.engine.context import Interrupted, TaskContext
from volagent.engine.journal import AsyncJournal, Journal, TaskRecord, TaskState, journal_path
from volagent.engine.publisher import EventPublisher
from volagent.engine.runner import Events, Handler, Outcome, Runner, utcnow
from volagent.errors import (
    CommandTimeout,
    StorageUnavailable,
    VolagentError,
    VolumeInUse,
    VolumeNotFound,
)

CN = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
LIMITS = LimitsConfig()
#: Upper bound for anything that should happen promptly: reaching it means a hang.
HANG_S = 10.0
PAST = "2020-01-01T00:00:00Z"
BEFORE_PAST = datetime(2019, 12, 31, tzinfo=UTC)


class Done(BaseModel):
    """The fake services' result."""

    n: int = 0


class Emitted:
    """The emitter: every event the engine handed over, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bytes]] = []

    def queued(self, event_id: int, body: bytes) -> None:
        self.events.append((event_id, body))

    def of(self, task_id: str) -> list[dict[str, Any]]:
        decoded = (json.loads(body) for _, body in self.events)
        return [event for event in decoded if event["task"] == task_id]

    def bodies_of(self, task_id: str) -> list[bytes]:
        return [body for _, body in self.events if json.loads(body)["task"] == task_id]


def new_id() -> str:
    return str(uuid.uuid4())


def message(
    kind: str = "volume.get",
    *,
    volume: str | None = None,
    task_id: str | None = None,
    deadline: str | None = None,
) -> bytes:
    params: dict[str, Any] = {}
    if kind in {"volume.get", "volume.delete", "zone.restart"}:
        params = {"uuid": volume or new_id()}
    elif kind == "snapshot.list":
        params = {"volume_uuid": volume or new_id()}
    envelope: dict[str, Any] = {
        "v": 1,
        "id": task_id or new_id(),
        "kind": kind,
        "cn": CN,
        "created": "2026-11-21T10:00:00Z",
        "params": params,
    }
    if deadline is not None:
        envelope["deadline"] = deadline
    return json.dumps(envelope).encode()


async def record(
    journal: AsyncJournal, raw: bytes, *, decoded_at: datetime | None = None
) -> tuple[AnyTask, TaskRecord]:
    """Decode and journal a task as the intake does (``decoded_at``: the decoder's now)."""
    task = decode_task(raw, cn=CN, limits=LIMITS, now=decoded_at or utcnow())
    receipt = await journal.record_received(
        task.id, task.kind, task.params.volume, raw, task.deadline, utcnow()
    )
    return task, receipt.task


async def submit(
    runner: Runner, journal: AsyncJournal, raw: bytes, *, decoded_at: datetime | None = None
) -> AnyTask:
    task, rec = await record(journal, raw, decoded_at=decoded_at)
    runner.submit(task, rec)
    return task


async def linger(ctx: TaskContext) -> None:
    """Give any other task that could start now the time to do so.

    A task starts after two journal calls (marked running, its running event), and the
    journal runs calls one at a time in the order they were made: after three round trips,
    a task that was free to start has entered its handler.
    """
    for _ in range(3):
        await ctx.journal.get(ctx.id)


async def idle(runner: Runner) -> None:
    async with asyncio.timeout(HANG_S):
        await runner.wait_idle()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return journal_path(tmp_path / "state")


@pytest.fixture
async def journal(path: Path) -> AsyncIterator[AsyncJournal]:
    async with await AsyncJournal.open(path) as j:
        yield j


@pytest.fixture
def emitted() -> Emitted:
    return Emitted()


@pytest.fixture
def outcomes() -> list[Outcome]:
    return []


@pytest.fixture
def make_runner(
    journal: AsyncJournal, emitted: Emitted, outcomes: list[Outcome]
) -> Callable[..., Runner]:
    def make(handler: Handler, *, max_concurrent: int = 4, **kw: Any) -> Runner:
        return Runner(
            journal,
            Events(journal, emitted, CN),
            handler,
            max_concurrent=max_concurrent,
            on_outcome=outcomes.append,
            **kw,
        )

    return make


# ------------------------------------------------------------------ lanes and the cap


async def test_tasks_of_a_volume_run_one_at_a_time_in_order_while_volumes_run_in_parallel(
    journal: AsyncJournal, make_runner: Callable[..., Runner]
) -> None:
    vol_a, vol_b = new_id(), new_id()
    both_volumes_running = asyncio.Barrier(2)
    log: dict[str, list[tuple[str, str]]] = defaultdict(list)

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        volume = task.params.volume
        assert volume is not None
        log[volume].append(("start", task.id))
        if len(log[volume]) == 1:
            # The first task of each volume waits for the other volume's first task:
            # this only returns if the two volumes run at the same time.
            await both_volumes_running.wait()
        await linger(ctx)  # a second task of the volume would start meanwhile
        log[volume].append(("end", task.id))
        return Done()

    runner = make_runner(handler, max_concurrent=4)
    submitted: dict[str, list[str]] = defaultdict(list)
    for volume in [vol_a, vol_b, vol_a, vol_a, vol_b, vol_a, vol_b, vol_b, vol_a]:
        task = await submit(runner, journal, message(volume=volume))
        submitted[volume].append(task.id)
    await idle(runner)

    for volume, ids in submitted.items():
        expected = [step for task_id in ids for step in (("start", task_id), ("end", task_id))]
        assert log[volume] == expected
    counts = await journal.counts_by_state()
    assert counts[TaskState.SUCCEEDED] == 9


async def test_never_more_than_max_concurrent_handlers_run_at_once(
    journal: AsyncJournal, make_runner: Callable[..., Runner]
) -> None:
    active = 0
    peak = 0
    cap_reached = asyncio.Event()

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 3:
            cap_reached.set()
        try:
            await cap_reached.wait()  # the first three meet here: the cap is reached, not only kept
            await linger(ctx)  # a fourth task would start meanwhile
        finally:
            active -= 1
        return Done()

    runner = make_runner(handler, max_concurrent=3)
    volumes = [new_id() for _ in range(10)]
    for i in range(40):
        await submit(runner, journal, message(volume=volumes[i % 10]))
    await idle(runner)

    assert peak == 3
    counts = await journal.counts_by_state()
    assert counts[TaskState.SUCCEEDED] == 40


async def test_volume_list_tasks_do_not_block_each_other(
    journal: AsyncJournal, make_runner: Callable[..., Runner]
) -> None:
    together = asyncio.Barrier(2)

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        assert task.params.volume is None
        await together.wait()  # returns only if both volume.list tasks run at once
        return Done()

    runner = make_runner(handler, max_concurrent=2)
    first = await submit(runner, journal, message("volume.list"))
    second = await submit(runner, journal, message("volume.list"))
    await idle(runner)

    for task in (first, second):
        rec = await journal.get(task.id)
        assert rec is not None
        assert rec.state is TaskState.SUCCEEDED


# ------------------------------------------------------------------ deadlines


async def test_a_task_whose_deadline_passed_before_it_started_fails_without_running(
    journal: AsyncJournal,
    make_runner: Callable[..., Runner],
    emitted: Emitted,
    outcomes: list[Outcome],
) -> None:
    calls: list[str] = []

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        calls.append(task.id)
        return Done()

    runner = make_runner(handler)
    # Decoded while the deadline was still ahead; it has passed when the runner gets to it.
    task = await submit(runner, journal, message(deadline=PAST), decoded_at=BEFORE_PAST)
    await idle(runner)

    assert calls == []
    events = emitted.of(task.id)
    assert [(e["seq"], e["state"]) for e in events] == [(1, "failed")]
    assert events[0]["error"]["code"] == "DeadlineExceeded"
    assert events[0]["kind"] == "volume.get"
    rec = await journal.get(task.id)
    assert rec is not None
    assert rec.state is TaskState.FAILED
    assert rec.attempts == 0
    assert rec.terminal_event == emitted.bodies_of(task.id)[0]
    assert [(o.kind, o.succeeded, o.code) for o in outcomes] == [
        ("volume.get", False, "DeadlineExceeded")
    ]


async def test_a_resumed_task_runs_even_though_its_deadline_has_passed(
    journal: AsyncJournal, make_runner: Callable[..., Runner], emitted: Emitted
) -> None:
    resumed: list[bool] = []

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        resumed.append(ctx.resumed)
        return Done(n=1)

    task, _ = await record(journal, message(deadline=PAST), decoded_at=BEFORE_PAST)
    # An earlier run was interrupted after it started (its running event was published).
    await journal.mark_running(task.id, utcnow(), lambda seq: b"running %d" % seq)
    interrupted = await journal.get(task.id)
    assert interrupted is not None
    assert interrupted.attempts == 1

    runner = make_runner(handler)
    runner.submit(task, interrupted)
    await idle(runner)

    assert resumed == [True]
    done = await journal.get(task.id)
    assert done is not None
    assert done.state is TaskState.SUCCEEDED
    assert done.attempts == 2
    assert [e["state"] for e in emitted.of(task.id)] == ["running", "succeeded"]


# ------------------------------------------------------------------ how a handler ends


async def test_a_handler_past_its_kinds_timeout_fails_with_task_timed_out_as_internal(
    journal: AsyncJournal,
    make_runner: Callable[..., Runner],
    emitted: Emitted,
    outcomes: list[Outcome],
) -> None:
    cancelled: list[str] = []

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        try:
            await asyncio.sleep(HANG_S)
        except asyncio.CancelledError:
            cancelled.append(task.id)
            raise
        return Done()

    runner = make_runner(handler, timeouts_s={"volume.get": 0.05})
    task = await submit(runner, journal, message())
    await idle(runner)

    assert cancelled == [task.id]
    terminal = emitted.of(task.id)[-1]
    assert terminal["state"] == "failed"
    error = terminal["error"]
    assert error["code"] == "Internal"
    assert error["retryable"] is True
    assert error["details"]["cause"] == "TaskTimedOut"
    assert error["details"]["limit_s"] == 0.05
    rec = await journal.get(task.id)
    assert rec is not None
    assert rec.state is TaskState.FAILED
    assert rec.error == error
    assert [(o.kind, o.succeeded, o.code) for o in outcomes] == [("volume.get", False, "Internal")]


@pytest.mark.parametrize(
    ("error", "wire"),
    [
        (
            VolumeNotFound("no volume", details={"uuid": "x"}),
            {"code": "VolumeNotFound", "retryable": False, "details": {"uuid": "x"}},
        ),
        (
            StorageUnavailable("zfs is down"),
            {"code": "StorageUnavailable", "retryable": True, "details": {}},
        ),
        (
            VolumeInUse("clients", details={"clients": ["10.0.0.9"]}),
            {"code": "VolumeInUse", "retryable": False, "details": {"clients": ["10.0.0.9"]}},
        ),
        (
            CommandTimeout("zfs hung", argv=["zfs", "list"], returncode=None),
            {
                "code": "Internal",
                "retryable": True,
                "details": {
                    "argv": ["zfs", "list"],
                    "returncode": None,
                    "stderr": "",
                    "cause": "CommandTimeout",
                },
            },
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, VolagentError) else "",
)
async def test_a_volagent_error_from_the_handler_fails_the_task_with_its_wire_code(
    journal: AsyncJournal,
    make_runner: Callable[..., Runner],
    emitted: Emitted,
    outcomes: list[Outcome],
    error: VolagentError,
    wire: dict[str, Any],
) -> None:
    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        raise error

    runner = make_runner(handler)
    task = await submit(runner, journal, message())
    await idle(runner)

    terminal = emitted.of(task.id)[-1]
    assert terminal["state"] == "failed"
    assert {k: terminal["error"][k] for k in wire} == wire
    assert terminal["error"]["message"] == error.message
    assert [(o.succeeded, o.code) for o in outcomes] == [(False, wire["code"])]


async def test_an_unexpected_exception_fails_the_task_as_internal_and_the_runner_carries_on(
    journal: AsyncJournal, make_runner: Callable[..., Runner], emitted: Emitted
) -> None:
    vol = new_id()
    calls: list[str] = []

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        calls.append(task.id)
        if len(calls) == 1:
            msg = "a bug in a service"
            raise RuntimeError(msg)
        return Done()

    runner = make_runner(handler, max_concurrent=1)
    broken = await submit(runner, journal, message(volume=vol))
    same_volume = await submit(runner, journal, message(volume=vol))
    other_volume = await submit(runner, journal, message("volume.list"))
    await idle(runner)

    assert sorted(calls) == sorted([broken.id, same_volume.id, other_volume.id])
    assert calls.index(broken.id) < calls.index(same_volume.id)
    error = emitted.of(broken.id)[-1]["error"]
    assert error["code"] == "Internal"
    assert error["retryable"] is False
    assert "RuntimeError" in error["message"]
    assert "a bug in a service" in error["message"]
    assert emitted.of(same_volume.id)[-1]["state"] == "succeeded"
    assert emitted.of(other_volume.id)[-1]["state"] == "succeeded"


# ------------------------------------------------------------------ events


async def test_each_task_has_accepted_running_progress_and_one_terminal_event_in_seq_order(
    journal: AsyncJournal, make_runner: Callable[..., Runner], emitted: Emitted
) -> None:
    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        await ctx.progress("copy", 1, 2)
        await asyncio.sleep(0)
        await ctx.progress("copy", 2, 2)
        return Done(n=7)

    runner = make_runner(handler, max_concurrent=3)
    events = Events(journal, emitted, CN)
    volumes = [new_id() for _ in range(3)]
    tasks = []
    for i in range(9):
        task, rec = await record(journal, message(volume=volumes[i % 3]))
        await events.emit(task.id, task.kind, EventState.ACCEPTED)  # as the intake does
        runner.submit(task, rec)
        tasks.append(task)
    await idle(runner)

    for task in tasks:
        got = emitted.of(task.id)
        assert [e["state"] for e in got] == [
            "accepted",
            "running",
            "progress",
            "progress",
            "succeeded",
        ]
        assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
        assert [e["progress"] for e in got[2:4]] == [
            {"phase": "copy", "done": 1, "total": 2},
            {"phase": "copy", "done": 2, "total": 2},
        ]
        assert got[-1]["result"] == {"n": 7}
        assert all(e["cn"] == CN and e["kind"] == "volume.get" for e in got)
        stored = await journal.get(task.id)
        assert stored is not None
        assert stored.seq == 5
        assert stored.terminal_event == emitted.bodies_of(task.id)[-1]
    # Every event handed over is in the journal's outbox under the id it was handed with.
    assert await journal.events_queued(1000) == emitted.events


async def test_on_outcome_is_called_once_per_finished_task_with_its_kind_and_code(
    journal: AsyncJournal, make_runner: Callable[..., Runner], outcomes: list[Outcome]
) -> None:
    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        if task.kind == "zone.restart":
            msg = "clients connected"
            raise VolumeInUse(msg)
        return Done()

    runner = make_runner(handler)
    await submit(runner, journal, message("volume.get"))
    await submit(runner, journal, message("zone.restart"))
    await submit(runner, journal, message("volume.list", deadline=PAST), decoded_at=BEFORE_PAST)
    await idle(runner)

    assert sorted((o.kind, o.succeeded, o.code) for o in outcomes) == [
        ("volume.get", True, None),
        ("volume.list", False, "DeadlineExceeded"),
        ("zone.restart", False, "VolumeInUse"),
    ]
    assert all(o.duration_s >= 0 for o in outcomes)


# ------------------------------------------------------------------ shutdown and resume


async def test_shutdown_leaves_a_task_at_a_safe_point_running_and_a_new_runner_resumes_it(
    path: Path,
) -> None:
    vol = new_id()
    journal = await AsyncJournal.open(path)
    emitted = Emitted()
    outcomes: list[Outcome] = []
    at_safe_point = asyncio.Event()
    interrupted: list[str] = []

    async def first_run(task: AnyTask, ctx: TaskContext) -> Done:
        await ctx.step_done("dataset")
        at_safe_point.set()
        try:
            while True:
                await ctx.checkpoint()
                await asyncio.sleep(0.005)
        except Interrupted:
            interrupted.append(task.id)
            raise

    runner = Runner(
        journal,
        Events(journal, emitted, CN),
        first_run,
        max_concurrent=2,
        on_outcome=outcomes.append,
    )
    started = await submit(runner, journal, message(volume=vol))
    waiting = await submit(runner, journal, message(volume=vol))
    async with asyncio.timeout(HANG_S):
        await at_safe_point.wait()
    await runner.shutdown(grace_s=HANG_S)

    assert interrupted == [started.id]
    assert outcomes == []
    assert [e["state"] for e in emitted.of(started.id)] == ["running"]
    assert emitted.of(waiting.id) == []
    rec = await journal.get(started.id)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.steps, rec.terminal_event) == (
        TaskState.RUNNING,
        1,
        ("dataset",),
        None,
    )
    await journal.close()

    async with await AsyncJournal.open(path) as reopened:
        pending = await reopened.pending()
        assert [p.id for p in pending] == [started.id, waiting.id]
        seen: list[tuple[str, bool, bool, int]] = []

        async def second_run(task: AnyTask, ctx: TaskContext) -> Done:
            seen.append((task.id, ctx.resumed, ctx.done("dataset"), ctx.record.attempts))
            return Done()

        runner = Runner(
            reopened,
            Events(reopened, emitted, CN),
            second_run,
            max_concurrent=2,
            on_outcome=outcomes.append,
        )
        for p in pending:
            runner.submit(decode_task(p.raw, cn=CN, limits=LIMITS, now=p.received), p)
        await idle(runner)

        assert seen == [(started.id, True, True, 2), (waiting.id, False, False, 1)]
        resumed = await reopened.get(started.id)
        assert resumed is not None
        assert (resumed.state, resumed.attempts) == (TaskState.SUCCEEDED, 2)
    events = emitted.of(started.id)
    assert [(e["seq"], e["state"]) for e in events] == [
        (1, "running"),
        (2, "running"),
        (3, "succeeded"),
    ]
    assert len(outcomes) == 2


async def test_shutdown_cancels_a_handler_that_ignores_safe_points_and_leaves_it_running(
    journal: AsyncJournal,
    make_runner: Callable[..., Runner],
    emitted: Emitted,
    outcomes: list[Outcome],
) -> None:
    started = asyncio.Event()
    cancelled: list[str] = []

    async def stubborn(task: AnyTask, ctx: TaskContext) -> Done:
        started.set()
        try:
            await asyncio.sleep(HANG_S)  # never calls ctx.checkpoint()
        except asyncio.CancelledError:
            cancelled.append(task.id)
            raise
        return Done()

    runner = make_runner(stubborn)
    task = await submit(runner, journal, message())
    async with asyncio.timeout(HANG_S):
        await started.wait()
        await runner.shutdown(grace_s=0.05)

    assert cancelled == [task.id]
    assert outcomes == []
    assert [e["state"] for e in emitted.of(task.id)] == ["running"]
    rec = await journal.get(task.id)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.terminal_event) == (TaskState.RUNNING, 1, None)
    assert [p.id for p in await journal.pending()] == [task.id]
    # Nothing new starts once the shutdown has begun.
    later = await submit(runner, journal, message())
    assert not runner.knows(later.id)


# ------------------------------------------------------------------ known defect


async def test_a_progress_event_committed_as_its_task_times_out_is_published(
    journal: AsyncJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[bytes] = []

    async def broker(body: bytes) -> None:
        published.append(body)

    publisher = EventPublisher(journal, broker)
    # The progress event's transaction commits only once its task has been cancelled by the
    # timeout: the call was already running on the journal's thread when the timer fired.
    inner: Journal = journal._journal
    real_add_event = inner.add_event
    commit = threading.Event()

    def add_event_late(task_id: str, make: Callable[[int], bytes]) -> tuple[int, bytes]:
        if json.loads(make(0))["state"] == "progress":
            commit.wait(HANG_S)
        return real_add_event(task_id, make)

    monkeypatch.setattr(inner, "add_event", add_event_late)

    async def slow_step(task: AnyTask, ctx: TaskContext) -> Done:
        try:
            await ctx.progress("copy", 1, 2)
        except asyncio.CancelledError:
            commit.set()
            raise
        return Done()

    runner = Runner(
        journal,
        Events(journal, publisher, CN),
        slow_step,
        max_concurrent=1,
        timeouts_s={"volume.get": 0.05},
    )
    task = await submit(runner, journal, message())

    async def commit_once_cancelled() -> None:
        # A handler that does not see the cancellation at once (the event is being queued
        # through it) still has its run task marked as being cancelled.
        while not commit.is_set():
            run = runner._running.get(task.id)
            if run is not None and run.cancelling():
                commit.set()
            await asyncio.sleep(0.001)

    sender = asyncio.create_task(publisher.run())
    try:
        async with asyncio.timeout(HANG_S):
            await commit_once_cancelled()
        await idle(runner)
        assert await publisher.drain(HANG_S)
    finally:
        sender.cancel()
    seqs = [json.loads(body)["seq"] for body in published]
    rec = await journal.get(task.id)
    assert rec is not None
    assert rec.seq == 3  # running, progress, failed
    assert seqs == [1, 2, 3]
