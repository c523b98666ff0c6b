"""Dispatch: light tasks (``volume.get``) through mosquitto against a raw MQTT echo.

Usage: ``python -m bench.dispatch [--quick]`` as root.

One broker, one agent (``volagent run``, default engine settings) serving 8 volumes, and the
raw echo (:mod:`bench.echo`, its own process). The same client sends the same task messages
to both: to the agent's tasks topic, where the round trip ends at the task's terminal event,
and to the echo, where it ends when the same bytes come back. At each concurrency the runs
alternate, echo then agent, in rounds, so that both see the same machine. Tasks go round
robin over the volumes (tasks of one volume run one at a time, volumes in parallel, at most
``engine.max_concurrent`` = 8 at once).

A ``volume.get`` reads the volume's space and snapshots from ZFS (one ``zfs get -d 1``): that
part of the round trip is timed raw too and shown on its own line, and so is what is left of
the agent's round trip once the echo's and that read's are taken away (the agent's own part).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from bench import common
from bench.bed import AgentProcess, Bed, volume_params
from bench.common import Row, median, ms, overhead_ms, percentile
from bench.exchange import Exchange, Sample, echoed, load, succeed, terminal_event
from tests.support.node import task_message
from volagent.adapters.zfs import volume_and_snapshot_properties
from volagent.domain.spec import SPEC_KEYS

TASKS: Final = 2000
QUICK_TASKS: Final = 200
VOLUMES: Final = 8
ROUNDS: Final = 4
WARM_UP: Final = 100
CONCURRENCY: Final = (1, 32)
#: As many as the agent runs at once (``engine.max_concurrent``).
ZFS_PARALLEL: Final = 8
ECHO_IN: Final = "vbench/echo/in"
ECHO_OUT: Final = "vbench/echo/out"
#: The targets of issue 8.
P50_OVERHEAD_S: Final = 0.002
P99_OVERHEAD_S: Final = 0.005
MIN_RATE_32: Final = 500.0

_GET: Final = ["zfs", "get", "-H", "-p", "-o", "name,property,value,source"]


def run(quick: bool) -> list[Row]:
    """The dispatch benchmark on a bed of its own."""
    with Bed() as bed:
        return asyncio.run(_run(bed, TASKS if not quick else QUICK_TASKS))


def _start_echo(bed: Bed) -> subprocess.Popen[bytes]:
    echo = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", str(bed.broker.port), ECHO_IN, ECHO_OUT],
        stdout=subprocess.PIPE,
    )

    def stop() -> None:
        echo.kill()
        echo.wait(10)

    bed.on_teardown(stop)
    assert echo.stdout is not None  # noqa: S101  # asked for above
    if echo.stdout.readline().strip() != b"ready":
        msg = "the echo client did not start"
        raise RuntimeError(msg)
    return echo


def _zfs_reads(*datasets: str) -> float:
    """Run the ``zfs get -d 1`` a ``volume.get`` runs (volume and snapshots); seconds taken.

    With several datasets, one command reads them all, as the agent does with concurrent reads.
    """
    props = volume_and_snapshot_properties(SPEC_KEYS)
    began = time.perf_counter()
    subprocess.run([*_GET, "-d", "1", props, *datasets], capture_output=True, check=True)
    return time.perf_counter() - began


def _raw_zfs_reads(datasets: list[str], count: int) -> tuple[float, float, float]:
    """The reads of ``count`` volume.get run raw.

    Median time alone; reads per second 8 commands at a time; reads per second with every
    volume in one command, one command at a time.
    """
    alone = median([_zfs_reads(datasets[0]) for _ in range(50)])
    began = time.perf_counter()
    with ThreadPoolExecutor(ZFS_PARALLEL) as pool:
        list(pool.map(_zfs_reads, (datasets[i % len(datasets)] for i in range(count))))
    parallel = count / (time.perf_counter() - began)
    began = time.perf_counter()
    for _ in range(count // len(datasets)):
        _zfs_reads(*datasets)
    joined = count // len(datasets) * len(datasets) / (time.perf_counter() - began)
    return alone, parallel, joined


async def _run(bed: Bed, count: int) -> list[Row]:
    agent = AgentProcess(bed)
    agent.start()
    await agent.ready()
    topic = agent.config.tasks_topic
    _start_echo(bed)
    port = bed.broker.port
    async with (
        Exchange(port, agent.config.events_topic, terminal_event) as to_agent,
        Exchange(port, ECHO_OUT, echoed) as to_echo,
    ):
        made = await asyncio.gather(
            *(
                succeed(to_agent, topic, "volume.create", volume_params(bed, f"v{i}", 10 + i))
                for i in range(VOLUMES)
            )
        )
        uuids = [event["result"]["uuid"] for _, event in made]

        def message(i: int) -> tuple[str, str]:
            return task_message("volume.get", {"uuid": uuids[i % len(uuids)]})

        def succeeded(event: dict[str, Any]) -> bool:
            return event.get("state") == "succeeded"

        async def agent_run(n: int, c: int) -> Sample:
            return await load(to_agent, topic, message, count=n, concurrency=c, ok=succeeded)

        async def echo_run(n: int, c: int) -> Sample:
            return await load(to_echo, ECHO_IN, message, count=n, concurrency=c, ok=bool)

        await echo_run(WARM_UP, 8)
        await agent_run(WARM_UP, 8)
        rows: list[Row] = []
        p50s: dict[int, tuple[float, float]] = {}
        for c in CONCURRENCY:
            echo_samples, agent_samples = [], []
            for _ in range(ROUNDS):
                echo_samples.append(await echo_run(count // ROUNDS, c))
                agent_samples.append(await agent_run(count // ROUNDS, c))
            agent_all, echo_all = _merge(agent_samples), _merge(echo_samples)
            p50s[c] = (median(agent_all.latencies), median(echo_all.latencies))
            rows += _rows(c, agent_all, echo_all)
            print(common.table(rows[-3:]), flush=True)
    datasets = [f"{bed.dataset_root}/{u}" for u in uuids]
    zfs_s, zfs_rate, zfs_joined_rate = _raw_zfs_reads(datasets, count // 4)
    agent_p50, echo_p50 = p50s[1]
    rows += [
        Row(
            "dispatch: the `zfs get` of a volume.get, run raw alone (p50)",
            "—",
            ms(zfs_s),
            "part of the concurrency 1 round trip",
        ),
        Row(
            f"dispatch: the `zfs get` of a volume.get, run raw {ZFS_PARALLEL} at a time",
            "—",
            f"{zfs_rate:.0f}/s",
            "volume reads/s, one per command",
        ),
        Row(
            f"dispatch: the same reads, {VOLUMES} volumes to a `zfs get`, one at a time, raw",
            "—",
            f"{zfs_joined_rate:.0f}/s",
            "volume reads/s as the agent joins them under load",
        ),
        Row(
            "dispatch, concurrency 1, p50: the agent's own part (minus the echo and the raw read)",
            ms(agent_p50 - echo_p50 - zfs_s),
            "—",
            "—",
        ),
    ]
    return rows


def _merge(samples: list[Sample]) -> Sample:
    return Sample(
        [x for s in samples for x in s.latencies],
        sum(s.wall_s for s in samples),
        sum(s.failures for s in samples),
    )


def _rows(c: int, agent: Sample, raw: Sample) -> list[Row]:
    n = len(agent.latencies)
    failed = f", {agent.failures} failed" if agent.failures else ""
    rows = []
    checks: list[tuple[str, Callable[[list[float]], float], float]] = [
        ("p50", median, P50_OVERHEAD_S),
        ("p99", lambda v: percentile(v, 99), P99_OVERHEAD_S),
    ]
    for name, stat, limit in checks:
        a, r = stat(agent.latencies), stat(raw.latencies)
        rows.append(
            Row(
                f"dispatch {n} volume.get, concurrency {c}: {name} round trip{failed}",
                ms(a),
                ms(r),
                overhead_ms(a, r),
                f"≤ +{limit * 1000:g} ms",
                a - r <= limit,
            )
        )
    rows.append(
        Row(
            f"dispatch {n} volume.get, concurrency {c}: throughput",
            f"{agent.throughput:.0f}/s",
            f"{raw.throughput:.0f}/s",
            common.ratio(agent.throughput, raw.throughput),
            f"≥ {MIN_RATE_32:g}/s" if c == 32 else "—",
            agent.throughput >= MIN_RATE_32 if c == 32 else None,
        )
    )
    return rows


if __name__ == "__main__":
    common.main(run, "dispatch: volume.get through MQTT against a raw echo")
