"""The intake over a real journal and runner: new, repeated, rejected and resumed task messages.

The service handler is a fake that records the tasks it is given.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from volagent.config import LimitsConfig
from volagent.domain.tasks import AnyTask
from volagent.engine.context import TaskContext
from volagent.engine.intake import Intake
from volagent.engine.journal import AsyncJournal, TaskState, journal_path
from volagent.engine.runner import Events, Runner, utcnow

CN = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
OTHER_CN = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
NIC = {"ip": "10.0.0.5", "prefix": 24, "network": "tenant"}
HANG_S = 10.0


class Done(BaseModel):
    """The fake services' result."""

    ran: int


class Emitted:
    """The emitter: every event handed over, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bytes]] = []

    def queued(self, event_id: int, body: bytes) -> None:
        self.events.append((event_id, body))

    def bodies_of(self, task_id: str) -> list[bytes]:
        return [body for _, body in self.events if json.loads(body)["task"] == task_id]

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(body) for body in self.bodies_of(task_id)]


@dataclass
class Node:
    """An intake wired as the daemon wires it, with everything it reports recorded."""

    journal: AsyncJournal
    emitted: Emitted
    runner: Runner
    intake: Intake
    calls: list[str]
    #: Handlers wait for this before returning; set unless a test holds tasks running.
    release: asyncio.Event
    #: Set by every handler call.
    entered: asyncio.Event
    #: ``on_received`` and ``on_dropped`` calls.
    received: list[str]
    dropped: list[str]

    async def idle(self) -> None:
        async with asyncio.timeout(HANG_S):
            await self.runner.wait_idle()

    async def outbox(self) -> list[tuple[int, bytes]]:
        return await self.journal.events_queued(10_000)


def new_id() -> str:
    return str(uuid.uuid4())


def envelope(
    kind: str = "volume.get", params: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "v": 1,
        "id": new_id(),
        "kind": kind,
        "cn": CN,
        "created": "2026-11-21T10:00:00Z",
        "params": {"uuid": new_id()} if params is None else params,
    }
    obj.update(fields)
    return obj


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def make_node(journal: AsyncJournal, *, limits: LimitsConfig | None = None) -> Node:
    emitted = Emitted()
    calls: list[str] = []
    received: list[str] = []
    dropped: list[str] = []
    release = asyncio.Event()
    release.set()
    entered = asyncio.Event()

    async def handler(task: AnyTask, ctx: TaskContext) -> Done:
        calls.append(task.id)
        entered.set()
        await release.wait()
        return Done(ran=len(calls))

    events = Events(journal, emitted, CN)
    runner = Runner(journal, events, handler, max_concurrent=4)
    intake = Intake(
        journal,
        events,
        runner,
        cn=CN,
        limits=limits or LimitsConfig(),
        on_received=received.append,
        on_dropped=dropped.append,
    )
    return Node(journal, emitted, runner, intake, calls, release, entered, received, dropped)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return journal_path(tmp_path / "state")


@pytest.fixture
async def journal(path: Path) -> AsyncIterator[AsyncJournal]:
    async with await AsyncJournal.open(path) as j:
        yield j


@pytest.fixture
async def node(journal: AsyncJournal) -> AsyncIterator[Node]:
    made = make_node(journal)
    yield made
    made.release.set()
    await made.runner.shutdown(grace_s=HANG_S)


# ------------------------------------------------------------------ valid tasks


async def test_a_new_task_is_journaled_announced_and_run(node: Node) -> None:
    obj = envelope("snapshot.list", {"volume_uuid": new_id()})
    raw = encode(obj)
    await node.intake.handle(raw)

    # Durable and announced by the time handle() returns.
    rec = await node.journal.get(obj["id"])
    assert rec is not None
    assert (rec.raw, rec.kind, rec.volume_uuid) == (
        raw,
        "snapshot.list",
        obj["params"]["volume_uuid"],
    )
    accepted = node.emitted.of(obj["id"])
    assert [(e["seq"], e["state"], e["kind"]) for e in accepted] == [
        (1, "accepted", "snapshot.list")
    ]
    assert node.received == ["snapshot.list"]
    assert node.runner.knows(obj["id"])

    await node.idle()
    assert node.calls == [obj["id"]]
    assert [e["state"] for e in node.emitted.of(obj["id"])] == [
        "accepted",
        "running",
        "succeeded",
    ]
    done = await node.journal.get(obj["id"])
    assert done is not None
    assert done.state is TaskState.SUCCEEDED
    assert node.dropped == []


async def test_a_finished_task_sent_again_gets_its_terminal_event_again_and_does_not_run(
    node: Node,
) -> None:
    obj = envelope()
    raw = encode(obj)
    await node.intake.handle(raw)
    await node.idle()
    terminal = node.emitted.bodies_of(obj["id"])[-1]
    before = len(node.emitted.events)

    await node.intake.handle(raw)
    await node.idle()

    assert node.calls == [obj["id"]]
    assert node.received == ["volume.get"]
    again = node.emitted.events[before:]
    assert [body for _, body in again] == [terminal]
    # Queued in the journal's outbox too, byte for byte, under the id handed over.
    assert again[0] in await node.outbox()
    rec = await node.journal.get(obj["id"])
    assert rec is not None
    assert rec.terminal_event == terminal
    assert rec.attempts == 1


async def test_a_pending_task_sent_again_changes_nothing(node: Node) -> None:
    node.release.clear()
    obj = envelope()
    raw = encode(obj)
    await node.intake.handle(raw)
    async with asyncio.timeout(HANG_S):
        await node.entered.wait()  # running now, held by the handler
    assert node.calls == [obj["id"]]
    events_before = list(node.emitted.events)
    outbox_before = await node.outbox()

    await node.intake.handle(raw)
    await node.intake.handle(raw)

    assert node.emitted.events == events_before
    assert await node.outbox() == outbox_before
    node.release.set()
    await node.idle()
    assert node.calls == [obj["id"]]
    assert node.received == ["volume.get"]
    assert [e["state"] for e in node.emitted.of(obj["id"])] == [
        "accepted",
        "running",
        "succeeded",
    ]


# ------------------------------------------------------------------ invalid messages


@pytest.mark.parametrize(
    "payload",
    [
        b"not json at all",
        b'{"v": 1, "id": "\xff\xfe"}',
        b"\xff\xfe\x00{",
        encode({k: v for k, v in envelope().items() if k != "id"}),
        encode(envelope(id="42")),
        encode(envelope(id=None)),
        json.dumps([envelope()]).encode(),
    ],
    ids=["not-json", "not-utf8-id", "not-utf8", "no-id", "id-not-a-uuid", "id-null", "array"],
)
async def test_a_message_without_a_readable_id_is_dropped_and_counted(
    node: Node, payload: bytes
) -> None:
    await node.intake.handle(payload)
    await node.idle()

    assert node.dropped == ["InvalidTask"]
    assert node.emitted.events == []
    assert await node.outbox() == []
    assert set((await node.journal.counts_by_state()).values()) == {0}
    assert node.calls == []
    assert node.received == []


def _no_created(obj: dict[str, Any]) -> None:
    del obj["created"]


def _bad_kind_type(obj: dict[str, Any]) -> None:
    obj["kind"] = 42


def _kind_not_echoable(obj: dict[str, Any]) -> None:
    obj["kind"] = "Volume Frobnicate!"


def _other_node(obj: dict[str, Any]) -> None:
    obj["cn"] = OTHER_CN


def _unknown_kind(obj: dict[str, Any]) -> None:
    obj["kind"] = "volume.frobnicate"


def _bad_parameter(obj: dict[str, Any]) -> None:
    obj["params"] = {"uuid": "not-a-uuid"}


def _unknown_parameter(obj: dict[str, Any]) -> None:
    obj["params"]["colour"] = "blue"


def _deadline_passed(obj: dict[str, Any]) -> None:
    obj["deadline"] = "2020-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("spoil", "code", "kind"),
    [
        (_no_created, "InvalidTask", "volume.get"),
        (_bad_kind_type, "InvalidTask", ""),
        (_kind_not_echoable, "UnknownTaskKind", ""),
        (_other_node, "WrongNode", "volume.get"),
        (_unknown_kind, "UnknownTaskKind", "volume.frobnicate"),
        (_bad_parameter, "InvalidParameter", "volume.get"),
        (_unknown_parameter, "InvalidParameter", "volume.get"),
        (_deadline_passed, "DeadlineExceeded", "volume.get"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
async def test_a_rejected_task_gets_one_failed_event_with_the_code_and_the_same_bytes_again(
    node: Node, spoil: Callable[[dict[str, Any]], None], code: str, kind: str
) -> None:
    obj = envelope()
    spoil(obj)
    raw = encode(obj)
    await node.intake.handle(raw)
    await node.idle()

    events = node.emitted.of(obj["id"])
    assert len(node.emitted.events) == 1
    assert [(e["seq"], e["state"], e["kind"], e["cn"]) for e in events] == [(1, "failed", kind, CN)]
    assert events[0]["error"]["code"] == code
    assert events[0]["error"]["retryable"] is False
    rec = await node.journal.get(obj["id"])
    assert rec is not None
    assert (rec.state, rec.kind, rec.raw, rec.attempts) == (
        TaskState.FAILED,
        kind or None,
        raw,
        0,
    )
    terminal = node.emitted.bodies_of(obj["id"])[0]
    assert rec.terminal_event == terminal
    assert await node.outbox() == node.emitted.events

    await node.intake.handle(raw)
    await node.idle()

    assert node.emitted.bodies_of(obj["id"]) == [terminal, terminal]
    assert [body for _, body in await node.outbox()] == [terminal, terminal]
    assert node.calls == []
    assert node.received == []
    assert node.dropped == []


async def test_a_rejected_id_sent_again_as_a_valid_task_is_not_run(node: Node) -> None:
    obj = envelope()
    bad = dict(obj, cn=OTHER_CN)
    await node.intake.handle(encode(bad))
    terminal = node.emitted.bodies_of(obj["id"])

    await node.intake.handle(encode(obj))
    await node.idle()

    assert node.calls == []
    assert node.emitted.bodies_of(obj["id"]) == terminal * 2
    assert json.loads(terminal[0])["error"]["code"] == "WrongNode"


# ------------------------------------------------------------------ resume


async def test_resume_submits_the_unfinished_tasks_in_arrival_order(path: Path) -> None:
    vol = new_id()
    # Ids that do not sort in arrival order, kinds that all act on one volume.
    messages = [
        envelope("zone.restart", {"uuid": vol}, id="f0000000-0000-4000-8000-000000000000"),
        envelope("snapshot.list", {"volume_uuid": vol}, id="10000000-0000-4000-8000-000000000000"),
        envelope("volume.get", {"uuid": vol}, id="a0000000-0000-4000-8000-000000000000"),
    ]
    async with await AsyncJournal.open(path) as journal:
        first = make_node(journal)
        first.release.clear()
        for obj in messages:
            await first.intake.handle(encode(obj))
        async with asyncio.timeout(HANG_S):
            await first.entered.wait()
        await first.runner.shutdown(grace_s=0.01)  # the first task is cancelled while running
        assert first.calls == [messages[0]["id"]]

    async with await AsyncJournal.open(path) as journal:
        second = make_node(journal)
        pending = await journal.pending()
        assert [p.state for p in pending] == [
            TaskState.RUNNING,
            TaskState.RECEIVED,
            TaskState.RECEIVED,
        ]
        assert await second.intake.resume(pending) == 3
        await second.idle()

        assert second.calls == [obj["id"] for obj in messages]
        assert second.received == []  # resumed, not received again
        for obj in messages:
            states = [e["state"] for e in second.emitted.of(obj["id"])]
            assert states == ["running", "succeeded"]
            rec = await journal.get(obj["id"])
            assert rec is not None
            assert rec.state is TaskState.SUCCEEDED
        await second.runner.shutdown(grace_s=HANG_S)


async def test_resume_fails_an_unfinished_task_that_is_no_longer_valid(
    journal: AsyncJournal,
) -> None:
    big = envelope(
        "volume.create",
        {"uuid": new_id(), "name": "data", "owner_uuid": new_id(), "size_mib": 4096, "nic": NIC},
    )
    small = envelope()
    for obj in (big, small):
        await journal.record_received(
            obj["id"], obj["kind"], obj["params"]["uuid"], encode(obj), None, utcnow()
        )
    # The limits were lowered while the agent was down.
    node = make_node(journal, limits=LimitsConfig(max_volume_mib=1024))

    assert await node.intake.resume(await journal.pending()) == 1
    await node.idle()

    assert node.calls == [small["id"]]
    [failed] = node.emitted.of(big["id"])
    assert (failed["state"], failed["error"]["code"], failed["kind"]) == (
        "failed",
        "InvalidParameter",
        "volume.create",
    )
    rec = await journal.get(big["id"])
    assert rec is not None
    assert rec.state is TaskState.FAILED
    await node.runner.shutdown(grace_s=HANG_S)


async def test_resume_announces_a_task_journaled_but_never_announced(
    journal: AsyncJournal,
) -> None:
    # The agent died between journaling the task and storing its accepted event.
    obj = envelope()
    await journal.record_received(
        obj["id"], obj["kind"], obj["params"]["uuid"], encode(obj), None, utcnow()
    )
    node = make_node(journal)

    assert await node.intake.resume(await journal.pending()) == 1
    await node.idle()

    events = node.emitted.of(obj["id"])
    assert [(e["seq"], e["state"]) for e in events] == [
        (1, "accepted"),
        (2, "running"),
        (3, "succeeded"),
    ]
    await node.runner.shutdown(grace_s=HANG_S)
