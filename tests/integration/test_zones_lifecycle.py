"""A zone's life: start, what is recorded, restart and update, adoption, teardown, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.run import alive, sh
from tests.support.zfs import destroy_dataset_tree
from tests.support.zones import NETWORK, HostState, ReadLoop, ZoneBed
from volagent.adapters.netns import LinuxZones
from volagent.config import NetworkConfig
from volagent.errors import CommandError, NetworkUnavailable, ZoneFailed
from volagent.ports.zones import ZoneState

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns]

Clients = Callable[[int], Namespace]
Nfs = Callable[[Namespace], NfsClient]
DATA = b"volume data that must survive\n" * 100


def read_text(path: Path) -> str:
    return path.read_text()


def ppid_and_sid(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3])


def netns_inode(path: str) -> int:
    return Path(path).stat().st_ino


async def until(condition: Callable[[], bool], *, within: float = 30) -> None:
    """Poll ``condition`` (state outside this process: nothing signals it) until it holds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110  # another process's state: no event to wait on
            await asyncio.sleep(0.02)


@contextmanager
def held_connection(ns: Namespace, ip: str, port: int) -> Iterator[None]:
    """A TCP connection from ``ns`` to ``ip``:``port`` held open until the block ends."""
    script = (
        "import socket, sys, time\n"
        f"s = socket.create_connection(({ip!r}, {port}))\n"
        "print('connected', flush=True)\n"
        "sys.stdin.read()\n"
    )
    argv = ns.exec_argv("python3", "-c", script)
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"connected\n"
        try:
            yield
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=10)


async def test_start_records_a_detached_limited_zone_and_is_idempotent(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs
) -> None:
    source = zone_bed.volume("vol", seed={"data.bin": DATA})
    a = client_ns(21)
    zones = zone_bed.runtime(memory_mib=128, cpus=0.5, pids=200)
    spec = zone_bed.spec(source, 10, (a.ip,))
    status = await zones.start(spec)
    assert status.state is ZoneState.RUNNING
    assert (status.restarts, status.reason) == (0, "")
    ganesha_pid, rpcbind_pid = status.pids
    assert await zones.start(spec) == status  # the same spec again: left as it is
    assert await zones.status(spec.volume_uuid) == status
    assert await zones.probe(spec.volume_uuid)

    record = json.loads(read_text(zone_bed.zone_dir(spec.volume_uuid) / "zone.json"))
    assert record["ganesha_pid"] == ganesha_pid
    assert record["rpcbind_pid"] == rpcbind_pid
    assert record["spec"]["export_path"] == spec.export_path
    assert record["zone_if"] == "eth0"
    assert len(record["host_if"]) <= 15
    assert record["host_if"].startswith(zone_bed.tag)
    assert record["config_digest"]
    netns = f"/run/netns/{record['netns']}"
    for pid in (ganesha_pid, rpcbind_pid):
        assert netns_inode(f"/proc/{pid}/ns/net") == netns_inode(netns)
    # Not the agent's children, and in sessions of their own: they outlive the agent.
    ppid, sid = ppid_and_sid(ganesha_pid)
    assert ppid != os.getpid()
    assert sid == ganesha_pid
    assert sid != os.getsid(0)

    memory, cpu, pids = (Path(d) for d in record["cgroups"])
    assert read_text(memory / "memory.limit_in_bytes").strip() == str(128 * 1024 * 1024)
    assert read_text(cpu / "cpu.cfs_quota_us").strip() == "50000"
    assert read_text(cpu / "cpu.cfs_period_us").strip() == "100000"
    assert read_text(pids / "pids.max").strip() == "200"
    for directory in (memory, cpu, pids):
        members = {int(p) for p in read_text(directory / "cgroup.procs").split()}
        assert {ganesha_pid, rpcbind_pid} <= members

    usage = await zones.usage(spec.volume_uuid)
    assert usage.rss_bytes > 1024 * 1024
    assert usage.cpu_seconds >= 0
    url = nfs_url(spec.nic.ip, f"{spec.export_path}/data.bin")
    assert nfs_client(a).cat(url).expect_ok() == DATA


