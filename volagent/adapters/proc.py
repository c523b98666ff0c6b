"""The one door to subprocesses: :func:`run` to completion, :func:`spawn` to stream.

:func:`start_detached` starts a program that must outlive the agent (a zone's server).

Argv lists only (never a shell string), a timeout on every call, stdin from /dev/null unless
input is given, capped output, one log line (event ``exec``) with the duration per child. Each
child leads a session of its own, so a timeout, a cancellation or leaving :func:`spawn` SIGKILLs
its whole process group, grandchildren included, and reaps it: no zombie, no leaked pipe.
Descendants that leave the group (``setsid``) are out of reach. :func:`run` reads stdout and
stderr to their end, so a program that daemonises must detach them.

:func:`run` given argv alone starts the child with ``posix_spawnp`` and reads its pipes and
pidfd on the event loop (:class:`_Spawned`); otherwise, as :func:`spawn` and
:func:`start_detached` do, it goes through asyncio's subprocess transport.

:func:`spawn` connects stdin and stdout to streams used from Python or to file descriptors:
both ends of an :func:`os.pipe` join two children, as in ``zfs send | zfs recv``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from volagent import aio
from volagent.errors import CommandError, CommandNotFound, CommandTimeout

#: For ``stdin``/``stdout`` of :func:`spawn`: connect the child to /dev/null.
DEVNULL: Final = asyncio.subprocess.DEVNULL
_PIPE: Final = asyncio.subprocess.PIPE

_log = structlog.get_logger("volagent.proc")

_CHUNK: Final = 64 * 1024  # read size, and the buffer limit of the streams
_REAP_GRACE: Final = 10.0  # seconds a SIGKILLed child gets to be reaped before we stop waiting
_ERROR_STDOUT: Final = 4 * 1024  # characters of stdout kept in a CommandError
_LOG_STDERR: Final = 1024  # characters of stderr in a log line
_TRUNCATED: Final = "[...] "  # starts output whose beginning was dropped
_SETSID: Final = "setsid"  # util-linux: run a program in a new session, -f to always fork
_NOT_RUNNABLE: Final = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR})
#: Ignored by Python (SIGPIPE) or possibly by the agent's parent: back to default in a child.
_DEFAULT_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ)
_STDERR: Final = 2  # the highest of the descriptors a child gets from us


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished command: exit status, stdout (capped), stderr tail and duration."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str
    duration_s: float
    stdout_truncated: bool

    @property
    def text(self) -> str:
        """Stdout decoded as UTF-8, undecodable bytes replaced."""
        return self.stdout.decode("utf-8", errors="replace")


class _Capture:
    """The output of a pipe read to its end: the first (or last) ``limit`` bytes are kept."""

    def __init__(self, limit: int, *, keep_tail: bool) -> None:
        self.limit = limit
        self.keep_tail = keep_tail
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        """Keep ``chunk``, dropping what no longer fits."""
        self.data += chunk
        if (excess := len(self.data) - self.limit) > 0:
            self.truncated = True
            del self.data[slice(excess) if self.keep_tail else slice(self.limit, None)]

    async def drain(self, reader: asyncio.StreamReader | None) -> None:
        """Read until EOF; what does not fit is dropped, so the writer never blocks."""
        if reader is None:
            return
        while chunk := await reader.read(_CHUNK):
            self.add(chunk)

    def text(self) -> str:
        """Decode the kept bytes as UTF-8; mark the text when its beginning was dropped."""
        text = self.data.decode("utf-8", errors="replace")
        return _TRUNCATED + text if self.truncated else text


class Process:
    """A running child started by :func:`spawn`.

    ``stdin`` and ``stdout`` are streams when :func:`spawn` was given ``None`` for them, else
    ``None``. Stderr is collected in the background, capped to its tail (:attr:`stderr_text`).
    """

    def __init__(
        self,
        argv: tuple[str, ...],
        transport: asyncio.SubprocessTransport,
        proc: asyncio.subprocess.Process,
        max_stderr: int,
    ) -> None:
        self._transport = transport
        self._proc = proc
        self.argv = argv
        self.pid: int = self._proc.pid
        self.stdin: asyncio.StreamWriter | None = self._proc.stdin
        self.stdout: asyncio.StreamReader | None = self._proc.stdout
        self._started = time.monotonic()
        self._stderr = _Capture(max_stderr, keep_tail=True)
        self._stderr_reader = asyncio.ensure_future(self._stderr.drain(self._proc.stderr))

    @property
    def stderr_text(self) -> str:
        """Stderr captured so far (its last ``max_stderr`` bytes, marked when cut)."""
        return self._stderr.text()

    async def wait(self, *, timeout: float, check: bool = True) -> Completed:  # noqa: ASYNC109  # a deadline per call is the API
        """Wait for the child to exit; after ``timeout`` s kill it and raise CommandTimeout.

        Read a piped stdout to its end first: a child blocked on a full pipe never exits.
        ``stdout`` of the result is empty. With ``check``, a non-zero exit raises CommandError.
        """
        _check_timeout(timeout)
        try:
            async with asyncio.timeout(timeout):
                returncode = await self._proc.wait()
                await asyncio.wait([self._stderr_reader])
        except TimeoutError as exc:
            await self.kill()
            raise _timed_out(self.argv, timeout, self.stderr_text) from exc
        duration = time.monotonic() - self._started
        result = Completed(
            self.argv, returncode, b"", self.stderr_text, duration, stdout_truncated=False
        )
        if check and returncode != 0:
            raise _failure(result)
        return result

    async def kill(self) -> None:
        """SIGKILL the child's process group, close the pipes and reap the child; idempotent."""
        await _kill(self._transport, self._proc)
        await asyncio.wait([self._stderr_reader])


