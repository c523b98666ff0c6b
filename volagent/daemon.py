"""``volagent run``: the agent's life in three phases.

**Start-up** (any failure exits with status 3, a bad configuration with 78): take the lock
on ``state.dir`` (one agent per state directory), open the journal, probe ZFS and make sure
the dataset root exists, reconcile ZFS, zones and the journal, queue the unfinished tasks and
the unsent events of the last run, then tell the service manager the agent is ready.

**Main loop**: a :class:`asyncio.TaskGroup` of named tasks: the MQTT session, the intake
(each message journaled, then acknowledged), the event publisher, the zone supervisor, the
storage watch (volumes served again after a ZFS outage), the status refresh, the central
reporter and heartbeat, the watchdog pings and the journal's pruning. Tasks themselves run on
the :class:`~volagent.engine.runner.Runner`.

**Shutdown**, on SIGTERM or SIGINT (the handler only sets an event): stop taking messages
(those not yet journaled are redelivered by the broker), let running tasks reach a safe
point within ``engine.shutdown_grace_s`` (the rest are cancelled; all resume at the next
start), send the queued events for a few seconds, publish the offline status, disconnect,
close the journal. Zones keep running: they are not children of the agent. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from volagent import __version__
from volagent.adapters.central import CentralClient
from volagent.adapters.mqtt import MqttAdapter
from volagent.adapters.netns import LinuxZones
from volagent.adapters.sdnotify import Notifier
from volagent.adapters.zfs import ZfsCli
from volagent.config import Config
from volagent.engine.intake import Intake
from volagent.engine.journal import AsyncJournal, journal_path
from volagent.engine.publisher import EventPublisher
from volagent.engine.reconcile import Reconciler, Reconciliation
from volagent.engine.runner import Events, Outcome, Runner, utcnow
from volagent.errors import EXIT_OK, EXIT_STARTUP, StartupError, VolagentError
from volagent.http import LocalApi
from volagent.metrics import Metrics
from volagent.ports.zones import ZoneStatus
from volagent.services.catalog import Catalog
from volagent.services.deps import Deps
from volagent.services.handlers import Services
from volagent.services.reporter import Heartbeat, Reporter, heartbeat_body
from volagent.services.storage_watch import TASK_NAME as STORAGE_WATCH
from volagent.services.storage_watch import StorageWatch
from volagent.services.volumes import zone_changed
from volagent.services.zone_supervisor import SupervisorPolicy, ZoneSupervisor
from volagent.view import AgentView

_log = structlog.get_logger(__name__)

LOCK_FILE: Final = "agent.lock"
#: How long queued events may take to reach the broker during a shutdown.
EVENT_DRAIN_S: Final = 5.0
#: How often finished tasks older than the retention are pruned.
PRUNE_EVERY_S: Final = 3600.0
#: Finished tasks kept whatever their age.
PRUNE_KEEP: Final = 10_000
#: Exit status after a second signal.
EXIT_FORCED: Final = 130


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir`` (created 0700 if missing); StartupError if taken."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StartupError(
                f"another agent holds {state_dir}",
                details={"state_dir": str(state_dir)},
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def supervisor_policy(config: Config) -> SupervisorPolicy:
    """The zone supervisor's policy from ``[zones]``."""
    z = config.zones
    return SupervisorPolicy(
        probe_interval_s=z.probe_interval_s,
        probe_timeout_s=z.probe_timeout_s,
        backoff_initial_s=z.restart_backoff_initial_s,
        backoff_max_s=z.restart_backoff_max_s,
        crash_loop_failures=z.crash_loop_failures,
        crash_loop_window_s=z.crash_loop_window_s,
    )


class ObservedZones(LinuxZones):
    """The Linux zone runtime, each probe's latency reported to ``on_probe``."""

    def __init__(self, *, on_probe: Callable[[float], None], **kwargs: Any) -> None:
        """As :class:`LinuxZones`, plus the probe observer."""
        super().__init__(**kwargs)
        self._on_probe = on_probe

    async def probe(self, volume_uuid: str) -> bool:
        """See :meth:`LinuxZones.probe`."""
        began = time.monotonic()
        try:
            return await super().probe(volume_uuid)
        finally:
            self._on_probe(time.monotonic() - began)


