"""The Zones port: what services may ask of a volume's NFS server zone, whatever runs it.

A zone serves one volume: a user-mode NFS server with its own IP on the tenant's network,
exporting the volume's mounted dataset. On Linux a zone is a network namespace plus a private
mount namespace running rpcbind and nfs-ganesha (``volagent.adapters.netns``); on SmartOS it
will be a zone managed with vmadm. Nothing here names a namespace, a cgroup or a program.

Zones outlive the agent: a runtime records what it needs to find a zone again, and a new
runtime object over the same state adopts running zones instead of restarting them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class ZoneState(StrEnum):
    """The zone part of the volume object (protocol v1)."""

    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Nic:
    """The zone's address on the tenant network ``network`` (a name mapped to a bridge)."""

    ip: str
    prefix: int
    network: str
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class ZoneSpec:
    """Everything a runtime needs to serve one volume.

    ``source`` is the directory to export (the volume dataset's mountpoint, which must be
    mounted); ``export_path`` is the path clients use, the same for NFSv3 and NFSv4.
    ``allowed_clients`` are CIDRs or addresses; anyone else is refused on every version.
    """

    volume_uuid: str
    source: str
    export_path: str
    nic: Nic
    allowed_clients: tuple[str, ...]
    read_only: bool = False
    nfs_versions: tuple[int, ...] = (3, 4)


@dataclass(frozen=True, slots=True)
class ZoneStatus:
    """What a runtime knows of one zone right now."""

    volume_uuid: str
    state: ZoneState
    since: datetime
    restarts: int = 0
    reason: str = ""
    pids: Sequence[int] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ZoneUsage:
    """Resources the zone's processes use: resident memory and CPU time consumed."""

    rss_bytes: int
    cpu_seconds: float


class Zones(Protocol):
    """Start, stop and watch NFS server zones. Every call is idempotent."""

    async def start(self, spec: ZoneSpec, *, restarts: int = 0) -> ZoneStatus:
        """Serve ``spec``; a zone already running with this spec is left as it is.

        ``restarts`` is the count a zone started afresh begins with: the restarts the volume's
        zone had before it was stopped (a rollback, say) or lost, so the count never goes back.

        Raises NetworkUnavailable when ``spec.nic.network`` has no usable bridge, ZoneFailed
        when the source is not mounted (never export an empty directory) or the server does
        not come up.
        """
        ...

    async def stop(self, volume_uuid: str) -> None:
        """Stop and remove the zone; leaves nothing behind. Absent zones are fine."""
        ...

    async def restart(self, spec: ZoneSpec) -> ZoneStatus:
        """Stop and start again with the same data, IP and export path."""
        ...

    async def update(self, spec: ZoneSpec) -> ZoneStatus:
        """Re-render the configuration from current settings and binaries, then restart."""
        ...

    async def set_access(self, spec: ZoneSpec) -> ZoneStatus:
        """Apply new ``allowed_clients``/``read_only`` without touching the data path."""
        ...

    async def status(self, volume_uuid: str) -> ZoneStatus | None:
        """The zone's status, or None when this runtime has no record of it."""
        ...

    async def adopt(self) -> list[ZoneStatus]:
        """Find the zones recorded by an earlier runtime; keep those running, report the rest."""
        ...

    async def probe(self, volume_uuid: str) -> bool:
        """Whether the zone's NFS server answers (NULL calls); False when it does not."""
        ...

    async def connected_clients(self, volume_uuid: str) -> list[str]:
        """Client IPs with established connections to the zone's NFS server."""
        ...

    async def usage(self, volume_uuid: str) -> ZoneUsage:
        """Resident memory and CPU time of the zone's processes."""
        ...
