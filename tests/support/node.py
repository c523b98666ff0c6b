"""A whole node under test: the agent wired to a real broker, pool, bridge and zones.

Tasks go in with the real ``mosquitto_pub``; events come out through a real ``mosquitto_sub``
that runs for the whole test (:class:`EventLog`). The agent runs in-process
(:meth:`AgentNode.start`) or as its own ``volagent run`` process (:meth:`AgentNode.spawn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.agent import CN
from tests.support.mqtt import Mosquitto
from tests.support.net import Namespace
from tests.support.zones import NETWORK, ZoneBed
from volagent.config import Config
from volagent.daemon import Agent

WAIT = 60.0  # seconds: only to turn a hang into a failure
OWNER = "6d1f8d8c-3b0e-4f4a-8a57-2c9e0c3f0001"


def now_iso() -> str:
    """The current time as the protocol writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def task_message(
    kind: str, params: dict[str, Any], *, task_id: str | None = None, **extra: Any
) -> tuple[str, str]:
    """A task message of ``kind``; its id and JSON text."""
    task_id = task_id or str(uuidlib.uuid4())
    body = {"v": 1, "id": task_id, "kind": kind, "cn": CN, "created": now_iso(), "params": params}
    body.update(extra)
    return task_id, json.dumps(body)


