"""What the local HTTP API shows of a running agent: readiness, status, volumes, tasks, metrics.

:class:`AgentView` implements :class:`~volagent.http.view.NodeView` over the agent's parts.
Figures that cost a ZFS call (pool space, space used per volume) are read at most every
:data:`SPACE_TTL_S` seconds, so scrapes and readiness probes stay cheap at 1,000 volumes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from volagent import __version__
from volagent.adapters.mqtt import MqttAdapter
from volagent.domain.volume import VolumeState
from volagent.engine.journal import AsyncJournal
from volagent.engine.runner import Runner, utcnow
from volagent.errors import VolagentError
from volagent.http.view import Check
from volagent.metrics import Metrics
from volagent.ports.storage import PoolInfo, Storage
from volagent.ports.zones import ZoneState
from volagent.services.catalog import Catalog

#: How long pool space and per-volume use are reused before ZFS is asked again.
SPACE_TTL_S: Final = 10.0
#: How long the ZFS readiness check may take.
ZFS_CHECK_TIMEOUT_S: Final = 5.0


class CentralState(Protocol):
    """What readiness needs of the heartbeat (``consecutive_failures``)."""

    @property
    def consecutive_failures(self) -> int:
        """Heartbeats failed in a row."""
        ...


@dataclass(slots=True)
class _Space:
    pool: PoolInfo | None = None
    used: dict[str, int] | None = None
    read_at: float = -1e9


class AgentView:
    """The agent as the local HTTP API sees it."""

    def __init__(
        self,
        *,
        cn: str,
        dataset_root: str,
        started: float,
        mqtt: MqttAdapter,
        journal: AsyncJournal,
        storage: Storage,
        catalog: Catalog,
        runner: Runner,
        metrics: Metrics,
        central: CentralState | None,
        extra_status: Callable[[], Mapping[str, Any]] | None = None,
        storage_problem: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        """Show the agent made of these parts."""
        self._cn = cn
        self._root = dataset_root
        self._pool = dataset_root.split("/", 1)[0]
        self._started = started
        self._mqtt = mqtt
        self._journal = journal
        self._storage = storage
        self._catalog = catalog
        self._runner = runner
        self._metrics = metrics
        self._central = central
        self._extra = extra_status
        self._storage_problem = storage_problem
        self._space = _Space()
        self._space_lock = asyncio.Lock()

    async def space(self) -> PoolInfo | None:
        """The pool's size, free space and health, read at most every :data:`SPACE_TTL_S`."""
        return (await self._read_space()).pool

    async def _read_space(self) -> _Space:
        async with self._space_lock:
            if time.monotonic() - self._space.read_at > SPACE_TTL_S:
                try:
                    async with asyncio.timeout(ZFS_CHECK_TIMEOUT_S):
                        pool = await self._storage.pool_info(self._pool)
                        volumes = await self._storage.list_volumes(self._root, ())
                    self._space = _Space(
                        pool, {v.uuid: v.used_bytes for v in volumes}, time.monotonic()
                    )
                except (VolagentError, TimeoutError):
                    self._space = _Space(None, None, time.monotonic())  # tried again after the TTL
            return self._space

    async def ready(self) -> list[Check]:
        """Broker connected, ZFS healthy and serving, no failed zone, central reachable."""
        broker = self._mqtt.state
        try:
            async with asyncio.timeout(ZFS_CHECK_TIMEOUT_S):
                pool = await self._storage.pool_info(self._pool)
        except (VolagentError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, VolagentError) else "ZFS did not answer"
            zfs = Check("zfs", ok=False, detail=reason)
        else:
            zfs = Check("zfs", ok=pool.healthy, detail=f"pool {self._pool} {pool.health}")
            problem = None if self._storage_problem is None else await self._storage_problem()
            if problem is not None:
                zfs = Check("zfs", ok=False, detail=problem)
        failed = [v.uuid for v in self._catalog.all() if v.zone.state is ZoneState.FAILED]
        zones = Check(
            "zones",
            ok=not failed,
            detail=f"{len(failed)} zone(s) failed" if failed else f"{len(self._catalog)} volume(s)",
        )
        if self._central is None:
            central = Check("central", ok=True, detail="reporting disabled (central.url empty)")
        else:
            failures = self._central.consecutive_failures
            central = Check(
                "central",
                ok=failures < 3,
                detail="reachable" if failures == 0 else f"{failures} heartbeat(s) failed in a row",
            )
        return [
            Check(
                "broker",
                ok=broker.connected,
                detail="connected" if broker.connected else (broker.last_error or "connecting"),
            ),
            zfs,
            zones,
            central,
        ]

    async def status(self) -> Mapping[str, Any]:
        """Version, node, uptime, broker, task counts, volume summary."""
        broker = self._mqtt.state
        tasks = await self._journal.counts_by_state()
        by_state = Counter(v.state.value for v in self._catalog.all())
        document: dict[str, Any] = {
            "version": __version__,
            "cn": self._cn,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "broker": {
                "connected": broker.connected,
                "reconnects": broker.reconnects,
                "last_error": broker.last_error,
            },
            "tasks": {
                **{state.value: n for state, n in tasks.items()},
                "queued": self._runner.queued,
                "running_now": self._runner.running,
            },
            "volumes": {
                **{s.value: by_state.get(s.value, 0) for s in VolumeState},
                "total": len(self._catalog),
            },
        }
        if self._extra is not None:
            document.update(self._extra())
        return document

    async def volumes(self) -> list[Mapping[str, Any]]:
        """Every live volume object."""
        return [v.to_json_dict() for v in self._catalog.all()]

    async def volume(self, uuid: str) -> Mapping[str, Any] | None:
        """One volume object, or None."""
        found = self._catalog.get(uuid)
        return None if found is None else found.to_json_dict()

    async def task(self, task_id: str) -> Mapping[str, Any] | None:
        """What the journal holds of one task."""
        record = await self._journal.get(task_id)
        if record is None:
            return None
        return {
            "id": record.id,
            "kind": record.kind,
            "state": record.state.value,
            "volume_uuid": record.volume_uuid,
            "received": record.received,
            "started": record.started,
            "finished": record.finished,
            "attempts": record.attempts,
            "result": record.result,
            "error": record.error,
        }

    async def metrics(self) -> bytes:
        """Refresh the gauges, then render every metric."""
        m = self._metrics
        broker = self._mqtt.state
        m.set_broker(connected=broker.connected, reconnects=broker.reconnects)
        m.set_queue_depth(self._runner.queued, self._runner.running)
        volumes = self._catalog.all()
        m.set_volumes(Counter(v.state.value for v in volumes))
        m.set_zones(Counter(v.zone.state.value for v in volumes))
        space = await self._read_space()
        if space.pool is not None:
            m.set_pool(space.pool.size_bytes, space.pool.free_bytes)
        if space.used is not None:
            m.set_volume_used({v.uuid: space.used.get(v.uuid, v.used_bytes) for v in volumes})
        m.set_outbox(
            await self._journal.outbox_depth(), await self._journal.outbox_oldest_age(utcnow())
        )
        return m.render()
