"""The runner: tasks of one volume one at a time in arrival order, volumes in parallel.

Each volume has a lane, a queue worked by one coroutine; tasks that name no volume
(``volume.list``) get a lane each. At most ``engine.max_concurrent`` tasks run at once, across
all lanes (waiting lanes take turns in the order they asked). A task:

1. fails with ``DeadlineExceeded`` if its deadline passed before it first started;
2. is marked ``running`` in the journal and announced with a ``running`` event;
3. runs its service under the kind's timeout (:data:`KIND_TIMEOUTS_S`), publishing
   ``progress`` events for long steps;
4. finishes: the terminal event is stored with the result or error and queued for publishing
   in one journal transaction, so the task has exactly one terminal event.

On :meth:`Runner.shutdown` nothing new starts; running tasks stop at their next safe point
(:class:`~volagent.engine.context.Interrupted`) or are cancelled after the grace period. Either
way they stay ``running`` in the journal and are resumed at the next start, which is safe
because every service step is idempotent.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import structlog
from pydantic import BaseModel

from volagent import aio
from volagent.domain.events import ErrorBody, Event, EventState, Progress
from volagent.domain.tasks import AnyTask
from volagent.engine.context import Interrupted, TaskContext
from volagent.engine.journal import AsyncJournal, Receipt, TaskRecord, TaskState
from volagent.errors import DeadlineExceeded, TaskTimedOut, VolagentError

_log = structlog.get_logger(__name__)

#: What :meth:`Runner.run` is called in the daemon's task group.
TASK_NAME: Final = "task-runner"

#: How long one run of a task of each kind may take before it fails with ``TaskTimedOut``.
KIND_TIMEOUTS_S: Final[Mapping[str, float]] = {
    "volume.create": 600.0,
    "volume.delete": 300.0,
    "volume.resize": 120.0,
    "volume.get": 60.0,
    "volume.list": 120.0,
    "volume.set_access": 120.0,
    "snapshot.create": 300.0,
    "snapshot.delete": 300.0,
    "snapshot.list": 60.0,
    "snapshot.rollback": 600.0,
    "zone.restart": 300.0,
    "zone.update": 300.0,
}
DEFAULT_TIMEOUT_S: Final = 300.0
#: How long cancelled tasks may take to unwind at shutdown (their cleanup, under way).
CANCEL_WAIT_S: Final = 10.0


class Handler(Protocol):
    """Runs one task: the services' entry point."""

    def __call__(self, task: AnyTask, ctx: TaskContext) -> Awaitable[BaseModel]:
        """Carry the task out and return its result object."""
        ...


class Emitter(Protocol):
    """Where queued events go once they are in the journal (the event publisher)."""

    def queued(self, event_id: int, body: bytes) -> None:
        """Take the event stored under ``event_id``."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended, for metrics: ``succeeded`` or ``failed`` with its wire code."""

    kind: str
    succeeded: bool
    code: str | None
    duration_s: float


def utcnow() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


