"""Keep watched zones answering: probe them, restart the dead or hung, give up on crash loops.

Every ``probe_interval_s`` the supervisor probes each zone it watches (:meth:`Zones.probe`,
all zones of a round at once; a probe taking over ``probe_timeout_s`` counts as no answer).
A zone that does not answer is restarted with :meth:`Zones.restart`; when it keeps failing,
each further restart waits longer (exponential backoff from ``backoff_initial_s`` up to
``backoff_max_s``, during which the zone is not probed either). ``crash_loop_failures``
failed probes within ``crash_loop_window_s`` mark the zone :attr:`~ZoneState.FAILED` with
the reason, and it is left alone until it is watched again (after an operator's
``zone.restart``, say). A probe that answers ends the backoff.

While the storage is away (:meth:`ZoneSupervisor.pause`), no zone is probed or restarted:
a zone started then would serve an empty directory in place of its unmounted dataset.
:meth:`ZoneSupervisor.restart` restarts one watched zone on request (its storage came back).

The supervisor keeps each watched zone's :class:`ZoneStatus` (restart count, since, reason)
and reports every change, a restart or a failure, through ``on_change``, so the task engine
can move the volume's state. It never stops a zone: cancelling :meth:`ZoneSupervisor.run`
(the daemon's task group owns it) leaves every zone as it is, and a restart in flight runs to
its end first, so no zone is left half restarted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, NoReturn

import structlog

from volagent import aio
from volagent.errors import VolagentError
from volagent.ports.zones import Zones, ZoneSpec, ZoneState, ZoneStatus

_log = structlog.get_logger(__name__)

#: What :meth:`ZoneSupervisor.run` is called in the daemon's task group.
TASK_NAME: Final = "zone-supervisor"
#: The reason given for a zone that answered its probe with no.
NO_ANSWER: Final = "the NFS server did not answer"

OnChange = Callable[[str, ZoneStatus], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SupervisorPolicy:
    """How often zones are probed, how restarts back off, and what counts as a crash loop."""

    probe_interval_s: float = 5.0
    probe_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    crash_loop_failures: int = 5
    crash_loop_window_s: float = 600.0

    def __post_init__(self) -> None:
        """Refuse values that would make the supervisor spin or never give up."""
        positive = (
            "probe_interval_s",
            "probe_timeout_s",
            "backoff_initial_s",
            "crash_loop_window_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            msg = "backoff_max_s must be at least backoff_initial_s"
            raise ValueError(msg)
        if self.crash_loop_failures < 1:
            msg = "crash_loop_failures must be at least 1"
            raise ValueError(msg)

    def backoff(self, consecutive: int) -> float:
        """Seconds to leave a zone alone after its ``consecutive``-th restart in a row."""
        return min(self.backoff_initial_s * 2.0 ** (consecutive - 1), self.backoff_max_s)


@dataclass(eq=False, slots=True)
class _Watch:
    """One watched zone: its spec, status, recent failures and backoff."""

    spec: ZoneSpec
    status: ZoneStatus
    failures: deque[float] = dataclasses.field(default_factory=deque)
    consecutive: int = 0
    not_before: float = 0.0
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


class ZoneSupervisor:
    """Probes watched zones and restarts those that do not answer; see the module docstring.

    ``clock`` (monotonic seconds), ``now`` (wall time for ``since``) and ``sleep`` are
    injectable so tests need not wait.
    """

    def __init__(
        self,
        zones: Zones,
        *,
        on_change: OnChange,
        policy: SupervisorPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._zones = zones
        self._on_change = on_change
        self.policy = policy or SupervisorPolicy()
        self._clock = clock
        self._now = now
        self._sleep = sleep
        self._watched: dict[str, _Watch] = {}
        self._paused = False

    async def watch(self, spec: ZoneSpec, status: ZoneStatus | None = None) -> None:
        """Supervise the zone serving ``spec`` from now on, keeping it running.

        ``status`` (say, from :meth:`Zones.adopt`) carries the zone's restart count and
        ``since`` over; a status that is not running restarts the count of time from now.
        Watching a zone already watched takes the new spec and clears its failure history:
        a zone marked failed is given a fresh start.
        """
        uuid = spec.volume_uuid
        current = self._watched.get(uuid)
        if current is None:
            self._watched[uuid] = _Watch(spec, self._running(uuid, status))
            return
        async with current.lock:
            current.spec = spec
            current.status = self._running(uuid, status or current.status)
            current.failures.clear()
            current.consecutive = 0
            current.not_before = 0.0

    def _running(self, uuid: str, status: ZoneStatus | None) -> ZoneStatus:
        if status is None:
            return ZoneStatus(uuid, ZoneState.RUNNING, self._now())
        if status.state is ZoneState.RUNNING:
            return status
        return dataclasses.replace(status, state=ZoneState.RUNNING, since=self._now(), reason="")

    async def unwatch(self, volume_uuid: str) -> None:
        """Stop supervising the zone; returns once no probe or restart of it is in flight."""
        watch = self._watched.pop(volume_uuid, None)
        if watch is not None:
            async with watch.lock:
                pass

    def watched(self) -> list[str]:
        """The volume uuids whose zones are watched."""
        return list(self._watched)

    def pause(self) -> None:
        """Probe and restart nothing until :meth:`resume` (the storage is away)."""
        self._paused = True

    def resume(self) -> None:
        """Probe and restart again."""
        self._paused = False

    @property
    def paused(self) -> bool:
        """Whether probing is paused."""
        return self._paused

    async def restart(self, spec: ZoneSpec, reason: str) -> None:
        """Restart the watched zone serving ``spec`` now, reporting the change.

        For a zone whose processes run but can no longer serve, which no probe would notice
        (its dataset was unmounted under it). A zone not watched, or failed, is left alone.
        """
        watch = self._watched.get(spec.volume_uuid)
        if watch is None:
            return
        async with watch.lock:
            if self._watched.get(spec.volume_uuid) is not watch:
                return
            if watch.status.state is ZoneState.FAILED:
                return
            watch.spec = spec
            change = await self._restart(watch, reason)
        if change is not None:
            await self._on_change(spec.volume_uuid, change)

    def status(self, volume_uuid: str) -> ZoneStatus | None:
        """The supervisor's status of a watched zone, or None when it is not watched."""
        watch = self._watched.get(volume_uuid)
        return None if watch is None else watch.status

    async def run(self) -> NoReturn:
        """Check every watched zone each ``probe_interval_s`` until cancelled."""
        while True:
            await self.check_all()
            await self._sleep(self.policy.probe_interval_s)

    async def check_all(self) -> None:
        """One round: check every watched zone at once; returns when all checks are done."""
        if self._paused:
            return
        async with asyncio.TaskGroup() as group:
            for uuid, watch in list(self._watched.items()):
                group.create_task(self._check(watch), name=f"{TASK_NAME}:{uuid}")

    async def _check(self, watch: _Watch) -> None:
        uuid = watch.spec.volume_uuid
        async with watch.lock:
            if self._watched.get(uuid) is not watch or watch.status.state is ZoneState.FAILED:
                return
            if self._clock() < watch.not_before:
                return
            try:
                async with asyncio.timeout(self.policy.probe_timeout_s):
                    healthy = await self._zones.probe(uuid)
                reason = NO_ANSWER
            except TimeoutError:
                healthy = False
                reason = f"no answer to the probe within {self.policy.probe_timeout_s:g} s"
            except VolagentError as exc:
                healthy, reason = False, exc.message
            if healthy:
                watch.consecutive = 0
                return
            change = await self._failed_probe(watch, reason)
        if change is not None:  # outside the lock: on_change may watch or unwatch the zone
            await self._on_change(uuid, change)

    async def _failed_probe(self, watch: _Watch, reason: str) -> ZoneStatus | None:
        """Count the failure; mark a crash loop failed, else restart the zone with backoff.

        Returns the zone's new status when it changed.
        """
        uuid = watch.spec.volume_uuid
        now = self._clock()
        watch.failures.append(now)
        while watch.failures[0] <= now - self.policy.crash_loop_window_s:
            watch.failures.popleft()
        if len(watch.failures) >= self.policy.crash_loop_failures:
            window = f"{self.policy.crash_loop_window_s:g} s"
            why = f"crash loop: {len(watch.failures)} failures within {window}; last: {reason}"
            watch.status = dataclasses.replace(
                watch.status, state=ZoneState.FAILED, since=self._now(), reason=why
            )
            _log.error("zone_failed", volume_uuid=uuid, reason=why)
            return watch.status
        watch.consecutive += 1
        watch.not_before = now + self.policy.backoff(watch.consecutive)
        return await self._restart(watch, reason)

    async def _restart(self, watch: _Watch, reason: str) -> ZoneStatus | None:
        """Restart the zone (not interrupted halfway); its new status when it runs again."""
        uuid = watch.spec.volume_uuid
        try:
            restarted = await aio.uninterrupted(self._zones.restart(watch.spec))
        except VolagentError as exc:
            _log.warning("zone_restart_failed", volume_uuid=uuid, reason=reason, error=exc.message)
            return None
        if restarted.state is not ZoneState.RUNNING:
            error = restarted.reason or f"zone {restarted.state} after restart"
            _log.warning("zone_restart_failed", volume_uuid=uuid, reason=reason, error=error)
            return None
        watch.status = dataclasses.replace(
            restarted,
            # a runtime that keeps its own (lasting) count may know of more restarts
            restarts=max(watch.status.restarts + 1, restarted.restarts),
            since=self._now(),
            reason=f"restarted: {reason}",
        )
        _log.warning(
            "zone_restarted",
            volume_uuid=uuid,
            reason=reason,
            restarts=watch.status.restarts,
            backoff_s=self.policy.backoff(watch.consecutive) if watch.consecutive else 0.0,
        )
        return watch.status
