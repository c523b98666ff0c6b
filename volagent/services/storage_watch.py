"""Notice the storage going away and coming back, and serve the volumes again when it does.

zfs-fuse is a daemon: when it stops, every dataset is unmounted under the zones, ``zfs``
commands fail (tasks end with the retryable ``StorageUnavailable``) and readiness says so.
The zones' NFS servers keep answering NULL calls, so the zone supervisor alone would not
notice; worse, a zone it restarted meanwhile would serve the empty directory left where the
dataset was. So, every :data:`CHECK_EVERY_S` seconds, :class:`StorageWatch` asks ZFS for the
pool and looks at the dataset root's mount:

* when ZFS stops answering, or the root's mount is dead (the daemon died and was started
  again between two looks), the zone supervisor is paused;
* when it answers again, the dataset root (and the datasets above it) and each served
  volume's dataset are mounted again (the dead mounts a killed zfs-fuse leaves are detached
  first), each watched zone is restarted so that its NFS server opens the new mount, and the
  supervisor resumes.

A zfs-fuse stopped gracefully waits, without end, for every open file on its datasets to be
closed, and the zones hold theirs open; so the outage an operator meets is the daemon dying
(killed, crashed, out of memory) and being started again.

A kernel ZFS does not go away like this, and then the watch only ever sees the storage up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, NoReturn

import structlog

from volagent.errors import StorageUnavailable, VolagentError
from volagent.services.deps import Deps

_log = structlog.get_logger(__name__)

#: What :meth:`StorageWatch.run` is called in the daemon's task group.
TASK_NAME: Final = "storage-watch"
#: Seconds between two looks at the pool.
CHECK_EVERY_S: Final = 2.0
#: How long ZFS may take to answer before it counts as away.
ANSWER_TIMEOUT_S: Final = 10.0
#: Why the zones are restarted, as their status says.
REASON: Final = "the storage came back"
#: The problem when ZFS answers but the dataset root's mount is dead.
DEAD_MOUNT: Final = "the dataset root's mount is dead: the ZFS daemon died and was restarted"
#: The problem while ZFS answers again and the volumes are not yet served again.
SERVING_AGAIN: Final = "ZFS answers again; the volumes are being mounted and served again"


class StorageWatch:
    """Watches whether ZFS answers; see the module docstring."""

    def __init__(self, deps: Deps) -> None:
        """Watch the pool of ``deps`` and serve its volumes again after an outage."""
        self._d = deps
        self._up = True
        self._since = time.monotonic()
        self.outages = 0

    @property
    def up(self) -> bool:
        """Whether ZFS answered at the last look (and the volumes were served again since)."""
        return self._up

    def as_dict(self) -> dict[str, object]:
        """For ``/status``."""
        return {
            "up": self._up,
            "for_s": round(time.monotonic() - self._since, 3),
            "outages": self.outages,
        }

    async def run(self) -> NoReturn:
        """Look at the pool every :data:`CHECK_EVERY_S` until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(CHECK_EVERY_S)

    async def check(self) -> None:
        """One look: note an outage, or serve the volumes again after one."""
        problem = await self.problem()
        if problem is None:
            return
        self._down(problem)
        if problem not in (DEAD_MOUNT, SERVING_AGAIN):
            return  # ZFS does not answer: nothing to do but wait
        began = time.monotonic()
        try:
            served = await self._serve_again()
        except StorageUnavailable as exc:
            _log.warning("storage went away again while serving the volumes", error=exc.message)
            return  # tried again at the next look
        self._d.supervisor.resume()
        _log.warning(
            "storage_back",
            pool=self._d.pool,
            down_s=round(began - self._since, 3),
            zones_restarted=served,
            recovery_s=round(time.monotonic() - began, 3),
        )
        self._up, self._since = True, time.monotonic()

    async def problem(self) -> str | None:
        """Why the storage does not serve the volumes now, or None when it does."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                await self._d.storage.pool_info(self._d.pool)
        except (TimeoutError, VolagentError) as exc:
            return _why(exc)
        return await self.serving_problem()

    async def serving_problem(self) -> str | None:
        """Given that ZFS answers: why the volumes are not served again yet, or None.

        Changes nothing, so readiness (which reads the pool itself) can ask at any time. ZFS
        may answer again before this watch has seen it go: the dead mount of the dataset root
        tells the outage anyway.
        """
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                dead = await self._d.storage.mount_dead(self._d.dataset_root)
        except (TimeoutError, VolagentError) as exc:
            return _why(exc)
        if dead:
            return DEAD_MOUNT
        return None if self._up else SERVING_AGAIN

    def _down(self, reason: str) -> None:
        if not self._up:
            return
        self._up, self._since = False, time.monotonic()
        self.outages += 1
        self._d.supervisor.pause()
        _log.error("storage_unavailable", pool=self._d.pool, error=reason)

    async def _serve_again(self) -> int:
        """Mount what the volumes need and restart each watched zone; zones restarted."""
        d = self._d
        parts = d.dataset_root.split("/")
        for depth in range(1, len(parts) + 1):
            name = "/".join(parts[:depth])
            try:
                await d.storage.mount(name)
            except StorageUnavailable:
                raise
            except VolagentError as exc:  # canmount=off, say: the volumes may still mount
                _log.info("dataset not mounted", dataset=name, error=exc.message)
        restarted = 0
        for uuid in d.supervisor.watched():
            volume = d.catalog.get(uuid)
            if volume is None:
                continue
            try:
                await d.storage.mount(d.dataset(uuid))  # a dead mount still counts as mounted
                spec = await d.zone_spec(uuid, volume.spec())
                await d.supervisor.restart(spec, REASON)
            except StorageUnavailable:
                raise
            except VolagentError as exc:
                _log.error("zone not served again", volume=uuid, error=exc.message)
                continue
            restarted += 1
        return restarted


def _why(exc: TimeoutError | VolagentError) -> str:
    """Why ZFS did not answer."""
    if isinstance(exc, VolagentError):
        return exc.message
    return f"ZFS did not answer within {ANSWER_TIMEOUT_S:g} s"
