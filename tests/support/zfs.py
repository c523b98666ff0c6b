"""zfs-fuse for tests: the daemon, file-backed pools with unique names, fresh dataset roots."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.run import sh

_SOCKET = Path("/var/run/zfs/zfs_socket")


def daemon_answers() -> bool:
    """Whether a zfs-fuse daemon answers ``zpool list``."""
    try:
        done = subprocess.run(["zpool", "list", "-H"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


class Daemon:
    """The machine's zfs-fuse daemon; stopped at the end only if this run started it."""

    def __init__(self, workdir: Path) -> None:
        self.pidfile = workdir / "zfs-fuse.pid"
        self.started_here = False

    def ensure_running(self) -> None:
        """Start the daemon unless one already answers, and wait until it does."""
        if daemon_answers():
            return
        sh(["zfs-fuse", "--pidfile", str(self.pidfile)], timeout=30)
        self.started_here = True
        self.wait_ready()

    @staticmethod
    def wait_ready(timeout: float = 20) -> None:
        """Block until ``zpool list`` answers."""
        deadline = time.monotonic() + timeout
        while not daemon_answers():
            if time.monotonic() > deadline:
                msg = f"zfs-fuse did not answer within {timeout}s"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def pid(self) -> int | None:
        """The daemon's pid when this run started it."""
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def running_pid() -> int | None:
        """The pid of the zfs-fuse daemon running now, whoever started it."""
        done = subprocess.run(
            ["pgrep", "-x", "zfs-fuse"], capture_output=True, text=True, timeout=10, check=False
        )
        for pid in (int(p) for p in done.stdout.split()):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie is an exited daemon
                    return pid
        return None

    def kill(self, timeout: float = 30) -> None:
        """Kill the running daemon (SIGKILL), whoever started it, and wait until it is gone.

        This is the outage a node meets: a graceful stop (SIGTERM) waits, without end, until
        every open file on its datasets is closed, and a zone's NFS server holds its files
        open. The dead daemon's mounts stay in the mount table, and every access to them
        fails with ENOTCONN. The pools stay in its cache for the next :meth:`resume`.
        """
        pid = self.running_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.running_pid() is not None:
            if time.monotonic() > deadline:
                msg = f"zfs-fuse (pid {pid}) still runs {timeout}s after SIGKILL"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def resume(self) -> None:
        """Start the daemon again after :meth:`kill` and wait until it answers.

        zfs-fuse leaves its pid file behind and refuses to start over one ("already exists;
        aborting"), so it is removed first. Whether the daemon is stopped at the end of the
        run stays as it was.
        """
        self.pidfile.unlink(missing_ok=True)
        sh(["zfs-fuse", "--pidfile", str(self.pidfile)], timeout=30)
        self.wait_ready()

    @staticmethod
    def remount(pools: Sequence[str]) -> None:
        """Detach the dead mounts a killed daemon left in ``pools``, then mount them again.

        Only these pools: other pools on the machine are not this run's to touch.
        """
        for point in dead_zfs_mounts(pools):
            sh(["umount", "-l", point], check=False)  # a parent's detach took it already
        for pool in pools:
            listed = sh(["zfs", "list", "-H", "-r", "-t", "filesystem", "-o", "name", pool])
            for fs in sorted(listed.split(), key=lambda n: n.count("/")):
                done = subprocess.run(
                    ["zfs", "mount", fs], capture_output=True, text=True, timeout=60, check=False
                )
                if done.returncode != 0 and "already mounted" not in done.stderr:
                    msg = f"zfs mount {fs} failed: {done.stderr.strip()}"
                    raise RuntimeError(msg)

    def stop(self) -> None:
        """Stop the daemon if this run started it (pools must be gone already)."""
        pid = self.pid()
        if not self.started_here or pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.started_here = False


def dead_zfs_mounts(pools: Sequence[str]) -> list[str]:
    """Mount points of the datasets of ``pools`` whose daemon is gone, deepest first."""
    dead = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] != "fuse.zfs" or fields[0].split("/", 1)[0] not in pools:
            continue
        point = fields[1].replace("\\040", " ")
        try:
            os.statvfs(point)  # reaches the daemon; a stat may be answered from a cache
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                dead.append(point)
    return sorted(dead, key=lambda p: p.count("/"), reverse=True)


@dataclass
class Pool:
    """A file-backed test pool."""

    name: str
    image: Path
    mountpoint: Path

    @classmethod
    def create(cls, name: str, workdir: Path, *, size_mb: int) -> Pool:
        """Create the pool on a sparse image file in ``workdir``."""
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / f"{name}.img"
        mountpoint = workdir / f"{name}.mnt"
        with image.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        sh(["zpool", "create", "-m", str(mountpoint), name, str(image)], timeout=60)
        return cls(name=name, image=image, mountpoint=mountpoint)

    def destroy(self) -> None:
        """Destroy the pool (never forced; retried while busy) and remove its file."""
        last = ""
        for _ in range(50):
            done = subprocess.run(
                ["zpool", "destroy", self.name],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0 or "no such pool" in done.stderr:
                break
            last = done.stderr
            time.sleep(0.1)
        else:
            msg = f"zpool destroy {self.name} kept failing: {last}"
            raise RuntimeError(msg)
        self.image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


def mountpoint(name: str) -> Path:
    """Where a dataset is mounted (read straight from zfs, not through the driver)."""
    return Path(sh(["zfs", "get", "-H", "-o", "value", "mountpoint", name]).strip())


def destroy_dataset_tree(name: str) -> None:
    """Destroy a dataset and everything under it, deepest first, without ``-f``."""
    done = subprocess.run(
        ["zfs", "list", "-H", "-r", "-t", "all", "-o", "name", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return  # already gone
    # Snapshots and clones first: `zfs destroy -r` handles snapshots, but unmount each
    # filesystem ourselves from the deepest up so that busy mounts are retried, never forced.
    for fs in sorted(done.stdout.split(), key=lambda n: n.count("/"), reverse=True):
        if "@" in fs:
            continue
        subprocess.run(["zfs", "umount", fs], capture_output=True, timeout=60, check=False)
    for _ in range(50):
        done = subprocess.run(
            ["zfs", "destroy", "-r", name], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0 or "does not exist" in done.stderr:
            return
        time.sleep(0.1)
    msg = f"zfs destroy -r {name} kept failing: {done.stderr}"
    raise RuntimeError(msg)
