"""Connections from inside namespaces, and ONC RPC health checks against a real nfs-ganesha."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ganesha import Ganesha
from tests.support.net import Bridge, Namespace
from tests.support.run import sh
from volagent.adapters import nsnet, rpc
from volagent.errors import ZoneFailed

# --------------------------------------------------------- connections from inside namespaces

_LISTENER = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
conn, _ = s.accept()
conn.sendall(b"from the namespace")
conn.close()
"""


@pytest.fixture
def loopback_listener() -> Iterator[int]:
    """A listener on the host's 127.0.0.1 that would answer "from the host"; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.sendall(b"from the host")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@dataclass
class NsListener:
    """A one-shot listener on 127.0.0.1:``port`` inside namespace ``ns``."""

    ns: Namespace
    port: int


@pytest.fixture
def ns_listener(
    client_ns: Callable[[int], Namespace], loopback_listener: int
) -> Iterator[NsListener]:
    """A listener inside a client namespace on the same loopback port as the host's."""
    ns = client_ns(30)
    argv = ns.exec_argv(sys.executable, "-c", _LISTENER, str(loopback_listener))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as listener:
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline() == "ready\n"
            yield NsListener(ns, loopback_listener)
        finally:
            listener.kill()


@pytest.mark.netns
async def test_a_connection_is_made_inside_the_namespace_not_the_host(
    client_ns: Callable[[int], Namespace], ns_listener: NsListener
) -> None:
    empty = client_ns(35)
    with pytest.raises(nsnet.ConnectFailed, match="Connection refused"):
        await nsnet.open_connection(empty.name, "127.0.0.1", ns_listener.port, timeout=5)

    reader, writer = await nsnet.open_connection(
        ns_listener.ns.name, "127.0.0.1", ns_listener.port, timeout=5
    )
    assert await reader.read() == b"from the namespace"
    writer.close()
    await writer.wait_closed()


def _executor_netns() -> str:
    future = nsnet._executor._current().submit(os.readlink, "/proc/thread-self/ns/net")
    return future.result(timeout=10)


def _inode(path: str) -> int:
    return Path(path).stat().st_ino


def _own_netns() -> str:
    return str(Path("/proc/self/ns/net").readlink())


@pytest.mark.netns
async def test_the_thread_returns_to_its_own_namespace(
    client_ns: Callable[[int], Namespace], loopback_listener: int
) -> None:
    ns = client_ns(31)
    with pytest.raises(nsnet.ConnectFailed):
        await nsnet.open_connection(ns.name, "127.0.0.1", loopback_listener, timeout=5)
    assert _inode(f"/run/netns/{ns.name}") != _inode("/proc/self/ns/net")
    assert _executor_netns() == _own_netns()