async def run(
    argv: Sequence[str],
    *,
    timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    input: bytes | None = None,  # noqa: A002  # the name subprocess.run uses for the same thing
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    max_stdout: int = 64 * 1024 * 1024,
    max_stderr: int = 64 * 1024,
) -> Completed:
    """Run ``argv`` to completion within ``timeout`` seconds.

    Stdin is /dev/null unless ``input`` is given. Stdout beyond ``max_stdout`` bytes is read
    and dropped (``stdout_truncated``); stderr keeps its last ``max_stderr`` bytes.

    Raises :class:`CommandNotFound` when the program cannot be executed, :class:`CommandTimeout`
    after killing the process group on timeout, and :class:`CommandError` for a non-zero exit
    when ``check`` is true. On cancellation the process group is killed and reaped first.
    """
    args = _check_argv(argv)
    _check_timeout(timeout)
    started = time.monotonic()
    out = _Capture(max_stdout, keep_tail=False)
    err = _Capture(max_stderr, keep_tail=True)
    child: _Child | None = None
    if input is None and env is None and cwd is None and _pidfds_work():
        child = _start_spawned(args, out, err)
    if child is None:
        child = await _Piped.start(args, input=input, env=env, cwd=cwd, out=out, err=err)
    try:
        async with asyncio.timeout(timeout):
            returncode = await child.communicate()
    except BaseException as exc:  # timeout, cancellation, anything: the child must not outlive us
        timed_out = isinstance(exc, TimeoutError)
        error = "timeout" if timed_out else type(exc).__name__
        try:
            await child.kill()
        finally:
            _log_exec(args, child, started, err.text(), failed=True, error=error)
        if timed_out:
            raise _timed_out(args, timeout, err.text()) from exc
        raise
    duration = time.monotonic() - started
    result = Completed(args, returncode, bytes(out.data), err.text(), duration, out.truncated)
    failed = check and returncode != 0
    _log_exec(args, child, started, result.stderr, failed=failed)
    if failed:
        raise _failure(result)
    return result


