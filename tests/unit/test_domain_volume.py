from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from volagent.domain.results import (
    RESULT_TYPES,
    PoolSpace,
    SnapshotDeleteResult,
    VolumeDeleteResult,
    VolumeListResult,
)
from volagent.domain.spec import VolumeSpec
from volagent.domain.tasks import TASK_KINDS
from volagent.domain.volume import (
    TRANSITIONS,
    Snapshot,
    Volume,
    VolumeState,
    ZoneInfo,
    can_transition,
    check_transition,
)
from volagent.errors import VolagentError
from volagent.ports.zones import ZoneState

VOL = "3e2d1c0b-9a8f-4e7d-8c6b-5a4f3e2d1c0b"
OWNER = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
CN = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
SINCE = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
S = VolumeState

#: The protocol's states: creating -> ready <-> failed, -> deleting -> deleted.
EXPECTED_MOVES = {
    (S.CREATING, S.READY),
    (S.CREATING, S.FAILED),
    (S.CREATING, S.DELETING),
    (S.READY, S.FAILED),
    (S.READY, S.DELETING),
    (S.FAILED, S.READY),
    (S.FAILED, S.DELETING),
    (S.DELETING, S.DELETED),
    (S.DELETING, S.FAILED),
}


def spec(**changes: Any) -> VolumeSpec:
    values: dict[str, Any] = {
        "name": "foo",
        "owner_uuid": OWNER,
        "size_mib": 1024,
        "nic": {"ip": "10.0.0.1", "prefix": 24, "network": "tenant"},
        "allowed_clients": ["10.0.0.0/24"],
        "nfs_versions": [3, 4],
        "read_only": False,
        "labels": {},
    }
    return VolumeSpec.model_validate({**values, **changes})


def volume(state: VolumeState = S.READY, **spec_changes: Any) -> Volume:
    zone = ZoneInfo(state=ZoneState.RUNNING, restarts=0, since=SINCE)
    return Volume.from_spec(VOL, spec(**spec_changes), cn=CN, state=state, zone=zone, generation=7)


# ------------------------------------------------------------------------------ states


def test_the_transition_table_is_the_protocols() -> None:
    moves = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert moves == EXPECTED_MOVES
    assert set(TRANSITIONS) == set(VolumeState)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(VolumeState, repeat=2)))
def test_every_pair_of_states_is_allowed_or_refused(current: S, target: S) -> None:
    legal = current is target or (current, target) in EXPECTED_MOVES
    assert can_transition(current, target) is legal
    if legal:
        assert check_transition(current, target) is target
    else:
        with pytest.raises(VolagentError) as info:
            check_transition(current, target)
        assert info.value.wire_code == "Internal"
        assert info.value.details == {"from": current.value, "to": target.value}


def test_deleted_is_final() -> None:
    assert TRANSITIONS[S.DELETED] == frozenset()


# ------------------------------------------------------------------------------ object


def test_the_volume_object_has_the_protocol_fields() -> None:
    data = json.loads(volume().to_json_bytes())
    assert data == {
        "uuid": VOL,
        "name": "foo",
        "owner_uuid": OWNER,
        "size_mib": 1024,
        "used_bytes": 0,
        "state": "ready",
        "resource": "nfs://10.0.0.1/foo",
        "filesystem_path": "10.0.0.1:/foo",
        "nic": {"ip": "10.0.0.1", "prefix": 24, "network": "tenant"},
        "allowed_clients": ["10.0.0.0/24"],
        "read_only": False,
        "nfs_versions": [3, 4],
        "zone": {"state": "running", "restarts": 0, "since": "2026-11-21T10:00:00.000Z"},
        "snapshots": [],
        "cn": CN,
        "generation": 7,
        "labels": {},
    }


def test_an_ipv6_volume_puts_its_address_in_brackets() -> None:
    v6 = volume(name="bar", nic={"ip": "fd00::10", "prefix": 64, "network": "v6"})
    assert v6.resource == "nfs://[fd00::10]/bar"
    assert v6.filesystem_path == "[fd00::10]:/bar"


def test_a_volume_reads_back_from_its_json() -> None:
    snap = Snapshot(name="s1", created=SINCE, used_bytes=4096)
    original = volume(nic={"ip": "10.0.0.1", "prefix": 24, "network": "t", "gateway": "10.0.0.254"})
    original = original.with_changes(snapshots=[snap], used_bytes=123)
    again = Volume.model_validate_json(original.to_json_bytes())
    assert again == original
    assert again.to_json_bytes() == original.to_json_bytes()


def test_spec_and_from_spec_are_inverse() -> None:
    value = spec(read_only=True, labels={"a": "b"}, nfs_versions=[4])
    assert volume(**value.model_dump()).spec() == value


# ------------------------------------------------------------------------------ changes


def test_a_change_bumps_the_generation_by_one() -> None:
    before = volume()
    after = before.with_changes(used_bytes=1 << 20)
    assert (after.used_bytes, after.generation) == (1 << 20, 8)
    assert before.generation == 7  # unchanged: volumes are values
    later = after.with_changes(
        state=S.FAILED, zone=ZoneInfo(state=ZoneState.FAILED, restarts=3, since=SINCE)
    )
    assert (later.state, later.generation) == (S.FAILED, 9)


def test_no_change_is_no_new_generation() -> None:
    before = volume()
    assert before.with_changes() is before
    assert before.with_changes(used_bytes=0, state=S.READY) is before


def test_an_illegal_state_change_is_refused() -> None:
    with pytest.raises(VolagentError) as info:
        volume(S.DELETED).with_changes(state=S.READY)
    assert info.value.details == {"from": "deleted", "to": "ready"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"generation": 9}, "generation"),
        ({"colour": "blue"}, "colour"),
        ({"state": "ready"}, "state"),  # a plain string is not a VolumeState
        ({"size_mib": 0}, "size_mib"),
        ({"allowed_clients": ["10.0.0.1/8"]}, "allowed_clients.0"),
    ],
)
def test_bad_changes_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(VolagentError) as info:
        volume().with_changes(**changes)
    assert info.value.details["field"] == field
    assert info.value.wire_code == "Internal"


# ------------------------------------------------------------------------------ results


def test_every_kind_has_a_result_type() -> None:
    assert set(RESULT_TYPES) == set(TASK_KINDS)


def test_result_objects_have_the_protocol_fields() -> None:
    deleted = VolumeDeleteResult(uuid=VOL, already_absent=True)
    assert deleted.to_json_dict() == {"uuid": VOL, "state": "deleted", "already_absent": True}
    listing = VolumeListResult(volumes=[volume()], pool=PoolSpace(size_bytes=10, free_bytes=4))
    data = listing.to_json_dict()
    assert data["pool"] == {"size_bytes": 10, "free_bytes": 4}
    assert data["volumes"][0]["resource"] == "nfs://10.0.0.1/foo"
    gone = SnapshotDeleteResult(name="s1", already_absent=False)
    assert gone.to_json_dict() == {"name": "s1", "already_absent": False}
