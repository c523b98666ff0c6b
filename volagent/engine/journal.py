"""The journal: the tasks, volume generations and pending reports the agent keeps across restarts.

One SQLite database, ``<state.dir>/journal.sqlite3``, in WAL mode, holds:

* **tasks**, one row per task id ever received (until pruned): kind, volume uuid, the raw task
  message, deadline, state (``received`` → ``running`` → ``succeeded`` | ``failed``), the times
  of each step, how often it was started, the last event ``seq`` handed out, the result or
  error, and the exact bytes of its terminal event;
* **volumes**: each volume's ``generation`` counter and the last volume object saved for it;
* **outbox**: volume reports waiting to be delivered to the central API, in queue order;
* **events**: task events waiting for the broker's confirmation, in the order they were made
  (a task's events are numbered and queued in one transaction, so none is lost to a crash);
* each task's finished **steps**, so that a resumed task skips what must not happen twice.

Delivery rules built on it (see ``docs/protocol.md``): a task counts as received once
:meth:`Journal.record_received` has returned, because its row is committed by then. A task id
seen before is never run again: the :class:`Receipt` says whether the id is new, still pending
(nothing new to do), or finished, and then carries the terminal event to publish again byte for
byte. Tasks still ``received`` or ``running`` when the agent stopped are returned by
:meth:`Journal.pending` at the next start, in arrival order, for the runner to resume.

Durability: ``synchronous=NORMAL`` with WAL. A commit has written its frames to the WAL file
with ``write(2)`` before it returns, so it is in the kernel's page cache and survives the death
of the process (kill -9, OOM killer, a crash), which is what the delivery rules need; it costs
about 20 µs where ``FULL`` (an fsync per commit) costs about 200 µs, with a p99 of 4 ms, on
the test bed. A power loss or kernel crash keeps the database consistent but may lose the last
commits; that window is covered elsewhere: the broker's own persistence is periodic, ZFS is
the source of truth for volumes, and every task step is idempotent.

Schema changes are the ordered :data:`MIGRATIONS`; the schema version is ``PRAGMA
user_version``, and each migration runs in its own transaction when the journal opens.

:class:`Journal` is blocking and must stay on the thread that opened it (sqlite3's
``check_same_thread``). The engine uses :class:`AsyncJournal`, which opens the journal on one
dedicated worker thread and runs every call there, so that calls are serialised in the order
they were made and the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, ParamSpec, Self, TypeVar

import structlog

from volagent.errors import StartupError, VolagentError

__all__ = [
    "FILENAME",
    "MIGRATIONS",
    "AsyncJournal",
    "Journal",
    "Migration",
    "OutboxEntry",
    "Receipt",
    "Seen",
    "StoredVolume",
    "TaskRecord",
    "TaskState",
    "journal_path",
]

_log = structlog.get_logger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")

#: The journal's file name in ``state.dir``.
FILENAME: Final = "journal.sqlite3"
#: How long a call waits for a lock held by another process before it fails.
BUSY_TIMEOUT_S: Final = 5.0
#: The WAL file is truncated back to this size after a checkpoint (it keeps its peak otherwise).
WAL_SIZE_LIMIT: Final = 8 * 1024 * 1024

#: A schema change: statements run inside the transaction the migration runner opened, so a
#: migration must not commit (``executescript`` would) and fails as a whole or not at all.
Migration = Callable[[sqlite3.Connection], None]


def journal_path(state_dir: Path) -> Path:
    """The journal file under the agent's state directory (config ``state.dir``)."""
    return state_dir / FILENAME


# ---------------------------------------------------------------- records


class TaskState(StrEnum):
    """Where a task is: ``received`` → ``running`` → ``succeeded`` | ``failed``."""

    RECEIVED = "received"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """Whether this state is terminal."""
        return self in {TaskState.SUCCEEDED, TaskState.FAILED}


