"""The cgroup layouts, checked against directory trees shaped like /sys/fs/cgroup.

The real v1 hierarchy of the test machine is exercised by the zone integration tests; v2 is
only checked here, on a tree that stands in for it (no v2 host is at hand).
"""

from pathlib import Path

import pytest

from volagent.adapters import cgroups
from volagent.adapters.cgroups import CgroupTree, CgroupVersion, Limits
from volagent.errors import ZoneFailed

LIMITS = Limits.from_settings(memory_mib=256, cpus=1.5, pids=1024)
V1_SELF = "9:name=systemd:/\n8:pids:/\n4:memory:/agent/slice\n2:cpu,cpuacct:/\n0::/\n"


def v1_tree(root: Path) -> Path:
    for controller in ("memory", "cpu", "pids", "cpuset"):
        (root / controller).mkdir(parents=True)
    return root


def v2_tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_limits_from_settings() -> None:
    limits = Limits.from_settings(memory_mib=256, cpus=1.5, pids=1024)
    assert limits == Limits(memory_bytes=256 * 2**20, cpu_quota_us=150_000, pids_max=1024)
    assert limits.cpu_period_us == 100_000
    assert Limits.from_settings(memory_mib=1, cpus=0.001, pids=1).cpu_quota_us == 1000


def test_own_cgroups_reads_v1_controllers_and_the_v2_path() -> None:
    assert cgroups.own_cgroups(V1_SELF) == {
        "name=systemd": "/",
        "pids": "/",
        "memory": "/agent/slice",
        "cpu": "/",
        "cpuacct": "/",
        "": "/",
    }


def test_detect(tmp_path: Path) -> None:
    assert cgroups.detect(v1_tree(tmp_path / "a")) is CgroupVersion.V1
    assert cgroups.detect(v2_tree(tmp_path / "b")) is CgroupVersion.V2


def test_v1_absolute_parent_gets_one_directory_per_controller_with_limits(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    tree = CgroupTree(parent="/volagent", root=root)
    assert tree.version is CgroupVersion.V1
    dirs = tree.create("zone-1", LIMITS)
    assert dirs == [root / c / "volagent" / "zone-1" for c in ("memory", "cpu", "pids")]
    memory, cpu, pids = dirs
    assert (memory / "memory.limit_in_bytes").read_text() == str(256 * 2**20)
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (pids / "pids.max").read_text() == "1024"
    assert tree.create("zone-1", LIMITS) == dirs  # idempotent


def test_v1_relative_parent_is_below_our_own_cgroup_of_each_controller(tmp_path: Path) -> None:
    root = v1_tree(tmp_path / "fs")
    own = tmp_path / "self"
    own.write_text(V1_SELF)
    tree = CgroupTree(parent="zones", root=root, self_cgroup=own)
    assert tree.parents() == [
        root / "memory" / "agent" / "slice" / "zones",
        root / "cpu" / "zones",
        root / "pids" / "zones",
    ]


def test_v1_missing_controller_is_zone_failed(tmp_path: Path) -> None:
    root = tmp_path
    (root / "memory").mkdir()
    with pytest.raises(ZoneFailed, match="cpu is not mounted"):
        CgroupTree(parent="/volagent", root=root).create("z", LIMITS)


def test_v2_one_directory_with_controllers_delegated_down_to_it(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    tree = CgroupTree(parent="/volagent/zones", root=root)
    assert tree.version is CgroupVersion.V2
    (directory,) = tree.create("zone-1", LIMITS)
    assert directory == root / "volagent" / "zones" / "zone-1"
    for ancestor in (root, root / "volagent", root / "volagent" / "zones"):
        assert (ancestor / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (directory / "memory.max").read_text() == str(256 * 2**20)
    assert (directory / "cpu.max").read_text() == "150000 100000"
    assert (directory / "pids.max").read_text() == "1024"


def test_v2_controllers_already_delegated_are_left_alone(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    (root / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (root / "volagent").mkdir()
    (root / "volagent" / "cgroup.subtree_control").write_text("")
    CgroupTree(parent="/volagent", root=root).create("z", LIMITS)
    assert (root / "cgroup.subtree_control").read_text() == "cpu io memory pids\n"
    assert (root / "volagent" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"


def test_v2_relative_parent(tmp_path: Path) -> None:
    own = tmp_path / "self"
    own.write_text("0::/system.slice/volagent.service\n")
    tree = CgroupTree(parent="zones", root=v2_tree(tmp_path / "fs"), self_cgroup=own)
    assert tree.parents() == [tmp_path / "fs" / "system.slice" / "volagent.service" / "zones"]


def test_unwritable_limit_is_zone_failed(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    (root / "volagent" / "z" / "memory.max").mkdir(parents=True)  # cannot be opened for writing
    (root / "volagent" / "cgroup.subtree_control").write_text("")
    with pytest.raises(ZoneFailed, match="cannot set up cgroup z"):
        CgroupTree(parent="/volagent", root=root).create("z", LIMITS)


@pytest.mark.parametrize("parent", ["", "/", "a/../b", "./a"])
def test_bad_parents_are_refused(tmp_path: Path, parent: str) -> None:
    with pytest.raises(ValueError, match="not a cgroup parent"):
        CgroupTree(parent=parent, root=v1_tree(tmp_path))


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a cgroup name"):
        CgroupTree(root=v1_tree(tmp_path)).create(name, LIMITS)


def test_procs_reads_every_directory_and_skips_missing_ones(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "cgroup.procs").write_text("12\n7\n")
    (b / "cgroup.procs").write_text("7\n30\n")
    assert cgroups.procs([a, b, tmp_path / "gone"]) == [7, 12, 30]


async def test_remove_waits_for_processes_and_gives_up_with_zone_failed(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "cgroup.procs").write_text("4242\n")
    with pytest.raises(ZoneFailed, match=r"processes \[4242\] still in"):
        await cgroups.remove([busy], timeout=0.1)
    assert busy.exists()


async def test_remove_of_directories_that_are_gone_is_fine(tmp_path: Path) -> None:
    await cgroups.remove([tmp_path / "gone" / "z"], timeout=1)
