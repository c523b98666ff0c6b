"""The MQTT adapter against a real mosquitto: session, subscription, events, status, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import Iterator

import pytest

from tests.support.agent import CN, OFFLINE, WAIT, mqtt_config, receive, running, until
from tests.support.mqtt import Mosquitto
from volagent.adapters.mqtt import BrokerState, BrokerUnavailable, MqttAdapter
from volagent.config import Config

pytestmark = pytest.mark.mqtt


def status(broker: Mosquitto, config: Config) -> str:
    """The retained status document right now."""
    return broker.sub(config.status_topic, count=1)[0]


async def test_connects_subscribes_and_hands_over_tasks(mosquitto: Mosquitto) -> None:
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(config)
    async with running(adapter):
        await adapter.wait_connected(15)
        assert adapter.connected
        mosquitto.pub(config.tasks_topic, '{"v":1,"id":"t-1"}')
        message = await receive(adapter)
        message.ack()
        state = adapter.state
    assert message.topic == f"volagent/v1/cn/{CN}/tasks"
    assert message.payload == b'{"v":1,"id":"t-1"}'
    assert (message.qos, message.retain, message.oversize, message.connection) == (
        1,
        False,
        False,
        1,
    )
    assert (state.connected, state.connects, state.reconnects, state.received) == (True, 1, 0, 1)
    assert state.failed_attempts == 0
    assert adapter.state.connected is False
    assert "volagent-" + CN in mosquitto.log.read_text()


async def test_status_is_retained_online_and_offline_after_a_clean_stop(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(config)
    async with running(adapter) as task:
        await adapter.wait_connected(15)
        online = json.loads(status(mosquitto, config))
    assert task.done()
    assert online["v"] == 1
    assert online["cn"] == CN
    assert online["state"] == "online"
    assert set(online) == {"v", "cn", "state", "agent_version", "since"}
    assert status(mosquitto, config) == OFFLINE


async def test_a_custom_online_document_is_published_on_connect(mosquitto: Mosquitto) -> None:
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(
        config, online_status=lambda: {"v": 1, "cn": CN, "state": "online", "x": 7}
    )
    async with running(adapter):
        await adapter.wait_connected(15)
        assert json.loads(status(mosquitto, config)) == {
            "v": 1,
            "cn": CN,
            "state": "online",
            "x": 7,
        }


async def test_events_are_published_at_qos_1_in_order(mosquitto: Mosquitto) -> None:
    config = mqtt_config(mosquitto.url)
    mosquitto.open_session(config.events_topic, "observer")
    adapter = MqttAdapter(config)
    events = [json.dumps({"v": 1, "task": "t-1", "seq": seq}).encode() for seq in range(1, 4)]
    async with running(adapter):
        for event in events:
            await adapter.publish_event(event, timeout=15)
    seen = mosquitto.sub(config.events_topic, count=3, session="observer")
    assert [line.encode() for line in seen] == events
    assert f"Received PUBLISH from volagent-{CN} (d0, q1" in mosquitto.log.read_text()


async def test_publish_event_waits_for_a_connection_and_is_confirmed_after_it(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url)
    mosquitto.open_session(config.events_topic, "observer")
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter):
        await adapter.wait_connected(15)
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: not adapter.connected)
        publishing = asyncio.create_task(adapter.publish_event(b'{"seq":1}', timeout=60))
        await asyncio.sleep(0.5)
        assert not publishing.done()
        await asyncio.to_thread(mosquitto.start)
        async with asyncio.timeout(60):
            await publishing
    assert mosquitto.sub(config.events_topic, count=1, session="observer") == ['{"seq":1}']


async def test_publish_event_without_a_broker_raises_broker_unavailable(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url)
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter):
        await adapter.wait_connected(15)
        await asyncio.to_thread(mosquitto.stop)
        with pytest.raises(BrokerUnavailable, match="no PUBACK") as caught:
            await adapter.publish_event(b"{}", timeout=1)
        assert caught.value.retryable
        assert caught.value.code == "BrokerUnavailable"
        with pytest.raises(BrokerUnavailable, match="not connected"):
            await adapter.wait_connected(0.5)


async def test_tasks_published_while_the_agent_is_down_arrive_when_it_returns(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url)
    first = MqttAdapter(config)
    async with running(first):
        await first.wait_connected(15)
    tasks = [f'{{"id":"t-{n}"}}' for n in range(3)]
    for task in tasks:
        mosquitto.pub(config.tasks_topic, task)
    mosquitto.restart()  # the queued tasks survive in the broker's persistence file
    second = MqttAdapter(config)
    async with running(second):
        received = [await receive(second) for _ in tasks]
        for message in received:
            message.ack()
        assert second.state.session_present is True
    assert [m.payload.decode() for m in received] == tasks


async def test_after_a_broker_restart_it_reconnects_and_subscribes_again(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url)
    states: list[BrokerState] = []
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=1, on_state=states.append)
    async with running(adapter):
        await adapter.wait_connected(15)
        await asyncio.to_thread(mosquitto.stop)
        # Forget every session, so only a new SUBSCRIBE can bring the next task.
        database = mosquitto.dir / "mosquitto.db"
        assert database.exists()
        database.unlink()
        await until(lambda: not adapter.connected)
        await asyncio.sleep(1)  # a few attempts fail while the broker is away
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: adapter.state.connects == 2)
        mosquitto.pub(config.tasks_topic, '{"id":"after-restart"}')
        message = await receive(adapter)
        message.ack()
        assert json.loads(status(mosquitto, config))["state"] == "online"
        state = adapter.state
    assert message.payload == b'{"id":"after-restart"}'
    assert message.connection == 2
    assert (state.connected, state.connects, state.reconnects) == (True, 2, 1)
    assert state.session_present is False
    assert state.failed_attempts >= 1
    assert state.last_error
    assert [s.connected for s in states][:3] == [True, False, False]
    assert any(s.connected and s.connects == 2 for s in states)


async def test_oversize_payloads_are_marked_and_oversize_packets_never_arrive(
    mosquitto: Mosquitto,
) -> None:
    config = mqtt_config(mosquitto.url, limits={"max_task_bytes": 1000})
    adapter = MqttAdapter(config, max_packet_bytes=4096)
    big = '{"id":"t-big","pad":"' + "x" * 1500 + '"}'
    async with running(adapter):
        await adapter.wait_connected(15)
        mosquitto.pub(config.tasks_topic, big)
        mosquitto.pub(config.tasks_topic, "y" * 10_000)  # over the packet cap: the broker drops it
        mosquitto.pub(config.tasks_topic, '{"id":"t-small"}')
        oversize = await receive(adapter)
        oversize.ack()
        small = await receive(adapter)
        small.ack()
    assert oversize.oversize
    assert oversize.payload == big.encode()
    assert not small.oversize
    assert small.payload == b'{"id":"t-small"}'
    assert f"Dropping too large outgoing PUBLISH for volagent-{CN}" in mosquitto.log.read_text()


async def test_stop_before_any_connection_returns_promptly(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    adapter = MqttAdapter(mqtt_config(mosquitto.url), retry_base_s=5, retry_cap_s=5)
    async with running(adapter) as task:
        await until(lambda: adapter.state.failed_attempts >= 1)
        assert not task.done()
    assert adapter.state.connects == 0
    assert "Connection refused" in (adapter.state.last_error or "")


async def test_a_broker_that_never_answers_times_out_and_its_socket_is_closed() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        adapter = MqttAdapter(
            mqtt_config(f"mqtt://127.0.0.1:{port}"), op_timeout_s=0.5, retry_base_s=0.1
        )
        async with running(adapter) as task:
            first, _ = await asyncio.to_thread(server.accept)
            with first:
                first.settimeout(WAIT)
                connect = await asyncio.to_thread(first.recv, 1)
                assert connect == b"\x10"  # the first byte of a CONNECT packet, left unanswered
                await until(lambda: adapter.state.failed_attempts >= 2)
                assert not task.done()
                assert await asyncio.to_thread(_drain, first) == b""  # closed by the agent
    assert adapter.state.last_error == "the broker did not answer in time"


def _drain(sock: socket.socket) -> bytes:
    """Read until the peer closes; return the last read (b"" at EOF)."""
    while chunk := sock.recv(4096):
        pass
    return chunk


@contextlib.contextmanager
def frozen(broker: Mosquitto) -> Iterator[None]:
    """SIGSTOP the broker: its sockets stay open but nothing is answered."""
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        broker.proc.send_signal(signal.SIGCONT)


async def test_publish_event_returns_only_after_the_puback(mosquitto: Mosquitto) -> None:
    config = mqtt_config(mosquitto.url)
    mosquitto.open_session(config.events_topic, "observer")
    adapter = MqttAdapter(config)
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        with frozen(mosquitto), pytest.raises(BrokerUnavailable, match="no PUBACK"):
            await adapter.publish_event(b'{"seq":1}', timeout=1)
        await adapter.publish_event(b'{"seq":2}', timeout=WAIT)
    # The frozen broker read the first event late; at least once means it may still arrive.
    seen = mosquitto.sub(config.events_topic, count=2, session="observer")
    assert seen == ['{"seq":1}', '{"seq":2}']


async def test_a_silent_broker_is_found_out_by_keepalive_and_left(mosquitto: Mosquitto) -> None:
    config = mqtt_config(mosquitto.url, keepalive_s=1)
    adapter = MqttAdapter(config, op_timeout_s=2, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        with frozen(mosquitto):
            await until(lambda: not adapter.connected)
        await until(lambda: adapter.state.connects == 2)
        mosquitto.pub(config.tasks_topic, '{"id":"t-1"}')
        message = await receive(adapter)
        message.ack()
        assert json.loads(status(mosquitto, config))["state"] == "online"
    assert message.connection == 2
