"""File systems through the ZFS driver, on a real zfs-fuse pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.run import sh
from tests.support.zfs import mountpoint
from volagent.adapters import proc
from volagent.adapters.zfs import MAX_USER_VALUE_BYTES, ZfsCli
from volagent.adapters.zfs_errors import DatasetBusy, DatasetExists, DatasetNotFound
from volagent.errors import InvalidParameter
from volagent.ports.storage import CanMount, DatasetOptions, Storage

pytestmark = pytest.mark.zfs


def raw_get(name: str, prop: str) -> str:
    return sh(["zfs", "get", "-H", "-p", "-o", "value", prop, name]).rstrip("\n")


def test_the_cli_driver_is_a_storage() -> None:
    storage: Storage = ZfsCli()  # checked by mypy against the port
    assert storage.capabilities.as_dict()
    assert not any(storage.capabilities.as_dict().values())


async def test_create_with_options_reads_back_exact_values(
    storage: ZfsCli, dataset_root: str, tmp_path: Path
) -> None:
    name = f"{dataset_root}/a"
    odd = {
        "volagent:unicode": "é ü 日本",
        "volagent:multiline": "line1\nline2\tx",
        "volagent:empty": "",
        "volagent:long": "x" * MAX_USER_VALUE_BYTES,
        "volagent:plain": "plain value",
    }
    options = DatasetOptions(
        quota_bytes=64 << 20,
        refquota_bytes=32 << 20,
        mountpoint=str(tmp_path / "mnt-a"),
        atime=False,
        canmount=CanMount.ON,
        readonly=False,
        user=odd,
    )
    assert await storage.create_dataset(name, options) is True
    props = await storage.get_properties(
        name, ["quota", "refquota", "mountpoint", "atime", "canmount", "mounted", *odd]
    )
    assert props.get_int("quota") == 64 << 20
    assert props.get_int("refquota") == 32 << 20
    assert props.get("mountpoint") == str(tmp_path / "mnt-a")
    assert props.get_bool("atime") is False
    assert props.get_bool("mounted") is True
    assert all(props.is_local(p) for p in ("quota", "atime", *odd))
    assert {k: props.get(k) for k in odd} == odd
    # What plain zfs shows: printable ASCII as is, the rest encoded.
    assert raw_get(name, "volagent:plain") == "plain value"
    assert raw_get(name, "volagent:unicode").startswith("b64:")
    assert (tmp_path / "mnt-a").is_dir()


async def test_create_existing_raises_or_is_accepted_with_exist_ok(
    storage: ZfsCli, dataset_root: str
) -> None:
    name = f"{dataset_root}/dup"
    await storage.create_dataset(name)
    with pytest.raises(DatasetExists):
        await storage.create_dataset(name)
    assert await storage.create_dataset(name, exist_ok=True) is False


async def test_absent_datasets(storage: ZfsCli, dataset_root: str) -> None:
    name = f"{dataset_root}/absent"
    assert await storage.exists(name) is False
    assert await storage.exists(dataset_root) is True
    with pytest.raises(DatasetNotFound):
        await storage.get_properties(name, ["used"])
    with pytest.raises(DatasetNotFound):
        await storage.destroy_dataset(name)
    assert await storage.destroy_dataset(name, missing_ok=True) is False


@pytest.mark.parametrize(
    "call",
    [
        lambda s, r: s.create_dataset(f"{r}/-o"),
        lambda s, r: s.create_dataset(f"{r}/a b"),
        lambda s, r: s.create_dataset(f"{r}/a,b"),
        lambda s, r: s.destroy_dataset(f"{r}/../x"),
        lambda s, r: s.get_properties(r, ["used,quota"]),
        lambda s, r: s.set_properties(r, {"quota=1": "2"}),
        lambda s, r: s.set_properties(r, {"volagent:x": "a" * (MAX_USER_VALUE_BYTES + 1)}),
        lambda s, r: s.create_snapshot(r, "s@t"),
        lambda s, r: s.hold(r, "s", "-r"),
        lambda s, r: s.rename_dataset(r, f"{r}%x"),
        lambda s, r: s.create_dataset(f"{r}/x", DatasetOptions(mountpoint="relative")),
        lambda s, r: s.create_dataset(f"{r}/x", DatasetOptions(quota_bytes=-1)),
    ],
)
async def test_invalid_input_never_reaches_zfs(
    storage: ZfsCli,
    dataset_root: str,
    zfs_calls: list[tuple[str, ...]],
    call: Callable[[ZfsCli, str], Awaitable[object]],
) -> None:
    with pytest.raises(InvalidParameter) as info:
        await call(storage, dataset_root)
    assert info.value.details["parameter"]
    assert zfs_calls == []


async def test_set_and_inherit(storage: ZfsCli, dataset_root: str) -> None:
    name = f"{dataset_root}/s"
    await storage.create_dataset(name)
    await storage.set_properties(name, {"quota": str(10 << 20), "volagent:k": "v\n2"})
    props = await storage.get_properties(name, ["quota", "volagent:k"])
    assert props.get_int("quota") == 10 << 20
    assert props.get("volagent:k") == "v\n2"
    await storage.inherit_property(name, "volagent:k")
    props = await storage.get_properties(name, ["volagent:k"])
    assert props.get("volagent:k") is None
    # A user property set on the parent is inherited, and is then not local.
    await storage.set_properties(dataset_root, {"volagent:k": "parent"})
    props = await storage.get_properties(name, ["volagent:k"])
    assert props.get("volagent:k") == "parent"
    assert not props.is_local("volagent:k")


async def test_list_datasets_in_one_call_without_snapshots(
    storage: ZfsCli, dataset_root: str, zfs_calls: list[tuple[str, ...]]
) -> None:
    for child in ("a", "a/b", "c"):
        await storage.create_dataset(f"{dataset_root}/{child}", DatasetOptions(user={"x:y": child}))
    await storage.create_snapshot(f"{dataset_root}/a", "s1")
    zfs_calls.clear()
    everything = await storage.list_datasets(dataset_root, ["used", "x:y"])
    one_level = await storage.list_datasets(dataset_root, ["x:y"], depth=1)
    assert len(zfs_calls) == 2
    assert [p.name for p in everything] == [
        dataset_root,
        f"{dataset_root}/a",
        f"{dataset_root}/a/b",
        f"{dataset_root}/c",
    ]
    assert [p.get("x:y") for p in everything] == [None, "a", "a/b", "c"]
    assert all(p.get_int("used") for p in everything)
    assert [p.name for p in one_level] == [dataset_root, f"{dataset_root}/a", f"{dataset_root}/c"]


async def test_rename_and_mount_unmount_are_idempotent(storage: ZfsCli, dataset_root: str) -> None:
    await storage.create_dataset(f"{dataset_root}/old")
    await storage.rename_dataset(f"{dataset_root}/old", f"{dataset_root}/new")
    assert not await storage.exists(f"{dataset_root}/old")
    name = f"{dataset_root}/new"
    await storage.unmount(name)
    await storage.unmount(name)
    assert (await storage.get_properties(name, ["mounted"])).get_bool("mounted") is False
    await storage.mount(name)
    await storage.mount(name)
    assert (await storage.get_properties(name, ["mounted"])).get_bool("mounted") is True


@contextlib.contextmanager
def open_file_in(name: str) -> Iterator[Any]:
    with (mountpoint(name) / "held-open").open("w") as f:
        f.write("busy")
        f.flush()
        yield f


async def test_destroy_while_a_file_is_open_is_busy_and_leaves_it_mounted(
    storage: ZfsCli, dataset_root: str
) -> None:
    name = f"{dataset_root}/busy"
    await storage.create_dataset(name)
    with open_file_in(name):
        with pytest.raises(DatasetBusy) as info:
            await storage.destroy_dataset(name)
        assert "-f" not in info.value.argv
        props = await storage.get_properties(name, ["mounted"])
        assert props.get_bool("mounted") is True
        # Writes still land in the dataset, not in the parent's directory.
        (mountpoint(name) / "after").write_text("x")
        assert raw_get(name, "mounted") == "yes"
    assert await storage.destroy_dataset(name) is True
    assert not await storage.exists(name)


async def test_recursive_destroy_unmounts_children_first(
    storage: ZfsCli, dataset_root: str
) -> None:
    top = f"{dataset_root}/top"
    for child in ("", "/a", "/a/b", "/c"):
        await storage.create_dataset(top + child)
        (mountpoint(top + child) / "data").write_text("x")
    await storage.create_snapshot(f"{top}/a", "s1")
    assert await storage.destroy_dataset(top, recursive=True) is True
    assert not await storage.exists(top)
    assert await storage.destroy_dataset(top, recursive=True, missing_ok=True) is False


async def test_mutations_of_one_dataset_are_serialised_others_run_concurrently(
    storage: ZfsCli, dataset_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"{dataset_root}/c{i}" for i in range(4)]
    for name in names:
        await storage.create_dataset(name)
    running: dict[str, int] = {}
    peak_per_dataset = 0
    peak_total = 0
    real = proc.run

    async def tracking(argv: Any, **kw: Any) -> proc.Completed:
        nonlocal peak_per_dataset, peak_total
        target = argv[-1]
        running[target] = running.get(target, 0) + 1
        peak_per_dataset = max(peak_per_dataset, running[target])
        peak_total = max(peak_total, sum(running.values()))
        try:
            return await real(argv, **kw)
        finally:
            running[target] -= 1

    monkeypatch.setattr(proc, "run", tracking)
    await asyncio.gather(
        *(storage.set_properties(name, {"volagent:n": str(i)}) for i in range(5) for name in names)
    )
    assert peak_per_dataset == 1
    assert peak_total > 1
    assert len(storage._locks) == 0
