import asyncio
import ctypes
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from volagent.adapters import proc
from volagent.errors import CommandError, CommandNotFound, CommandTimeout

PY = sys.executable
MiB = 1024 * 1024

# Starts a grandchild, publishes "<own pid> <grandchild pid>" atomically in argv[1], then hangs.
WITH_GRANDCHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "60"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

LogEntries = list[MutableMapping[str, Any]]


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (``Z`` for a zombie), None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def assert_gone(pid: int) -> None:
    state = proc_state(pid)
    assert state is None, f"pid {pid} still exists in state {state}"


def open_fds() -> set[str]:
    return {fd.name for fd in Path("/proc/self/fd").iterdir()}


def exec_lines(logs: LogEntries) -> LogEntries:
    return [entry for entry in logs if entry["event"] == "exec"]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogEntries]:
    """Capture structlog events at every level, whatever configuration other tests left."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    monkeypatch.setattr(proc, "_log", structlog.get_logger("volagent.proc"))
    with capture_logs() as entries:
        yield entries
    structlog.configure(**saved)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once proc holds a started child, so that a test knows what its cancellation hits."""
    event = asyncio.Event()
    real_start, real_start_spawned = proc._start, proc._start_spawned

    async def start(*args: Any, **kwargs: Any) -> Any:
        result = await real_start(*args, **kwargs)
        event.set()
        return result

    def start_spawned(*args: Any, **kwargs: Any) -> Any:
        result = real_start_spawned(*args, **kwargs)
        event.set()
        return result

    monkeypatch.setattr(proc, "_start", start)
    monkeypatch.setattr(proc, "_start_spawned", start_spawned)
    return event


