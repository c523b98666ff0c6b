"""Faults around a running ``volagent run`` process: the storage daemon going away and back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.node import WAIT, AgentNode, volume_params, wait_online
from tests.support.run import sh
from tests.support.zfs import Daemon
from tests.support.zones import ZoneBed

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]


async def ready_becomes(node: AgentNode, status: int) -> dict[str, Any]:
    """Poll ``/ready`` until it answers ``status``; its last document."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            code, body = await node.http_get("/ready")
        except aiohttp.ClientError:
            code, body = 0, {}
        if code == status:
            return dict(body)
        assert time.monotonic() < deadline, f"/ready still {code}: {body}"
        await asyncio.sleep(0.1)


def datasets_under(root: str) -> list[str]:
    return sh(["zfs", "list", "-H", "-r", "-o", "name", root]).split()[1:]


async def test_zfs_outage_readiness_retryable_failures_and_recovery_by_itself(
    node: AgentNode,
    zone_bed: ZoneBed,
    zfs_outage: Daemon,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
    tmp_path: Path,
) -> None:
    node.spawn()
    await wait_online(node)
    assert node.events is not None
    served = volume_params(zone_bed, "outage", 61)
    uuid = str(served["uuid"])
    assert (await node.run_task("volume.create", served))["state"] == "succeeded"
    client = nfs_client(client_ns(71))
    before = tmp_path / "before.txt"
    before.write_bytes(b"written before the outage\n")
    url = nfs_url(zone_bed.bridge.ip(61), "/outage/before.txt")
    client.cp(before, url).expect_ok()
    pids = zone_bed.zone_pids(uuid)
    assert (await ready_becomes(node, 200))["checks"]["zfs"]["ok"] is True

    zfs_outage.kill()
    down = await ready_becomes(node, 503)
    assert down["checks"]["zfs"]["ok"] is False, down
    assert down["checks"]["broker"]["ok"] is True, down
    later = volume_params(zone_bed, "later", 62)
    for kind, params in (
        ("volume.create", later),
        ("snapshot.create", {"volume_uuid": uuid, "name": "during"}),
    ):
        failed = await node.run_task(kind, params)
        assert failed["state"] == "failed", failed
        assert failed["error"]["code"] == "StorageUnavailable", failed
        assert failed["error"]["retryable"] is True, failed

    # The storage watch notices too: the zone supervisor is paused (no zone is restarted onto
    # the empty directory left where the dataset was).
    deadline = time.monotonic() + WAIT
    while (await node.http_get("/status"))[1]["storage"]["up"]:
        assert time.monotonic() < deadline, "the storage watch never saw the outage"
        await asyncio.sleep(0.1)
    assert zone_bed.zone_pids(uuid) == pids

    began = time.monotonic()
    zfs_outage.resume()  # only the daemon: the agent mounts what it serves by itself
    back = await ready_becomes(node, 200)
    recovery_s = time.monotonic() - began
    assert back["checks"]["zfs"]["ok"] is True, back
    assert client.cat(url).expect_ok() == before.read_bytes()
    assert zone_bed.zone_pids(uuid) != pids  # restarted onto the new mount
    _, status = await node.http_get("/status")
    assert status["storage"]["up"] is True
    assert status["storage"]["outages"] == 1
    _, volume = await node.http_get(f"/volumes/{uuid}")
    assert (volume["state"], volume["zone"]["state"]) == ("ready", "running")
    assert volume["zone"]["restarts"] == 1

    # Nothing was left of the create that failed; the same volume, asked again, is made.
    assert datasets_under(zone_bed.dataset_root) == [f"{zone_bed.dataset_root}/{uuid}"]
    again = await node.run_task("volume.create", later)
    assert again["state"] == "succeeded", again
    nfs_client(client_ns(72)).ls(nfs_url(zone_bed.bridge.ip(62), "/later")).expect_ok()
    assert node.terminate() == 0
    print(f"zfs outage: ready again {recovery_s:.2f} s after the daemon was started")  # noqa: T201  # a figure for the closing note
