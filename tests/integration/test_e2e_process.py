"""The agent as its own ``volagent run`` process, stopped and restarted under way (issue 7).

Restarts under a client's reads and writes, the broker stopped in the middle of tasks, a
graceful shutdown with tasks running, a zone's server killed while the agent is down. Every
test prints the figures it observed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.mqtt import Mosquitto
from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.node import WAIT, AgentNode, task_message, volume_params, wait_online
from tests.support.run import alive
from tests.support.zones import HostState, ZoneBed

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]

TERMINAL = ("succeeded", "failed")
#: The agent's grace period for running tasks at shutdown, in these tests.
GRACE_S = 5.0


@pytest.fixture
def node(node: AgentNode) -> AgentNode:
    """The shared node, with a grace period of GRACE_S for running tasks at shutdown."""
    node.overrides["engine"] = {"shutdown_grace_s": GRACE_S}
    return node


async def create(node: AgentNode, params: dict[str, Any]) -> dict[str, Any]:
    """Run a ``volume.create`` that must succeed; the volume object."""
    event = await node.run_task("volume.create", params)
    assert event["state"] == "succeeded", event
    result: dict[str, Any] = event["result"]
    return result


async def terminals(node: AgentNode, ids: list[str], *, timeout: float = WAIT) -> None:  # noqa: ASYNC109  # a hang guard
    """Wait until every task of ``ids`` has a terminal event; on a hang, say what is left."""
    assert node.events is not None
    try:
        async with asyncio.timeout(timeout):
            for task_id in ids:
                await node.events.terminal(task_id, timeout=timeout)
    except TimeoutError as exc:
        missing = [t for t in ids if not node.events.terminal_raw(t)]
        journal = {t: (await node.http_get(f"/tasks/{t}"))[1].get("state") for t in missing}
        _, status = await node.http_get("/status")
        msg = (
            f"no terminal event after {timeout:g} s for {journal} (their states in the journal);"
            f" the agent's /status says events_queued={status.get('events_queued')}"
        )
        raise AssertionError(msg) from exc


def check_event_streams(node: AgentNode, ids: list[str]) -> int:
    """Each task's events: seq 1, 2, ... with no gap, copies identical, one terminal, last.

    Returns how many copies (at-least-once repeats) were received beyond the first.
    """
    assert node.events is not None
    by_task: dict[str, dict[int, set[bytes]]] = {task_id: {} for task_id in ids}
    copies = 0
    for raw in node.events.raw:
        event = json.loads(raw)
        seqs = by_task.get(event.get("task", ""))
        if seqs is not None:
            copies += event["seq"] in seqs
            seqs.setdefault(event["seq"], set()).add(raw)
    for task_id, seqs in by_task.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), (task_id, sorted(seqs))
        assert all(len(same) == 1 for same in seqs.values()), (task_id, seqs)
        states = [json.loads(next(iter(seqs[n])))["state"] for n in sorted(seqs)]
        assert states[0] == "accepted", (task_id, states)
        assert [s for s in states if s in TERMINAL] == [states[-1]], (task_id, states)
    return copies


async def journal_agrees(node: AgentNode, task_id: str) -> dict[str, Any]:
    """``/tasks/{id}`` says what the task's terminal event says; the journal's record."""
    assert node.events is not None
    distinct = set(node.events.terminal_raw(task_id))
    assert len(distinct) == 1, (task_id, distinct)  # one terminal state, repeats identical
    event = json.loads(distinct.pop())
    code, record = await node.http_get(f"/tasks/{task_id}")
    assert code == 200, record
    assert record["state"] == event["state"], (record, event)
    assert record["result"] == event.get("result"), (record, event)
    assert record["error"] == event.get("error"), (record, event)
    return dict(record)


# ------------------------------------------------------------------ restarts under a client


class WriteReadLoop(threading.Thread):
    """Over and over: write a new file over NFSv3, read it back, read an older one.

    Every operation is recorded with the time it ended and its error (None when it worked).
    """

    def __init__(self, client: NfsClient, ip: str, export: str, workdir: Path) -> None:
        super().__init__(daemon=True)
        self.client, self.ip, self.export, self.workdir = client, ip, export, workdir
        self.ops: list[tuple[float, str | None]] = []
        self.written = 0
        self._lock = threading.Lock()
        self._done = threading.Event()

    def url(self, n: int) -> str:
        """Where file ``n`` is written."""
        return nfs_url(self.ip, f"{self.export}/w{n}.bin")

    @staticmethod
    def content(n: int) -> bytes:
        """What file ``n`` holds (8 KiB, different for every file)."""
        return (f"file {n:06d} ".encode() * 1024)[:8192]

    def _record(self, error: str | None) -> None:
        with self._lock:
            self.ops.append((time.monotonic(), error))

    def _read(self, n: int) -> None:
        result = self.client.cat(self.url(n))
        if not result.ok:
            self._record(f"read w{n}: {result.stderr.strip()}")
        elif result.stdout != self.content(n):
            self._record(f"read w{n}: {len(result.stdout)} bytes that differ")
        else:
            self._record(None)

    def write(self, n: int) -> bool:
        """Write file ``n`` (a fresh name: nfs-cp cannot overwrite); whether it worked."""
        local = self.workdir / f"w{n}.bin"
        local.write_bytes(self.content(n))
        result = self.client.cp(local, self.url(n))
        local.unlink()
        self._record(None if result.ok else f"write w{n}: {result.stderr.strip()}")
        return result.ok

    def run(self) -> None:
        """Write, read back, read an older file, until :meth:`stop`."""
        n = self.written
        while not self._done.is_set():
            if self.write(n):
                self.written = n + 1
                self._read(n)
                self._read(max(0, n - 10))
            n += 1

    def between(self, began: float, ended: float) -> int:
        """Operations that ended in ``[began, ended]``."""
        with self._lock:
            return sum(began <= t <= ended for t, _ in self.ops)

    @property
    def errors(self) -> list[str]:
        """Every failed operation, in order."""
        with self._lock:
            return [e for _, e in self.ops if e is not None]

    def stop(self) -> None:
        """Stop after the operation in progress."""
        self._done.set()
        self.join(timeout=WAIT)
        assert not self.is_alive(), "the client loop hangs"


async def test_restarts_under_a_reading_and_writing_client_cost_no_nfs_error(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
    tmp_path: Path,
) -> None:
    node.spawn()
    await node.wait_ready()
    params = volume_params(zone_bed, "busy", 90)
    uuid, ip = str(params["uuid"]), zone_bed.bridge.ip(90)
    await create(node, params)
    pids = zone_bed.zone_pids(uuid)
    loop = WriteReadLoop(nfs_client(client_ns(100)), ip, "/busy", tmp_path)
    host = HostState.take(zone_bed.tag, zone_bed.state_dir)
    assert loop.write(0), loop.errors  # the first file exists before the loop reads it
    loop.written = 1
    loop.start()

    windows: list[tuple[str, int, int, float]] = []
    try:
        for how in ("SIGTERM", "kill -9") * 3:
            began = time.monotonic()
            if how == "SIGTERM":
                assert node.terminate() == 0
            else:
                node.kill9()
            spawned = time.monotonic()
            node.spawn()
            await node.wait_ready()
            ready = time.monotonic()
            windows.append(
                (how, loop.between(began, ready), loop.between(spawned, ready), ready - began)
            )
            assert zone_bed.zone_pids(uuid) == pids, how
    finally:
        await asyncio.to_thread(loop.stop)

    assert loop.errors == []
    for how, ops, _, _ in windows:
        assert ops > 0, f"no NFS operation completed while the agent restarted ({how})"
    assert zone_bed.zone_pids(uuid) == pids
    assert all(alive(pid) for pid in pids)
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == host
    listing = loop.client.ls(nfs_url(ip, "/busy")).expect_ok().decode().split()
    assert {f"w{n}.bin" for n in range(loop.written)} <= set(listing)
    code, volume = await node.http_get(f"/volumes/{uuid}")
    assert code == 200
    assert (volume["state"], volume["zone"]["state"], volume["zone"]["restarts"]) == (
        "ready",
        "running",
        0,
    )
    assert node.terminate() == 0
    print(  # noqa: T201  # figures for the closing note
        f"restarts under a client: {len(windows)} restarts, {len(loop.ops)} NFS operations"
        f" ({loop.written} files written), {len(loop.errors)} errors; per restart"
        " (how: ops while down or starting / ops from spawn to ready / stop-to-ready s): "
        + ", ".join(f"{h}: {ops}/{starting}/{s:.2f}" for h, ops, starting, s in windows)
    )


# ------------------------------------------------------------------ the broker away


async def publish_batch(node: AgentNode, batch: list[tuple[str, str]]) -> list[str]:
    """Publish task messages in this order at once; their ids."""
    await node.publish_many([text for _, text in batch])
    return [task_id for task_id, _ in batch]


def first_batch(volumes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Per volume a create and two snapshots (one lane each), then a resize of the first."""
    batch: list[tuple[str, str]] = []
    for params in volumes:
        uuid = str(params["uuid"])
        batch.append(task_message("volume.create", params))
        batch += [
            task_message("snapshot.create", {"volume_uuid": uuid, "name": f"s{k}"})
            for k in range(2)
        ]
    batch.append(task_message("volume.resize", {"uuid": str(volumes[0]["uuid"]), "size_mib": 96}))
    return batch