class _Exit(Protocol):
    """What the log line and the reaper need of a child."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class _Child(_Exit, Protocol):
    """A child of :func:`run`: read its output to the end and wait for it, or kill it."""

    async def communicate(self) -> int: ...

    async def kill(self) -> None: ...


class _Piped:
    """A child started by asyncio's subprocess transport.

    For input, env or cwd, and on a system without ``posix_spawn`` or pidfds (before 5.3).
    """

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        proc: asyncio.subprocess.Process,
        input: bytes | None,  # noqa: A002  # as in run()
        out: _Capture,
        err: _Capture,
    ) -> None:
        self._transport = transport
        self._proc = proc
        self._input = input
        self._out = out
        self._err = err
        self.pid = proc.pid

    @classmethod
    async def start(
        cls,
        argv: tuple[str, ...],
        *,
        input: bytes | None,  # noqa: A002  # as in run()
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
        out: _Capture,
        err: _Capture,
    ) -> _Piped:
        stdin = DEVNULL if input is None else _PIPE
        transport, proc = await _start(argv, stdin=stdin, stdout=_PIPE, env=env, cwd=cwd)
        return cls(transport, proc, input, out, err)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def communicate(self) -> int:
        proc = self._proc
        await asyncio.gather(
            _feed(proc.stdin, self._input),
            self._out.drain(proc.stdout),
            self._err.drain(proc.stderr),
        )
        return await proc.wait()

    async def kill(self) -> None:
        await _kill(self._transport, self._proc)


class _Spawned:
    """A child started by ``posix_spawn``; the loop itself reads its pipes and its pidfd.

    :func:`run` takes this way when given nothing but argv (every ``zfs`` call): it costs the
    agent about a third of the CPU of asyncio's subprocess transport, with its protocol, stream
    and watcher objects per child. Stdin is /dev/null, stdout and stderr are pipes, the child
    leads a new session with no signal blocked, SIGPIPE and SIGXFSZ are back to their
    default action, and inheritable descriptors above stderr are closed (as :mod:`subprocess`
    does).
    """

    def __init__(self, pid: int, pidfd: int, pipes: dict[int, _Capture]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._pipes = pipes
        self._loop = asyncio.get_running_loop()
        self._drained: asyncio.Future[None] = self._loop.create_future()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        for fd in pipes:
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._read, fd)
        self._loop.add_reader(pidfd, self._reap_now)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:  # nothing more will come of this pipe
            chunk = b""
        if chunk:
            self._pipes[fd].add(chunk)
        else:
            self._close(fd)

    def _close(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._pipes[fd]
        if not self._pipes and not self._drained.done():
            self._drained.set_result(None)

    def _reap_now(self) -> None:
        """The pidfd is readable: the child has exited, so ``waitpid`` does not block."""
        self._loop.remove_reader(self._pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped by someone else: asyncio reports 255 too
            self.returncode = 255
        else:
            self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        """Wait for the child to exit; a cancellation here leaves the reaping in place."""
        return await asyncio.shield(self._exited)

    async def communicate(self) -> int:
        if self._pipes:
            await asyncio.shield(self._drained)
        return await self.wait()

    async def kill(self) -> None:
        """SIGKILL the process group, close our pipe ends and reap the child (as :func:`_kill`)."""
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for fd in list(self._pipes):
            self._close(fd)
        await aio.uninterrupted(_reap(self))


def _start_spawned(argv: tuple[str, ...], out: _Capture, err: _Capture) -> _Spawned | None:
    """Start ``argv`` with ``posix_spawnp``; map a failure to start to our errors.

    Returns None, having started nothing, when stdin, stdout or stderr of the agent itself is
    closed (a new pipe would take its number): asyncio's way copes with that.
    """
    started = time.monotonic()
    fds: list[int] = []
    try:
        for _ in range(2):
            fds += os.pipe2(os.O_CLOEXEC)
        if min(fds) <= _STDERR:
            for fd in fds:
                os.close(fd)
            return None
        out_r, out_w, err_r, err_w = fds
        actions: list[tuple[int | str, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        actions += ((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds())
        pid = os.posix_spawnp(
            argv[0],
            argv,
            os.environ,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=_DEFAULT_SIGNALS,
        )
    except OSError as exc:  # no descriptors left, or the program cannot be executed
        for fd in fds:
            os.close(fd)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        _log.warning(
            "exec", argv=list(argv), returncode=None, duration_ms=duration_ms, error=str(exc)
        )
        missing = exc.errno in _NOT_RUNNABLE and exc.filename == argv[0]
        cls = CommandNotFound if missing else CommandError
        raise cls(f"cannot run {argv[0]}: {exc}", argv=argv) from exc
    os.close(out_w)
    os.close(err_w)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # out of descriptors: the child is ours, so end it right here
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(out_r)
        os.close(err_r)
        raise CommandError(f"cannot watch {argv[0]}: {exc}", argv=argv) from exc
    return _Spawned(pid, pidfd, {out_r: out, err_r: err})


def _inheritable_fds() -> list[int]:
    """Our descriptors above stderr without close-on-exec, which a spawned child would inherit.

    Python and the libraries the agent uses open theirs close-on-exec; what is left came from
    whoever started the agent, and :mod:`subprocess` closes it in its children too.
    """
    fds = []
    for name in os.listdir("/proc/self/fd"):  # noqa: PTH208  # names only, no Path objects
        fd = int(name)
        if fd > _STDERR:
            with suppress(OSError):  # the listing's own descriptor, closed by now
                if os.get_inheritable(fd):
                    fds.append(fd)
    return fds


@asynccontextmanager
async def spawn(
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    max_stderr: int = 64 * 1024,
) -> AsyncIterator[Process]:
    """Start ``argv`` and yield its :class:`Process`; kill and reap it on leaving if still running.

    ``stdin``/``stdout``: ``None`` gives a stream (``Process.stdin``/``Process.stdout``), an int
    connects that file descriptor (or :data:`DEVNULL`). The caller still owns such a descriptor
    and should close its copy once the child runs, or the other end never sees EOF.
    """
    args = _check_argv(argv)
    started = time.monotonic()
    stdin = _PIPE if stdin is None else stdin
    stdout = _PIPE if stdout is None else stdout
    transport, proc = await _start(args, stdin=stdin, stdout=stdout, env=env, cwd=cwd)
    process = Process(args, transport, proc, max_stderr)
    try:
        yield process
    finally:
        running = proc.returncode is None
        try:
            await process.kill()
        finally:
            failed = running or proc.returncode != 0
            _log_exec(args, proc, started, process.stderr_text, failed=failed, killed=running)


async def start_detached(
    argv: Sequence[str],
    *,
    log: str | os.PathLike[str],
    timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> None:
    """Start ``argv`` so that it outlives the agent, through ``setsid -f``.

    The program runs in a session of its own as the child of ``setsid``'s fork, so it is
    neither the agent's child nor in any of its process groups; stdin is /dev/null, stdout and
    stderr are appended to ``log`` (created with mode 0600). Only ``setsid`` is waited for, and
    it exits as soon as it has forked: nothing here learns the program's pid or whether it
    keeps running (have it write a pid file). Raises :class:`CommandNotFound` when ``setsid``
    or the program is not found, :class:`CommandTimeout` when ``setsid`` does not return
    within ``timeout`` seconds.
    """
    args = _check_argv(argv)
    _check_timeout(timeout)
    search = None if env is None else env.get("PATH", "")
    for program in (_SETSID, args[0]):
        if shutil.which(program, path=search) is None:
            raise CommandNotFound(f"cannot run {program}: not found", argv=args)
    command = (_SETSID, "-f", *args)
    started = time.monotonic()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        transport, proc = await _start(
            command, stdin=DEVNULL, stdout=fd, stderr=fd, env=env, cwd=cwd
        )
    finally:
        os.close(fd)
    try:
        async with asyncio.timeout(timeout):
            returncode = await proc.wait()
    except BaseException as exc:  # timeout, cancellation: setsid itself must not linger
        timed_out = isinstance(exc, TimeoutError)
        try:
            await _kill(transport, proc)
        finally:
            error = "timeout" if timed_out else type(exc).__name__
            _log_exec(command, proc, started, "", failed=True, error=error)
        if timed_out:
            raise _timed_out(command, timeout, "") from exc
        raise
    _log_exec(command, proc, started, "", failed=returncode != 0, detached=True)
    if returncode != 0:
        raise CommandError(
            f"{_SETSID} exited with status {returncode} (see {os.fspath(log)})",
            argv=command,
            returncode=returncode,
        )


def _check_argv(argv: object) -> tuple[str, ...]:
    """Refuse anything but a non-empty list or tuple of strings without NUL (a bug if not)."""
    if not isinstance(argv, list | tuple):
        raise TypeError(f"argv must be a list or tuple of str, not {type(argv).__name__}")
    if not argv:
        msg = "argv is empty"
        raise ValueError(msg)
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str, not {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            raise ValueError(f"argv item contains a NUL character: {arg!r}")
    return tuple(argv)


def _check_timeout(timeout: float) -> None:
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


@functools.cache
def _pidfds_work() -> bool:
    """Whether this system has ``posix_spawn`` and ``pidfd_open`` (Linux 5.3 and later)."""
    if not hasattr(os, "pidfd_open") or not hasattr(os, "posix_spawnp"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def _wait_with_pidfds() -> None:
    """On Python 3.11, learn of children's exits through pidfds, as 3.12 does by default.

    3.11's default watcher starts a thread per child that blocks in ``waitpid``: a thread
    start and a cross-thread wake-up for every child. A pidfd is read by the event loop
    itself. Kept when the kernel has no ``pidfd_open`` (before Linux 5.3) or on other systems.
    """
    global _pidfds_checked  # noqa: PLW0603  # decided once per process
    if _pidfds_checked:
        return
    _pidfds_checked = True
    if sys.version_info < (3, 12) and _pidfds_work():
        asyncio.set_child_watcher(_PidfdWatcher())


_pidfds_checked = False

if sys.version_info < (3, 12):  # 3.12 has this as its default (and deprecates watchers)

    class _PidfdWatcher(asyncio.AbstractChildWatcher):
        """3.12's ``PidfdChildWatcher``: the running loop reads each child's pidfd.

        3.11's own is bound to the loop it was attached to; this one works in any loop.
        """

        def add_child_handler(
            self, pid: int, callback: Callable[..., object], *args: object
        ) -> None:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(pid)
            loop.add_reader(pidfd, self._exited, loop, pid, pidfd, callback, args)

        @staticmethod
        def _exited(
            loop: asyncio.AbstractEventLoop,
            pid: int,
            pidfd: int,
            callback: Callable[..., object],
            args: tuple[object, ...],
        ) -> None:
            loop.remove_reader(pidfd)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:  # reaped by someone else: asyncio reports 255 too
                returncode = 255
            else:
                returncode = os.waitstatus_to_exitcode(status)
            os.close(pidfd)
            callback(pid, returncode, *args)

        def remove_child_handler(self, pid: int) -> bool:
            del pid
            return True

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            del loop

        def close(self) -> None:
            """Nothing to release: each pidfd is closed when its child exits."""

        def is_active(self) -> bool:
            return True

        def __enter__(self) -> _PidfdWatcher:
            return self

        def __exit__(self, *exc: object) -> None:
            del exc


async def _start(
    argv: tuple[str, ...],
    *,
    stdin: int,
    stdout: int,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    stderr: int = _PIPE,
) -> tuple[asyncio.SubprocessTransport, asyncio.subprocess.Process]:
    """Start ``argv`` in a new session (stderr piped by default); map start failures to ours.

    A cancellation while starting waits for the start to finish, then kills the process group.
    """
    _wait_with_pidfds()
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    # What asyncio.create_subprocess_exec does, keeping hold of the transport: killing closes
    # our pipe ends through it, however far the streams were read.
    start = asyncio.ensure_future(
        loop.subprocess_exec(
            lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=_CHUNK, loop=loop),
            *argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    )
    try:
        transport, protocol = await aio.uninterrupted(start)
    except asyncio.CancelledError:
        if start.exception() is None:
            transport, protocol = start.result()
            proc = asyncio.subprocess.Process(transport, protocol, loop)
            try:
                await _kill(transport, proc)
            finally:
                _log_exec(argv, proc, started, "", failed=True, error="CancelledError")
        raise
    except OSError as exc:
        # A failed exec reports the program as filename; a failed chdir reports cwd.
        missing = exc.errno in _NOT_RUNNABLE and exc.filename == argv[0]
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        _log.warning(
            "exec", argv=list(argv), returncode=None, duration_ms=duration_ms, error=str(exc)
        )
        cls = CommandNotFound if missing else CommandError
        raise cls(f"cannot run {argv[0]}: {exc}", argv=argv) from exc
    return transport, asyncio.subprocess.Process(transport, protocol, loop)


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes | None) -> None:
    """Write ``data`` to the child's stdin, then close it; a child may exit without reading."""
    if stdin is None or data is None:
        return
    with suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    stdin.close()


