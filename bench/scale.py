"""Scale: 1,000 volumes on one node, and 100 running zones.

Usage: ``python -m bench.scale [--quick]`` as root (``--quick``: 100 volumes, 10 running).

zfs-fuse mounts at most 1,000 file systems per daemon, and other pools (the test suite's)
share that daemon, so 1,000 served volumes cannot be had. How the 1,000 are made instead:

1. 100 volumes are created through the agent (``volume.create`` over MQTT): each has its
   dataset mounted and its zone (rpcbind and ganesha in a namespace) running.
2. The agent is restarted (SIGTERM, start): a **warm restart with 100 running zones**. The
   zones outlive the agent and are adopted, not restarted. Measured: the reconciliation
   time (``/status`` ``reconciliation.duration_s``), the agent's RSS once reconciled, and
   each zone's memory (the resident memory of the processes in its cgroups, and its memory
   cgroup's usage).
3. The agent is stopped, and 900 volume datasets are created the way the agent writes them
   (spec in user properties, quota, completion marker) with ``canmount=off``: they are never
   mounted. The agent's next start adopts them and, because it cannot mount them, leaves
   them ``failed`` without a zone (a real state: ``zone.restart`` is how an operator would
   bring one back).
4. The agent is restarted again: a **warm restart at 1,000 volumes**, where the journal
   knows all 1,000, 100 zones are running and adopted, 900 volumes are ``failed`` with no
   zone (reconciliation leaves those alone). Measured: reconciliation time, RSS once
   reconciled, ``volume.list`` round trips over MQTT and ``/metrics`` scrapes.

So the 1,000-volume reconciliation lists, loads and checks 1,000 volumes but serves 100 of
them; the 100-zone case gives the cost of each served zone on top.
Raw baseline for the listings: the ``zfs get -d 1`` over the dataset root (and the pool
reads) that the agent runs, timed on their own.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench import common
from bench.bed import NETWORK, AgentProcess, Bed, volume_params
from bench.common import Row, median, mib, ms, percentile, secs
from bench.exchange import Exchange, succeed, terminal_event
from volagent.adapters import cgroups
from volagent.adapters.zfs import COMPLETE_PROPERTY, COMPLETE_VALUE, ZfsCli, volume_properties
from volagent.domain.params import VolumeCreateParams
from volagent.domain.spec import SPEC_KEYS, spec_to_props
from volagent.ports.storage import CanMount, DatasetOptions

TOTAL: Final = 1000
RUNNING: Final = 100
QUICK_TOTAL: Final = 100
QUICK_RUNNING: Final = 10
RESTARTS: Final = 3
LIST_CALLS: Final = 10
METRICS_CALLS: Final = 30
#: How long the idle zones' CPU use is sampled.
IDLE_WINDOW_S: Final = 5.0
#: Datasets created at once while populating.
PARALLEL: Final = 8
#: The issue's targets.
MAX_RECONCILE_S: Final = 2.0
MAX_RSS: Final = 100 * 2**20

_GET: Final = ["zfs", "get", "-H", "-p", "-o", "name,property,value,source"]


def run(quick: bool) -> list[Row]:
    """The scale benchmark on a bed of its own."""
    with Bed() as bed:
        if quick:
            return asyncio.run(_run(bed, QUICK_TOTAL, QUICK_RUNNING))
        return asyncio.run(_run(bed, TOTAL, RUNNING))


async def _restarts(agent: AgentProcess, running: int, total: int) -> tuple[list[float], int]:
    """Restart the agent :data:`RESTARTS` times; reconciliation times, and RSS after the last."""
    durations, rss = [], 0
    for _ in range(RESTARTS):
        agent.stop()
        agent.start()
        status = await agent.ready()
        rss = agent.rss_bytes()
        recon = status["reconciliation"]
        if (recon["zones_running"], recon["zones_started"], status["volumes"]["total"]) != (
            running,
            [],
            total,
        ):
            msg = f"unexpected reconciliation: {recon}, volumes {status['volumes']}"
            raise RuntimeError(msg)
        durations.append(recon["duration_s"])
    return durations, rss


def _raw_listing(root: str, rounds: int = 3) -> float:
    """Median time of the ``zfs get -d 1`` a reconciliation runs over the dataset root."""
    argv = [*_GET, "-d", "1", volume_properties(SPEC_KEYS), root]
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - began)
    return median(times)


def _raw_list_task(root: str, pool: str, rounds: int = 3) -> float:
    """Median time of the ZFS reads of a ``volume.list``: the root's listing, the pool's space."""
    calls = [
        [*_GET, "-d", "1", volume_properties(()), root],
        [*_GET, "used,available", pool],
        ["zpool", "list", "-H", "-o", "health", pool],
    ]
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        for argv in calls:
            subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - began)
    return median(times)


def _cgroup_memory(bed: Bed, uuid: str) -> int:
    """The zone's memory cgroup usage (page cache and kernel memory included)."""
    tree = cgroups.CgroupTree(parent=bed.zones_settings.cgroup_parent)
    for parent in tree.parents():
        for name in ("memory.usage_in_bytes", "memory.current"):
            path = parent / uuid / name
            if path.exists():
                return int(path.read_text())
    return 0


