"""The volume object of protocol v1, its states and its snapshots.

States move along :data:`TRANSITIONS`::

    creating ──► ready ◄──► failed
        │          │          │
        └──────────┴──────────┴──► deleting ──► deleted
                                      │
                                      └──► failed   (a delete that could not finish)

``creating → failed`` covers a create that cannot finish (its zone does not come up);
``deleted`` is final. Staying in the same state is not a transition and is always allowed.
:func:`check_transition` refuses anything else with a :class:`~volagent.errors.VolagentError`
(wire code ``Internal``): asking for an illegal transition is a bug in the agent, not a
problem with the task.

``generation`` counts changes: :meth:`Volume.with_changes` applies changes and adds one,
or returns the volume itself when nothing changed.

``resource`` (``nfs://<ip>/<export path>``) and ``filesystem_path``
(``<ip>:<export path>``) are derived from the nic and the name, IPv6 addresses in brackets;
the export path is ``/<name>`` (:func:`~volagent.domain.spec.export_path`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import ConfigDict, Field, ValidationError, computed_field

from volagent.domain.network import Clients, Nic
from volagent.domain.spec import Labels, NfsVersions, SizeMib, VolumeSpec, export_path
from volagent.domain.wire import SnapshotName, Timestamp, Uuid, VolumeName, WireModel
from volagent.errors import VolagentError
from volagent.ports.zones import ZoneState


class VolumeState(StrEnum):
    """The life of a volume."""

    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


#: The states each state may move to.
TRANSITIONS: Final[Mapping[VolumeState, frozenset[VolumeState]]] = {
    VolumeState.CREATING: frozenset({VolumeState.READY, VolumeState.FAILED, VolumeState.DELETING}),
    VolumeState.READY: frozenset({VolumeState.FAILED, VolumeState.DELETING}),
    VolumeState.FAILED: frozenset({VolumeState.READY, VolumeState.DELETING}),
    VolumeState.DELETING: frozenset({VolumeState.DELETED, VolumeState.FAILED}),
    VolumeState.DELETED: frozenset(),
}


def can_transition(current: VolumeState, target: VolumeState) -> bool:
    """Whether a volume in ``current`` may become ``target`` (same state: yes)."""
    return current is target or target in TRANSITIONS[current]


def check_transition(current: VolumeState, target: VolumeState) -> VolumeState:
    """Return ``target`` if the move is legal; else raise VolagentError (code Internal)."""
    if not can_transition(current, target):
        raise VolagentError(
            f"a volume cannot go from {current.value} to {target.value}",
            details={"from": current.value, "to": target.value},
        )
    return target


class ZoneInfo(WireModel):
    """The ``zone`` part of the volume object: the NFS server zone serving the volume."""

    state: ZoneState
    restarts: Annotated[int, Field(ge=0)]
    since: Timestamp


class Snapshot(WireModel):
    """A snapshot object (also the items of the volume object's ``snapshots``)."""

    name: SnapshotName
    created: Timestamp
    used_bytes: Annotated[int, Field(ge=0)]


class Volume(WireModel):
    """The volume object, as reported in results and to the central API."""

    # A volume read back from its JSON carries the derived resource and filesystem_path.
    model_config = ConfigDict(extra="ignore")

    uuid: Uuid
    name: VolumeName
    owner_uuid: Uuid
    size_mib: SizeMib
    used_bytes: Annotated[int, Field(ge=0)]
    state: VolumeState
    nic: Nic
    allowed_clients: Clients
    read_only: bool
    nfs_versions: NfsVersions
    zone: ZoneInfo
    snapshots: list[Snapshot]
    cn: Uuid
    generation: Annotated[int, Field(ge=1)]
    labels: Labels

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented way; mypy objects to any decorator over @property
    @property
    def resource(self) -> str:
        """``nfs://<ip>/<export path>``: the URL the volume is mounted by (v3 and v4)."""
        return f"nfs://{self.nic.url_host}{export_path(self.name)}"

    @computed_field  # type: ignore[prop-decorator]  # as for resource
    @property
    def filesystem_path(self) -> str:
        """``<ip>:<export path>``: what ``mount -t nfs`` takes."""
        return f"{self.nic.url_host}:{export_path(self.name)}"

    @classmethod
    def from_spec(
        cls,
        uuid: str,
        spec: VolumeSpec,
        *,
        cn: str,
        state: VolumeState,
        zone: ZoneInfo,
        used_bytes: int = 0,
        snapshots: Sequence[Snapshot] = (),
        generation: int = 1,
    ) -> Volume:
        """A volume object for the volume ``uuid`` with ``spec``."""
        return cls(
            uuid=uuid,
            name=spec.name,
            owner_uuid=spec.owner_uuid,
            size_mib=spec.size_mib,
            used_bytes=used_bytes,
            state=state,
            nic=spec.nic,
            allowed_clients=spec.allowed_clients,
            read_only=spec.read_only,
            nfs_versions=spec.nfs_versions,
            zone=zone,
            snapshots=list(snapshots),
            cn=cn,
            generation=generation,
            labels=spec.labels,
        )

    def spec(self) -> VolumeSpec:
        """The spec part of the volume object."""
        return VolumeSpec(
            name=self.name,
            owner_uuid=self.owner_uuid,
            size_mib=self.size_mib,
            nic=self.nic,
            allowed_clients=self.allowed_clients,
            nfs_versions=self.nfs_versions,
            read_only=self.read_only,
            labels=self.labels,
        )

    def with_changes(self, **changes: Any) -> Volume:
        """A copy with ``changes`` (field values) applied and ``generation`` one higher.

        Returns this volume itself when the changes change nothing. A change of ``state`` is
        checked with :func:`check_transition`; ``generation`` cannot be changed directly.
        Raises VolagentError (code Internal) for an unknown field or an invalid value.
        """
        if "generation" in changes:
            msg = "generation is bumped by with_changes, never set"
            raise VolagentError(msg, details={"field": "generation"})
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise VolagentError(
                f"a volume has no field {unknown[0]!r}", details={"field": unknown[0]}
            )
        try:
            candidate = type(self).model_validate({**dict(self), **changes})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise VolagentError(
                f"invalid volume change: {error['msg']}",
                details={"field": ".".join(str(part) for part in error["loc"])},
            ) from exc
        check_transition(self.state, candidate.state)
        if candidate == self:
            return self
        return candidate.model_copy(update={"generation": self.generation + 1})
