"""The zone supervisor's logic over a scripted Zones and an injected clock: no real time passes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from volagent.errors import ZoneFailed
from volagent.ports.zones import Nic, ZoneSpec, ZoneState, ZoneStatus, ZoneUsage
from volagent.services.zone_supervisor import (
    NO_ANSWER,
    TASK_NAME,
    SupervisorPolicy,
    ZoneSupervisor,
)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def spec(uuid: str = "v1") -> ZoneSpec:
    return ZoneSpec(
        volume_uuid=uuid,
        source=f"/pool/{uuid}",
        export_path=f"/exports/{uuid}",
        nic=Nic(ip="10.0.0.10", prefix=24, network="tenant"),
        allowed_clients=("10.0.0.0/24",),
    )


class Clock:
    """Monotonic seconds and wall time that move only when told to."""

    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=self.t)


def _unused(method: Callable[..., object], *args: object) -> AssertionError:
    return AssertionError(f"the supervisor called Zones.{method.__name__}{args}")


class FakeZones:
    """Answers probes as scripted per zone; records every call in order."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.healthy: dict[str, bool] = {}
        self.probe_error: dict[str, ZoneFailed] = {}
        self.restart_error: dict[str, ZoneFailed] = {}
        self.restart_gate: asyncio.Event | None = None
        self.restart_entered = asyncio.Event()
        self.calls: list[tuple[str, str, float]] = []
        self.restarts_done: list[str] = []

    async def probe(self, volume_uuid: str) -> bool:
        self.calls.append(("probe", volume_uuid, self.clock.t))
        if volume_uuid in self.probe_error:
            raise self.probe_error[volume_uuid]
        return self.healthy.get(volume_uuid, True)

    async def restart(self, spec: ZoneSpec) -> ZoneStatus:
        uuid = spec.volume_uuid
        self.calls.append(("restart", uuid, self.clock.t))
        self.restart_entered.set()
        if self.restart_gate is not None:
            await self.restart_gate.wait()
        if uuid in self.restart_error:
            raise self.restart_error[uuid]
        self.restarts_done.append(uuid)
        return ZoneStatus(uuid, ZoneState.RUNNING, self.clock.now(), pids=(4242,))

    def times(self, kind: str, uuid: str = "v1") -> list[float]:
        return [t for k, u, t in self.calls if k == kind and u == uuid]

    async def start(self, spec: ZoneSpec, *, restarts: int = 0) -> ZoneStatus:
        raise _unused(self.start, spec, restarts)

    async def stop(self, volume_uuid: str) -> None:
        raise _unused(self.stop, volume_uuid)

    async def update(self, spec: ZoneSpec) -> ZoneStatus:
        raise _unused(self.update, spec)

    async def set_access(self, spec: ZoneSpec) -> ZoneStatus:
        raise _unused(self.set_access, spec)

    async def status(self, volume_uuid: str) -> ZoneStatus | None:
        raise _unused(self.status, volume_uuid)

    async def adopt(self) -> list[ZoneStatus]:
        raise _unused(self.adopt)

    async def connected_clients(self, volume_uuid: str) -> list[str]:
        raise _unused(self.connected_clients, volume_uuid)

    async def usage(self, volume_uuid: str) -> ZoneUsage:
        raise _unused(self.usage, volume_uuid)


