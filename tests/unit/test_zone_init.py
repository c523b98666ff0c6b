"""zone_init with stand-ins for mount, rpcbind and ganesha: the order of steps and one pid.

Run as the agent runs it: by its path, with ``-I -S``. The real run (inside a namespace, a
tmpfs on /run, rpcbind, ganesha) is proven by the zone integration tests.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from volagent.adapters import zone_init

# Stands in for ganesha: records its pid and argv, as the process zone_init became.
FAKE_SERVER = """#!{python}
import json, os, sys
with open({out!r}, "w") as f:
    json.dump({{"pid": os.getpid(), "argv": sys.argv[1:]}}, f)
"""
# Stands in for a step: a message on stderr, then the given status.
FAILING_STEP = """#!/bin/sh
echo "first line" >&2
echo "{name}: it went wrong" >&2
exit 3
"""
SERVER_ARGS = ["-F", "-f", "/z/ganesha.conf", "-L", "/z/ganesha.log"]


def fake_program(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_server(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in server and the file it records itself in."""
    out = tmp_path / "server.json"
    text = FAKE_SERVER.format(python=sys.executable, out=str(out))
    return fake_program(tmp_path, "server", text), out


def argv(tmp_path: Path, *, mount: str, rpcbind: str, server: str) -> list[str]:
    cgroups = [tmp_path / "cg-a", tmp_path / "cg-b"]
    for directory in cgroups:
        directory.mkdir(exist_ok=True)
    return [
        "--leader-pidfile", str(tmp_path / "leader.pid"),
        "--cgroup", str(cgroups[0]), "--cgroup", str(cgroups[1]),
        "--mount-bin", mount, "--rpcbind", rpcbind,
        "--", server, *SERVER_ARGS,
    ]  # fmt: skip


def run(args: list[str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", *flags, zone_init.__file__, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_parse_args_splits_the_server_command_line_at_the_double_dash() -> None:
    args = zone_init.parse_args([
        "--leader-pidfile", "/t/leader.pid", "--rpcbind", "r", "--", "g", "-F", "--", "-x",
    ])  # fmt: skip
    assert (args.leader_pidfile, args.cgroup, args.mount_bin) == ("/t/leader.pid", [], "mount")
    assert (args.rpcbind, args.server) == ("r", ["g", "-F", "--", "-x"])


@pytest.mark.parametrize(
    "args",
    [
        ["--rpcbind", "r", "--", "g"],  # no leader pid file
        ["--leader-pidfile", "p", "--rpcbind", "r"],  # no server
        ["--leader-pidfile", "p", "--rpcbind", "r", "--"],  # an empty server
        ["--leader-pidfile", "p", "--rpcbind", "r", "g"],  # a server without --
    ],
)
def test_parse_args_refuses_an_incomplete_command_line(args: list[str]) -> None:
    with pytest.raises(SystemExit):
        zone_init.parse_args(args)


def test_join_cgroups_writes_the_pid_into_each(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for directory in dirs:
        directory.mkdir()
    zone_init.join_cgroups([str(d) for d in dirs], 4242)
    assert [(d / "cgroup.procs").read_text() for d in dirs] == ["4242", "4242"]


def test_write_pid_replaces_the_file_and_leaves_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "leader.pid"
    path.write_text("99999999\n")
    zone_init.write_pid(str(path), 4242)
    assert path.read_text() == "4242\n"
    assert [p.name for p in tmp_path.iterdir()] == ["leader.pid"]


def test_the_leader_joins_its_cgroups_runs_the_steps_and_becomes_the_server(
    tmp_path: Path,
) -> None:
    server, out = fake_server(tmp_path)
    done = run(argv(tmp_path, mount="true", rpcbind="true", server=str(server)))
    assert done.returncode == 0, done.stderr
    leader = int((tmp_path / "leader.pid").read_text())
    became = json.loads(out.read_text())
    assert became["pid"] == leader  # exec, not a child: one pid from start to ganesha
    assert became["argv"] == SERVER_ARGS
    for directory in ("cg-a", "cg-b"):
        assert (tmp_path / directory / "cgroup.procs").read_text() == str(leader)


def test_it_imports_nothing_outside_the_standard_library(tmp_path: Path) -> None:
    server, _ = fake_server(tmp_path)
    done = run(argv(tmp_path, mount="true", rpcbind="true", server=str(server)), "-X", "importtime")
    assert done.returncode == 0, done.stderr
    imported = {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "imported package" not in line
    }
    assert {"os", "select"} <= imported  # the lines are there to be read
    top = {name.split(".")[0] for name in imported}
    assert top <= sys.stdlib_module_names, top - sys.stdlib_module_names
    assert not top & {"volagent", "structlog", "asyncio", "typing", "pathlib", "subprocess"}


@pytest.mark.parametrize("failing", ["mount", "rpcbind"])
def test_a_failing_step_ends_with_status_1_and_its_stderr_before_the_server(
    tmp_path: Path, failing: str
) -> None:
    server, out = fake_server(tmp_path)
    bad = str(fake_program(tmp_path, failing, FAILING_STEP.format(name=failing)))
    steps = {"mount": "true", "rpcbind": "true", failing: bad}
    done = run(argv(tmp_path, mount=steps["mount"], rpcbind=steps["rpcbind"], server=str(server)))
    assert done.returncode == 1
    assert done.stderr == f"zone_init: {bad} exited with status 3: {failing}: it went wrong\n"
    assert (tmp_path / "leader.pid").exists()
    assert not out.exists()


def test_a_missing_step_program_ends_with_status_1(tmp_path: Path) -> None:
    server, out = fake_server(tmp_path)
    missing = tmp_path / "no-mount"
    done = run(argv(tmp_path, mount=str(missing), rpcbind="true", server=str(server)))
    assert done.returncode == 1
    assert done.stderr == f"zone_init: cannot run {missing}: No such file or directory\n"
    assert not out.exists()


def test_a_step_that_hangs_is_killed_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zone_init, "STEP_TIMEOUT_S", 0.2)
    with pytest.raises(zone_init.StepFailed, match=r"^sleep did not finish within 0\.2 s$"):
        zone_init.run_step(["sleep", "30"])


def test_an_unwritable_leader_pid_file_ends_with_status_1(tmp_path: Path) -> None:
    server, out = fake_server(tmp_path)
    args = argv(tmp_path, mount="true", rpcbind="true", server=str(server))
    args[1] = str(tmp_path / "missing-dir" / "leader.pid")
    done = run(args)
    assert done.returncode == 1
    assert done.stderr.startswith("zone_init: [Errno 2] No such file or directory")
    assert not out.exists()


def test_a_missing_server_ends_with_status_1(tmp_path: Path) -> None:
    done = run(argv(tmp_path, mount="true", rpcbind="true", server=str(tmp_path / "none")))
    assert done.returncode == 1
    assert done.stderr == f"zone_init: cannot run {tmp_path / 'none'}: No such file or directory\n"