@pytest.fixture(params=["posix_spawn", "asyncio"])
def either_start(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through each way run() starts a child: posix_spawn, or asyncio's transport.

    run() takes posix_spawn for argv alone; asyncio's way (for input, env or cwd) is forced by
    making the system look as if it had no pidfds.
    """
    if request.param == "asyncio":
        monkeypatch.setattr(proc, "_pidfds_work", lambda: False)
        # Whether asyncio waits with pidfds is decided at its first use: not by this stand-in.
        monkeypatch.setattr(proc, "_pidfds_checked", proc._pidfds_checked)
    return str(request.param)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the reaper of orphaned descendants, so a test can reap and inspect them.

    Without it, orphans go to PID 1, which may take its time to reap them.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    yield
    libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


async def reap_orphan(pid: int) -> int:
    """Wait for the orphan ``pid`` (reparented to us by ``subreaper``) and return its status."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222  # WNOHANG never blocks
        except ChildProcessError:  # not reparented to us yet
            done, status = 0, 0
        if done:
            return status
        await asyncio.sleep(0.01)
    pytest.fail(f"pid {pid} was not killed (state {proc_state(pid)})")


def published(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


async def read_pids(path: Path, task: asyncio.Future[Any]) -> tuple[int, int]:
    deadline = time.monotonic() + 30
    while (text := published(path)) is None:
        assert not task.done(), task
        assert time.monotonic() < deadline, "the child did not publish its pids"
        await asyncio.sleep(0.01)
    child, grandchild = text.split()
    return int(child), int(grandchild)


async def until(event: asyncio.Event) -> None:
    async with asyncio.timeout(30):
        await event.wait()


# ---------------------------------------------------------------- run


@pytest.mark.usefixtures("either_start")
async def test_exit_codes_of_true_and_false() -> None:
    ok = await proc.run(["true"], timeout=10)
    assert (ok.returncode, ok.stdout, ok.stderr, ok.stdout_truncated) == (0, b"", "", False)
    assert ok.argv == ("true",)
    assert ok.duration_s >= 0
    failed = await proc.run(["false"], timeout=10, check=False)
    assert failed.returncode == 1


@pytest.mark.usefixtures("either_start")
async def test_non_zero_exit_raises_command_error_with_its_output() -> None:
    code = "import sys; print('partial'); sys.stderr.write('first\\ncannot open: nope\\n'); exit(3)"
    with pytest.raises(CommandError) as info:
        await proc.run([PY, "-c", code], timeout=30)
    error = info.value
    assert type(error) is CommandError
    assert error.argv == (PY, "-c", code)
    assert error.returncode == 3
    assert error.stderr == "first\ncannot open: nope\n"
    assert error.stdout == "partial\n"
    assert error.message == f"{PY} exited with status 3: cannot open: nope"
    assert error.details == {"argv": [PY, "-c", code], "returncode": 3, "stderr": error.stderr}
    assert not error.retryable


@pytest.mark.usefixtures("either_start")
async def test_check_false_returns_the_failure() -> None:
    result = await proc.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, check=False)
    assert (result.returncode, result.text, result.stderr) == (3, "out\n", "err\n")


@pytest.mark.usefixtures("either_start")
async def test_death_by_signal_is_named() -> None:
    with pytest.raises(CommandError, match=r"^sh was killed by signal 9$") as info:
        await proc.run(["sh", "-c", "kill -9 $$"], timeout=10)
    assert info.value.returncode == -9


@pytest.mark.usefixtures("either_start")
async def test_stdout_in_command_error_is_capped() -> None:
    code = "import sys; sys.stdout.write('x' * 100_000 + 'END'); exit(1)"
    with pytest.raises(CommandError) as info:
        await proc.run([PY, "-c", code], timeout=30)
    assert info.value.stdout == proc._TRUNCATED + "x" * (4096 - 3) + "END"


@pytest.mark.usefixtures("either_start")
@pytest.mark.parametrize("program", ["no-such-program-volagent", "/nonexistent/bin/tool"])
async def test_missing_program_is_command_not_found(program: str, logs: LogEntries) -> None:
    with pytest.raises(CommandNotFound) as info:
        await proc.run([program, "arg"], timeout=10)
    assert info.value.argv == (program, "arg")
    (line,) = exec_lines(logs)
    assert (line["log_level"], line["returncode"]) == ("warning", None)


@pytest.mark.usefixtures("either_start")
async def test_program_without_exec_permission_is_command_not_found(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(CommandNotFound):
        await proc.run([str(script)], timeout=10)


@pytest.mark.usefixtures("either_start")
async def test_no_descriptor_left_is_a_command_error_and_leaks_nothing() -> None:
    fds = open_fds()
    taken = {int(fd) for fd in fds}
    free = [fd for fd in range(len(taken) + 3) if fd not in taken][:3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Three descriptors left: the first pipe fits, the second does not.
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[-1] + 1, hard))
    try:
        with pytest.raises(CommandError) as info:
            await proc.run(["true"], timeout=10)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert type(info.value) is CommandError
    assert "Too many open files" in info.value.message
    assert open_fds() == fds


async def test_missing_cwd_is_a_command_error_not_a_missing_program(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as info:
        await proc.run(["true"], timeout=10, cwd=tmp_path / "absent")
    assert type(info.value) is CommandError


async def test_env_and_cwd_are_passed(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "VOLAGENT_TEST": "v1"}
    result = await proc.run(
        ["sh", "-c", "echo $VOLAGENT_TEST; pwd"], timeout=10, env=env, cwd=tmp_path
    )
    assert result.text == f"v1\n{tmp_path}\n"


async def test_input_goes_to_stdin() -> None:
    data = b"hello\x00\xffworld"
    assert (await proc.run(["cat"], timeout=10, input=data)).stdout == data


async def test_large_input_and_output_flow_at_the_same_time() -> None:
    data = os.urandom(4 * MiB)
    assert (await proc.run(["cat"], timeout=60, input=data)).stdout == data


async def test_input_a_child_does_not_read_is_not_an_error() -> None:
    assert (await proc.run(["true"], timeout=30, input=b"x" * 4 * MiB)).returncode == 0


@pytest.mark.usefixtures("either_start")
async def test_stdin_is_dev_null_without_input() -> None:
    assert (await proc.run(["cat"], timeout=10)).stdout == b""


async def test_argv_alone_is_started_with_posix_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_transport(*args: Any, **kwargs: Any) -> Any:
        msg = "asyncio's subprocess transport was used"
        raise AssertionError(msg)

    monkeypatch.setattr(proc, "_start", no_transport)
    assert (await proc.run(["echo", "spawned"], timeout=10)).text == "spawned\n"
    with pytest.raises(AssertionError, match="transport was used"):
        await proc.run(["cat"], timeout=10, input=b"x")


@pytest.mark.usefixtures("either_start")
async def test_child_leads_a_session_with_default_signals_and_no_stray_descriptors() -> None:
    # The test process ignores SIGPIPE (Python does): a child must not inherit that, nor a
    # descriptor of ours, even one left inheritable. Each program reads its own /proc entry
    # (a shell waiting for a child may block signals meanwhile: it must not be the one read).
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_w, True)  # noqa: FBT003  # positional only
    try:
        status = await proc.run(["cat", "/proc/self/status", "/proc/self/stat"], timeout=10)
        listed = await proc.run(["ls", "/proc/self/fd"], timeout=10)
    finally:
        os.close(stray_r)
        os.close(stray_w)
    *lines, stat = status.text.splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    masks = {key: int(fields[key], 16) for key in ("SigIgn", "SigBlk")}
    sigpipe, sigxfsz = 1 << (signal.SIGPIPE - 1), 1 << (signal.SIGXFSZ - 1)
    assert masks["SigIgn"] & (sigpipe | sigxfsz) == 0
    assert masks["SigBlk"] == 0
    assert sorted(listed.text.split()) == ["0", "1", "2", "3"]  # 3: the directory ls reads
    pid, rest = stat.rsplit(")", 1)[0].split()[0], stat.rsplit(")", 1)[1].split()
    assert rest[3] == pid  # the session


@pytest.mark.usefixtures("either_start")
async def test_stdout_beyond_the_cap_is_drained_and_dropped() -> None:
    code = "import sys; sys.stdout.buffer.write(b'x' * (3 * 1024 * 1024))"
    result = await proc.run([PY, "-c", code], timeout=60, max_stdout=MiB)
    assert result.returncode == 0
    assert result.stdout == b"x" * MiB
    assert result.stdout_truncated


@pytest.mark.usefixtures("either_start")
async def test_stdout_exactly_at_the_cap_is_not_truncated() -> None:
    code = "import sys; sys.stdout.buffer.write(b'x' * (1024 * 1024))"
    result = await proc.run([PY, "-c", code], timeout=60, max_stdout=MiB)
    assert (len(result.stdout), result.stdout_truncated) == (MiB, False)


@pytest.mark.usefixtures("either_start")
async def test_stderr_keeps_its_tail() -> None:
    code = "import sys; sys.stderr.write('a' * 100_000 + 'THE-END')"
    result = await proc.run([PY, "-c", code], timeout=60, max_stderr=1000)
    assert result.stderr == proc._TRUNCATED + "a" * 993 + "THE-END"


@pytest.mark.usefixtures("either_start")
async def test_timeout_kills_and_reaps_the_child(logs: LogEntries) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        await proc.run(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 20
    assert info.value.argv == ("sleep", "30")
    assert info.value.retryable
    (line,) = exec_lines(logs)
    assert (line["log_level"], line["error"]) == ("warning", "timeout")
    assert_gone(line["pid"])


@pytest.mark.usefixtures("either_start")
async def test_timeout_kills_a_grandchild_holding_stdout(subreaper: None) -> None:
    # sh exits at once; the backgrounded sleep keeps stdout open, so run() waits for it.
    with pytest.raises(CommandTimeout) as info:
        await proc.run(["sh", "-c", "sleep 60 & echo $! >&2; exit 0"], timeout=2)
    grandchild = int(info.value.stderr)
    assert os.waitstatus_to_exitcode(await reap_orphan(grandchild)) == -signal.SIGKILL
    assert_gone(grandchild)


@pytest.mark.usefixtures("either_start")
async def test_timeout_with_a_descendant_out_of_reach_closes_the_pipes(subreaper: None) -> None:
    # setsid takes the sleep out of the process group: the kill cannot reach it, but run()
    # must still return and close its pipe ends, although the sleep holds the other ends.
    fds = open_fds()
    with pytest.raises(CommandTimeout) as info:
        await proc.run(["sh", "-c", "setsid sleep 60 & echo $! >&2; wait"], timeout=2)
    escaped = int(info.value.stderr)
    try:
        assert proc_state(escaped) == "S"
        assert open_fds() == fds
    finally:
        os.kill(escaped, signal.SIGKILL)
        await reap_orphan(escaped)


async def hang_in_run(argv: list[str]) -> None:
    await proc.run(argv, timeout=120)


async def hang_in_spawn(argv: list[str]) -> None:
    async with proc.spawn(argv) as child:
        await child.wait(timeout=120)


@pytest.mark.usefixtures("either_start")
@pytest.mark.parametrize("hang", [hang_in_run, hang_in_spawn])
async def test_cancellation_kills_child_and_grandchild(
    hang: Callable[[list[str]], Awaitable[None]],
    tmp_path: Path,
    subreaper: None,
    started: asyncio.Event,
) -> None:
    fds = open_fds()
    pids = tmp_path / "pids"
    task = asyncio.ensure_future(hang([PY, "-c", WITH_GRANDCHILD, str(pids)]))
    child, grandchild = await read_pids(pids, task)
    await until(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_gone(child)
    assert os.waitstatus_to_exitcode(await reap_orphan(grandchild)) == -signal.SIGKILL
    assert_gone(grandchild)
    assert open_fds() == fds


@pytest.mark.usefixtures("either_start")
async def test_a_second_cancellation_does_not_cut_the_reap_short(
    monkeypatch: pytest.MonkeyPatch, started: asyncio.Event, logs: LogEntries
) -> None:
    reaping = asyncio.Event()
    reaped: list[int | None] = []
    real_reap = proc._reap

    async def slow_reap(child: Any) -> None:
        reaping.set()
        await asyncio.sleep(0.2)
        await real_reap(child)
        reaped.append(child.returncode)

    monkeypatch.setattr(proc, "_reap", slow_reap)
    task = asyncio.ensure_future(proc.run(["sleep", "60"], timeout=120))
    await until(started)
    task.cancel()
    await until(reaping)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reaped == [-signal.SIGKILL]
    (line,) = exec_lines(logs)
    assert_gone(line["pid"])


@pytest.mark.usefixtures("either_start")
async def test_cancellation_while_starting_kills_the_child(logs: LogEntries) -> None:
    fds = open_fds()
    task = asyncio.ensure_future(proc.run(["sleep", "60"], timeout=120))
    await asyncio.sleep(0)  # run() is now waiting for asyncio to start the child
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (line,) = exec_lines(logs)
    assert line["error"] == "CancelledError"
    assert_gone(line["pid"])
    assert open_fds() == fds


@pytest.mark.usefixtures("either_start")
async def test_log_line_per_call(logs: LogEntries) -> None:
    await proc.run(["true"], timeout=10)
    with pytest.raises(CommandError):
        await proc.run(["sh", "-c", "echo broken >&2; exit 2"], timeout=10)
    ok, bad = exec_lines(logs)
    assert (ok["log_level"], ok["argv"], ok["returncode"]) == ("debug", ["true"], 0)
    assert isinstance(ok["duration_ms"], float)
    assert ok["duration_ms"] >= 0
    assert ok["duration_ms"] == round(ok["duration_ms"], 1)
    assert "stderr" not in ok
    assert (bad["log_level"], bad["returncode"], bad["stderr"]) == ("warning", 2, "broken\n")


async def test_shell_string_is_refused() -> None:
    with pytest.raises(TypeError, match="list or tuple"):
        await proc.run("ls -l", timeout=10)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], ValueError),
        (["echo", 1], TypeError),
        (iter(["echo"]), TypeError),
    ],
)
async def test_malformed_argv_is_refused(argv: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        await proc.run(argv, timeout=10)


async def test_nul_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="NUL"):
        await proc.run(["touch", str(marker), "a\0b"], timeout=10)
    assert not marker.exists()


