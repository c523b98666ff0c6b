"""The demo's story: one node, two tenants, and what their volumes go through.

:meth:`Story.steps` lists the steps in order; each tells what happens and why, runs the real
commands (tasks with ``volagent task submit --follow``, ``volagent status``, NFS clients in
the client namespaces) and shows their output; a step that does not go as told raises
:class:`~volagent.errors.VolagentError`. :meth:`Story.finish` (stop and clean up) and
:meth:`Story.keep` (KEEP=1: leave the node up) end every run.
"""

from __future__ import annotations

import json
import re
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from demo_cli import Cli, Nfs, TaskOutcome
from demo_host import free_port
from demo_layout import CLIENT_UID, CLIENTS, NETWORK, SUBNET, Layout, mark_dir
from demo_node import (
    create_pool,
    ensure_zfs,
    make_network,
    start_agent,
    start_broker,
    wait_ready,
    write_config,
)
from demo_teardown import teardown
from demo_term import Terminal
from volagent.adapters import proc
from volagent.errors import VolagentError

__all__ = ["Step", "Story"]

_READY_TIMEOUT_S: Final = 60.0
#: Fields of a volume object shown after a task (the whole object is in the task's event).
_VOLUME_FIELDS: Final = (
    "name", "state", "size_mib", "filesystem_path", "allowed_clients", "zone", "snapshots",
)  # fmt: skip
_REFUSED: Final = "MNT3ERR_ACCES"


@dataclass(frozen=True)
class Step:
    """A step of the story: its title (for the summary) and what it does."""

    title: str
    run: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class _Volume:
    """A volume of the story: who owns it, where it is served, who may mount it."""

    name: str
    tenant: str
    owner: str
    host: int
    clients: tuple[str, ...]
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))


def _expect(condition: bool, message: str) -> None:
    """Fail the step with ``message`` unless ``condition`` holds."""
    if not condition:
        raise VolagentError(message)


def _show_volume(term: Terminal, volume: Mapping[str, Any]) -> None:
    lines = []
    for key in _VOLUME_FIELDS:
        value = volume.get(key)
        if key == "zone" and isinstance(value, Mapping):
            value = f"{value.get('state')} (restarts {value.get('restarts')})"
        elif key == "snapshots" and isinstance(value, list):
            value = ", ".join(str(s.get("name")) for s in value) or "none"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        lines.append(f"{key}: {value}")
    term.output("\n".join(["result (some fields):", *(f"  {line}" for line in lines)]), limit=20)


