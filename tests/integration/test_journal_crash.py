"""kill -9 of a process writing the journal: what it said was durable is there, the file is sound.

A child Python process records tasks in a loop (finishing some, bumping and saving volumes) and
prints a line to stdout after each call returns. The test kills it with SIGKILL at a random
moment, then reopens the journal: every claim the child printed must hold, and SQLite's
integrity check must pass. Rounds reuse the same file, so recovery of a WAL left by a killed
writer is exercised again and again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from volagent.engine.journal import Journal, Seen, TaskState, journal_path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys
from datetime import UTC, datetime
from pathlib import Path

import structlog

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

from volagent.engine.journal import Journal, TaskState

path, start = Path(sys.argv[1]), int(sys.argv[2])
journal = Journal.open(path)
print("open", flush=True)
i = start
while True:
    task_id = f"task-{i:07d}"
    volume = f"vol-{i % 7}"
    now = datetime.now(UTC)
    raw = json.dumps({"v": 1, "id": task_id, "kind": "volume.get", "params": {}}).encode()
    journal.record_received(task_id, "volume.get", volume, raw, None, now)
    print("received", task_id, flush=True)
    if i % 3 == 0:
        journal.mark_running(task_id, now, lambda seq: b"running %d" % seq)
        seq = journal.next_seq(task_id)
        terminal = json.dumps({"task": task_id, "seq": seq, "state": "succeeded"}).encode()
        journal.finish(task_id, TaskState.SUCCEEDED, terminal_event=terminal, now=now, result={})
        print("finished", task_id, seq, flush=True)
    if i % 5 == 0:
        generation = journal.bump_generation(volume)
        body = json.dumps({"uuid": volume, "generation": generation}).encode()
        journal.save_volume(volume, generation, body, now=now, report=True)
        print("volume", volume, generation, flush=True)
    i += 1
"""


@contextmanager
def child(path: Path, start: int, stderr: IO[str]) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(start)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


class Claims:
    """What the children printed after a journal call had returned."""

    def __init__(self) -> None:
        self.received: set[str] = set()
        self.finished: dict[str, int] = {}
        self.generations: dict[str, int] = {}

    def take(self, line: str) -> None:
        word, *rest = line.split()
        if word == "received":
            self.received.add(rest[0])
        elif word == "finished":
            self.finished[rest[0]] = int(rest[1])
        elif word == "volume":
            self.generations[rest[0]] = max(self.generations.get(rest[0], 0), int(rest[1]))


def run_and_kill(path: Path, start: int, lines: int, rng: random.Random, errors: Path) -> Claims:
    """Start a child, let it print ``lines`` received lines, SIGKILL it, collect its claims."""
    claims = Claims()
    with errors.open("a") as stderr, child(path, start, stderr) as proc:
        assert proc.stdout is not None
        received = 0
        while received < lines:
            line = proc.stdout.readline()
            assert line, f"the child ended early: {errors.read_text()[-2000:]}"
            claims.take(line)
            received += line.startswith("received")
        time.sleep(rng.uniform(0, 0.003))  # land anywhere in the child's loop
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        for line in proc.stdout.read().splitlines(keepends=True):
            if line.endswith("\n"):  # a line cut by the kill claims nothing
                claims.take(line)
    return claims


def integrity(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def test_tasks_reported_received_survive_kill_9_at_random_points(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = journal_path(tmp_path / "state")
    errors = tmp_path / "child-stderr.txt"
    everything = Claims()
    start = 0
    for round_ in range(6):
        claims = run_and_kill(path, start, rng.randint(1, 1500), rng, errors)
        context = f"seed {seed}, round {round_}"
        assert claims.received, context
        everything.received |= claims.received
        everything.finished.update(claims.finished)
        for volume, generation in claims.generations.items():
            everything.generations[volume] = max(everything.generations.get(volume, 0), generation)

        with Journal.open(path) as journal:
            assert journal.quick_check() == [], context
            for task_id in everything.received:
                task = journal.get(task_id)
                assert task is not None, f"{task_id} lost ({context})"
            for task_id, seq in everything.finished.items():
                receipt = journal.record_received(task_id, "volume.get", None, b"", None, _now())
                assert receipt.seen is Seen.FINISHED, f"{task_id} ({context})"
                assert receipt.task.state is TaskState.SUCCEEDED
                assert json.loads(receipt.terminal_event or b"") == {
                    "task": task_id,
                    "seq": seq,
                    "state": "succeeded",
                }
            # At most one task per kill was recorded but killed before its line was printed.
            assert len(_all_ids(path) - everything.received) <= round_ + 1, context
            for volume, generation in everything.generations.items():
                assert journal.generation(volume) >= generation, f"{volume} ({context})"
                stored = journal.volume(volume)
                assert stored is not None, f"{volume} ({context})"
                assert stored.generation >= generation, f"{volume} ({context})"
            queued = {(e.volume_uuid, e.generation) for e in journal.outbox_peek(100_000)}
            assert set(everything.generations.items()) <= queued, context
            start = 1 + max(int(t.split("-")[1]) for t in everything.received) + 10
        assert integrity(path) == ["ok"], context


def test_a_kill_during_open_leaves_a_journal_that_opens(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    errors = tmp_path / "child-stderr.txt"
    for attempt in range(4):
        path = journal_path(tmp_path / f"state-{attempt}")
        with errors.open("a") as stderr, child(path, 0, stderr) as proc:
            time.sleep(rng.uniform(0.0, 0.4))  # import and open take about this long
            proc.kill()
        with Journal.open(path) as journal:
            assert journal.quick_check() == [], f"seed {seed}, attempt {attempt}"
            journal.record_received("after", "volume.get", None, b"{}", None, _now())
        assert integrity(path) == ["ok"], f"seed {seed}, attempt {attempt}"


def _now() -> datetime:
    return datetime.now(UTC)


def _all_ids(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM tasks")}
    finally:
        conn.close()