def _check_end(state: TaskState, result: Any, error: Mapping[str, Any] | None) -> None:
    """Refuse a terminal state that does not go with its result or error."""
    if state is TaskState.SUCCEEDED:
        if error is not None:
            msg = "a succeeded task has no error"
            raise ValueError(msg)
    elif state is TaskState.FAILED:
        if error is None or result is not None:
            msg = "a failed task has an error and no result"
            raise ValueError(msg)
    else:
        raise ValueError(f"{state} is not a terminal state")


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as the journal holds it.

    ``attempts`` counts the times it was marked running: a task returned by
    :meth:`Journal.pending` in state ``running`` was interrupted that many times. ``seq`` is
    the last event sequence number handed out (0: none yet). ``result`` and ``error`` are the
    decoded JSON saved by :meth:`Journal.finish`; ``terminal_event`` the exact bytes published.
    """

    id: str
    kind: str | None
    volume_uuid: str | None
    state: TaskState
    raw: bytes
    deadline: datetime | None
    received: datetime
    started: datetime | None
    finished: datetime | None
    attempts: int
    seq: int
    result: Any
    error: dict[str, Any] | None
    terminal_event: bytes | None
    #: The steps recorded done with :meth:`Journal.step_done`, in the order they were done.
    steps: tuple[str, ...] = ()


class Seen(StrEnum):
    """What :meth:`Journal.record_received` found for a task id."""

    #: First sight: the task is now recorded and the caller runs it.
    NEW = "new"
    #: Known, received or running: nothing new to do.
    PENDING = "pending"
    #: Finished: publish :attr:`Receipt.terminal_event` again, unchanged.
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Receipt:
    """The answer of :meth:`Journal.record_received`: what was known and the task as stored."""

    seen: Seen
    task: TaskRecord
    #: The ``accepted`` event queued with a new task (outbox id, bytes), when one was asked.
    accepted: tuple[int, bytes] | None = None

    @property
    def terminal_event(self) -> bytes | None:
        """The stored terminal event of a finished task, else None."""
        return self.task.terminal_event


@dataclass(frozen=True, slots=True)
class StoredVolume:
    """The last volume object saved for a volume: its JSON bytes and their generation."""

    uuid: str
    generation: int
    body: bytes
    updated: datetime

    def data(self) -> Any:
        """The decoded volume object."""
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A volume report waiting for the central API; ``id`` grows in queue order."""

    id: int
    volume_uuid: str
    generation: int
    body: bytes
    queued: datetime


# ---------------------------------------------------------------- schema


def _initial_schema(conn: sqlite3.Connection) -> None:
    """Migration 1: tasks, volumes and the report outbox."""
    for statement in (
        """
        CREATE TABLE tasks (
            arrival        INTEGER PRIMARY KEY,
            id             TEXT    NOT NULL UNIQUE,
            kind           TEXT,
            volume_uuid    TEXT,
            state          TEXT    NOT NULL
                           CHECK (state IN ('received', 'running', 'succeeded', 'failed')),
            raw            BLOB    NOT NULL,
            deadline       TEXT,
            received       TEXT    NOT NULL,
            started        TEXT,
            finished       TEXT,
            attempts       INTEGER NOT NULL DEFAULT 0,
            seq            INTEGER NOT NULL DEFAULT 0,
            result         TEXT,
            error          TEXT,
            terminal_event BLOB,
            CHECK ((state IN ('succeeded', 'failed')) = (finished IS NOT NULL)),
            CHECK ((finished IS NULL) = (terminal_event IS NULL))
        )
        """,
        "CREATE INDEX tasks_pending ON tasks (arrival) WHERE state IN ('received', 'running')",
        "CREATE INDEX tasks_finished ON tasks (finished) WHERE finished IS NOT NULL",
        """
        CREATE TABLE volumes (
            uuid            TEXT    PRIMARY KEY,
            generation      INTEGER NOT NULL CHECK (generation >= 1),
            body            BLOB,
            body_generation INTEGER,
            updated         TEXT,
            CHECK ((body IS NULL) = (body_generation IS NULL))
        )
        """,
        """
        CREATE TABLE outbox (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            volume_uuid TEXT    NOT NULL REFERENCES volumes (uuid),
            generation  INTEGER NOT NULL,
            body        BLOB    NOT NULL,
            queued      TEXT    NOT NULL
        )
        """,
        "CREATE INDEX outbox_volume ON outbox (volume_uuid, id)",
    ):
        conn.execute(statement)


def _events_and_steps(conn: sqlite3.Connection) -> None:
    """Migration 2: the task-event outbox, and the steps a task has finished."""
    for statement in (
        "ALTER TABLE tasks ADD COLUMN steps TEXT NOT NULL DEFAULT '[]'",
        """
        CREATE TABLE events (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT    NOT NULL,
            body    BLOB    NOT NULL
        )
        """,
    ):
        conn.execute(statement)


#: The schema's history: migration ``n`` (1-based) brings ``user_version`` from n-1 to n.
MIGRATIONS: Final[tuple[Migration, ...]] = (_initial_schema, _events_and_steps)

_TASK_COLUMNS: Final = (
    "id, kind, volume_uuid, state, raw, deadline, received, started, finished, attempts, seq,"
    " result, error, terminal_event, steps"
)
_OUTBOX_COLUMNS: Final = "id, volume_uuid, generation, body, queued"


# ---------------------------------------------------------------- conversions


def _aware(moment: datetime) -> datetime:
    if moment.utcoffset() is None:
        raise ValueError(f"the journal needs times with a time zone, not {moment!r}")
    return moment


