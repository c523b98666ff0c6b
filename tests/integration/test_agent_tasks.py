"""The agent wired whole: tasks in with mosquitto_pub, events out with mosquitto_sub, data over NFS.

Real mosquitto, real zfs-fuse, real zones (nfs-ganesha in namespaces), real libnfs clients.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.node import AgentNode, held_connection, volume_params
from tests.support.run import sh
from tests.support.zones import ZoneBed

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]


def ok(event: dict[str, object]) -> dict[str, object]:
    assert event["state"] == "succeeded", event
    result = event["result"]
    assert isinstance(result, dict)
    return result


def failed(event: dict[str, object], code: str) -> dict[str, object]:
    assert event["state"] == "failed", event
    error = event["error"]
    assert isinstance(error, dict)
    assert error["code"] == code, error
    return error


def quota(dataset: str) -> int:
    return int(sh(["zfs", "get", "-H", "-p", "-o", "value", "quota", dataset]).strip())


def exists(dataset: str) -> bool:
    return sh(["zfs", "list", "-H", dataset], check=False).strip() != ""


async def test_full_lifecycle_over_mqtt_and_nfs(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
    tmp_path: Path,
) -> None:
    await node.start()
    assert node.events is not None
    params = volume_params(zone_bed, "media", 50)
    uuid, ip = str(params["uuid"]), zone_bed.bridge.ip(50)
    dataset = f"{zone_bed.dataset_root}/{uuid}"

    created = ok(await node.run_task("volume.create", params))
    assert created["state"] == "ready"
    assert created["resource"] == f"nfs://{ip}/media"
    assert created["zone"]["state"] == "running"  # type: ignore[index]  # JSON object
    assert quota(dataset) == 64 * 1024 * 1024

    client = nfs_client(client_ns(60))
    first = tmp_path / "a.txt"
    first.write_bytes(b"first version\n")
    client.cp(first, nfs_url(ip, "/media/a.txt")).expect_ok()
    assert client.cat(nfs_url(ip, "/media/a.txt")).expect_ok() == b"first version\n"

    snap = ok(await node.run_task("snapshot.create", {"volume_uuid": uuid, "name": "s1"}))
    assert snap["name"] == "s1"
    later = tmp_path / "b.txt"
    later.write_bytes(b"written after the snapshot\n")
    client.cp(later, nfs_url(ip, "/media/b.txt")).expect_ok()
    assert "b.txt" in client.ls(nfs_url(ip, "/media")).expect_ok().decode()

    listed = ok(await node.run_task("snapshot.list", {"volume_uuid": uuid}))
    assert [s["name"] for s in listed["snapshots"]] == ["s1"]  # type: ignore[attr-defined]
    rolled = ok(await node.run_task("snapshot.rollback", {"volume_uuid": uuid, "name": "s1"}))
    assert rolled["state"] == "ready"
    names = client.ls(nfs_url(ip, "/media")).expect_ok().decode()
    assert "a.txt" in names
    assert "b.txt" not in names
    assert client.cat(nfs_url(ip, "/media/a.txt")).expect_ok() == b"first version\n"

    resized = ok(await node.run_task("volume.resize", {"uuid": uuid, "size_mib": 128}))
    assert resized["size_mib"] == 128
    assert quota(dataset) == 128 * 1024 * 1024
    got = ok(await node.run_task("volume.get", {"uuid": uuid}))
    assert got["size_mib"] == 128
    assert got["generation"] == resized["generation"]
    assert int(got["generation"]) > int(created["generation"])  # type: ignore[call-overload]

    deleted = ok(await node.run_task("volume.delete", {"uuid": uuid}))
    assert deleted == {"uuid": uuid, "state": "deleted", "already_absent": False}
    assert not exists(dataset)
    assert zone_bed.recorded() == []
    failed(await node.run_task("volume.get", {"uuid": uuid}), "VolumeNotFound")
    again = ok(await node.run_task("volume.delete", {"uuid": uuid}))
    assert again["already_absent"] is True


async def test_the_same_task_twice_has_one_effect_and_identical_terminal_events(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    await node.start()
    assert node.events is not None
    params = volume_params(zone_bed, "twice", 51)
    task_id = await node.submit("volume.create", params)
    first = await node.events.terminal(task_id)
    ok(first)
    text = json.dumps(
        {
            "v": 1,
            "id": task_id,
            "kind": "volume.create",
            "cn": first["cn"],
            "created": first["ts"],
            "params": params,
        }
    )
    await node.publish(text)
    async with asyncio.timeout(30):
        while len(node.events.terminal_raw(task_id)) < 2:  # noqa: ASYNC110  # events arrive from mosquitto_sub
            await asyncio.sleep(0.05)
    one, two = node.events.terminal_raw(task_id)[:2]
    assert one == two
    states = [e["state"] for e in node.events.events(task_id)]
    assert states.count("accepted") == 1
    assert states.count("running") == 1
    snapshots = sh(["zfs", "list", "-H", "-o", "name", "-r", zone_bed.dataset_root]).split()
    assert snapshots.count(f"{zone_bed.dataset_root}/{params['uuid']}") == 1
    listed = ok(await node.run_task("volume.list", {}))
    assert [v["uuid"] for v in listed["volumes"]] == [params["uuid"]]  # type: ignore[attr-defined]
    assert listed["pool"]["size_bytes"] > 0  # type: ignore[index]  # JSON object


async def test_tasks_published_while_the_agent_is_down_run_when_it_returns(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    await node.start()
    assert node.events is not None
    await node.stop()
    params = volume_params(zone_bed, "late", 52)
    create = await node.submit("volume.create", params)
    snap = await node.submit("snapshot.create", {"volume_uuid": params["uuid"], "name": "first"})
    await asyncio.sleep(0.5)
    assert node.events.events(create) == []
    await node.start()
    ok(await node.events.terminal(create))
    ok(await node.events.terminal(snap))


async def test_delete_and_restart_are_refused_while_a_client_is_connected_unless_forced(
    node: AgentNode, zone_bed: ZoneBed, client_ns: Callable[[int], Namespace]
) -> None:
    await node.start()
    params = volume_params(zone_bed, "busy", 53)
    uuid, ip = params["uuid"], zone_bed.bridge.ip(53)
    ok(await node.run_task("volume.create", params))
    client = client_ns(63)
    with held_connection(client, ip):
        error = failed(await node.run_task("volume.delete", {"uuid": uuid}), "VolumeInUse")
        assert error["details"] == {"clients": [client.ip]}
        failed(await node.run_task("zone.restart", {"uuid": uuid}), "VolumeInUse")
        restarted = ok(await node.run_task("zone.restart", {"uuid": uuid, "force": True}))
        assert restarted["zone"]["restarts"] >= 1  # type: ignore[index]  # JSON object
        deleted = ok(await node.run_task("volume.delete", {"uuid": uuid, "force": True}))
        assert deleted["already_absent"] is False
    assert not exists(f"{zone_bed.dataset_root}/{uuid}")


async def test_tasks_of_one_volume_run_in_arrival_order_under_load(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    await node.start()
    assert node.events is not None
    volumes = [volume_params(zone_bed, f"load{i}", 70 + i) for i in range(3)]
    await asyncio.gather(*(node.run_task("volume.create", p) for p in volumes))
    ids: dict[str, list[str]] = {str(p["uuid"]): [] for p in volumes}
    for n in range(6):
        for p in volumes:
            ids[str(p["uuid"])].append(
                await node.submit("snapshot.create", {"volume_uuid": p["uuid"], "name": f"s{n}"})
            )
    for task_ids in ids.values():
        for task_id in task_ids:
            ok(await node.events.terminal(task_id))
    order = [
        json.loads(r)["task"] for r in node.events.raw if json.loads(r).get("state") == "running"
    ]
    for uuid, task_ids in ids.items():
        assert [t for t in order if t in task_ids] == task_ids
        snaps = sh(
            [
                "zfs",
                "list",
                "-H",
                "-t",
                "snapshot",
                "-o",
                "name",
                "-s",
                "createtxg",
                "-d",
                "1",
                f"{zone_bed.dataset_root}/{uuid}",
            ]
        ).split()
        assert [s.split("@")[1] for s in snaps] == [f"s{n}" for n in range(6)]
