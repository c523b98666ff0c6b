"""The Linux zone runtime: each volume's nfs-ganesha in a network namespace of its own.

A zone (see ``docs/zones.md``) is

* a network namespace ``<prefix>-<uuid>`` with ``lo`` and ``eth0``, the inside end of a veth
  pair whose host end (``<prefix><digest>``, at most 15 characters, derived from the uuid)
  joins the bridge that ``networks.<name>.bridge`` maps the nic's network to; ``eth0``
  holds the zone's address and a MAC derived from the uuid (the same after a restart, so
  clients' ARP caches stay right), and a default route goes via the gateway if there is one;
* cgroups limiting memory, CPU and processes (:mod:`volagent.adapters.cgroups`);
* a mount namespace that is a slave of the host's, with its own tmpfs on ``/run``, running
  ``rpcbind -w`` and ``ganesha.nfsd`` (:mod:`volagent.adapters.zone_init`), started with
  ``setsid -f`` so that it is no child of the agent and outlives it.

Everything needed to find a zone again is recorded in ``<state dir>/zones/<uuid>/zone.json``
(written atomically): the spec, names, cgroup directories, pids, configuration digests,
start time and restart count. The same directory holds ``ganesha.conf``, ``ganesha.log``,
the pid files, ``zone.log`` (the zone's stdout and stderr) and ganesha's recovery directory.
A new :class:`LinuxZones` over the same state directory adopts running zones
(:meth:`LinuxZones.adopt`): a recorded pid counts as the zone's server only when it is alive,
runs the expected program and lives in the recorded network namespace.

Mounts: every zone's mount namespace starts as a copy of the host's. A private copy of a
dataset's mount inside some zone keeps that dataset busy after the host unmounts it (its
destroy then fails), so before a zone is created every ZFS mount (and the zone's source) is
made shared on the host, and the zone is a slave: unmounts and mounts on the host reach it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from volagent.adapters import cgroups, ganesha, proc, zone_init
from volagent.adapters.nsnet import NETNS_DIR
from volagent.adapters.rpc import probe_nfs
from volagent.config import NetworkConfig, ZonesConfig
from volagent.domain.names import validate_volume_uuid
from volagent.errors import (
    CommandError,
    NetworkUnavailable,
    StartupError,
    VolagentError,
    ZoneFailed,
)
from volagent.ports.zones import Nic, ZoneSpec, ZoneState, ZoneStatus, ZoneUsage

__all__ = [
    "NFS_PORTS",
    "ZFS_FSTYPES",
    "ZONE_IF",
    "LinuxZones",
    "Mount",
    "established_peers",
    "host_if_name",
    "netns_name",
    "parse_mountinfo",
    "zone_mac",
]

_log = structlog.get_logger(__name__)

#: The zone's end of its veth pair, as seen inside the zone.
ZONE_IF: Final = "eth0"
#: File systems whose mounts are made shared before a zone is created.
ZFS_FSTYPES: Final = frozenset({"zfs", "fuse.zfs"})
#: The ports whose established connections make a client "connected".
NFS_PORTS: Final = frozenset({ganesha.NFS_PORT, ganesha.MOUNT_PORT})

_IFNAMSIZ: Final = 15
_PREFIX_RE: Final = re.compile(r"[a-z][a-z0-9]{0,5}")
_TCP_ESTABLISHED: Final = "01"
_RECORD: Final = "zone.json"
_POLL_S: Final = 0.05
#: Between NFS probes while a zone starts: a refused connect costs little, a late answer 10 ms.
_START_POLL_S: Final = 0.01
#: What ``ip -batch`` says on stderr after the error of its (1-based) ``line``.
_BATCH_FAILED_RE: Final = re.compile(r"^Command failed -:(?P<line>\d+)$", re.MULTILINE)
#: Words that pass through a batch line as they are (ip splits on blanks, reads quotes and #).
_BATCH_WORD_RE: Final = re.compile(r"[A-Za-z0-9_.:/@%-]+")
_RPCBIND_COMM: Final = "rpcbind"


# ---------------------------------------------------------------------------- pure helpers


def netns_name(prefix: str, uuid: str) -> str:
    """The network namespace of the zone of volume ``uuid``."""
    return f"{prefix}-{uuid}"


def host_if_name(prefix: str, uuid: str, attempt: int = 0) -> str:
    """The host end of the zone's veth: ``prefix`` plus a digest of the uuid, 15 characters.

    ``attempt`` picks another name when the first is taken (two uuids whose digests collide).
    """
    digest = hashlib.sha256(f"{uuid}/{attempt}".encode()).digest()
    text = base64.b32encode(digest).decode("ascii").lower().rstrip("=")
    return prefix + text[: _IFNAMSIZ - len(prefix)]


def zone_mac(uuid: str) -> str:
    """The MAC address of the zone's ``eth0``: derived from the uuid, so stable across restarts.

    A restarted zone has a new veth pair; with a new MAC, clients would keep sending to the
    old one until their ARP entry goes stale (seconds to minutes). Locally administered,
    unicast (``02:`` then 40 bits of a digest).
    """
    digest = hashlib.sha256(f"mac/{uuid}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/<pid>/mountinfo``: where, what, and whether it is shared."""

    mount_point: str
    fstype: str
    source: str
    shared: bool