def _ts(moment: datetime) -> str:
    """Store a time as fixed-width UTC ISO 8601 text, which sorts in time order."""
    _aware(moment)
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _opt_time(text: str | None) -> datetime | None:
    return None if text is None else _time(text)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _task(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        id=row["id"],
        kind=row["kind"],
        volume_uuid=row["volume_uuid"],
        state=TaskState(row["state"]),
        raw=row["raw"],
        deadline=_opt_time(row["deadline"]),
        received=_time(row["received"]),
        started=_opt_time(row["started"]),
        finished=_opt_time(row["finished"]),
        attempts=row["attempts"],
        seq=row["seq"],
        result=None if row["result"] is None else json.loads(row["result"]),
        error=None if row["error"] is None else json.loads(row["error"]),
        terminal_event=row["terminal_event"],
        steps=tuple(json.loads(row["steps"])),
    )


def _entry(row: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        row["id"], row["volume_uuid"], row["generation"], row["body"], _time(row["queued"])
    )


def _volume(row: sqlite3.Row) -> StoredVolume:
    return StoredVolume(row["uuid"], row["body_generation"], row["body"], _time(row["updated"]))


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one write transaction: committed at the end, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


# ---------------------------------------------------------------- opening


def _create_file(path: Path) -> None:
    """Create the state directory and an empty, private journal file if they are missing."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLite gives its -wal and -shm files the mode of the database file.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise StartupError(
            f"cannot create the journal {path}: {exc.strerror or exc}", details={"path": str(path)}
        ) from exc


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StartupError(
            f"the journal {path} cannot use WAL mode (the file system gave {mode!r})",
            details={"path": str(path)},
        )
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")


def _quick_check(conn: sqlite3.Connection) -> list[str]:
    """Run ``PRAGMA quick_check``: one line per problem (without SQLite's ``***`` headings)."""
    lines = [
        line for row in conn.execute("PRAGMA quick_check") for line in str(row[0]).splitlines()
    ]
    return [] if lines == ["ok"] else [line for line in lines if not line.startswith("***")]


def _check_sound(conn: sqlite3.Connection, path: Path) -> None:
    problems = _quick_check(conn)
    if problems:
        raise StartupError(
            f"the journal {path} is damaged: {problems[0]}",
            details={"path": str(path), "problems": problems[:20]},
        )


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    """Apply the migrations the file lacks, one transaction each; return the schema version.

    The version is read inside each migration's write transaction, so two processes opening
    the same file at once cannot both apply the same migration.
    """
    while True:
        with _transaction(conn):
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(migrations):
                raise StartupError(
                    f"the journal {path} has schema version {version}, newer than this agent"
                    f" knows ({len(migrations)}); it was written by a newer volagent",
                    details={"path": str(path), "version": version, "known": len(migrations)},
                )
            if version == len(migrations):
                return version
            try:
                migrations[version](conn)
            except Exception as exc:
                raise StartupError(
                    f"the journal {path} could not be migrated to schema {version + 1}: {exc}",
                    details={"path": str(path), "version": version},
                ) from exc
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
        _log.info("journal migrated", path=str(path), schema_version=version + 1)


# ---------------------------------------------------------------- the journal


class Journal:
    """The blocking journal over one SQLite connection; use it from one thread only.

    Every method that changes something commits before it returns. Database failures after
    opening raise :class:`~volagent.errors.VolagentError` (wire code ``Internal``); opening
    raises :class:`~volagent.errors.StartupError` when the file is unusable.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        """Wrap an open, configured and migrated connection; use :meth:`open`."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    def open(cls, path: Path, *, migrations: Sequence[Migration] = MIGRATIONS) -> Journal:
        """Open (creating if needed) the journal at ``path``, check it and bring its schema up.

        Raises :class:`~volagent.errors.StartupError` when the file cannot be created or
        opened, is not a database, fails ``PRAGMA quick_check``, cannot use WAL, is locked by
        another process for longer than :data:`BUSY_TIMEOUT_S`, has a schema newer than
        ``migrations``, or a migration fails (which then leaves the file as it was).
        """
        _create_file(path)
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise StartupError(
                f"cannot open the journal {path}: {exc}", details={"path": str(path)}
            ) from exc
        try:
            _configure(conn, path)
            _check_sound(conn, path)
            version = _migrate(conn, path, migrations)
        except sqlite3.Error as exc:
            conn.close()
            raise StartupError(
                f"the journal {path} is unusable: {exc}", details={"path": str(path)}
            ) from exc
        except BaseException:
            conn.close()
            raise
        conn.row_factory = sqlite3.Row
        _log.info("journal opened", path=str(path), schema_version=version)
        return cls(path, conn)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL); closing twice is harmless."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        """Use the journal in a ``with`` block that closes it."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the journal."""
        self.close()

    # ------------------------------------------------------------ plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise VolagentError(f"the journal {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One committed transaction; a database failure becomes a VolagentError."""
        conn = self._connection()
        try:
            with _transaction(conn):
                yield conn
        except sqlite3.Error as exc:
            raise self._failed(what, exc) from exc

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._failed(what, exc) from exc

    def _failed(self, what: str, exc: sqlite3.Error) -> VolagentError:
        return VolagentError(
            f"the journal could not {what}: {exc}", details={"path": str(self.path)}
        )

    def _unknown_or_finished(self, conn: sqlite3.Connection, task_id: str, what: str) -> None:
        """Raise the error for a change refused because the task is unknown or finished."""
        row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        reason = "is not in the journal" if row is None else f"is already {row[0]}"
        raise VolagentError(f"cannot {what}: task {task_id} {reason}", details={"task": task_id})

    # ------------------------------------------------------------ tasks

    def record_received(
        self,
        task_id: str,
        kind: str | None,
        volume_uuid: str | None,
        raw: bytes,
        deadline: datetime | None,
        now: datetime,
        accepted: Callable[[int], bytes] | None = None,
    ) -> Receipt:
        """Record a task message on arrival, once per id, and say what was known of it.

        The row is committed when this returns. A known id keeps what was first recorded
        (a different ``raw`` for it is logged and ignored). For a new task, ``accepted(seq)``
        builds its ``accepted`` event, queued in the same transaction.
        """
        event: tuple[int, bytes] | None = None
        with self._write("record a received task") as conn:
            inserted = conn.execute(
                "INSERT INTO tasks (id, kind, volume_uuid, state, raw, deadline, received, seq)"
                " VALUES (?, ?, ?, 'received', ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    task_id,
                    kind,
                    volume_uuid,
                    raw,
                    None if deadline is None else _ts(deadline),
                    _ts(now),
                    0 if accepted is None else 1,
                ),
            ).rowcount
            if inserted and accepted is not None:
                body = accepted(1)
                event = self._queue_event(conn, task_id, body), body
            row = conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?",  # noqa: S608 -- constant column list
                (task_id,),
            ).fetchone()
        task = _task(row)
        if inserted:
            return Receipt(Seen.NEW, task, event)
        if task.raw != raw:
            _log.warning("task id seen again with other content; keeping the first", task=task_id)
        return Receipt(Seen.FINISHED if task.state.finished else Seen.PENDING, task)

    def mark_running(
        self, task_id: str, now: datetime, make: Callable[[int], bytes]
    ) -> tuple[int, bytes]:
        """Move a task to ``running`` and queue its ``running`` event, in one transaction.

        The task is a received one, or one interrupted while running; the event is numbered
        and built by ``make(seq)``. ``started`` keeps the first start; ``attempts`` grows by
        one. Returns the outbox id and the event bytes. A finished or unknown task raises
        :class:`~volagent.errors.VolagentError`.
        """
        with self._write("mark a task running") as conn:
            rows = conn.execute(
                "UPDATE tasks SET state = 'running', started = coalesce(started, ?),"
                " attempts = attempts + 1, seq = seq + 1 WHERE id = ? AND finished IS NULL"
                " RETURNING seq",
                (_ts(now), task_id),
            ).fetchall()
            if not rows:
                self._unknown_or_finished(conn, task_id, "mark it running")
            body = make(rows[0][0])
            return self._queue_event(conn, task_id, body), body

    def next_seq(self, task_id: str) -> int:
        """Hand out the task's next event sequence number (1, 2, …), durably.

        Numbers never repeat for a task, across restarts too; a finished or unknown task
        raises :class:`~volagent.errors.VolagentError` (its terminal event had the last one).
        """
        with self._write("number a task event") as conn:
            rows = conn.execute(
                "UPDATE tasks SET seq = seq + 1 WHERE id = ? AND finished IS NULL RETURNING seq",
                (task_id,),
            ).fetchall()
            if not rows:
                self._unknown_or_finished(conn, task_id, "number its next event")
        seq: int = rows[0][0]
        return seq

    def finish(
        self,
        task_id: str,
        state: TaskState,
        *,
        terminal_event: bytes,
        now: datetime,
        result: Any = None,
        error: Mapping[str, Any] | None = None,
        publish: bool = False,
    ) -> int | None:
        """Record a task's end: its terminal state, result or error, and terminal event bytes.

        ``state`` is ``succeeded`` (with ``result``, any JSON value, and no ``error``) or
        ``failed`` (with the wire ``error`` object and no ``result``). A task finishes once:
        finishing it again, or an unknown task, raises :class:`~volagent.errors.VolagentError`.
        With ``publish`` the terminal event is queued in the event outbox in the same
        transaction, and its outbox id returned.
        """
        _check_end(state, result, error)
        with self._write("record a finished task") as conn:
            self._finish_in(conn, task_id, state, terminal_event, now, result, error)
            return self._queue_event(conn, task_id, terminal_event) if publish else None

    def finish_numbered(
        self,
        task_id: str,
        state: TaskState,
        make: Callable[[int], bytes],
        *,
        now: datetime,
        result: Any = None,
        error: Mapping[str, Any] | None = None,
    ) -> tuple[int, bytes]:
        """Number the terminal event, build it with ``make(seq)``, finish and queue it, at once.

        As :meth:`finish` with ``publish``, with the event's number taken in the same
        transaction, so that a crash can leave no gap in a task's sequence numbers. Returns
        the outbox id and the event bytes.
        """
        _check_end(state, result, error)
        with self._write("record a finished task") as conn:
            rows = conn.execute(
                "UPDATE tasks SET seq = seq + 1 WHERE id = ? AND finished IS NULL RETURNING seq",
                (task_id,),
            ).fetchall()
            if not rows:
                self._unknown_or_finished(conn, task_id, "finish it")
            body = make(rows[0][0])
            self._finish_in(conn, task_id, state, body, now, result, error)
            return self._queue_event(conn, task_id, body), body

    def _finish_in(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        state: TaskState,
        terminal_event: bytes,
        now: datetime,
        result: Any,
        error: Mapping[str, Any] | None,
    ) -> None:
        changed = conn.execute(
            "UPDATE tasks SET state = ?, finished = ?, result = ?, error = ?,"
            " terminal_event = ? WHERE id = ? AND finished IS NULL",
            (
                state.value,
                _ts(now),
                None if result is None else _json(result),
                None if error is None else _json(dict(error)),
                terminal_event,
                task_id,
            ),
        ).rowcount
        if not changed:
            self._unknown_or_finished(conn, task_id, "finish it")

    def add_event(self, task_id: str, make: Callable[[int], bytes]) -> tuple[int, bytes]:
        """Number the task's next event, build it with ``make(seq)`` and queue it, atomically.

        Returns the outbox id and the event bytes. A finished or unknown task raises
        :class:`~volagent.errors.VolagentError`.
        """
        with self._write("queue a task event") as conn:
            rows = conn.execute(
                "UPDATE tasks SET seq = seq + 1 WHERE id = ? AND finished IS NULL RETURNING seq",
                (task_id,),
            ).fetchall()
            if not rows:
                self._unknown_or_finished(conn, task_id, "queue an event")
            body = make(rows[0][0])
            return self._queue_event(conn, task_id, body), body

    def queue_event(self, task_id: str, body: bytes) -> int:
        """Queue event bytes made before (a finished task's terminal event, again)."""
        with self._write("queue a task event again") as conn:
            return self._queue_event(conn, task_id, body)

    @staticmethod
    def _queue_event(conn: sqlite3.Connection, task_id: str, body: bytes) -> int:
        event_id: int = conn.execute(
            "INSERT INTO events (task_id, body) VALUES (?, ?) RETURNING id", (task_id, body)
        ).fetchall()[0][0]
        return event_id

    def events_queued(self, limit: int, *, after: int = 0) -> list[tuple[int, bytes]]:
        """The first ``limit`` queued events with ids above ``after``: ``(id, bytes)``, in order."""
        with self._read("read the event outbox") as conn:
            rows = conn.execute(
                "SELECT id, body FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def events_ack(self, ids: Sequence[int]) -> int:
        """Drop the queued events ``ids`` (published); return how many were queued."""
        with self._write("acknowledge events") as conn:
            deleted: int = conn.executemany(
                "DELETE FROM events WHERE id = ?", [(i,) for i in ids]
            ).rowcount
        return deleted

    def step_done(self, task_id: str, step: str) -> None:
        """Record that the unfinished task ``task_id`` has done ``step`` (once; repeats ignored)."""
        with self._write("record a task step") as conn:
            row = conn.execute(
                "SELECT steps FROM tasks WHERE id = ? AND finished IS NULL", (task_id,)
            ).fetchone()
            if row is None:
                self._unknown_or_finished(conn, task_id, "record a step")
            steps = json.loads(row[0])
            if step not in steps:
                conn.execute(
                    "UPDATE tasks SET steps = ? WHERE id = ?", (_json([*steps, step]), task_id)
                )

    def get(self, task_id: str) -> TaskRecord | None:
        """The task with this id, or None if it was never received or has been pruned."""
        with self._read("read a task") as conn:
            row = conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?",  # noqa: S608 -- constant column list
                (task_id,),
            ).fetchone()
        return None if row is None else _task(row)

    def pending(self) -> list[TaskRecord]:
        """Tasks not finished, in arrival order: at start-up, the work to resume.

        Called before anything runs, every ``running`` task in the list was interrupted
        (by a shutdown or a crash) and every ``received`` one never started.
        """
        with self._read("list pending tasks") as conn:
            rows = conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks"  # noqa: S608 -- constant column list
                " WHERE state IN ('received', 'running') ORDER BY arrival"
            ).fetchall()
        return [_task(row) for row in rows]

    def counts_by_state(self) -> dict[TaskState, int]:
        """How many tasks the journal holds in each state (every state present, maybe 0)."""
        counts = dict.fromkeys(TaskState, 0)
        with self._read("count tasks") as conn:
            for state, count in conn.execute("SELECT state, count(*) FROM tasks GROUP BY state"):
                counts[TaskState(state)] = count
        return counts

    def prune(self, older_than: datetime, keep_at_least: int) -> int:
        """Forget finished tasks that finished before ``older_than``; return how many.

        The ``keep_at_least`` most recently finished tasks stay whatever their age, and tasks
        not finished are never touched. A pruned id that is delivered again runs again, so the
        retention must outlast the broker's redelivery of old messages.
        """
        if keep_at_least < 0:
            raise ValueError(f"keep_at_least must not be negative, not {keep_at_least}")
        with self._write("prune finished tasks") as conn:
            deleted: int = conn.execute(
                "DELETE FROM tasks WHERE finished < ? AND arrival NOT IN ("
                " SELECT arrival FROM tasks WHERE finished IS NOT NULL"
                " ORDER BY finished DESC, arrival DESC LIMIT ?)",
                (_ts(older_than), keep_at_least),
            ).rowcount
        if deleted:
            _log.info("journal pruned", tasks=deleted)
        return deleted

    # ------------------------------------------------------------ volumes

    def bump_generation(self, volume_uuid: str) -> int:
        """Count one more change of the volume and return its new generation (the first is 1)."""
        with self._write("bump a volume generation") as conn:
            generation: int = conn.execute(
                "INSERT INTO volumes (uuid, generation) VALUES (?, 1) ON CONFLICT (uuid)"
                " DO UPDATE SET generation = generation + 1 RETURNING generation",
                (volume_uuid,),
            ).fetchall()[0][0]
        return generation

    def generation(self, volume_uuid: str) -> int:
        """The volume's current generation; 0 for a volume never bumped."""
        with self._read("read a volume generation") as conn:
            row = conn.execute(
                "SELECT generation FROM volumes WHERE uuid = ?", (volume_uuid,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def save_volume(
        self, volume_uuid: str, generation: int, body: bytes, *, now: datetime, report: bool
    ) -> bool:
        """Save the volume object (JSON bytes) made at ``generation`` as the volume's last state.

        With ``report``, the same transaction queues it in the outbox for the central API, so
        a saved change is never left unreported. ``generation`` must have been handed out by
        :meth:`bump_generation`. An object older than the one saved is ignored (False).
        """
        with self._write("save a volume") as conn:
            row = conn.execute(
                "SELECT generation, body_generation FROM volumes WHERE uuid = ?", (volume_uuid,)
            ).fetchone()
            if row is None or not 1 <= generation <= row[0]:
                raise VolagentError(
                    f"generation {generation} of volume {volume_uuid} was never handed out",
                    details={"volume": volume_uuid, "generation": generation},
                )
            if row[1] is not None and generation < row[1]:
                return False
            conn.execute(
                "UPDATE volumes SET body = ?, body_generation = ?, updated = ? WHERE uuid = ?",
                (body, generation, _ts(now), volume_uuid),
            )
            if report:
                self._queue(conn, volume_uuid, generation, body, now)
        return True

    def volume(self, volume_uuid: str) -> StoredVolume | None:
        """The last object saved for the volume, or None."""
        with self._read("read a volume") as conn:
            row = conn.execute(
                "SELECT uuid, body_generation, body, updated FROM volumes"
                " WHERE uuid = ? AND body IS NOT NULL",
                (volume_uuid,),
            ).fetchone()
        return None if row is None else _volume(row)

    def volumes(self) -> list[StoredVolume]:
        """The last object saved for every volume that has one, by uuid."""
        with self._read("list volumes") as conn:
            rows = conn.execute(
                "SELECT uuid, body_generation, body, updated FROM volumes"
                " WHERE body IS NOT NULL ORDER BY uuid"
            ).fetchall()
        return [_volume(row) for row in rows]

    # ------------------------------------------------------------ outbox

    @staticmethod
    def _queue(
        conn: sqlite3.Connection, volume_uuid: str, generation: int, body: bytes, now: datetime
    ) -> int:
        entry_id: int = conn.execute(
            "INSERT INTO outbox (volume_uuid, generation, body, queued) VALUES (?, ?, ?, ?)"
            " RETURNING id",
            (volume_uuid, generation, body, _ts(now)),
        ).fetchall()[0][0]
        return entry_id

    def outbox_put(self, volume_uuid: str, generation: int, body: bytes, *, now: datetime) -> int:
        """Queue a report of a volume the journal knows for the central API; return its id."""
        with self._write("queue a report") as conn:
            return self._queue(conn, volume_uuid, generation, body, now)

    def outbox_peek(self, limit: int, *, per_volume: int | None = None) -> list[OutboxEntry]:
        """The oldest ``limit`` queued reports, in queue order (so in order for each volume).

        ``per_volume`` takes at most that many from each volume, so one volume whose reports
        are refused cannot hide the others' behind its backlog (1: the head of each volume).
        Entries stay queued until :meth:`outbox_ack`.
        """
        if limit < 1 or (per_volume is not None and per_volume < 1):
            msg = "limit and per_volume must be at least 1"
            raise ValueError(msg)
        with self._read("read the outbox") as conn:
            if per_volume is None:
                rows = conn.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY id LIMIT ?",  # noqa: S608 -- constant column list
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM ("  # noqa: S608 -- constant column list
                    "  SELECT *, row_number() OVER (PARTITION BY volume_uuid ORDER BY id) AS rank"
                    "  FROM outbox"
                    ") WHERE rank <= ? ORDER BY id LIMIT ?",
                    (per_volume, limit),
                ).fetchall()
        return [_entry(row) for row in rows]

    def outbox_ack(self, entry_id: int) -> bool:
        """Drop a delivered report; False if it was not queued (acknowledged already)."""
        with self._write("acknowledge a report") as conn:
            return conn.execute("DELETE FROM outbox WHERE id = ?", (entry_id,)).rowcount > 0

    def outbox_depth(self) -> int:
        """How many reports are queued."""
        with self._read("count the outbox") as conn:
            depth: int = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return depth

    def outbox_oldest_age(self, now: datetime) -> float:
        """Seconds since the first queued report was queued; 0.0 when the outbox is empty."""
        with self._read("read the outbox") as conn:
            row = conn.execute("SELECT queued FROM outbox ORDER BY id LIMIT 1").fetchone()
        return 0.0 if row is None else max(0.0, (_aware(now) - _time(row[0])).total_seconds())

    # ------------------------------------------------------------ health

    def quick_check(self) -> list[str]:
        """Run SQLite's ``PRAGMA quick_check``: the problems found, empty when the file is sound."""
        with self._read("check itself") as conn:
            return _quick_check(conn)


# ---------------------------------------------------------------- async facade


def _close_opened(opening: Future[Journal]) -> None:
    """Close a journal whose opener gave up waiting (runs on the worker, after the open)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class AsyncJournal:
    """The journal for asyncio code: every call runs on one dedicated worker thread.

    The connection is created on that thread and used only there, so calls run one at a
    time in the order they were made. A call whose awaiting task is cancelled may still
    complete: the journal stays consistent either way, as every call is one transaction.
    """

    def __init__(self, journal: Journal, executor: ThreadPoolExecutor) -> None:
        """Wrap a journal opened on ``executor``'s only thread; use :meth:`open`."""
        self._journal = journal
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, *, migrations: Sequence[Migration] = MIGRATIONS
    ) -> AsyncJournal:
        """Start the worker thread and open the journal on it (see :meth:`Journal.open`)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        opening = executor.submit(Journal.open, path, migrations=migrations)
        try:
            journal = await asyncio.wrap_future(opening)
        except BaseException:
            executor.submit(_close_opened, opening)
            executor.shutdown(wait=False)
            raise
        return cls(journal, executor)

    @property
    def path(self) -> Path:
        """The journal's file."""
        return self._journal.path

    async def close(self) -> None:
        """Finish the calls already made, close the journal and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        closing = self._executor.submit(self._journal.close)
        self._executor.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closing))

    async def __aenter__(self) -> Self:
        """Use the journal in an ``async with`` block that closes it."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the journal."""
        await self.close()

    async def _call(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise VolagentError(f"the journal {self.path} is closed")
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    async def record_received(
        self,
        task_id: str,
        kind: str | None,
        volume_uuid: str | None,
        raw: bytes,
        deadline: datetime | None,
        now: datetime,
        accepted: Callable[[int], bytes] | None = None,
    ) -> Receipt:
        """See :meth:`Journal.record_received`."""
        j = self._journal
        return await self._call(
            j.record_received, task_id, kind, volume_uuid, raw, deadline, now, accepted
        )

    async def mark_running(
        self, task_id: str, now: datetime, make: Callable[[int], bytes]
    ) -> tuple[int, bytes]:
        """See :meth:`Journal.mark_running`."""
        return await self._call(self._journal.mark_running, task_id, now, make)

    async def next_seq(self, task_id: str) -> int:
        """See :meth:`Journal.next_seq`."""
        return await self._call(self._journal.next_seq, task_id)

    async def finish_numbered(
        self,
        task_id: str,
        state: TaskState,
        make: Callable[[int], bytes],
        *,
        now: datetime,
        result: Any = None,
        error: Mapping[str, Any] | None = None,
    ) -> tuple[int, bytes]:
        """See :meth:`Journal.finish_numbered`."""
        return await self._call(
            self._journal.finish_numbered, task_id, state, make, now=now, result=result, error=error
        )

    async def finish(
        self,
        task_id: str,
        state: TaskState,
        *,
        terminal_event: bytes,
        now: datetime,
        result: Any = None,
        error: Mapping[str, Any] | None = None,
        publish: bool = False,
    ) -> int | None:
        """See :meth:`Journal.finish`."""
        return await self._call(
            self._journal.finish,
            task_id,
            state,
            terminal_event=terminal_event,
            now=now,
            result=result,
            error=error,
            publish=publish,
        )

    async def add_event(self, task_id: str, make: Callable[[int], bytes]) -> tuple[int, bytes]:
        """See :meth:`Journal.add_event`."""
        return await self._call(self._journal.add_event, task_id, make)

    async def queue_event(self, task_id: str, body: bytes) -> int:
        """See :meth:`Journal.queue_event`."""
        return await self._call(self._journal.queue_event, task_id, body)

    async def events_queued(self, limit: int, *, after: int = 0) -> list[tuple[int, bytes]]:
        """See :meth:`Journal.events_queued`."""
        return await self._call(self._journal.events_queued, limit, after=after)

    async def events_ack(self, ids: Sequence[int]) -> int:
        """See :meth:`Journal.events_ack`."""
        return await self._call(self._journal.events_ack, ids)

    async def step_done(self, task_id: str, step: str) -> None:
        """See :meth:`Journal.step_done`."""
        await self._call(self._journal.step_done, task_id, step)

    async def get(self, task_id: str) -> TaskRecord | None:
        """See :meth:`Journal.get`."""
        return await self._call(self._journal.get, task_id)

    async def pending(self) -> list[TaskRecord]:
        """See :meth:`Journal.pending`."""
        return await self._call(self._journal.pending)

    async def counts_by_state(self) -> dict[TaskState, int]:
        """See :meth:`Journal.counts_by_state`."""
        return await self._call(self._journal.counts_by_state)

    async def prune(self, older_than: datetime, keep_at_least: int) -> int:
        """See :meth:`Journal.prune`."""
        return await self._call(self._journal.prune, older_than, keep_at_least)

    async def bump_generation(self, volume_uuid: str) -> int:
        """See :meth:`Journal.bump_generation`."""
        return await self._call(self._journal.bump_generation, volume_uuid)

    async def generation(self, volume_uuid: str) -> int:
        """See :meth:`Journal.generation`."""
        return await self._call(self._journal.generation, volume_uuid)

    async def save_volume(
        self, volume_uuid: str, generation: int, body: bytes, *, now: datetime, report: bool
    ) -> bool:
        """See :meth:`Journal.save_volume`."""
        return await self._call(
            self._journal.save_volume, volume_uuid, generation, body, now=now, report=report
        )

    async def volume(self, volume_uuid: str) -> StoredVolume | None:
        """See :meth:`Journal.volume`."""
        return await self._call(self._journal.volume, volume_uuid)

    async def volumes(self) -> list[StoredVolume]:
        """See :meth:`Journal.volumes`."""
        return await self._call(self._journal.volumes)

    async def outbox_put(
        self, volume_uuid: str, generation: int, body: bytes, *, now: datetime
    ) -> int:
        """See :meth:`Journal.outbox_put`."""
        return await self._call(self._journal.outbox_put, volume_uuid, generation, body, now=now)

    async def outbox_peek(self, limit: int, *, per_volume: int | None = None) -> list[OutboxEntry]:
        """See :meth:`Journal.outbox_peek`."""
        return await self._call(self._journal.outbox_peek, limit, per_volume=per_volume)

    async def outbox_ack(self, entry_id: int) -> bool:
        """See :meth:`Journal.outbox_ack`."""
        return await self._call(self._journal.outbox_ack, entry_id)

    async def outbox_depth(self) -> int:
        """See :meth:`Journal.outbox_depth`."""
        return await self._call(self._journal.outbox_depth)

    async def outbox_oldest_age(self, now: datetime) -> float:
        """See :meth:`Journal.outbox_oldest_age`."""
        return await self._call(self._journal.outbox_oldest_age, now)

    async def quick_check(self) -> list[str]:
        """See :meth:`Journal.quick_check`."""
        return await self._call(self._journal.quick_check)
