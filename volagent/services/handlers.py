"""The task kinds mapped to the services that carry them out (the runner's handler)."""

from __future__ import annotations

from pydantic import BaseModel

from volagent.domain.tasks import (
    AnyTask,
    SnapshotCreateTask,
    SnapshotDeleteTask,
    SnapshotListTask,
    SnapshotRollbackTask,
    VolumeCreateTask,
    VolumeDeleteTask,
    VolumeGetTask,
    VolumeListTask,
    VolumeResizeTask,
    VolumeSetAccessTask,
    ZoneRestartTask,
    ZoneUpdateTask,
)
from volagent.engine.context import TaskContext
from volagent.services.deps import Deps
from volagent.services.snapshots import SnapshotService
from volagent.services.volumes import VolumeService


class Services:
    """Every task kind's use case; callable as the runner's handler."""

    def __init__(self, deps: Deps) -> None:
        """Build the services over ``deps``."""
        self.volumes = VolumeService(deps)
        self.snapshots = SnapshotService(deps)

    async def __call__(self, task: AnyTask, ctx: TaskContext) -> BaseModel:  # noqa: PLR0911  # one branch per kind
        """Run ``task``."""
        match task:
            case VolumeCreateTask():
                return await self.volumes.create(task, ctx)
            case VolumeDeleteTask():
                return await self.volumes.delete(task, ctx)
            case VolumeResizeTask():
                return await self.volumes.resize(task, ctx)
            case VolumeGetTask():
                return await self.volumes.get(task, ctx)
            case VolumeListTask():
                return await self.volumes.list(task, ctx)
            case VolumeSetAccessTask():
                return await self.volumes.set_access(task, ctx)
            case SnapshotCreateTask():
                return await self.snapshots.create(task, ctx)
            case SnapshotDeleteTask():
                return await self.snapshots.delete(task, ctx)
            case SnapshotListTask():
                return await self.snapshots.list(task, ctx)
            case SnapshotRollbackTask():
                return await self.snapshots.rollback(task, ctx)
            case ZoneRestartTask() | ZoneUpdateTask():
                return await self.volumes.restart_zone(task, ctx)
