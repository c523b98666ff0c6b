"""What the local HTTP API asks the daemon: the :class:`NodeView` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Check", "NodeView"]


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: its name (broker, zfs, zones, central), outcome and explanation."""

    name: str
    ok: bool
    detail: str


class NodeView(Protocol):
    """The daemon's answers to the local HTTP API.

    Every method returns JSON-ready values (mappings, lists, strings, numbers, booleans, None);
    timezone-aware datetimes are accepted too and written as protocol timestamps.
    """

    async def ready(self) -> list[Check]:
        """The readiness checks: broker, zfs, zones, central; ready when all are ok."""
        ...

    async def status(self) -> Mapping[str, Any]:
        """The status document: version, cn, uptime_s, broker, tasks by state, volumes."""
        ...

    async def volumes(self) -> list[Mapping[str, Any]]:
        """Every volume object of this node (protocol JSON)."""
        ...

    async def volume(self, uuid: str) -> Mapping[str, Any] | None:
        """The volume object of ``uuid``, or None when this node has no such volume."""
        ...

    async def task(self, task_id: str) -> Mapping[str, Any] | None:
        """The task record of ``task_id``, or None when the agent does not know it.

        Fields: id, kind, state, received, started, finished, attempts, volume_uuid, result,
        error.
        """
        ...

    async def metrics(self) -> bytes:
        """The Prometheus text exposition, gauges refreshed first."""
        ...
