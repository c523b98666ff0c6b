"""``volagent doctor``: check what the agent needs on this node and say how to fix what is wrong.

:func:`diagnose` runs the checks in order and returns one :class:`Finding` each: the
configuration loads; ``zfs`` and ``zpool`` are found and ``zpool list`` answers; the pool of
``storage.dataset_root`` exists; ``ganesha.nfsd`` and ``rpcbind`` are found; every
``networks.<name>.bridge`` is a bridge; ``state.dir`` is writable; the broker takes an MQTT
connection with the agent's credentials (as ``volagent-doctor-<cn>``, clean session: never
the agent's own client id, whose session it would take over); the central API answers when
``central.url`` is set; the agent's local HTTP API answers ``/health`` (only a warning when
it does not: the agent may simply not be running). Checks read the system and never change
it, except a temporary file created and removed at once in ``state.dir``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, TextIO

import aiohttp
import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from volagent import config as config_module
from volagent.adapters import proc
from volagent.adapters.mqtt import BrokerUnavailable
from volagent.cli_status import AgentUnreachable, LocalClient, client_error_reason
from volagent.cli_submit import mqtt_client
from volagent.config import Config
from volagent.errors import EXIT_FAILURE, EXIT_OK, CommandError, ConfigError

__all__ = ["Finding", "Level", "diagnose", "doctor_command", "render"]

#: Where Linux shows network interfaces; a bridge has a ``bridge`` directory there.
SYS_CLASS_NET: Final = Path("/sys/class/net")
#: Upper bound for ``zpool list`` (``storage.command_timeout_s`` when that is shorter).
ZPOOL_TIMEOUT_S: Final = 15.0
#: Upper bound for the broker, central API and local HTTP API checks, each.
NETWORK_TIMEOUT_S: Final = 10.0

_ZFS_HINT: Final = (
    "start ZFS: systemctl start zfs-fuse (zfs-fuse) or modprobe zfs (kernel module),"
    " then check with zpool list"
)


class Level(StrEnum):
    """How a check came out; only ``FAIL`` makes the doctor exit non-zero."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check: what was found and, unless OK, how to fix it."""

    check: str
    level: Level
    detail: str
    hint: str = ""


def _ok(check: str, detail: str) -> Finding:
    return Finding(check, Level.OK, detail)


def _fail(check: str, detail: str, hint: str) -> Finding:
    return Finding(check, Level.FAIL, detail, hint)


# ---------------------------------------------------------------- programs and ZFS


def _program(check: str, program: str, key: str, install: str) -> Finding:
    found = shutil.which(program)
    if found is None:
        return _fail(check, f"{program} not found", f"install {install}, or set {key}")
    return _ok(check, found)


async def _zfs(cfg: Config) -> list[Finding]:
    storage = cfg.storage
    findings = [
        _program("zfs", storage.zfs_bin, "storage.zfs_bin", "ZFS (zfsutils-linux or zfs-fuse)"),
        _program(
            "zpool", storage.zpool_bin, "storage.zpool_bin", "ZFS (zfsutils-linux or zfs-fuse)"
        ),
    ]
    if findings[-1].level is Level.FAIL:
        return findings
    timeout = min(storage.command_timeout_s, ZPOOL_TIMEOUT_S)
    try:
        listed = await proc.run(
            [storage.zpool_bin, "list", "-H", "-o", "name,health"], timeout=timeout
        )
    except CommandError as exc:
        return [*findings, _fail("zpool list", exc.message, _ZFS_HINT)]
    health = dict(line.split("\t", 1) for line in listed.text.splitlines() if "\t" in line)
    findings.append(_ok("zpool list", f"answers: {len(health)} pool(s)"))
    pool = storage.dataset_root.split("/", 1)[0]
    if pool not in health:
        known = ", ".join(sorted(health)) or "none"
        hint = f"import or create pool {pool} (zpool import {pool}), or fix storage.dataset_root"
        findings.append(_fail("pool", f"pool {pool} not found (pools: {known})", hint))
    elif health[pool] != "ONLINE":
        hint = f"see zpool status {pool}"
        level = Level.WARN if health[pool] == "DEGRADED" else Level.FAIL
        findings.append(Finding("pool", level, f"pool {pool} is {health[pool]}", hint))
    else:
        findings.append(_ok("pool", f"pool {pool} ONLINE"))
    return findings


# ---------------------------------------------------------------- host


def _bridges(cfg: Config) -> list[Finding]:
    if not cfg.networks:
        hint = 'map one: [networks.<name>] bridge = "<host bridge>"'
        return [Finding("networks", Level.WARN, "no network mapped: volume.create will fail", hint)]
    findings = []
    for name, network in cfg.networks.items():
        check, bridge = f"bridge {name}", network.bridge
        key = f"networks.{name}.bridge"
        if (SYS_CLASS_NET / bridge / "bridge").is_dir():
            findings.append(_ok(check, f"{bridge} is a bridge"))
        elif (SYS_CLASS_NET / bridge).exists():
            hint = f"map {key} to a bridge (zones join it as bridge ports)"
            findings.append(_fail(check, f"{bridge} is not a bridge", hint))
        else:
            hint = (
                f"create it (ip link add {bridge} type bridge && ip link set {bridge} up)"
                f" or map {key} to an existing bridge"
            )
            findings.append(_fail(check, f"{bridge}: no such interface", hint))
    return findings


