"""What a running task sees of the engine: its progress events, safe points and finished steps.

A service gets one :class:`TaskContext` per run of a task. It calls :meth:`~TaskContext.progress`
during long steps, :meth:`~TaskContext.checkpoint` between steps (where stopping leaves nothing
half done), and records steps that must not happen twice with :meth:`~TaskContext.step_done`;
a task resumed after a restart finds them in :meth:`~TaskContext.done`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from volagent.domain.tasks import AnyTask
from volagent.engine.journal import AsyncJournal, TaskRecord


class Interrupted(Exception):  # a control-flow signal, not an error of the tree
    """Raised at a safe point when the agent is stopping: the task is resumed at the next start."""


#: Emits a progress event: ``(phase, done, total)``.
ProgressSink = Callable[[str, int, int], Awaitable[None]]


@dataclass(eq=False, slots=True)
class TaskContext:
    """One run of one task."""

    task: AnyTask
    record: TaskRecord
    journal: AsyncJournal
    emit_progress: ProgressSink
    stopping: Callable[[], bool]
    _steps: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        """Start from the steps the journal has for the task."""
        self._steps = set(self.record.steps)

    @property
    def id(self) -> str:
        """The task id."""
        return self.task.id

    @property
    def received(self) -> datetime:
        """When the task was first received."""
        return self.record.received

    @property
    def resumed(self) -> bool:
        """Whether an earlier run of this task was interrupted (a shutdown or a crash)."""
        return self.record.attempts > 1

    async def progress(self, phase: str, done: int, total: int) -> None:
        """Publish a progress event for a long step."""
        await self.emit_progress(phase, done, total)

    async def checkpoint(self) -> None:
        """A safe point: raise :class:`Interrupted` if the agent is stopping."""
        if self.stopping():
            raise Interrupted

    def done(self, step: str) -> bool:
        """Whether ``step`` was recorded done by this task (in this run or an earlier one)."""
        return step in self._steps

    async def step_done(self, step: str) -> None:
        """Record durably that ``step`` is done."""
        if step not in self._steps:
            await self.journal.step_done(self.id, step)
            self._steps.add(step)
