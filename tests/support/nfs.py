"""A real NFS client (libnfs-utils) run from inside a client namespace."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import Namespace

#: libnfs sends the caller's uid; root would be squashed, so clients act as an ordinary user.
CLIENT_UID = 1000


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

    def cat(self, url: str) -> NfsResult:
        """Read an NFS URL."""
        return self._run("nfs-cat", url)

    def ls(self, url: str) -> NfsResult:
        """List an NFS directory URL."""
        return self._run("nfs-ls", url)