async def outbox_while_down(
    node: AgentNode, ids: list[str], *, at_least_s: float
) -> tuple[int, dict[str, Any]]:
    """Wait (the broker down) until the journal has every task of ``ids`` finished.

    At least ``at_least_s`` seconds; returns the largest outbox depth seen and the last
    ``/status``.
    """
    began = time.monotonic()
    queued_max = 0
    async with asyncio.timeout(WAIT):
        while True:
            _, status = await node.http_get("/status")
            queued_max = max(queued_max, status["events_queued"])
            states = [(await node.http_get(f"/tasks/{t}"))[1]["state"] for t in ids]
            if all(s in TERMINAL for s in states) and time.monotonic() - began >= at_least_s:
                return queued_max, dict(status)
            await asyncio.sleep(0.2)


async def test_the_broker_stopped_in_the_middle_of_tasks_loses_no_task_and_no_event(
    mosquitto: Mosquitto, node: AgentNode, zone_bed: ZoneBed
) -> None:
    """Stop the broker while a batch of tasks runs, start it again, run a second batch.

    The events are read on a persistent session (``mosquitto_sub -c -i``, QoS 1): the broker
    keeps the session and what is queued for it across its own restart (persistence on), and
    the subscriber, stopped while the broker was down, is started again on the same session
    afterwards (:meth:`EventLog.resubscribe`); its probe, queued behind everything else for
    the session, comes back only once all of that was delivered. So an event the agent
    published at any time reaches the log, and a missing one is the agent's loss.
    """
    node.listen(session=f"e2e-events-{uuidlib.uuid4().hex[:8]}")
    node.spawn()
    await wait_online(node)
    assert node.events is not None
    volumes = [volume_params(zone_bed, f"b{i}", 91 + i) for i in range(3)]
    first_ids = await publish_batch(node, first_batch(volumes))
    await node.events.seen(first_ids[0], "running")

    mosquitto.stop()
    stopped = time.monotonic()
    received_before = sum(bool(node.events.terminal_raw(t)) for t in first_ids)
    assert received_before < len(first_ids), "the broker stopped after the batch was done"
    queued_max, status = await outbox_while_down(node, first_ids, at_least_s=3.0)
    assert status["broker"]["connected"] is False, status
    assert status["events_queued"] > 0, status  # the terminal events at least wait for the broker
    down_s = time.monotonic() - stopped

    mosquitto.start()
    back = time.monotonic()
    node.events.resubscribe()
    await terminals(node, first_ids)
    delivered_s = time.monotonic() - back  # the agent is connected again by then

    second: list[tuple[str, str]] = []
    for params in volumes:
        uuid = str(params["uuid"])
        second.append(task_message("snapshot.create", {"volume_uuid": uuid, "name": "after"}))
        second.append(task_message("volume.get", {"uuid": uuid}))
    second.append(task_message("volume.list", {}))
    second_ids = await publish_batch(node, second)
    await terminals(node, second_ids)
    await asyncio.sleep(1.0)  # time for a repeated terminal event, if one were coming

    ids = first_ids + second_ids
    copies = check_event_streams(node, ids)
    for task_id in ids:
        assert len(set(node.events.terminal_raw(task_id))) == 1, task_id
        record = await journal_agrees(node, task_id)
        assert record["state"] == "succeeded", record
    _, status = await node.http_get("/status")
    assert status["broker"]["connected"] is True
    assert status["broker"]["reconnects"] >= 1, status
    assert status["events_queued"] == 0, status
    listed = json.loads(node.events.terminal_raw(second_ids[-1])[0])["result"]["volumes"]
    assert sorted(v["uuid"] for v in listed) == sorted(str(p["uuid"]) for p in volumes)
    assert node.terminate() == 0
    print(  # noqa: T201  # figures for the closing note
        f"broker outage: {len(ids)} tasks ({len(first_ids)} before, {len(second_ids)} after),"
        f" {received_before} terminal events received before the stop, broker down"
        f" {down_s:.2f} s, up to {queued_max} events queued in the outbox, first batch's"
        f" events all delivered {delivered_s:.2f} s after the broker started,"
        f" {copies} repeated copies, 0 lost"
    )


