"""Volume datasets: layout, spec in user properties, completion marker, the one-call read."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from tests.support.run import sh
from tests.support.zfs import Pool
from volagent.adapters.zfs import COMPLETE_PROPERTY, VOLUME_READS_PARALLEL, ZfsCli
from volagent.adapters.zfs_errors import DatasetExists, DatasetNotFound
from volagent.errors import InvalidParameter
from volagent.ports.storage import DatasetOptions

pytestmark = pytest.mark.zfs

KEYS = ("name", "owner_uuid", "size_mib", "labels")


def spec(i: int) -> dict[str, str]:
    return {
        "name": f"vol-{i}",
        "owner_uuid": str(uuid.UUID(int=i)),
        "size_mib": str(100 + i),
        "labels": f'{{"team": "données-{i}"}}',
    }


async def test_create_volume_lays_out_spec_and_marker(storage: ZfsCli, dataset_root: str) -> None:
    vid = str(uuid.uuid4())
    vol = await storage.create_volume(
        dataset_root, vid, spec(1), DatasetOptions(quota_bytes=101 << 20, atime=False)
    )
    assert vol.uuid == vid
    assert vol.dataset == f"{dataset_root}/{vid}"
    assert vol.spec == spec(1)
    assert vol.complete
    assert vol.quota_bytes == 101 << 20
    assert vol.refquota_bytes is None
    assert vol.mounted
    assert vol.mountpoint is not None
    assert vol.mountpoint.endswith(vid)
    assert not vol.readonly
    assert vol.used_bytes > 0
    assert 0 < vol.available_bytes <= 101 << 20
    # The layout, as an operator sees it with plain zfs.
    out = sh(["zfs", "get", "-H", "-o", "value", "volagent:name,volagent:complete", vol.dataset])
    assert out.split() == ["vol-1", "yes"]
    with pytest.raises(DatasetExists):
        await storage.create_volume(dataset_root, vid, spec(1), DatasetOptions())


async def test_a_half_created_volume_is_recognisable_and_can_be_completed(
    storage: ZfsCli, dataset_root: str
) -> None:
    vid = str(uuid.uuid4())
    user = {f"volagent:{k}": v for k, v in spec(2).items()}
    await storage.create_dataset(f"{dataset_root}/{vid}", DatasetOptions(user=user))
    (vol,) = await storage.list_volumes(dataset_root, KEYS)
    assert vol.spec == spec(2)
    assert not vol.complete
    await storage.complete_volume(dataset_root, vid)
    got = await storage.get_volume(dataset_root, vid, KEYS)
    assert got is not None
    assert got.complete


async def test_spec_updates_and_what_is_refused(storage: ZfsCli, dataset_root: str) -> None:
    vid = str(uuid.uuid4())
    await storage.create_volume(dataset_root, vid, spec(3), DatasetOptions())
    await storage.update_volume_spec(dataset_root, vid, {"size_mib": "512", "read_only": "true"})
    got = await storage.get_volume(dataset_root, vid, [*KEYS, "read_only", "never_set"])
    assert got is not None
    assert got.spec == {**spec(3), "size_mib": "512", "read_only": "true"}
    for bad in ({"complete": "no"}, {"Name": "x"}, {"a:b": "x"}, {"labels": "x" * 9000}):
        with pytest.raises(InvalidParameter):
            await storage.update_volume_spec(dataset_root, vid, bad)
    with pytest.raises(InvalidParameter):
        await storage.get_volume(dataset_root, vid.upper(), KEYS)


async def test_listing_skips_what_is_not_a_volume(storage: ZfsCli, dataset_root: str) -> None:
    vid = str(uuid.uuid4())
    await storage.create_volume(dataset_root, vid, spec(4), DatasetOptions())
    await storage.create_snapshot(f"{dataset_root}/{vid}", "s1")
    await storage.create_snapshot(dataset_root, "rootsnap")
    await storage.create_dataset(f"{dataset_root}/not-a-uuid")
    await storage.create_dataset(f"{dataset_root}/{vid}/nested")
    # A spec key set on the root is inherited, not the volume's own.
    await storage.set_properties(dataset_root, {"volagent:labels": "from-root"})
    other = str(uuid.uuid4())
    await storage.create_dataset(f"{dataset_root}/{other}")
    volumes = {v.uuid: v for v in await storage.list_volumes(dataset_root, KEYS)}
    assert set(volumes) == {vid, other}
    assert volumes[vid].spec == spec(4)
    assert volumes[other].spec == {}
    assert not volumes[other].complete
    assert await storage.get_volume(dataset_root, str(uuid.uuid4()), KEYS) is None
    with pytest.raises(DatasetNotFound):
        await storage.list_volumes(f"{dataset_root}/absent", KEYS)


async def test_a_thousand_volumes_are_read_in_one_call(
    storage: ZfsCli, make_pool: Callable[..., Pool], zfs_calls: list[tuple[str, ...]]
) -> None:
    # A pool of their own: zfs-fuse destroys a pool at once, but 1000 datasets one by one.
    # Not mounted (mountpoint=none is inherited): zfs-fuse serves at most 1000 mounts.
    root = f"{make_pool(size_mb=512).name}/vols"
    await storage.create_dataset(root, DatasetOptions(mountpoint="none"))
    ids = [str(uuid.UUID(int=(7 << 64) + i)) for i in range(1000)]
    limit = asyncio.Semaphore(16)

    async def create(i: int) -> None:
        user = {f"volagent:{k}": v for k, v in spec(i).items()}
        user[COMPLETE_PROPERTY] = "yes"
        async with limit:
            await storage.create_dataset(
                f"{root}/{ids[i]}", DatasetOptions(quota_bytes=(100 + i) << 20, user=user)
            )

    await asyncio.gather(*(create(i) for i in range(1000)))
    zfs_calls.clear()
    volumes = await storage.list_volumes(root, KEYS)
    assert len(zfs_calls) == 1
    assert len(volumes) == 1000
    by_id = {v.uuid: v for v in volumes}
    assert set(by_id) == set(ids)
    for i in (0, 1, 499, 999):
        vol = by_id[ids[i]]
        assert vol.spec == spec(i)
        assert vol.complete
        assert vol.quota_bytes == (100 + i) << 20
        assert not vol.mounted
        assert vol.mountpoint is None
    assert all(v.complete and len(v.spec) == 4 for v in volumes)


async def test_a_scan_names_the_volumes_and_the_other_children_in_one_call(
    storage: ZfsCli, dataset_root: str, zfs_calls: list[tuple[str, ...]]
) -> None:
    vid = str(uuid.uuid4())
    await storage.create_volume(dataset_root, vid, spec(5), DatasetOptions())
    await storage.create_snapshot(f"{dataset_root}/{vid}", "s1")
    await storage.create_snapshot(dataset_root, "rootsnap")
    await storage.create_dataset(f"{dataset_root}/not-a-uuid")
    await storage.create_dataset(f"{dataset_root}/{vid}/nested")
    zfs_calls.clear()
    scan = await storage.scan_volumes(dataset_root, KEYS)
    assert len(zfs_calls) == 1
    assert [(v.uuid, v.spec, v.complete) for v in scan.volumes] == [(vid, spec(5), True)]
    assert scan.volumes[0].mounted
    # The volume's child and its snapshot lie deeper; the root's snapshot is not a dataset.
    assert scan.others == [f"{dataset_root}/not-a-uuid"]


async def test_a_volume_and_its_snapshots_are_read_in_one_call(
    storage: ZfsCli, dataset_root: str, zfs_calls: list[tuple[str, ...]]
) -> None:
    vid = str(uuid.uuid4())
    dataset = f"{dataset_root}/{vid}"
    await storage.create_volume(dataset_root, vid, spec(6), DatasetOptions(quota_bytes=64 << 20))
    zfs_calls.clear()
    read = await storage.get_volume_and_snapshots(dataset_root, vid, KEYS)
    assert read is not None
    assert len(zfs_calls) == 1
    assert read[1] == []
    for name in ("b", "a", "c"):
        await storage.create_snapshot(dataset, name)
    await storage.create_dataset(f"{dataset}/nested")
    await storage.create_snapshot(f"{dataset}/nested", "deep")
    await storage.hold(dataset, "a", "keep")
    zfs_calls.clear()
    read = await storage.get_volume_and_snapshots(dataset_root, vid, KEYS)
    assert len(zfs_calls) == 1
    assert read is not None
    volume, snapshots = read
    # The same as the two separate reads it replaces.
    assert volume == await storage.get_volume(dataset_root, vid, KEYS)
    assert snapshots == await storage.list_snapshots(dataset)
    assert [s.name for s in snapshots] == ["b", "a", "c"]  # oldest first
    assert [s.holds for s in snapshots] == [0, 1, 0]
    assert volume.spec == spec(6)
    assert volume.quota_bytes == 64 << 20
    await storage.release(dataset, "a", "keep")
    assert await storage.get_volume_and_snapshots(dataset_root, str(uuid.uuid4()), KEYS) is None


async def test_concurrent_volume_reads_are_joined_and_answer_as_one_at_a_time(
    storage: ZfsCli, dataset_root: str, zfs_calls: list[tuple[str, ...]]
) -> None:
    vids = [str(uuid.uuid4()) for _ in range(8)]
    for i, vid in enumerate(vids):
        await storage.create_volume(dataset_root, vid, spec(10 + i), DatasetOptions())
        for snap in range(i % 3):
            await storage.create_snapshot(f"{dataset_root}/{vid}", f"s{snap}")
    alone = [await storage.get_volume_and_snapshots(dataset_root, vid, KEYS) for vid in vids]
    zfs_calls.clear()

    # Twice each: a read asked while another of the same volume waits is answered too.
    together = await asyncio.gather(
        *(storage.get_volume_and_snapshots(dataset_root, vid, KEYS) for vid in vids + vids)
    )

    assert together == alone + alone
    assert all(read is not None for read in together)
    # VOLUME_READS_PARALLEL ran at once, each for one volume; the rest waited and went in
    # one more command, each volume named once however often it was asked.
    names = {f"{dataset_root}/{v}" for v in vids}
    assert [sum(a in names for a in call) for call in zfs_calls] == [1] * VOLUME_READS_PARALLEL + [
        8
    ]


async def test_a_missing_volume_in_a_joined_read_is_none_and_the_others_are_read(
    storage: ZfsCli, dataset_root: str, zfs_calls: list[tuple[str, ...]]
) -> None:
    vids = [str(uuid.uuid4()) for _ in range(4)]
    for i, vid in enumerate(vids):
        await storage.create_volume(dataset_root, vid, spec(20 + i), DatasetOptions())
    gone = str(uuid.uuid4())
    asked = [vids[0], vids[1], vids[2], gone, vids[3]]
    zfs_calls.clear()

    reads = await asyncio.gather(
        *(storage.get_volume_and_snapshots(dataset_root, vid, KEYS) for vid in asked)
    )

    assert reads[3] is None
    assert [r[0].spec for r in reads if r is not None] == [spec(20 + i) for i in range(4)]
    # A joined command was refused (one volume is gone); its volumes were then read alone.
    names = {f"{dataset_root}/{v}" for v in asked}
    counts = [sum(a in names for a in call) for call in zfs_calls]
    joined = next(i for i, n in enumerate(counts) if n > 1)
    assert counts[joined + 1 :] == [1] * counts[joined]
