"""Synchronous command helper for the test bed (the package itself uses adapters/proc.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def sh(argv: Sequence[str], *, timeout: float = 60, check: bool = True) -> str:
    """Run argv (never a shell string); return stdout; raise with stderr on failure."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        msg = f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}"
        raise RuntimeError(msg)
    return done.stdout


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
