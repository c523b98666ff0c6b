"""The components one benchmark uses, made for it and removed after it, even on Ctrl-C.

:class:`Bed` makes, under a tag unique to the run (``vbXXXX``): a file-backed pool on the
zfs-fuse daemon (started if none answers, stopped at the end only then), a mosquitto broker on
a free loopback port, a Linux bridge with a private /24 out of ``10.214.0.0/16`` (blackholed
in the host's namespace, as the test bed does with its own block), a client namespace on it,
and a state directory for the agent. :class:`AgentProcess` runs ``volagent run`` on it.

Removal, in order: the agent process, every zone recorded in the state directory (stopped
through the agent's own zone runtime), the benchmark's own clean-ups, whatever still carries
the tag (namespaces and their processes, links, cgroups), the pool, the broker, the route.
Nothing without the tag is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import aiohttp

from tests.support.agent import CN
from tests.support.mqtt import free_port
from tests.support.net import Bridge, Namespace, kill_netns_processes
from tests.support.node import OWNER, config_toml
from tests.support.run import sh
from tests.support.zfs import Daemon, Pool
from volagent.adapters.netns import LinuxZones
from volagent.config import Config, NetworkConfig, ZonesConfig

#: Where bench bridges take their /24 (the test suite uses 10.213.0.0/16).
BENCH_BLOCK: Final = ipaddress.IPv4Network("10.214.0.0/16")
#: The network name the bench bridge is mapped to.
NETWORK: Final = "tenant"
#: The host number of the client namespace on the bridge.
CLIENT_HOST: Final = 250
#: Lines of the agent's log shown when a benchmark fails.
LOG_TAIL: Final = 40
#: How long a busy pool is retried at teardown.
POOL_DESTROY_S: Final = 60.0
#: Only to turn a hang into an error.
WAIT_S: Final = 600.0


class Broker:
    """A mosquitto on a free loopback port, logging only problems (no per-message log).

    ``set_tcp_nodelay``: without it the broker's small writes wait on delayed ACKs (Nagle),
    which puts 40 ms steps into every round trip and hides what is measured.
    """

    def __init__(self, workdir: Path) -> None:
        """Write the config under ``workdir``; :meth:`start` runs it."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {workdir}/",
                    "max_queued_messages 100000",
                    "set_tcp_nodelay true",
                    f"log_dest file {self.log}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                ]
            )
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker's URL in the agent's config syntax."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                msg = f"mosquitto did not start (see {self.conf.parent}/mosquitto.log)"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the broker."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


