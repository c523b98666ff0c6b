"""Shared fixtures: the real components the agent drives, each cleaned up even when a test fails.

Markers (declared in pyproject.toml, enforced by --strict-markers) name the component a test
needs; a test skips only when that component is truly absent, and the reason names it.

Every name a fixture creates (pools, bridges, namespaces) starts with ``RUN_TAG``, unique per
run, and the session ends with a check that none of them is left behind.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import components, net
from tests.support.mqtt import Mosquitto
from tests.support.net import Bridge, Namespace
from tests.support.nfs import NfsClient
from tests.support.run import sh
from tests.support.zfs import Daemon, Pool, daemon_answers, destroy_dataset_tree
from tests.support.zones import ZoneBed
from volagent.adapters import proc
from volagent.adapters.zfs import ZfsCli
from volagent.ports.storage import Capabilities

RUN_TAG = f"vt{secrets.token_hex(2)}"
_seq = itertools.count()


def _require(marker: str) -> None:
    reason = components.missing(marker)
    if reason is not None:
        pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a marked test when (and only when) its component is absent, saying which."""
    for marker in components.PROGRAMS:
        if item.get_closest_marker(marker) is not None:
            _require(marker)


@pytest.fixture(scope="session")
def run_dir() -> Iterator[Path]:
    """A directory for this run's pool images, broker state and zone files."""
    path = Path(tempfile.mkdtemp(prefix=f"volagent-{RUN_TAG}-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _test_addresses_stay_on_this_machine() -> Iterator[None]:
    """Traffic from the host to the test bridges' block is dropped, never routed out."""
    if components.missing("netns") is not None:
        yield
        return
    added = net.fence_test_block()
    yield
    if added:
        net.unfence_test_block()


@pytest.fixture(scope="session", autouse=True)
def _nothing_leaked() -> Iterator[None]:
    """After the whole run: no pool, link or namespace carrying this run's tag is left."""
    yield
    leaks = []
    if shutil.which("ip"):
        leaks += [n for n in sh(["ip", "netns", "list"], check=False).split() if RUN_TAG in n]
        links = sh(["ip", "-o", "link", "show"], check=False)
        leaks += [ln.split(":")[1].strip() for ln in links.splitlines() if RUN_TAG in ln]
    if shutil.which("zpool") and components.missing("zfs") is None:
        pools = sh(["zpool", "list", "-H", "-o", "name"], check=False).split()
        leaks += [p for p in pools if p.startswith(RUN_TAG)]
    assert not leaks, f"the test bed leaked: {leaks}"


# ---------------------------------------------------------------------------------------- zfs


@pytest.fixture(scope="session")
def zfs_daemon(run_dir: Path) -> Iterator[Daemon]:
    """The zfs-fuse daemon: started if not running, stopped at the end only if started here."""
    _require("zfs")
    daemon = Daemon(run_dir)
    daemon.ensure_running()
    yield daemon
    daemon.stop()


@pytest.fixture
def zfs_outage(zfs_daemon: Daemon, zpool: Pool) -> Iterator[Daemon]:
    """The daemon, for one test to kill and resume; after it, running with the run's pool mounted.

    Killing the daemon leaves every pool's mounts dead, so whatever the test did, the run's
    pool is detached and mounted again for the other tests (the test's own extra pools are
    gone by then; other pools on the machine are not the run's to touch).
    """
    yield zfs_daemon
    if zfs_daemon.running_pid() is None or not daemon_answers():
        zfs_daemon.kill()
        zfs_daemon.resume()
    zfs_daemon.remount([zpool.name])


@pytest.fixture(scope="session")
def zpool(zfs_daemon: Daemon, run_dir: Path) -> Iterator[Pool]:
    """A 4 GiB sparse file-backed pool, unique to this run, destroyed with its file."""
    pool = Pool.create(f"{RUN_TAG}p", run_dir / "pools", size_mb=4096)
    yield pool
    pool.destroy()


@pytest.fixture
def make_pool(zfs_daemon: Daemon, run_dir: Path) -> Iterator[Callable[..., Pool]]:
    """A factory of extra pools for one test (send/recv targets, tiny pools to fill up)."""
    made: list[Pool] = []

    def make(size_mb: int = 128) -> Pool:
        pool = Pool.create(f"{RUN_TAG}x{next(_seq)}", run_dir / "pools", size_mb=size_mb)
        made.append(pool)
        return pool

    yield make
    for pool in reversed(made):
        pool.destroy()


@pytest.fixture(scope="session")
def zfs_capabilities(zpool: Pool) -> Capabilities:
    """What this zfs can do, detected once per run (as the agent does at start-up)."""
    return asyncio.run(ZfsCli(command_timeout_s=60).detect_capabilities(zpool.name))


@pytest.fixture
def storage(zfs_capabilities: Capabilities) -> ZfsCli:
    """The CLI storage driver, with the run's detected capabilities."""
    return ZfsCli(command_timeout_s=60, capabilities=zfs_capabilities)


@pytest.fixture
def zfs_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every argv run through ``proc.run`` from now on (to count the driver's zfs calls)."""
    calls: list[tuple[str, ...]] = []
    real = proc.run

    async def spy(argv: Any, **kw: Any) -> proc.Completed:
        calls.append(tuple(argv))
        return await real(argv, **kw)

    monkeypatch.setattr(proc, "run", spy)
    return calls


@pytest.fixture
def dataset_root(zpool: Pool) -> Iterator[str]:
    """A fresh, empty dataset under the run's pool; destroyed with everything under it."""
    name = f"{zpool.name}/t{next(_seq)}"
    sh(["zfs", "create", name])
    yield name
    destroy_dataset_tree(name)


# --------------------------------------------------------------------------------------- mqtt


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running anonymous broker on a free loopback port, with persistence."""
    _require("mqtt")
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.close()


MQTT_USER = {"volagent": "s3cret-test-password"}


@pytest.fixture
def mosquitto_auth(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running broker that needs a username and password (see ``MQTT_USER``)."""
    _require("mqtt")
    broker = Mosquitto(tmp_path / "mosquitto-auth", users=MQTT_USER)
    broker.start()
    yield broker
    broker.close()


# ---------------------------------------------------------------------------------------- net


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    """A new bridge with a private /24; namespaces made on it are deleted with it."""
    _require("netns")
    br = Bridge(name=f"{RUN_TAG}b{next(_seq)}", prefix_tag=f"{RUN_TAG}n{next(_seq)}").create()
    yield br
    br.destroy()


@pytest.fixture
def client_ns(bridge: Bridge) -> Callable[[int], Namespace]:
    """``client_ns(host)`` makes a client namespace holding host number ``host`` on the bridge."""
    return lambda host: bridge.namespace(host, role="c")


@pytest.fixture
def nfs_client() -> Callable[[Namespace], NfsClient]:
    """``nfs_client(ns)`` runs nfs-cp/nfs-cat/nfs-ls inside ``ns``."""
    _require("nfs")
    return NfsClient


# -------------------------------------------------------------------------------------- zones


@pytest.fixture
async def zone_bed(dataset_root: str, bridge: Bridge, tmp_path: Path) -> AsyncIterator[ZoneBed]:
    """Zone runtimes over one state directory, the bridge mapped, volumes under dataset_root.

    Every zone is stopped afterwards, before the volumes' datasets are destroyed.
    """
    _require("nfs")
    bed = ZoneBed(
        tag=RUN_TAG, state_dir=tmp_path / "state", bridge=bridge, dataset_root=dataset_root
    )
    yield bed
    await bed.stop_all()