class Bed:
    """A supervisor over FakeZones, with the changes it reported."""

    def __init__(self, *, cancel_after_sleeps: int = 0, **policy: Any) -> None:
        self.cancel_after_sleeps = cancel_after_sleeps
        self.slept: list[float] = []
        self.clock = Clock()
        self.zones = FakeZones(self.clock)
        self.changes: list[tuple[str, ZoneStatus]] = []
        self.sup = ZoneSupervisor(
            self.zones,
            on_change=self.record,
            policy=SupervisorPolicy(**policy),
            clock=self.clock.monotonic,
            now=self.clock.now,
            sleep=self.sleep,
        )

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass at once; cancel the sleeper after ``cancel_after_sleeps``."""
        self.slept.append(seconds)
        self.clock.t += seconds
        await asyncio.sleep(0)
        if len(self.slept) == self.cancel_after_sleeps:
            raise asyncio.CancelledError

    async def record(self, uuid: str, status: ZoneStatus) -> None:
        self.changes.append((uuid, status))

    async def rounds_until(self, end: float, *, every: float = 0.5) -> None:
        """A round every ``every`` seconds from now until ``end`` (included)."""
        while self.clock.t <= end:
            await self.sup.check_all()
            self.clock.t += every


@pytest.fixture
def bed() -> Bed:
    return Bed(crash_loop_failures=100)


async def test_healthy_zones_are_probed_every_round_and_left_alone(bed: Bed) -> None:
    await bed.sup.watch(spec("v1"))
    await bed.sup.watch(spec("v2"))
    await bed.rounds_until(1.0)
    assert bed.zones.times("probe", "v1") == bed.zones.times("probe", "v2") == [0.0, 0.5, 1.0]
    assert bed.zones.times("restart", "v1") == bed.zones.times("restart", "v2") == []
    assert bed.changes == []
    assert bed.sup.status("v1") == ZoneStatus("v1", ZoneState.RUNNING, EPOCH)


async def test_a_zone_that_does_not_answer_is_restarted_and_the_change_reported(bed: Bed) -> None:
    await bed.sup.watch(spec("v1"))
    await bed.sup.watch(spec("v2"))
    bed.clock.t = 3.0
    bed.zones.healthy["v1"] = False
    await bed.sup.check_all()
    restarted = ZoneStatus(
        "v1",
        ZoneState.RUNNING,
        EPOCH + timedelta(seconds=3),
        restarts=1,
        reason=f"restarted: {NO_ANSWER}",
        pids=(4242,),
    )
    assert bed.changes == [("v1", restarted)]
    assert bed.sup.status("v1") == restarted
    assert bed.zones.times("restart", "v2") == []


async def test_restarts_back_off_exponentially_up_to_the_maximum() -> None:
    bed = Bed(backoff_initial_s=1, backoff_max_s=4, crash_loop_failures=100)
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    await bed.rounds_until(16.0)
    assert bed.zones.times("restart") == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0]
    # while backing off, the zone is not even probed
    assert bed.zones.times("probe") == bed.zones.times("restart")
    assert [status.restarts for _, status in bed.changes] == [1, 2, 3, 4, 5, 6]


async def test_an_answer_ends_the_backoff() -> None:
    bed = Bed(backoff_initial_s=1, backoff_max_s=60, crash_loop_failures=100)
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    await bed.rounds_until(1.0)  # restarts at 0 and 1; the next one would wait 2 s
    bed.zones.healthy["v1"] = True
    await bed.rounds_until(5.0)  # answers at 3, 3.5, ... 5
    bed.zones.healthy["v1"] = False
    await bed.rounds_until(6.5)
    assert bed.zones.times("restart") == [0.0, 1.0, 5.5, 6.5]


async def test_a_crash_loop_marks_the_zone_failed_and_it_is_left_alone() -> None:
    bed = Bed(backoff_initial_s=1, crash_loop_failures=3, crash_loop_window_s=60)
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    await bed.rounds_until(30.0)
    assert bed.zones.times("restart") == [0.0, 1.0]
    assert bed.zones.times("probe") == [0.0, 1.0, 3.0]
    failed = bed.sup.status("v1")
    assert failed is not None
    assert failed.state is ZoneState.FAILED
    assert failed.since == EPOCH + timedelta(seconds=3)
    assert failed.restarts == 2
    assert failed.reason == f"crash loop: 3 failures within 60 s; last: {NO_ANSWER}"
    assert bed.changes[-1] == ("v1", failed)
    assert [s.state for _, s in bed.changes] == ["running", "running", "failed"]


async def test_failures_outside_the_window_do_not_make_a_crash_loop() -> None:
    bed = Bed(backoff_initial_s=0.1, crash_loop_failures=3, crash_loop_window_s=10)
    await bed.sup.watch(spec())
    for t in (0.0, 5.0, 10.5, 16.0, 21.0):
        bed.clock.t = t
        bed.zones.healthy["v1"] = False
        await bed.sup.check_all()
        bed.clock.t += 1
        bed.zones.healthy["v1"] = True
        await bed.sup.check_all()
    assert bed.zones.times("restart") == [0.0, 5.0, 10.5, 16.0, 21.0]
    status = bed.sup.status("v1")
    assert status is not None
    assert status.state is ZoneState.RUNNING


async def test_watching_a_failed_zone_again_gives_it_a_fresh_start() -> None:
    bed = Bed(backoff_initial_s=1, crash_loop_failures=2, crash_loop_window_s=60)
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    await bed.rounds_until(2.0)  # restart at 0, failed at 1
    status = bed.sup.status("v1")
    assert status is not None
    assert status.state is ZoneState.FAILED
    bed.clock.t = 10.0
    await bed.sup.watch(spec())
    status = bed.sup.status("v1")
    assert status is not None
    assert (status.state, status.since, status.reason) == (
        ZoneState.RUNNING,
        EPOCH + timedelta(seconds=10),
        "",
    )
    await bed.sup.check_all()
    assert bed.zones.times("restart") == [0.0, 10.0]
    status = bed.sup.status("v1")
    assert status is not None
    assert (status.state, status.restarts) == (ZoneState.RUNNING, 2)


async def test_an_adopted_status_keeps_its_history() -> None:
    bed = Bed()
    earlier = ZoneStatus("v1", ZoneState.RUNNING, EPOCH - timedelta(days=1), restarts=7)
    await bed.sup.watch(spec(), earlier)
    assert bed.sup.status("v1") == earlier
    bed.zones.healthy["v1"] = False
    await bed.sup.check_all()
    status = bed.sup.status("v1")
    assert status is not None
    assert status.restarts == 8


async def test_a_stopped_status_is_watched_as_running_from_now() -> None:
    bed = Bed()
    bed.clock.t = 5.0
    stopped = ZoneStatus("v1", ZoneState.STOPPED, EPOCH, restarts=2, reason="was stopped")
    await bed.sup.watch(spec(), stopped)
    assert bed.sup.status("v1") == ZoneStatus(
        "v1", ZoneState.RUNNING, EPOCH + timedelta(seconds=5), restarts=2
    )


async def test_a_failed_restart_is_not_reported_and_the_next_failure_counts() -> None:
    bed = Bed(backoff_initial_s=1, crash_loop_failures=3, crash_loop_window_s=60)
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    bed.zones.restart_error["v1"] = ZoneFailed("ganesha did not come up")
    await bed.rounds_until(2.0)  # failures at 0 and 1, both restarts fail
    assert bed.zones.times("restart") == [0.0, 1.0]
    assert bed.changes == []
    await bed.rounds_until(3.0)
    status = bed.sup.status("v1")
    assert status is not None
    assert status.state is ZoneState.FAILED
    assert status.restarts == 0
    assert bed.changes == [("v1", status)]


async def test_a_restart_that_comes_back_not_running_is_a_failed_restart() -> None:
    bed = Bed()

    async def restart_failed(spec: ZoneSpec) -> ZoneStatus:
        return ZoneStatus(spec.volume_uuid, ZoneState.FAILED, EPOCH, reason="no dataset")

    bed.zones.restart = restart_failed  # type: ignore[method-assign]  # one scripted answer
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    await bed.sup.check_all()
    assert bed.changes == []
    assert bed.sup.status("v1") == ZoneStatus("v1", ZoneState.RUNNING, EPOCH)


async def test_a_probe_that_raises_is_a_zone_that_does_not_answer(bed: Bed) -> None:
    await bed.sup.watch(spec())
    bed.zones.probe_error["v1"] = ZoneFailed("no network namespace vz1")
    await bed.sup.check_all()
    assert bed.changes[0][1].reason == "restarted: no network namespace vz1"


async def test_zones_of_a_round_are_checked_at_once(bed: Bed) -> None:
    both = asyncio.Barrier(2)

    async def probe(volume_uuid: str) -> bool:
        await both.wait()  # only returns when the other zone's probe has started too
        return True

    bed.zones.probe = probe  # type: ignore[method-assign]  # a probe that needs company
    await bed.sup.watch(spec("v1"))
    await bed.sup.watch(spec("v2"))
    async with asyncio.timeout(10):  # generous: only catches a hang
        await bed.sup.check_all()


async def test_unwatch_waits_for_a_restart_in_flight_then_leaves_the_zone_alone(bed: Bed) -> None:
    bed.zones.restart_gate = asyncio.Event()
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    round_ = asyncio.create_task(bed.sup.check_all())
    await bed.zones.restart_entered.wait()
    unwatch = asyncio.create_task(bed.sup.unwatch("v1"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not unwatch.done()
    bed.zones.restart_gate.set()
    await asyncio.gather(round_, unwatch)
    assert bed.zones.restarts_done == ["v1"]
    assert bed.sup.status("v1") is None
    bed.clock.t = 100
    await bed.sup.check_all()
    assert len(bed.zones.calls) == 2  # the probe and the restart before unwatch


async def test_run_probes_every_interval_until_cancelled() -> None:
    bed = Bed(cancel_after_sleeps=3, probe_interval_s=5)
    await bed.sup.watch(spec())
    with pytest.raises(asyncio.CancelledError):
        await bed.sup.run()
    assert bed.slept == [5, 5, 5]
    assert bed.zones.times("probe") == [0.0, 5.0, 10.0]


async def test_cancelling_run_lets_a_restart_in_flight_finish_and_touches_nothing_else(
    bed: Bed,
) -> None:
    bed.zones.restart_gate = asyncio.Event()
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    async with asyncio.TaskGroup() as daemon:
        task = daemon.create_task(bed.sup.run(), name=TASK_NAME)
        await bed.zones.restart_entered.wait()
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        bed.zones.restart_gate.set()
    assert task.cancelled()
    assert task.get_name() == TASK_NAME
    assert [kind for kind, _, _ in bed.zones.calls] == ["probe", "restart"]
    assert bed.zones.restarts_done == ["v1"]


@pytest.mark.parametrize(
    "bad",
    [
        {"probe_interval_s": 0},
        {"backoff_initial_s": -1},
        {"crash_loop_window_s": 0},
        {"backoff_initial_s": 10, "backoff_max_s": 5},
        {"crash_loop_failures": 0},
    ],
)
def test_policy_refuses_values_that_would_spin_or_never_give_up(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SupervisorPolicy(**bad)


def test_backoff_doubles_from_the_initial_delay_up_to_the_maximum() -> None:
    policy = SupervisorPolicy(backoff_initial_s=0.5, backoff_max_s=3)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3, 3]


async def test_a_probe_that_hangs_counts_as_no_answer() -> None:
    bed = Bed(probe_timeout_s=0.01)

    async def hanging_probe(volume_uuid: str) -> bool:
        await asyncio.Event().wait()
        return True

    bed.zones.probe = hanging_probe  # type: ignore[method-assign]  # a probe that never returns
    await bed.sup.watch(spec())
    async with asyncio.timeout(10):  # generous: only catches a hang
        await bed.sup.check_all()
    assert bed.changes[0][1].reason == "restarted: no answer to the probe within 0.01 s"


async def test_on_change_may_unwatch_or_watch_the_zone_it_reports() -> None:
    bed = Bed(crash_loop_failures=1)

    async def unwatch_on_failure(uuid: str, status: ZoneStatus) -> None:
        bed.changes.append((uuid, status))
        await bed.sup.unwatch(uuid)
        await bed.sup.watch(spec(uuid))

    bed.sup._on_change = unwatch_on_failure
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    async with asyncio.timeout(10):  # generous: only catches a deadlock
        await bed.sup.check_all()
    assert [s.state for _, s in bed.changes] == ["failed"]
    status = bed.sup.status("v1")
    assert status is not None
    assert status.state is ZoneState.RUNNING


async def test_a_runtime_that_counts_more_restarts_is_believed() -> None:
    bed = Bed()

    async def restart_counted(spec: ZoneSpec) -> ZoneStatus:
        return ZoneStatus(spec.volume_uuid, ZoneState.RUNNING, EPOCH, restarts=10)

    bed.zones.restart = restart_counted  # type: ignore[method-assign]  # a runtime with a count
    await bed.sup.watch(spec())
    bed.zones.healthy["v1"] = False
    await bed.sup.check_all()
    assert [s.restarts for _, s in bed.changes] == [10]


async def test_a_paused_supervisor_probes_and_restarts_nothing_until_resumed(bed: Bed) -> None:
    await bed.sup.watch(spec("v1"))
    bed.zones.healthy["v1"] = False
    bed.sup.pause()
    assert bed.sup.paused
    await bed.rounds_until(2.0)
    assert bed.zones.calls == []
    bed.sup.resume()
    await bed.sup.check_all()
    assert [k for k, _, _ in bed.zones.calls] == ["probe", "restart"]


async def test_restart_on_request_restarts_a_watched_zone_with_the_new_spec(bed: Bed) -> None:
    await bed.sup.watch(spec("v1"))
    bed.clock.t = 5.0
    moved = dataclasses.replace(spec("v1"), source="/pool/remounted")
    await bed.sup.restart(moved, "the storage came back")
    restarted = ZoneStatus(
        "v1",
        ZoneState.RUNNING,
        EPOCH + timedelta(seconds=5),
        restarts=1,
        reason="restarted: the storage came back",
        pids=(4242,),
    )
    assert bed.changes == [("v1", restarted)]
    assert bed.zones.times("restart") == [5.0]
    assert bed.zones.times("probe") == []
    bed.zones.healthy["v1"] = False  # the next failure restarts it with the spec it was given
    await bed.sup.check_all()
    assert bed.zones.times("restart") == [5.0, 5.0]


async def test_restart_on_request_leaves_unwatched_and_failed_zones_alone() -> None:
    bed = Bed(crash_loop_failures=1)
    await bed.sup.restart(spec("v9"), "the storage came back")  # never watched
    await bed.sup.watch(spec("v1"))
    bed.zones.healthy["v1"] = False
    await bed.sup.check_all()  # one failure is a crash loop here: failed
    assert bed.sup.status("v1").state is ZoneState.FAILED  # type: ignore[union-attr]  # watched
    await bed.sup.restart(spec("v1"), "the storage came back")
    assert bed.zones.times("restart") == []
    assert bed.zones.times("restart", "v9") == []


async def test_a_restart_on_request_that_fails_reports_nothing(bed: Bed) -> None:
    await bed.sup.watch(spec("v1"))
    bed.zones.restart_error["v1"] = ZoneFailed("ganesha would not start")
    await bed.sup.restart(spec("v1"), "the storage came back")
    assert bed.changes == []
    assert bed.sup.status("v1") == ZoneStatus("v1", ZoneState.RUNNING, EPOCH)
