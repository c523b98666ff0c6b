"""zone_init with stand-ins for mount, rpcbind and ganesha: the order of steps and one pid.

The real run (inside a namespace, a tmpfs on /run, rpcbind, ganesha) is proven by the zone
integration tests.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from volagent.adapters import zone_init

# Stands in for ganesha: records its pid and argv, as the process zone_init became.
FAKE_GANESHA = """#!{python}
import json, os, sys
with open({out!r}, "w") as f:
    json.dump({{"pid": os.getpid(), "argv": sys.argv[1:]}}, f)
"""


def fake_program(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def argv(tmp_path: Path, *, mount: str, rpcbind: str, ganesha: str) -> list[str]:
    cgroups = [tmp_path / "cg-a", tmp_path / "cg-b"]
    for directory in cgroups:
        directory.mkdir(exist_ok=True)
    return [
        "--leader-pidfile", str(tmp_path / "leader.pid"),
        "--cgroup", str(cgroups[0]), "--cgroup", str(cgroups[1]),
        "--mount-bin", mount, "--rpcbind", rpcbind, "--ganesha", ganesha,
        "--conf", "/z/ganesha.conf", "--log", "/z/ganesha.log", "--pidfile", "/z/ganesha.pid",
    ]  # fmt: skip


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "volagent.adapters.zone_init", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_parse_args() -> None:
    args = zone_init.parse_args([
        "--leader-pidfile", "/t/leader.pid", "--rpcbind", "r", "--ganesha", "g",
        "--conf", "c", "--log", "l", "--pidfile", "p",
    ])  # fmt: skip
    assert args.leader_pidfile == Path("/t/leader.pid")
    assert (args.cgroup, args.mount_bin, args.rpcbind, args.ganesha) == ([], "mount", "r", "g")
    with pytest.raises(SystemExit):
        zone_init.parse_args(["--rpcbind", "r"])


def test_join_cgroups_writes_the_pid_into_each(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for directory in dirs:
        directory.mkdir()
    zone_init.join_cgroups(dirs, 4242)
    assert [(d / "cgroup.procs").read_text() for d in dirs] == ["4242", "4242"]


def test_the_leader_joins_its_cgroups_runs_the_steps_and_becomes_ganesha(tmp_path: Path) -> None:
    out = tmp_path / "ganesha.json"
    ganesha = fake_program(
        tmp_path, "ganesha", FAKE_GANESHA.format(python=sys.executable, out=str(out))
    )
    done = run(argv(tmp_path, mount="true", rpcbind="true", ganesha=str(ganesha)))
    assert done.returncode == 0, done.stderr
    leader = int((tmp_path / "leader.pid").read_text())
    became = json.loads(out.read_text())
    assert became["pid"] == leader  # exec, not a child: one pid from start to ganesha
    assert became["argv"] == [
        "-F", "-f", "/z/ganesha.conf", "-L", "/z/ganesha.log", "-p", "/z/ganesha.pid",
    ]  # fmt: skip
    for directory in ("cg-a", "cg-b"):
        assert (tmp_path / directory / "cgroup.procs").read_text() == str(leader)


@pytest.mark.parametrize("failing", ["mount", "rpcbind"])
def test_a_failing_step_ends_with_status_1_before_ganesha(tmp_path: Path, failing: str) -> None:
    out = tmp_path / "ganesha.json"
    ganesha = fake_program(
        tmp_path, "ganesha", FAKE_GANESHA.format(python=sys.executable, out=str(out))
    )
    steps = {"mount": "true", "rpcbind": "true", failing: "false"}
    done = run(argv(tmp_path, mount=steps["mount"], rpcbind=steps["rpcbind"], ganesha=str(ganesha)))
    assert done.returncode == 1
    assert "zone_init: false exited with status 1" in done.stderr
    assert (tmp_path / "leader.pid").exists()
    assert not out.exists()


def test_a_missing_ganesha_ends_with_status_1(tmp_path: Path) -> None:
    done = run(argv(tmp_path, mount="true", rpcbind="true", ganesha=str(tmp_path / "none")))
    assert done.returncode == 1
    assert f"zone_init: cannot run {tmp_path / 'none'}: No such file" in done.stderr
