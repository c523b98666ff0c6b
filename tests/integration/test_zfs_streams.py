"""Send and receive between two real zfs-fuse pools through the driver's byte streams."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.run import sh
from tests.support.zfs import Pool, mountpoint
from volagent.adapters.zfs import ZfsCli, _CliSendStream
from volagent.adapters.zfs_errors import (
    DatasetExists,
    IncrementalMismatch,
    TargetModified,
    UnsupportedOption,
    ZfsError,
)

pytestmark = pytest.mark.zfs


@pytest.fixture
async def src(storage: ZfsCli, dataset_root: str) -> str:
    name = f"{dataset_root}/src"
    await storage.create_dataset(name)
    return name


@pytest.fixture
def dst_pool(make_pool: Callable[..., Pool]) -> Pool:
    return make_pool(size_mb=256)


async def drain(stream: AsyncIterator[bytes]) -> None:
    async for _chunk in stream:
        pass


def children() -> list[str]:
    """Processes whose parent is this test process (zombies included)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid():
            found.append(text)
    return found


def pid_of(argv_start: list[str]) -> int:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if [a.decode() for a in args[: len(argv_start)]] == argv_start:
            return int(cmdline.parent.name)
    raise AssertionError(f"no process runs {argv_start}")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guids(name: str) -> dict[str, str]:
    out = sh(["zfs", "get", "-H", "-p", "-d", "1", "-o", "name,value", "guid", name])
    return {
        line.split("\t")[0].partition("@")[2]: line.split("\t")[1]
        for line in out.splitlines()
        if "@" in line.split("\t")[0]
    }


async def copy(
    storage: ZfsCli,
    dataset: str,
    snapshot: str,
    target: str,
    *,
    base: str | None = None,
    intermediates: bool = False,
    properties: bool = False,
    force: bool = False,
) -> tuple[int, int, list[int]]:
    progress: list[int] = []
    async with storage.send(
        dataset, snapshot, base=base, intermediates=intermediates, properties=properties
    ) as stream:
        result = await storage.receive(target, stream, force=force, on_progress=progress.append)
        sent = stream.bytes_sent
    assert result.target == target
    return sent, result.bytes_received, progress


async def test_full_then_incremental_between_pools_keeps_content_and_guids(
    storage: ZfsCli, src: str, dst_pool: Pool
) -> None:
    files = mountpoint(src)
    (files / "big").write_bytes(os.urandom(3 << 20))
    await storage.set_properties(src, {"volagent:name": "replicated"})
    await storage.create_snapshot(src, "s1")
    target = f"{dst_pool.name}/copy"

    sent, received, progress = await copy(storage, src, "s1", target, properties=True)
    assert sent == received > 3 << 20
    assert progress == sorted(progress)
    assert progress[-1] == received
    props = await storage.get_properties(target, ["mounted", "volagent:name"])
    assert props.get_bool("mounted") is False  # received with -u
    assert props.get("volagent:name") == "replicated"  # carried by -p
    # A replication target must not change under the next incremental.
    await storage.set_properties(target, {"atime": "off", "readonly": "on"})

    (files / "big").write_bytes(os.urandom(1 << 20))
    await storage.create_snapshot(src, "s2")
    (files / "second").write_text("two")
    await storage.create_snapshot(src, "s3")
    sent, received, _ = await copy(storage, src, "s3", target, base="s1", intermediates=True)
    assert sent == received > 1 << 20
    (files / "third").write_text("three")
    await storage.create_snapshot(src, "s4")
    await copy(storage, src, "s4", target, base="s3")

    assert guids(target) == guids(src)
    assert list(guids(target)) == ["s1", "s2", "s3", "s4"]
    await storage.mount(target)
    copied = mountpoint(target)
    assert digest(copied / "big") == digest(files / "big")
    assert (copied / "second").read_text() == "two"
    assert (copied / "third").read_text() == "three"
    assert children() == []


async def test_receive_into_a_modified_target_fails_and_leaves_it_intact(
    storage: ZfsCli, src: str, dst_pool: Pool
) -> None:
    (mountpoint(src) / "f").write_text("v1")
    await storage.create_snapshot(src, "s1")
    target = f"{dst_pool.name}/copy"
    await copy(storage, src, "s1", target)
    await storage.mount(target)
    (mountpoint(target) / "local-change").write_text("mine")
    (mountpoint(src) / "f").write_text("v2")
    await storage.create_snapshot(src, "s2")

    with pytest.raises(TargetModified):
        await copy(storage, src, "s2", target, base="s1")
    assert list(guids(target)) == ["s1"]
    assert (mountpoint(target) / "local-change").read_text() == "mine"
    assert (mountpoint(target) / "f").read_text() == "v1"

    # With force the target is rolled back to its latest snapshot first.
    await storage.unmount(target)
    await copy(storage, src, "s2", target, base="s1", force=True)
    await storage.mount(target)
    assert not (mountpoint(target) / "local-change").exists()
    assert (mountpoint(target) / "f").read_text() == "v2"
    assert children() == []


