"""The results of succeeded tasks that are not a volume or a snapshot object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Final, Literal

from pydantic import Field

from volagent.domain.volume import Snapshot, Volume
from volagent.domain.wire import SnapshotName, Uuid, WireModel


class VolumeDeleteResult(WireModel):
    """``volume.delete``: the volume is gone (or was never here)."""

    uuid: Uuid
    state: Literal["deleted"] = "deleted"
    already_absent: bool


class PoolSpace(WireModel):
    """Size and free space of the pool the volumes live in."""

    size_bytes: Annotated[int, Field(ge=0)]
    free_bytes: Annotated[int, Field(ge=0)]


class VolumeListResult(WireModel):
    """``volume.list``: every volume of this node and the pool's space."""

    volumes: list[Volume]
    pool: PoolSpace


class SnapshotDeleteResult(WireModel):
    """``snapshot.delete``: the snapshot is gone (or was never there)."""

    name: SnapshotName
    already_absent: bool


class SnapshotListResult(WireModel):
    """``snapshot.list``: the volume's snapshots, oldest first."""

    snapshots: list[Snapshot]


Result = (
    Volume
    | VolumeDeleteResult
    | VolumeListResult
    | Snapshot
    | SnapshotDeleteResult
    | SnapshotListResult
)

#: The result model of each task kind.
RESULT_TYPES: Final[Mapping[str, type[Result]]] = {
    "volume.create": Volume,
    "volume.delete": VolumeDeleteResult,
    "volume.resize": Volume,
    "volume.get": Volume,
    "volume.list": VolumeListResult,
    "volume.set_access": Volume,
    "snapshot.create": Snapshot,
    "snapshot.delete": SnapshotDeleteResult,
    "snapshot.list": SnapshotListResult,
    "snapshot.rollback": Volume,
    "zone.restart": Volume,
    "zone.update": Volume,
}