class Agent:
    """One agent process: built from the configuration, run by :meth:`run`."""

    def __init__(self, config: Config, *, on_ready: Callable[[], None] | None = None) -> None:
        """Prepare; nothing is touched before :meth:`run`."""
        if config.storage.backend != "cli":
            raise StartupError(
                f"storage.backend {config.storage.backend!r} is not available in this build;"
                " use 'cli'",
                details={"backend": config.storage.backend},
            )
        self.config = config
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._signals = 0
        self.started = time.monotonic()
        self.reconciliation: Reconciliation | None = None
        self.storage = ZfsCli(
            zfs_bin=config.storage.zfs_bin,
            zpool_bin=config.storage.zpool_bin,
            command_timeout_s=config.storage.command_timeout_s,
        )
        self.metrics = Metrics()
        self.notifier = Notifier.from_env(unset=True)
        self.zones = ObservedZones(
            on_probe=self.metrics.observe_probe,
            state_dir=config.state.dir,
            networks=config.networks,
            zones=config.zones,
            name_prefix=config.zones.name_prefix,
        )
        self.mqtt = MqttAdapter(config, online_status=self._online_status)
        self._status_changed = asyncio.Event()
        self.central: CentralClient | None = None
        self.reporter: Reporter | None = None
        self.heartbeat: Heartbeat | None = None
        self.http: LocalApi
        self.view: AgentView
        # Set in run(), once the journal is open.
        self.journal: AsyncJournal
        self.catalog: Catalog
        self.runner: Runner
        self.publisher: EventPublisher
        self.supervisor: ZoneSupervisor
        self.storage_watch: StorageWatch
        self.deps: Deps
        self._intake: Intake
        self.outcomes: list[Callable[[Outcome], None]] = []
        #: Messages dropped without a readable task id, by error code.
        self.dropped: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ signals

    def request_stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            _log.warning("second signal: exiting at once", signal=signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        _log.info("stopping", signal=signal.Signals(signum).name)
        self.notifier.stopping()
        self._stop.set()

    # ------------------------------------------------------------------ phases

    async def run(self) -> int:
        """Start up, serve until asked to stop, shut down; return the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            with state_lock(self.config.state.dir):
                return await self._run_locked()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _run_locked(self) -> int:
        try:
            self.journal = await AsyncJournal.open(journal_path(self.config.state.dir))
        except VolagentError as exc:
            raise StartupError(f"journal: {exc.message}", details=exc.details) from exc
        try:
            await self._start_up()
            try:
                await self._main()
            finally:
                await self.http.stop()
                if self.central is not None:
                    await self.central.close()
        finally:
            await self.journal.close()
        return EXIT_OK

    async def _start_up(self) -> None:
        config = self.config
        root = config.storage.dataset_root
        try:
            await self.storage.detect_capabilities(root.split("/", 1)[0])
            await self.storage.create_dataset(root, exist_ok=True)
        except VolagentError as exc:
            raise StartupError(f"storage: {exc.message}", details=exc.details) from exc
        self.publisher = EventPublisher(self.journal, self.mqtt.publish_event)
        self.catalog = Catalog(self.journal, on_saved=self._volume_saved)
        if config.central.url:
            self.central = CentralClient(
                config.central.url,
                token_file=config.central.token_file,
                timeout_s=config.central.timeout_s,
            )
            self.reporter = Reporter(self.journal, self.central, on_error=self._central_error)
            self.heartbeat = Heartbeat(
                self.central,
                config.cn,
                self._heartbeat_body,
                config.central.heartbeat_s,
                on_error=self._central_error,
            )
        self.supervisor = ZoneSupervisor(
            self.zones, on_change=self._zone_changed, policy=supervisor_policy(config)
        )
        self.deps = Deps(
            cn=config.cn,
            dataset_root=root,
            networks=tuple(config.networks),
            limits=config.limits,
            storage=self.storage,
            zones=self.zones,
            supervisor=self.supervisor,
            catalog=self.catalog,
        )
        self.storage_watch = StorageWatch(self.deps)
        events = Events(self.journal, self.publisher, config.cn)
        self.runner = Runner(
            self.journal,
            events,
            Services(self.deps),
            max_concurrent=config.engine.max_concurrent,
            on_outcome=self._outcome,
        )
        self._intake = Intake(
            self.journal,
            events,
            self.runner,
            cn=config.cn,
            limits=config.limits,
            on_received=self.metrics.task_received,
            on_dropped=self._dropped,
        )
        self.view = AgentView(
            cn=config.cn,
            dataset_root=root,
            started=self.started,
            mqtt=self.mqtt,
            journal=self.journal,
            storage=self.storage,
            catalog=self.catalog,
            runner=self.runner,
            metrics=self.metrics,
            central=self.heartbeat,
            extra_status=self._extra_status,
            storage_problem=self.storage_watch.serving_problem,
        )
        self.http = LocalApi(
            self.view, listen=config.http.listen, allow_non_loopback=config.http.allow_non_loopback
        )
        await self.http.start()
        pending = await self.journal.pending()
        try:
            self.reconciliation = await Reconciler(self.deps, self.journal).run(pending)
        except VolagentError as exc:
            raise StartupError(f"reconciliation: {exc.message}", details=exc.details) from exc
        await self.publisher.load()
        await self._intake.resume(pending)
        _log.info(
            "agent ready",
            version=__version__,
            cn=config.cn,
            volumes=len(self.catalog),
            resumed=len(pending),
        )
        self.notifier.ready(f"serving {len(self.catalog)} volume(s)")
        if self._on_ready is not None:
            self._on_ready()

    async def _main(self) -> None:
        async with asyncio.TaskGroup() as tg:
            mqtt = tg.create_task(self.mqtt.run(), name="mqtt")
            background = [
                tg.create_task(self._pump(), name="intake"),
                tg.create_task(self.publisher.run(), name="event-publisher"),
                tg.create_task(self.supervisor.run(), name="zone-supervisor"),
                tg.create_task(self.storage_watch.run(), name=STORAGE_WATCH),
                tg.create_task(self._prune(), name="journal-prune"),
                tg.create_task(self._refresh_status(), name="status-refresh"),
            ]
            if self.reporter is not None and self.heartbeat is not None:
                background.append(tg.create_task(self.reporter.run(), name="central-reporter"))
                background.append(tg.create_task(self.heartbeat.run(), name="central-heartbeat"))
            interval = self.notifier.watchdog_interval_s
            if interval is not None:
                background.append(tg.create_task(self._watchdog(interval), name="watchdog"))
            await self._stop.wait()
            await self._shut_down(background, mqtt)

    async def _shut_down(
        self, background: list[asyncio.Task[Any]], mqtt: asyncio.Task[None]
    ) -> None:
        began = time.monotonic()
        background[0].cancel()  # intake: unacknowledged messages are delivered again
        await self.runner.shutdown(self.config.engine.shutdown_grace_s)
        if not await self.publisher.drain(EVENT_DRAIN_S):
            _log.warning("events left for the next start", events=self.publisher.depth)
        for task in background:
            task.cancel()
        self.mqtt.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.shield(mqtt)
        mqtt.cancel()
        _log.info("agent stopped", duration_ms=round((time.monotonic() - began) * 1000, 1))

    # ------------------------------------------------------------------ loops

    async def _pump(self) -> None:
        async for message in self.mqtt.messages():
            try:
                await self._intake.handle(message.payload)
            except VolagentError as exc:
                # Not acknowledged: the broker delivers it again after the next reconnect.
                _log.error("message could not be journaled", error=exc.message)
                continue
            message.ack()

    async def _prune(self) -> None:
        keep = timedelta(days=self.config.engine.task_retention_days)
        while True:
            try:
                await self.journal.prune(utcnow() - keep, PRUNE_KEEP)
            except VolagentError as exc:
                _log.error("journal pruning failed", error=exc.message)
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _watchdog(self, interval_s: float) -> None:
        """Ping systemd's watchdog from the event loop: a stuck loop misses its pings."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    async def _refresh_status(self) -> None:
        """Publish the retained status document again after changes (at most once a second)."""
        while True:
            await self._status_changed.wait()
            self._status_changed.clear()
            await self.mqtt.publish_status()
            await asyncio.sleep(1.0)

    def _online_status(self) -> dict[str, Any]:
        by_state = collections.Counter(v.state.value for v in self.catalog.all())
        return {
            "v": 1,
            "cn": self.config.cn,
            "state": "online",
            "agent_version": __version__,
            "volumes": {"total": len(self.catalog), **by_state},
        }

    def _extra_status(self) -> dict[str, Any]:
        recon = self.reconciliation
        return {
            "reconciliation": None if recon is None else recon.as_dict(),
            "dropped_messages": dict(self.dropped),
            "events_queued": self.publisher.depth,
            "storage": self.storage_watch.as_dict(),
        }

    async def _heartbeat_body(self) -> dict[str, Any]:
        info = await self.view.space()
        pool = (
            None if info is None else {"size_bytes": info.size_bytes, "free_bytes": info.free_bytes}
        )
        return heartbeat_body(
            self.config.cn,
            __version__,
            utcnow(),
            pool,
            len(self.catalog),
            broker_connected=self.mqtt.connected,
        )

    def _volume_saved(self, _volume: Any) -> None:
        if self.reporter is not None:
            self.reporter.kick()
        self._status_changed.set()

    def _central_error(self, operation: str, exc: VolagentError) -> None:
        self.metrics.central_error(operation, exc.code)

    async def _zone_changed(self, uuid: str, status: ZoneStatus) -> None:
        before = self.catalog.get(uuid)
        if before is not None and status.restarts > before.zone.restarts:
            self.metrics.zone_restarted()
        await zone_changed(self.deps, uuid, status)

    def _dropped(self, code: str) -> None:
        self.dropped[code] += 1
        self.metrics.invalid_message(code)

    def _outcome(self, outcome: Outcome) -> None:
        self.metrics.task_finished(
            outcome.kind,
            "succeeded" if outcome.succeeded else "failed",
            outcome.code,
            outcome.duration_s,
        )
        for listener in self.outcomes:
            listener(outcome)


async def serve(config: Config, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run an agent for ``config``; return the exit status."""
    try:
        agent = Agent(config, on_ready=on_ready)
        return await agent.run()
    except StartupError as exc:
        _log.error("start-up failed", error=exc.message, details=exc.details)
        return EXIT_STARTUP
