"""Remove everything a demo run left, whatever state it ended in.

:func:`teardown` works on what a :class:`~demo_layout.Layout` names, whether the run finished,
was kept with KEEP=1, was interrupted or crashed: gently first (the volumes deleted through
the agent, which stops their zones; the agent and the broker stopped with SIGTERM), then by
force (SIGKILL for anything left in the tag's namespaces and cgroups, or running as the
demo's agent or broker or from the agent's state directory; then the links, namespaces,
cgroups and the pool). A zfs-fuse daemon is stopped only when the demo started it and no
other pool is left on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import structlog

from demo_host import (
    COMMAND_TIMEOUT_S,
    agent_status,
    alive,
    cmdline,
    comm,
    escaped,
    is_agent,
    is_mount_point,
    mount_points,
    pids_matching,
    read_pid,
    send_signal,
    terminate,
    wait_gone,
    zfs_daemons,
)
from demo_layout import Layout
from volagent.adapters import proc
from volagent.errors import VolagentError

__all__ = ["DeleteVolumes", "teardown"]

_log = structlog.get_logger(__name__)

_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
_CGROUP_V1: Final = ("memory", "cpu", "pids")


DeleteVolumes = Callable[[], Awaitable[list[str]]]


async def teardown(
    layout: Layout, delete_volumes: DeleteVolumes | None, *, stop_zfs: bool
) -> list[str]:
    """Remove everything of the demo that ``layout`` names; what was found and removed.

    ``delete_volumes`` (called only when the agent answers) deletes the volumes through the
    agent, which stops their zones; whatever is left after that is removed by force. With
    ``stop_zfs``, a zfs-fuse daemon the demo started is stopped if no pool is left on it.
    """
    done: list[str] = []
    answers = layout.config.exists() and await agent_status(layout) is not None
    if delete_volumes is not None and answers:
        done += await delete_volumes()
    if (agent := await _stop_agent(layout)) is not None:
        done.append(agent)
    if (broker := await _stop_broker(layout)) is not None:
        done.append(broker)
    done += await _kill_leftovers(layout)
    done += await _remove_network(layout)
    done += _remove_cgroups(layout)
    done += await _destroy_pool(layout)
    if stop_zfs:
        done += await _stop_zfs(layout)
    for directory in (layout.state, layout.broker_dir, layout.files):
        shutil.rmtree(directory, ignore_errors=True)
    done += await _unmount_root(layout)
    _log.info("demo_teardown", dir=str(layout.dir), tag=layout.tag, done=done)
    return done


async def _stop_agent(layout: Layout) -> str | None:
    """SIGTERM the agent (SIGKILL if it is still running 30 s later); what was done."""
    pid = read_pid(layout.agent_pid)
    layout.agent_pid.unlink(missing_ok=True)
    if pid is None or not alive(pid) or not is_agent(layout, cmdline(pid)):
        return None
    killed = await terminate([pid], grace=30)
    return f"agent (pid {pid}) {'killed: it ignored SIGTERM' if killed else 'stopped'}"


async def _stop_broker(layout: Layout) -> str | None:
    pid = read_pid(layout.broker_pid)
    layout.broker_pid.unlink(missing_ok=True)
    conf = str(layout.broker_conf)
    if pid is None or not alive(pid) or conf not in cmdline(pid):
        return None
    await terminate([pid], grace=10)
    return f"broker (pid {pid}) stopped"


def _cgroup_dirs(layout: Layout) -> list[Path]:
    """The zones' cgroup directories of the demo, deepest first."""
    if (_CGROUP_ROOT / "cgroup.controllers").exists():
        tops = [_CGROUP_ROOT / layout.tag]
    else:
        tops = [_CGROUP_ROOT / c / layout.tag for c in _CGROUP_V1]
    found = [Path(d) for top in tops if top.is_dir() for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(layout: Layout) -> set[int]:
    pids: set[int] = set()
    for directory in _cgroup_dirs(layout):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
    return pids


async def _netns_names(layout: Layout) -> list[str]:
    done = await proc.run(["ip", "netns", "list"], timeout=COMMAND_TIMEOUT_S)
    names = [line.split()[0] for line in done.text.splitlines() if line.strip()]
    return [n for n in names if layout.owns_netns(n)]


async def _netns_pids(names: list[str]) -> set[int]:
    pids: set[int] = set()
    for name in names:
        done = await proc.run(["ip", "netns", "pids", name], timeout=COMMAND_TIMEOUT_S, check=False)
        pids.update(int(p) for p in done.text.split())
    return pids


async def _kill_leftovers(layout: Layout) -> list[str]:
    """SIGKILL what still runs in the demo's namespaces and cgroups, or as its agent or broker.

    Zones' processes run from files in the agent's state directory: those count too. The
    zfs-fuse daemon is spared: other pools may use it (:func:`_stop_zfs` decides).
    """
    state = str(layout.state) + "/"
    broker = ["mosquitto", "-c", str(layout.broker_conf)]
    from_dir = pids_matching(
        lambda _pid, argv: (
            argv == broker or is_agent(layout, argv) or any(a.startswith(state) for a in argv)
        )
    )
    netns = await _netns_names(layout)
    pids = {*from_dir, *_cgroup_pids(layout), *await _netns_pids(netns)}
    pids = {p for p in pids if p != os.getpid() and comm(p) != "zfs-fuse"}
    if not pids:
        return []
    names = sorted({comm(p) for p in pids})
    send_signal(pids, signal.SIGKILL)
    if left := await wait_gone(pids, 10):
        raise VolagentError(f"processes {left} do not exit after SIGKILL")
    return [f"killed {len(pids)} leftover process(es): {', '.join(names)}"]


async def _remove_network(layout: Layout) -> list[str]:
    """Delete the demo's links, then its namespaces.

    Deleting the host end of a veth deletes its peer in the namespace too; the zones' veths
    are found as ports of the bridge, so they go before it.
    """
    done: list[str] = []
    listing = await proc.run(["ip", "-o", "link", "show"], timeout=COMMAND_TIMEOUT_S)
    ours = [name for name, master in _links(listing.text) if layout.owns_link(name, master)]
    ours.sort(key=lambda name: name == layout.bridge)
    for name in ours:
        await proc.run(["ip", "link", "delete", name], timeout=COMMAND_TIMEOUT_S)
    if ours:
        done.append(f"deleted links {', '.join(ours)}")
    netns = await _netns_names(layout)
    for name in netns:
        await proc.run(["ip", "netns", "delete", name], timeout=COMMAND_TIMEOUT_S)
    if netns:
        done.append(f"deleted network namespaces {', '.join(netns)}")
    return done


def _links(listing: str) -> list[tuple[str, str | None]]:
    """Each link's name and its master's, from ``ip -o link show``."""
    links = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        name = fields[1].rstrip(":").split("@")[0]
        master = fields[fields.index("master") + 1] if "master" in fields else None
        links.append((name, master))
    return links


def _remove_cgroups(layout: Layout) -> list[str]:
    """Remove the zones' cgroup directories (empty by now)."""
    dirs = _cgroup_dirs(layout)
    for directory in dirs:
        for _ in range(50):  # a cgroup whose last process just exited can be busy a moment
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
    left = [str(d) for d in dirs if d.exists()]
    if left:
        raise VolagentError(f"cannot remove cgroups {left}")
    return [f"removed {len(dirs)} cgroup directories under {layout.cgroup_parent}"] if dirs else []


async def _destroy_pool(layout: Layout) -> list[str]:
    """Destroy the pool (never forced; retried while busy or while zfs-fuse restarts)."""
    done: list[str] = []
    if not zfs_daemons():
        if layout.image.exists():
            done.append(f"zfs-fuse is not running: {layout.image} stays for the next run")
        return done
    deadline = time.monotonic() + 60
    while True:
        listed = await proc.run(
            ["zpool", "list", "-H", "-o", "name"], timeout=COMMAND_TIMEOUT_S, check=False
        )
        if listed.returncode == 0 and layout.pool not in listed.text.split():
            break
        if listed.returncode == 0:
            result = await proc.run(["zpool", "destroy", layout.pool], timeout=60, check=False)
            if result.returncode == 0:
                done.append(f"destroyed pool {layout.pool}")
                break
            error = result.stderr.strip()
        else:
            error = f"zfs-fuse does not answer: {listed.stderr.strip()}"
        if time.monotonic() > deadline:
            holders = ", ".join(_mount_holders(layout.mountpoint)) or "none found"
            raise VolagentError(
                f"cannot destroy pool {layout.pool}: {error} (processes whose mount namespace"
                f" holds {layout.mountpoint}: {holders}); run `scripts/demo clean` later"
            )
        await asyncio.sleep(0.5)
    if layout.image.exists():
        layout.image.unlink()
        done.append(f"removed {layout.image}")
    return done


def _mount_holders(mountpoint: Path) -> list[str]:
    """Processes in another mount namespace that has ``mountpoint`` mounted (pid and name)."""
    own = Path("/proc/self/ns/mnt").readlink()
    needle = f" {mountpoint} "
    holders = []
    for pid in pids_matching(lambda _pid, _argv: True):
        with contextlib.suppress(OSError):
            proc_dir = Path(f"/proc/{pid}")
            other = (proc_dir / "ns" / "mnt").readlink() != own
            if other and needle in (proc_dir / "mountinfo").read_text():
                holders.append(f"{pid} {comm(pid)}")
    return holders


async def _unmount_root(layout: Layout) -> list[str]:
    """Unmount the shared bind mount the pool was under, once nothing is mounted below it."""
    root = escaped(layout.mount_root)
    below = [p for p in mount_points() if p.startswith(root + "/")]
    if below:
        return [f"still mounted, left for the next run: {', '.join(below)}"]
    done = []
    if is_mount_point(layout.mount_root):
        await proc.run(["umount", str(layout.mount_root)], timeout=COMMAND_TIMEOUT_S)
        done.append(f"unmounted {layout.mount_root}")
    shutil.rmtree(layout.mount_root, ignore_errors=True)
    return done


async def _stop_zfs(layout: Layout) -> list[str]:
    """Stop the zfs-fuse daemon if this demo started it and no pool is left on it."""
    pid = read_pid(layout.zfs_pid)
    if pid is None:
        return []
    if not alive(pid) or comm(pid) != "zfs-fuse":
        layout.zfs_pid.unlink()
        return []
    pools = (
        await proc.run(["zpool", "list", "-H", "-o", "name"], timeout=COMMAND_TIMEOUT_S)
    ).text.split()
    if pools:
        return [f"zfs-fuse (pid {pid}) left running: pools {', '.join(pools)} use it"]
    send_signal([pid], signal.SIGTERM)
    if await wait_gone([pid], 20):
        return [f"zfs-fuse (pid {pid}) did not stop within 20 s; left running"]
    layout.zfs_pid.unlink()
    return [f"zfs-fuse (pid {pid}), started by the demo, stopped"]