def _unescape(text: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in a ``mountinfo`` file, in its order (later ones are on top)."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        shared = any(tag.startswith("shared:") for tag in fields[6:])
        mounts.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]), shared))
    return mounts


def _hex_address(text: str) -> str:
    """An address of ``/proc/net/tcp{,6}`` (32-bit words in host order, hex) as text."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words if sys.byteorder == "little" else raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def established_peers(text: str, ports: Collection[int]) -> set[str]:
    """Remote addresses of ESTABLISHED connections to local ``ports`` in ``/proc/net/tcp{,6}``."""
    peers = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _TCP_ESTABLISHED:
            continue
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) in ports:
            peers.add(_hex_address(remote[0]))
    return peers


# --------------------------------------------------------------------------- /proc helpers


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _comm(pid: int) -> str | None:
    text = _read(Path(f"/proc/{pid}/comm"))
    return None if text is None else text.strip()


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return stat is not None and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ns_id(path: Path) -> tuple[int, int] | None:
    """Device and inode of a namespace file (``/proc/<pid>/ns/net``, ``/run/netns/<name>``)."""
    try:
        st = path.stat()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return st.st_dev, st.st_ino


def _pids_in(netns: Path) -> list[int]:
    """Live processes (never this one) whose network namespace is the one ``netns`` names."""
    target = _ns_id(netns)
    if target is None:
        return []
    found = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _ns_id(entry / "ns" / "net") == target
    ]
    return [pid for pid in found if pid != os.getpid() and _running(pid)]


def _usage(pids: Collection[int]) -> ZoneUsage:
    page, ticks = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    rss = cpu = 0
    for pid in pids:
        statm, stat = _read(Path(f"/proc/{pid}/statm")), _read(Path(f"/proc/{pid}/stat"))
        if statm is None or stat is None:
            continue
        rss += int(statm.split()[1]) * page
        fields = stat.rsplit(")", 1)[1].split()
        cpu += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ZoneUsage(rss_bytes=rss, cpu_seconds=cpu / ticks)


def _link_exists(name: str) -> bool:
    """Whether the host has a network interface ``name``."""
    return Path(f"/sys/class/net/{name}").exists()


def _read_pid(path: Path) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- record


def _spec_to_json(spec: ZoneSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _spec_from_json(data: Mapping[str, Any]) -> ZoneSpec:
    return ZoneSpec(
        volume_uuid=data["volume_uuid"],
        source=data["source"],
        export_path=data["export_path"],
        nic=Nic(**data["nic"]),
        allowed_clients=tuple(data["allowed_clients"]),
        read_only=bool(data["read_only"]),
        nfs_versions=tuple(data["nfs_versions"]),
    )


@dataclass(slots=True)
class _Record:
    """What is kept of one zone between runs of the agent (``zone.json``)."""

    spec: ZoneSpec
    netns: str
    host_if: str
    state: str  # "starting", "running" or "failed"
    since: datetime
    cgroups: list[str] = field(default_factory=list)
    ganesha_pid: int | None = None
    rpcbind_pid: int | None = None
    config_digest: str = ""
    restart_key: str = ""
    started: datetime | None = None
    restarts: int = 0
    reason: str = ""

    def to_json(self) -> str:
        data = {
            "spec": _spec_to_json(self.spec),
            "netns": self.netns,
            "host_if": self.host_if,
            "zone_if": ZONE_IF,
            "state": self.state,
            "since": self.since.isoformat(),
            "cgroups": self.cgroups,
            "ganesha_pid": self.ganesha_pid,
            "rpcbind_pid": self.rpcbind_pid,
            "config_digest": self.config_digest,
            "restart_key": self.restart_key,
            "started": None if self.started is None else self.started.isoformat(),
            "restarts": self.restarts,
            "reason": self.reason,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> _Record:
        data = json.loads(text)
        started = data["started"]
        return cls(
            spec=_spec_from_json(data["spec"]),
            netns=data["netns"],
            host_if=data["host_if"],
            state=data["state"],
            since=datetime.fromisoformat(data["since"]),
            cgroups=list(data["cgroups"]),
            ganesha_pid=data["ganesha_pid"],
            rpcbind_pid=data["rpcbind_pid"],
            config_digest=data["config_digest"],
            restart_key=data["restart_key"],
            started=None if started is None else datetime.fromisoformat(started),
            restarts=int(data["restarts"]),
            reason=data["reason"],
        )

    @property
    def uuid(self) -> str:
        return self.spec.volume_uuid

    @property
    def cgroup_dirs(self) -> list[Path]:
        return [Path(d) for d in self.cgroups]


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------- runtime


class LinuxZones:
    """The :class:`~volagent.ports.zones.Zones` port on Linux (see the module docstring).

    ``name_prefix`` (1 to 6 of ``a-z0-9``, starting with a letter) starts every namespace and
    interface name this runtime makes. Calls on one volume are serialised; calls on different
    volumes run concurrently.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        networks: Mapping[str, NetworkConfig],
        zones: ZonesConfig,
        name_prefix: str = "vz",
        python: str = sys.executable,
        cgroup_root: Path = cgroups.CGROUP_ROOT,
    ) -> None:
        if not _PREFIX_RE.fullmatch(name_prefix):
            raise ValueError(f"name_prefix must match {_PREFIX_RE.pattern}, not {name_prefix!r}")
        state_dir = state_dir.absolute()
        if state_dir == Path("/run") or Path("/run") in state_dir.parents:
            msg = f"state directory {state_dir} is under /run, which each zone replaces"
            raise StartupError(msg, details={"state_dir": str(state_dir)})
        self._dir = state_dir / "zones"
        self._networks = dict(networks)
        self._settings = zones
        self._prefix = name_prefix
        self._python = python
        self._cgroups = cgroups.CgroupTree(parent=zones.cgroup_parent, root=cgroup_root)
        self._limits = cgroups.Limits.from_settings(
            memory_mib=zones.memory_mib, cpus=zones.cpus, pids=zones.pids
        )
        self._ganesha = ganesha.GaneshaSettings(
            root_squash=zones.root_squash,
            anonymous_uid=zones.anonymous_uid,
            anonymous_gid=zones.anonymous_gid,
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._lost: dict[str, datetime] = {}

    # ------------------------------------------------------------------ the port

    async def start(self, spec: ZoneSpec, *, restarts: int = 0) -> ZoneStatus:
        """Serve ``spec``; a running zone is left as it is, reloaded or restarted to match it.

        A running zone whose spec and configuration match is untouched; one that differs only
        in what ganesha reloads (clients, read-only, squash) is reloaded; any other difference
        restarts it. A recorded zone whose processes are gone is started afresh. A zone with
        no record starts counting its restarts from ``restarts``.
        """
        ganesha.check_spec(spec)
        async with self._locked(spec.volume_uuid):
            record = self._load(spec.volume_uuid)
            if record is not None and self._alive(record) is None:
                return await self._converge(record, spec)
            return await self._recreate(record, spec, first_count=restarts)

    async def stop(self, volume_uuid: str) -> None:
        """Stop the zone and remove everything it had; nothing to do for an unknown zone."""
        validate_volume_uuid(volume_uuid, param="volume_uuid")
        async with self._locked(volume_uuid):
            record = self._load(volume_uuid)
            if record is not None:
                await self._teardown(record)
                _log.info("zone_stopped", volume_uuid=volume_uuid)
            self._lost.pop(volume_uuid, None)

    async def restart(self, spec: ZoneSpec) -> ZoneStatus:
        """Stop and start again; the configuration is rendered afresh from current settings."""
        ganesha.check_spec(spec)
        async with self._locked(spec.volume_uuid):
            return await self._recreate(self._load(spec.volume_uuid), spec)

    async def update(self, spec: ZoneSpec) -> ZoneStatus:
        """Re-render from current settings and binaries, then restart (same as :meth:`restart`).

        A zone's configuration is rendered at every start and its programs looked up anew, so
        a restart is all an update needs here.
        """
        return await self.restart(spec)

    async def set_access(self, spec: ZoneSpec) -> ZoneStatus:
        """Apply new ``allowed_clients``/``read_only``: a reload, same ganesha process.

        Other differences from the running spec need a restart, which is done (see
        :meth:`start`); a zone that is not running is started.
        """
        return await self.start(spec)

    async def status(self, volume_uuid: str) -> ZoneStatus | None:
        """The zone's state as recorded and checked against the live processes."""
        record = self._load(volume_uuid)
        return None if record is None else self._status(record)

    async def adopt(self) -> list[ZoneStatus]:
        """Take over the recorded zones: keep the running ones, start again the others.

        A zone whose processes are alive is adopted as it is (same pids, no interruption).
        Any other recorded zone is torn down and started from its recorded spec; when that
        fails, it stays recorded as failed, with the reason.
        """
        statuses = []
        for uuid in self._recorded():
            async with self._locked(uuid):
                try:
                    record = self._load(uuid)
                except ZoneFailed as exc:
                    _log.error("zone_record_unreadable", volume_uuid=uuid, error=exc.message)
                    statuses.append(self._failed_status(uuid, exc.message))
                    continue
                if record is None:
                    continue
                if (why := self._alive(record)) is None:
                    if record.state != "running":
                        self._set_state(record, "running")
                    _log.info("zone_adopted", volume_uuid=uuid, pid=record.ganesha_pid)
                    statuses.append(self._status(record))
                    continue
                _log.warning(
                    "zone_adopt_restart", volume_uuid=uuid, reason=why, log=self._log_tail(uuid)
                )
                try:
                    statuses.append(await self._recreate(record, record.spec))
                except (ZoneFailed, NetworkUnavailable) as exc:
                    failed = dataclasses.replace(record, reason=exc.message)
                    self._set_state(failed, "failed")
                    statuses.append(self._status(failed))
        return statuses

    async def probe(self, volume_uuid: str) -> bool:
        """Whether the zone's processes run and its NFS server answers NULL calls."""
        record = self._load(volume_uuid)
        if record is None or self._alive(record) is not None:
            return False
        result = await probe_nfs(
            record.netns,
            record.spec.nic.ip,
            versions=record.spec.nfs_versions,
            timeout=self._settings.probe_timeout_s,
        )
        return result.ok

    async def connected_clients(self, volume_uuid: str) -> list[str]:
        """Client IPs with established TCP connections to the zone's NFS or MOUNT port.

        Read from ``/proc/<ganesha pid>/net/tcp`` and ``tcp6``, which show the sockets of the
        zone's own network namespace. The agent's own probes (made from inside the zone, so
        from the zone's address) are not clients and are left out.
        """
        record = self._load(volume_uuid)
        if record is None or self._alive(record) is not None:
            return []
        peers: set[str] = set()
        for table in ("tcp", "tcp6"):
            text = _read(Path(f"/proc/{record.ganesha_pid}/net/{table}"))
            peers |= established_peers(text or "", NFS_PORTS)
        own = ipaddress.ip_address(record.spec.nic.ip)
        return sorted(
            p
            for p in peers
            if ipaddress.ip_address(p) != own and not ipaddress.ip_address(p).is_loopback
        )

    async def usage(self, volume_uuid: str) -> ZoneUsage:
        """Resident memory and CPU time of the processes in the zone's cgroups (zero if none)."""
        record = self._load(volume_uuid)
        if record is None:
            return ZoneUsage(rss_bytes=0, cpu_seconds=0.0)
        return _usage(cgroups.procs(record.cgroup_dirs))

    # ------------------------------------------------------------------ records

    def _dir_of(self, uuid: str) -> Path:
        return self._dir / uuid

    def _recorded(self) -> list[str]:
        try:
            names = sorted(p.name for p in self._dir.iterdir() if (p / _RECORD).exists())
        except FileNotFoundError:
            return []
        return [n for n in names if _is_uuid(n)]

    def _load(self, uuid: str) -> _Record | None:
        """The zone's record, None when there is none; InvalidParameter for a bad uuid."""
        path = self._dir_of(validate_volume_uuid(uuid, param="volume_uuid")) / _RECORD
        text = _read(path)
        if text is None:
            return None
        try:
            return _Record.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ZoneFailed(
                f"unreadable zone record {path}: {exc}", details={"path": str(path)}
            ) from exc

    def _save(self, record: _Record) -> None:
        zone_dir = self._dir_of(record.uuid)
        try:
            zone_dir.mkdir(parents=True, exist_ok=True)
            ganesha.write_atomic(zone_dir / _RECORD, record.to_json(), mode=0o600)
        except OSError as exc:
            raise ZoneFailed(
                f"cannot record zone {record.uuid} in {zone_dir}: {exc}",
                details={"dir": str(zone_dir)},
            ) from exc

    def _set_state(self, record: _Record, state: str) -> None:
        record.state = state
        record.since = _now()
        self._save(record)

    @asynccontextmanager
    async def _locked(self, uuid: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(uuid, asyncio.Lock())
        async with lock:
            yield

    # ------------------------------------------------------------------ liveness and status

    def _alive(self, record: _Record) -> str | None:
        """None when the recorded ganesha and rpcbind run in the zone; else what is wrong."""
        if record.state == "failed":
            return record.reason or "the zone failed"
        netns = _ns_id(NETNS_DIR / record.netns)
        if netns is None:
            return f"network namespace {record.netns} is gone"
        expected = (
            ("ganesha", record.ganesha_pid, Path(self._settings.ganesha_bin).name[:15]),
            ("rpcbind", record.rpcbind_pid, _RPCBIND_COMM),
        )
        for what, pid, comm in expected:
            if pid is None:
                return f"no {what} pid recorded"
            if not _running(pid) or _comm(pid) != comm:
                return f"{what} (pid {pid}) is gone"
            if _ns_id(Path(f"/proc/{pid}/ns/net")) != netns:
                return f"{what} (pid {pid}) is not in network namespace {record.netns}"
        return None

    def _status(self, record: _Record) -> ZoneStatus:
        why = self._alive(record)
        pids = tuple(p for p in (record.ganesha_pid, record.rpcbind_pid) if p is not None)
        if why is None:
            self._lost.pop(record.uuid, None)
            return ZoneStatus(
                record.uuid, ZoneState.RUNNING, record.since, record.restarts, "", pids
            )
        since = (
            record.since if record.state == "failed" else self._lost.setdefault(record.uuid, _now())
        )
        return ZoneStatus(record.uuid, ZoneState.FAILED, since, record.restarts, why, ())

    def _failed_status(self, uuid: str, reason: str) -> ZoneStatus:
        return ZoneStatus(uuid, ZoneState.FAILED, self._lost.setdefault(uuid, _now()), 0, reason)

    # ------------------------------------------------------------------ start

    def _render(self, spec: ZoneSpec) -> ganesha.GaneshaConfig:
        recovery = self._dir_of(spec.volume_uuid) / "recovery"
        return ganesha.render(spec, self._ganesha, recovery_root=recovery)

    async def _converge(self, record: _Record, spec: ZoneSpec) -> ZoneStatus:
        """Bring the running zone of ``record`` to ``spec``: nothing, a reload or a restart."""
        config = self._render(spec)
        if record.spec == spec and record.config_digest == config.digest:
            return self._status(record)
        pid = record.ganesha_pid
        reloadable = record.spec.nic == spec.nic and record.restart_key == config.restart_key
        if not reloadable or pid is None:
            return await self._recreate(record, spec)
        zone_dir = self._dir_of(spec.volume_uuid)
        try:
            ganesha.write_atomic(zone_dir / "ganesha.conf", config.text)
        except OSError as exc:
            raise ZoneFailed(
                f"cannot write the configuration of zone {spec.volume_uuid}: {exc}"
            ) from exc
        await ganesha.reload(
            pid, zone_dir / "ganesha.log", timeout=self._settings.command_timeout_s
        )
        record.spec, record.config_digest = spec, config.digest
        self._save(record)
        _log.info("zone_reloaded", volume_uuid=spec.volume_uuid, pid=pid)
        return self._status(record)

    async def _recreate(
        self, record: _Record | None, spec: ZoneSpec, *, first_count: int = 0
    ) -> ZoneStatus:
        """Tear down what ``record`` has (if anything), then create the zone for ``spec``."""
        restarts = first_count
        if record is not None:
            await self._teardown(record)
            restarts = record.restarts + 1
        return await self._create(spec, restarts=restarts)

    def _bridge(self, network: str) -> str:
        mapped = self._networks.get(network)
        if mapped is None:
            raise NetworkUnavailable(
                f"network {network!r} is not mapped to a bridge on this node",
                details={"network": network},
            )
        if not Path(f"/sys/class/net/{mapped.bridge}/bridge").is_dir():
            raise NetworkUnavailable(
                f"bridge {mapped.bridge} of network {network!r} does not exist",
                details={"network": network, "bridge": mapped.bridge},
            )
        return mapped.bridge

    def _pick_host_if(self, uuid: str) -> str:
        for attempt in range(100):
            name = host_if_name(self._prefix, uuid, attempt)
            if not _link_exists(name):
                return name
        raise ZoneFailed(f"no free interface name for zone {uuid}", details={"uuid": uuid})

    async def _create(self, spec: ZoneSpec, *, restarts: int) -> ZoneStatus:
        """Build and start the zone; on any failure remove everything made and raise."""
        uuid = spec.volume_uuid
        bridge = self._bridge(spec.nic.network)
        await self._check_source(spec.source)
        config = self._render(spec)
        zone_dir = self._dir_of(uuid)
        record = _Record(
            spec=spec,
            netns=netns_name(self._prefix, uuid),
            host_if=self._pick_host_if(uuid),
            state="starting",
            since=_now(),
            config_digest=config.digest,
            restart_key=config.restart_key,
            restarts=restarts,
        )
        self._save(record)  # before anything is made, so that a crash leaves a trace
        started = asyncio.get_running_loop().time()
        try:
            record.cgroups = [str(d) for d in self._cgroups.create(uuid, self._limits)]
            self._save(record)
            await self._make_network(record, bridge)
            (zone_dir / "recovery").mkdir(exist_ok=True)
            ganesha.write_atomic(zone_dir / "ganesha.conf", config.text)
            await proc.start_detached(
                self._launch_argv(record),
                log=zone_dir / "zone.log",
                timeout=self._settings.command_timeout_s,
                cwd=zone_dir,
            )
            await self._wait_serving(record)
        except BaseException as exc:
            logs = self._log_tail(uuid)
            try:
                await asyncio.shield(self._teardown(record))
            except (VolagentError, OSError) as cleanup:
                # The record stays: stop, start or adopt will finish the job.
                _log.error("zone_cleanup_failed", volume_uuid=uuid, error=str(cleanup))
            if isinstance(exc, ZoneFailed):
                exc.details.setdefault("log", logs)
                raise
            if isinstance(exc, VolagentError | OSError):
                cause = exc.message if isinstance(exc, VolagentError) else str(exc)
                raise ZoneFailed(
                    f"zone {uuid} could not be set up: {cause}", details={"log": logs}
                ) from exc
            raise
        record.started = _now()
        self._set_state(record, "running")
        self._lost.pop(uuid, None)
        took = round(asyncio.get_running_loop().time() - started, 3)
        _log.info(
            "zone_started", volume_uuid=uuid, pid=record.ganesha_pid, netns=record.netns,
            ip=spec.nic.ip, seconds=took,
        )  # fmt: skip
        return self._status(record)

    async def _check_source(self, source: str) -> None:
        """Refuse a source that is not a mount point; make it and all ZFS mounts shared."""
        mounts = parse_mountinfo(_read(Path("/proc/self/mountinfo")) or "")
        if not any(m.mount_point == source for m in mounts):
            raise ZoneFailed(
                f"{source} is not a mounted file system: refusing to export an empty directory",
                details={"source": source},
            )
        top: dict[str, Mount] = {}
        for mount in mounts:
            top[mount.mount_point] = mount  # the last mount on a path is the visible one
        for point, mount in top.items():
            if not mount.shared and (mount.fstype in ZFS_FSTYPES or point == source):
                try:
                    await proc.run(
                        ["mount", "--make-shared", point],
                        timeout=self._settings.command_timeout_s,
                    )
                except CommandError as exc:
                    raise ZoneFailed(
                        f"cannot make {point} a shared mount: {exc.message}",
                        details={"mount_point": point},
                    ) from exc
                _log.info("zone_mount_made_shared", mount_point=point, fstype=mount.fstype)

    async def _ip(self, *args: str) -> None:
        await proc.run(["ip", *args], timeout=self._settings.command_timeout_s)

    async def _ip_batch(self, commands: Sequence[Sequence[str]], *, netns: str = "") -> None:
        """Run ``commands`` in one ``ip -batch -`` (``ip -n <netns>`` when given), in order.

        ip stops at the first command that fails; the CommandError then names that command
        alone (its argv as a single ``ip`` would run it) and ip's error for it.
        """
        base = ["ip", "-n", netns] if netns else ["ip"]
        for word in (w for command in commands for w in command):
            if not _BATCH_WORD_RE.fullmatch(word):
                raise ValueError(f"not a plain word for an ip batch line: {word!r}")
        text = "".join(" ".join(command) + "\n" for command in commands)
        try:
            await proc.run(
                [*base, "-batch", "-"],
                input=text.encode(),
                timeout=self._settings.command_timeout_s,
            )
        except CommandError as exc:
            found = _BATCH_FAILED_RE.search(exc.stderr)
            if found is None or not 1 <= int(found["line"]) <= len(commands):
                raise
            argv = [*base, *commands[int(found["line"]) - 1]]
            said = [line for line in exc.stderr[: found.start()].splitlines() if line.strip()]
            raise CommandError(
                f"{' '.join(argv)} failed" + (f": {said[-1].strip()}" if said else ""),
                argv=argv,
                returncode=exc.returncode,
                stderr=exc.stderr,
            ) from exc

    async def _make_network(self, record: _Record, bridge: str) -> None:
        """The namespace, the veth pair on ``bridge``, addresses and route: two ip batches."""
        nic, ns, host_if = record.spec.nic, record.netns, record.host_if
        peer = ["name", ZONE_IF, "address", zone_mac(record.uuid), "netns", ns]
        await self._ip_batch([
            ["netns", "add", ns],
            ["link", "add", host_if, "type", "veth", "peer", *peer],
            ["link", "set", host_if, "master", bridge],
            ["link", "set", host_if, "up"],
        ])  # fmt: skip
        address = ["addr", "add", f"{nic.ip}/{nic.prefix}", "dev", ZONE_IF]
        if ipaddress.ip_address(nic.ip).version == 6:
            address.append("nodad")  # ganesha cannot bind a tentative address
        inside = [["link", "set", "lo", "up"], address, ["link", "set", ZONE_IF, "up"]]
        if nic.gateway is not None:
            inside.append(["route", "add", "default", "via", nic.gateway])
        await self._ip_batch(inside, netns=ns)

    def _launch_argv(self, record: _Record) -> list[str]:
        """``zone_init`` by its path with an isolated interpreter, in the zone's namespaces."""
        zone_dir = self._dir_of(record.uuid)
        argv = ["nsenter", f"--net={NETNS_DIR / record.netns}", "--"]
        argv += ["unshare", "-m", "--propagation", "slave", "--"]
        argv += [self._python, "-I", "-S", zone_init.__file__]
        argv += ["--leader-pidfile", str(zone_dir / "leader.pid")]
        for directory in record.cgroups:
            argv += ["--cgroup", directory]
        argv += ["--rpcbind", self._settings.rpcbind_bin, "--"]
        argv += ganesha.argv(
            self._settings.ganesha_bin,
            conf=zone_dir / "ganesha.conf",
            log=zone_dir / "ganesha.log",
            pidfile=zone_dir / "ganesha.pid",
        )
        return argv

    async def _wait_serving(self, record: _Record) -> None:
        """Wait until the NFS server answers; record its pids. ZoneFailed if it does not."""
        zone_dir, spec = self._dir_of(record.uuid), record.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.start_timeout_s
        while True:
            leader = _read_pid(zone_dir / "leader.pid")
            if leader is not None and not _running(leader):
                raise ZoneFailed(
                    f"zone {record.uuid} exited while starting", details={"pid": leader}
                )
            left = deadline - loop.time()
            timeout = max(0.05, min(self._settings.probe_timeout_s, left))
            result = await probe_nfs(
                record.netns, spec.nic.ip, versions=spec.nfs_versions, timeout=timeout
            )
            if result.ok:
                break
            if loop.time() >= deadline:
                raise ZoneFailed(
                    f"zone {record.uuid} did not answer NFS within"
                    f" {self._settings.start_timeout_s:g} s: {result.error}",
                    details={"probe": result.error},
                )
            await asyncio.sleep(_START_POLL_S)
        record.ganesha_pid = _read_pid(zone_dir / "ganesha.pid") or leader
        record.rpcbind_pid = next(
            (p for p in cgroups.procs(record.cgroup_dirs) if _comm(p) == _RPCBIND_COMM), None
        )
        if (why := self._alive(record)) is not None:
            raise ZoneFailed(f"zone {record.uuid} answers, but {why}", details={"why": why})

    def _log_tail(self, uuid: str, limit: int = 2000) -> str:
        parts = []
        for name in ("zone.log", "ganesha.log"):
            text = _read(self._dir_of(uuid) / name)
            if text:
                parts.append(f"{name}: ...{text[-limit:]}" if len(text) > limit else text)
        return "\n".join(parts)

    # ------------------------------------------------------------------ teardown

    async def _teardown(self, record: _Record) -> None:
        """Stop the zone's processes and remove its namespace, veth, cgroups and files."""
        ns_path = NETNS_DIR / record.netns
        await self._stop_server(record)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.stop_timeout_s
        while pids := sorted({*cgroups.procs(record.cgroup_dirs), *_pids_in(ns_path)}):
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if loop.time() > deadline:
                raise ZoneFailed(
                    f"processes {pids} of zone {record.uuid} do not exit",
                    details={"pids": pids},
                )
            await asyncio.sleep(_POLL_S)
        try:
            if _link_exists(record.host_if):
                await self._ip("link", "delete", record.host_if)  # takes the zone's end along
            if _ns_id(ns_path) is not None:
                await self._ip("netns", "delete", record.netns)
        except CommandError as exc:
            raise ZoneFailed(
                f"cannot remove the network of zone {record.uuid}: {exc.message}",
                details={"netns": record.netns, "host_if": record.host_if},
            ) from exc
        await cgroups.remove(record.cgroup_dirs, timeout=self._settings.stop_timeout_s)
        shutil.rmtree(self._dir_of(record.uuid), ignore_errors=True)

    async def _stop_server(self, record: _Record) -> None:
        """SIGTERM the zone's ganesha and give it ``stop_timeout_s`` to exit cleanly."""
        pid = record.ganesha_pid
        if pid is None or not _is_ganesha_of(pid, record, self._settings.ganesha_bin):
            return
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.stop_timeout_s
        while _running(pid) and loop.time() < deadline:  # noqa: ASYNC110  # no event tells another process's exit
            await asyncio.sleep(_POLL_S)


def _is_ganesha_of(pid: int, record: _Record, ganesha_bin: str) -> bool:
    """Whether ``pid`` is a ganesha living in the zone's network namespace."""
    netns = _ns_id(NETNS_DIR / record.netns)
    return (
        netns is not None
        and _running(pid)
        and _comm(pid) == Path(ganesha_bin).name[:15]
        and _ns_id(Path(f"/proc/{pid}/ns/net")) == netns
    )


def _is_uuid(name: str) -> bool:
    try:
        validate_volume_uuid(name)
    except VolagentError:
        return False
    return True
