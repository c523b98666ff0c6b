"""zfs-fuse for tests: the daemon, file-backed pools with unique names, fresh dataset roots."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
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
                msg = "zfs-fuse did not answer within {timeout}s"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def pid(self) -> int | None:
        """The daemon's pid when this run started it."""
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

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
