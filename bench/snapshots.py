"""Snapshot operations: create, delete and rollback through the agent against raw ``zfs``.

Usage: ``python -m bench.snapshots [--quick]`` as root.

Agent: the round trip of ``snapshot.create``, ``snapshot.rollback`` (to the latest snapshot)
and ``snapshot.delete`` tasks on a served volume, from publishing the task to its terminal
event. Raw: ``zfs snapshot``, ``zfs rollback`` and ``zfs destroy`` on a dataset of the same
pool, timed around the command. The runs alternate, agent then raw; each result is the median.

What the agent does on top: each task checks the volume's snapshots first and records the
volume's new snapshot list after (a ``zfs get`` each), and a rollback stops the volume's NFS
server and starts it again, because ganesha caches what the rollback changes
(docs/protocol.md), so that ratio is mostly a zone restart.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from bench import common
from bench.bed import AgentProcess, Bed, volume_params
from bench.common import Row, median, ms
from bench.exchange import Exchange, succeed, terminal_event
from tests.support.run import sh

SNAPSHOTS: Final = 20
ROLLBACKS: Final = 10
QUICK: Final = 4


def run(quick: bool) -> list[Row]:
    """The snapshot benchmark on a bed of its own."""
    with Bed() as bed:
        return asyncio.run(_run(bed, QUICK if quick else SNAPSHOTS, QUICK if quick else ROLLBACKS))


def _raw(argv: list[str]) -> float:
    began = time.perf_counter()
    sh(argv)
    return time.perf_counter() - began


async def _run(bed: Bed, snapshots: int, rollbacks: int) -> list[Row]:
    raw_ds = f"{bed.pool_name}/raw"
    sh(["zfs", "create", "-o", "quota=64M", "-o", "atime=off", raw_ds])
    agent = AgentProcess(bed)
    agent.start()
    await agent.ready()
    topic = agent.config.tasks_topic
    times: dict[str, tuple[list[float], list[float]]] = {
        op: ([], []) for op in ("create", "rollback", "delete")
    }
    async with Exchange(bed.broker.port, agent.config.events_topic, terminal_event) as ex:
        _, made = await succeed(ex, topic, "volume.create", volume_params(bed, "snappy", 10))
        uuid = made["result"]["uuid"]

        async def agent_op(kind: str, params: dict[str, Any]) -> float:
            seconds, _ = await succeed(ex, topic, kind, {"volume_uuid": uuid, **params})
            return seconds

        async def step(op: str, kind: str, name: str, raw: list[str]) -> None:
            agent_list, raw_list = times[op]
            agent_list.append(await agent_op(kind, {"name": name}))
            raw_list.append(await asyncio.to_thread(_raw, raw))

        names = [f"s{i}" for i in range(snapshots)]
        for name in names:
            await step("create", "snapshot.create", name, ["zfs", "snapshot", f"{raw_ds}@{name}"])
        latest = names[-1]
        for _ in range(rollbacks):
            raw = ["zfs", "rollback", f"{raw_ds}@{latest}"]
            await step("rollback", "snapshot.rollback", latest, raw)
        for name in names:
            await step("delete", "snapshot.delete", name, ["zfs", "destroy", f"{raw_ds}@{name}"])
    rows = []
    for op, (agent_times, raw_times) in times.items():
        a, r = median(agent_times), median(raw_times)
        rows.append(
            Row(
                f"snapshot {op}, median of {len(agent_times)}",
                ms(a),
                ms(r),
                common.ratio(a, r),
            )
        )
    return rows


if __name__ == "__main__":
    common.main(run, "snapshot create/delete/rollback through the agent against raw zfs")
