"""What every benchmark shares: result rows, statistics, the markdown report, the entry point."""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import NoReturn

import structlog


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``met`` is None where the issue sets no target."""

    benchmark: str
    agent: str
    raw: str
    compare: str
    target: str = "—"
    met: bool | None = None


#: Runs one benchmark: ``quick`` asks for small numbers (development); returns its rows.
Benchmark = Callable[[bool], list[Row]]

HEADER = ("benchmark", "agent", "raw", "ratio / overhead", "target", "met?")


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def ms(seconds: float) -> str:
    """Seconds as milliseconds for the table."""
    return f"{seconds * 1000:.2f} ms"


def secs(seconds: float) -> str:
    """Seconds for the table."""
    return f"{seconds:.3f} s"


def mib(size: float) -> str:
    """Bytes as MiB for the table."""
    return f"{size / 2**20:.1f} MiB"


def ratio(agent: float, raw: float) -> str:
    """``agent / raw`` as ``1.23x``."""
    return f"{agent / raw:.2f}x" if raw > 0 else "—"


def overhead_ms(agent: float, raw: float) -> str:
    """``agent - raw`` in milliseconds, signed."""
    return f"{(agent - raw) * 1000:+.2f} ms"


def met_text(met: bool | None) -> str:
    """The table's ``met?`` cell."""
    return "—" if met is None else ("yes" if met else "**no**")


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = (r.benchmark, r.agent, r.raw, r.compare, r.target, met_text(r.met))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _package(name: str) -> str:
    return _version(["dpkg-query", "-W", "-f", "${Version}", name])


def machine_facts() -> list[str]:
    """Cores, memory, kernel and the versions of what the agent drives, as markdown bullets."""
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return [
        f"- cores: {os.cpu_count()}; memory: {mem_kib / 2**20:.1f} GiB",
        f"- kernel: {platform.release()} ({platform.machine()})",
        f"- {platform.system()} {_version(['sh', '-c', '. /etc/os-release; echo $PRETTY_NAME'])}",
        f"- Python {platform.python_version()}",
        (
            f"- zfs-fuse {_package('zfs-fuse')}, nfs-ganesha {_package('nfs-ganesha')},"
            f" mosquitto {_package('mosquitto')}, libnfs-utils {_package('libnfs-utils')}"
        ),
    ]


def utc_now() -> str:
    """The date and time for the report."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _terminate(signum: int, _frame: FrameType | None) -> NoReturn:
    """SIGTERM ends a run as Ctrl-C does, so that every clean-up runs."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def prepare() -> None:
    """Quiet the agent's library loggers in this process; SIGTERM unwinds like Ctrl-C."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, _terminate)


def main(benchmark: Benchmark, description: str) -> None:
    """Entry point of one benchmark module: ``--quick``, then print its table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small numbers, for development")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks run as root (pools, namespaces, zones)")
    prepare()
    started = time.monotonic()
    rows = benchmark(args.quick)
    print(table(rows))
    print(f"\n({time.monotonic() - started:.0f} s)")
