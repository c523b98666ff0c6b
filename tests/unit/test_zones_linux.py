"""The pure parts of the Linux zone runtime: names, /proc parsing, records, refusals."""

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from volagent.adapters import netns
from volagent.adapters.netns import (
    LinuxZones,
    established_peers,
    host_if_name,
    netns_name,
    parse_mountinfo,
    zone_mac,
)
from volagent.config import NetworkConfig, ZonesConfig
from volagent.errors import InvalidParameter, StartupError
from volagent.ports.zones import Nic, Zones, ZoneSpec, ZoneUsage

UUID = "123e4567-e89b-12d3-a456-426614174000"
OTHER = "123e4567-e89b-12d3-a456-426614174001"
SPEC = ZoneSpec(
    volume_uuid=UUID,
    source="/tank/volumes/" + UUID,
    export_path="/volumes/web",
    nic=Nic(ip="10.0.0.5", prefix=24, network="tenant-a", gateway="10.0.0.1"),
    allowed_clients=("10.0.0.0/24",),
)


def test_names_are_derived_from_the_uuid_and_fit_linux_limits() -> None:
    assert netns_name("vz", UUID) == f"vz-{UUID}"
    for prefix in ("v", "vz", "vt1a2b"):
        name = host_if_name(prefix, UUID)
        assert len(name) == 15
        assert name.startswith(prefix)
        assert name.isalnum()
        assert name == host_if_name(prefix, UUID)  # stable
    assert host_if_name("vz", UUID) != host_if_name("vz", OTHER)
    tries = {host_if_name("vz", UUID, attempt) for attempt in range(50)}
    assert len(tries) == 50  # another name per attempt when one is taken


def test_zone_mac_is_stable_unicast_and_locally_administered() -> None:
    mac = zone_mac(UUID)
    assert mac == zone_mac(UUID)
    assert mac != zone_mac(OTHER)
    octets = [int(o, 16) for o in mac.split(":")]
    assert len(octets) == 6
    assert octets[0] & 0x01 == 0  # unicast
    assert octets[0] & 0x02 == 2  # locally administered


MOUNTINFO = r"""22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
43 22 0:40 / /tank rw,relatime - fuse.zfs tank rw,user_id=0
44 43 0:41 / /tank/vol\040one rw,relatime shared:5 master:2 - fuse.zfs tank/vol\040one rw
45 22 0:42 / /run/netns rw - tmpfs tmpfs rw
"""


def test_parse_mountinfo() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in mounts] == ["/", "/tank", "/tank/vol one", "/run/netns"]
    assert [m.fstype for m in mounts] == ["ext4", "fuse.zfs", "fuse.zfs", "tmpfs"]
    assert [m.shared for m in mounts] == [True, False, True, False]
    assert mounts[2].source == "tank/vol one"
    assert parse_mountinfo("garbage\n\n") == []


# /proc/<pid>/net/tcp: 10.0.0.5:2049 <- 10.0.0.21:812 ESTABLISHED, 10.0.0.5:20048 <- 10.0.0.22
# ESTABLISHED, 10.0.0.5:111 <- 10.0.0.23 ESTABLISHED (portmapper), 10.0.0.5:2049 <- 10.0.0.24
# TIME_WAIT, a listener on 2049.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0500000A:0801 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0500000A:0801 1500000A:032C 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0500000A:4E50 1600000A:0300 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0500000A:006F 1700000A:0301 01 00000000:00000000 00:00000000 00000000     0        0 4 1
   4: 0500000A:0801 1800000A:0302 06 00000000:00000000 00:00000000 00000000     0        0 5 1
"""
# tcp6: [fd00::5]:2049 <- [fd00::21] ESTABLISHED, and a v4-mapped peer ::ffff:10.0.0.30.
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 000000FD000000000000000005000000:0801 000000FD000000000000000021000000:D431 01 0
   1: 0000000000000000FFFF00000500000A:0801 0000000000000000FFFF00001E00000A:D432 01 0
"""


def test_established_peers_of_the_nfs_and_mount_ports() -> None:
    assert established_peers(TCP, netns.NFS_PORTS) == {"10.0.0.21", "10.0.0.22"}
    assert established_peers(TCP, {111}) == {"10.0.0.23"}
    assert established_peers(TCP6, netns.NFS_PORTS) == {"fd00::21", "10.0.0.30"}
    assert established_peers("", netns.NFS_PORTS) == set()


def test_record_round_trips_through_json() -> None:
    now = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
    record = netns._Record(
        spec=SPEC,
        netns=netns_name("vz", UUID),
        host_if=host_if_name("vz", UUID),
        state="running",
        since=now,
        cgroups=["/sys/fs/cgroup/memory/volagent/" + UUID],
        ganesha_pid=100,
        rpcbind_pid=101,
        config_digest="d",
        restart_key="k",
        started=now,
        restarts=2,
    )
    assert netns._Record.from_json(record.to_json()) == record
    again = dataclasses.replace(record, started=None, ganesha_pid=None, reason="x")
    assert netns._Record.from_json(again.to_json()) == again


def entries(path: Path) -> list[Path]:
    return list(path.iterdir())


def runtime(tmp_path: Path, **kwargs: object) -> LinuxZones:
    values: dict[str, object] = {
        "state_dir": tmp_path,
        "networks": {"tenant-a": NetworkConfig(bridge="br0")},
        "zones": ZonesConfig(),
        **kwargs,
    }
    return LinuxZones(**values)  # type: ignore[arg-type]  # keyword values checked by the class


@pytest.mark.parametrize("prefix", ["", "Vz", "1vz", "vz-", "toolong7"])
def test_a_bad_name_prefix_is_refused(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ValueError, match="name_prefix"):
        runtime(tmp_path, name_prefix=prefix)


@pytest.mark.parametrize("state_dir", ["/run", "/run/volagent"])
def test_a_state_dir_under_run_is_refused(state_dir: str) -> None:
    with pytest.raises(StartupError, match="under /run"):
        runtime(Path(state_dir))


async def test_a_bad_spec_is_refused_before_anything_is_done(tmp_path: Path) -> None:
    zones = runtime(tmp_path)
    bad = dataclasses.replace(SPEC, allowed_clients=("10.0.0.0/24; Access_Type = RW",))
    for call in (zones.start, zones.restart, zones.update, zones.set_access):
        with pytest.raises(InvalidParameter):
            await call(bad)
    for query in (zones.stop, zones.status, zones.probe, zones.connected_clients, zones.usage):
        with pytest.raises(InvalidParameter):
            await query("../etc")
    assert entries(tmp_path) == []


def test_linux_zones_is_a_zones_port(tmp_path: Path) -> None:
    port: Zones = runtime(tmp_path)  # mypy checks the protocol; the rest is the integration
    assert isinstance(port, LinuxZones)


async def test_unknown_zones(tmp_path: Path) -> None:
    zones = runtime(tmp_path)
    assert await zones.status(UUID) is None
    assert await zones.adopt() == []
    assert await zones.probe(UUID) is False
    assert await zones.connected_clients(UUID) == []
    assert await zones.usage(UUID) == ZoneUsage(rss_bytes=0, cpu_seconds=0.0)
    await zones.stop(UUID)