@pytest.mark.netns
async def test_a_thread_that_cannot_return_is_never_used_again(
    client_ns: Callable[[int], Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = client_ns(32)
    real_setns = nsnet._setns
    threads: list[threading.Thread] = []

    def setns_that_cannot_return_once(fd: int) -> None:
        threads.append(threading.current_thread())
        if len(threads) == 2:  # the first call's way back
            raise OSError(1, "Operation not permitted")
        real_setns(fd)

    first_pool = nsnet._executor._current()
    monkeypatch.setattr(nsnet, "_setns", setns_that_cannot_return_once)
    # two calls at once: the second is queued on the thread the first strands
    results = await asyncio.gather(
        nsnet.open_connection(ns.name, "127.0.0.1", 9, timeout=5),
        nsnet.open_connection(ns.name, "127.0.0.1", 9, timeout=5),
        return_exceptions=True,
    )
    assert isinstance(results[0], ZoneFailed)
    assert "cannot return from network namespace" in results[0].message
    assert isinstance(results[1], nsnet.ConnectFailed)  # refused inside ns: it went elsewhere
    assert len(threads) == 4
    assert threads[0] is threads[1]
    assert threads[2] is threads[3] is not threads[0]
    assert first_pool._shutdown
    assert nsnet._executor._current() is not first_pool
    monkeypatch.setattr(nsnet, "_setns", real_setns)
    assert _executor_netns() == _own_netns()


@pytest.mark.netns
async def test_a_missing_namespace_is_a_zone_failure() -> None:
    with pytest.raises(nsnet.NetnsNotFound, match="no network namespace vtnonexistent"):
        await nsnet.open_connection("vtnonexistent", "127.0.0.1", 2049, timeout=5)


@pytest.mark.netns
async def test_a_connection_that_is_never_answered_times_out(
    bridge: Bridge, client_ns: Callable[[int], Namespace]
) -> None:
    ns = client_ns(33)
    started = time.monotonic()
    with pytest.raises(nsnet.ConnectTimeout, match=r"within 0\.3 s"):
        # nobody holds this address on the bridge: ARP gets no answer, the SYN never leaves
        await nsnet.open_connection(ns.name, bridge.ip(99), 2049, timeout=0.3)
    assert time.monotonic() - started < 10  # generous: only catches a hang


def test_a_namespace_name_must_be_a_plain_file_name() -> None:
    for bad in ("", ".", "..", "a/b", "../x"):
        with pytest.raises(ValueError, match="not a network namespace name"):
            asyncio.run(nsnet.open_connection(bad, "127.0.0.1", 1, timeout=1))


# ---------------------------------------------------------------- ONC RPC against ganesha


@dataclass
class Served:
    """A real ganesha serving a fresh dataset from the zone namespace ``zone``."""

    zone: Namespace
    server: Ganesha

    @property
    def pid(self) -> int:
        return int((self.server.workdir / "ganesha.pid").read_text())

    async def client(self, port: int) -> rpc.RpcClient:
        return await rpc.RpcClient.connect(self.zone.name, self.zone.ip, port, timeout=5)

    async def probe(
        self, *, versions: tuple[int, ...] = (3, 4), within: float = 5
    ) -> rpc.ProbeResult:
        return await rpc.probe_nfs(self.zone.name, self.zone.ip, versions=versions, timeout=within)


@pytest.fixture
def served(dataset_root: str, bridge: Bridge, tmp_path: Path) -> Iterator[Served]:
    mountpoint = sh(["zfs", "get", "-H", "-o", "value", "mountpoint", dataset_root]).strip()
    zone = bridge.namespace(10, role="z")
    server = Ganesha(zone, tmp_path / "zone")
    try:
        server.start(path=mountpoint, clients=[str(bridge.network)])
        yield Served(zone, server)
    finally:
        server.stop()


def _ganesha_ports(zone: Namespace) -> set[int]:
    out = sh(zone.exec_argv("ss", "-ltnpH"))
    return {
        int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if "ganesha" in line
    }


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
async def test_null_answers_on_nfs3_nfs4_and_mount3(served: Served) -> None:
    async with await served.client(rpc.PORTMAP_PORT) as pmap:
        nfs_port = await pmap.getport(rpc.NFS_PROGRAM, 3, timeout=5)
        mount_port = await pmap.getport(rpc.MOUNT_PROGRAM, rpc.MOUNT_VERSION, timeout=5)
    assert nfs_port == rpc.NFS_PORT == 2049
    assert _ganesha_ports(served.zone) == {2049, mount_port}

    async with await served.client(rpc.NFS_PORT) as nfs:
        await nfs.null(rpc.NFS_PROGRAM, 3, timeout=5)
        await nfs.null(rpc.NFS_PROGRAM, 4, timeout=5)
    async with await served.client(mount_port) as mount:
        await mount.null(rpc.MOUNT_PROGRAM, rpc.MOUNT_VERSION, timeout=5)


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
async def test_refusals_from_real_servers_are_typed_and_leave_the_connection_usable(
    served: Served,
) -> None:
    async with await served.client(rpc.NFS_PORT) as nfs:
        with pytest.raises(rpc.ProgramMismatch) as mismatch:
            await nfs.null(rpc.NFS_PROGRAM, 2, timeout=5)
        assert (mismatch.value.low, mismatch.value.high) == (3, 4)
        assert "program 100003 v2 procedure 0 at" in mismatch.value.message
        with pytest.raises(rpc.ProgramUnavailable):
            await nfs.null(100021, 4, timeout=5)  # NLM is off
        with pytest.raises(rpc.RpcUnsuccessful) as proc:
            await nfs.call(rpc.NFS_PROGRAM, 3, 99, timeout=5)
        assert proc.value.stat is rpc.AcceptStat.PROC_UNAVAIL
        await nfs.null(rpc.NFS_PROGRAM, 3, timeout=5)

    async with await served.client(rpc.PORTMAP_PORT) as pmap:
        with pytest.raises(rpc.ProgramUnavailable, match="not registered"):
            await pmap.getport(100021, 4, timeout=5)
        with pytest.raises(rpc.RpcUnsuccessful) as garbage:
            await pmap.call(rpc.PORTMAP_PROGRAM, 2, rpc.PMAPPROC_GETPORT, b"\0\0\0\1", timeout=5)
        assert garbage.value.stat is rpc.AcceptStat.GARBAGE_ARGS
        await pmap.null(rpc.PORTMAP_PROGRAM, 2, timeout=5)


async def _raw_exchange(served: Served, message: bytes) -> bytes:
    reader, writer = await nsnet.open_connection(
        served.zone.name, served.zone.ip, rpc.NFS_PORT, timeout=5
    )
    try:
        writer.write(rpc.frame(message))
        async with asyncio.timeout(5):
            await writer.drain()
            return await rpc.read_record(reader)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
async def test_ganesha_denies_unknown_credentials_and_hangs_up_on_rpc_version_3(
    served: Served,
) -> None:
    call = bytearray(rpc.encode_call(7, rpc.NFS_PROGRAM, 3, 0))
    call[24:28] = (99).to_bytes(4, "big")  # credential flavor 99
    with pytest.raises(rpc.RpcDenied) as denied:
        rpc.decode_reply(await _raw_exchange(served, bytes(call)), xid=7)
    assert denied.value.details["reject_stat"] == "AUTH_ERROR"

    call = bytearray(rpc.encode_call(8, rpc.NFS_PROGRAM, 3, 0))
    call[8:12] = (3).to_bytes(4, "big")  # rpcvers 3
    with pytest.raises(rpc.RpcConnectionLost):
        await _raw_exchange(served, bytes(call))


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
async def test_probe_of_a_serving_zone_reports_each_check(served: Served) -> None:
    result = await served.probe()
    assert result.ok, result.error
    assert result.error == ""
    assert list(result.latencies) == ["nfs3", "nfs4", "portmap", "mount3"]
    assert all(0 < seconds < 5 for seconds in result.latencies.values())

    v4_only = await served.probe(versions=(4,))
    assert v4_only.ok, v4_only.error
    assert list(v4_only.latencies) == ["nfs4"]


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
async def test_a_killed_ganesha_is_unhealthy_within_the_timeout(served: Served) -> None:
    os.kill(served.pid, signal.SIGKILL)
    assert served.server.proc is not None
    served.server.proc.wait(timeout=10)
    started = time.monotonic()
    result = await served.probe(within=2)
    assert time.monotonic() - started < 2 + 5  # generous: only catches a hang
    assert not result.ok
    assert result.error.startswith("nfs connect: ")
    assert "Connection refused" in result.error


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
async def test_a_hung_ganesha_times_out_and_answers_again_when_resumed(served: Served) -> None:
    pid = served.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = await served.probe(within=1)
        assert time.monotonic() - started < 1 + 5  # generous: only catches a hang
        assert not result.ok
        assert result.error.startswith("nfs3: ")
        assert "no reply within" in result.error
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = await served.probe()
    assert resumed.ok, resumed.error


@pytest.mark.netns
async def test_probe_of_a_namespace_without_a_server_is_unhealthy(
    client_ns: Callable[[int], Namespace],
) -> None:
    ns = client_ns(34)
    refused = await rpc.probe_nfs(ns.name, ns.ip, versions=(3, 4), timeout=5)
    assert not refused.ok
    assert refused.latencies == {}
    assert "Connection refused" in refused.error
    gone = await rpc.probe_nfs("vtnonexistent", ns.ip, versions=(3,), timeout=5)
    assert (gone.ok, gone.error) == (False, "nfs connect: no network namespace vtnonexistent")


@pytest.mark.parametrize("versions", [(), (2,), (3, 5)])
async def test_probe_refuses_versions_it_does_not_know(versions: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="subset of"):
        await rpc.probe_nfs("any", "127.0.0.1", versions=versions, timeout=1)
