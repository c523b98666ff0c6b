r"""The first process of a zone: joins its cgroups, makes its own /run, starts rpcbind and ganesha.

:mod:`volagent.adapters.netns` starts it detached from the agent, already inside the zone's
network namespace and in a fresh mount namespace that receives the host's mount events, by
the path of this file and with an isolated interpreter::

    setsid -f nsenter --net=/run/netns/<ns> -- unshare -m --propagation slave -- \
        <python> -I -S <dir>/zone_init.py --leader-pidfile <file> --cgroup <dir>... \
        --rpcbind <bin> -- <ganesha.nfsd -F -f <conf> -L <log> -p <pid file>>

``nsenter --net`` rather than ``ip netns exec``: the latter remounts ``/sys`` for the
namespace, which hides ``/sys/fs/cgroup`` and so the cgroups to join. Neither ``setsid -f``'s
child, ``nsenter`` nor ``unshare`` forks again, so this process keeps one pid from start to
ganesha; it is written to the leader pid file first (a temporary file in the same directory,
renamed over it), so that the agent can tell a zone that died while starting from one that
is still starting.

Then, in order: write the pid into each cgroup's ``cgroup.procs`` (children inherit the
cgroups), mount a tmpfs on ``/run`` (rpcbind's socket and ganesha's run files stay private to
the zone), start ``rpcbind -w`` (ganesha registers NFSv3 and MOUNT with it or exits), and
replace this process with the server's command line, everything after ``--`` (the agent
builds it with :func:`volagent.adapters.ganesha.argv`). Any failure ends the process with
status 1 and one line ``zone_init: <error>`` on stderr, which the agent keeps in the zone's
``zone.log`` (a command line it cannot parse, the agent's bug: argparse's usage, status 2).

This module imports nothing but the standard library and does not use
:mod:`volagent.adapters.proc` or structlog: it is not the agent but the zone's first
process, and every zone start waits for it. Importing the package, asyncio and structlog
took about 125 ms; ``python -I -S`` with ``os``, ``sys``, ``subprocess`` and ``argparse``
starts in about 30 ms here (``-S`` keeps site-packages out, ``-I`` the environment, the
user's site directory and the current directory). Its two commands still get argv lists, a
timeout (:func:`subprocess.run` kills the command when it runs out) and their stderr in the
error line; its log is its stderr line in ``zone.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# typing is not imported at run time (it is not among the modules above); for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Final, NoReturn

#: Size and mode of the zone's private ``/run``.
RUN_MOUNT_OPTIONS: Final = "mode=0755,size=16m,nosuid,nodev"
#: Seconds each command (mount, rpcbind) may take.
STEP_TIMEOUT_S: Final = 15.0


class StepFailed(Exception):
    """A step of the zone's start failed; the message is the line written to stderr."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line above: options, ``--``, then the server's argv (``server``)."""
    parser = argparse.ArgumentParser(
        prog="zone_init", usage="%(prog)s [options] -- <server> [<arg>...]"
    )
    parser.add_argument("--leader-pidfile", required=True)
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--mount-bin", default="mount")
    parser.add_argument("--rpcbind", required=True)
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.server = argv[split + 1 :]
    if not args.server:
        parser.error("the server's command line must follow --")
    return args


def write_pid(path: str, pid: int) -> None:
    """Replace ``path`` with ``pid``: readers see no file or the whole number, never half.

    Written to a temporary file in the same directory, then renamed over ``path``; not synced
    to disk, since a pid means nothing after the machine's crash.
    """
    tmp = f"{path}.{pid}.tmp"
    _write(tmp, f"{pid}\n")
    os.replace(tmp, path)  # noqa: PTH105  # pathlib would add ~5 ms to every zone start


def join_cgroups(dirs: Sequence[str], pid: int) -> None:
    """Move ``pid`` into each cgroup directory of ``dirs``."""
    for directory in dirs:
        _write(f"{directory}/cgroup.procs", str(pid))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def run_step(argv: Sequence[str]) -> None:
    """Run ``argv`` to its end within :data:`STEP_TIMEOUT_S`; StepFailed if it does not succeed."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=STEP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(f"{argv[0]} did not finish within {STEP_TIMEOUT_S:g} s") from exc
    except OSError as exc:
        raise StepFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        code = done.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        lines = done.stderr.decode(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        raise StepFailed(f"{argv[0]} {how}" + (f": {last}" if last else ""))


def prepare(args: argparse.Namespace) -> None:
    """Mount the private /run and start rpcbind (which daemonises)."""
    run_step([args.mount_bin, "-t", "tmpfs", "-o", RUN_MOUNT_OPTIONS, "tmpfs", "/run"])
    run_step([args.rpcbind, "-w"])


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the steps of the module docstring; exec the server, or exit 1 on failure."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pid = os.getpid()
    try:
        write_pid(args.leader_pidfile, pid)
        join_cgroups(args.cgroup, pid)
        prepare(args)
    except (OSError, StepFailed) as exc:
        _fail(str(exc))
    try:
        os.execvp(args.server[0], args.server)
    except OSError as exc:
        _fail(f"cannot run {args.server[0]}: {exc.strerror or exc}")


def _fail(error: str) -> NoReturn:
    sys.stderr.write(f"zone_init: {error}\n")
    sys.exit(1)


if __name__ == "__main__":
    main()
