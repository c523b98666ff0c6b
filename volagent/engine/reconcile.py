"""Start-up reconciliation: ZFS and the running zones are the truth; the journal follows them.

Run once before any task, with the tasks the journal holds unfinished:

* a complete volume dataset (spec and marker) the journal knows is loaded as saved; one it
  does not know is **adopted** (saved and reported as a new object);
* a ``ready`` volume whose zone is not running gets it back; running zones are watched; a
  zone that cannot be started leaves its volume ``failed``;
* a dataset under the root without volagent's marker or a readable spec is **reported and
  left alone** (never destroyed), unless an unfinished create of that uuid will finish it;
* a volume the journal knows whose dataset is gone is ``failed`` (``deleted`` if it was being
  deleted), unless an unfinished task of that volume will deal with it;
* a zone recorded for no volume and no unfinished task is stopped (nothing else serves it).

Volumes with unfinished tasks are left to those tasks, which resume right after.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

import structlog

from volagent.domain.spec import SPEC_KEYS, spec_from_props
from volagent.domain.volume import Volume, VolumeState
from volagent.engine.journal import AsyncJournal, TaskRecord
from volagent.errors import InvalidParameter, VolagentError
from volagent.ports.storage import VolumeDataset
from volagent.ports.zones import ZoneState, ZoneStatus
from volagent.services.deps import Deps, zone_info

_log = structlog.get_logger(__name__)

#: Zones started at once while reconciling.
PARALLEL_STARTS: Final = 8


@dataclass(slots=True)
class Reconciliation:
    """What start-up reconciliation found and did."""

    loaded: int = 0
    adopted: list[str] = field(default_factory=list)
    zones_running: int = 0
    zones_started: list[str] = field(default_factory=list)
    zones_failed: list[str] = field(default_factory=list)
    zones_stopped: list[str] = field(default_factory=list)
    #: Datasets under the root that are not volagent volumes (reported, left alone).
    foreign: list[str] = field(default_factory=list)
    #: Volume datasets whose creation did not finish and that no task will finish.
    incomplete: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """For logs and ``/status``."""
        return {
            "loaded": self.loaded,
            "adopted": self.adopted,
            "zones_running": self.zones_running,
            "zones_started": self.zones_started,
            "zones_failed": self.zones_failed,
            "zones_stopped": self.zones_stopped,
            "foreign": self.foreign,
            "incomplete": self.incomplete,
            "vanished": self.vanished,
            "duration_s": round(self.duration_s, 3),
        }


class Reconciler:
    """One reconciliation over ``deps`` and the journal."""

    def __init__(self, deps: Deps, journal: AsyncJournal) -> None:
        """Reconcile the node ``deps`` describes."""
        self._d = deps
        self._journal = journal
        self._starts = asyncio.Semaphore(PARALLEL_STARTS)

    async def run(self, pending: list[TaskRecord]) -> Reconciliation:
        """Reconcile; ``pending`` are the unfinished tasks about to be resumed."""
        began = time.monotonic()
        d, out = self._d, Reconciliation()
        busy = {r.volume_uuid for r in pending if r.volume_uuid}
        scan = await d.storage.scan_volumes(d.dataset_root, SPEC_KEYS)
        datasets = scan.volumes
        out.foreign = list(scan.others)
        stored = {s.uuid: Volume.model_validate_json(s.body) for s in await self._journal.volumes()}
        zones = {s.volume_uuid: s for s in await d.zones.adopt()}

        work = []
        for found in datasets:
            volume = await self._load(found, stored.get(found.uuid), busy, out)
            if volume is not None and found.uuid not in busy:
                work.append(self._serve(volume, found, zones.get(found.uuid), out))
        await asyncio.gather(*work)

        on_zfs = {v.uuid for v in datasets}
        for uuid, prior in stored.items():
            if uuid in on_zfs or prior.state is VolumeState.DELETED:
                continue
            d.catalog.load(prior)
            if uuid in busy:
                continue
            out.vanished.append(uuid)
            gone = (
                VolumeState.DELETED if prior.state is VolumeState.DELETING else VolumeState.FAILED
            )
            if gone is VolumeState.FAILED:
                _log.error("a volume's dataset is gone", volume=uuid)
            await d.catalog.change(uuid, state=gone)
        for uuid in sorted(set(zones) - on_zfs - busy):
            _log.warning("stopping a zone that serves no volume", volume=uuid)
            await d.zones.stop(uuid)
            out.zones_stopped.append(uuid)
        for name in out.foreign:
            _log.warning(
                "dataset under the root is not a volagent volume; left alone", dataset=name
            )
        for name in out.incomplete:
            _log.warning("volume dataset never completed; left alone", dataset=name)
        out.duration_s = time.monotonic() - began
        _log.info("reconciled", **out.as_dict())
        return out

    async def _load(
        self,
        found: VolumeDataset,
        prior: Volume | None,
        busy: set[str],
        out: Reconciliation,
    ) -> Volume | None:
        d = self._d
        if not found.complete and found.uuid not in busy:
            out.incomplete.append(found.dataset)
            return None
        try:
            spec = spec_from_props(found.spec)
        except InvalidParameter as exc:
            if found.uuid not in busy:
                _log.warning("volume spec unreadable", dataset=found.dataset, error=exc.message)
                out.foreign.append(found.dataset)
            return None
        if prior is not None and prior.state is not VolumeState.DELETED:
            d.catalog.load(prior)
            out.loaded += 1
            return prior
        if found.uuid in busy:
            return None
        since = zone_info(ZoneStatus(found.uuid, ZoneState.STOPPED, found.created))
        adopted = await d.catalog.put(
            Volume.from_spec(
                found.uuid,
                spec,
                cn=d.cn,
                state=VolumeState.READY,
                zone=since,
                used_bytes=found.used_bytes,
            )
        )
        out.adopted.append(found.uuid)
        _log.info("volume adopted from ZFS", volume=found.uuid)
        return adopted

    async def _serve(
        self,
        volume: Volume,
        found: VolumeDataset,
        status: ZoneStatus | None,
        out: Reconciliation,
    ) -> None:
        d, uuid = self._d, volume.uuid
        running = status is not None and status.state is ZoneState.RUNNING
        if volume.state is VolumeState.FAILED and not running:
            return  # left for an operator's zone.restart
        if volume.state is VolumeState.DELETING:
            await d.catalog.change(uuid, state=VolumeState.FAILED)
            return
        try:
            async with self._starts:
                if found.mounted and found.mountpoint is not None:
                    # The scan has read it already: one ZFS call less per volume.
                    zone_spec = volume.spec().zone_spec(uuid, found.mountpoint)
                else:
                    zone_spec = await d.zone_spec(uuid, volume.spec())  # mounts it
                if not running:  # gone: started again, one restart more
                    status = await d.zones.start(zone_spec, restarts=volume.zone.restarts + 1)
                    out.zones_started.append(uuid)
                    _log.info("zone started again", volume=uuid)
                else:
                    out.zones_running += 1
            await d.supervisor.watch(zone_spec, status)
        except VolagentError as exc:
            _log.error("zone could not be started", volume=uuid, error=exc.message)
            out.zones_failed.append(uuid)
            failed = ZoneStatus(uuid, ZoneState.FAILED, volume.zone.since, volume.zone.restarts)
            await d.catalog.change(uuid, state=VolumeState.FAILED, zone=zone_info(failed))
            return
        assert status is not None  # noqa: S101  # set by adopt or by start above
        await d.catalog.change(uuid, state=VolumeState.READY, zone=zone_info(status))
