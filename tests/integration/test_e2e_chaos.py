"""kill -9 of ``volagent run`` at random moments during a stream of 100 mixed tasks, 10 volumes.

The stream (tests/support/chaos.py) is drawn so that every task succeeds when run exactly once
in publish order. The agent is killed 4 to 6 times while it works and started again at once;
afterwards every task must have ended once, successfully, with the result the model predicts,
and ZFS, the zones, the journal and the host must agree with the model: nothing happened
twice, nothing was lost, nothing leaked.

The seed is printed; ``CHAOS_SEED=<n>`` replays the same stream and kill plan (the kill
moments still depend on timing). Not ``VOLAGENT_…``: the agent reads those as settings.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.chaos import (
    VIEW_KEYS,
    Planned,
    Stream,
    canonical_clients,
    plan,
    result_view,
    volume_view,
)
from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.node import WAIT, AgentNode, task_message, volume_params, wait_online
from tests.support.run import sh
from tests.support.zones import HostState, ZoneBed

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns, pytest.mark.mqtt]

SEED_ENV = "CHAOS_SEED"
VOLUMES = 10
MIXED = 90
FIRST_HOST = 80
CLIENT_HOSTS = (100, 101, 102)
KILLS = (4, 6)
#: Hang guards (seconds): for the whole stream to end, for one awaited event.
ALL_DONE = 150.0
EVENT_WAIT = 20.0
TERMINAL = ("succeeded", "failed")
MIB = 1024 * 1024


def agent_log_tail(node: AgentNode) -> str:
    return "\n".join((node.tmp / "agent.log").read_text(errors="replace").splitlines()[-40:])


def check_alive(node: AgentNode) -> None:
    assert node.process is not None
    status = node.process.poll()
    assert status is None, f"the agent exited with {status}:\n{agent_log_tail(node)}"


async def until_answers(node: AgentNode, path: str, status: int) -> None:
    """Poll ``path`` until it answers ``status`` (the agent must stay alive meanwhile)."""
    deadline = time.monotonic() + WAIT
    while True:
        check_alive(node)
        try:
            code, _ = await node.http_get(path)
        except aiohttp.ClientError:
            code = 0
        if code == status:
            return
        assert time.monotonic() < deadline, f"{path} still answers {code}"
        await asyncio.sleep(0.05)


def grouped(raw: list[bytes]) -> dict[str, list[bytes]]:
    """Every event line received, by task id (probes left out)."""
    out: dict[str, list[bytes]] = {}
    for line in raw:
        event = json.loads(line)
        if "task" in event:
            out.setdefault(event["task"], []).append(line)
    return out


@dataclass
class Lives:
    """The agent's lives: each start, each kill and how it was timed, time to ready."""

    node: AgentNode
    rng: random.Random
    ids: list[str]
    kills: list[str] = field(default_factory=list)
    #: Seconds from each start to ``/ready`` 200; None when killed before that.
    ready_s: list[float | None] = field(default_factory=list)
    #: Tasks without a terminal event at each kill.
    unfinished_at_kill: list[int] = field(default_factory=list)
    _watch: asyncio.Task[None] | None = None
    _seen: set[bytes] = field(default_factory=set)
    _from: int = 0

    def spawn(self) -> None:
        assert self.node.events is not None
        self._from = len(self.node.events.raw)
        self._seen = set(self.node.events.raw)  # a copy sent again after a restart is not new
        began = time.monotonic()
        self.node.spawn()
        self._watch = asyncio.create_task(self._time_ready(began))

    async def _time_ready(self, began: float) -> None:
        await until_answers(self.node, "/ready", 200)
        self.ready_s.append(time.monotonic() - began)

    async def ready(self) -> None:
        assert self._watch is not None
        await self._watch

    def unfinished(self) -> int:
        assert self.node.events is not None
        events = grouped(list(self.node.events.raw))
        done = {
            task
            for task, lines in events.items()
            if any(json.loads(line)["state"] in TERMINAL for line in lines)
        }
        return sum(1 for i in self.ids if i not in done)

    async def kill(self, how: str) -> None:
        assert self._watch is not None
        if not self._watch.done():
            self._watch.cancel()
            self.ready_s.append(None)
        else:
            self._watch.result()  # an agent that died by itself fails here
        check_alive(self.node)
        self.unfinished_at_kill.append(self.unfinished())
        self.node.kill9()
        self.kills.append(how)

    async def new_work_event(self, nth: int) -> str:
        """Wait for the ``nth`` new ``running``/``progress`` event of this life; its description."""
        assert self.node.events is not None
        raw, seen, index = self.node.events.raw, 0, self._from
        deadline = time.monotonic() + EVENT_WAIT
        while time.monotonic() < deadline:
            check_alive(self.node)
            while index < len(raw):
                line, index = raw[index], index + 1
                event = json.loads(line)
                if line in self._seen or event.get("state") not in ("running", "progress"):
                    continue
                seen += 1
                if seen == nth:
                    phase = event.get("progress", {}).get("phase", "")
                    return f"{event['state']} {event['kind']} {phase}".strip()
            await asyncio.sleep(0.005)
        return f"{EVENT_WAIT:.0f} s without a {nth}th new event"

    async def until_done(self, count: int) -> None:
        """Wait until at least ``count`` tasks of the stream have their terminal event."""
        deadline = time.monotonic() + ALL_DONE
        while len(self.ids) - self.unfinished() < count:
            check_alive(self.node)
            assert time.monotonic() < deadline, f"fewer than {count} tasks ever ended"
            await asyncio.sleep(0.1)

    async def chaos(self) -> None:
        """Kill 4 to 6 times: after 0.3-3 s of work or right after a running/progress event.

        Each kill first waits for a random share of the stream to be done (drawn up front,
        up to 80 %), so that the kills fall all along the stream, not only on the creates.
        """
        kills = self.rng.randint(*KILLS)
        for mark in sorted(self.rng.sample(range(len(self.ids) * 8 // 10), kills)):
            await self.until_done(mark)
            await until_answers(self.node, "/health", 200)
            if self.rng.random() < 0.5:
                delay = self.rng.uniform(0.3, 3.0)
                await asyncio.sleep(delay)
                how = f"{delay:.1f} s after /health"
            else:
                how = "after " + await self.new_work_event(self.rng.randint(1, 4))
            await self.kill(how)
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))
            self.spawn()


async def wait_all_terminal(node: AgentNode, stream: Stream, ids: list[str]) -> None:
    assert node.events is not None
    deadline = time.monotonic() + ALL_DONE
    while True:
        check_alive(node)
        events = grouped(list(node.events.raw))
        missing = [
            (t.kind, i, [json.loads(e)["state"] for e in events.get(i, [])])
            for t, i in zip(stream.tasks, ids, strict=True)
            if not any(json.loads(e)["state"] in TERMINAL for e in events.get(i, []))
        ]
        if not missing:
            return
        assert time.monotonic() < deadline, f"tasks never ended: {missing}"
        await asyncio.sleep(0.25)


def check_events(task: Planned, task_id: str, lines: list[bytes]) -> dict[str, Any]:
    """One task's events: copies identical, one terminal event, the last; that event."""
    by_seq: dict[int, set[bytes]] = {}
    for line in lines:
        by_seq.setdefault(json.loads(line)["seq"], set()).add(line)
    where = f"{task.kind} {task_id}"
    assert all(len(copies) == 1 for copies in by_seq.values()), (where, by_seq)
    events: list[dict[str, Any]] = [json.loads(next(iter(by_seq[s]))) for s in sorted(by_seq)]
    states = [e["state"] for e in events]
    assert [s for s in states if s in TERMINAL] == [states[-1]], (where, states)
    assert states[-1] == "succeeded", (where, events[-1])
    assert result_view(task, events[-1]["result"]) == task.expect, (where, events[-1]["result"])
    return events[-1]


def check_sequences(stream: Stream, ids: list[str], events: dict[str, list[bytes]]) -> None:
    """Each task's events are numbered 1..n without a gap and begin with one ``accepted``."""
    odd = {}
    for task, task_id in zip(stream.tasks, ids, strict=True):
        by_seq = {e["seq"]: e["state"] for e in map(json.loads, events[task_id])}
        states = [by_seq[seq] for seq in sorted(by_seq)]
        gapless = sorted(by_seq) == list(range(1, len(by_seq) + 1))
        announced = states[0] == "accepted" and states.count("accepted") == 1
        if not (gapless and announced):
            odd[f"{task.kind} {task_id}"] = sorted(by_seq.items())
    assert not odd, f"event sequences with a gap or without one leading accepted: {odd}"


def zfs_props(dataset: str, *names: str) -> dict[str, str]:
    out = sh(["zfs", "get", "-H", "-p", "-o", "property,value", ",".join(names), dataset])
    return dict(line.split("\t", 1) for line in out.splitlines())


def zfs_snapshots(dataset: str) -> list[tuple[str, int, int]]:
    """(name, createtxg, creation) of the dataset's snapshots, oldest first.

    zfs-fuse's ``zfs list`` has no ``-p`` and shows a txg above 999 as ``1.02K``: the numbers
    are read exactly with ``zfs get -p``.
    """
    argv = ["zfs", "list", "-H", "-t", "snapshot", "-d", "1", "-o", "name", dataset]
    found = []
    for name in sh(argv).split():
        props = zfs_props(name, "createtxg", "creation")
        found.append((name.split("@", 1)[1], int(props["createtxg"]), int(props["creation"])))
    return sorted(found, key=lambda s: s[1])


def allows(allowed: list[str], ip: str) -> bool:
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(n) for n in allowed)