@pytest.mark.parametrize("seconds", [0, -1, math.nan, math.inf])
async def test_timeout_must_be_positive_and_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await proc.run(["true"], timeout=seconds)


# ---------------------------------------------------------------- spawn


async def test_spawn_streams_through_cat() -> None:
    data = os.urandom(2 * MiB)
    async with proc.spawn(["cat"]) as child:
        stdin, stdout = child.stdin, child.stdout
        assert stdin is not None
        assert stdout is not None

        async def feed() -> None:
            stdin.write(data)
            await stdin.drain()
            stdin.close()

        received, _ = await asyncio.gather(stdout.read(), feed())
        result = await child.wait(timeout=30)
    assert received == data
    assert (result.returncode, result.stdout, result.argv) == (0, b"", ("cat",))


async def test_spawn_connects_two_children_with_a_pipe(logs: LogEntries) -> None:
    fds = open_fds()
    read_end, write_end = os.pipe()
    head_argv = ["head", "-c", str(3 * MiB + 7), "/dev/zero"]
    async with (
        proc.spawn(head_argv, stdout=write_end) as head,
        proc.spawn(["wc", "-c"], stdin=read_end) as wc,
    ):
        os.close(write_end)
        os.close(read_end)
        assert head.stdout is None
        assert wc.stdin is None
        assert wc.stdout is not None
        count = await wc.stdout.read()
        assert (await head.wait(timeout=30)).returncode == 0
        assert (await wc.wait(timeout=30)).returncode == 0
    assert int(count) == 3 * MiB + 7
    assert open_fds() == fds
    assert [line["killed"] for line in exec_lines(logs)] == [False, False]


