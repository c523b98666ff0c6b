"""The ``volagent`` command line against a real agent, a real broker and the real host.

Each command runs as a process of its own (``python -m volagent``); the agent runs in this
process, so the commands are run from a thread and the agent's event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import MQTT_USER
from tests.support.agent import CN
from tests.support.central import CentralServer
from tests.support.mqtt import Mosquitto, free_port
from tests.support.node import WAIT, AgentNode, EventLog, volume_params
from tests.support.zones import NETWORK, ZoneBed
from volagent import __version__

pytestmark = [pytest.mark.mqtt]

_F = TypeVar("_F", bound=Callable[..., Any])


def needs_node(test: _F) -> _F:
    """Mark a test that runs an agent on the test pool, bridge and zones."""
    for mark in (pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns):
        test = mark(test)
    return test


async def volagent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``volagent ARGS --config CONFIG`` to its end (from a thread)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLAGENT_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "volagent", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3 * WAIT,
        check=False,
    )


def result_json(stdout: str) -> Any:
    """The indented JSON that ends the output of ``task submit --follow``."""
    return json.loads(stdout[stdout.index("\n{") + 1 :])


def sections(stdout: str) -> list[dict[str, list[str]]]:
    """The blocks of the status table: rows by first cell, cells split on 2+ spaces."""
    blocks = []
    for block in stdout.strip("\n").split("\n\n"):
        table = {}
        for line in block.splitlines():
            cells = [c.strip() for c in line.split("  ") if c.strip()]
            table[cells[0]] = cells[1:]
        blocks.append(table)
    return blocks


# ---------------------------------------------------------------- status


@needs_node
async def test_status_table_and_json_describe_the_running_agent(
    node: AgentNode, mosquitto: Mosquitto
) -> None:
    agent = await node.start()
    config = node.config_file()

    table = await volagent(config, "status")
    assert table.returncode == 0, table
    header, summary, checks, counts = sections(table.stdout)
    assert header == {f"volagent {__version__} on node {CN}": []}
    assert summary["broker"] == ["connected (0 reconnect(s))"]
    assert summary["ready"] == ["yes"]
    assert summary["uptime"][0].endswith("s")
    assert checks.pop("CHECK") == ["STATE", "DETAIL"]
    assert set(checks) == {"broker", "zfs", "zones", "central"}
    assert {state for state, *_ in checks.values()} == {"ok"}
    assert checks["broker"] == ["ok", "connected"]
    assert set(counts) == {"tasks", "volumes"}
    assert counts["volumes"][:2] == ["total 0", "creating 0"]
    assert "ready 0" in counts["volumes"]

    as_json = await volagent(config, "status", "--json")
    assert as_json.returncode == 0, as_json
    document = json.loads(as_json.stdout)
    assert set(document) == {"status", "ready"}
    assert document["status"]["cn"] == CN
    assert document["status"]["version"] == __version__
    assert document["status"]["broker"]["connected"] is True
    assert document["status"]["volumes"]["total"] == 0
    assert document["ready"]["ready"] is True
    assert set(document["ready"]["checks"]) == {"broker", "zfs", "zones", "central"}

    mosquitto.stop()
    try:
        async with asyncio.timeout(WAIT):
            while agent.mqtt.connected:  # noqa: ASYNC110  # the adapter notices on its own time
                await asyncio.sleep(0.05)
        down = await volagent(config, "status")
        assert down.returncode == 0, down
        _, summary, checks, _ = sections(down.stdout)
        assert summary["ready"] == ["NO"]
        assert summary["broker"][0].startswith("DISCONNECTED: ")
        assert checks["broker"][0] == "FAIL"
        down_json = await volagent(config, "status", "--json")
        assert json.loads(down_json.stdout)["ready"]["checks"]["broker"]["ok"] is False
    finally:
        mosquitto.start()


@needs_node
async def test_status_over_a_unix_socket_and_without_an_agent(
    node: AgentNode, tmp_path: Path
) -> None:
    socket = tmp_path / "http.sock"
    node.overrides = {"http": {"listen": f"unix:{socket}"}}
    config = node.config_file()

    absent = await volagent(config, "status")
    assert absent.returncode == 1
    assert absent.stdout == ""
    assert f"the agent's HTTP API at unix:{socket} is not reachable" in absent.stderr
    assert "is the agent running" in absent.stderr

    await node.start()
    present = await volagent(config, "status", "--json")
    assert present.returncode == 0, present
    assert json.loads(present.stdout)["status"]["cn"] == CN


# ---------------------------------------------------------------- task submit


@needs_node
async def test_volume_list_follow_prints_the_events_and_the_pool(node: AgentNode) -> None:
    await node.start()
    done = await volagent(node.config_file(), "task", "submit", "volume.list", "--follow")
    assert done.returncode == 0, done
    states = [line.split()[1] for line in done.stdout.splitlines() if line[:2].isdigit()]
    assert states == ["accepted", "running", "succeeded"]
    result = result_json(done.stdout)
    assert result["volumes"] == []
    assert result["pool"]["size_bytes"] > 0
    assert 0 < result["pool"]["free_bytes"] <= result["pool"]["size_bytes"]


@needs_node
async def test_volume_get_of_an_unknown_volume_exits_1_with_the_error(node: AgentNode) -> None:
    await node.start()
    missing = str(uuid.uuid4())
    done = await volagent(
        node.config_file(), "task", "submit", "volume.get", "--param", f"uuid={missing}", "--follow"
    )
    assert done.returncode == 1, done
    failed = [line for line in done.stdout.splitlines() if " failed " in line]
    assert len(failed) == 1
    assert "VolumeNotFound" in failed[0]
    error = result_json(done.stdout)
    assert error["code"] == "VolumeNotFound"
    assert error["retryable"] is False


@needs_node
async def test_volume_create_follow_shows_progress_then_delete_prints_the_task_id(
    node: AgentNode, zone_bed: ZoneBed
) -> None:
    await node.start()
    assert node.events is not None
    config = node.config_file()
    volume = volume_params(zone_bed, "cli", 70)
    nic = volume["nic"]
    params = [
        f"uuid={volume['uuid']}",
        "name=cli",
        f"owner_uuid={volume['owner_uuid']}",
        "size_mib=64",
        f"nic.ip={nic['ip']}",
        f"nic.prefix={nic['prefix']}",
        f"nic.network={NETWORK}",
        "labels.made_by=cli",
    ]
    created = await volagent(
        config,
        "task",
        "submit",
        "volume.create",
        *[arg for param in params for arg in ("--param", param)],
        "--deadline-s",
        "300",
        "--follow",
    )
    assert created.returncode == 0, created
    progress = [
        line.split(None, 2)[2] for line in created.stdout.splitlines() if " progress " in line
    ]
    assert progress[0] == "dataset 0/2"
    assert progress[-1] == "zone 2/2"
    assert "[" not in created.stdout.split("\n{")[0]  # no bar: the output is not a terminal
    volume_object = result_json(created.stdout)
    assert volume_object["uuid"] == volume["uuid"]
    assert volume_object["state"] == "ready"
    assert volume_object["labels"] == {"made_by": "cli"}

    task_id = str(uuid.uuid4())
    deleted = await volagent(
        config,
        "task",
        "submit",
        "volume.delete",
        "--param",
        f"uuid={volume['uuid']}",
        "--param",
        "force=true",
        "--id",
        task_id,
    )
    assert deleted.returncode == 0, deleted
    assert deleted.stdout == f"{task_id}\n"
    terminal = await node.events.terminal(task_id)
    assert terminal["state"] == "succeeded", terminal
    assert terminal["result"] == {
        "uuid": volume["uuid"],
        "state": "deleted",
        "already_absent": False,
    }


def broker_only_config(tmp_path: Path, broker: Mosquitto, mqtt: str = "") -> Path:
    """A configuration for ``broker`` alone (``mqtt``: more lines of the [mqtt] table)."""
    config = tmp_path / "volagent.toml"
    config.write_text(
        f'[node]\nuuid = "{CN}"\n[storage]\ndataset_root = "tank/volumes"\n'
        f'[mqtt]\nurl = "{broker.url}"\n{mqtt}\n'
        f'[http]\nlisten = "127.0.0.1:{free_port()}"\n',
        encoding="utf-8",
    )
    return config


async def test_follow_gives_up_after_the_timeout_when_no_agent_answers(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = broker_only_config(tmp_path, mosquitto)
    tasks = EventLog(mosquitto, f"volagent/v1/cn/{CN}/tasks")
    try:
        task_id = str(uuid.uuid4())
        args = ("task", "submit", "volume.list", "--id", task_id, "--follow", "--timeout", "2")
        done = await volagent(config, *args)
        assert done.returncode == 1, done
        assert f"task {task_id} did not finish within 2 s" in done.stderr
        async with asyncio.timeout(WAIT):
            while not (sent := [m for m in map(json.loads, tasks.raw) if "id" in m]):  # noqa: ASYNC110  # lines arrive from mosquitto_sub
                await asyncio.sleep(0.05)
        message = sent[0]
        assert message["id"] == task_id
        assert message["kind"] == "volume.list"
        assert message["cn"] == CN
        assert message["params"] == {}
    finally:
        tasks.close()


async def test_submit_and_doctor_use_the_agents_broker_credentials(
    mosquitto_auth: Mosquitto, tmp_path: Path
) -> None:
    ((user, password),) = MQTT_USER.items()
    secret = tmp_path / "mqtt.password"
    secret.write_text(password + "\n", encoding="utf-8")
    mqtt = f'username = "{user}"\npassword_file = "{secret}"'
    config = broker_only_config(tmp_path, mosquitto_auth, mqtt)

    submitted = await volagent(config, "task", "submit", "volume.list", "--timeout", "20")
    assert submitted.returncode == 0, submitted
    assert str(uuid.UUID(submitted.stdout.strip())) == submitted.stdout.strip()
    doctor = await volagent(config, "doctor")
    assert findings(doctor.stdout)["broker"] == "OK", doctor.stdout

    secret.write_text("wrong\n", encoding="utf-8")
    refused = await volagent(config, "task", "submit", "volume.list", "--timeout", "20")
    assert refused.returncode == 1
    assert "the task was not published" in refused.stderr
    doctor = await volagent(config, "doctor")
    assert doctor.returncode == 1
    assert findings(doctor.stdout)["broker"] == "FAIL"
    assert "fix: check mqtt.username and mqtt.password_file" in doctor.stdout


# ---------------------------------------------------------------- doctor


def findings(stdout: str) -> dict[str, str]:
    """Each check's level, by check name."""
    levels = {}
    for line in stdout.splitlines():
        level, _, rest = line.partition("  ")
        if level in {"OK", "WARN", "FAIL"}:
            levels[rest.strip().split("  ")[0]] = level.strip()
    return levels


