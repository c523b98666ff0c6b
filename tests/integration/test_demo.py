"""``scripts/demo`` end to end, as ``make demo`` runs it: real pool, broker, zones and clients.

One node is kept up (KEEP=1) and used with the commands the demo prints, stopped with
``scripts/demo stop``, then a whole run goes from start to clean-up. Every run uses a work
directory under ``tmp_path`` and a tag of its own, so afterwards the host can be searched for
anything carrying them. The session's zfs-fuse daemon runs before: the demo must leave it up.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support.run import sh
from tests.support.zfs import Daemon

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo"
RUN_TIMEOUT_S = 240  # a run takes about 15 s here: this only turns a hang into a failure
STEPS = 9


def run_demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/demo`` with ``env``; what it printed and its exit status."""
    return subprocess.run(
        [str(DEMO), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def assert_all_passed(done: subprocess.CompletedProcess[str]) -> None:
    """Exit 0, and a summary of nine steps, each ``ok``."""
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    verdict = rf"^demo: all {STEPS} steps passed in [0-9.]+ s$"
    assert re.search(verdict, done.stdout, re.MULTILINE), out
    rows = done.stdout.split("\nSummary\n", 1)[1].splitlines()[:STEPS]
    assert [row.split()[0] for row in rows] == [f"{n}." for n in range(1, STEPS + 1)], out
    assert all(" ok " in row for row in rows), out


def leftovers(tag: str, work: Path) -> list[str]:
    """Anything on the host that carries ``tag`` or runs from or is mounted in ``work``."""
    found = [f"netns {n}" for n in sh(["ip", "netns", "list"]).split() if tag in n]
    for line in sh(["ip", "-o", "link", "show"]).splitlines():
        name = line.split(":")[1].strip()
        if tag in name:
            found.append(f"link {name}")
    pools = sh(["zpool", "list", "-H", "-o", "name"]).split()
    found += [f"pool {p}" for p in pools if p.startswith(tag)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if str(work) in cmdline or f"/{tag}/" in cgroups:
            found.append(f"process {entry.name}: {cmdline}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith((str(work), f"/run/netns/{tag}")):
            found.append(f"mount {point}")
    found += [f"cgroup {d}" for d in Path("/sys/fs/cgroup").glob(f"*/{tag}")]
    found += [f"cgroup {d}" for d in Path("/sys/fs/cgroup").glob(tag)]
    return found


def printed_command(out: str, program: str) -> list[str]:
    """The argv of the line of the KEEP=1 instructions that runs ``program``."""
    block = out.split("\nHow to use it\n", 1)[1]
    line = next(line for line in block.splitlines() if program in line.split())
    return shlex.split(line)


def test_demo_keeps_a_node_stops_it_then_runs_whole_leaving_nothing(
    zfs_daemon: Daemon, tmp_path: Path
) -> None:
    tag = f"vd{secrets.token_hex(2)}"
    work = tmp_path / "demo"
    env = {**os.environ, "DEMO_DIR": str(work), "DEMO_TAG": tag, "NO_COLOR": "1"}
    env.pop("KEEP", None)
    daemon = Daemon.running_pid()

    kept = run_demo({**env, "KEEP": "1"})
    assert_all_passed(kept)
    assert "keep the node running (KEEP=1)" in kept.stdout
    listing = subprocess.run(
        printed_command(kept.stdout, "nfs-ls"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert "hello.txt" in listing.stdout
    status = subprocess.run(
        printed_command(kept.stdout, "status"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert re.search(r"^volumes\s+total 1\b", status.stdout, re.MULTILINE), status.stdout

    stopped = run_demo(env, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "volume uploads deleted through the agent" in stopped.stdout
    assert f"destroyed pool {tag}" in stopped.stdout
    assert leftovers(tag, work) == []

    whole = run_demo(env)
    assert_all_passed(whole)
    assert "stop the agent and clean up" in whole.stdout
    assert leftovers(tag, work) == []
    assert "zfs-fuse was already running and stays running" in whole.stdout
    assert Daemon.running_pid() == daemon
