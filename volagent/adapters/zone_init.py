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
``zone.log`` (a command line it cannot parse, the agent's bug: the usage, status 2).

This module imports nothing but the standard library's cheapest modules (``os``, ``sys``,
``select``, ``time``) and does not use :mod:`volagent.adapters.proc` or structlog:
it is not the agent but the zone's first process, and every zone start waits for it.
Importing the package, asyncio and structlog took about 125 ms; ``subprocess`` and
``argparse`` alone cost about 18 ms more than ``python -I -S`` with ``os`` and ``sys``
(12 ms here; ``-S`` keeps site-packages out, ``-I`` the environment, the user's site
directory and the current directory). So the command line is read by hand, and each of the
two commands is started with :func:`os.posix_spawnp` from an argv list, waited for through
a pidfd with a timeout (killed when it runs out), and its stderr's last line goes into the
error line; its log is its stderr line in ``zone.log``.
"""

from __future__ import annotations

import os
import select
import sys
import time

# typing is not imported at run time (it is not among the modules above); for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Final, NoReturn

#: Size and mode of the zone's private ``/run``.
RUN_MOUNT_OPTIONS: Final = "mode=0755,size=16m,nosuid,nodev"
#: Seconds each command (mount, rpcbind) may take.
STEP_TIMEOUT_S: Final = 15.0


#: signal.SIGKILL on Linux: the signal module imports enum, 5 ms more for every zone start.
_SIGKILL: Final = 9
#: Bytes of a command's stderr kept for the error line (the end of it).
_STDERR_KEPT: Final = 4096
_USAGE: Final = (
    "usage: zone_init --leader-pidfile <file> [--cgroup <dir>]... [--mount-bin <mount>]"
    " --rpcbind <rpcbind> -- <server> [<arg>...]"
)


class StepFailed(Exception):
    """A step of the zone's start failed; the message is the line written to stderr."""


class Args:
    """The command line: options, then the server's argv after ``--``."""

    def __init__(self) -> None:
        """Defaults: no cgroup, ``mount`` from PATH; the rest must be given."""
        self.leader_pidfile = ""
        self.cgroup: list[str] = []
        self.mount_bin = "mount"
        self.rpcbind = ""
        self.server: list[str] = []


def parse_args(argv: Sequence[str]) -> Args:
    """The command line above; a wrong one exits with status 2 and the usage on stderr."""
    args, argv = Args(), list(argv)
    if "--" not in argv:
        _usage("the server's command line must follow --")
    split = argv.index("--")
    options, args.server = argv[:split], argv[split + 1 :]
    if len(options) % 2:
        _usage(f"option {options[-1]} needs a value")
    for name, value in zip(options[::2], options[1::2], strict=True):
        if name == "--leader-pidfile":
            args.leader_pidfile = value
        elif name == "--cgroup":
            args.cgroup.append(value)
        elif name == "--mount-bin":
            args.mount_bin = value
        elif name == "--rpcbind":
            args.rpcbind = value
        else:
            _usage(f"unknown option {name}")
    for name, value in (("--leader-pidfile", args.leader_pidfile), ("--rpcbind", args.rpcbind)):
        if not value:
            _usage(f"{name} is required")
    if not args.server:
        _usage("the server's command line must follow --")
    return args


def _usage(error: str) -> NoReturn:
    sys.stderr.write(f"{_USAGE}\nzone_init: error: {error}\n")
    sys.exit(2)


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
    """Run ``argv`` to its end within :data:`STEP_TIMEOUT_S`; StepFailed if it does not succeed.

    Stdin and stdout are this process's; stderr is read through a pipe, its end kept. A
    command that daemonises (rpcbind) must detach its stderr, as it does.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawnp(
            argv[0], list(argv), os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 2)]
        )
    except OSError as exc:
        os.close(read_end)
        raise StepFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    finally:
        os.close(write_end)
    try:
        status, stderr = _wait(pid, read_end)
    finally:
        os.close(read_end)
    if status is None:
        raise StepFailed(f"{argv[0]} did not finish within {STEP_TIMEOUT_S:g} s")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        lines = stderr.decode(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        raise StepFailed(f"{argv[0]} {how}" + (f": {last}" if last else ""))


def _wait(pid: int, stderr_fd: int) -> tuple[int | None, bytes]:
    """The wait status of ``pid`` (None: killed at the timeout) and the end of its stderr."""
    pidfd = os.pidfd_open(pid)
    kept = bytearray()
    deadline = time.monotonic() + STEP_TIMEOUT_S
    reading = True
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, _SIGKILL)
                os.waitpid(pid, 0)
                return None, bytes(kept)
            ready, _, _ = select.select([pidfd, stderr_fd] if reading else [pidfd], [], [], left)
            if stderr_fd in ready:
                chunk = os.read(stderr_fd, 65536)
                reading = bool(chunk)  # EOF: every writer closed it
                kept += chunk
                del kept[:-_STDERR_KEPT]
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                os.set_blocking(stderr_fd, False)
                # What was written just before the exit; a daemon it left may hold the pipe.
                try:  # noqa: SIM105  # contextlib is one import more for every zone start
                    kept += os.read(stderr_fd, 65536)
                except BlockingIOError:
                    pass
                return status, bytes(kept[-_STDERR_KEPT:])
    finally:
        os.close(pidfd)


def prepare(args: Args) -> None:
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
