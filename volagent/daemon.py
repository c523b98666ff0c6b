"""``volagent run``: the agent's life in three phases.

**Start-up** (any failure exits with status 3, a bad configuration with 78): take the lock
on ``state.dir`` (one agent per state directory), open the journal, probe ZFS and make sure
the dataset root exists, reconcile ZFS, zones and the journal, queue the unfinished tasks and
the unsent events of the last run, then tell the service manager the agent is ready.

**Main loop**: a :class:`asyncio.TaskGroup` of named tasks: the MQTT session, the intake
(each message journaled, then acknowledged), the event publisher, the zone supervisor and the
journal's pruning. Tasks themselves run on the :class:`~volagent.engine.runner.Runner`.

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
from volagent.adapters.mqtt import MqttAdapter
from volagent.adapters.netns import LinuxZones
from volagent.adapters.zfs import ZfsCli
from volagent.config import Config
from volagent.engine.intake import Intake
from volagent.engine.journal import AsyncJournal, journal_path
from volagent.engine.publisher import EventPublisher
from volagent.engine.reconcile import Reconciler, Reconciliation
from volagent.engine.runner import Events, Outcome, Runner, utcnow
from volagent.errors import EXIT_OK, EXIT_STARTUP, StartupError, VolagentError
from volagent.services.catalog import Catalog
from volagent.services.deps import Deps
from volagent.services.handlers import Services
from volagent.services.volumes import zone_changed
from volagent.services.zone_supervisor import SupervisorPolicy, ZoneSupervisor

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
        self.zones = LinuxZones(
            state_dir=config.state.dir,
            networks=config.networks,
            zones=config.zones,
            name_prefix=config.zones.name_prefix,
        )
        self.mqtt = MqttAdapter(config)
        # Set in run(), once the journal is open.
        self.journal: AsyncJournal
        self.catalog: Catalog
        self.runner: Runner
        self.publisher: EventPublisher
        self.supervisor: ZoneSupervisor
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
            await self._main()
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
        self.catalog = Catalog(self.journal)
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
            on_dropped=self._dropped,
        )
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
        if self._on_ready is not None:
            self._on_ready()

    async def _main(self) -> None:
        async with asyncio.TaskGroup() as tg:
            mqtt = tg.create_task(self.mqtt.run(), name="mqtt")
            background = [
                tg.create_task(self._pump(), name="intake"),
                tg.create_task(self.publisher.run(), name="event-publisher"),
                tg.create_task(self.supervisor.run(), name="zone-supervisor"),
                tg.create_task(self._prune(), name="journal-prune"),
            ]
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

    async def _zone_changed(self, uuid: str, status: Any) -> None:
        await zone_changed(self.deps, uuid, status)

    def _dropped(self, code: str) -> None:
        self.dropped[code] += 1

    def _outcome(self, outcome: Outcome) -> None:
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
