"""Failures provoked on real zfs-fuse pools, and the typed errors they become.

DatasetNotFound, DatasetExists, DatasetBusy, HasDependents, NewerSnapshotsExist,
IncrementalMismatch and TargetModified are provoked where their operation is tested
(test_zfs_datasets, test_zfs_snapshots, test_zfs_streams); the rest are here, with the
feature detection they depend on.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.run import sh
from tests.support.zfs import Pool, mountpoint
from volagent.adapters.zfs import ZfsCli
from volagent.adapters.zfs_errors import (
    MountFailed,
    OutOfSpace,
    QuotaExceeded,
    UnsupportedOption,
    ZfsUnavailable,
)
from volagent.errors import InsufficientSpace, StorageUnavailable
from volagent.ports.storage import Capabilities, DatasetOptions

pytestmark = pytest.mark.zfs


def fill(directory: Path) -> int:
    """Write incompressible data until the file system refuses; return the errno."""
    with (directory / "filler").open("wb") as f:
        block = os.urandom(1 << 20)
        while True:
            try:
                f.write(block)
                f.flush()
            except OSError as exc:
                return exc.errno or 0


def succeeds(*argv: str) -> bool:
    done = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False
    )
    return done.returncode == 0


async def test_capabilities_agree_with_using_each_feature(
    storage: ZfsCli, zpool: Pool, dataset_root: str
) -> None:
    fs = f"{dataset_root}/feat"
    sh(["zfs", "create", fs])
    sh(["zfs", "snapshot", f"{fs}@s"])
    caps = storage.capabilities
    observed = Capabilities(
        parsable_list=succeeds("zfs", "list", "-H", "-p", "-o", "used", fs),
        bookmarks=succeeds("zfs", "bookmark", f"{fs}@s", f"{fs}#b"),
        resumable_streams=succeeds("zfs", "get", "-H", "receive_resume_token", fs),
        send_estimate=succeeds("zfs", "send", "-n", "-P", f"{fs}@s"),
        compressed_send=succeeds("zfs", "send", "-c", f"{fs}@s"),
        raw_send=succeeds("zfs", "send", "-w", f"{fs}@s"),
        hold_listing=succeeds("zfs", "holds", f"{fs}@s"),
        multi_property_set=succeeds("zfs", "set", "x:a=1", "x:b=2", fs),
        parsable_pool_get=succeeds("zpool", "get", "-H", "-p", "-o", "value", "size", zpool.name),
        parsable_pool_list=succeeds("zpool", "list", "-H", "-p", "-o", "size", zpool.name),
    )
    assert caps == observed


async def test_detection_changes_nothing(zpool: Pool) -> None:
    def state() -> str:
        return sh(
            ["zfs", "get", "-H", "-p", "-r", "-o", "name,value", "volagent:complete", zpool.name]
        )

    before = state()
    await ZfsCli().detect_capabilities(zpool.name)
    assert state() == before


async def test_a_full_pool_is_out_of_space(storage: ZfsCli, make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size_mb=64)
    assert fill(pool.mountpoint) == errno.ENOSPC
    with pytest.raises(OutOfSpace) as info:
        await storage.create_dataset(f"{pool.name}/more")
    assert isinstance(info.value, InsufficientSpace)
    assert info.value.wire_code == "InsufficientSpace"
    with pytest.raises(OutOfSpace):
        await storage.create_snapshot(pool.name, "s")
    with pytest.raises(OutOfSpace):
        await storage.set_properties(pool.name, {"volagent:x": "y"})


async def test_a_reservation_beyond_the_pool_is_out_of_space(
    storage: ZfsCli, dataset_root: str
) -> None:
    fs = f"{dataset_root}/r"
    await storage.create_dataset(fs)
    with pytest.raises(OutOfSpace):
        await storage.set_properties(fs, {"reservation": str(1 << 40)})


async def test_a_quota_below_usage_is_refused(storage: ZfsCli, dataset_root: str) -> None:
    fs = f"{dataset_root}/q"
    await storage.create_dataset(fs)
    (mountpoint(fs) / "data").write_bytes(os.urandom(4 << 20))
    sh(["sync"])
    for prop in ("quota", "refquota"):
        with pytest.raises(QuotaExceeded):
            await storage.set_properties(fs, {prop: str(1 << 20)})
    assert (await storage.get_properties(fs, ["quota"])).get_int("quota") == 0


async def test_a_create_that_cannot_mount_is_undone(storage: ZfsCli, dataset_root: str) -> None:
    parent = f"{dataset_root}/full"
    await storage.create_dataset(parent, DatasetOptions(quota_bytes=2 << 20))
    assert fill(mountpoint(parent)) == errno.EDQUOT
    with pytest.raises(MountFailed):
        await storage.create_dataset(f"{parent}/child")
    assert not await storage.exists(f"{parent}/child")


async def test_an_option_this_zfs_lacks_is_typed_from_its_complaint(
    dataset_root: str,
) -> None:
    pretending = ZfsCli(capabilities=Capabilities(compressed_send=True))
    await pretending.create_dataset(f"{dataset_root}/c")
    await pretending.create_snapshot(f"{dataset_root}/c", "s")
    async with pretending.send(f"{dataset_root}/c", "s", compressed=True) as stream:
        with pytest.raises(UnsupportedOption) as info:
            await anext(aiter(stream))
    assert "invalid option 'c'" in info.value.stderr


def wrapper(tmp_path: Path, mount: list[str]) -> str:
    """A ``zfs`` that runs the real one in a mount namespace where ``/run/zfs`` is replaced."""
    script = tmp_path / "zfs-elsewhere"
    script.write_text(
        "#!/bin/sh\n"
        "exec unshare -m --propagation private sh -c "
        f'\'{" ".join(mount)} /run/zfs && exec zfs "$@"\' zfs "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def silent_daemon(tmp_path: Path) -> Iterator[Path]:
    """A directory whose zfs_socket accepts connections and never answers."""
    directory = tmp_path / "silent"
    directory.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(directory / "zfs_socket"))
        sock.listen(16)
        yield directory


async def test_no_daemon_is_storage_unavailable(tmp_path: Path, zpool: Pool) -> None:
    zfs = ZfsCli(zfs_bin=wrapper(tmp_path, ["mount", "-t", "tmpfs", "none"]))
    with pytest.raises(ZfsUnavailable) as info:
        await zfs.get_properties(zpool.name, ["used"])
    assert isinstance(info.value, StorageUnavailable)
    assert info.value.retryable
    assert info.value.wire_code == "StorageUnavailable"
    assert "daemon" in info.value.stderr


async def test_a_daemon_that_does_not_answer_is_storage_unavailable(
    tmp_path: Path, zpool: Pool, silent_daemon: Path
) -> None:
    zfs_bin = wrapper(tmp_path, ["mount", "--bind", str(silent_daemon)])
    zfs = ZfsCli(zfs_bin=zfs_bin, command_timeout_s=1.0)
    with pytest.raises(ZfsUnavailable) as info:
        await zfs.get_properties(zpool.name, ["used"])
    assert "did not answer within 1 s" in info.value.message
    assert info.value.retryable
    with pytest.raises(ZfsUnavailable):
        await zfs.pool_info(zpool.name)