async def test_connected_clients_are_those_with_open_nfs_connections(
    zone_bed: ZoneBed, client_ns: Clients
) -> None:
    a, b = client_ns(21), client_ns(22)
    zones = zone_bed.runtime()
    spec = zone_bed.spec(zone_bed.volume("vol"), 10, (a.ip, b.ip))
    await zones.start(spec)
    assert await zones.probe(spec.volume_uuid)  # the agent's own probe is no client
    assert await zones.connected_clients(spec.volume_uuid) == []
    with held_connection(a, spec.nic.ip, 2049):
        assert await zones.connected_clients(spec.volume_uuid) == [a.ip]
        with held_connection(b, spec.nic.ip, 20048):
            assert await zones.connected_clients(spec.volume_uuid) == sorted([a.ip, b.ip])
        with held_connection(b, spec.nic.ip, 111):  # the portmapper is not the NFS server
            assert await zones.connected_clients(spec.volume_uuid) == [a.ip]
    assert await zones.connected_clients("00000000-0000-4000-8000-000000000000") == []


async def test_restart_and_update_keep_the_data_address_and_export_path(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs
) -> None:
    a = client_ns(21)
    zones = zone_bed.runtime()
    spec = zone_bed.spec(zone_bed.volume("vol", seed={"data.bin": DATA}), 10, (a.ip,))
    first = await zones.start(spec)
    url = nfs_url(spec.nic.ip, f"{spec.export_path}/data.bin")
    assert nfs_client(a).cat(url).expect_ok() == DATA

    second = await zones.restart(spec)
    assert second.pids[0] != first.pids[0]
    assert second.restarts == 1
    assert not alive(first.pids[0])
    assert nfs_client(a).cat(url).expect_ok() == DATA
    listing = nfs_client(a).ls(nfs_url(spec.nic.ip, spec.export_path, version=4))
    assert b"data.bin" in listing.expect_ok()

    # update renders from the runtime's current settings: a new anonymous uid, for one.
    third = await zone_bed.runtime(anonymous_uid=777).update(spec)
    assert third.pids[0] not in (first.pids[0], second.pids[0])
    assert third.restarts == 2
    assert "Anonymous_Uid = 777;" in read_text(zone_bed.zone_dir(spec.volume_uuid) / "ganesha.conf")
    assert nfs_client(a).cat(url).expect_ok() == DATA


async def test_a_new_runtime_adopts_a_running_zone_without_interrupting_a_reader(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs
) -> None:
    b = client_ns(22)
    spec = zone_bed.spec(zone_bed.volume("vol", seed={"data.bin": DATA}), 10, (b.ip,))
    started = await zone_bed.runtime().start(spec)
    reader = ReadLoop(nfs_client(b), nfs_url(spec.nic.ip, f"{spec.export_path}/data.bin"), DATA)
    reader.start()
    try:
        await until(lambda: reader.reads >= 3)
        agent_restarted = zone_bed.runtime()  # what an agent restart makes
        (adopted,) = await agent_restarted.adopt()
        reads_at_adoption = reader.reads
        await until(lambda: reader.reads >= reads_at_adoption + 3)
    finally:
        reader.stop()
    assert reader.errors == []
    assert adopted.state is ZoneState.RUNNING
    assert adopted.pids == started.pids
    assert adopted.restarts == 0
    assert await agent_restarted.probe(spec.volume_uuid)


async def test_adoption_restarts_only_zones_whose_processes_are_gone(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs
) -> None:
    a = client_ns(21)
    zones = zone_bed.runtime()
    kept = zone_bed.spec(zone_bed.volume("kept", seed={"data.bin": DATA}), 10, (a.ip,))
    dead = zone_bed.spec(zone_bed.volume("dead", seed={"data.bin": DATA}), 11, (a.ip,))
    kept_status, dead_status = await asyncio.gather(zones.start(kept), zones.start(dead))
    for pid in dead_status.pids:
        os.kill(pid, signal.SIGKILL)
    await until(lambda: not any(alive(p) for p in dead_status.pids))
    gone = await zones.status(dead.volume_uuid)
    assert gone is not None
    assert gone.state is ZoneState.FAILED
    assert "gone" in gone.reason
    assert not await zones.probe(dead.volume_uuid)

    statuses = {s.volume_uuid: s for s in await zone_bed.runtime().adopt()}
    assert statuses[kept.volume_uuid] == kept_status
    revived = statuses[dead.volume_uuid]
    assert revived.state is ZoneState.RUNNING
    assert revived.restarts == 1
    assert set(revived.pids).isdisjoint(dead_status.pids)
    for spec in (kept, dead):
        url = nfs_url(spec.nic.ip, f"{spec.export_path}/data.bin")
        assert nfs_client(a).cat(url).expect_ok() == DATA