@needs_node
async def test_doctor_passes_on_the_healthy_node(node: AgentNode) -> None:
    async with CentralServer() as central:
        node.overrides["central"] = {"url": central.url}
        agent = await node.start()
        done = await volagent(node.config_file(), "doctor")
        assert done.returncode == 0, done
        levels = findings(done.stdout)
        assert set(levels) >= {
            "config",
            "zfs",
            "zpool",
            "zpool list",
            "pool",
            "ganesha",
            "rpcbind",
            f"bridge {NETWORK}",
            "state dir",
            "broker",
            "central",
            "agent",
        }
        assert set(levels.values()) == {"OK"}, done.stdout
        assert done.stdout.endswith("all checks passed\n")
        assert f"accepted volagent-doctor-{CN}" in done.stdout
        assert "answered HTTP 404" in done.stdout  # any answer counts as reachable
        assert agent.mqtt.state.connects == 1  # the doctor did not take the agent's session


@needs_node
async def test_doctor_fails_with_hints_for_a_wrong_bridge_and_an_unreachable_central(
    node: AgentNode,
) -> None:
    node.overrides["networks"] = {NETWORK: {"bridge": "vtnosuchbr0"}}
    node.overrides["central"] = {"url": f"http://127.0.0.1:{free_port()}"}
    done = await volagent(node.config_file(), "doctor")
    assert done.returncode == 1, done
    levels = findings(done.stdout)
    assert levels[f"bridge {NETWORK}"] == "FAIL"
    assert levels["central"] == "FAIL"
    assert "Connection refused" in done.stdout
    assert levels["agent"] == "WARN"  # not running: a warning only
    assert levels["broker"] == "OK"
    assert levels["pool"] == "OK"
    lines = done.stdout.splitlines()
    bridge = next(i for i, line in enumerate(lines) if line.startswith(f"FAIL  bridge {NETWORK}"))
    assert "vtnosuchbr0: no such interface" in lines[bridge]
    assert "fix: create it (ip link add vtnosuchbr0 type bridge" in lines[bridge + 1]
    assert lines[-1] == "2 of 12 checks failed, 1 warning(s)"