class Bed:
    """A pool, a broker, a bridge with a client namespace, and an agent state directory."""

    def __init__(self, *, pool_mb: int = 4096) -> None:
        """Name everything; :meth:`__enter__` makes it."""
        token = secrets.randbits(16)
        self.tag = f"vb{token:04x}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"volagent-{self.tag}-"))
        self.pool_mb = pool_mb
        self.state_dir = self.workdir / "state"
        self.daemon = Daemon(self.workdir)
        subnet = token % 256
        self.bridge = Bridge(
            name=f"{self.tag}b",
            prefix_tag=f"{self.tag}n",
            network=ipaddress.IPv4Network(f"10.214.{subnet}.0/24"),
        )
        self.broker = Broker(self.workdir / "mqtt")
        self.pool: Pool | None = None
        self.client: Namespace | None = None
        self.agent: AgentProcess | None = None
        self._fenced = False
        self._cleanups: list[Callable[[], None]] = []

    @property
    def pool_name(self) -> str:
        """The pool's name."""
        return f"{self.tag}p"

    @property
    def dataset_root(self) -> str:
        """Where the agent keeps its volumes."""
        return f"{self.pool_name}/volumes"

    def ip(self, host: int) -> str:
        """The address of host number ``host`` on the bridge."""
        return self.bridge.ip(host)

    def on_teardown(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` at teardown, before the pool goes (last registered first)."""
        self._cleanups.append(cleanup)

    def __enter__(self) -> Bed:
        """Make everything; on any failure, remove what was made and raise."""
        try:
            self.daemon.ensure_running()
            self.pool = Pool.create(self.pool_name, self.workdir / "pools", size_mb=self.pool_mb)
            routes = sh(["ip", "route", "show", "type", "blackhole", str(BENCH_BLOCK)])
            if not routes.strip():
                sh(["ip", "route", "add", "blackhole", str(BENCH_BLOCK)])
                self._fenced = True
            self.bridge.create()
            self.client = self.bridge.namespace(CLIENT_HOST, role="c")
            self.broker.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Remove everything (a second Ctrl-C cannot interrupt this); keep the agent's log."""
        if exc is not None and self.agent is not None and self.agent.log.exists():
            self._keep_evidence(self.agent)
        self.teardown()

    def _keep_evidence(self, agent: AgentProcess) -> None:
        """Show the agent's last log lines and status, keep its and the broker's log."""
        lines = agent.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        print(f"the agent's last {len(lines)} log lines:", *lines, sep="\n", file=sys.stderr)
        if agent.proc is not None and agent.proc.poll() is None:
            status = agent.url + "/status"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(status, timeout=5) as answer,  # noqa: S310  # our loopback API
            ):
                print(f"the agent's /status: {answer.read().decode()}", file=sys.stderr)
        kept = []
        for name, path in (("agent", agent.log), ("mosquitto", self.broker.log)):
            if path.exists():
                copy = Path(tempfile.gettempdir()) / f"volagent-bench-{self.tag}-{name}.log"
                shutil.copy(path, copy)
                kept.append(str(copy))
        print(f"(logs kept: {', '.join(kept)})", file=sys.stderr)

    def teardown(self) -> None:
        """Remove everything this bed made; each step runs even when an earlier one failed."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            steps: list[tuple[str, Callable[[], None]]] = []
            if self.agent is not None:
                steps.append(("agent", self.agent.kill))
            steps.append(("zones", self._stop_zones))
            steps += [("clean-up", c) for c in reversed(self._cleanups)]
            steps += [
                ("namespaces", self._sweep_namespaces),
                ("bridge", self.bridge.destroy),
                ("cgroups", self._sweep_cgroups),
                ("pool", self._destroy_pool),
                ("broker", self.broker.stop),
                ("route", self._unfence),
                ("daemon", self.daemon.stop),
            ]
            for what, step in steps:
                try:
                    step()
                except Exception as exc:  # noqa: BLE001  # every step runs; the failure is shown
                    print(f"teardown: {what}: {exc}", file=sys.stderr)
            shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)

    @property
    def networks(self) -> dict[str, NetworkConfig]:
        """The agent's ``[networks]``: the bench network mapped to the bridge."""
        return {NETWORK: NetworkConfig(bridge=self.bridge.name)}

    @property
    def zones_settings(self) -> ZonesConfig:
        """The agent's ``[zones]``: defaults, with the bed's names."""
        return ZonesConfig(cgroup_parent=f"{self.tag}-zones", name_prefix=self.tag)

    def zones_runtime(self) -> LinuxZones:
        """The agent's zone runtime over this bed's state directory (what the agent uses)."""
        return LinuxZones(
            state_dir=self.state_dir,
            networks=self.networks,
            zones=self.zones_settings,
            name_prefix=self.tag,
        )

    def _stop_zones(self) -> None:
        zones_dir = self.state_dir / "zones"
        if not zones_dir.is_dir():
            return
        recorded = [p.name for p in zones_dir.iterdir() if (p / "zone.json").exists()]

        async def stop_all() -> None:
            runtime = self.zones_runtime()
            limit = asyncio.Semaphore(16)

            async def stop(uuid: str) -> None:
                async with limit:
                    await runtime.stop(uuid)

            results = await asyncio.gather(*(stop(u) for u in recorded), return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                msg = f"{len(failures)} zone(s) not stopped, the first: {failures[0]!r}"
                raise RuntimeError(msg)

        asyncio.run(stop_all())

    def _sweep_namespaces(self) -> None:
        for name in sh(["ip", "netns", "list"], check=False).split():
            if name.startswith(self.tag):
                kill_netns_processes(name)
                sh(["ip", "netns", "delete", name], check=False)
        for line in sh(["ip", "-o", "link", "show"], check=False).splitlines():
            link = line.split(":")[1].strip().split("@")[0]
            if link.startswith(self.tag) and link != self.bridge.name:
                sh(["ip", "link", "delete", link], check=False)

    def _sweep_cgroups(self) -> None:
        """Remove the tagged cgroups and every cgroup under them, deepest first."""
        found: list[Path] = []
        for controller in Path("/sys/fs/cgroup").iterdir():
            for top, dirs, _ in os.walk(controller):
                tagged = any(part.startswith(self.tag) for part in Path(top).parts)
                found += [Path(top, d) for d in dirs if tagged or d.startswith(self.tag)]
        for directory in sorted(found, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def _destroy_pool(self) -> None:
        """Unmount the pool's file systems deepest first, then destroy it; retried while busy.

        Never forced. A zone's processes may take a moment to let go of its dataset.
        """
        if self.pool is None:
            return
        deadline = time.monotonic() + POOL_DESTROY_S
        while True:
            names = sh(["zfs", "list", "-H", "-r", "-o", "name", self.pool.name], check=False)
            for name in sorted(names.split(), key=lambda n: n.count("/"), reverse=True):
                sh(["zfs", "unmount", name], check=False)
            done = subprocess.run(
                ["zpool", "destroy", self.pool.name], capture_output=True, text=True, check=False
            )
            if done.returncode == 0 or "no such pool" in done.stderr:
                break
            if time.monotonic() > deadline:
                msg = f"zpool destroy {self.pool.name}: {done.stderr.strip()}"
                raise RuntimeError(msg)
            time.sleep(0.5)
        self.pool.image.unlink(missing_ok=True)
        self.pool = None

    def _unfence(self) -> None:
        if self._fenced:
            sh(["ip", "route", "del", "blackhole", str(BENCH_BLOCK)], check=False)
            self._fenced = False


def agent_config(bed: Bed, *, http_port: int, **overrides: dict[str, Any]) -> Config:
    """The agent's configuration on ``bed``: defaults except names, paths and log level."""
    data: dict[str, dict[str, Any]] = {
        "node": {"uuid": CN},
        "mqtt": {"url": bed.broker.url},
        "storage": {"dataset_root": bed.dataset_root},
        "networks": {k: v.model_dump() for k, v in bed.networks.items()},
        "state": {"dir": str(bed.state_dir)},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "zones": bed.zones_settings.model_dump(exclude_defaults=True),
        "log": {"level": "info", "format": "json"},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return Config.model_validate(data)


class AgentProcess:
    """``volagent run`` on a bed, as its own process; its local HTTP API on a free port."""

    def __init__(self, bed: Bed, **overrides: dict[str, Any]) -> None:
        """Write the configuration; :meth:`start` runs the agent."""
        self.bed = bed
        self.http_port = free_port()
        self.config = agent_config(bed, http_port=self.http_port, **overrides)
        self.config_path = bed.workdir / "volagent.toml"
        self.config_path.write_text(
            config_toml(self.config.model_dump(mode="json", exclude_defaults=True))
        )
        self.log = bed.workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        bed.agent = self

    @property
    def url(self) -> str:
        """The local HTTP API."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Start ``volagent run``."""
        with self.log.open("ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "volagent", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET a path of the local HTTP API as JSON."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=60)) as answer,
        ):
            body: dict[str, Any] = await answer.json()
            return body

    async def ready(self) -> dict[str, Any]:
        """Wait until reconciliation is done and the broker connected; the ``/status`` then."""
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.proc is None or self.proc.poll() is not None:
                msg = f"the agent exited during start-up; see {self.log}"
                raise RuntimeError(msg)
            with contextlib.suppress(aiohttp.ClientError, OSError):
                status = await self.get_json("/status")
                if status.get("reconciliation") is not None and status["broker"]["connected"]:
                    return status
            if time.monotonic() > deadline:
                msg = f"the agent was not ready within {WAIT_S:g} s; see {self.log}"
                raise RuntimeError(msg)
            await asyncio.sleep(0.05)

    def rss_bytes(self) -> int:
        """The agent's resident memory now."""
        assert self.proc is not None  # noqa: S101  # only asked of a running agent
        return rss_of(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, and wait for the graceful shutdown (zones keep running)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            msg = "the agent did not stop within 60 s of SIGTERM"
            raise RuntimeError(msg) from None
        self.proc = None
        if status != 0:
            msg = f"the agent exited {status}; see {self.log}"
            raise RuntimeError(msg)

    def kill(self) -> None:
        """Stop the agent whatever it is doing (teardown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


def rss_of(pid: int) -> int:
    """Resident memory of a process, in bytes (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def volume_params(bed: Bed, name: str, host: int, **extra: Any) -> dict[str, Any]:
    """``volume.create`` parameters for a volume called ``name`` at host number ``host``."""
    return {
        "uuid": str(uuid.uuid4()),
        "name": name,
        "owner_uuid": OWNER,
        "size_mib": 64,
        "nic": {"ip": bed.ip(host), "prefix": bed.bridge.network.prefixlen, "network": NETWORK},
        **extra,
    }
