"""Per-zone control groups: memory, CPU and process limits, and removal once empty.

Both layouts are supported, detected under ``/sys/fs/cgroup``:

* **v1** (separate hierarchies, ``/sys/fs/cgroup/<controller>/``): a directory per zone in
  each of ``memory``, ``cpu`` and ``pids``, with ``memory.limit_in_bytes``,
  ``cpu.cfs_period_us``/``cpu.cfs_quota_us`` and ``pids.max``.
* **v2** (unified, ``/sys/fs/cgroup/cgroup.controllers`` exists): one directory per zone with
  ``memory.max``, ``cpu.max`` and ``pids.max``; the controllers are enabled in the
  ``cgroup.subtree_control`` of every ancestor first. v2 forbids processes in a cgroup whose
  controllers are delegated to children, so the parent must hold no process of its own: use
  an absolute parent there.

The zones' cgroups live under a parent: an absolute parent (``/volagent``) is taken from the
root of each hierarchy; a relative one from the agent's own cgroup in that hierarchy (read
from ``/proc/self/cgroup``). The zone's first process joins by writing its pid into each
directory's ``cgroup.procs`` (see :mod:`volagent.adapters.zone_init`); its children follow.

Removing a zone's cgroups waits until no process is left in them, then removes the
directories, and the parent too when no other zone uses it.
"""

from __future__ import annotations

import asyncio
import errno
from contextlib import suppress
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Final

import structlog

from volagent.errors import ZoneFailed

_log = structlog.get_logger(__name__)

#: Where cgroup file systems are mounted.
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: The CFS period used for the CPU limit, in microseconds.
CPU_PERIOD_US: Final = 100_000
_MIN_QUOTA_US: Final = 1_000  # the kernel refuses a smaller quota
_CONTROLLERS: Final = ("memory", "cpu", "pids")  # the order of the directories returned
_POLL_S: Final = 0.02


class CgroupVersion(IntEnum):
    """Which cgroup layout the host uses."""

    V1 = 1
    V2 = 2


@dataclass(frozen=True, slots=True)
class Limits:
    """What one zone may use: memory in bytes, CPU as a CFS quota per period, process count."""

    memory_bytes: int
    cpu_quota_us: int
    pids_max: int
    cpu_period_us: int = CPU_PERIOD_US

    @classmethod
    def from_settings(cls, *, memory_mib: int, cpus: float, pids: int) -> Limits:
        """Limits from the ``[zones]`` settings (``cpus`` may be a fraction of one CPU)."""
        quota = max(_MIN_QUOTA_US, round(cpus * CPU_PERIOD_US))
        return cls(memory_bytes=memory_mib * 1024 * 1024, cpu_quota_us=quota, pids_max=pids)


def detect(root: Path = CGROUP_ROOT) -> CgroupVersion:
    """The layout mounted at ``root``: v2 when it is the unified hierarchy, else v1."""
    return CgroupVersion.V2 if (root / "cgroup.controllers").exists() else CgroupVersion.V1


