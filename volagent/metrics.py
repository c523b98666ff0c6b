"""The agent's Prometheus metrics, kept in a registry of their own.

One :class:`Metrics` holds every metric of the agent in its own
:class:`~prometheus_client.CollectorRegistry` (never the process-wide default one, so that
several agents, or several tests, in one process do not share counters). Its methods are named
after what happened (``task_finished``, ``zone_restarted``) or what is set (``set_pool``);
:meth:`Metrics.render` gives the text exposition served at ``GET /metrics``.

Counters only go up. Gauges describe the latest state the daemon saw: it refreshes them before
each scrape. Label values that could be chosen from outside are bounded: a task kind this
agent does not know is counted as ``unknown``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Final, Literal

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from volagent import __version__
from volagent.domain.tasks import TASK_KINDS
from volagent.domain.volume import VolumeState
from volagent.ports.zones import ZoneState

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "PROBE_BUCKETS", "Metrics"]

#: The media type of :meth:`Metrics.render` (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
#: Task duration buckets, in seconds: 1 ms to 10 min.
DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
#: NFS probe latency buckets, in seconds: 0.1 ms to 10 s.
PROBE_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: The kind label of a task whose kind this agent does not know (or could not read).
UNKNOWN_KIND: Final = "unknown"
_OUTCOMES: Final = ("succeeded", "failed")


class Metrics:
    """Every metric of one agent, in a registry of its own."""

    #: The media type of :meth:`render`.
    CONTENT_TYPE: ClassVar[str] = CONTENT_TYPE

    def __init__(self, *, version: str = __version__) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        build = Gauge(
            "volagent_build_info",
            "Always 1; the version label names the running agent's version.",
            ["version"],
            registry=reg,
        )
        build.labels(version).set(1)
        self._received = Counter(
            "volagent_tasks_received_total",
            "Task messages accepted for work (new task ids), by task kind.",
            ["kind"],
            registry=reg,
        )
        self._tasks = Counter(
            "volagent_tasks_total",
            "Tasks that ended, by task kind and outcome (succeeded or failed).",
            ["kind", "outcome"],
            registry=reg,
        )
        self._failures = Counter(
            "volagent_task_failures_total",
            "Tasks that failed, by task kind and error code.",
            ["kind", "code"],
            registry=reg,
        )
        self._duration = Histogram(
            "volagent_task_duration_seconds",
            "Time from the start of a task's work to its end, by task kind.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._invalid = Counter(
            "volagent_invalid_messages_total",
            "Messages dropped because no task id could be read from them, by reason.",
            ["reason"],
            registry=reg,
        )
        self._queued = Gauge(
            "volagent_task_queue_depth",
            "Tasks received and waiting to start.",
            registry=reg,
        )
        self._running = Gauge(
            "volagent_tasks_running",
            "Tasks being worked on.",
            registry=reg,
        )
        self._broker_connected = Gauge(
            "volagent_broker_connected",
            "1 while the agent holds a session with the MQTT broker, else 0.",
            registry=reg,
        )
        self._reconnects = Counter(
            "volagent_broker_reconnects_total",
            "Broker sessions established after the first one.",
            registry=reg,
        )
        self._reconnects_seen = 0
        self._zones = Gauge(
            "volagent_zones",
            "NFS server zones, by state (running, stopped, failed).",
            ["state"],
            registry=reg,
        )
        self._zone_states: set[str] = set()
        self._zone_restarts = Counter(
            "volagent_zone_restarts_total",
            "Times a zone was restarted, by its supervisor or on request.",
            registry=reg,
        )
        self._probe = Histogram(
            "volagent_nfs_probe_seconds",
            "Latency of the NFS health probes answered by the zones.",
            buckets=PROBE_BUCKETS,
            registry=reg,
        )
        self._volumes = Gauge(
            "volagent_volumes",
            "Volumes on this node, by state.",
            ["state"],
            registry=reg,
        )
        self._volume_states: set[str] = set()
        self._pool_size = Gauge(
            "volagent_pool_size_bytes",
            "Size of the storage pool that holds the volumes.",
            registry=reg,
        )
        self._pool_free = Gauge(
            "volagent_pool_free_bytes",
            "Free space in the storage pool that holds the volumes.",
            registry=reg,
        )
        self._used = Gauge(
            "volagent_volume_used_bytes",
            "Bytes used by each volume (data and snapshots), by volume uuid.",
            ["volume"],
            registry=reg,
        )
        self._used_volumes: set[str] = set()
        self._outbox_depth = Gauge(
            "volagent_outbox_depth",
            "Reports waiting to be delivered to the central API.",
            registry=reg,
        )
        self._outbox_age = Gauge(
            "volagent_outbox_oldest_age_seconds",
            "Age of the oldest report waiting for the central API (0 when none waits).",
            registry=reg,
        )
        self._central_errors = Counter(
            "volagent_central_errors_total",
            "Failed calls to the central API, by operation and error code.",
            ["operation", "code"],
            registry=reg,
        )
        self.set_zones({})
        self.set_volumes({})

    # ------------------------------------------------------------ tasks

    def task_received(self, kind: str) -> None:
        """Count a task accepted for work."""
        self._received.labels(_kind(kind)).inc()

    def task_finished(self, kind: str, outcome: str, code: str | None, duration_s: float) -> None:
        """Count a task's end and observe its duration.

        ``outcome`` is ``succeeded`` or ``failed``; a failure is also counted by ``code`` (a
        failure without a code counts as ``Internal``).
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be succeeded or failed, not {outcome!r}")
        label = _kind(kind)
        self._tasks.labels(label, outcome).inc()
        if outcome == "failed":
            self._failures.labels(label, code or "Internal").inc()
        self._duration.labels(label).observe(max(duration_s, 0.0))

    def invalid_message(self, reason: str) -> None:
        """Count a message dropped without a task id; ``reason`` is a short fixed word."""
        self._invalid.labels(reason).inc()

    def set_queue_depth(self, queued: int, running: int) -> None:
        """Set how many tasks wait to start and how many are being worked on."""
        self._queued.set(queued)
        self._running.set(running)

    # ------------------------------------------------------------ broker

    def set_broker(self, connected: bool, reconnects: int) -> None:
        """Set the broker connection state; ``reconnects`` is the adapter's running total.

        The counter goes up by the difference to the total seen before. A total lower than
        that means the count started again (a new adapter): all of it is new.
        """
        self._broker_connected.set(1 if connected else 0)
        delta = reconnects - self._reconnects_seen
        if delta < 0:
            delta = reconnects
        if delta > 0:
            self._reconnects.inc(delta)
        self._reconnects_seen = reconnects

    # ------------------------------------------------------------ zones

    def set_zones(self, by_state: Mapping[str, int]) -> None:
        """Set the number of zones in each state; running, stopped and failed always show."""
        self._zone_states = _replace(
            self._zones, by_state, self._zone_states, always=[s.value for s in ZoneState]
        )

    def zone_restarted(self) -> None:
        """Count a zone restart."""
        self._zone_restarts.inc()

    def observe_probe(self, latency_s: float) -> None:
        """Observe the latency of one NFS health probe."""
        self._probe.observe(max(latency_s, 0.0))

    # ------------------------------------------------------------ storage

    def set_volumes(self, by_state: Mapping[str, int]) -> None:
        """Set the number of volumes in each state; every volume state always shows."""
        self._volume_states = _replace(
            self._volumes, by_state, self._volume_states, always=[s.value for s in VolumeState]
        )

    def set_pool(self, size_bytes: int, free_bytes: int) -> None:
        """Set the pool's size and free space."""
        self._pool_size.set(size_bytes)
        self._pool_free.set(free_bytes)

    def set_volume_used(self, used: Mapping[str, int]) -> None:
        """Set the bytes used by each volume; volumes not in ``used`` are removed."""
        self._used_volumes = _replace(self._used, used, self._used_volumes)

    # ------------------------------------------------------------ central API

    def set_outbox(self, depth: int, oldest_age_s: float) -> None:
        """Set the number of undelivered reports and the age of the oldest."""
        self._outbox_depth.set(depth)
        self._outbox_age.set(max(oldest_age_s, 0.0))

    def central_error(self, operation: str, code: str) -> None:
        """Count a failed call to the central API (``code``: HTTP status or error kind)."""
        self._central_errors.labels(operation, code).inc()

    # ------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """The text exposition of every metric (media type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def _kind(kind: str) -> Literal["unknown"] | str:
    """The kind label: the kind itself if this agent knows it, else ``unknown``."""
    return kind if kind in TASK_KINDS else UNKNOWN_KIND


def _replace(
    gauge: Gauge,
    values: Mapping[str, int],
    shown: set[str],
    *,
    always: Iterable[str] = (),
) -> set[str]:
    """Make ``values`` the whole set of ``gauge``'s label values; return the labels now shown.

    Labels in ``always`` show as 0 when ``values`` lacks them; other labels shown before and
    absent now are removed.
    """
    current: dict[str, int] = dict.fromkeys(always, 0) | dict(values)
    for gone in shown - current.keys():
        gauge.remove(gone)
    for label, value in current.items():
        gauge.labels(label).set(value)
    return set(current)
