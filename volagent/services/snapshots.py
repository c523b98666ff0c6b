"""Snapshot tasks: create, delete, list and rollback.

Steps that must not happen twice are recorded in the journal before or after they run, so a
task resumed after a crash tells its own work from someone else's:

* ``snapshot.create`` records ``creating`` once the name was found free; a snapshot of that
  name found on a resumed run is the one it made (not ``SnapshotAlreadyExists``);
* ``snapshot.delete`` records ``destroying`` once the snapshot was found, so a resumed run
  says ``already_absent: false``;
* ``snapshot.rollback`` stops serving (the NFS server caches what the rollback changes),
  rolls back, records ``rolled_back`` and serves again; a resumed run that finds the step
  done does not roll back a second time (clients may have written since).
"""

from __future__ import annotations

import structlog

from volagent.domain.results import SnapshotDeleteResult, SnapshotListResult
from volagent.domain.tasks import (
    SnapshotCreateTask,
    SnapshotDeleteTask,
    SnapshotListTask,
    SnapshotRollbackTask,
)
from volagent.domain.volume import Snapshot, Volume, VolumeState
from volagent.engine.context import TaskContext
from volagent.errors import (
    SnapshotAlreadyExists,
    SnapshotLimitReached,
    SnapshotNotFound,
    SnapshotNotLatest,
)
from volagent.services.deps import Deps, snapshot_object, zone_info

_log = structlog.get_logger(__name__)


class SnapshotService:
    """The snapshot task kinds."""

    def __init__(self, deps: Deps) -> None:
        """Work with ``deps``."""
        self._d = deps

    async def _record(self, uuid: str, **changes: object) -> Volume:
        d = self._d
        snapshots = [snapshot_object(s) for s in await d.snapshots(uuid)]
        found = await d.volume_dataset(uuid)
        used = {} if found is None else {"used_bytes": found.used_bytes}
        async with d.catalog.lock(uuid):
            return await d.catalog.change(uuid, snapshots=snapshots, **used, **changes)

    async def create(self, task: SnapshotCreateTask, ctx: TaskContext) -> Snapshot:
        """``snapshot.create``."""
        d, uuid, name = self._d, task.params.volume_uuid, task.params.name
        d.live(uuid)
        existing = {s.name: s for s in await d.snapshots(uuid)}
        if name in existing and not ctx.done("creating"):
            raise SnapshotAlreadyExists(
                f"volume {uuid} already has a snapshot {name!r}", details={"name": name}
            )
        if name not in existing:
            limit = d.limits.max_snapshots_per_volume
            if len(existing) >= limit:
                raise SnapshotLimitReached(
                    f"volume {uuid} has {len(existing)} snapshots, the limit is {limit}",
                    details={"limit": limit, "snapshots": len(existing)},
                )
            await ctx.step_done("creating")
            await d.storage.create_snapshot(d.dataset(uuid), name)
        volume = await self._record(uuid)
        return next(s for s in volume.snapshots if s.name == name)

    async def delete(self, task: SnapshotDeleteTask, ctx: TaskContext) -> SnapshotDeleteResult:
        """``snapshot.delete``: an absent snapshot succeeds with ``already_absent``."""
        d, uuid, name = self._d, task.params.volume_uuid, task.params.name
        d.live(uuid)
        existing = {s.name for s in await d.snapshots(uuid)}
        if name not in existing:
            return SnapshotDeleteResult(name=name, already_absent=not ctx.done("destroying"))
        await ctx.step_done("destroying")
        await d.storage.destroy_snapshot(d.dataset(uuid), name, missing_ok=True)
        await self._record(uuid)
        return SnapshotDeleteResult(name=name, already_absent=False)

    async def list(self, task: SnapshotListTask, ctx: TaskContext) -> SnapshotListResult:
        """``snapshot.list``: oldest first."""
        del ctx
        d, uuid = self._d, task.params.volume_uuid
        d.live(uuid)
        return SnapshotListResult(snapshots=[snapshot_object(s) for s in await d.snapshots(uuid)])

    async def rollback(self, task: SnapshotRollbackTask, ctx: TaskContext) -> Volume:
        """``snapshot.rollback``: stop serving, roll back, serve again."""
        d, params = self._d, task.params
        uuid, name = params.volume_uuid, params.name
        volume = d.live(uuid)
        if not ctx.done("rolled_back"):
            snapshots = [s.name for s in await d.snapshots(uuid)]
            if name not in snapshots:
                raise SnapshotNotFound(
                    f"volume {uuid} has no snapshot {name!r}", details={"name": name}
                )
            newer = snapshots[snapshots.index(name) + 1 :]
            if newer and not params.destroy_newer:
                raise SnapshotNotLatest(
                    f"{len(newer)} snapshot(s) are newer than {name!r}",
                    details={"name": name, "newer": newer},
                )
            await ctx.progress("stop serving", 0, 3)
            await d.supervisor.unwatch(uuid)
            await d.zones.stop(uuid)
            await ctx.progress("rollback", 1, 3)
            await d.storage.rollback(d.dataset(uuid), name, destroy_newer=params.destroy_newer)
            await ctx.step_done("rolled_back")
        await ctx.progress("serve", 2, 3)
        zone_spec = await d.zone_spec(uuid, volume.spec())
        # Stopped and started again: one restart more than the volume's zone had.
        status = await d.zones.start(zone_spec, restarts=volume.zone.restarts + 1)
        await d.supervisor.watch(zone_spec, status)
        await ctx.progress("serve", 3, 3)
        return await self._record(uuid, state=VolumeState.READY, zone=zone_info(status))