def own_cgroups(text: str) -> dict[str, str]:
    """Parse ``/proc/<pid>/cgroup``: the path of each v1 controller, and ``""`` for v2.

    Lines look like ``4:memory:/a/b`` (v1; several controllers may share a line, as in
    ``cpu,cpuacct``) and ``0::/a/b`` (v2, keyed ``""``).
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


class CgroupTree:
    """The zones' cgroups under ``parent`` (see the module docstring) in the host's layout."""

    def __init__(
        self,
        *,
        parent: str = "/volagent",
        root: Path = CGROUP_ROOT,
        self_cgroup: Path = Path("/proc/self/cgroup"),
    ) -> None:
        if not parent.strip("/") or any(p in {".", ".."} for p in parent.split("/")):
            raise ValueError(f"not a cgroup parent: {parent!r}")
        self.root = root
        self.version = detect(root)
        self._parent = parent
        self._self_cgroup = self_cgroup

    def parents(self) -> list[Path]:
        """The parent directory in each hierarchy used (one for v2)."""
        own = {} if self._parent.startswith("/") else own_cgroups(self._self_cgroup.read_text())
        if self.version is CgroupVersion.V2:
            return [self._join(self.root, own.get(""), self._parent)]
        return [self._join(self.root / c, own.get(c), self._parent) for c in _CONTROLLERS]

    @staticmethod
    def _join(hierarchy: Path, own: str | None, parent: str) -> Path:
        if parent.startswith("/"):
            return hierarchy / parent.strip("/")
        if own is None:
            raise ZoneFailed(
                f"no cgroup of our own in {hierarchy}", details={"path": str(hierarchy)}
            )
        return hierarchy / own.strip("/") / parent

    def create(self, name: str, limits: Limits) -> list[Path]:
        """Make the zone's cgroup directories with ``limits`` set; returns them (idempotent)."""
        if not name or "/" in name or name in {".", ".."}:
            raise ValueError(f"not a cgroup name: {name!r}")
        dirs = [parent / name for parent in self.parents()]
        try:
            if self.version is CgroupVersion.V2:
                self._enable_v2_controllers(dirs[0].parent)
                dirs[0].mkdir(parents=True, exist_ok=True)
                _write(dirs[0] / "memory.max", str(limits.memory_bytes))
                _write(dirs[0] / "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")
                _write(dirs[0] / "pids.max", str(limits.pids_max))
            else:
                memory, cpu, pids = dirs
                for controller, directory in zip(_CONTROLLERS, dirs, strict=True):
                    if not (self.root / controller).is_dir():
                        raise ZoneFailed(
                            f"the cgroup v1 controller {controller} is not mounted",
                            details={"path": str(self.root / controller)},
                        )
                    directory.mkdir(parents=True, exist_ok=True)
                _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
                _write(cpu / "cpu.cfs_period_us", str(limits.cpu_period_us))
                _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
                _write(pids / "pids.max", str(limits.pids_max))
        except OSError as exc:
            raise ZoneFailed(
                f"cannot set up cgroup {name}: {exc}", details={"dirs": [str(d) for d in dirs]}
            ) from exc
        _log.debug("cgroup_created", name=name, dirs=[str(d) for d in dirs])
        return dirs

    def _enable_v2_controllers(self, parent: Path) -> None:
        """Delegate memory, cpu and pids from the root down to ``parent`` (v2)."""
        chain = [parent, *parent.parents]
        ancestors = [p for p in reversed(chain) if p == self.root or self.root in p.parents]
        wanted = " ".join(f"+{c}" for c in _CONTROLLERS)
        for directory in ancestors:
            directory.mkdir(exist_ok=True)
            try:
                enabled = (directory / "cgroup.subtree_control").read_text().split()
            except FileNotFoundError:
                enabled = []  # written below: the kernel would have made the file with the dir
            if not set(_CONTROLLERS) <= set(enabled):
                _write(directory / "cgroup.subtree_control", wanted)


def procs(dirs: list[Path]) -> list[int]:
    """Pids of the processes in any of ``dirs`` (missing directories hold none)."""
    found: set[int] = set()
    for directory in dirs:
        with suppress(FileNotFoundError):
            found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
    return sorted(found)


async def remove(dirs: list[Path], *, timeout: float) -> None:  # noqa: ASYNC109  # a deadline per call is the API
    """Wait until ``dirs`` hold no process, then remove them and their parents if unused.

    Raises ZoneFailed when processes are still there after ``timeout`` seconds (the caller
    kills them first).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while left := procs(dirs):
        if loop.time() > deadline:
            msg = f"processes {left} still in the zone's cgroups after {timeout:g} s"
            raise ZoneFailed(msg, details={"pids": left, "dirs": [str(d) for d in dirs]})
        await asyncio.sleep(_POLL_S)
    for directory in dirs:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # A cgroup whose last task has exited can stay busy for a moment.
                if exc.errno != errno.EBUSY or loop.time() > deadline:
                    raise ZoneFailed(
                        f"cannot remove cgroup {directory}: {exc}",
                        details={"dir": str(directory)},
                    ) from exc
                await asyncio.sleep(_POLL_S)
        with suppress(OSError):
            directory.parent.rmdir()  # the shared parent goes with the last zone
    _log.debug("cgroup_removed", dirs=[str(d) for d in dirs])


def _write(path: Path, value: str) -> None:
    with path.open("w") as file:
        file.write(value)