async def _zone_usage(bed: Bed, uuids: list[str]) -> tuple[float, float, float]:
    """Per zone, mean: resident memory and memory cgroup usage (bytes), idle CPU (share)."""
    runtime = bed.zones_runtime()
    before = [await runtime.usage(u) for u in uuids]
    await asyncio.sleep(IDLE_WINDOW_S)
    after = [await runtime.usage(u) for u in uuids]
    charged = [_cgroup_memory(bed, u) for u in uuids]
    cpu = sum(a.cpu_seconds - b.cpu_seconds for a, b in zip(after, before, strict=True))
    n = len(uuids)
    return sum(a.rss_bytes for a in after) / n, sum(charged) / n, cpu / IDLE_WINDOW_S / n


async def _stop_zones(bed: Bed, uuids: list[str]) -> None:
    runtime = bed.zones_runtime()
    limit = asyncio.Semaphore(PARALLEL)

    async def stop(uuid: str) -> None:
        async with limit:
            await runtime.stop(uuid)

    await asyncio.gather(*(stop(u) for u in uuids))


async def _populate(bed: Bed, count: int) -> None:
    """``count`` volume datasets as the agent writes them, never mounted (``canmount=off``)."""
    zfs = ZfsCli(command_timeout_s=120)
    limit = asyncio.Semaphore(PARALLEL)

    async def create(i: int) -> None:
        params: dict[str, Any] = volume_params(bed, f"idle{i}", 10)
        params["nic"] = {"ip": f"10.215.{i // 250}.{i % 250 + 1}", "prefix": 16, "network": NETWORK}
        spec = VolumeCreateParams.model_validate(params).spec()
        user = {f"volagent:{k}": v for k, v in spec_to_props(spec).items()}
        user[COMPLETE_PROPERTY] = COMPLETE_VALUE
        options = DatasetOptions(
            quota_bytes=spec.size_mib << 20, atime=False, canmount=CanMount.OFF, user=user
        )
        async with limit:
            await zfs.create_dataset(f"{bed.dataset_root}/{params['uuid']}", options)

    await asyncio.gather(*(create(i) for i in range(count)))