def _state_dir(path: Path) -> Finding:
    hint = "make it writable for the agent's user (chown, chmod, mount read-write) or set state.dir"
    if path.exists():
        if not path.is_dir():
            return _fail("state dir", f"{path} is not a directory", hint)
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".volagent-doctor-"):
                pass
        except OSError as exc:
            return _fail("state dir", f"{path}: cannot write ({exc.strerror or exc})", hint)
        return _ok("state dir", f"{path} is writable")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return _ok("state dir", f"{path} does not exist yet; the agent creates it in {parent}")
    return _fail("state dir", f"{path} does not exist and {parent} is not writable", hint)


# ---------------------------------------------------------------- network services


async def _broker(cfg: Config) -> Finding:
    client_id = f"volagent-doctor-{cfg.cn}"
    try:
        client = mqtt_client(cfg, client_id)
        async with asyncio.timeout(NETWORK_TIMEOUT_S), client:
            pass
    except MqttConnectError as exc:
        hint = "check mqtt.username and mqtt.password_file against the broker's users and ACLs"
        return _fail("broker", f"{cfg.mqtt.url} refused the connection: {exc}", hint)
    except (aiomqtt.MqttError, OSError, TimeoutError, BrokerUnavailable) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
        hint = "check that the broker runs, mqtt.url (and mqtt.ca_file for mqtts://), firewalls"
        return _fail("broker", f"{cfg.mqtt.url}: {reason}", hint)
    return _ok("broker", f"{cfg.mqtt.url} accepted {client_id}")


async def _central(cfg: Config) -> Finding:
    url = cfg.central.url
    if not url:
        return _ok("central", "reporting disabled (central.url empty)")
    timeout = aiohttp.ClientTimeout(total=min(cfg.central.timeout_s, NETWORK_TIMEOUT_S))
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = client_error_reason(exc)
        hint = "check central.url and the way there (DNS, routes, firewall, proxy)"
        return _fail("central", f"{url}: {reason}", hint)
    return _ok("central", f"{url} answered HTTP {status}")


async def _agent(cfg: Config) -> Finding:
    address = cfg.http.listen
    try:
        async with LocalClient(cfg.http, timeout_s=NETWORK_TIMEOUT_S) as client:
            status, _body = await client.get("/health")
    except AgentUnreachable:
        hint = "start the agent (systemctl start volagent) if it should be running"
        return Finding("agent", Level.WARN, f"not answering at {address}", hint)
    if status != 200:
        hint = "check http.listen: another program may hold that address"
        return _fail("agent", f"{address} answered /health with {status}", hint)
    return _ok("agent", f"answering at {address}")


# ---------------------------------------------------------------- all together


async def diagnose(path: Path) -> list[Finding]:
    """Run every check with the configuration at ``path``; the findings in order.

    When the configuration does not load, that is the only finding.
    """
    try:
        cfg = config_module.load(path)
    except ConfigError as exc:
        problems = "; ".join(f"{key}: {message}" for key, message in exc.problems[:3])
        detail = exc.message + (f" ({problems})" if problems else "")
        return [_fail("config", detail, f"run volagent configcheck {path} and fix what it lists")]
    findings = [_ok("config", str(path))]
    findings += await _zfs(cfg)
    findings.append(
        _program(
            "ganesha", cfg.zones.ganesha_bin, "zones.ganesha_bin", "nfs-ganesha (with FSAL VFS)"
        )
    )
    findings.append(_program("rpcbind", cfg.zones.rpcbind_bin, "zones.rpcbind_bin", "rpcbind"))
    findings += _bridges(cfg)
    findings.append(_state_dir(cfg.state.dir))
    findings.append(await _broker(cfg))
    findings.append(await _central(cfg))
    findings.append(await _agent(cfg))
    return findings


def render(findings: list[Finding]) -> str:
    """One line per finding, a ``fix:`` line under each that is not OK, and a summary."""
    width = max(len(f.check) for f in findings)
    lines = []
    for finding in findings:
        lines.append(f"{finding.level.value:<4}  {finding.check:<{width}}  {finding.detail}")
        if finding.level is not Level.OK and finding.hint:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {finding.hint}")
    failed = sum(f.level is Level.FAIL for f in findings)
    warned = sum(f.level is Level.WARN for f in findings)
    summary = f"{failed} of {len(findings)} checks failed" if failed else "all checks passed"
    lines.append(summary + (f", {warned} warning(s)" if warned else ""))
    return "\n".join(lines)


async def doctor_command(path: Path, *, out: TextIO) -> int:
    """Run the checks, print them; 0 when none failed, else 1."""
    findings = await diagnose(path)
    out.write(render(findings) + "\n")
    return EXIT_FAILURE if any(f.level is Level.FAIL for f in findings) else EXIT_OK
