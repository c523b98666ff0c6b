"""The parameters of each task kind of protocol v1, with the protocol's defaults.

Every model refuses parameters it does not know. Sizes are checked against
``limits.max_volume_mib`` by :func:`check_limits` (the bound is configuration, not protocol).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from volagent.config import LimitsConfig
from volagent.domain.network import Clients, Nic
from volagent.domain.spec import Labels, NfsVersions, SizeMib, VolumeSpec
from volagent.domain.wire import SnapshotName, Uuid, VolumeName, WireModel, is_none
from volagent.errors import InvalidParameter


class Params(WireModel):
    """Base of every kind's parameters."""

    #: The parameter naming the volume the task acts on; None when it acts on no one volume.
    volume_param: ClassVar[str | None] = "uuid"

    @property
    def volume(self) -> str | None:
        """The uuid of the volume the task acts on (tasks on one volume run one at a time)."""
        return None if self.volume_param is None else str(getattr(self, self.volume_param))


class VolumeCreateParams(Params):
    """``volume.create``: a new volume, or the same one again (idempotent)."""

    uuid: Uuid
    name: VolumeName
    owner_uuid: Uuid
    size_mib: SizeMib
    nic: Nic
    allowed_clients: Clients | None = Field(
        default=None, exclude_if=is_none, description="Default (absent or null): the nic's subnet."
    )
    nfs_versions: NfsVersions = Field(default=[3, 4])
    read_only: bool = False
    labels: Labels = Field(default={})

    def spec(self) -> VolumeSpec:
        """The volume's spec, the defaults filled in."""
        clients = [self.nic.subnet] if self.allowed_clients is None else self.allowed_clients
        return VolumeSpec(
            name=self.name,
            owner_uuid=self.owner_uuid,
            size_mib=self.size_mib,
            nic=self.nic,
            allowed_clients=clients,
            nfs_versions=self.nfs_versions,
            read_only=self.read_only,
            labels=self.labels,
        )


class VolumeDeleteParams(Params):
    """``volume.delete``: refused while clients are connected unless ``force``."""

    uuid: Uuid
    force: bool = False


class VolumeResizeParams(Params):
    """``volume.resize``: the quota follows ``size_mib``."""

    uuid: Uuid
    size_mib: SizeMib


class VolumeGetParams(Params):
    """``volume.get``."""

    uuid: Uuid


class VolumeListParams(Params):
    """``volume.list``: no parameters."""

    volume_param: ClassVar[str | None] = None


class VolumeSetAccessParams(Params):
    """``volume.set_access``: both values are given; an empty list refuses every client."""

    uuid: Uuid
    allowed_clients: Clients
    read_only: bool


class SnapshotCreateParams(Params):
    """``snapshot.create``."""

    volume_param: ClassVar[str | None] = "volume_uuid"

    volume_uuid: Uuid
    name: SnapshotName


class SnapshotDeleteParams(Params):
    """``snapshot.delete``: an absent snapshot succeeds with ``already_absent``."""

    volume_param: ClassVar[str | None] = "volume_uuid"

    volume_uuid: Uuid
    name: SnapshotName


class SnapshotListParams(Params):
    """``snapshot.list``."""

    volume_param: ClassVar[str | None] = "volume_uuid"

    volume_uuid: Uuid


class SnapshotRollbackParams(Params):
    """``snapshot.rollback``: newer snapshots are destroyed only with ``destroy_newer``."""

    volume_param: ClassVar[str | None] = "volume_uuid"

    volume_uuid: Uuid
    name: SnapshotName
    destroy_newer: bool = False


class ZoneRestartParams(Params):
    """``zone.restart``: refused while clients are connected unless ``force``."""

    uuid: Uuid
    force: bool = False


class ZoneUpdateParams(Params):
    """``zone.update``: current NFS server build and configuration; data untouched."""

    uuid: Uuid
    force: bool = False


def check_limits(params: Params, limits: LimitsConfig) -> None:
    """Refuse a ``size_mib`` above ``limits.max_volume_mib`` (InvalidParameter)."""
    if not isinstance(params, VolumeCreateParams | VolumeResizeParams):
        return
    if params.size_mib > limits.max_volume_mib:
        reason = f"must be at most {limits.max_volume_mib} (limits.max_volume_mib)"
        raise InvalidParameter(
            f"invalid size_mib {params.size_mib}: {reason}",
            details={"parameter": "size_mib", "reason": reason},
        )