async def test_leaving_spawn_kills_the_child(logs: LogEntries) -> None:
    fds = open_fds()
    async with proc.spawn(["sleep", "60"], stdin=proc.DEVNULL, stdout=proc.DEVNULL) as child:
        assert child.stdin is None
        assert child.stdout is None
    assert_gone(child.pid)
    assert child._stderr_reader.done()
    assert open_fds() == fds
    (line,) = exec_lines(logs)
    assert (line["log_level"], line["killed"], line["returncode"]) == ("warning", True, -9)


async def test_leaving_spawn_with_unread_stdout_kills_and_closes() -> None:
    fds = open_fds()
    async with proc.spawn(["head", "-c", str(64 * MiB), "/dev/zero"]) as child:
        assert child.stdout is not None
        deadline = time.monotonic() + 30
        # Wait until the stream stops reading (a full buffer): from then on EOF goes unseen.
        while not child.stdout._paused:  # type: ignore[attr-defined]  # asyncio-private flag
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert_gone(child.pid)
    assert open_fds() == fds


async def test_an_exception_in_spawn_kills_the_child() -> None:
    pids: list[int] = []

    async def body() -> None:
        async with proc.spawn(["cat"]) as child:
            pids.append(child.pid)
            msg = "boom"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="boom"):
        await body()
    assert_gone(pids[0])


