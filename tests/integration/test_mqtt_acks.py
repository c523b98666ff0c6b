"""When the broker counts a task as delivered: proved with kill -9 against a real mosquitto.

The receiving side runs in a child process (this module run with ``-m``) so that it can be
SIGKILLed: no clean disconnect, no chance to send anything more. It writes one JSON line per
step to stdout.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import CLIENT_ID, OFFLINE, WAIT, mqtt_config, receive, running, until
from tests.support.mqtt import Mosquitto
from volagent.adapters.mqtt import MqttAdapter
from volagent.config import Config

pytestmark = pytest.mark.mqtt

ROOT = Path(__file__).resolve().parents[2]


def pubacks(broker: Mosquitto) -> list[int]:
    """The message ids of the PUBACKs the broker got from the agent, in order."""
    pattern = rf"Received PUBACK from {re.escape(CLIENT_ID)} \(Mid: (\d+)"
    return [int(mid) for mid in re.findall(pattern, broker.log.read_text())]


class Child:
    """A receiver in a child process; ``mode`` is ``hold``, ``ack`` or ``aiomqtt``."""

    def __init__(self, broker: Mosquitto, mode: str, stderr: Path) -> None:
        with stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.test_mqtt_acks", broker.url, mode],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
            )

    async def next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT):
            line = await asyncio.to_thread(self.proc.stdout.readline)
        assert line, f"the child exited {self.proc.poll()}"
        step: dict[str, Any] = json.loads(line)
        return step

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)


@pytest.fixture
def child(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Callable[[str], Child]]:
    made: list[Child] = []

    def make(mode: str) -> Child:
        made.append(Child(mosquitto, mode, tmp_path / "child.stderr"))
        return made[-1]

    yield make
    for c in made:
        if c.proc.poll() is None:
            c.kill()
        assert c.proc.stdout is not None
        c.proc.stdout.close()


async def test_plain_aiomqtt_acknowledges_before_the_consumer_has_the_message(
    mosquitto: Mosquitto, child: Callable[[str], Child]
) -> None:
    """Why the adapter exists: paho's automatic PUBACK goes out when aiomqtt queues."""
    config = mqtt_config(mosquitto.url)
    receiver = child("aiomqtt")
    assert await receiver.next() == {"step": "connected"}
    mosquitto.pub(config.tasks_topic, "task-1")
    assert await receiver.next() == {"step": "message", "payload": "task-1"}
    await until(lambda: pubacks(mosquitto) == [1])  # acknowledged, yet never processed
    receiver.kill()
    mosquitto.pub(config.tasks_topic, "marker")
    adapter = MqttAdapter(config)
    async with running(adapter):
        first = await receive(adapter)
        first.ack()
    assert first.payload == b"marker"  # task-1 is lost for good


async def test_killed_before_ack_the_broker_delivers_the_task_again(
    mosquitto: Mosquitto, child: Callable[[str], Child]
) -> None:
    config = mqtt_config(mosquitto.url)
    receiver = child("hold")
    assert await receiver.next() == {"step": "connected"}
    mosquitto.pub(config.tasks_topic, "task-1")
    assert await receiver.next() == {"step": "message", "payload": "task-1"}
    receiver.kill()
    assert pubacks(mosquitto) == []
    adapter = MqttAdapter(config)
    async with running(adapter):
        again = await receive(adapter)
        again.ack()
        await until(lambda: len(pubacks(mosquitto)) == 1)
    assert again.payload == b"task-1"
    # Acknowledged now: the next session starts with what comes next, not with task-1.
    mosquitto.pub(config.tasks_topic, "marker")
    adapter = MqttAdapter(config)
    async with running(adapter):
        after = await receive(adapter)
        after.ack()
    assert after.payload == b"marker"


async def test_killed_after_ack_the_task_is_not_delivered_again(
    mosquitto: Mosquitto, child: Callable[[str], Child]
) -> None:
    config = mqtt_config(mosquitto.url)
    receiver = child("ack")
    assert await receiver.next() == {"step": "connected"}
    mosquitto.pub(config.tasks_topic, "task-1")
    assert await receiver.next() == {"step": "message", "payload": "task-1"}
    assert await receiver.next() == {"step": "acked"}
    await until(lambda: pubacks(mosquitto) == [1])
    receiver.kill()
    mosquitto.pub(config.tasks_topic, "marker")
    adapter = MqttAdapter(config)
    async with running(adapter):
        first = await receive(adapter)
        first.ack()
    assert first.payload == b"marker"


