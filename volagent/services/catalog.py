"""The catalog: the volume objects of this node, each change saved, numbered and reported.

Every change to a volume goes through :meth:`Catalog.put` (a new object) or
:meth:`Catalog.change` (fields changed): the volume gets the next ``generation`` from the
journal, and the object is saved with its report to the central API queued in the same
journal transaction, so no change is lost or reported out of order. A change that changes
nothing does not count.

``used_bytes`` and the snapshots' ``used_bytes`` are what was measured at the last change;
``volume.get`` and ``volume.list`` answer with fresh figures without counting a change (space
use moves all the time; reporting every byte would flood the central API).

A ``deleted`` volume is saved and reported, then forgotten: the catalog holds live volumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from volagent.domain.volume import Volume, VolumeState
from volagent.engine.journal import AsyncJournal
from volagent.engine.runner import utcnow

_log = structlog.get_logger(__name__)


class Catalog:
    """Live volumes by uuid."""

    def __init__(
        self, journal: AsyncJournal, *, on_saved: Callable[[Volume], None] | None = None
    ) -> None:
        """``on_saved`` is told of each saved change (to wake the reporter, refresh status)."""
        self._journal = journal
        self._on_saved = on_saved
        self._volumes: dict[str, Volume] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, uuid: str) -> Volume | None:
        """The live volume ``uuid``, or None."""
        return self._volumes.get(uuid)

    def all(self) -> list[Volume]:
        """Every live volume, by uuid."""
        return [self._volumes[uuid] for uuid in sorted(self._volumes)]

    def __len__(self) -> int:
        """How many live volumes there are."""
        return len(self._volumes)

    def named(self, owner_uuid: str, name: str) -> Volume | None:
        """The live volume of ``owner_uuid`` called ``name``, or None."""
        for volume in self._volumes.values():
            if volume.owner_uuid == owner_uuid and volume.name == name:
                return volume
        return None

    def lock(self, uuid: str) -> asyncio.Lock:
        """The lock that orders changes to one volume (tasks and the zone supervisor)."""
        return self._locks.setdefault(uuid, asyncio.Lock())

    def load(self, volume: Volume) -> None:
        """Take a volume as saved before (start-up), without counting a change."""
        self._volumes[volume.uuid] = volume

    async def put(self, volume: Volume) -> Volume:
        """Save ``volume`` as a new object (a create, an adoption) at the next generation."""
        generation = await self._journal.bump_generation(volume.uuid)
        return await self._save(volume.model_copy(update={"generation": generation}))

    async def change(self, uuid: str, **changes: Any) -> Volume:
        """Apply ``changes`` to the live volume ``uuid``; save and report if anything changed."""
        current = self._volumes[uuid]
        changed = current.with_changes(**changes)
        if changed is current:
            return current
        generation = await self._journal.bump_generation(uuid)
        return await self._save(changed.model_copy(update={"generation": generation}))

    async def _save(self, volume: Volume) -> Volume:
        body = volume.to_json_bytes()
        await self._journal.save_volume(
            volume.uuid, volume.generation, body, now=utcnow(), report=True
        )
        if volume.state is VolumeState.DELETED:
            self._volumes.pop(volume.uuid, None)
        else:
            self._volumes[volume.uuid] = volume
        _log.info(
            "volume changed",
            volume=volume.uuid,
            state=volume.state.value,
            generation=volume.generation,
        )
        if self._on_saved is not None:
            self._on_saved(volume)
        return volume

    def forget(self, uuid: str) -> None:
        """Drop a volume that no longer exists here (its last state is already saved)."""
        self._volumes.pop(uuid, None)