# ------------------------------------------------------------------ graceful shutdown


async def first_progress(node: AgentNode, ids: list[str]) -> None:
    """Return as soon as one task of ``ids`` has a ``progress`` event."""
    assert node.events is not None
    waits = [asyncio.create_task(node.events.seen(t, "progress")) for t in ids]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        next(iter(done)).result()  # a hang guard's TimeoutError, if that is what ended it
    finally:
        for wait in waits:
            wait.cancel()


async def test_sigterm_is_a_bounded_shutdown_and_interrupted_tasks_resume(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    node.spawn()
    await wait_online(node)
    assert node.events is not None
    served = [volume_params(zone_bed, f"old{i}", 101 + i) for i in range(2)]
    for params in served:
        await create(node, params)
    old = {str(p["uuid"]): zone_bed.zone_pids(str(p["uuid"])) for p in served}

    fresh = [volume_params(zone_bed, f"new{i}", 103 + i) for i in range(3)]
    batch = [task_message("volume.create", p) for p in fresh]
    creates = [task_id for task_id, _ in batch]
    batch += [
        task_message("snapshot.create", {"volume_uuid": uuid, "name": f"s{k}"})
        for k in range(5)
        for uuid in old
    ]
    ids = await publish_batch(node, batch)
    await first_progress(node, creates)  # a create's dataset step has begun: SIGTERM now

    assert node.process is not None
    pid = node.process.pid
    began = time.monotonic()
    status = node.terminate(timeout=GRACE_S + 30)  # hang guard: grace, cancel, drain, offline
    shutdown_s = time.monotonic() - began
    assert status == 0
    assert not alive(pid)
    finished_before = [t for t in ids if node.events.terminal_raw(t)]
    assert len(finished_before) < len(ids), "every task ended before the shutdown"
    assert {u: zone_bed.zone_pids(u) for u in old} == old  # the shutdown stopped no zone
    assert all(alive(p) for pids in old.values() for p in pids)

    node.spawn()
    await terminals(node, ids)
    await node.wait_ready()
    await asyncio.sleep(1.0)  # time for a repeated terminal event, if one were coming
    check_event_streams(node, ids)
    attempts = {}
    for task_id in ids:
        assert len(set(node.events.terminal_raw(task_id))) == 1, task_id
        record = await journal_agrees(node, task_id)
        assert record["state"] == "succeeded", record
        attempts[task_id] = record["attempts"]
    resumed = [t for t in ids if attempts[t] >= 2]
    assert resumed, f"no task was interrupted and resumed: {attempts}"
    assert {u: zone_bed.zone_pids(u) for u in old} == old
    for params in fresh:
        _, volume = await node.http_get(f"/volumes/{params['uuid']}")
        assert (volume["state"], volume["zone"]["state"]) == ("ready", "running"), volume
    interrupted = next(p for p, t in zip(fresh, creates, strict=True) if t in resumed)
    host = int(str(interrupted["nic"]["ip"]).rsplit(".", 1)[1])
    client = nfs_client(client_ns(110))
    client.ls(nfs_url(zone_bed.bridge.ip(host), f"/{interrupted['name']}")).expect_ok()
    assert node.terminate() == 0
    print(  # noqa: T201  # figures for the closing note
        f"SIGTERM: {len(ids)} tasks, shutdown took {shutdown_s:.2f} s (grace {GRACE_S:g} s),"
        f" {len(ids) - len(finished_before)} left for the next start, {len(resumed)} resumed"
        f" with attempts >= 2, all {len(ids)} succeeded once; zones kept: {len(old)}"
    )


# ------------------------------------------------------------------ a zone dead meanwhile


async def test_a_zone_whose_ganesha_was_killed_while_the_agent_was_down_is_restarted(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    node.spawn()
    await wait_online(node)
    victim, bystander = (volume_params(zone_bed, f"z{i}", 111 + i) for i in range(2))
    for params in (victim, bystander):
        await create(node, params)
    dead, kept = str(victim["uuid"]), str(bystander["uuid"])
    dead_pids, kept_pids = zone_bed.zone_pids(dead), zone_bed.zone_pids(kept)
    assert node.terminate() == 0
    client = nfs_client(client_ns(120))
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)

    os.kill(dead_pids[0], signal.SIGKILL)
    async with asyncio.timeout(WAIT):
        while True:
            if not alive(dead_pids[0]):
                break
            await asyncio.sleep(0.05)
    began = time.monotonic()
    node.spawn()
    await node.wait_ready()
    ready_s = time.monotonic() - began

    new_ganesha = zone_bed.zone_pids(dead)[0]
    assert new_ganesha != dead_pids[0]
    assert alive(new_ganesha)
    assert zone_bed.zone_pids(kept) == kept_pids
    client.ls(nfs_url(zone_bed.bridge.ip(111), "/z0")).expect_ok()
    client.ls(nfs_url(zone_bed.bridge.ip(112), "/z1")).expect_ok()
    _, restarted = await node.http_get(f"/volumes/{dead}")
    _, untouched = await node.http_get(f"/volumes/{kept}")
    assert (restarted["state"], restarted["zone"]["state"]) == ("ready", "running"), restarted
    assert restarted["zone"]["restarts"] == 1, restarted
    assert (untouched["zone"]["state"], untouched["zone"]["restarts"]) == ("running", 0)
    _, status = await node.http_get("/status")
    recon = status["reconciliation"]
    assert recon["zones_failed"] == [], recon
    assert recon["zones_running"] + len(recon["zones_started"]) == 2, recon
    # Nothing leaked: the same namespaces, links, cgroups and mounts; one ganesha replaced.
    after = HostState.take(zone_bed.tag, zone_bed.state_dir)
    assert (after.netns, after.links, after.cgroups, after.mounts) == (
        before.netns,
        before.links,
        before.cgroups,
        before.mounts,
    )
    gone = {pid for pid, _ in before.processes - after.processes}
    new = {pid for pid, _ in after.processes - before.processes}
    assert dead_pids[0] in gone
    assert new_ganesha in new
    assert len(after.processes) == len(before.processes), (gone, new)
    assert node.terminate() == 0
    print(  # noqa: T201  # figures for the closing note
        f"ganesha killed while down: ready {ready_s:.2f} s after spawn, zone restarted"
        f" (restarts=1, reconciliation {recon['zones_running']} running /"
        f" {len(recon['zones_started'])} started), other zone's pids kept,"
        f" processes replaced {len(gone)} -> {len(new)}"
    )
