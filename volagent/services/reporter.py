"""Tell the central API about every volume change, and that this node is alive.

:class:`Reporter` drains the journal's outbox. The engine queues a volume object in the same
transaction that saves it (``save_volume(report=True)``) and then calls :meth:`Reporter.kick`;
the reporter also looks at the outbox every ``poll_s`` seconds on its own, and at start-up,
so reports queued before a restart are sent too. Delivery rules:

* **Per volume, strictly in queue order.** Only the head of each volume's queue is ever
  sent, and the next report of that volume only after the head was acknowledged in the
  journal, which happens only after the central API took it (2xx, or 409: it already has
  that generation or a newer one).
* **Volumes in parallel**, at most ``batch`` at a time. A volume whose report failed waits
  out its own backoff (exponential from ``backoff_initial_s`` up to ``backoff_max_s``, half
  of it random, computed by tenacity's wait strategies) without holding back the others.
* **Nothing is lost.** An entry leaves the outbox only by its acknowledgement. A report can
  be sent more than once: when the answer is lost (a timeout after the central side took
  it) or the reporter is cancelled while the request is in flight, the same report is sent
  again, before any later report of its volume. So what the central API receives for one
  volume, with repeats of the same report collapsed, is exactly the queue in order.

:class:`Heartbeat` posts the node's heartbeat document (see :func:`heartbeat_body`) every
``interval_s`` seconds on a fixed grid of the monotonic clock (beats do not drift; a beat
that took longer than the interval skips the slots it overran). Failures are logged and
counted, never raised.

Both services run until cancelled (the daemon's task group owns them) and are cancel-safe.
Errors reach ``on_error(operation, error)`` with ``operation`` one of :data:`OP_PUT_VOLUME`
and :data:`OP_HEARTBEAT`, meant as the label of an error counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, NoReturn, Protocol

import structlog
from tenacity import AsyncRetrying, RetryCallState, wait_exponential, wait_random_exponential
from tenacity.wait import wait_base

from volagent.domain import wire
from volagent.engine.journal import AsyncJournal, OutboxEntry
from volagent.errors import VolagentError

__all__ = [
    "HEARTBEAT_TASK_NAME",
    "OP_HEARTBEAT",
    "OP_PUT_VOLUME",
    "REPORTER_TASK_NAME",
    "CentralClientLike",
    "Heartbeat",
    "HeartbeatClientLike",
    "OnDelivered",
    "OnError",
    "Reporter",
    "backoff_wait",
    "heartbeat_body",
]

_log = structlog.get_logger(__name__)

#: What :meth:`Reporter.run` is called in the daemon's task group.
REPORTER_TASK_NAME: Final = "central-reporter"
#: What :meth:`Heartbeat.run` is called in the daemon's task group.
HEARTBEAT_TASK_NAME: Final = "central-heartbeat"
#: The ``operation`` passed to ``on_error`` for a volume report.
OP_PUT_VOLUME: Final = "put_volume"
#: The ``operation`` passed to ``on_error`` for a heartbeat.
OP_HEARTBEAT: Final = "heartbeat"

#: Called with the operation and the error whenever the central API did not take a request.
OnError = Callable[[str, VolagentError], None]
#: Called with the HTTP status (2xx or 409) of every report delivered.
OnDelivered = Callable[[int], None]


class CentralClientLike(Protocol):
    """What the reporter needs from the central API client."""

    async def put_volume(self, uuid: str, body: bytes) -> int:
        """Deliver a volume object; return the status, or raise a VolagentError."""
        ...


class HeartbeatClientLike(Protocol):
    """What the heartbeat needs from the central API client."""

    async def heartbeat(self, cn: str, body: bytes) -> None:
        """Deliver a heartbeat document, or raise a VolagentError."""
        ...


def heartbeat_body(
    cn: str,
    agent_version: str,
    ts: datetime,
    pool: Mapping[str, Any] | None,
    volumes: int,
    *,
    broker_connected: bool,
) -> dict[str, Any]:
    """The heartbeat document of protocol v1.

    ``pool`` is ``{"size_bytes", "free_bytes"}``; when it is not known (ZFS does not answer)
    the document carries an empty object, so that the heartbeat still goes out.
    """
    return {
        "cn": cn,
        "agent_version": agent_version,
        "ts": wire.format_timestamp(ts),
        "pool": {} if pool is None else dict(pool),
        "volumes": volumes,
        "broker": "connected" if broker_connected else "disconnected",
    }


def backoff_wait(initial_s: float, max_s: float) -> wait_base:
    """The wait before retry n: ``min(initial_s * 2**(n-1), max_s)``, its upper half random.

    Equal jitter (as the MQTT reconnects use): at least half the exponential delay, so a
    failing volume is never retried at once, and the rest spread so that many volumes do not
    come back in step when the central API returns.
    """
    return wait_exponential(multiplier=initial_s / 2, max=max_s / 2) + wait_random_exponential(
        multiplier=initial_s / 2, max=max_s / 2
    )


def _is_refusal(err: VolagentError) -> bool:
    """An error that retrying alone will not fix: a 4xx answer, or one not retryable."""
    status = err.details.get("status")
    return not err.retryable or (isinstance(status, int) and 400 <= status < 500)


class Reporter:
    """Send the journal's outbox to the central API, in order per volume, until cancelled."""

    def __init__(
        self,
        journal: AsyncJournal,
        client: CentralClientLike,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        batch: int = 64,
        poll_s: float = 1.0,
        on_error: OnError | None = None,
        on_delivered: OnDelivered | None = None,
    ) -> None:
        """Prepare a reporter; ``batch`` bounds the volumes in flight at once."""
        if not 0 < backoff_initial_s <= backoff_max_s:
            msg = "backoff_initial_s must be positive and at most backoff_max_s"
            raise ValueError(msg)
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be positive, not {poll_s!r}")
        self._journal = journal
        self._client = client
        self._wait = backoff_wait(backoff_initial_s, backoff_max_s)
        self._batch = batch
        self._poll_s = poll_s
        self._on_error = on_error
        self._on_delivered = on_delivered
        self._wake = asyncio.Event()
        # Volume uuid -> the task delivering its head entry.
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Volume uuid -> consecutive failed attempts, and when (loop time) it may try again.
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        # Volumes whose delivery ended while the outbox was being read: that reading may show
        # a head acknowledged meanwhile, so they wait for the next reading (which comes at once).
        self._settled_since_peek: set[str] = set()

    def kick(self) -> None:
        """Look at the outbox now: the engine queued a report."""
        self._wake.set()

    async def run(self) -> NoReturn:
        """Deliver queued reports until cancelled; cancelling it cancels requests in flight.

        A cancelled request leaves its entry queued, to be sent again by the next reporter.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            while True:
                self._wake.clear()
                now = loop.time()
                self._retry_at = {v: t for v, t in self._retry_at.items() if t > now}
                self._settled_since_peek.clear()
                self._dispatch(group, await self._heads())
                wake_at = min([now + self._poll_s, *self._retry_at.values()])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(wake_at):
                        await self._wake.wait()

    def _dispatch(self, group: asyncio.TaskGroup, heads: list[OutboxEntry]) -> None:
        """Start delivering the heads of volumes that are free to send, up to the batch."""
        for entry in heads:
            if len(self._inflight) >= self._batch:
                return
            uuid = entry.volume_uuid
            if uuid in self._inflight or uuid in self._retry_at or uuid in self._settled_since_peek:
                continue
            task = group.create_task(self._deliver(entry), name=f"report-{uuid}")
            self._inflight[uuid] = task
            task.add_done_callback(functools.partial(self._settled, uuid))

    async def _heads(self) -> list[OutboxEntry]:
        """The first entry of each volume: enough to fill the batch past the backing-off ones."""
        try:
            return await self._journal.outbox_peek(self._batch + len(self._retry_at), per_volume=1)
        except VolagentError as err:
            _log.error("central reporter cannot read the outbox", error=err.message)
            return []

    def _settled(self, uuid: str, _task: asyncio.Task[None]) -> None:
        del self._inflight[uuid]
        self._settled_since_peek.add(uuid)
        self._wake.set()

    async def _deliver(self, entry: OutboxEntry) -> None:
        """Send one report; acknowledge it when taken, or put its volume in backoff."""
        try:
            status = await self._client.put_volume(entry.volume_uuid, entry.body)
        except VolagentError as err:
            self._failed(entry, err)
            if self._on_error is not None:
                self._on_error(OP_PUT_VOLUME, err)
            return
        try:
            await self._journal.outbox_ack(entry.id)
        except VolagentError as err:
            # Delivered but still queued: it goes out again, which the central side tolerates.
            self._failed(entry, err)
            return
        attempts = self._failures.pop(entry.volume_uuid, 0) + 1
        _log.info(
            "central report delivered",
            volume_uuid=entry.volume_uuid,
            generation=entry.generation,
            status=status,
            attempts=attempts,
            queued_s=round((datetime.now(UTC) - entry.queued).total_seconds(), 3),
        )
        if self._on_delivered is not None:
            self._on_delivered(status)

    def _failed(self, entry: OutboxEntry, err: VolagentError) -> None:
        failures = self._failures.get(entry.volume_uuid, 0) + 1
        self._failures[entry.volume_uuid] = failures
        state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
        state.attempt_number = failures
        delay = self._wait(state)
        self._retry_at[entry.volume_uuid] = asyncio.get_running_loop().time() + delay
        log = _log.error if _is_refusal(err) else _log.warning
        log(
            "central report not delivered",
            volume_uuid=entry.volume_uuid,
            generation=entry.generation,
            attempts=failures,
            retry_in_s=round(delay, 3),
            code=err.code,
            status=err.details.get("status"),
            error=err.message,
        )


class Heartbeat:
    """Post the node's heartbeat to the central API every ``interval_s`` until cancelled."""

    def __init__(
        self,
        client: HeartbeatClientLike,
        cn: str,
        payload: Callable[[], Awaitable[Mapping[str, Any]]],
        interval_s: float,
        *,
        on_error: OnError | None = None,
    ) -> None:
        """Prepare a heartbeat; ``payload`` builds the document (see :func:`heartbeat_body`)."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, not {interval_s!r}")
        self._client = client
        self._cn = cn
        self._payload = payload
        self._interval_s = interval_s
        self._on_error = on_error
        self._failures = 0

    @property
    def consecutive_failures(self) -> int:
        """Heartbeats in a row the central API did not take (0 after one it took)."""
        return self._failures

    async def run(self) -> NoReturn:
        """Beat now, then on every later slot of the ``interval_s`` grid, until cancelled."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        slot = 0
        while True:
            await self._beat()
            slot = max(slot + 1, math.floor((loop.time() - start) / self._interval_s) + 1)
            await asyncio.sleep(start + slot * self._interval_s - loop.time())

    async def _beat(self) -> None:
        try:
            document = await self._payload()
        except VolagentError as err:
            _log.error("central heartbeat payload failed", code=err.code, error=err.message)
            return
        body = wire.dumps(document).encode("ascii")
        try:
            await self._client.heartbeat(self._cn, body)
        except VolagentError as err:
            self._failures += 1
            log = _log.error if _is_refusal(err) else _log.warning
            log(
                "central heartbeat not taken",
                failures=self._failures,
                code=err.code,
                status=err.details.get("status"),
                error=err.message,
            )
            if self._on_error is not None:
                self._on_error(OP_HEARTBEAT, err)
            return
        if self._failures:
            _log.info("central heartbeat taken again", after_failures=self._failures)
        self._failures = 0