async def _scrapes(agent: AgentProcess, calls: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(calls):
            began = time.perf_counter()
            async with session.get(agent.url + "/metrics") as answer:
                await answer.read()
                answer.raise_for_status()
            times.append(time.perf_counter() - began)
    return times


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def _run(bed: Bed, total: int, running: int) -> list[Row]:
    agent = AgentProcess(bed)
    agent.start()
    await agent.ready()
    topic = agent.config.tasks_topic
    rows: list[Row] = []

    # 1. the running volumes, through the agent
    async with Exchange(bed.broker.port, agent.config.events_topic, terminal_event) as ex:
        began = time.perf_counter()
        made = await asyncio.gather(
            *(
                succeed(ex, topic, "volume.create", volume_params(bed, f"run{i}", 10 + i))
                for i in range(running)
            )
        )
        print(f"scale: {running} volumes created in {time.perf_counter() - began:.1f} s")
    uuids = [event["result"]["uuid"] for _, event in made]

    # 2. warm restarts with the running zones
    recon, rss = await _restarts(agent, running, running)
    zone_rss, zone_charged, zone_cpu = await _zone_usage(bed, uuids)
    raw_small = _raw_listing(bed.dataset_root)
    rows += [
        Row(
            f"scale: reconciliation, {running} volumes with running zones adopted"
            f" (median of {RESTARTS} restarts)",
            secs(median(recon)),
            secs(raw_small),
            f"{common.ratio(median(recon), raw_small)} the root's `zfs get -d 1`",
        ),
        Row(
            f"scale: memory per running zone (ganesha + rpcbind), mean of {running}",
            f"{mib(zone_rss)} RSS",
            "—",
            f"memory cgroup usage {mib(zone_charged)}",
        ),
        Row(
            f"scale: CPU of an idle running zone, mean of {running} over {IDLE_WINDOW_S:g} s",
            f"{zone_cpu * 100:.2f} % of a core",
            "—",
            f"{running} zones: {zone_cpu * running * 100:.0f} % of a core",
        ),
        Row(f"scale: agent RSS, {running} running zones", mib(rss), "—", "—"),
    ]
    print(common.table(rows), flush=True)

    # 3. the other volumes: written to ZFS, adopted by a start, failed (never mounted)
    agent.stop()
    began = time.perf_counter()
    await _populate(bed, total - running)
    took = time.perf_counter() - began
    print(f"scale: {total - running} idle volume datasets made in {took:.1f} s", flush=True)
    agent.start()
    cold = (await agent.ready())["reconciliation"]
    if len(cold["adopted"]) != total - running or len(cold["zones_failed"]) != total - running:
        msg = f"the start after populating adopted {len(cold['adopted'])} volumes"
        raise RuntimeError(msg)

    # 4. warm restarts at the full count, then list and scrape
    recon, rss = await _restarts(agent, running, total)
    raw_full = _raw_listing(bed.dataset_root)
    assert agent.proc is not None  # noqa: S101  # started by _restarts
    async with Exchange(bed.broker.port, agent.config.events_topic, terminal_event) as ex:
        lists = [(await succeed(ex, topic, "volume.list", {}))[0] for _ in range(LIST_CALLS)]
    scrapes = await _scrapes(agent, METRICS_CALLS)
    peak = _peak_rss(agent.proc.pid)
    raw_list = _raw_list_task(bed.dataset_root, bed.pool_name)
    agent.stop()
    await _stop_zones(bed, uuids)
    raw_quiet = _raw_listing(bed.dataset_root)
    rows += [
        Row(
            f"scale: reconciliation, {total} volumes ({running} zones adopted,"
            f" {total - running} failed without zone; median of {RESTARTS} restarts)",
            secs(median(recon)),
            secs(raw_full),
            f"{common.ratio(median(recon), raw_full)} the root's `zfs get -d 1`",
            f"≤ {MAX_RECONCILE_S:g} s",
            median(recon) <= MAX_RECONCILE_S,
        ),
        Row(
            f"scale: the root's `zfs get -d 1` at {total} volumes once no zone runs",
            "—",
            secs(raw_quiet),
            "for comparison with the raw listing above",
        ),
        Row(
            f"scale: first start adopting {total - running} unknown datasets (not a target)",
            secs(cold["duration_s"]),
            "—",
            "—",
        ),
        Row(
            f"scale: volume.list at {total} volumes, MQTT round trip (median of {LIST_CALLS})",
            ms(median(lists)),
            ms(raw_list),
            f"{common.ratio(median(lists), raw_list)} its ZFS reads run raw",
        ),
        Row(
            f"scale: /metrics at {total} volumes, p50 / max of {METRICS_CALLS}"
            " (space re-read every 10 s)",
            f"{ms(median(scrapes))} / {ms(percentile(scrapes, 100))}",
            "—",
            "—",
        ),
        Row(
            f"scale: agent RSS after reconciling {total} volumes",
            mib(rss),
            "—",
            f"peak {mib(peak)} after the lists",
            f"≤ {MAX_RSS >> 20} MiB",
            rss <= MAX_RSS,
        ),
    ]
    return rows


if __name__ == "__main__":
    common.main(run, "scale: 1,000 volumes and 100 running zones on one node")
