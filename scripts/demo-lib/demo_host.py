"""What the demo reads from the host and how it handles processes it did not start as children.

Processes are found and checked through ``/proc`` (a pid is trusted only when its argv is the
expected one), signalled, and waited for; mounts are read from ``/proc/self/mountinfo``. The
agent and its broker run in sessions of their own, so they are found by their argv. Every
command runs through :mod:`volagent.adapters.proc` (argv lists, a timeout each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from demo_layout import Layout
from volagent.adapters import proc
from volagent.errors import CommandError

__all__ = [
    "CLI_TIMEOUT_S",
    "COMMAND_TIMEOUT_S",
    "agent_status",
    "alive",
    "cmdline",
    "comm",
    "escaped",
    "free_port",
    "is_agent",
    "is_mount_point",
    "listening",
    "mount_points",
    "pids_matching",
    "read_pid",
    "send_signal",
    "tail",
    "terminate",
    "wait_gone",
    "zfs_answers",
    "zfs_daemons",
]

#: Time limit of one ip, mount, zfs or zpool command.
COMMAND_TIMEOUT_S: Final = 30.0
#: Time limit of one ``volagent status``.
CLI_TIMEOUT_S: Final = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (empty when it is gone or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def comm(pid: int) -> str:
    """The program name of ``pid`` ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pids_matching(predicate: Callable[[int, list[str]], bool]) -> list[int]:
    """Live processes (never this one) whose pid and argv satisfy ``predicate``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        argv = cmdline(pid)
        if argv and alive(pid) and predicate(pid, argv):
            found.append(pid)
    return sorted(found)


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, if the file holds one."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


async def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:  # noqa: ASYNC109  # a deadline per call
    """Wait until none of ``pids`` runs; those still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def send_signal(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def terminate(pids: list[int], grace: float) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those still running after ``grace`` s; those that were killed."""
    send_signal(pids, signal.SIGTERM)
    left = await wait_gone(pids, grace)
    send_signal(left, signal.SIGKILL)
    await wait_gone(left, 10)
    return left


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


async def zfs_answers() -> bool:
    """Whether a zfs-fuse daemon answers ``zpool list``."""
    try:
        await proc.run(["zpool", "list", "-H", "-o", "name"], timeout=10)
    except CommandError:
        return False
    return True


def zfs_daemons() -> list[int]:
    """Pids of the running zfs-fuse daemons (there is at most one that works)."""
    return pids_matching(lambda pid, _argv: comm(pid) == "zfs-fuse")


def mount_points() -> list[str]:
    """The mount points of this mount namespace (as mountinfo escapes them)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def escaped(path: Path) -> str:
    """``path`` as ``/proc/*/mountinfo`` writes it (spaces and backslashes escaped)."""
    return str(path).replace("\\", "\\134").replace(" ", "\\040")


def is_mount_point(path: Path) -> bool:
    """Whether something is mounted on ``path`` in this mount namespace."""
    return escaped(path) in mount_points()


def is_agent(layout: Layout, argv: list[str]) -> bool:
    """Whether ``argv`` is the demo's ``volagent run`` (its configuration file)."""
    return argv[-3:] == ["run", "--config", str(layout.config)]


async def agent_status(layout: Layout) -> dict[str, Any] | None:
    """What ``volagent status --json`` says, or None when the agent does not answer."""
    argv = [str(layout.volagent), "status", "--json", "--config", str(layout.config)]
    try:
        done = await proc.run(argv, timeout=CLI_TIMEOUT_S)
    except CommandError:
        return None
    try:
        document: dict[str, Any] = json.loads(done.text)
    except ValueError:
        return None
    return document