class Events:
    """Builds a task's events and queues them through the journal to the publisher."""

    def __init__(self, journal: AsyncJournal, emitter: Emitter, cn: str) -> None:
        """Events of node ``cn``."""
        self._journal = journal
        self._emitter = emitter
        self._cn = cn

    def _make(
        self, task_id: str, kind: str, state: EventState, **body: Any
    ) -> Callable[[int], bytes]:
        def make(seq: int) -> bytes:
            return Event(
                task=task_id, kind=kind, cn=self._cn, seq=seq, ts=utcnow(), state=state, **body
            ).to_json_bytes()

        return make

    async def emit(self, task_id: str, kind: str, state: EventState, **body: Any) -> None:
        """Queue a non-terminal event (accepted, running, progress).

        Storing an event and handing it to the publisher happen together even when the
        caller is cancelled meanwhile (the commit would happen anyway, on the journal's
        thread); so do all the steps of :meth:`finish` and :meth:`again`.
        """
        await aio.uninterrupted(self._emit(task_id, kind, state, **body))

    async def receive(
        self,
        task_id: str,
        kind: str,
        volume_uuid: str | None,
        raw: bytes,
        deadline: datetime | None,
        now: datetime,
    ) -> Receipt:
        """Record a task message; a new task's ``accepted`` event goes in the same transaction."""

        async def record() -> Receipt:
            accepted = self._make(task_id, kind, EventState.ACCEPTED)
            receipt = await self._journal.record_received(
                task_id, kind, volume_uuid, raw, deadline, now, accepted
            )
            if receipt.accepted is not None:
                self._emitter.queued(*receipt.accepted)
            return receipt

        return await aio.uninterrupted(record())

    async def start(self, task_id: str, kind: str, now: datetime) -> None:
        """Mark the task running and queue its ``running`` event, in one journal transaction."""
        await aio.uninterrupted(self._start(task_id, kind, now))

    async def _start(self, task_id: str, kind: str, now: datetime) -> None:
        event_id, data = await self._journal.mark_running(
            task_id, now, self._make(task_id, kind, EventState.RUNNING)
        )
        self._emitter.queued(event_id, data)

    async def _emit(self, task_id: str, kind: str, state: EventState, **body: Any) -> None:
        event_id, data = await self._journal.add_event(
            task_id, self._make(task_id, kind, state, **body)
        )
        self._emitter.queued(event_id, data)

    async def finish(
        self,
        task_id: str,
        kind: str,
        *,
        result: BaseModel | None = None,
        error: VolagentError | None = None,
    ) -> bytes:
        """Record the task's end and queue its terminal event; return the event's bytes."""
        return await aio.uninterrupted(self._finish(task_id, kind, result=result, error=error))

    async def _finish(
        self,
        task_id: str,
        kind: str,
        *,
        result: BaseModel | None,
        error: VolagentError | None,
    ) -> bytes:
        now = utcnow()
        if error is None:
            result_json = {} if result is None else result.model_dump(mode="json")
            event_id, data = await self._journal.finish_numbered(
                task_id,
                TaskState.SUCCEEDED,
                self._make(task_id, kind, EventState.SUCCEEDED, result=result_json),
                now=now,
                result=result_json,
            )
        else:
            body = ErrorBody.from_error(error)
            event_id, data = await self._journal.finish_numbered(
                task_id,
                TaskState.FAILED,
                self._make(task_id, kind, EventState.FAILED, error=body),
                now=now,
                error=body.model_dump(mode="json"),
            )
        self._emitter.queued(event_id, data)
        return data

    async def again(self, task_id: str, terminal_event: bytes) -> None:
        """Queue a finished task's terminal event once more, unchanged."""
        await aio.uninterrupted(self._again(task_id, terminal_event))

    async def _again(self, task_id: str, terminal_event: bytes) -> None:
        event_id = await self._journal.queue_event(task_id, terminal_event)
        self._emitter.queued(event_id, terminal_event)


@dataclass(frozen=True, slots=True)
class _Item:
    task: AnyTask
    record: TaskRecord