def epoch(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp).timestamp())


async def check_journal(
    node: AgentNode, stream: Stream, ids: list[str], terminal: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """``/tasks/{id}`` agrees with each terminal event; nothing pending; attempts by task."""
    attempts: dict[str, int] = {}
    for task, task_id in zip(stream.tasks, ids, strict=True):
        code, record = await node.http_get(f"/tasks/{task_id}")
        assert code == 200, (task.kind, task_id, record)
        assert (record["state"], record["kind"]) == ("succeeded", task.kind), record
        assert record["result"] == terminal[task_id]["result"], (task.kind, record)
        attempts[task_id] = record["attempts"]
    _, status = await node.http_get("/status")
    tasks = status["tasks"]
    assert (tasks.get("received", 0), tasks.get("running", 0)) == (0, 0), tasks
    assert (tasks["queued"], tasks["running_now"]) == (0, 0), tasks
    return attempts


def check_zfs(
    root: str, stream: Stream, ids: list[str], terminal: dict[str, dict[str, Any]]
) -> None:
    """Exactly the volumes; each snapshot made once; quota and spec from the last task."""
    datasets = sh(["zfs", "list", "-H", "-r", "-o", "name", root]).split()
    assert sorted(datasets) == sorted([root, *(f"{root}/{u}" for u in stream.volumes)])
    created = {
        (t.params["volume_uuid"], t.params["name"]): epoch(terminal[i]["result"]["created"])
        for t, i in zip(stream.tasks, ids, strict=True)
        if t.kind == "snapshot.create"
    }
    for uuid, model in stream.volumes.items():
        dataset = f"{root}/{uuid}"
        snapshots = zfs_snapshots(dataset)
        assert [name for name, _, _ in snapshots] == model.snapshots, (uuid, snapshots)
        txgs = [txg for _, txg, _ in snapshots]
        assert len(set(txgs)) == len(txgs), (uuid, snapshots)
        for name, _, when in snapshots:  # the very snapshot its create reported
            assert when == created[uuid, name], (uuid, name, when, created[uuid, name])
        props = zfs_props(
            dataset, "quota", "volagent:size_mib", "volagent:allowed_clients", "volagent:read_only"
        )
        assert int(props["quota"]) == model.size_mib * MIB, (uuid, props)
        assert props["volagent:size_mib"] == str(model.size_mib), (uuid, props)
        stored = canonical_clients(json.loads(props["volagent:allowed_clients"]))
        assert stored == canonical_clients(model.allowed_clients), (uuid, props)
        assert props["volagent:read_only"] == str(model.read_only).lower(), (uuid, props)


async def check_volumes(node: AgentNode, stream: Stream) -> dict[str, dict[str, Any]]:
    """``/volumes``: exactly the stream's volumes, ready, zones running, as the model says."""
    _, listed = await node.http_get("/volumes")
    volumes = {v["uuid"]: v for v in listed["volumes"]}
    assert sorted(volumes) == sorted(stream.volumes)
    for uuid, model in stream.volumes.items():
        assert volume_view(volumes[uuid], VIEW_KEYS) == model.view(VIEW_KEYS), volumes[uuid]
    return volumes


def check_zones(
    bed: ZoneBed,
    stream: Stream,
    ips: dict[str, str],
    clients: list[NfsClient],
    rng: random.Random,
) -> dict[str, dict[str, Any]]:
    """One running zone per volume, serving its final access list to allowed clients only."""
    assert bed.recorded() == sorted(stream.volumes)
    records = {u: json.loads((bed.zone_dir(u) / "zone.json").read_text()) for u in stream.volumes}
    for uuid, model in stream.volumes.items():
        record, allowed = records[uuid], canonical_clients(model.allowed_clients)
        assert record["state"] == "running", (uuid, record)
        assert canonical_clients(record["spec"]["allowed_clients"]) == allowed, (uuid, record)
        assert record["spec"]["read_only"] is model.read_only, (uuid, record)
        url = nfs_url(ips[uuid], f"/{model.name}")
        let_in = [c for c in clients if allows(allowed, c.ns.ip)]
        kept_out = [c for c in clients if not allows(allowed, c.ns.ip)]
        rng.choice(let_in).ls(url).expect_ok()
        if kept_out:
            refused = rng.choice(kept_out).ls(url)
            assert "MNT3ERR_ACCES" in refused.stderr, (uuid, allowed, refused)
    return records


def check_host(
    before: HostState,
    after: HostState,
    records: dict[str, dict[str, Any]],
    clients: list[Namespace],
) -> None:
    """What the zones and the clients added to the host, and nothing else."""
    assert after.netns - before.netns == {r["netns"] for r in records.values()} | {
        ns.name for ns in clients
    }
    links = {link.split("@", 1)[0] for link in after.links - before.links}  # veth@ifN
    assert links == {r["host_if"] for r in records.values()} | {ns.host_if for ns in clients}
    assert after.processes - before.processes == {
        pair
        for r in records.values()
        for pair in ((r["ganesha_pid"], "ganesha.nfsd"), (r["rpcbind_pid"], "rpcbind"))
    }
    zone_cgroups = {d for r in records.values() for d in r["cgroups"]}
    parents = {str(Path(d).parent) for d in zone_cgroups}
    assert after.cgroups - before.cgroups == (zone_cgroups | parents) - before.cgroups
    assert after.mounts - before.mounts == {f"/run/netns/{n}" for n in after.netns - before.netns}


def check_restarts(stream: Stream, volumes: dict[str, dict[str, Any]], kills: int) -> None:
    """``zone.restarts``: one per zone.restart task and per rollback, at most two more per kill.

    The count never goes back: a zone.restart task adds one, and so does a rollback (it stops
    the zone and starts it again). A kill can add two that no task asked for: a kill while a
    zone is being started (by a zone.restart, a create, a rollback or the adoption of a
    half-started zone) leaves its record counted but without a running server; the next
    start's adoption starts it again (one more), and a resumed zone.restart then restarts the
    zone adoption just started (one more: the task's own restart, done again from the start).
    Nothing else restarts a zone in this test.
    """
    counts = {
        uuid: (model.zone_restarts + model.rollbacks, volumes[uuid]["zone"]["restarts"])
        for uuid, model in stream.volumes.items()
    }
    out = {u: c for u, c in counts.items() if not c[0] <= c[1] <= c[0] + 2 * kills}
    assert not out, f"(zone.restart tasks + rollbacks, zone.restarts) out of bounds: {out}"


async def test_kill_9_during_100_mixed_tasks_every_task_once_and_all_agree(
    node: AgentNode,
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    seed = int(os.environ.get(SEED_ENV, secrets.randbits(32)))
    print(f"chaos seed {seed} (replay with {SEED_ENV}={seed})")  # noqa: T201  # for a replay
    rng = random.Random(seed)
    began = time.monotonic()
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    creates = [
        volume_params(zone_bed, f"chaos{n}", FIRST_HOST + n, size_mib=64) for n in range(VOLUMES)
    ]
    clients = [str(zone_bed.bridge.network), *(zone_bed.bridge.ip(h) for h in CLIENT_HOSTS)]
    stream = plan(rng, creates, MIXED, clients)
    messages = [task_message(t.kind, t.params) for t in stream.tasks]
    ids = [task_id for task_id, _ in messages]
    assert len(ids) == VOLUMES + MIXED

    node.listen()
    lives = Lives(node=node, rng=random.Random(rng.getrandbits(64)), ids=ids)
    lives.spawn()
    await wait_online(node)

    async def publish_all() -> None:
        for _, text in messages:
            await node.publish(text)

    await asyncio.gather(publish_all(), lives.chaos())
    await wait_all_terminal(node, stream, ids)
    await lives.ready()
    work_s = time.monotonic() - began
    assert node.events is not None

    events = grouped(list(node.events.raw))
    terminal = {i: check_events(t, i, events[i]) for t, i in zip(stream.tasks, ids, strict=True)}
    attempts = await check_journal(node, stream, ids, terminal)
    check_zfs(zone_bed.dataset_root, stream, ids, terminal)
    volumes = await check_volumes(node, stream)
    namespaces = [client_ns(h) for h in CLIENT_HOSTS]
    ips = {str(p["uuid"]): str(p["nic"]["ip"]) for p in creates}
    records = check_zones(zone_bed, stream, ips, [nfs_client(ns) for ns in namespaces], rng)
    check_host(before, HostState.take(zone_bed.tag, zone_bed.state_dir), records, namespaces)
    kills = len(lives.kills)
    resumed = sum(1 for n in attempts.values() if n > 1)
    ready = ", ".join("killed first" if s is None else f"{s:.1f}" for s in lives.ready_s)
    print(  # noqa: T201  # figures for the closing note
        f"chaos seed {seed}: {len(ids)} tasks over {VOLUMES} volumes, {kills} kills "
        f"({'; '.join(lives.kills)}), {kills} restarts of the agent, unfinished tasks at each "
        f"kill {lives.unfinished_at_kill}, {resumed} tasks resumed (attempts > 1), "
        f"{stream.count('zone.restart')} zone.restart and {stream.count('snapshot.rollback')} "
        f"rollback tasks, all done in {work_s:.1f} s; start to /ready per start (s): {ready}"
    )
    # A copy of an event may still come late; never another terminal event.
    events = grouped(list(node.events.raw))
    for task, task_id in zip(stream.tasks, ids, strict=True):
        check_events(task, task_id, events[task_id])
    check_sequences(stream, ids, events)
    check_restarts(stream, volumes, kills)
    assert node.terminate() == 0
