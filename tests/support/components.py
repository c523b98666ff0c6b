"""Which real components this machine has, and the reason a test must skip when one is absent."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

#: marker -> programs that must be on PATH for tests carrying that marker
PROGRAMS: dict[str, tuple[str, ...]] = {
    "zfs": ("zfs-fuse", "zfs", "zpool"),
    "nfs": ("ganesha.nfsd", "rpcbind", "nfs-cp", "nfs-cat", "nfs-ls", "unshare", "mount"),
    "netns": ("ip",),
    "mqtt": ("mosquitto", "mosquitto_pub", "mosquitto_sub", "mosquitto_passwd", "openssl"),
}


@functools.cache
def missing(marker: str) -> str | None:
    """Why the component behind ``marker`` is unusable here, or None when it is present."""
    absent = [p for p in PROGRAMS[marker] if shutil.which(p) is None]
    if absent:
        return f"{marker}: {', '.join(absent)} not installed (scripts/install-deps installs them)"
    if marker in ("zfs", "nfs", "netns") and os.geteuid() != 0:
        return f"{marker}: needs root"
    if marker == "zfs" and not Path("/dev/fuse").exists():
        return "zfs: /dev/fuse is absent (zfs-fuse needs FUSE)"
    return None