async def test_wait_timeout_kills_and_reaps() -> None:
    async with proc.spawn(["sleep", "30"]) as child:
        with pytest.raises(CommandTimeout):
            await child.wait(timeout=0.3)
        assert_gone(child.pid)
        result = await child.wait(timeout=10, check=False)
    assert result.returncode == -signal.SIGKILL


async def test_wait_reports_a_failure_with_stderr() -> None:
    async with proc.spawn(["sh", "-c", "echo oops >&2; exit 4"]) as child:
        with pytest.raises(CommandError) as info:
            await child.wait(timeout=10)
        assert (info.value.returncode, info.value.stderr) == (4, "oops\n")
        assert child.stderr_text == "oops\n"
        result = await child.wait(timeout=10, check=False)
    assert (result.returncode, result.stderr) == (4, "oops\n")


async def test_kill_is_idempotent() -> None:
    async with proc.spawn(["sleep", "30"]) as child:
        await child.kill()
        await child.kill()
        assert_gone(child.pid)


async def test_spawn_of_a_missing_program_is_command_not_found() -> None:
    with pytest.raises(CommandNotFound):
        async with proc.spawn(["no-such-program-volagent"]):
            pass


async def test_spawn_refuses_a_shell_string() -> None:
    with pytest.raises(TypeError):
        async with proc.spawn("cat"):
            pass


