"""The journal on real SQLite files under tmp_path: tasks, seqs, generations, outbox, migrations."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from volagent.engine import journal as journal_module
from volagent.engine.journal import (
    MIGRATIONS,
    AsyncJournal,
    Journal,
    Migration,
    Receipt,
    Seen,
    TaskState,
    journal_path,
)
from volagent.errors import StartupError, VolagentError

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def running_event(seq: int) -> bytes:
    """The ``running`` event body a test queues with :meth:`Journal.mark_running`."""
    return b"running %d" % seq


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def raw(task_id: str, kind: str = "volume.get") -> bytes:
    return json.dumps({"v": 1, "id": task_id, "kind": kind, "params": {}}).encode()


def event(task_id: str, seq: int, state: str = "succeeded") -> bytes:
    # Odd spacing and non-ASCII on purpose: the journal must give back these exact bytes.
    return f'{{"v": 1,  "task": "{task_id}", "seq": {seq}, "state": "{state}", "ü": 1}}'.encode()


def receive(j: Journal, task_id: str, *, volume: str | None = "v1", now: datetime = T0) -> Receipt:
    return j.record_received(task_id, "volume.get", volume, raw(task_id), None, now)


def succeed(j: Journal, task_id: str, *, now: datetime = T0) -> bytes:
    terminal = event(task_id, j.next_seq(task_id))
    j.finish(task_id, TaskState.SUCCEEDED, terminal_event=terminal, now=now, result={"ok": 1})
    return terminal


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return journal_path(tmp_path / "state")


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with Journal.open(path) as j:
        yield j


def journal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("journal")]


# ---------------------------------------------------------------- opening


def test_open_makes_a_private_wal_database_at_the_latest_schema(path: Path) -> None:
    assert journal_path(Path("/var/lib/volagent")) == Path("/var/lib/volagent/journal.sqlite3")
    with Journal.open(path) as j:
        assert j.quick_check() == []
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master")}
            assert {"tasks", "volumes", "outbox"} <= tables
        finally:
            other.close()


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(path: Path) -> None:
    path.parent.mkdir()
    junk = b"this is not a database\n" * 500
    path.write_bytes(junk)
    with pytest.raises(StartupError, match="unusable") as caught:
        Journal.open(path)
    assert caught.value.details["path"] == str(path)
    assert path.read_bytes() == junk


def test_a_damaged_journal_is_refused_at_start_up(path: Path) -> None:
    with Journal.open(path) as j:
        for i in range(50):
            receive(j, f"t{i}")
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'tasks' AND name LIKE '%autoindex%'"
    ).fetchone()
    conn.close()
    with path.open("r+b") as file:  # overwrite the root page of the task id index
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)
    with pytest.raises(StartupError, match="damaged") as caught:
        Journal.open(path)
    assert caught.value.details["problems"]


def test_a_path_that_cannot_hold_the_journal_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(StartupError, match="cannot create"):
        Journal.open(tmp_path / "dir.sqlite3")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="cannot create"):
        Journal.open(tmp_path / "file" / "journal.sqlite3")


def test_a_journal_locked_by_another_process_is_a_startup_error(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Journal.open(path).close()
    monkeypatch.setattr(journal_module, "BUSY_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StartupError, match="locked"):
            Journal.open(path)
    finally:
        holder.close()
    Journal.open(path).close()


def test_a_closed_journal_refuses_calls(path: Path) -> None:
    j = Journal.open(path)
    j.close()
    j.close()
    with pytest.raises(VolagentError, match="closed"):
        j.get("t1")


# ---------------------------------------------------------------- tasks


def test_record_received_is_idempotent_and_says_what_it_knew(journal: Journal) -> None:
    first = journal.record_received("t1", "volume.create", "v1", raw("t1"), at(600), T0)
    assert first.seen is Seen.NEW
    task = first.task
    assert (task.id, task.kind, task.volume_uuid, task.state) == (
        "t1",
        "volume.create",
        "v1",
        TaskState.RECEIVED,
    )
    assert (task.raw, task.deadline, task.received) == (raw("t1"), at(600), T0)
    assert (task.started, task.finished, task.attempts, task.seq) == (None, None, 0, 0)
    assert first.terminal_event is None

    again = journal.record_received("t1", "volume.create", "v1", raw("t1"), at(600), at(5))
    assert again.seen is Seen.PENDING
    assert again.task == task

    journal.mark_running("t1", at(1), running_event)
    assert receive(journal, "t1").seen is Seen.PENDING
    terminal = succeed(journal, "t1", now=at(2))

    other_content = journal.record_received("t1", "volume.get", None, b"{}", None, at(9))
    assert other_content.seen is Seen.FINISHED
    assert other_content.terminal_event == terminal
    assert other_content.task.raw == raw("t1")
    assert journal.counts_by_state()[TaskState.SUCCEEDED] == 1


def test_a_new_tasks_accepted_event_is_queued_with_it_and_a_known_ones_is_not(
    journal: Journal,
) -> None:
    def accepted(seq: int) -> bytes:
        return b"accepted %d" % seq

    first = journal.record_received("t1", "volume.get", "v1", raw("t1"), None, T0, accepted)
    assert first.seen is Seen.NEW
    assert first.task.seq == 1
    assert first.accepted is not None
    event_id, body = first.accepted
    assert body == b"accepted 1"
    assert journal.events_queued(10) == [(event_id, b"accepted 1")]

    again = journal.record_received("t1", "volume.get", "v1", raw("t1"), None, at(1), accepted)
    assert (again.seen, again.accepted) == (Seen.PENDING, None)
    assert journal.events_queued(10) == [(event_id, b"accepted 1")]
    # The next event of the task follows the accepted one.
    assert journal.mark_running("t1", at(2), running_event)[1] == b"running 2"


def test_a_failing_accepted_event_leaves_no_task_behind(journal: Journal) -> None:
    def broken(seq: int) -> bytes:
        raise ValueError(seq)

    with pytest.raises(ValueError, match="1"):
        journal.record_received("t1", "volume.get", "v1", raw("t1"), None, T0, broken)
    assert journal.get("t1") is None
    assert journal.events_queued(10) == []
    assert receive(journal, "t1").seen is Seen.NEW


def test_a_finished_tasks_terminal_event_comes_back_byte_for_byte_after_reopen(
    path: Path,
) -> None:
    with Journal.open(path) as j:
        receive(j, "ok")
        receive(j, "bad", volume=None)
        ok_event = succeed(j, "ok", now=at(3))
        bad_event = event("bad", j.next_seq("bad"), "failed")
        error = {"code": "VolumeNotFound", "message": "no", "retryable": False, "details": {}}
        j.finish("bad", TaskState.FAILED, terminal_event=bad_event, now=at(4), error=error)
    with Journal.open(path) as j:
        ok, bad = receive(j, "ok", now=at(10)), receive(j, "bad", now=at(10))
        assert (ok.seen, ok.terminal_event) == (Seen.FINISHED, ok_event)
        assert (bad.seen, bad.terminal_event) == (Seen.FINISHED, bad_event)
        assert (ok.task.state, ok.task.result, ok.task.error) == (
            TaskState.SUCCEEDED,
            {"ok": 1},
            None,
        )
        assert (bad.task.state, bad.task.result, bad.task.error) == (TaskState.FAILED, None, error)
        assert (ok.task.finished, bad.task.finished) == (at(3), at(4))


def test_seq_is_monotonic_across_reopen_and_ends_with_the_task(path: Path) -> None:
    with Journal.open(path) as j:
        receive(j, "t1")
        assert [j.next_seq("t1") for _ in range(3)] == [1, 2, 3]
    with Journal.open(path) as j:
        assert j.next_seq("t1") == 4
        task = j.get("t1")
        assert task is not None
        assert task.seq == 4
        succeed(j, "t1")
        with pytest.raises(VolagentError, match="already succeeded"):
            j.next_seq("t1")
        with pytest.raises(VolagentError, match="not in the journal"):
            j.next_seq("nope")


def test_finish_numbered_takes_the_next_seq_in_the_same_transaction(path: Path) -> None:
    with Journal.open(path) as j:
        receive(j, "t1")
        assert j.next_seq("t1") == 1
        event_id, body = j.finish_numbered(
            "t1",
            TaskState.SUCCEEDED,
            lambda seq: event("t1", seq),
            now=at(2),
            result={"ok": True},
        )
        assert json.loads(body)["seq"] == 2
        task = j.get("t1")
        assert task is not None
        assert (task.state, task.seq, task.terminal_event) == (TaskState.SUCCEEDED, 2, body)
        assert j.events_queued(10) == [(event_id, body)]
        with pytest.raises(VolagentError, match="already succeeded"):
            j.finish_numbered("t1", TaskState.SUCCEEDED, lambda _seq: b"{}", now=at(3), result=1)
        task = j.get("t1")
        assert task is not None
        assert task.seq == 2  # a refused finish takes no number


def test_finish_numbered_that_fails_to_build_its_event_changes_nothing(path: Path) -> None:
    with Journal.open(path) as j:
        receive(j, "t1")

        def broken(seq: int) -> bytes:
            msg = f"cannot render event {seq}"
            raise RuntimeError(msg)

        with pytest.raises(RuntimeError):
            j.finish_numbered("t1", TaskState.SUCCEEDED, broken, now=at(2), result={})
        task = j.get("t1")
        assert task is not None
        assert (task.state, task.seq) == (TaskState.RECEIVED, 0)
        assert j.events_queued(10) == []


def test_mark_running_counts_attempts_and_keeps_the_first_start(path: Path) -> None:
    with Journal.open(path) as j:
        receive(j, "t1")
        j.mark_running("t1", at(1), running_event)
    with Journal.open(path) as j:
        (interrupted,) = j.pending()
        assert (interrupted.state, interrupted.attempts, interrupted.started) == (
            TaskState.RUNNING,
            1,
            at(1),
        )
        j.mark_running("t1", at(5), running_event)
        task = j.get("t1")
        assert task is not None
        assert (task.attempts, task.started, task.seq) == (2, at(1), 2)
        # Each start queued its numbered running event with it.
        assert [body for _, body in j.events_queued(10)] == [b"running 1", b"running 2"]
        succeed(j, "t1")
        queued = j.events_queued(10)
        with pytest.raises(VolagentError, match="already succeeded"):
            j.mark_running("t1", at(6), running_event)
        with pytest.raises(VolagentError, match="not in the journal"):
            j.mark_running("nope", at(6), running_event)
        assert j.events_queued(10) == queued


@pytest.mark.parametrize(
    ("state", "result", "error"),
    [
        (TaskState.SUCCEEDED, {"a": 1}, {"code": "Internal"}),
        (TaskState.FAILED, None, None),
        (TaskState.FAILED, {"a": 1}, {"code": "Internal"}),
        (TaskState.RUNNING, {"a": 1}, None),
    ],
)
def test_finish_refuses_inconsistent_outcomes(
    journal: Journal, state: TaskState, result: object, error: dict[str, str] | None
) -> None:
    receive(journal, "t1")
    with pytest.raises(ValueError, match=r"task|terminal"):
        journal.finish("t1", state, terminal_event=b"{}", now=T0, result=result, error=error)
    assert journal.pending()[0].state is TaskState.RECEIVED


def test_a_task_finishes_once_and_times_need_a_zone(journal: Journal) -> None:
    receive(journal, "t1")
    with pytest.raises(ValueError, match="time zone"):
        journal.finish(
            "t1", TaskState.SUCCEEDED, terminal_event=b"{}", now=T0.replace(tzinfo=None), result=1
        )
    assert journal.pending()[0].state is TaskState.RECEIVED
    journal.finish("t1", TaskState.SUCCEEDED, terminal_event=b"first", now=T0, result=1)
    with pytest.raises(VolagentError, match="already succeeded"):
        journal.finish("t1", TaskState.SUCCEEDED, terminal_event=b"second", now=T0, result=2)
    task = journal.get("t1")
    assert task is not None
    assert (task.terminal_event, task.result) == (b"first", 1)
    with pytest.raises(VolagentError, match="not in the journal"):
        journal.finish("nope", TaskState.SUCCEEDED, terminal_event=b"{}", now=T0)


def test_pending_after_a_crash_lists_unfinished_tasks_in_arrival_order(path: Path) -> None:
    crashed = Journal.open(path)
    for task_id in ("t-3", "t-1", "t-4", "t-2"):
        receive(crashed, task_id)
    crashed.mark_running("t-1", at(1), running_event)
    succeed(crashed, "t-4")
    # No close: the process "dies" with the connection open; a new one opens the file.
    with Journal.open(path) as j:
        pending = j.pending()
        assert [(t.id, t.state) for t in pending] == [
            ("t-3", TaskState.RECEIVED),
            ("t-1", TaskState.RUNNING),
            ("t-2", TaskState.RECEIVED),
        ]
        assert j.counts_by_state() == {
            TaskState.RECEIVED: 2,
            TaskState.RUNNING: 1,
            TaskState.SUCCEEDED: 1,
            TaskState.FAILED: 0,
        }
    crashed.close()


def test_get_returns_none_for_an_unknown_task(journal: Journal) -> None:
    assert journal.get("never") is None
    assert journal.pending() == []
    assert set(journal.counts_by_state().values()) == {0}


def test_prune_forgets_old_finished_tasks_beyond_the_bounds_never_pending_ones(
    journal: Journal,
) -> None:
    receive(journal, "old-received", now=at(-100))
    receive(journal, "old-running", now=at(-100))
    journal.mark_running("old-running", at(-99), running_event)
    for i in range(6):
        receive(journal, f"done-{i}")
        succeed(journal, f"done-{i}", now=at(i))

    assert journal.prune(older_than=at(4), keep_at_least=1) == 4
    assert [i for i in range(6) if journal.get(f"done-{i}")] == [4, 5]
    assert journal.prune(older_than=at(100), keep_at_least=1) == 1
    assert journal.get("done-5") is not None
    assert journal.prune(older_than=at(100), keep_at_least=0) == 1
    assert journal.prune(older_than=at(100), keep_at_least=0) == 0
    assert [t.id for t in journal.pending()] == ["old-received", "old-running"]
    # A pruned id is new again: retention must outlast the broker's redelivery.
    assert receive(journal, "done-0").seen is Seen.NEW
    with pytest.raises(ValueError, match="negative"):
        journal.prune(older_than=at(0), keep_at_least=-1)


# ---------------------------------------------------------------- volumes


def test_generations_are_monotonic_per_volume_and_survive_reopen(path: Path) -> None:
    with Journal.open(path) as j:
        assert j.generation("a") == 0
        assert [j.bump_generation("a") for _ in range(3)] == [1, 2, 3]
        assert j.bump_generation("b") == 1
    with Journal.open(path) as j:
        assert (j.generation("a"), j.generation("b")) == (3, 1)
        assert j.bump_generation("a") == 4


def test_save_volume_stores_the_object_and_queues_its_report_together(journal: Journal) -> None:
    body1 = json.dumps({"uuid": "a", "generation": 1, "state": "creating"}).encode()
    body2 = json.dumps({"uuid": "a", "generation": 2, "state": "ready"}).encode()
    assert journal.bump_generation("a") == 1
    assert journal.save_volume("a", 1, body1, now=at(1), report=True)
    stored = journal.volume("a")
    assert stored is not None
    assert (stored.uuid, stored.generation, stored.body, stored.updated) == ("a", 1, body1, at(1))
    assert stored.data()["state"] == "creating"
    (entry,) = journal.outbox_peek(10)
    assert (entry.volume_uuid, entry.generation, entry.body, entry.queued) == ("a", 1, body1, at(1))

    assert journal.bump_generation("a") == 2
    assert journal.save_volume("a", 2, body2, now=at(2), report=False)
    assert journal.outbox_depth() == 1
    assert not journal.save_volume("a", 1, body1, now=at(3), report=True)  # stale: ignored
    stored = journal.volume("a")
    assert stored is not None
    assert stored.body == body2
    assert journal.outbox_depth() == 1
    for generation in (0, 3):
        with pytest.raises(VolagentError, match="never handed out"):
            journal.save_volume("a", generation, body2, now=at(4), report=True)
    with pytest.raises(VolagentError, match="never handed out"):
        journal.save_volume("unknown", 1, body2, now=at(4), report=True)

    journal.bump_generation("c")  # bumped, never saved: no object to list
    journal.bump_generation("0")
    journal.save_volume("0", 1, b"{}", now=at(5), report=False)
    assert [v.uuid for v in journal.volumes()] == ["0", "a"]
    assert journal.volume("c") is None


# ---------------------------------------------------------------- outbox


def test_outbox_keeps_queue_order_per_volume(journal: Journal) -> None:
    for volume in ("a", "b"):
        journal.bump_generation(volume)
    puts = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
    ids = [journal.outbox_put(v, g, f"{v}{g}".encode(), now=at(i)) for i, (v, g) in enumerate(puts)]
    assert ids == sorted(ids)

    def seen(entries: list[journal_module.OutboxEntry]) -> list[bytes]:
        return [e.body for e in entries]

    assert seen(journal.outbox_peek(10)) == [b"a1", b"b1", b"a2", b"a3", b"b2"]
    assert seen(journal.outbox_peek(2)) == [b"a1", b"b1"]
    assert seen(journal.outbox_peek(10, per_volume=1)) == [b"a1", b"b1"]
    assert seen(journal.outbox_peek(10, per_volume=2)) == [b"a1", b"b1", b"a2", b"b2"]
    assert journal.outbox_depth() == 5
    assert journal.outbox_oldest_age(at(10)) == 10.0

    assert journal.outbox_ack(ids[0])
    assert not journal.outbox_ack(ids[0])
    assert seen(journal.outbox_peek(10, per_volume=1)) == [b"b1", b"a2"]
    assert journal.outbox_oldest_age(at(10)) == 9.0
    for entry_id in ids[1:]:
        assert journal.outbox_ack(entry_id)
    assert (journal.outbox_depth(), journal.outbox_peek(10)) == (0, [])
    assert journal.outbox_oldest_age(at(10)) == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        journal.outbox_peek(0)
    with pytest.raises(ValueError, match="at least 1"):
        journal.outbox_peek(5, per_volume=0)


def test_outbox_entries_need_a_known_volume(journal: Journal) -> None:
    with pytest.raises(VolagentError, match="could not queue a report"):
        journal.outbox_put("never-bumped", 1, b"{}", now=T0)
    assert journal.outbox_depth() == 0


def test_outbox_survives_reopen_and_never_reuses_an_id(path: Path) -> None:
    with Journal.open(path) as j:
        j.bump_generation("a")
        first = j.outbox_put("a", 1, b"a1", now=T0)
        last = j.outbox_put("a", 1, b"a1-again", now=T0)
        assert j.outbox_ack(last)
    with Journal.open(path) as j:
        assert [e.id for e in j.outbox_peek(10)] == [first]
        assert j.outbox_put("a", 1, b"a1-third", now=T0) > last


# ---------------------------------------------------------------- migrations


def _add_note(conn: sqlite3.Connection) -> None:
    """A test-only migration 2: a new column filled from the existing rows."""
    conn.execute("ALTER TABLE tasks ADD COLUMN note TEXT")
    conn.execute("UPDATE tasks SET note = 'was ' || state")


def _half_then_fail(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE tasks ADD COLUMN note TEXT")
    conn.execute("UPDATE tasks SET note = 'half'")
    msg = "migration bug"
    raise RuntimeError(msg)


def _columns(path: Path) -> tuple[int, list[str]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        columns = [row[1] for row in conn.execute("PRAGMA table_info(tasks)")]
    finally:
        conn.close()
    return version, columns


def test_a_journal_with_data_is_migrated_once(path: Path) -> None:
    latest = len(MIGRATIONS)
    with Journal.open(path) as j:
        receive(j, "t1")
        receive(j, "t2")
        succeed(j, "t2")
        j.bump_generation("a")
        before = (j.get("t1"), j.get("t2"))
    assert _columns(path)[0] == latest

    applied: list[int] = []

    def counted(conn: sqlite3.Connection) -> None:
        applied.append(latest + 1)
        _add_note(conn)

    migrations: tuple[Migration, ...] = (*MIGRATIONS, counted)
    for _ in range(2):
        with Journal.open(path, migrations=migrations) as j:
            assert (j.get("t1"), j.get("t2")) == before
            assert j.generation("a") == 1
    assert applied == [latest + 1]
    version, columns = _columns(path)
    assert (version, columns[-1]) == (latest + 1, "note")
    conn = sqlite3.connect(path)
    notes = conn.execute("SELECT id, note FROM tasks ORDER BY id").fetchall()
    conn.close()
    assert notes == [("t1", "was received"), ("t2", "was succeeded")]


def test_a_version_1_journal_gains_steps_and_the_event_outbox(path: Path) -> None:
    with Journal.open(path, migrations=MIGRATIONS[:1]):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO tasks (id, kind, volume_uuid, state, raw, received)"
            " VALUES ('t1', 'volume.get', 'v1', 'received', x'7b7d', '2026-11-21T10:00:00.000000Z')"
        )
    conn.close()
    with Journal.open(path) as j:
        task = j.get("t1")
        assert task is not None
        assert task.steps == ()
        j.step_done("t1", "made")
        _, body = j.add_event("t1", lambda seq: f"e{seq}".encode())
        assert body == b"e1"
        assert [b for _, b in j.events_queued(10)] == [b"e1"]
        assert j.get("t1") is not None
        assert j.get("t1").steps == ("made",)  # type: ignore[union-attr]  # checked just above
    assert _columns(path)[0] == len(MIGRATIONS)


def test_a_failing_migration_leaves_the_journal_as_it_was(path: Path) -> None:
    with Journal.open(path) as j:
        receive(j, "t1")
    latest = len(MIGRATIONS)
    with pytest.raises(
        StartupError, match=f"could not be migrated to schema {latest + 1}"
    ) as caught:
        Journal.open(path, migrations=(*MIGRATIONS, _half_then_fail))
    assert isinstance(caught.value.__cause__, RuntimeError)
    version, columns = _columns(path)
    assert (version, "note" in columns) == (latest, False)
    with Journal.open(path, migrations=(*MIGRATIONS, _add_note)) as j:
        assert j.get("t1") is not None
    assert _columns(path)[0] == latest + 1


def test_a_journal_written_by_a_newer_agent_is_refused(path: Path) -> None:
    Journal.open(path, migrations=(*MIGRATIONS, _add_note)).close()
    with pytest.raises(StartupError, match="newer volagent") as caught:
        Journal.open(path)
    assert caught.value.details["version"] == len(MIGRATIONS) + 1


# ---------------------------------------------------------------- async facade


async def test_the_facade_runs_every_call_on_one_worker_thread(path: Path) -> None:
    before = set(journal_threads())
    async with await AsyncJournal.open(path) as aj:
        assert aj.path == path
        idents = {await aj._call(threading.get_ident) for _ in range(20)}
        (worker,) = set(journal_threads()) - before
        assert idents == {worker.ident}
        assert threading.get_ident() not in idents
    worker.join(timeout=10)
    assert not worker.is_alive()


async def test_the_facade_covers_the_whole_api(path: Path) -> None:
    async with await AsyncJournal.open(path) as aj:
        receipt = await aj.record_received("t1", "volume.get", "a", raw("t1"), None, T0)
        assert receipt.seen is Seen.NEW
        assert await aj.mark_running("t1", at(1), running_event) == (1, b"running 1")
        assert await aj.next_seq("t1") == 2
        await aj.finish("t1", TaskState.SUCCEEDED, terminal_event=b"e", now=at(2), result={})
        await aj.record_received("t2", "volume.get", "a", raw("t2"), None, T0)
        await aj.finish("t2", TaskState.FAILED, terminal_event=b"f", now=at(2), error={"c": 1})
        task = await aj.get("t1")
        assert task is not None
        assert (task.state, task.terminal_event) == (TaskState.SUCCEEDED, b"e")
        assert await aj.pending() == []
        assert (await aj.counts_by_state())[TaskState.FAILED] == 1
        assert await aj.prune(at(3), 1) == 1
        assert await aj.bump_generation("a") == 1
        assert await aj.generation("a") == 1
        assert await aj.save_volume("a", 1, b'{"g":1}', now=at(4), report=True)
        assert (await aj.volume("a")) == (await aj.volumes())[0]
        entry_id = await aj.outbox_put("a", 1, b"again", now=at(5))
        assert [e.body for e in await aj.outbox_peek(5, per_volume=2)] == [b'{"g":1}', b"again"]
        assert await aj.outbox_depth() == 2
        assert await aj.outbox_oldest_age(at(10)) == 6.0
        assert await aj.outbox_ack(entry_id)
        assert await aj.quick_check() == []
    with pytest.raises(VolagentError, match="closed"):
        await aj.get("t1")
    await aj.close()


async def test_many_coroutines_recording_at_once_each_get_one_answer(path: Path) -> None:
    ids = [f"t{i}" for i in range(200)]
    async with await AsyncJournal.open(path) as aj:
        receipts = await asyncio.gather(
            *(aj.record_received(t, "volume.get", "a", raw(t), None, T0) for t in ids * 2)
        )
        seen = {(r.task.id, r.seen) for r in receipts}
        assert seen == {(t, Seen.NEW) for t in ids} | {(t, Seen.PENDING) for t in ids}
        seqs = await asyncio.gather(*(aj.next_seq("t0") for _ in range(300)))
        assert sorted(seqs) == list(range(1, 301))
        gens = await asyncio.gather(*(aj.bump_generation("a") for _ in range(100)))
        assert sorted(gens) == list(range(1, 101))
        pending = await aj.pending()
        assert [t.id for t in pending] == ids


async def test_close_lets_the_calls_already_made_finish(path: Path) -> None:
    aj = await AsyncJournal.open(path)
    calls = [
        asyncio.create_task(aj.record_received(f"t{i}", "k", None, b"{}", None, T0))
        for i in range(50)
    ]
    await asyncio.sleep(0)  # every call has reached the worker's queue
    await aj.close()
    assert {r.seen for r in await asyncio.gather(*calls)} == {Seen.NEW}
    with Journal.open(path) as j:
        assert len(j.pending()) == 50


@pytest.fixture
def junk(path: Path) -> Path:
    path.parent.mkdir()
    path.write_bytes(b"not a database" * 1000)
    return path


async def test_a_facade_that_cannot_open_raises_and_leaves_no_thread(junk: Path) -> None:
    before = set(journal_threads())
    with pytest.raises(StartupError):
        await AsyncJournal.open(junk)
    for thread in set(journal_threads()) - before:
        thread.join(timeout=10)
    assert set(journal_threads()) - before == set()


# ---------------------------------------------------------------- events and steps


def test_events_are_numbered_queued_and_acknowledged_in_order(journal: Journal) -> None:
    receive(journal, "t1")
    receive(journal, "t2")
    first, b1 = journal.add_event("t1", lambda seq: event("t1", seq, "accepted"))
    _, b2 = journal.add_event("t2", lambda seq: event("t2", seq, "accepted"))
    _, b3 = journal.add_event("t1", lambda seq: event("t1", seq, "running"))
    assert json.loads(b3)["seq"] == 2
    terminal = event("t1", journal.next_seq("t1"))
    last = journal.finish(
        "t1", TaskState.SUCCEEDED, terminal_event=terminal, now=T0, result={}, publish=True
    )
    assert [body for _, body in journal.events_queued(10)] == [b1, b2, b3, terminal]
    assert journal.events_ack([first]) == 1
    assert [body for _, body in journal.events_queued(10)] == [b2, b3, terminal]
    assert [body for _, body in journal.events_queued(10, after=first + 1)] == [b3, terminal]
    assert last is not None
    queued = [event_id for event_id, _ in journal.events_queued(10)]
    assert journal.events_ack([*queued, 999]) == 3
    assert journal.events_queued(10) == []
    again = journal.queue_event("t1", terminal)
    assert journal.events_queued(10) == [(again, terminal)]


def test_no_event_for_a_finished_or_unknown_task(journal: Journal) -> None:
    receive(journal, "t1")
    succeed(journal, "t1")
    with pytest.raises(VolagentError, match="already succeeded"):
        journal.add_event("t1", lambda seq: str(seq).encode())
    with pytest.raises(VolagentError, match="not in the journal"):
        journal.add_event("nope", lambda seq: str(seq).encode())
    assert journal.events_queued(10) == []


def test_steps_are_recorded_once_each_and_only_while_unfinished(journal: Journal) -> None:
    receive(journal, "t1")
    for step in ("dataset", "zone", "dataset"):
        journal.step_done("t1", step)
    task = journal.get("t1")
    assert task is not None
    assert task.steps == ("dataset", "zone")
    succeed(journal, "t1")
    with pytest.raises(VolagentError, match="already succeeded"):
        journal.step_done("t1", "late")
