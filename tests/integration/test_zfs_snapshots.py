"""Snapshots, rollback, holds, clones and pool figures through the ZFS driver, on zfs-fuse."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.run import sh
from tests.support.zfs import Pool, mountpoint
from volagent.adapters.zfs import ZfsCli
from volagent.adapters.zfs_errors import (
    DatasetBusy,
    DatasetExists,
    DatasetNotFound,
    HasDependents,
    NewerSnapshotsExist,
)

pytestmark = pytest.mark.zfs


@pytest.fixture
async def fs(storage: ZfsCli, dataset_root: str) -> str:
    name = f"{dataset_root}/fs"
    await storage.create_dataset(name)
    return name


def data(name: str) -> Path:
    return mountpoint(name) / "data"


async def test_snapshots_listed_oldest_first_with_exact_values(storage: ZfsCli, fs: str) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    # Names sort the other way round from creation, so the order must come from createtxg.
    for i, snap in enumerate(["z", "m", "a"]):
        data(fs).write_bytes(b"x" * (i + 1) * 100_000)
        await storage.create_snapshot(fs, snap)
    await storage.create_dataset(f"{fs}/child")
    await storage.create_snapshot(f"{fs}/child", "c")
    snaps = await storage.list_snapshots(fs)
    assert [s.name for s in snaps] == ["z", "m", "a"]
    assert [s.fullname for s in snaps] == [f"{fs}@z", f"{fs}@m", f"{fs}@a"]
    assert snaps[0].createtxg < snaps[1].createtxg < snaps[2].createtxg
    raw = sh(["zfs", "get", "-H", "-p", "-o", "value", "guid", f"{fs}@m"]).strip()
    assert snaps[1].guid == int(raw)
    assert len({s.guid for s in snaps}) == 3
    assert all(before <= s.created <= datetime.now(UTC) for s in snaps)
    assert snaps[0].used_bytes > 0  # the later writes replaced its blocks
    assert all(s.holds == 0 for s in snaps)
    with pytest.raises(DatasetExists):
        await storage.create_snapshot(fs, "m")
    assert await storage.exists(f"{fs}@m")
    assert await storage.list_snapshots(f"{fs}/child") != []


async def test_rollback_needs_destroy_newer_when_newer_snapshots_exist(
    storage: ZfsCli, fs: str
) -> None:
    data(fs).write_text("one")
    await storage.create_snapshot(fs, "s1")
    data(fs).write_text("two")
    await storage.create_snapshot(fs, "s2")
    data(fs).write_text("three")
    with pytest.raises(NewerSnapshotsExist):
        await storage.rollback(fs, "s1")
    assert data(fs).read_text() == "three"
    await storage.rollback(fs, "s2")
    assert data(fs).read_text() == "two"
    await storage.rollback(fs, "s1", destroy_newer=True)
    assert data(fs).read_text() == "one"
    assert [s.name for s in await storage.list_snapshots(fs)] == ["s1"]
    with pytest.raises(DatasetNotFound):
        await storage.rollback(fs, "s2")


async def test_destroy_snapshot_and_its_idempotent_variant(storage: ZfsCli, fs: str) -> None:
    await storage.create_snapshot(fs, "s1")
    assert await storage.destroy_snapshot(fs, "s1") is True
    with pytest.raises(DatasetNotFound):
        await storage.destroy_snapshot(fs, "s1")
    assert await storage.destroy_snapshot(fs, "s1", missing_ok=True) is False


async def test_a_held_snapshot_cannot_be_destroyed_until_released(storage: ZfsCli, fs: str) -> None:
    await storage.create_snapshot(fs, "s1")
    await storage.hold(fs, "s1", "replication")
    assert [s.holds for s in await storage.list_snapshots(fs)] == [1]
    with pytest.raises(DatasetExists):
        await storage.hold(fs, "s1", "replication")
    with pytest.raises(DatasetBusy):
        await storage.destroy_snapshot(fs, "s1")
    await storage.release(fs, "s1", "replication")
    with pytest.raises(DatasetNotFound):
        await storage.release(fs, "s1", "replication")
    assert await storage.destroy_snapshot(fs, "s1") is True


async def test_clone_and_promote(storage: ZfsCli, fs: str, dataset_root: str) -> None:
    data(fs).write_text("origin")
    await storage.create_snapshot(fs, "s1")
    clone = f"{dataset_root}/clone"
    await storage.clone(fs, "s1", clone)
    assert data(clone).read_text() == "origin"
    origin = await storage.get_properties(clone, ["origin"])
    assert origin.get("origin") == f"{fs}@s1"
    with pytest.raises(HasDependents):
        await storage.destroy_snapshot(fs, "s1")
    await storage.promote(clone)
    assert [s.name for s in await storage.list_snapshots(clone)] == ["s1"]
    assert await storage.list_snapshots(fs) == []
    # The old origin is now the clone: it can go, and the promoted one keeps the data.
    assert await storage.destroy_dataset(fs) is True
    assert data(clone).read_text() == "origin"


async def test_destroying_a_dataset_with_children_needs_recursive(storage: ZfsCli, fs: str) -> None:
    await storage.create_snapshot(fs, "s1")
    with pytest.raises(HasDependents):
        await storage.destroy_dataset(fs)
    assert await storage.exists(fs)
    assert await storage.destroy_dataset(fs, recursive=True) is True


async def test_pool_info_matches_the_pool(storage: ZfsCli, zpool: Pool) -> None:
    info = await storage.pool_info(zpool.name)
    assert info.name == zpool.name
    assert info.health == "ONLINE"
    assert info.healthy
    # A 4 GiB image: ZFS keeps a little for itself, so the usable size is a bit less.
    assert 3_500 << 20 < info.size_bytes <= 4096 << 20
    assert 0 < info.free_bytes < info.size_bytes
    with pytest.raises(DatasetNotFound):
        await storage.pool_info(f"{zpool.name}nope")
