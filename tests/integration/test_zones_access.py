"""Who may use a zone's export, on both NFS versions, and changing it without a restart."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.net import Namespace
from tests.support.nfs import V4_CREATE_MAX_BYTES, NfsClient, nfs_url
from tests.support.zones import ZoneBed

pytestmark = [pytest.mark.zfs, pytest.mark.nfs, pytest.mark.netns]

Clients = Callable[[int], Namespace]
Nfs = Callable[[Namespace], NfsClient]


def files(source: str) -> dict[str, bytes]:
    """What the volume's dataset holds, seen directly on the host."""
    return {p.name: p.read_bytes() for p in Path(source).iterdir()}


def owner(source: str, name: str) -> tuple[int, int]:
    st = Path(source, name).stat()
    return st.st_uid, st.st_gid


def payload(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


async def test_allowed_clients_write_and_read_on_v3_and_v4_and_others_are_refused(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs, tmp_path: Path
) -> None:
    source = zone_bed.volume("vol")
    a, b, c = client_ns(21), client_ns(22), client_ns(23)
    spec = zone_bed.spec(source, 10, (a.ip, b.ip))
    await zone_bed.runtime().start(spec)
    ip, export = spec.nic.ip, spec.export_path

    big, big_data = payload(tmp_path, "big.bin", 300 * 1024)
    nfs_client(a).cp(big, nfs_url(ip, f"{export}/v3.bin")).expect_ok()
    small, small_data = payload(tmp_path, "small.bin", V4_CREATE_MAX_BYTES)
    nfs_client(a).cp_v4_create(small, nfs_url(ip, f"{export}/v4.bin", version=4)).expect_ok()

    for name, data in (("v3.bin", big_data), ("v4.bin", small_data)):
        for version in (3, 4):
            url = nfs_url(ip, f"{export}/{name}", version=version)
            assert nfs_client(b).cat(url).expect_ok() == data, (name, version)
        assert files(source)[name] == data  # it landed in the dataset

    v3 = nfs_client(c).cat(nfs_url(ip, f"{export}/v3.bin"))
    v4 = nfs_client(c).cat(nfs_url(ip, f"{export}/v3.bin", version=4))
    assert "MNT3ERR_ACCES" in v3.stderr
    assert "NFS4ERR_NOENT" in v4.stderr
    assert not nfs_client(c).cp(small, nfs_url(ip, f"{export}/from-c.bin")).ok
    assert "from-c.bin" not in files(source)
    # The export path is the same on v3 and v4; the dataset's own path is no way in.
    assert "MNT3ERR_ACCES" in nfs_client(a).cat(nfs_url(ip, f"{source}/v3.bin")).stderr


async def test_root_is_squashed_to_the_configured_anonymous_ids(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs, tmp_path: Path
) -> None:
    source = zone_bed.volume("vol")
    a = client_ns(21)
    spec = zone_bed.spec(source, 10, (a.ip,))
    await zone_bed.runtime(anonymous_uid=4242, anonymous_gid=4343).start(spec)
    src, _ = payload(tmp_path, "f", 1000)
    nfs_client(a).cp(src, nfs_url(spec.nic.ip, f"{spec.export_path}/root.bin", uid=0)).expect_ok()
    nfs_client(a).cp(src, nfs_url(spec.nic.ip, f"{spec.export_path}/user.bin")).expect_ok()
    assert owner(source, "root.bin") == (4242, 4343)
    assert owner(source, "user.bin") == (1000, 1000)


async def test_a_read_only_export_serves_reads_and_refuses_writes(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs, tmp_path: Path
) -> None:
    source = zone_bed.volume("vol", seed={"seed.txt": b"seeded before the zone started\n"})
    a = client_ns(21)
    spec = zone_bed.spec(source, 10, (a.ip,), read_only=True)
    await zone_bed.runtime().start(spec)
    ip, export = spec.nic.ip, spec.export_path
    for version in (3, 4):
        read = nfs_client(a).cat(nfs_url(ip, f"{export}/seed.txt", version=version))
        assert read.expect_ok() == b"seeded before the zone started\n"
    src, _ = payload(tmp_path, "f", 1000)
    v3 = nfs_client(a).cp(src, nfs_url(ip, f"{export}/w3.bin"))
    v4 = nfs_client(a).cp_v4_create(src, nfs_url(ip, f"{export}/w4.bin", version=4))
    assert not v3.ok
    assert not v4.ok
    assert sorted(files(source)) == ["seed.txt"]


async def test_access_changes_are_reloaded_by_the_same_server_and_keep_the_data(
    zone_bed: ZoneBed, client_ns: Clients, nfs_client: Nfs, tmp_path: Path
) -> None:
    source = zone_bed.volume("vol")
    a, b, c = client_ns(21), client_ns(22), client_ns(26)
    zones = zone_bed.runtime()
    spec = zone_bed.spec(source, 10, (a.ip, b.ip))
    before = await zones.start(spec)
    ip, export = spec.nic.ip, spec.export_path
    src, data = payload(tmp_path, "data.bin", 200 * 1024)
    nfs_client(a).cp(src, nfs_url(ip, f"{export}/data.bin")).expect_ok()
    url = nfs_url(ip, f"{export}/data.bin")
    assert "MNT3ERR_ACCES" in nfs_client(c).cat(url).stderr

    # C in (by a network holding C but not B), B out: a SIGHUP reload, no restart.
    c_net = str(zone_bed.bridge.network.network_address + 24) + "/30"
    changed = zone_bed.spec(source, 10, (a.ip, c_net), volume_uuid=spec.volume_uuid)
    after = await zones.set_access(changed)
    assert after.pids == before.pids
    assert after.restarts == 0
    assert nfs_client(c).cat(url).expect_ok() == data
    assert nfs_client(c).cat(nfs_url(ip, f"{export}/data.bin", version=4)).expect_ok() == data
    assert "MNT3ERR_ACCES" in nfs_client(b).cat(url).stderr
    assert "NFS4ERR_NOENT" in nfs_client(b).cat(nfs_url(ip, f"{export}/data.bin", version=4)).stderr
    assert nfs_client(a).cat(url).expect_ok() == data

    # Read-only is an access change too.
    read_only = zone_bed.spec(
        source, 10, changed.allowed_clients, volume_uuid=spec.volume_uuid, read_only=True
    )
    assert (await zones.set_access(read_only)).pids == before.pids
    assert not nfs_client(a).cp(src, nfs_url(ip, f"{export}/more.bin")).ok
    assert nfs_client(a).cat(url).expect_ok() == data
    assert "Reread exports complete" in zone_bed.ganesha_log(spec.volume_uuid)