async def test_receive_refuses_mismatched_or_clobbering_streams(
    storage: ZfsCli, src: str, dst_pool: Pool
) -> None:
    for snap in ("s1", "s2", "s3"):
        await storage.create_snapshot(src, snap)
    target = f"{dst_pool.name}/copy"
    await copy(storage, src, "s1", target)
    with pytest.raises(IncrementalMismatch):  # the target has s1, not s2
        await copy(storage, src, "s3", target, base="s2")
    with pytest.raises(IncrementalMismatch):  # s3 is not earlier than s2
        await copy(storage, src, "s2", target, base="s3")
    with pytest.raises(DatasetExists):  # a full stream onto an existing file system
        await copy(storage, src, "s2", target)
    assert list(guids(target)) == ["s1"]
    assert children() == []


async def test_source_dying_mid_stream_fails_the_receive_and_leaves_nothing(
    storage: ZfsCli, src: str, dst_pool: Pool
) -> None:
    (mountpoint(src) / "big").write_bytes(os.urandom(8 << 20))
    await storage.create_snapshot(src, "s1")
    target = f"{dst_pool.name}/copy"

    async def dying(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        got = 0
        async for chunk in stream:
            yield chunk
            got += len(chunk)
            if got >= 1 << 20:
                raise ConnectionResetError(lost)

    lost = "the source went away"

    async with storage.send(src, "s1") as stream:
        with pytest.raises(ConnectionResetError):
            await storage.receive(target, dying(aiter(stream)))
    assert not await storage.exists(target)
    assert children() == []


async def test_killing_zfs_send_is_reported_and_leaves_no_process(
    storage: ZfsCli, src: str, dst_pool: Pool
) -> None:
    """On zfs-fuse the daemon writes the stream, so it may still arrive whole."""
    (mountpoint(src) / "big").write_bytes(os.urandom(8 << 20))
    await storage.create_snapshot(src, "s1")
    async with storage.send(src, "s1") as stream:
        assert isinstance(stream, _CliSendStream)
        os.kill(stream._process.pid, signal.SIGKILL)
        with pytest.raises(ZfsError) as info:
            await drain(stream)
    assert info.value.returncode == -signal.SIGKILL
    assert info.value.argv[1] == "send"
    assert children() == []


async def test_receiver_killed_mid_stream_fails_and_stops_the_sender(
    storage: ZfsCli, src: str, dst_pool: Pool
) -> None:
    (mountpoint(src) / "big").write_bytes(os.urandom(1 << 20))
    await storage.create_snapshot(src, "s1")
    target = f"{dst_pool.name}/copy"
    await copy(storage, src, "s1", target)
    before = guids(target)
    (mountpoint(src) / "big").write_bytes(os.urandom(24 << 20))
    await storage.create_snapshot(src, "s2")
    killed: list[int] = []

    def kill_receiver(received: int) -> None:
        if received >= 1 << 20 and not killed:
            os.kill(pid_of(["zfs", "receive", "-u", target]), signal.SIGKILL)
            killed.append(received)

    with pytest.raises(ZfsError) as info:
        async with storage.send(src, "s2", base="s1") as stream:
            await storage.receive(target, stream, on_progress=kill_receiver)
    assert killed
    assert info.value.argv[1] == "receive"
    assert info.value.returncode == -signal.SIGKILL
    assert guids(target) == before
    props = await storage.get_properties(target, ["mounted"])
    assert props.get_bool("mounted") is False
    assert children() == []


async def test_leaving_a_send_early_stops_it(storage: ZfsCli, src: str) -> None:
    (mountpoint(src) / "big").write_bytes(os.urandom(8 << 20))
    await storage.create_snapshot(src, "s1")
    async with storage.send(src, "s1") as stream:
        async for _chunk in stream:
            break
        assert 0 < stream.bytes_sent < 8 << 20
    assert children() == []


async def test_options_this_zfs_lacks_are_refused_before_running(storage: ZfsCli, src: str) -> None:
    await storage.create_snapshot(src, "s1")
    assert not storage.capabilities.compressed_send
    with pytest.raises(UnsupportedOption) as info:
        storage.send(src, "s1", compressed=True)
    assert "-c" in info.value.argv
    assert children() == []
