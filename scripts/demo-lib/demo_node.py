"""The demo's node: a zfs-fuse pool, a mosquitto broker, a bridge with client namespaces, the agent.

Each function sets up one part, named after :class:`~demo_layout.Layout`;
:mod:`demo_teardown` removes them all. The zfs-fuse daemon serves every pool on the machine:
it is started only when none runs. The broker and the agent are started in sessions of their
own, so that they outlive the demo with KEEP=1.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from demo_host import (
    COMMAND_TIMEOUT_S,
    agent_status,
    alive,
    free_port,
    is_agent,
    is_mount_point,
    listening,
    pids_matching,
    read_pid,
    tail,
    zfs_answers,
    zfs_daemons,
)
from demo_layout import CLIENTS, NETWORK, SUBNET, Layout
from volagent.adapters import proc
from volagent.errors import VolagentError

__all__ = [
    "create_pool",
    "ensure_zfs",
    "make_network",
    "start_agent",
    "start_broker",
    "wait_ready",
    "write_config",
]

_POOL_BYTES: Final = 1024 * 1024 * 1024


async def _start_detached(argv: list[str], log: Path, find: Callable[[list[str]], bool]) -> int:
    """Start ``argv`` in a session of its own (it outlives the demo); its pid, found by argv."""
    await proc.start_detached(argv, log=log, timeout=COMMAND_TIMEOUT_S)
    deadline = time.monotonic() + 10
    while not (pids := pids_matching(lambda _pid, a: find(a))):
        if time.monotonic() > deadline:
            raise VolagentError(f"{argv[0]} exited at once; its log {log}:\n{tail(log)}")
        await asyncio.sleep(0.05)
    return pids[0]


async def ensure_zfs(layout: Layout) -> bool:
    """Start zfs-fuse unless a daemon runs; True when the daemon is the demo's.

    The daemon is the demo's when this call or an earlier run from the same work directory
    started it (its pid file there names it). A daemon that runs but does not answer yet
    (it is starting, or restarting) is waited for; if it goes away instead, one is started.
    zfs-fuse refuses to start over a pid file left by an earlier daemon: a stale one is
    removed first.
    """
    started = False
    deadline = time.monotonic() + 30
    while not await zfs_answers():
        if not started and not zfs_daemons():
            layout.zfs_pid.unlink(missing_ok=True)
            await proc.run(
                ["zfs-fuse", "--pidfile", str(layout.zfs_pid)], timeout=COMMAND_TIMEOUT_S
            )
            started = True
        if time.monotonic() > deadline:
            msg = "zfs-fuse runs but does not answer `zpool list` within 30 s"
            raise VolagentError(msg)
        await asyncio.sleep(0.2)
    pid = read_pid(layout.zfs_pid)
    return started or (pid is not None and pid in zfs_daemons())


async def create_pool(layout: Layout) -> None:
    """A 1 GiB sparse file, and the pool ``<tag>`` on it, mounted in the work directory.

    The pool is mounted below a shared mount, so its mounts are shared from birth: a zone
    made at any time (the demo's, or another agent's on this machine) gets slave copies,
    which the pool's destroy unmounts too. A private copy would keep the pool busy until
    that zone ends.
    """
    layout.mount_root.mkdir(exist_ok=True)
    if not is_mount_point(layout.mount_root):
        root = str(layout.mount_root)
        await proc.run(["mount", "--bind", root, root], timeout=COMMAND_TIMEOUT_S)
    await proc.run(["mount", "--make-shared", str(layout.mount_root)], timeout=COMMAND_TIMEOUT_S)
    with layout.image.open("wb") as image:
        image.truncate(_POOL_BYTES)
    argv = ["zpool", "create", "-m", str(layout.mountpoint), layout.pool, str(layout.image)]
    await proc.run(argv, timeout=60)


async def start_broker(layout: Layout) -> int:
    """Start mosquitto on a free loopback port with persistence in the work directory."""
    layout.broker_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    layout.broker_conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "user root",
                "persistence true",
                f"persistence_location {layout.broker_dir}/",
                f"log_dest file {layout.broker_dir / 'mosquitto.log'}",
                "",
            ]
        )
    )
    argv = ["mosquitto", "-c", str(layout.broker_conf)]
    pid = await _start_detached(argv, layout.broker_dir / "stderr.log", lambda a: a == argv)
    layout.broker_pid.write_text(f"{pid}\n")
    deadline = time.monotonic() + 10
    while not listening(port):
        if not alive(pid) or time.monotonic() > deadline:
            log = layout.broker_dir / "mosquitto.log"
            raise VolagentError(f"mosquitto is not listening on port {port}:\n{tail(log)}")
        await asyncio.sleep(0.05)
    return port


async def _ip(*args: str) -> None:
    await proc.run(["ip", *args], timeout=COMMAND_TIMEOUT_S)


def _no_host_address(link: str) -> None:
    """Keep the host off a link: no IPv6 link-local address either (it has no IPv4 one)."""
    switch = Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6")
    if switch.exists():
        switch.write_text("1\n")


async def make_network(layout: Layout) -> None:
    """The bridge (no address, no uplink) and one namespace per client, on a veth."""
    await _ip("link", "add", layout.bridge, "type", "bridge")
    _no_host_address(layout.bridge)
    await _ip("link", "set", layout.bridge, "up")
    for client, host in CLIENTS.items():
        ns, host_if = layout.client_ns(client), layout.client_if(client)
        await _ip("netns", "add", ns)
        await _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _no_host_address(host_if)
        await _ip("link", "set", host_if, "master", layout.bridge)
        await _ip("link", "set", host_if, "up")
        await _ip("-n", ns, "addr", "add", f"{layout.ip(host)}/{SUBNET.prefixlen}", "dev", "eth0")
        await _ip("-n", ns, "link", "set", "eth0", "up")
        await _ip("-n", ns, "link", "set", "lo", "up")


def write_config(layout: Layout, *, mqtt_port: int, http_port: int) -> None:
    """The agent's configuration: this node, the broker, the pool, the bridge, the zones."""
    tables: dict[str, dict[str, Any]] = {
        "node": {"uuid": str(uuidlib.uuid4())},
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
        "storage": {"dataset_root": layout.dataset_root},
        f"networks.{NETWORK}": {"bridge": layout.bridge},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "state": {"dir": str(layout.state)},
        "engine": {"shutdown_grace_s": 10.0},
        "zones": {"cgroup_parent": layout.cgroup_parent, "name_prefix": layout.tag},
        "log": {"level": "info", "format": "console"},
    }
    lines = ["# The demo's agent (scripts/demo); every key: docs/config.example.toml"]
    for table, values in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    layout.config.write_text("\n".join(lines) + "\n")


async def start_agent(layout: Layout) -> int:
    """Start ``volagent run`` in a session of its own, logging to the work directory."""
    argv = [str(layout.volagent), "run", "--config", str(layout.config)]
    layout.agent_log.unlink(missing_ok=True)
    pid = await _start_detached(argv, layout.agent_log, lambda a: is_agent(layout, a))
    layout.agent_pid.write_text(f"{pid}\n")
    return pid


async def wait_ready(layout: Layout, pid: int, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109  # a deadline per call
    """Poll ``volagent status --json`` until the agent is ready; its status document."""
    deadline = time.monotonic() + timeout
    while True:
        document = await agent_status(layout)
        if document is not None and document["ready"].get("ready") is True:
            return document
        if not alive(pid):
            raise VolagentError(f"the agent (pid {pid}) exited while starting")
        if time.monotonic() > deadline:
            raise VolagentError(f"the agent (pid {pid}) is not ready after {timeout:g} s")
        await asyncio.sleep(0.5)
