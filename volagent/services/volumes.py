"""Volume tasks: create, delete, resize, get, list, set_access, and zone restart and update.

Every step is idempotent, so a task interrupted anywhere (a shutdown, kill -9) finishes when
it is run again:

* ``volume.create``: the volume is saved ``creating``; the dataset is made with its spec and
  quota and completed with the marker; its root gets mode 1777; the zone is started and
  watched; the volume is ``ready``. A create that fails undoes what it made (the zone, the
  dataset), never what was there before it. The dataset was made by this create when it is
  found incomplete, or when the catalog holds the volume ``creating`` (only the running create
  of a volume leaves it so).
* ``volume.delete``: refused with ``VolumeInUse`` while clients are connected unless
  ``force``; ``deleting``, the zone stopped, the dataset destroyed with its snapshots,
  ``deleted``. A delete that cannot finish leaves the volume ``failed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import structlog

from volagent import aio
from volagent.domain.params import VolumeCreateParams
from volagent.domain.results import PoolSpace, VolumeDeleteResult, VolumeListResult
from volagent.domain.spec import spec_differences, spec_from_props, spec_to_props
from volagent.domain.tasks import (
    VolumeCreateTask,
    VolumeDeleteTask,
    VolumeGetTask,
    VolumeListTask,
    VolumeResizeTask,
    VolumeSetAccessTask,
    ZoneRestartTask,
    ZoneUpdateTask,
)
from volagent.domain.volume import Volume, VolumeState
from volagent.engine.context import TaskContext
from volagent.errors import (
    InsufficientSpace,
    InvalidParameter,
    VolagentError,
    VolumeAlreadyExists,
    VolumeInUse,
    VolumeSizeTooSmall,
)
from volagent.ports.storage import DatasetOptions, PoolInfo, VolumeDataset
from volagent.ports.zones import ZoneState, ZoneStatus
from volagent.services.deps import MIB, Deps, set_root_mode, snapshot_object, zone_info

_log = structlog.get_logger(__name__)


class VolumeService:
    """The volume and zone task kinds."""

    def __init__(self, deps: Deps) -> None:
        """Work with ``deps``."""
        self._d = deps

    # ------------------------------------------------------------------ create

    async def create(self, task: VolumeCreateTask, ctx: TaskContext) -> Volume:
        """``volume.create``."""
        d, params = self._d, task.params
        uuid, spec = params.uuid, params.spec()
        d.check_network(spec)
        # The pool's space is read meanwhile, for the check below (a new volume only).
        found, pool = await aio.both(d.volume_dataset(uuid), d.storage.pool_info(d.pool))
        current = d.catalog.get(uuid)
        if found is not None:
            self._same_volume(uuid, found.spec, params)
        other = d.catalog.named(spec.owner_uuid, spec.name)
        if other is not None and other.uuid != uuid:
            raise VolumeAlreadyExists(
                f"owner {spec.owner_uuid} already has a volume named {spec.name!r}",
                details={"uuid": other.uuid, "name": spec.name},
            )
        if (
            found is not None
            and found.complete
            and current is not None
            and current.state is not VolumeState.CREATING
        ):
            return await self._refreshed(current)  # the same create again: idempotent
        ours = (
            found is None
            or not found.complete
            or (current is not None and current.state is VolumeState.CREATING)
        )
        if found is None:
            _check_space(spec.size_mib * MIB, pool)
        try:
            return await self._build(task, ctx, found, made=ours)
        except VolagentError:
            if ours:
                await aio.uninterrupted(self._undo_create(uuid))
            raise
        except BaseException:
            if ours and not ctx.stopping():  # a timeout, not a shutdown: undo as for a failure
                await aio.uninterrupted(self._undo_create(uuid))
            raise

    def _same_volume(self, uuid: str, props: Mapping[str, str], params: VolumeCreateParams) -> None:
        try:
            existing = spec_from_props(props)
        except InvalidParameter as exc:
            raise VolumeAlreadyExists(
                f"a dataset for volume {uuid} exists with a spec this agent cannot read",
                details={"uuid": uuid, "reason": exc.message},
            ) from exc
        differences = spec_differences(existing, params.spec())
        if differences:
            raise VolumeAlreadyExists(
                f"volume {uuid} exists with another spec",
                details={"uuid": uuid, "differences": differences},
            )

    async def _build(
        self, task: VolumeCreateTask, ctx: TaskContext, found: VolumeDataset | None, *, made: bool
    ) -> Volume:
        """Dataset, root mode, zone; ``found`` is the dataset as :meth:`create` just read it."""
        d = self._d
        uuid, spec = task.params.uuid, task.params.spec()
        current = d.catalog.get(uuid)
        if current is None or current.state is not VolumeState.CREATING:
            starting = zone_info(ZoneStatus(uuid, ZoneState.STOPPED, ctx.received))
            await d.catalog.put(
                Volume.from_spec(uuid, spec, cn=d.cn, state=VolumeState.CREATING, zone=starting)
            )
        await ctx.progress("dataset", 0, 2)
        if found is None:
            options = DatasetOptions(quota_bytes=spec.size_mib * MIB, atime=False)
            found = await d.storage.create_volume(
                d.dataset_root, uuid, spec_to_props(spec), options
            )
        elif not found.complete:
            await d.storage.set_properties(found.dataset, {"quota": str(spec.size_mib * MIB)})
            await d.storage.complete_volume(d.dataset_root, uuid)
            found = await d.volume_dataset(uuid)
        zone_spec = await d.zone_spec(uuid, spec, found)  # mounts the dataset
        if made and not ctx.done("root_mode"):
            await set_root_mode(zone_spec.source)
            await ctx.step_done("root_mode")
        await ctx.checkpoint()
        await ctx.progress("zone", 1, 2)
        status = await d.zones.start(zone_spec)
        await d.supervisor.watch(zone_spec, status)
        await ctx.progress("zone", 2, 2)
        async with d.catalog.lock(uuid):
            return await d.catalog.change(
                uuid,
                state=VolumeState.READY,
                zone=zone_info(status),
                used_bytes=0 if found is None else found.used_bytes,
            )

    async def _undo_create(self, uuid: str) -> None:
        d = self._d
        _log.info("undoing a failed create", volume=uuid)
        with contextlib.suppress(VolagentError):
            await d.supervisor.unwatch(uuid)
            await d.zones.stop(uuid)
        try:
            await d.storage.destroy_dataset(d.dataset(uuid), recursive=True, missing_ok=True)
        except VolagentError as exc:
            _log.error(
                "a failed create could not remove its dataset", volume=uuid, error=exc.message
            )
        if d.catalog.get(uuid) is not None:
            with contextlib.suppress(VolagentError):
                await d.catalog.change(uuid, state=VolumeState.FAILED)
            d.catalog.forget(uuid)

    async def _refuse_if_in_use(self, uuid: str) -> None:
        """VolumeInUse (``details.clients``: their IPs) while clients are connected."""
        clients = await self._d.zones.connected_clients(uuid)
        if clients:
            raise VolumeInUse(
                f"volume {uuid} has {len(clients)} connected client(s)",
                details={"clients": clients},
            )

    # ------------------------------------------------------------------ delete

    async def delete(self, task: VolumeDeleteTask, ctx: TaskContext) -> VolumeDeleteResult:
        """``volume.delete``."""
        d, uuid = self._d, task.params.uuid
        current = d.catalog.get(uuid)
        found = await d.volume_dataset(uuid)
        deleting = current is not None and current.state is VolumeState.DELETING
        if found is None and current is None:
            return VolumeDeleteResult(uuid=uuid, already_absent=not ctx.done("deleting"))
        if not task.params.force and not deleting:
            await self._refuse_if_in_use(uuid)
        await ctx.step_done("deleting")
        if current is not None:
            async with d.catalog.lock(uuid):
                await d.catalog.change(uuid, state=VolumeState.DELETING)
        try:
            await d.supervisor.unwatch(uuid)
            await d.zones.stop(uuid)
            await ctx.checkpoint()
            await d.storage.destroy_dataset(d.dataset(uuid), recursive=True, missing_ok=True)
        except VolagentError:
            if d.catalog.get(uuid) is not None:
                await aio.uninterrupted(d.catalog.change(uuid, state=VolumeState.FAILED))
            raise
        if d.catalog.get(uuid) is not None:
            async with d.catalog.lock(uuid):
                await d.catalog.change(
                    uuid,
                    state=VolumeState.DELETED,
                    zone=zone_info(ZoneStatus(uuid, ZoneState.STOPPED, ctx.received)),
                )
        return VolumeDeleteResult(uuid=uuid, already_absent=False)

    # ------------------------------------------------------------------ resize

    async def resize(self, task: VolumeResizeTask, ctx: TaskContext) -> Volume:
        """``volume.resize``: the quota follows ``size_mib``."""
        del ctx
        d, uuid, size_mib = self._d, task.params.uuid, task.params.size_mib
        volume = d.live(uuid)
        found = await d.volume_dataset(uuid)
        used = 0 if found is None else found.used_bytes
        wanted = size_mib * MIB
        if used > wanted:
            raise VolumeSizeTooSmall(
                f"volume {uuid} uses {used} bytes, more than {size_mib} MiB",
                details={"used_bytes": used, "size_mib": size_mib},
            )
        if size_mib > volume.size_mib:
            pool = await d.storage.pool_info(d.pool)
            _check_space((size_mib - volume.size_mib) * MIB, pool)
        await d.storage.set_properties(d.dataset(uuid), {"quota": str(wanted)})
        await d.storage.update_volume_spec(d.dataset_root, uuid, {"size_mib": str(size_mib)})
        async with d.catalog.lock(uuid):
            return await d.catalog.change(uuid, size_mib=size_mib, used_bytes=used)

    # ------------------------------------------------------------------ read

    async def get(self, task: VolumeGetTask, ctx: TaskContext) -> Volume:
        """``volume.get``: the volume with fresh space figures."""
        del ctx
        return await self._refreshed(self._d.live(task.params.uuid))

    async def _refreshed(self, volume: Volume) -> Volume:
        read = await self._d.volume_and_snapshots(volume.uuid)
        if read is None:
            return volume.model_copy(update={"snapshots": []})
        found, snapshots = read
        return volume.model_copy(
            update={
                "used_bytes": found.used_bytes,
                "snapshots": [snapshot_object(s) for s in snapshots],
            }
        )

    async def list(self, task: VolumeListTask, ctx: TaskContext) -> VolumeListResult:
        """``volume.list``: every volume (fresh used bytes) and the pool's space."""
        del task, ctx
        d = self._d
        used = {v.uuid: v.used_bytes for v in await d.storage.list_volumes(d.dataset_root, ())}
        pool = await d.storage.pool_info(d.pool)
        volumes = [
            v.model_copy(update={"used_bytes": used.get(v.uuid, v.used_bytes)})
            for v in d.catalog.all()
        ]
        return VolumeListResult(
            volumes=volumes, pool=PoolSpace(size_bytes=pool.size_bytes, free_bytes=pool.free_bytes)
        )

    # ------------------------------------------------------------------ access

    async def set_access(self, task: VolumeSetAccessTask, ctx: TaskContext) -> Volume:
        """``volume.set_access``: new client list and read-only flag, applied without a restart."""
        del ctx
        d, params = self._d, task.params
        volume = d.live(params.uuid)
        spec = volume.spec().model_copy(
            update={"allowed_clients": params.allowed_clients, "read_only": params.read_only}
        )
        spec = type(spec).model_validate(spec.model_dump())  # canonical forms
        props = spec_to_props(spec)
        await d.storage.update_volume_spec(
            d.dataset_root,
            params.uuid,
            {"allowed_clients": props["allowed_clients"], "read_only": props["read_only"]},
        )
        zone = volume.zone
        if volume.zone.state is ZoneState.RUNNING:
            zone_spec = await d.zone_spec(params.uuid, spec)
            status = await d.zones.set_access(zone_spec)
            await d.supervisor.watch(zone_spec, status)
            zone = zone_info(status)
        async with d.catalog.lock(params.uuid):
            return await d.catalog.change(
                params.uuid,
                allowed_clients=spec.allowed_clients,
                read_only=spec.read_only,
                zone=zone,
            )

    # ------------------------------------------------------------------ zone

    async def restart_zone(
        self, task: ZoneRestartTask | ZoneUpdateTask, ctx: TaskContext
    ) -> Volume:
        """``zone.restart`` and ``zone.update``: ``VolumeInUse`` with clients, unless forced."""
        d, uuid = self._d, task.params.uuid
        volume = d.live(uuid)
        if not task.params.force and not ctx.resumed:
            await self._refuse_if_in_use(uuid)
        zone_spec = await d.zone_spec(uuid, volume.spec())
        await d.supervisor.unwatch(uuid)
        if task.kind == "zone.update":
            status = await d.zones.update(zone_spec)
        else:
            status = await d.zones.restart(zone_spec)
        await d.supervisor.watch(zone_spec, status)
        async with d.catalog.lock(uuid):
            return await d.catalog.change(uuid, state=VolumeState.READY, zone=zone_info(status))


def _check_space(wanted_bytes: int, pool: PoolInfo) -> None:
    """InsufficientSpace when ``pool`` has less than ``wanted_bytes`` free."""
    if wanted_bytes > pool.free_bytes:
        raise InsufficientSpace(
            f"the pool has {pool.free_bytes} bytes free, {wanted_bytes} are asked for",
            details={"free_bytes": pool.free_bytes, "wanted_bytes": wanted_bytes},
        )


async def zone_changed(deps: Deps, uuid: str, status: ZoneStatus) -> None:
    """The zone supervisor's report: a restarted zone, or one given up on (``failed``)."""
    volume = deps.catalog.get(uuid)
    if volume is None:
        return
    async with deps.catalog.lock(uuid):
        volume = deps.catalog.get(uuid)
        if volume is None or volume.state not in (VolumeState.READY, VolumeState.FAILED):
            return
        failed = status.state is ZoneState.FAILED
        state = VolumeState.FAILED if failed else VolumeState.READY
        if failed:
            _log.error("zone failed", volume=uuid, reason=status.reason)
        await deps.catalog.change(uuid, state=state, zone=zone_info(status))
