"""The operating surface of a running agent: local HTTP API, metrics, central reports, readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.central import CentralServer
from tests.support.mqtt import Mosquitto
from tests.support.node import AgentNode, volume_params
from tests.support.zones import ZoneBed

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]


@pytest.fixture
async def central() -> AsyncIterator[CentralServer]:
    async with CentralServer() as server:
        yield server


@pytest.fixture
def node(node: AgentNode, central: CentralServer) -> AgentNode:
    """The shared node, reporting to the test's central API with a 0.5 s heartbeat."""
    node.overrides["central"] = {"url": central.url, "heartbeat_s": 0.5}
    return node


async def get(node: AgentNode, path: str) -> tuple[int, Any]:
    base = f"http://{node.config().http.listen}"
    async with aiohttp.ClientSession() as session, session.get(base + path) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_http_api_and_metrics_follow_the_tasks(node: AgentNode, zone_bed: ZoneBed) -> None:
    await node.start()
    assert (await get(node, "/health"))[0] == 200
    status, ready = await get(node, "/ready")
    assert status == 200, ready
    assert {name for name, check in ready["checks"].items() if check["ok"]} == {
        "broker",
        "zfs",
        "zones",
        "central",
    }
    _, before = await get(node, "/metrics")
    assert sample(before, "volagent_tasks_total", kind="volume.create", outcome="succeeded") == 0

    params = volume_params(zone_bed, "seen", 57)
    event = await node.run_task("volume.create", params)
    assert event["state"] == "succeeded"
    _, after = await get(node, "/metrics")
    assert sample(after, "volagent_tasks_total", kind="volume.create", outcome="succeeded") == 1
    assert sample(after, "volagent_volumes", state="ready") == 1
    assert sample(after, "volagent_zones", state="running") == 1
    assert sample(after, "volagent_pool_size_bytes") > 0

    _, volumes = await get(node, "/volumes")
    assert [v["uuid"] for v in volumes["volumes"]] == [params["uuid"]]
    _, one = await get(node, f"/volumes/{params['uuid']}")
    assert one["state"] == "ready"
    _, task = await get(node, f"/tasks/{event['task']}")
    assert (task["state"], task["kind"]) == ("succeeded", "volume.create")
    _, status_doc = await get(node, "/status")
    assert status_doc["volumes"]["total"] == 1
    assert status_doc["broker"]["connected"] is True


async def test_reports_reach_central_in_order_after_an_outage_and_an_agent_restart(
    node: AgentNode, zone_bed: ZoneBed, central: CentralServer
) -> None:
    await central.stop()  # central down from the start
    await node.start()
    params = volume_params(zone_bed, "told", 58)
    uuid = params["uuid"]
    assert (await node.run_task("volume.create", params))["state"] == "succeeded"
    await node.stop()  # the reports wait in the journal across the restart
    await node.start()
    resized = await node.run_task("volume.resize", {"uuid": uuid, "size_mib": 96})
    assert resized["state"] == "succeeded"
    await central.start()

    def delivered(requests: list[Any]) -> bool:
        taken = [
            r.json()["generation"] for r in requests if r.path == f"/volumes/{uuid}" and r.taken
        ]
        return resized["result"]["generation"] in taken

    await central.wait_until(delivered, timeout_s=60)
    generations = [r.json()["generation"] for r in central.taken() if r.path == f"/volumes/{uuid}"]
    assert generations == sorted(generations)
    assert len(set(generations)) == resized["result"]["generation"]  # none lost
    states = [r.json()["state"] for r in central.taken()]
    assert states[0] == "creating"
    assert "ready" in states
    await central.wait_until(lambda rs: any(r.path.endswith("/heartbeat") and r.taken for r in rs))
    beat = next(r for r in central.requests if r.path.endswith("/heartbeat") and r.taken).json()
    assert beat["volumes"] == 1
    assert beat["broker"] == "connected"


async def test_readiness_follows_the_broker(node: AgentNode, mosquitto: Mosquitto) -> None:
    await node.start()
    assert (await get(node, "/ready"))[0] == 200
    mosquitto.stop()
    async with asyncio.timeout(30):
        while (await get(node, "/ready"))[0] != 503:  # noqa: ASYNC110  # polls the agent over HTTP
            await asyncio.sleep(0.2)
    _, ready = await get(node, "/ready")
    assert ready["checks"]["broker"]["ok"] is False
    mosquitto.start()
    async with asyncio.timeout(60):
        while (await get(node, "/ready"))[0] != 200:  # noqa: ASYNC110  # polls the agent over HTTP
            await asyncio.sleep(0.2)