async def _kill(transport: asyncio.SubprocessTransport, proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's process group, close our pipe ends and reap the child.

    The reap runs to its end (or ``_REAP_GRACE``) even when the caller is cancelled meanwhile.
    """
    with suppress(ProcessLookupError):
        # The child leads its own group. Linux does not reuse a pid while a group carries it
        # and hands pids out cyclically, so even after the child is reaped this hits no stranger.
        os.killpg(proc.pid, signal.SIGKILL)
    for fd in (0, 1, 2):
        if (pipe := transport.get_pipe_transport(fd)) is not None:
            pipe.close()
    await aio.uninterrupted(_reap(proc))


async def _reap(proc: _Exit) -> None:
    try:
        async with asyncio.timeout(_REAP_GRACE):
            await proc.wait()
    except TimeoutError:
        _log.error("exec_reap_timeout", pid=proc.pid, grace_s=_REAP_GRACE)


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else _TRUNCATED + text[-limit:]


def _failure(result: Completed) -> CommandError:
    """Build the error for a non-zero exit, with the last line of stderr in the message."""
    code = result.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
    return CommandError(
        f"{result.argv[0]} {how}" + (f": {last[:200]}" if last else ""),
        argv=result.argv,
        returncode=code,
        stderr=result.stderr,
        stdout=_tail(result.text, _ERROR_STDOUT),
    )


def _timed_out(argv: tuple[str, ...], timeout: float, stderr: str) -> CommandTimeout:
    return CommandTimeout(
        f"{argv[0]} did not finish within {timeout:g} s", argv=argv, stderr=stderr
    )


def _log_exec(
    argv: tuple[str, ...],
    proc: _Exit,
    started: float,
    stderr: str,
    *,
    failed: bool,
    **extra: object,
) -> None:
    """Log the one ``exec`` line of a child: warning when it failed, else debug."""
    fields = {
        "argv": list(argv),
        "pid": proc.pid,
        "returncode": proc.returncode,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
        **extra,
    }
    if (failed or proc.returncode != 0) and stderr:
        fields["stderr"] = _tail(stderr, _LOG_STDERR)
    (_log.warning if failed else _log.debug)("exec", **fields)
