"""What the services work with: the ports, the catalog and the node's settings, plus helpers.

Services talk only to the ports (:class:`~volagent.ports.storage.Storage`,
:class:`~volagent.ports.zones.Zones`) and to the engine's catalog and supervisor; only the
daemon builds a :class:`Deps` from real adapters.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from volagent.config import LimitsConfig
from volagent.domain.names import volume_dataset_name
from volagent.domain.spec import SPEC_KEYS, VolumeSpec
from volagent.domain.volume import Snapshot, Volume, ZoneInfo
from volagent.errors import NetworkUnavailable, VolumeNotFound, ZoneFailed
from volagent.ports.storage import SnapshotInfo, Storage, VolumeDataset
from volagent.ports.zones import Zones, ZoneSpec, ZoneStatus
from volagent.services.catalog import Catalog
from volagent.services.zone_supervisor import ZoneSupervisor

MIB: Final = 1024 * 1024
#: The mode of a fresh volume's root directory: anyone may create files (sticky, like /tmp);
#: with root squash, clients' root writes as the anonymous user.
ROOT_MODE: Final = 0o1777


async def set_root_mode(mountpoint: str) -> None:
    """Give a fresh volume's root directory (mounted at ``mountpoint``) :data:`ROOT_MODE`."""
    await asyncio.to_thread(os.chmod, mountpoint, ROOT_MODE)


@dataclass(frozen=True, slots=True)
class Deps:
    """Everything a service needs."""

    cn: str
    dataset_root: str
    networks: Collection[str]
    limits: LimitsConfig
    storage: Storage
    zones: Zones
    supervisor: ZoneSupervisor
    catalog: Catalog

    @property
    def pool(self) -> str:
        """The pool the volumes live in."""
        return self.dataset_root.split("/", 1)[0]

    def dataset(self, uuid: str) -> str:
        """The dataset of volume ``uuid``."""
        return volume_dataset_name(self.dataset_root, uuid)

    def live(self, uuid: str) -> Volume:
        """The live volume ``uuid``; VolumeNotFound when there is none."""
        volume = self.catalog.get(uuid)
        if volume is None:
            raise VolumeNotFound(f"no volume {uuid} on this node", details={"uuid": uuid})
        return volume

    def check_network(self, spec: VolumeSpec) -> None:
        """Refuse a nic on a network this node has no bridge mapped for."""
        if spec.nic.network not in self.networks:
            raise NetworkUnavailable(
                f"network {spec.nic.network!r} is not mapped to a bridge on this node",
                details={"network": spec.nic.network, "mapped": sorted(self.networks)},
            )

    async def volume_dataset(self, uuid: str) -> VolumeDataset | None:
        """The volume's dataset with its spec keys, or None."""
        return await self.storage.get_volume(self.dataset_root, uuid, SPEC_KEYS)

    async def volume_and_snapshots(
        self, uuid: str
    ) -> tuple[VolumeDataset, list[SnapshotInfo]] | None:
        """The volume's dataset and its snapshots (oldest first) from one read, or None."""
        return await self.storage.get_volume_and_snapshots(self.dataset_root, uuid, SPEC_KEYS)

    async def zone_spec(
        self, uuid: str, spec: VolumeSpec, found: VolumeDataset | None = None
    ) -> ZoneSpec:
        """The zone spec serving volume ``uuid``, its dataset mounted (else ZoneFailed).

        ``found`` is a fresh read of the dataset when the caller has one (no read then, unless
        the dataset must be mounted).
        """
        if found is None:
            found = await self.volume_dataset(uuid)
        if found is None:
            raise VolumeNotFound(f"the dataset of volume {uuid} is gone", details={"uuid": uuid})
        if not found.mounted:
            await self.storage.mount(found.dataset)
            found = await self.volume_dataset(uuid)
        if found is None or not found.mounted or found.mountpoint is None:
            raise ZoneFailed(
                f"the dataset of volume {uuid} cannot be mounted", details={"uuid": uuid}
            )
        return spec.zone_spec(uuid, found.mountpoint)

    async def snapshots(self, uuid: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first."""
        return await self.storage.list_snapshots(self.dataset(uuid))


def zone_info(status: ZoneStatus) -> ZoneInfo:
    """The ``zone`` part of the volume object from a runtime status."""
    return ZoneInfo(state=status.state, restarts=status.restarts, since=status.since)


def snapshot_object(info: SnapshotInfo) -> Snapshot:
    """The snapshot object of protocol v1."""
    return Snapshot(name=info.name, created=info.created, used_bytes=info.used_bytes)
