"""A tiny MQTT client for the benchmarks: publish a request, wait for its reply, time the trip.

The same client drives the agent (a task in, its terminal event out) and the raw echo (a
message in, the same bytes back), so both are measured the same way: from just before the
QoS 1 publish to the moment the reply is read off the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import aiomqtt

from tests.support.node import task_message

#: Only to turn a hang into an error.
CALL_TIMEOUT_S: Final = 120.0
#: Outgoing QoS 1 messages in flight at once (paho's default of 20 would queue a load of 32).
MAX_INFLIGHT: Final = 1000

#: Picks the key of a reply (a task id), or None for a message that answers nothing.
KeyOf = Callable[[dict[str, Any]], "str | None"]


def client(port: int, role: str) -> aiomqtt.Client:
    """An MQTT client of the broker on ``port``: no Nagle delay, no warning about a busy queue."""
    made = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"{role}-{uuid.uuid4()}",
        max_inflight_messages=MAX_INFLIGHT,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    made.pending_calls_threshold = MAX_INFLIGHT
    return made


def terminal_event(doc: dict[str, Any]) -> str | None:
    """The task id of a terminal event (``succeeded``/``failed``); None for other events."""
    if doc.get("state") in ("succeeded", "failed"):
        task: str | None = doc.get("task")
        return task
    return None


def echoed(doc: dict[str, Any]) -> str | None:
    """The id of an echoed task message."""
    key: str | None = doc.get("id")
    return key


class Exchange:
    """One MQTT connection that publishes requests and matches replies to them by key."""

    def __init__(self, port: int, reply_topic: str, key_of: KeyOf) -> None:
        """Replies arrive on ``reply_topic``; ``key_of`` tells which request each answers."""
        self._client = client(port, "vbload")
        self._reply_topic = reply_topic
        self._key_of = key_of
        self._pending: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Exchange:
        """Connect, subscribe to the replies and start reading them."""
        await self._client.__aenter__()
        await self._client.subscribe(self._reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read(), name="replies")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop reading and disconnect."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            arrived = time.perf_counter()
            try:
                doc = json.loads(message.payload)
            except ValueError:
                continue
            key = self._key_of(doc) if isinstance(doc, dict) else None
            future = self._pending.get(key) if key is not None else None
            if future is not None and not future.done():
                future.set_result((arrived, doc))

    async def call(
        self,
        topic: str,
        payload: str,
        key: str,
        *,
        timeout: float = CALL_TIMEOUT_S,  # noqa: ASYNC109  # a hang guard per call
    ) -> tuple[float, dict[str, Any]]:
        """Publish ``payload`` and wait for the reply keyed ``key``; seconds taken, the reply."""
        future: asyncio.Future[tuple[float, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[key] = future
        try:
            began = time.perf_counter()
            await self._client.publish(topic, payload, qos=1)
            async with asyncio.timeout(timeout):
                arrived, doc = await future
        except TimeoutError:
            msg = f"no reply to {key} within {timeout:g} s"
            raise RuntimeError(msg) from None
        finally:
            self._pending.pop(key, None)
        return arrived - began, doc


@dataclass(frozen=True)
class Sample:
    """Round trips of one load run and how long the run took."""

    latencies: list[float]
    wall_s: float
    failures: int

    @property
    def throughput(self) -> float:
        """Requests answered per second."""
        return len(self.latencies) / self.wall_s


async def task(
    ex: Exchange, topic: str, kind: str, params: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Run one task through the agent; seconds to its terminal event, and that event."""
    task_id, text = task_message(kind, params)
    return await ex.call(topic, text, task_id)


async def succeed(
    ex: Exchange, topic: str, kind: str, params: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """As :func:`task`, raising when the task failed."""
    seconds, event = await task(ex, topic, kind, params)
    if event["state"] != "succeeded":
        msg = f"{kind} failed: {event.get('error')}"
        raise RuntimeError(msg)
    return seconds, event


async def load(
    ex: Exchange,
    topic: str,
    messages: Callable[[int], tuple[str, str]],
    *,
    count: int,
    concurrency: int,
    ok: Callable[[dict[str, Any]], bool],
) -> Sample:
    """Send ``count`` requests (``messages(i)`` gives key and text), ``concurrency`` at a time."""
    numbers = itertools.count()
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while (i := next(numbers)) < count:
            key, text = messages(i)
            seconds, reply = await ex.call(topic, text, key)
            latencies.append(seconds)
            failures += not ok(reply)

    began = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return Sample(latencies, time.perf_counter() - began, failures)
