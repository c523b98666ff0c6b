"""Driving the agent's MQTT adapter from tests: its config for a broker, running it, waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from volagent.adapters.mqtt import Incoming, MqttAdapter
from volagent.config import Config

#: The compute node the tests' agent is; every test has a broker of its own, so one is enough.
CN = "0b6f3c6e-5c4e-4c0a-9d5e-3f1f8a2b7c10"
CLIENT_ID = f"volagent-{CN}"
OFFLINE = f'{{"v":1,"cn":"{CN}","state":"offline"}}'
WAIT = 30  # seconds: only to turn a hang into a failure


def mqtt_config(url: str, *, limits: dict[str, int] | None = None, **mqtt: Any) -> Config:
    """A valid agent config for the broker at ``url``; ``mqtt`` adds or overrides [mqtt] keys."""
    return Config.model_validate(
        {
            "node": {"uuid": CN},
            "storage": {"dataset_root": "tank/volumes"},
            "mqtt": {"url": url, **mqtt},
            "limits": limits or {},
        }
    )


@contextlib.asynccontextmanager
async def running(adapter: MqttAdapter) -> AsyncIterator[asyncio.Task[None]]:
    """Run the adapter as the daemon does (a task of a TaskGroup); stop it cleanly after."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(adapter.run(), name="volagent.mqtt")
        try:
            yield task
        finally:
            adapter.stop()


async def receive(adapter: MqttAdapter) -> Incoming:
    """The next incoming message, or a failure after ``WAIT`` seconds."""
    async with asyncio.timeout(WAIT):
        return await adapter.receive()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds, or fail after ``WAIT`` seconds."""
    async with asyncio.timeout(WAIT):
        while not predicate():  # noqa: ASYNC110  # polls state observed from outside the adapter
            await asyncio.sleep(0.05)