async def test_stop_leaves_the_host_as_it_was_and_the_dataset_free(zone_bed: ZoneBed) -> None:
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    zones = zone_bed.runtime()
    first = zone_bed.spec(zone_bed.volume("first"), 10, ())
    # The second zone starts after the first: its mount namespace holds copies of the first
    # zone's dataset and namespace mounts, which must not keep them alive.
    first_status = await zones.start(first)
    second = zone_bed.spec(zone_bed.volume("second"), 11, ())
    second_status = await zones.start(second)
    during = HostState.take(zone_bed.tag, zone_bed.state_dir)
    assert len(during.netns - before.netns) == 2
    assert len(during.links - before.links) == 2
    assert {*first_status.pids, *second_status.pids} <= {p for p, _ in during.processes}
    assert during.cgroups > before.cgroups

    await zones.stop(first.volume_uuid)
    await zones.stop(first.volume_uuid)  # idempotent
    assert await zones.status(first.volume_uuid) is None
    # The first volume's dataset can go while the second zone runs (its copy followed).
    destroy_dataset_tree(f"{zone_bed.dataset_root}/first")

    await zones.stop(second.volume_uuid)
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == before
    assert not (zone_bed.state_dir / "zones" / first.volume_uuid).exists()
    assert zone_bed.recorded() == []
    await zone_bed.runtime().stop(second.volume_uuid)  # a new runtime: still nothing to do


async def test_a_source_that_is_not_mounted_is_refused(zone_bed: ZoneBed) -> None:
    source = zone_bed.volume("vol")
    sh(["zfs", "umount", f"{zone_bed.dataset_root}/vol"])
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    with pytest.raises(ZoneFailed, match="not a mounted file system"):
        await zone_bed.runtime().start(zone_bed.spec(source, 10, ()))
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == before
    assert zone_bed.recorded() == []


async def test_an_unmapped_network_or_missing_bridge_is_network_unavailable(
    zone_bed: ZoneBed,
) -> None:
    spec = zone_bed.spec(zone_bed.volume("vol"), 10, ())
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    unmapped = dataclasses.replace(spec, nic=dataclasses.replace(spec.nic, network="elsewhere"))
    with pytest.raises(NetworkUnavailable, match="not mapped"):
        await zone_bed.runtime().start(unmapped)
    no_bridge = LinuxZones(
        state_dir=zone_bed.state_dir,
        networks={NETWORK: NetworkConfig(bridge=f"{zone_bed.tag}none")},
        zones=zone_bed.settings(),
        name_prefix=zone_bed.tag,
    )
    with pytest.raises(NetworkUnavailable, match="does not exist"):
        await no_bridge.start(spec)
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == before
    assert zone_bed.recorded() == []


async def test_a_server_that_fails_to_start_leaves_nothing_behind(zone_bed: ZoneBed) -> None:
    spec = zone_bed.spec(zone_bed.volume("vol"), 10, ())
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    broken = zone_bed.runtime(ganesha_bin="false")  # exits at once, status 1
    with pytest.raises(ZoneFailed, match="exited while starting"):
        await broken.start(spec)
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == before
    assert zone_bed.recorded() == []
    assert await broken.status(spec.volume_uuid) is None


async def test_a_network_command_failing_midway_is_named_and_leaves_nothing_behind(
    zone_bed: ZoneBed,
) -> None:
    spec = zone_bed.spec(zone_bed.volume("vol"), 10, ())
    # The spec's checks let the subnet's broadcast address through as a gateway; the kernel
    # refuses it, in the last command of the namespace's batch (namespace and veth exist).
    broadcast = str(zone_bed.bridge.network.broadcast_address)
    spec = dataclasses.replace(spec, nic=dataclasses.replace(spec.nic, gateway=broadcast))
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    with pytest.raises(ZoneFailed) as caught:
        await zone_bed.runtime().start(spec)
    failed = ["ip", "-n", f"{zone_bed.tag}-{spec.volume_uuid}", "route", "add", "default"]
    failed += ["via", broadcast]
    assert caught.value.message.endswith(
        f"{' '.join(failed)} failed: Error: Nexthop has invalid gateway."
    )
    assert isinstance(caught.value.__cause__, CommandError)
    assert caught.value.__cause__.argv == tuple(failed)
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == before
    assert zone_bed.recorded() == []


async def test_an_ip_batch_takes_only_plain_words(zone_bed: ZoneBed) -> None:
    # ip reads blanks, quotes and # in a batch line: such a word would change the commands.
    with pytest.raises(ValueError, match="not a plain word"):
        await zone_bed.runtime()._ip_batch([["link", "set", f"{zone_bed.tag}x#y", "up"]])