async def test_kill_9_makes_the_broker_publish_the_offline_will(
    mosquitto: Mosquitto, child: Callable[[str], Child]
) -> None:
    config = mqtt_config(mosquitto.url)
    receiver = child("hold")
    assert await receiver.next() == {"step": "connected"}
    assert json.loads(mosquitto.sub(config.status_topic, count=1)[0])["state"] == "online"
    receiver.kill()
    await until(lambda: mosquitto.sub(config.status_topic, count=1) == [OFFLINE])
    assert mosquitto.sub(config.status_topic, count=1) == [OFFLINE]  # retained


async def test_acks_are_sent_in_arrival_order(mosquitto: Mosquitto) -> None:
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(config, receive_maximum=4)
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        for n in range(3):
            mosquitto.pub(config.tasks_topic, f"task-{n}")
        messages = [await receive(adapter) for _ in range(3)]
        messages[2].ack()
        messages[1].ack()
        messages[1].ack()  # twice: still one PUBACK
        await asyncio.sleep(0.5)
        held = pubacks(mosquitto)
        messages[0].ack()
        await until(lambda: len(pubacks(mosquitto)) == 3)
        await asyncio.sleep(0.2)
    assert [m.payload for m in messages] == [b"task-0", b"task-1", b"task-2"]
    assert held == []
    assert pubacks(mosquitto) == [1, 2, 3]


async def test_unacknowledged_tasks_are_held_back_by_the_broker(mosquitto: Mosquitto) -> None:
    """Backpressure: with no PUBACK the broker stops after Receive Maximum messages."""
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(config, receive_maximum=3)
    tasks = [f"task-{n}" for n in range(10)]
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        for task in tasks:
            mosquitto.pub(config.tasks_topic, task)
        window = [await receive(adapter) for _ in range(3)]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await adapter.receive()
        sent = mosquitto.log.read_text().count(f"Sending PUBLISH to {CLIENT_ID} (d0, q1")
        received = list(window)
        for message in window:
            message.ack()
        while len(received) < len(tasks):
            message = await receive(adapter)
            message.ack()
            received.append(message)
    assert sent == 3
    assert [m.payload.decode() for m in received] == tasks


async def test_an_ack_after_the_connection_is_gone_is_dropped_and_the_task_comes_again(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        mosquitto.pub(config.tasks_topic, "task-1")
        stale = await receive(adapter)
        await asyncio.to_thread(mosquitto.restart)
        await until(lambda: adapter.state.connects == 2)
        stale.ack()  # belongs to connection 1: nothing is sent
        again = await receive(adapter)
        again.ack()
        await until(lambda: len(pubacks(mosquitto)) == 1)
    assert (stale.connection, again.connection) == (1, 2)
    assert again.payload == b"task-1"


# ---------------------------------------------------------------------------- the child


async def _child(url: str, mode: str) -> None:
    def say(**step: str) -> None:
        sys.stdout.write(json.dumps(step) + "\n")
        sys.stdout.flush()

    config = mqtt_config(url)
    if mode == "aiomqtt":
        await _plain_aiomqtt(config, say)
        return
    adapter = MqttAdapter(config)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(adapter.run(), name="volagent.mqtt")
        await adapter.wait_connected(WAIT)
        say(step="connected")
        async for message in adapter.messages():
            say(step="message", payload=message.payload.decode())
            if mode == "ack":
                message.ack()
                say(step="acked")


async def _plain_aiomqtt(config: Config, say: Callable[..., None]) -> None:
    """aiomqtt as documented: persistent MQTT 5 session, QoS 1, automatic acknowledgement."""
    import aiomqtt  # noqa: PLC0415  # only the child needs the raw client
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415  # likewise
    from paho.mqtt.properties import Properties  # noqa: PLC0415  # likewise

    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
    properties.SessionExpiryInterval = 3600
    client = aiomqtt.Client(
        config.mqtt.host,
        config.mqtt.port,
        identifier=config.client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )
    async with client:
        await client.subscribe(config.tasks_topic, qos=1)
        say(step="connected")
        async for message in client.messages:
            say(step="message", payload=message.payload.decode())


if __name__ == "__main__":
    from volagent import log

    log.configure(level="debug", fmt="json", stream=sys.stderr)
    asyncio.run(_child(sys.argv[1], sys.argv[2]))
