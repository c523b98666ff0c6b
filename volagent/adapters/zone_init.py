r"""The first process of a zone: joins its cgroups, makes its own /run, starts rpcbind and ganesha.

:mod:`volagent.adapters.netns` starts it detached from the agent, already inside the zone's
network namespace and in a fresh mount namespace that receives the host's mount events::

    setsid -f nsenter --net=/run/netns/<ns> -- unshare -m --propagation slave -- \
        <python> -m volagent.adapters.zone_init --leader-pidfile <file> --cgroup <dir>... \
        --rpcbind <bin> --ganesha <bin> --conf <ganesha.conf> --log <ganesha.log> \
        --pidfile <ganesha.pid>

``nsenter --net`` rather than ``ip netns exec``: the latter remounts ``/sys`` for the
namespace, which hides ``/sys/fs/cgroup`` and so the cgroups to join. Neither ``setsid -f``'s
child, ``nsenter`` nor ``unshare`` forks again, so this process keeps one pid from start to
ganesha; it is written to the leader pid file first, so that the agent can tell a zone that
died while starting from one that is still starting.

Then, in order: write the pid into each cgroup's ``cgroup.procs`` (children inherit the
cgroups), mount a tmpfs on ``/run`` (rpcbind's socket and ganesha's run files stay private to
the zone), start ``rpcbind -w`` (ganesha registers NFSv3 and MOUNT with it or exits), and
replace this process with ``ganesha.nfsd -F``. Any failure ends the process with status 1 and
a line on stderr, which the agent keeps in the zone's log.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn

import structlog

from volagent.adapters import ganesha, proc
from volagent.errors import VolagentError

_log = structlog.get_logger(__name__)

#: Size and mode of the zone's private ``/run``.
RUN_MOUNT_OPTIONS: Final = "mode=0755,size=16m,nosuid,nodev"
_STEP_TIMEOUT_S: Final = 15.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line above; every option but ``--cgroup`` is required."""
    parser = argparse.ArgumentParser(prog="python -m volagent.adapters.zone_init")
    parser.add_argument("--leader-pidfile", type=Path, required=True)
    parser.add_argument("--cgroup", type=Path, action="append", default=[])
    parser.add_argument("--mount-bin", default="mount")
    parser.add_argument("--rpcbind", required=True)
    parser.add_argument("--ganesha", required=True)
    parser.add_argument("--conf", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--pidfile", type=Path, required=True)
    return parser.parse_args(list(argv))


def join_cgroups(dirs: Sequence[Path], pid: int) -> None:
    """Move ``pid`` into each cgroup directory of ``dirs``."""
    for directory in dirs:
        with (directory / "cgroup.procs").open("w") as file:
            file.write(str(pid))


async def prepare(args: argparse.Namespace) -> None:
    """Mount the private /run and start rpcbind (which daemonises)."""
    mount = [args.mount_bin, "-t", "tmpfs", "-o", RUN_MOUNT_OPTIONS, "tmpfs", "/run"]
    await proc.run(mount, timeout=_STEP_TIMEOUT_S)
    await proc.run([args.rpcbind, "-w"], timeout=_STEP_TIMEOUT_S)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the steps of the module docstring; exec ganesha, or exit 1 on failure."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pid = os.getpid()
    server = ganesha.argv(args.ganesha, conf=args.conf, log=args.log, pidfile=args.pidfile)
    try:
        ganesha.write_atomic(args.leader_pidfile, f"{pid}\n")
        join_cgroups(args.cgroup, pid)
        asyncio.run(prepare(args))
    except (OSError, VolagentError) as exc:
        _fail(pid, str(exc))
    try:
        os.execvp(server[0], server)
    except OSError as exc:
        _fail(pid, f"cannot run {server[0]}: {exc.strerror or exc}")


def _fail(pid: int, error: str) -> NoReturn:
    _log.error("zone_init_failed", pid=pid, error=error)
    sys.stderr.write(f"zone_init: {error}\n")
    sys.exit(1)


if __name__ == "__main__":
    main()
