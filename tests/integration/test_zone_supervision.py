"""The zone supervisor over the real Linux runtime: a killed ganesha comes back with the data."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.zones import ZoneBed
from volagent.ports.zones import ZoneState, ZoneStatus
from volagent.services.zone_supervisor import TASK_NAME, SupervisorPolicy, ZoneSupervisor

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns]


def _ganesha_pid(status: ZoneStatus | None) -> int:
    assert status is not None
    pids = [p for p in status.pids if Path(f"/proc/{p}/comm").read_text().strip() == "ganesha.nfsd"]
    assert len(pids) == 1, status.pids
    return pids[0]


async def test_kill_9_of_ganesha_is_restarted_by_the_supervisor_and_the_data_is_back(
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    data = os.urandom(64 * 1024)
    source = zone_bed.volume("vol", seed={"data.bin": data})
    a = client_ns(21)
    spec = zone_bed.spec(source, 10, (a.ip,))
    runtime = zone_bed.runtime()
    started = await runtime.start(spec)
    url = nfs_url(spec.nic.ip, f"{spec.export_path}/data.bin")
    assert nfs_client(a).cat(url).expect_ok() == data

    changes: asyncio.Queue[tuple[str, ZoneStatus]] = asyncio.Queue()

    async def on_change(volume_uuid: str, status: ZoneStatus) -> None:
        await changes.put((volume_uuid, status))

    supervisor = ZoneSupervisor(
        runtime,
        on_change=on_change,
        policy=SupervisorPolicy(probe_interval_s=0.2, backoff_initial_s=0.5),
    )
    await supervisor.watch(spec, started)
    killed = _ganesha_pid(await runtime.status(spec.volume_uuid))
    async with asyncio.TaskGroup() as daemon:
        task = daemon.create_task(supervisor.run(), name=TASK_NAME)
        os.kill(killed, signal.SIGKILL)
        async with asyncio.timeout(60):  # generous: only catches a supervisor that never acts
            volume_uuid, status = await changes.get()
        task.cancel()

    assert volume_uuid == spec.volume_uuid
    assert (status.state, status.restarts) == (ZoneState.RUNNING, 1)
    assert status.reason.startswith("restarted: ")
    assert supervisor.status(spec.volume_uuid) == status
    assert _ganesha_pid(await runtime.status(spec.volume_uuid)) != killed
    assert nfs_client(a).cat(url).expect_ok() == data
    # stopping the supervisor left the zone serving
    assert await runtime.probe(spec.volume_uuid)
    assert changes.empty()