class EventLog:
    """Every message on the events topic, read by a real ``mosquitto_sub`` (raw bytes kept).

    With ``session`` (a client id) the subscriber keeps a persistent session (``-c -i``, QoS
    1): whatever is published on the topic while it is away (the broker stopped, the
    subscriber stopped) is queued for it by the broker, persistence included, and
    :meth:`resubscribe` starts a new subscriber on the same session, which receives it all.
    """

    def __init__(self, broker: Mosquitto, topic: str, *, session: str | None = None) -> None:
        self._broker, self._topic, self._session = broker, topic, session
        self.raw: list[bytes] = []
        self._lock = threading.Lock()
        self._probes = itertools.count()
        self._proc, self._reader = self._subscribe()
        self._wait_subscribed()

    def _subscribe(self) -> tuple[subprocess.Popen[bytes], threading.Thread]:
        """Start a subscriber and the thread that collects its lines."""
        argv = ["mosquitto_sub", "-p", str(self._broker.port), "-h", "127.0.0.1", "-q", "1"]
        argv += ["-t", self._topic]
        if self._session is not None:
            argv += ["-c", "-i", self._session]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        reader = threading.Thread(target=self._collect, args=(proc,), daemon=True)
        reader.start()
        return proc, reader

    def _wait_subscribed(self) -> None:
        """Publish probes until one comes back: from then on no event can be missed.

        On a persistent session the probe comes after everything the broker had queued for
        it, so once it is back all of that has been received too.
        """
        deadline = time.monotonic() + WAIT
        while True:
            probe = json.dumps({"probe": next(self._probes)}).encode()
            self._broker.pub(self._topic, probe.decode())
            until = time.monotonic() + 0.5
            while time.monotonic() < until:
                with self._lock:
                    if probe in self.raw:
                        return
                time.sleep(0.01)
            if time.monotonic() > deadline:
                msg = f"mosquitto_sub on {self._topic} never received a probe"
                raise AssertionError(msg)

    def _collect(self, proc: subprocess.Popen[bytes]) -> None:
        """Collect one subscriber's lines until it ends."""
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.raw.append(line.rstrip(b"\n"))

    def resubscribe(self) -> None:
        """Replace the subscriber by a new one on the same persistent session.

        For after a broker restart: the old subscriber is stopped (what it printed is kept)
        and the new one receives what the broker queued for the session meanwhile.
        """
        assert self._session is not None, "only a session log can resubscribe"
        self._stop_subscriber()
        self._proc, self._reader = self._subscribe()
        self._wait_subscribed()

    def _stop_subscriber(self) -> None:
        """Stop the subscriber and wait until its lines are all collected."""
        self._proc.kill()
        self._proc.wait()
        self._reader.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Decoded events (of one task), in arrival order; probes left out."""
        with self._lock:
            lines = list(self.raw)
        out = []
        for line in lines:
            event = json.loads(line)
            if "task" in event and (task_id is None or event["task"] == task_id):
                out.append(event)
        return out

    def terminal_raw(self, task_id: str) -> list[bytes]:
        """The exact bytes of every terminal event of ``task_id`` received."""
        with self._lock:
            lines = list(self.raw)
        return [
            line
            for line in lines
            if (e := json.loads(line)).get("task") == task_id
            and e["state"] in ("succeeded", "failed")
        ]

    async def terminal(self, task_id: str, *, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109  # a hang guard per call
        """The task's first terminal event, waiting for it."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events(task_id):
                    if event["state"] in ("succeeded", "failed"):
                        return event
                await asyncio.sleep(0.05)

    async def seen(self, task_id: str, state: str, *, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109  # a hang guard per call
        """The task's first event in ``state``."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events(task_id):
                    if event["state"] == state:
                        return event
                await asyncio.sleep(0.02)

    def close(self) -> None:
        """Stop the subscriber."""
        self._stop_subscriber()


def config_toml(data: Mapping[str, Any]) -> str:
    """Agent configuration data (sections of scalars and lists, ``networks`` by name) as TOML."""
    lines: list[str] = []
    for section, values in data.items():
        if section == "networks":
            for name, net in values.items():
                lines.append(f"[networks.{name}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in net.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class AgentNode:
    """A node for tests: config, agent (in-process or a process), task submission, events."""

    broker: Mosquitto
    bed: ZoneBed
    tmp: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    agent: Agent | None = None
    _task: asyncio.Task[int] | None = None
    process: subprocess.Popen[bytes] | None = None
    events: EventLog | None = None

    def config_data(self) -> dict[str, Any]:
        """The agent's configuration as TOML-ready data."""
        data: dict[str, Any] = {
            "node": {"uuid": CN},
            "mqtt": {"url": self.broker.url},
            "storage": {"dataset_root": self.bed.dataset_root},
            "networks": {NETWORK: {"bridge": self.bed.bridge.name}},
            "state": {"dir": str(self.bed.state_dir)},
            "engine": {"shutdown_grace_s": 10.0},
            "zones": {
                "cgroup_parent": f"{self.bed.tag}-zones",
                "name_prefix": self.bed.tag,
                "start_timeout_s": 20.0,
                "stop_timeout_s": 5.0,
                "probe_interval_s": 1.0,
            },
            "log": {"level": "debug"},
        }
        for section, values in self.overrides.items():
            data.setdefault(section, {}).update(values)
        return data

    def config(self) -> Config:
        """The agent's configuration."""
        return Config.model_validate(self.config_data())

    def config_file(self) -> Path:
        """The configuration written as TOML (for a ``volagent run`` process)."""
        path = self.tmp / "volagent.toml"
        path.write_text(config_toml(self.config_data()))
        return path

    def listen(self, *, session: str | None = None) -> EventLog:
        """Start collecting events (before anything is published); ``session``: see EventLog."""
        if self.events is None:
            self.events = EventLog(self.broker, self.config().events_topic, session=session)
        return self.events

    # ------------------------------------------------------------------ in-process agent

    async def start(self) -> Agent:
        """Run an agent in this process; return once it is ready and connected."""
        self.listen()
        ready = asyncio.Event()
        agent = Agent(self.config(), on_ready=ready.set)
        self.agent = agent
        self._task = asyncio.create_task(agent.run(), name="agent under test")
        async with asyncio.timeout(WAIT):
            done, _ = await asyncio.wait(
                [self._task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if self._task in done:
                self._task.result()
                msg = "the agent stopped during start-up"
                raise AssertionError(msg)
            await agent.mqtt.wait_connected(WAIT)
        return agent

    async def stop(self) -> int:
        """Stop the in-process agent gracefully; its exit status."""
        assert self.agent is not None
        assert self._task is not None
        self.agent.request_stop()
        async with asyncio.timeout(WAIT):
            status = await self._task
        self.agent, self._task = None, None
        return status

    # ------------------------------------------------------------------ agent process

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start ``volagent run`` as a process of its own."""
        self.listen()
        with (self.tmp / "agent.log").open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-m", "volagent", "run", "--config", str(self.config_file())],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self.process

    def kill9(self) -> None:
        """SIGKILL the agent process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)
        self.process = None

    def terminate(self, *, timeout: float = WAIT) -> int:
        """SIGTERM the agent process and wait for it (at most ``timeout`` s); its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout)
        self.process = None
        return status

    # ------------------------------------------------------------------ tasks

    async def publish(self, text: str) -> None:
        """Publish a raw message on the tasks topic with ``mosquitto_pub``."""
        await asyncio.to_thread(self.broker.pub, self.config().tasks_topic, text)

    async def publish_many(self, texts: list[str]) -> None:
        """Publish raw messages on the tasks topic in this order, with one ``mosquitto_pub -l``."""
        argv = ["mosquitto_pub", "-p", str(self.broker.port), "-h", "127.0.0.1", "-q", "1"]
        argv += ["-t", self.config().tasks_topic, "-l"]
        lines = "".join(f"{text}\n" for text in texts).encode()
        done = await asyncio.to_thread(
            subprocess.run, argv, input=lines, capture_output=True, timeout=WAIT, check=False
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    async def submit(self, kind: str, params: dict[str, Any], **extra: Any) -> str:
        """Publish a task; its id."""
        task_id, text = task_message(kind, params, **extra)
        await self.publish(text)
        return task_id

    async def run_task(self, kind: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Publish a task and wait for its terminal event."""
        assert self.events is not None
        task_id = await self.submit(kind, params, **extra)
        return await self.events.terminal(task_id)

    # ------------------------------------------------------------------ local HTTP API

    async def http_get(self, path: str) -> tuple[int, Any]:
        """``GET path`` on the agent's local HTTP API (``http.listen`` set); status, JSON body."""
        url = f"http://{self.config().http.listen}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.json()

    async def wait_ready(self, *, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109  # a hang guard
        """Poll ``/ready`` until it answers 200 (no answer counts as not ready); its document."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                code, body = await self.http_get("/ready")
            except aiohttp.ClientError:
                code, body = 0, {}
            if code == 200:
                return dict(body)
            assert time.monotonic() < deadline, f"/ready still {code} after {timeout}s: {body}"
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """Stop what is left running (a process, the subscriber)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(WAIT)
        if self.events is not None:
            self.events.close()


def volume_params(bed: ZoneBed, name: str, host: int, **extra: Any) -> dict[str, Any]:
    """``volume.create`` parameters for a volume served at host number ``host``."""
    return {
        "uuid": str(uuidlib.uuid4()),
        "name": name,
        "owner_uuid": OWNER,
        "size_mib": 64,
        "nic": {
            "ip": bed.bridge.ip(host),
            "prefix": bed.bridge.network.prefixlen,
            "network": NETWORK,
        },
        **extra,
    }


@contextlib.contextmanager
def held_connection(ns: Namespace, ip: str, port: int = 2049) -> Iterator[subprocess.Popen[bytes]]:
    """A client in ``ns`` holding a TCP connection to ``ip:port`` open (an NFS mount's)."""
    script = (
        "import socket, sys, time\n"
        f"s = socket.create_connection(({ip!r}, {port}), timeout=10)\n"
        "print('connected', flush=True)\n"
        "time.sleep(300)\n"
    )
    child = subprocess.Popen(
        ns.exec_argv(sys.executable, "-c", script), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == b"connected", child.stderr.read() if child.stderr else b""
        yield child
    finally:
        child.kill()
        child.communicate()


async def wait_online(node: AgentNode, *, timeout: float = WAIT) -> None:  # noqa: ASYNC109  # a hang guard
    """Wait until the agent's retained status says ``online`` (its session exists by then)."""
    topic = node.config().status_topic
    async with asyncio.timeout(timeout):
        while True:
            try:
                lines = await asyncio.to_thread(node.broker.sub, topic, count=1, timeout=5)
            except RuntimeError:  # mosquitto_sub -W gave up (exit 27): nothing retained yet
                lines = []
            if lines and json.loads(lines[0]).get("state") == "online":
                return
            await asyncio.sleep(0.1)