class Runner:
    """Per-volume lanes under a global concurrency limit."""

    def __init__(
        self,
        journal: AsyncJournal,
        events: Events,
        handler: Handler,
        *,
        max_concurrent: int,
        timeouts_s: Mapping[str, float] = KIND_TIMEOUTS_S,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        """Run tasks with ``handler``, at most ``max_concurrent`` at once."""
        self._journal = journal
        self._events = events
        self._handler = handler
        self._slots = asyncio.Semaphore(max_concurrent)
        self._timeouts = timeouts_s
        self._on_outcome = on_outcome
        self._lanes: dict[str, deque[_Item]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._queued_ids: set[str] = set()
        self._stopping = False
        self._anonymous = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ public

    @property
    def queued(self) -> int:
        """Tasks waiting in a lane (not running)."""
        return sum(len(lane) for lane in self._lanes.values()) - len(self._running)

    @property
    def running(self) -> int:
        """Tasks running now."""
        return len(self._running)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`shutdown` has begun."""
        return self._stopping

    def knows(self, task_id: str) -> bool:
        """Whether the task is queued or running here."""
        return task_id in self._queued_ids

    def submit(self, task: AnyTask, record: TaskRecord) -> None:
        """Queue a task recorded in the journal behind the earlier tasks of its volume."""
        if self._stopping or task.id in self._queued_ids:
            return
        volume = task.params.volume
        if volume is None:
            self._anonymous += 1
            lane_key = f"-{self._anonymous}"
        else:
            lane_key = volume
        self._queued_ids.add(task.id)
        lane = self._lanes.get(lane_key)
        if lane is not None:
            lane.append(_Item(task, record))
            return
        self._lanes[lane_key] = deque([_Item(task, record)])
        self._idle.clear()
        worker = asyncio.create_task(self._lane(lane_key), name=f"lane {lane_key}")
        self._tasks.add(worker)
        worker.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Return once no task is queued or running."""
        await self._idle.wait()

    async def shutdown(self, grace_s: float) -> None:
        """Start nothing new; let running tasks reach a safe point, then cancel what is left."""
        self._stopping = True
        running = list(self._running.values())
        if running:
            _log.info("waiting for running tasks to reach a safe point", tasks=len(running))
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                _log.warning("tasks cancelled after the grace period", tasks=len(pending))
                await asyncio.wait(pending, timeout=CANCEL_WAIT_S)
        for worker in list(self._tasks):
            worker.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ lanes

    async def _lane(self, key: str) -> None:
        lane = self._lanes[key]
        try:
            while lane and not self._stopping:
                item = lane[0]
                async with self._slots:
                    if self.stopping:  # it may have begun while this lane waited for a slot
                        return
                    run = asyncio.create_task(self._execute(item), name=f"task {item.task.id}")
                    self._running[item.task.id] = run
                    try:
                        await asyncio.shield(run)
                    except Exception:  # noqa: BLE001  # the journal failed: the task resumes at the next start
                        _log.exception("task could not be run or recorded", task=item.task.id)
                    finally:
                        if run.done():
                            self._running.pop(item.task.id, None)
                lane.popleft()
                self._queued_ids.discard(item.task.id)
        finally:
            if not lane or self._stopping:
                self._lanes.pop(key, None)
            if not self._lanes:
                self._idle.set()

    # ------------------------------------------------------------------ one task

    async def _execute(self, item: _Item) -> None:
        task, record = item.task, item.record
        volume = task.params.volume
        with structlog.contextvars.bound_contextvars(
            task=task.id, kind=task.kind, **({"volume": volume} if volume else {})
        ):
            await self._execute_bound(task, record)

    async def _execute_bound(self, task: AnyTask, record: TaskRecord) -> None:
        started = time.monotonic()
        now = utcnow()
        if record.attempts == 0 and task.deadline_passed(now):
            error: VolagentError | None = DeadlineExceeded(
                f"the task's deadline {task.deadline} passed before it could start",
                details={"deadline": str(task.deadline)},
            )
            await self._events.finish(task.id, task.kind, error=error)
            self._report(task, started, error)
            return
        await self._events.start(task.id, task.kind, now)
        record = record_started(record)

        async def progress(phase: str, done: int, total: int) -> None:
            await self._events.emit(
                task.id,
                task.kind,
                EventState.PROGRESS,
                progress=Progress(phase=phase, done=done, total=total),
            )

        ctx = TaskContext(task, record, self._journal, progress, lambda: self._stopping)
        limit = self._timeouts.get(task.kind, DEFAULT_TIMEOUT_S)
        result: BaseModel | None = None
        error = None
        timer = asyncio.timeout(limit)
        try:
            async with timer:
                result = await self._handler(task, ctx)
        except Interrupted:
            _log.info("task interrupted at a safe point; resumes at the next start")
            return
        except TimeoutError:
            if not timer.expired():
                error = VolagentError("a step timed out", details={"limit_s": limit})
            else:
                error = TaskTimedOut(
                    f"{task.kind} did not finish within {limit:g}s", details={"limit_s": limit}
                )
        except VolagentError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001  # any bug in a service fails the task, not the agent
            _log.exception("task failed with an unexpected error")
            error = VolagentError(f"unexpected error: {type(exc).__name__}: {exc}")
        await self._events.finish(task.id, task.kind, result=result, error=error)
        self._report(task, started, error)

    def _report(self, task: AnyTask, started: float, error: VolagentError | None) -> None:
        duration = time.monotonic() - started
        code = None if error is None else error.wire_code
        _log.info(
            "task finished",
            outcome="succeeded" if error is None else "failed",
            code=code,
            **({} if error is None else {"error": error.message}),
            duration_ms=round(duration * 1000, 2),
        )
        if self._on_outcome is not None:
            self._on_outcome(Outcome(task.kind, error is None, code, duration))


def record_started(record: TaskRecord) -> TaskRecord:
    """``record`` as :meth:`~volagent.engine.journal.Journal.mark_running` left it."""
    return replace(record, state=TaskState.RUNNING, attempts=record.attempts + 1)