class Story:
    """The demo on the node that ``layout`` names."""

    def __init__(
        self, term: Terminal, layout: Layout, *, earlier: list[Layout], keep: bool
    ) -> None:
        """Tell the story on ``term``; ``earlier`` names what earlier runs may have left.

        With ``keep`` (KEEP=1) the story ends with ``uploads`` still served.
        """
        self.term = term
        self.layout = layout
        self.earlier = earlier
        self.keep_node = keep
        self.cli = Cli(layout.volagent, layout.config)
        self.nfs = Nfs(CLIENT_UID)
        self.zfs_note = ""
        wordpress, video = str(uuidlib.uuid4()), str(uuidlib.uuid4())
        self.uploads = _Volume("uploads", "wordpress", wordpress, 10, ("c1", "c2"))
        self.spool = _Volume("spool", "video", video, 20, ("c3",))
        self.hello = b""

    def steps(self) -> list[Step]:
        """The story, in order."""
        return [
            Step("start a node: pool, broker, bridge, clients, agent", self.start_node),
            Step("two volumes for two tenants (volume.create)", self.create_volumes),
            Step("one volume shared: c1 writes, c2 reads", self.share),
            Step("another tenant's client is refused", self.refuse),
            Step("snapshot, a bad write, rollback", self.snapshot_and_rollback),
            Step("resize to 128 MiB (volume.resize)", self.resize),
            Step("volagent status", self.status),
            Step("delete the volumes (volume.delete)", self.delete),
        ]

    # ------------------------------------------------------------------ helpers

    def _ip(self, host: int) -> str:
        return self.layout.ip(host)

    def _export(self, volume: _Volume) -> tuple[str, str]:
        return self._ip(volume.host), f"/{volume.name}"

    async def _task(self, kind: str, params: Mapping[str, str]) -> Any:
        """Submit a task with the CLI, follow it and show its events; its result."""
        self.term.command(Cli.submit_argv(kind, params))
        outcome: TaskOutcome = await self.cli.submit(kind, params)
        self.term.output("\n".join(outcome.events))
        if not outcome.ok:
            message = outcome.body.get("message") if isinstance(outcome.body, dict) else ""
            raise VolagentError(f"{kind} failed: {outcome.error_code}: {message}")
        return outcome.body

    async def _client(self, client: str, tool: str, *args: str) -> proc.Completed:
        """Run an NFS client tool in a client namespace; show the command and its output."""
        ns = self.layout.client_ns(client)
        self.term.command(Nfs.argv(ns, tool, *args))
        done = await self.nfs.run(ns, tool, *args)
        text = done.text if tool != "nfs-cat" else done.text[:400]
        self.term.output(text + done.stderr)
        return done

    async def _copy(self, client: str, local: Path, url: str) -> None:
        """``client`` copies a local file to an NFS URL (a new file: nfs-cp never overwrites)."""
        done = await self._client(client, "nfs-cp", str(local), url)
        _expect(done.returncode == 0, f"{client} could not write {local.name}")

    async def _listing(self, client: str, volume: _Volume) -> set[str]:
        """The file names in a volume's root, listed by ``client``."""
        done = await self._client(client, "nfs-ls", self.nfs.url(*self._export(volume)))
        _expect(done.returncode == 0, f"{client} cannot list {volume.name}: {done.stderr.strip()}")
        return {line.split()[-1] for line in done.text.splitlines() if line.split()}

    # ------------------------------------------------------------------ the steps

    async def start_node(self) -> None:
        """Step: zfs-fuse, the pool, the broker, the network, then the agent, ready."""
        term, layout = self.term, self.layout
        term.say(
            "A compute node needs ZFS, an MQTT broker and a tenants' network. The demo makes"
            f" its own, all named after the tag {layout.tag!r}: a ZFS pool on a 1 GiB sparse"
            " file (zfs-fuse), mosquitto on a free loopback port, and a bridge with no address"
            f" and no uplink (nothing leaves this machine) for the network {SUBNET}, with three"
            " client namespaces on it. Then it starts the agent."
        )
        if await ensure_zfs(layout):
            self.zfs_note = "zfs-fuse was started by the demo: it stops when no pool is left on it"
        else:
            self.zfs_note = "zfs-fuse was already running and stays running"
        term.good(self.zfs_note)
        for earlier in self.earlier:
            if removed := await teardown(earlier, self.delete_all, stop_zfs=False):
                term.note("an earlier run left things behind; removed:")
                term.output("\n".join(removed))
        mark_dir(layout.dir, layout.tag)
        layout.files.mkdir(parents=True, exist_ok=True)
        await create_pool(layout)
        term.good(f"pool {layout.pool} on {layout.image} (1 GiB, sparse)")
        mqtt_port = await start_broker(layout)
        term.good(f"mosquitto listening on 127.0.0.1:{mqtt_port}")
        await make_network(layout)
        term.good(f"bridge {layout.bridge} for network {NETWORK!r} ({SUBNET}), clients:")
        for client, host in CLIENTS.items():
            tenant = self.uploads.tenant if client in self.uploads.clients else self.spool.tenant
            term.output(f"{layout.client_ns(client)}  {self._ip(host)}  tenant {tenant}")
        write_config(layout, mqtt_port=mqtt_port, http_port=free_port())
        argv = [str(layout.volagent), "configcheck", str(layout.config)]
        term.command(["volagent", "configcheck", str(layout.config)])
        term.output((await proc.run(argv, timeout=20)).text)
        started = time.monotonic()
        pid = await start_agent(layout)
        term.good(f"agent started (pid {pid}), log {layout.agent_log}")
        document = await wait_ready(layout, pid, _READY_TIMEOUT_S)
        checks = ", ".join(document["ready"].get("checks", {}))
        term.good(f"agent ready in {time.monotonic() - started:.1f} s (checks: {checks})")
        term.say(
            f"Every volagent command below runs with --config {layout.config} (left out here)."
        )

    async def create_volumes(self) -> None:
        """Step: tenant A's ``uploads`` for c1 and c2, tenant B's ``spool`` for c3."""
        self.term.say(
            "Tenant A, a WordPress farm, asks for a 64 MiB volume 'uploads' that its web"
            " servers c1 and c2 may mount. Tenant B, a video app, asks for 'spool', for its"
            " worker c3 only. Each request is a task sent over MQTT; the agent creates a ZFS"
            " dataset and starts an NFS server (nfs-ganesha) in a network namespace of its own"
            " with the volume's address on the tenants' network."
        )
        for volume in (self.uploads, self.spool):
            clients = ",".join(f'"{self._ip(CLIENTS[c])}"' for c in volume.clients)
            params = {
                "uuid": volume.uuid,
                "name": volume.name,
                "owner_uuid": volume.owner,
                "size_mib": "64",
                "nic.ip": self._ip(volume.host),
                "nic.prefix": str(SUBNET.prefixlen),
                "nic.network": NETWORK,
                "allowed_clients": f"[{clients}]",
                "labels.tenant": volume.tenant,
            }
            result = await self._task("volume.create", params)
            _show_volume(self.term, result)
            _expect(
                result.get("state") == "ready", f"{volume.name} is {result.get('state')}, not ready"
            )
            self.term.good(f"{volume.name} is served at {result.get('filesystem_path')}")

    async def share(self) -> None:
        """Step: c1 writes a file into ``uploads`` over NFSv3, c2 reads the same bytes."""
        self.term.say(
            "c1 copies a file into 'uploads' over NFSv3. c2, another web server of the same"
            " tenant, reads it back: both see the same bytes, which is what a shared volume"
            " is for. (The clients act as uid 1000: root would be squashed.)"
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        self.hello = f"uploaded by c1 ({self._ip(CLIENTS['c1'])}) at {stamp} UTC\n".encode()
        local = self.layout.files / "hello.txt"
        local.write_bytes(self.hello)
        url = self.nfs.url(*self._export(self.uploads), "hello.txt")
        await self._copy("c1", local, url)
        await self._listing("c2", self.uploads)
        read = await self._client("c2", "nfs-cat", url)
        _expect(read.stdout == self.hello, f"c2 read {read.stdout!r}, not {self.hello!r}")
        self.term.good(f"c2 read the {len(self.hello)} bytes c1 wrote")

    async def refuse(self) -> None:
        """Step: c3 (tenant B) is refused by ``uploads``, and served by its own ``spool``."""
        self.term.say(
            "c3 belongs to tenant B. It tries to mount tenant A's volume and A's NFS server"
            f" refuses it ({_REFUSED}: not on the volume's client list). Its own tenant's"
            " volume serves it."
        )
        denied = await self._client("c3", "nfs-ls", self.nfs.url(*self._export(self.uploads)))
        refused = denied.returncode != 0 and _REFUSED in denied.stderr + denied.text
        _expect(refused, f"c3 was not refused by uploads (exit status {denied.returncode})")
        self.term.good("uploads refused c3")
        local = self.layout.files / "job-1.txt"
        local.write_bytes(b"transcode recording 1\n")
        url = self.nfs.url(*self._export(self.spool), "job-1.txt")
        await self._copy("c3", local, url)
        _expect("job-1.txt" in await self._listing("c3", self.spool), "job-1.txt is not in spool")
        self.term.good("spool serves c3")

    async def snapshot_and_rollback(self) -> None:
        """Step: snapshot ``uploads``, add a file, roll back: the new file is gone."""
        self.term.say(
            "Before a risky plugin update, tenant A snapshots 'uploads'. The update then"
            " writes a file it should not have. Rolling back to the snapshot restores the"
            " volume: the agent stops its NFS server, rolls the dataset back and serves it"
            " again."
        )
        volume, snapshot = self.uploads.uuid, "before-update"
        created = await self._task("snapshot.create", {"volume_uuid": volume, "name": snapshot})
        self.term.output(f"result: snapshot {created.get('name')} created {created.get('created')}")
        local = self.layout.files / "plugin-cache.bin"
        local.write_bytes(bytes(range(256)) * 64)
        url = self.nfs.url(*self._export(self.uploads), "plugin-cache.bin")
        await self._copy("c1", local, url)
        files = await self._listing("c2", self.uploads)
        _expect("plugin-cache.bin" in files, "plugin-cache.bin is not in uploads")
        result = await self._task("snapshot.rollback", {"volume_uuid": volume, "name": snapshot})
        _show_volume(self.term, result)
        files = await self._listing("c2", self.uploads)
        _expect(files == {"hello.txt"}, f"after the rollback uploads holds {sorted(files)}")
        url = self.nfs.url(*self._export(self.uploads), "hello.txt")
        read = await self._client("c2", "nfs-cat", url)
        _expect(read.stdout == self.hello, f"after the rollback hello.txt holds {read.stdout!r}")
        self.term.good("plugin-cache.bin is gone, hello.txt holds what c1 wrote")

    async def resize(self) -> None:
        """Step: ``uploads`` grows from 64 to 128 MiB."""
        self.term.say(
            "'uploads' fills up, so tenant A grows it to 128 MiB. The agent moves the"
            " dataset's quota; clients notice nothing but the room."
        )
        result = await self._task("volume.resize", {"uuid": self.uploads.uuid, "size_mib": "128"})
        _show_volume(self.term, result)
        _expect(
            result.get("size_mib") == 128,
            f"uploads is {result.get('size_mib')} MiB after the resize",
        )
        self.term.good("uploads: 64 MiB -> 128 MiB")

    async def status(self) -> None:
        """Step: what ``volagent status`` shows about the node."""
        self.term.say(
            "What an operator sees on the node: `volagent status` asks the agent's local"
            " HTTP API for its version, broker connection, readiness checks, tasks and volumes."
        )
        self.term.command(["volagent", "status"])
        text = await self.cli.status()
        self.term.output(text, limit=40)
        ready = re.search(r"^ready\s+yes$", text, re.MULTILINE)
        _expect(ready is not None, "volagent status does not say the agent is ready")
        two = re.search(r"^volumes\s+total 2\b", text, re.MULTILINE)
        _expect(two is not None, "volagent status does not count two volumes")
        self.term.good("the agent is ready and serves two volumes")

    async def delete(self) -> None:
        """Step: both volumes deleted (``uploads`` stays with KEEP=1), then listed."""
        self.term.say(
            "The tenants are done. Deleting a volume stops its NFS server, removes its"
            " namespace and destroys its dataset. No client holds a connection (libnfs"
            " clients exit after each command), so no force is needed."
        )
        doomed = [self.uploads, self.spool]
        if self.keep_node:
            self.term.say("KEEP=1: only 'spool' is deleted; 'uploads' stays for you to try.")
            doomed.remove(self.uploads)
        for volume in doomed:
            result = await self._task("volume.delete", {"uuid": volume.uuid})
            self.term.output(f"result: {json.dumps(result)}")
        listed = await self._task("volume.list", {})
        names = sorted(v.get("name") for v in listed.get("volumes", []))
        pool = json.dumps(listed.get("pool"))
        self.term.output(f"result: volumes {json.dumps(names)}, pool {pool}")
        expected = ["uploads"] if self.keep_node else []
        _expect(names == expected, f"volumes left: {names}, expected {expected}")
        self.term.good("deleted: " + ", ".join(v.name for v in doomed))

    # ------------------------------------------------------------------ the end

    async def delete_all(self) -> list[str]:
        """Delete every volume through the agent (``force``: clients may still hold them)."""
        listed = await self.cli.submit("volume.list", {})
        names = []
        for volume in listed.body.get("volumes", []) if listed.ok else []:
            outcome = await self.cli.submit(
                "volume.delete", {"uuid": volume["uuid"], "force": "true"}
            )
            state = "deleted" if outcome.ok else f"not deleted ({outcome.error_code})"
            names.append(f"volume {volume['name']} {state} through the agent")
        return names

    async def finish(self) -> None:
        """Stop the agent and remove everything the demo made."""
        self.term.say(
            "The agent stops on SIGTERM; then everything the demo made is removed: the"
            " volumes still there (through the agent), the broker, the client namespaces,"
            " the bridge, the zones' cgroups and the pool."
        )
        for line in await teardown(self.layout, self.delete_all, stop_zfs=True):
            self.term.good(line)

    def keep_instructions(self, stop: str) -> list[str]:
        """How to use the node that KEEP=1 leaves running, and how to stop it (``stop``)."""
        layout = self.layout
        url = self.nfs.url(*self._export(self.uploads))
        return [
            "The node keeps running (KEEP=1): the agent, its broker, the pool and the zones.",
            "",
            "Its status:",
            f"  {layout.volagent} status --config {layout.config}",
            "A task, followed to its end (volume.get on uploads):",
            f"  {layout.volagent} task submit volume.get --follow \\",
            f"      --param uuid={self.uploads.uuid} --config {layout.config}",
            "uploads, listed from client c1:",
            f"  ip netns exec {layout.client_ns('c1')} nfs-ls '{url}'",
            f"The agent's log: {layout.agent_log}",
            "",
            "Stop it and remove everything (clean is the same as stop):",
            f"  {stop}",
        ]

    async def keep(self) -> None:
        """KEEP=1: leave the node running (no teardown)."""
        self.term.say(
            "KEEP=1: the node is left running, with 'uploads' on it. The instructions below"
            " say how to use it and how to stop it."
        )
