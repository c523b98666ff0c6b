"""Time "list 1,000 volume datasets with their specs": the driver against raw ``zfs get``.

Usage: ``python bench/zfs_list.py [--volumes N] [--rounds R]`` as root, with the zfs-fuse
daemon (or kernel ZFS) running. Creates a file-backed pool of its own under a temporary
directory and destroys it at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import structlog

from volagent.adapters.zfs import COMPLETE_PROPERTY, ZfsCli, volume_properties
from volagent.ports.storage import DatasetOptions

KEYS = ("name", "owner_uuid", "size_mib", "labels", "nfs_versions", "read_only")


def spec(i: int) -> dict[str, str]:
    return {
        "name": f"vol-{i}",
        "owner_uuid": str(uuid.UUID(int=i)),
        "size_mib": str(1024 + i),
        "labels": f'{{"team": "équipe-{i % 7}", "tier": "gold"}}',
        "nfs_versions": "[3, 4]",
        "read_only": "false",
    }


async def populate(zfs: ZfsCli, root: str, count: int) -> None:
    await zfs.create_dataset(root, DatasetOptions(mountpoint="none"))
    limit = asyncio.Semaphore(16)

    async def create(i: int) -> None:
        user = {f"volagent:{k}": v for k, v in spec(i).items()}
        user[COMPLETE_PROPERTY] = "yes"
        async with limit:
            await zfs.create_dataset(
                f"{root}/{uuid.uuid4()}",
                DatasetOptions(quota_bytes=(1024 + i) << 20, user=user),
            )

    await asyncio.gather(*(create(i) for i in range(count)))


def raw(root: str) -> float:
    argv = ["zfs", "get", "-H", "-p", "-d", "1", "-o", "name,property,value,source"]
    started = time.perf_counter()
    subprocess.run([*argv, volume_properties(KEYS), root], capture_output=True, check=True)
    return time.perf_counter() - started


async def driver(zfs: ZfsCli, root: str, count: int) -> float:
    started = time.perf_counter()
    volumes = await zfs.list_volumes(root, KEYS)
    elapsed = time.perf_counter() - started
    if len(volumes) != count or not all(v.complete for v in volumes):
        sys.exit(f"driver listed {len(volumes)} volumes, expected {count} complete ones")
    return elapsed


async def bench(pool: str, count: int, rounds: int) -> None:
    zfs = ZfsCli()
    root = f"{pool}/volumes"
    started = time.perf_counter()
    await populate(zfs, root, count)
    print(f"created {count} volume datasets in {time.perf_counter() - started:.1f} s")
    raw_times, driver_times = [], []
    for _ in range(rounds):
        raw_times.append(raw(root))
        driver_times.append(await driver(zfs, root, count))
    raw_s, driver_s = statistics.median(raw_times), statistics.median(driver_times)
    print(f"list {count} volume datasets with their specs (median of {rounds}):")
    print(f"  raw zfs get : {raw_s * 1000:8.1f} ms")
    print(f"  driver      : {driver_s * 1000:8.1f} ms")
    print(f"  ratio       : {driver_s / raw_s:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if subprocess.run(["zpool", "list", "-H"], capture_output=True, check=False).returncode:
        sys.exit("zpool list fails: start the zfs-fuse daemon first")
    pool = f"vbench{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="volagent-bench-") as tmp:
        image = Path(tmp) / "pool.img"
        with image.open("wb") as f:
            f.truncate(1 << 30)
        create = ["zpool", "create", "-m", f"{tmp}/mnt", pool, str(image)]
        subprocess.run(create, capture_output=True, check=True)
        try:
            asyncio.run(bench(pool, args.volumes, args.rounds))
        finally:
            deadline = time.monotonic() + 60  # never forced; retried while busy
            while True:
                done = subprocess.run(["zpool", "destroy", pool], capture_output=True, check=False)
                if done.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"zpool destroy {pool} kept failing: {done.stderr.decode().strip()}")
                time.sleep(0.5)


if __name__ == "__main__":
    main()
