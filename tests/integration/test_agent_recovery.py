"""The agent after crashes and drift: kill -9 mid-task, lost journal, dead zones, foreign data."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.node import AgentNode, task_message, volume_params, wait_online
from tests.support.run import sh
from tests.support.zones import ZoneBed
from volagent.engine.journal import journal_path

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]


async def test_kill_9_during_a_create_then_restart_ends_ready_with_one_terminal_event(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    node.spawn()
    await wait_online(node)
    assert node.events is not None
    params = volume_params(zone_bed, "crashy", 54)
    task_id = await node.submit("volume.create", params)
    await node.events.seen(task_id, "progress")  # the dataset step has begun
    node.kill9()
    assert [e for e in node.events.events(task_id) if e["state"] in ("succeeded", "failed")] == []

    node.spawn()
    terminal = await node.events.terminal(task_id)
    assert terminal["state"] == "succeeded", terminal
    assert terminal["result"]["state"] == "ready"
    await asyncio.sleep(1.0)  # time for a second terminal event, if one were coming
    assert len(node.events.terminal_raw(task_id)) == 1
    # At least once: an event sent just before the kill may come again, the same bytes.
    by_seq: dict[int, set[bytes]] = {}
    for raw in node.events.raw:
        event = json.loads(raw)
        if event.get("task") == task_id:
            by_seq.setdefault(event["seq"], set()).add(raw)
    assert sorted(by_seq) == list(range(1, len(by_seq) + 1))
    assert all(len(copies) == 1 for copies in by_seq.values())
    ip = zone_bed.bridge.ip(54)
    nfs_client(client_ns(64)).ls(nfs_url(ip, "/crashy")).expect_ok()
    assert zone_bed.recorded() == [params["uuid"]]
    assert node.terminate() == 0


async def test_a_lost_journal_is_rebuilt_from_zfs_and_running_zones_are_kept(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    await node.start()
    params = volume_params(zone_bed, "kept", 55)
    uuid = str(params["uuid"])
    created = (await node.run_task("volume.create", params))["result"]
    pids = zone_bed.zone_pids(uuid)
    await node.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal_path(zone_bed.state_dir)}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240  # the agent is stopped; nothing else runs

    agent = await node.start()
    assert agent.reconciliation is not None
    assert agent.reconciliation.adopted == [uuid]
    assert zone_bed.zone_pids(uuid) == pids  # served all along, not restarted
    got = (await node.run_task("volume.get", {"uuid": uuid}))["result"]
    assert got["state"] == "ready"
    assert {k: got[k] for k in ("name", "nic", "allowed_clients", "size_mib")} == {
        k: created[k] for k in ("name", "nic", "allowed_clients", "size_mib")
    }


async def test_a_zone_gone_while_the_agent_was_down_is_started_again(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    await node.start()
    params = volume_params(zone_bed, "revived", 56)
    uuid = str(params["uuid"])
    await node.run_task("volume.create", params)
    await node.stop()
    ganesha_pid = zone_bed.zone_pids(uuid)[0]
    sh(["kill", "-9", str(ganesha_pid)])

    agent = await node.start()
    assert agent.reconciliation is not None
    # Adopting the recorded zones restarts the dead one (or reconciliation starts it).
    assert agent.reconciliation.zones_failed == []
    assert agent.reconciliation.zones_running + len(agent.reconciliation.zones_started) == 1
    assert zone_bed.zone_pids(uuid)[0] != ganesha_pid
    nfs_client(client_ns(66)).ls(nfs_url(zone_bed.bridge.ip(56), "/revived")).expect_ok()


async def test_datasets_without_the_marker_are_reported_and_left_alone(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    root = zone_bed.dataset_root
    sh(["zfs", "create", f"{root}/not-a-volume"])
    half = "9f0c1d2e-0000-4000-8000-00000000beef"
    sh(["zfs", "create", "-o", "volagent:name=half", f"{root}/{half}"])
    agent = await node.start()
    assert agent.reconciliation is not None
    assert agent.reconciliation.foreign == [f"{root}/not-a-volume"]
    assert agent.reconciliation.incomplete == [f"{root}/{half}"]
    assert agent.reconciliation.adopted == []
    listed = (await node.run_task("volume.list", {}))["result"]
    assert listed["volumes"] == []
    await node.stop()
    names = sh(["zfs", "list", "-H", "-o", "name", "-r", root]).split()
    assert f"{root}/not-a-volume" in names
    assert f"{root}/{half}" in names


async def test_bad_messages_fail_with_their_codes_and_the_agent_carries_on(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    await node.start()
    assert node.agent is not None
    assert node.events is not None
    cases: list[tuple[str, str]] = []

    def case(code: str, text: str) -> None:
        cases.append((code, text))

    _, good = task_message("volume.get", {"uuid": "9f0c1d2e-0000-4000-8000-000000000001"})
    body = json.loads(good)
    case("InvalidTask", json.dumps({**body, "v": "1"}))
    case(
        "WrongNode",
        json.dumps(
            {
                **body,
                "id": "11111111-0000-4000-8000-000000000002",
                "cn": "22222222-0000-4000-8000-000000000000",
            }
        ),
    )
    case(
        "UnknownTaskKind",
        json.dumps(
            {**body, "id": "11111111-0000-4000-8000-000000000003", "kind": "volume.explode"}
        ),
    )
    case(
        "InvalidParameter",
        json.dumps(
            {**body, "id": "11111111-0000-4000-8000-000000000004", "params": {"uuid": "not-a-uuid"}}
        ),
    )
    case(
        "DeadlineExceeded",
        json.dumps(
            {
                **body,
                "id": "11111111-0000-4000-8000-000000000005",
                "deadline": "2020-01-01T00:00:00Z",
            }
        ),
    )
    case(
        "InvalidTask",
        json.dumps({**body, "id": "11111111-0000-4000-8000-000000000006", "pad": "x" * 300_000}),
    )
    for _, text in cases:
        await node.publish(text)
    for garbage in ("not json at all", "[1,2,3]", '{"id": 7}'):
        await node.publish(garbage)
    for code, text in cases:
        terminal = await node.events.terminal(json.loads(text)["id"])
        assert terminal["state"] == "failed"
        assert terminal["error"]["code"] == code, terminal
    still = await node.run_task("volume.list", {})
    assert still["state"] == "succeeded"
    assert sum(node.agent.dropped.values()) == 3
