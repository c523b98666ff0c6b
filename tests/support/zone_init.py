"""Run inside a fresh mount namespace: private /run, rpcbind, then exec ganesha in the foreground.

Usage: python zone_init.py <ganesha.conf> <ganesha.log> <ganesha.pid>
(started by tests/support/ganesha.py as ``ip netns exec NS unshare -m --propagation slave --``).
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(conf: str, log: str, pidfile: str) -> None:
    """Mount a tmpfs on /run, start rpcbind, replace this process with ganesha."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True, timeout=10)
    subprocess.run(["rpcbind", "-w"], check=True, timeout=10)
    os.execvp("ganesha.nfsd", ["ganesha.nfsd", "-F", "-f", conf, "-L", log, "-p", pidfile])


if __name__ == "__main__":
    main(*sys.argv[1:4])
