"""Many zones at once on one bridge, each serving its own volume."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import pytest

from tests.support.net import Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.zones import HostState, ZoneBed
from volagent.ports.zones import ZoneState

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns]

T = TypeVar("T")
ZONES = 20
CONCURRENCY = 5


async def bounded(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await ``calls`` with at most CONCURRENCY running at a time."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Awaitable[T]) -> T:
        async with limit:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


async def test_twenty_zones_on_one_bridge_each_serve_their_own_volume(
    zone_bed: ZoneBed,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
) -> None:
    a = client_ns(21)
    before = HostState.take(zone_bed.tag, zone_bed.state_dir)
    sources = [zone_bed.volume(f"v{i}", seed={"who.txt": b"volume %d\n" % i}) for i in range(ZONES)]
    specs = [zone_bed.spec(source, 100 + i, (a.ip,)) for i, source in enumerate(sources)]
    zones = zone_bed.runtime()
    statuses = await bounded(zones.start(s) for s in specs)
    assert [s.state for s in statuses] == [ZoneState.RUNNING] * ZONES
    assert len({s.pids[0] for s in statuses}) == ZONES
    for i, spec in enumerate(specs):
        url = nfs_url(spec.nic.ip, f"{spec.export_path}/who.txt")
        assert nfs_client(a).cat(url).expect_ok() == b"volume %d\n" % i
    assert all(await bounded(zones.probe(s.volume_uuid) for s in specs))

    await bounded(zones.stop(s.volume_uuid) for s in specs)
    assert HostState.take(zone_bed.tag, zone_bed.state_dir) == before
