"""Intake: a message from the tasks topic becomes a journaled task, a failed event, or a count.

:meth:`Intake.handle` is called for every message and returns once the message's fate is
durable, so the caller acknowledges it to the broker afterwards:

* a valid task seen for the first time is recorded, announced (``accepted``) and queued on
  the runner;
* a task id seen before is not run again: a finished task's terminal event is queued again
  unchanged, an unfinished one needs nothing new;
* a message that is not a valid task is recorded under its id, when one can be read, and
  failed with the decoder's error (``InvalidTask``, ``WrongNode``, ``UnknownTaskKind``,
  ``InvalidParameter``, ``DeadlineExceeded``); without a readable id it is logged and counted.

:meth:`Intake.resume` queues the tasks the journal holds unfinished at start-up.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from volagent.config import LimitsConfig
from volagent.domain.events import EventState
from volagent.domain.tasks import decode_task, task_id_of, task_kind_of
from volagent.engine.journal import AsyncJournal, Seen, TaskRecord
from volagent.engine.runner import Events, Runner, utcnow
from volagent.errors import TaskRejected

_log = structlog.get_logger(__name__)


class Intake:
    """Turns task messages into journaled, queued tasks."""

    def __init__(
        self,
        journal: AsyncJournal,
        events: Events,
        runner: Runner,
        *,
        cn: str,
        limits: LimitsConfig,
        on_received: Callable[[str], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
    ) -> None:
        """``on_received(kind)`` counts accepted tasks, ``on_dropped(code)`` unreadable ones."""
        self._journal = journal
        self._events = events
        self._runner = runner
        self._cn = cn
        self._limits = limits
        self._on_received = on_received
        self._on_dropped = on_dropped

    async def handle(self, payload: bytes) -> None:
        """Deal with one message; when this returns, its fate is in the journal."""
        now = utcnow()
        try:
            task = decode_task(payload, cn=self._cn, limits=self._limits, now=now)
        except TaskRejected as exc:
            await self._rejected(payload, exc)
            return
        receipt = await self._events.receive(
            task.id, task.kind, task.params.volume, payload, task.deadline, now
        )
        if receipt.seen is Seen.NEW:
            if self._on_received is not None:
                self._on_received(task.kind)
            self._runner.submit(task, receipt.task)
        elif receipt.seen is Seen.FINISHED and receipt.terminal_event is not None:
            _log.info("task seen again; its terminal event is published again", task=task.id)
            await self._events.again(task.id, receipt.terminal_event)
        else:
            _log.info("task seen again while still pending", task=task.id)

    async def _rejected(self, payload: bytes, exc: TaskRejected) -> None:
        task_id = task_id_of(payload)
        if task_id is None:
            _log.warning(
                "message dropped: no task id can be read", code=exc.code, error=exc.message
            )
            if self._on_dropped is not None:
                self._on_dropped(exc.code)
            return
        kind = task_kind_of(payload)
        receipt = await self._journal.record_received(
            task_id, kind or None, None, payload, None, utcnow()
        )
        if receipt.seen is Seen.NEW:
            _log.info("task rejected", task=task_id, code=exc.code, error=exc.message)
            await self._events.finish(task_id, kind, error=exc)
        elif receipt.seen is Seen.FINISHED and receipt.terminal_event is not None:
            await self._events.again(task_id, receipt.terminal_event)

    async def resume(self, pending: list[TaskRecord]) -> int:
        """Queue the unfinished tasks of an earlier run, in arrival order; return how many."""
        resumed = 0
        for record in pending:
            try:
                # Decoded as of its arrival: a deadline is checked by the runner, once.
                task = decode_task(
                    record.raw, cn=self._cn, limits=self._limits, now=record.received
                )
            except TaskRejected as exc:
                await self._events.finish(record.id, record.kind or "", error=exc)
                continue
            if record.seq == 0:  # journaled, then the agent died before announcing it
                await self._events.emit(record.id, task.kind, EventState.ACCEPTED)
            self._runner.submit(task, record)
            resumed += 1
        if resumed:
            _log.info("unfinished tasks resumed", tasks=resumed)
        return resumed