# ---------------------------------------------------------------- start_detached

# Publishes "<pid> <session id> <process group id>" atomically in argv[1], writes a line to
# stdout and one to stderr, then sleeps.
DETACHED = """
import os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {os.getsid(0)} {os.getpgid(0)}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("to stdout", flush=True)
print("to stderr", file=sys.stderr, flush=True)
time.sleep(60)
"""


async def wait_published(path: Path) -> str:
    deadline = time.monotonic() + 30
    while (text := published(path)) is None:
        assert time.monotonic() < deadline, "the detached program did not publish"
        await asyncio.sleep(0.01)
    return text


async def test_start_detached_returns_while_the_program_runs_in_its_own_session(
    tmp_path: Path, logs: LogEntries
) -> None:
    info, log = tmp_path / "info", tmp_path / "out.log"
    await proc.start_detached([PY, "-c", DETACHED, str(info)], log=log, timeout=10)
    pid, sid, pgid = (int(n) for n in (await wait_published(info)).split())
    try:
        assert proc_state(pid) not in (None, "Z")
        assert sid == pid == pgid  # leads a new session and group: no killpg of ours reaches it
        assert sid != os.getsid(0)
        with pytest.raises(ChildProcessError):  # not our child: it does not die with us
            os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222  # WNOHANG never blocks
        deadline = time.monotonic() + 30
        while "to stderr" not in str(published(log)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert "to stdout" in log.read_text()
        assert log.stat().st_mode & 0o777 == 0o600
    finally:
        os.kill(pid, signal.SIGKILL)
    (line,) = exec_lines(logs)
    assert line["argv"][:2] == ["setsid", "-f"]
    assert line["returncode"] == 0
    assert line["detached"] is True


async def test_start_detached_appends_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_text("before\n")
    await proc.start_detached(["echo", "first"], log=log, timeout=10)
    await proc.start_detached(["echo", "second"], log=log, timeout=10)
    deadline = time.monotonic() + 30
    while log.read_text().count("\n") < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert log.read_text().splitlines()[0] == "before"
    assert sorted(log.read_text().splitlines()[1:]) == ["first", "second"]


async def test_start_detached_of_a_missing_program_is_command_not_found(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    with pytest.raises(CommandNotFound, match="no-such-program-volagent"):
        await proc.start_detached(["no-such-program-volagent"], log=log, timeout=10)
    assert not log.exists()


async def test_start_detached_checks_argv_and_timeout(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        await proc.start_detached("sleep 1", log=tmp_path / "log", timeout=10)
    with pytest.raises(ValueError, match="timeout"):
        await proc.start_detached(["true"], log=tmp_path / "log", timeout=0)


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="3.12 waits for children with pidfds by itself"
)
async def test_children_are_waited_for_with_pidfds_in_any_loop() -> None:
    await proc.run(["true"], timeout=10, input=b"")  # input: asyncio's way, with its watcher
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this kernel has no pidfd_open: asyncio's threaded watcher stays")
    watcher = asyncio.get_child_watcher()
    assert type(watcher).__name__ == "_PidfdWatcher"

    def in_another_loop() -> list[int]:
        async def codes() -> list[int]:
            runs = [proc.run([PY, "-c", f"raise SystemExit({n})"], timeout=30, check=False,
                             input=b"") for n in range(4)]  # fmt: skip
            return [done.returncode for done in await asyncio.gather(*runs)]

        return asyncio.run(codes())

    # A loop in another thread, while this one runs its own children.
    other = asyncio.create_task(asyncio.to_thread(in_another_loop))
    async with proc.spawn([PY, "-c", "import time; time.sleep(0.3)"], stdout=proc.DEVNULL) as child:
        # asyncio's threaded watcher would have an "asyncio-waitpid-N" thread for it now.
        assert not [t.name for t in threading.enumerate() if "waitpid" in t.name]
        assert (await child.wait(timeout=30)).returncode == 0
    assert await other == [0, 1, 2, 3]
    assert asyncio.get_child_watcher() is watcher
