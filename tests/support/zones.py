"""Zones under test: volume datasets to export, a runtime per test, the host state to restore."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import Bridge
from tests.support.nfs import NfsClient
from tests.support.run import sh
from volagent.adapters.netns import LinuxZones
from volagent.config import NetworkConfig, ZonesConfig
from volagent.ports.zones import Nic, ZoneSpec

#: The network name the test bridge is mapped to.
NETWORK = "tenant"
#: The mode of a fresh volume's root: any client uid may create files (root is squashed to
#: the anonymous uid), the sticky bit keeps users from removing each other's files.
VOLUME_MODE = 0o1777
_CGROUP_CONTROLLERS = ("memory", "cpu", "pids")


def make_volume(dataset_root: str, name: str, seed: Mapping[str, bytes] | None = None) -> str:
    """Create dataset ``<dataset_root>/<name>`` with a fresh volume's root mode; its mountpoint.

    ``seed`` files are written into it (before any zone serves it).
    """
    dataset = f"{dataset_root}/{name}"
    sh(["zfs", "create", dataset])
    mountpoint = sh(["zfs", "get", "-H", "-o", "value", "mountpoint", dataset]).strip()
    Path(mountpoint).chmod(VOLUME_MODE)
    for file, data in (seed or {}).items():
        Path(mountpoint, file).write_bytes(data)
    return mountpoint


@dataclass
class ZoneBed:
    """Runtimes over one state directory, a bridge mapped to :data:`NETWORK`, volumes, specs."""

    tag: str
    state_dir: Path
    bridge: Bridge
    dataset_root: str
    runtimes: list[LinuxZones] = field(default_factory=list)

    def volume(self, name: str, seed: Mapping[str, bytes] | None = None) -> str:
        """A new volume dataset under the bed's dataset root; its mountpoint."""
        return make_volume(self.dataset_root, name, seed)

    def zone_dir(self, volume_uuid: str) -> Path:
        """The state directory of one zone."""
        return self.state_dir / "zones" / volume_uuid

    def zone_pids(self, volume_uuid: str) -> tuple[int, int]:
        """The zone's ganesha and rpcbind pids, as its record holds them."""
        record = json.loads((self.zone_dir(volume_uuid) / "zone.json").read_text())
        return (record["ganesha_pid"], record["rpcbind_pid"])

    def ganesha_log(self, volume_uuid: str) -> str:
        """The zone's ganesha log so far."""
        return (self.zone_dir(volume_uuid) / "ganesha.log").read_text()

    def settings(self, **overrides: object) -> ZonesConfig:
        """Zone settings for tests: cgroups below the test's own, short timeouts."""
        values: dict[str, object] = {
            "cgroup_parent": f"{self.tag}-zones",
            "start_timeout_s": 20.0,
            "stop_timeout_s": 5.0,
            **overrides,
        }
        return ZonesConfig.model_validate(values)

    def runtime(self, **overrides: object) -> LinuxZones:
        """A new runtime over the bed's state directory (what an agent restart makes)."""
        runtime = LinuxZones(
            state_dir=self.state_dir,
            networks={NETWORK: NetworkConfig(bridge=self.bridge.name)},
            zones=self.settings(**overrides),
            name_prefix=self.tag,
        )
        self.runtimes.append(runtime)
        return runtime

    def spec(
        self,
        source: str,
        host: int,
        clients: tuple[str, ...],
        *,
        volume_uuid: str | None = None,
        export_path: str | None = None,
        read_only: bool = False,
        versions: tuple[int, ...] = (3, 4),
    ) -> ZoneSpec:
        """A spec serving ``source`` at host number ``host`` of the bridge's subnet."""
        volume_uuid = volume_uuid or str(uuid.uuid4())
        return ZoneSpec(
            volume_uuid=volume_uuid,
            source=source,
            export_path=export_path or f"/volumes/{volume_uuid}",
            nic=Nic(ip=self.bridge.ip(host), prefix=self.bridge.network.prefixlen, network=NETWORK),
            allowed_clients=clients,
            read_only=read_only,
            nfs_versions=versions,
        )

    def recorded(self) -> list[str]:
        """Uuids of the zones with a record in the state directory."""
        zones = self.state_dir / "zones"
        return sorted(p.name for p in zones.iterdir()) if zones.exists() else []

    async def stop_all(self) -> None:
        """Stop every recorded zone, whichever runtime started it."""
        runtime = self.runtime()
        await asyncio.gather(*(runtime.stop(u) for u in self.recorded()))


def _tagged_cgroups(tag: str) -> set[str]:
    found: set[str] = set()
    for controller in _CGROUP_CONTROLLERS:
        for top, dirs, _ in os.walk(f"/sys/fs/cgroup/{controller}"):
            found.update(str(Path(top, d)) for d in dirs if tag in str(Path(top, d)))
    return found


def _zone_processes(tag: str, state_dir: Path) -> set[tuple[int, str]]:
    """Live processes that belong to zones: in a tagged cgroup or namespace, or naming the state."""
    tagged_ns = [n for n in sh(["ip", "netns", "list"]).split() if tag in n]
    in_ns = {int(p) for n in tagged_ns for p in sh(["ip", "netns", "pids", n], check=False).split()}
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cgroup = (entry / "cgroup").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue  # exited; its reaper (PID 1 here) collects it in its own time
        if int(entry.name) in in_ns or tag in cgroup or str(state_dir) in cmdline:
            found.add((int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")]))
    return found


@dataclass(frozen=True)
class HostState:
    """What zones add to the host, restricted to this run's names (other tests run alongside)."""

    netns: frozenset[str]
    links: frozenset[str]
    processes: frozenset[tuple[int, str]]
    cgroups: frozenset[str]
    mounts: frozenset[str]

    @classmethod
    def take(cls, tag: str, state_dir: Path) -> HostState:
        """Namespaces, links and cgroups carrying ``tag``, the zones' processes and mounts.

        Mounts: namespace files of this run and anything under the state directory (the
        volumes' own datasets come and go with the tests, and their propagation changes).
        """
        links = sh(["ip", "-o", "link", "show"]).splitlines()
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        return cls(
            netns=frozenset(n for n in sh(["ip", "netns", "list"]).split() if tag in n),
            links=frozenset(ln.split(":")[1].strip() for ln in links if tag in ln),
            processes=frozenset(_zone_processes(tag, state_dir)),
            cgroups=frozenset(_tagged_cgroups(tag)),
            mounts=frozenset(
                point
                for point in (line.split()[4] for line in mountinfo)
                if point.startswith((f"/run/netns/{tag}", str(state_dir)))
            ),
        )


class ReadLoop(threading.Thread):
    """Reads one NFS URL over and over with real ``nfs-cat`` until stopped; counts failures."""

    def __init__(self, client: NfsClient, url: str, expected: bytes) -> None:
        super().__init__(daemon=True)
        self.client, self.url, self.expected = client, url, expected
        self.reads = 0
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        """Read until :meth:`stop`."""
        while not self._done.is_set():
            result = self.client.cat(self.url)
            if not result.ok:
                self.errors.append(result.stderr.strip())
            elif result.stdout != self.expected:
                self.errors.append(f"read {len(result.stdout)} bytes that differ")
            self.reads += 1

    def stop(self) -> None:
        """Stop after the read in progress."""
        self._done.set()
        self.join(timeout=60)
