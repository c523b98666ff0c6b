"""A real NFS client (libnfs-utils) run from inside a client namespace."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.support.net import Namespace

#: libnfs sends the caller's uid; root would be squashed, so clients act as an ordinary user.
CLIENT_UID = 1000

#: Where the monotonic clock of a v4-creating client is put, in ms: inside [2^31, 2^32).
_V4_CREATE_CLOCK_MS: Final = 3_000_000_000
#: Largest file ``cp_v4_create`` is known to write: above about 3.5 KB libnfs 4.0 fails the
#: write after a v4 create ("Failed to write to dest file") without sending a WRITE at all.
V4_CREATE_MAX_BYTES: Final = 3000


def v4_create_offset(uptime_s: float | None = None) -> int:
    """Seconds to add to the monotonic clock so that a libnfs 4.0 v4 create works on zfs-fuse.

    libnfs 4.0 sends every v4 create as EXCLUSIVE4 with a verifier made of the monotonic
    clock in ms; ganesha stores it in the new file's times, which zfs-fuse refuses outside
    its range (``NFS4ERR_INVAL``). With the clock at 3e9 ms (inside [2^31, 2^32)) the
    stored times are accepted (see docs/testbed.md).
    """
    if uptime_s is None:
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return _V4_CREATE_CLOCK_MS // 1000 - int(uptime_s)


def nfs_url(ip: str, path: str, *, version: int = 3, uid: int = CLIENT_UID) -> str:
    """``nfs://ip/path`` for NFSv3 (portmapper) or NFSv4, as user ``uid``."""
    query = f"uid={uid}&gid={uid}"
    if version == 4:
        query = f"version=4&{query}"
    return f"nfs://{ip}/{path.lstrip('/')}?{query}"


@dataclass(frozen=True)
class NfsResult:
    """What a client command printed, and whether it worked."""

    returncode: int
    stdout: bytes
    stderr: str

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def expect_ok(self) -> bytes:
        """The output, or an AssertionError naming the client's error."""
        if not self.ok:
            msg = f"NFS client failed ({self.returncode}): {self.stderr.strip()}"
            raise AssertionError(msg)
        return self.stdout


class NfsClient:
    """``nfs-cp``/``nfs-cat``/``nfs-ls`` run inside ``ns`` (so they come from its IP)."""

    def __init__(self, ns: Namespace, *, timeout: float = 30) -> None:
        self.ns = ns
        self.timeout = timeout

    def _run(self, *argv: str) -> NfsResult:
        try:
            done = subprocess.run(
                self.ns.exec_argv(*argv), capture_output=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            return NfsResult(-1, b"", f"timed out after {self.timeout}s: {exc}")
        return NfsResult(done.returncode, done.stdout, done.stderr.decode(errors="replace"))

    def cp(self, src: Path, url: str) -> NfsResult:
        """Copy a local file to an NFS URL."""
        return self._run("nfs-cp", str(src), url)

    def cp_v4_create(self, src: Path, url: str) -> NfsResult:
        """Create a file over NFSv4 (``url`` with ``version=4``): ``nfs-cp`` in a time namespace.

        One create per client process; keep ``src`` at most :data:`V4_CREATE_MAX_BYTES`.
        """
        offset = str(v4_create_offset())
        return self._run("unshare", "-T", "--fork", "--monotonic", offset, "nfs-cp", str(src), url)

    def cat(self, url: str) -> NfsResult:
        """Read an NFS URL."""
        return self._run("nfs-cat", url)

    def ls(self, url: str) -> NfsResult:
        """List an NFS directory URL."""
        return self._run("nfs-ls", url)
