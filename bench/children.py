"""Child processes: what ``proc.run`` costs the agent per command, against a bare spawn.

Usage: ``python -m bench.children [--quick]``.

Every ``zfs`` and ``ip`` the agent runs goes through ``proc.run``: a new session, pipes for
stdout and stderr read to their end, a timeout, kill-on-cancel, one log line. This measures
``proc.run(["true"])`` one at a time against the least a program can do for the same child in
the same run: ``posix_spawnp`` and a blocking ``waitpid``, no pipes, no event loop. Both are
timed (wall, median) and their CPU counted (this process's user and system time per child;
the child's own is not ours). The runs alternate in rounds, agent then raw.

A third row is asyncio's subprocess transport, which ``proc.run`` still uses when given
input, an environment or a working directory (``input=b""`` here forces it).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Final

from bench import common
from bench.common import Row, median
from volagent.adapters import proc

CHILDREN: Final = 1500
QUICK: Final = 150
ROUNDS: Final = 5


def run(quick: bool) -> list[Row]:
    """The child-process benchmark (no bed: it starts nothing but ``true``)."""
    return asyncio.run(_run((QUICK if quick else CHILDREN) // ROUNDS))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raw_child() -> None:
    pid = os.posix_spawnp("true", ["true"], os.environ)
    os.waitpid(pid, 0)


async def _agent_child() -> None:
    await proc.run(["true"], timeout=30)


async def _transport_child() -> None:
    await proc.run(["true"], timeout=30, input=b"")


async def _measure(one: Callable[[], Awaitable[None]], count: int) -> tuple[list[float], float]:
    walls = []
    cpu = _cpu()
    for _ in range(count):
        began = time.perf_counter()
        await one()
        walls.append(time.perf_counter() - began)
    return walls, (_cpu() - cpu) / count


async def _raw_async() -> None:
    _raw_child()  # blocking on purpose: the baseline has no loop to serve


async def _run(per_round: int) -> list[Row]:
    ways = {"agent": _agent_child, "raw": _raw_async, "transport": _transport_child}
    walls: dict[str, list[float]] = {name: [] for name in ways}
    cpus: dict[str, list[float]] = {name: [] for name in ways}
    await _measure(_agent_child, 20)  # warm-up: imports, first pidfd check
    for _ in range(ROUNDS):
        for name, one in ways.items():
            round_walls, round_cpu = await _measure(one, per_round)
            walls[name] += round_walls
            cpus[name].append(round_cpu)
    count = len(walls["agent"])
    wall = {name: median(values) for name, values in walls.items()}
    cpu = {name: median(values) for name, values in cpus.items()}
    agent_vs_raw = common.overhead_ms(wall["agent"], wall["raw"])
    transport_vs_raw = common.ratio(cpu["transport"], cpu["raw"])
    return [
        Row(
            f"child process (`true`) one at a time, median of {count}",
            common.ms(wall["agent"]),
            common.ms(wall["raw"]),
            f"{common.ratio(wall['agent'], wall['raw'])} ({agent_vs_raw})",
        ),
        Row(
            "  our CPU per child",
            common.ms(cpu["agent"]),
            common.ms(cpu["raw"]),
            common.ratio(cpu["agent"], cpu["raw"]),
        ),
        Row(
            "  through asyncio's transport (input, env or cwd given): wall; our CPU",
            f"{common.ms(wall['transport'])}; {common.ms(cpu['transport'])}",
            f"{common.ms(wall['raw'])}; {common.ms(cpu['raw'])}",
            f"{common.ratio(wall['transport'], wall['raw'])}; {transport_vs_raw}",
        ),
    ]


if __name__ == "__main__":
    common.main(run, "child processes: proc.run against a bare posix_spawn in the same run")
