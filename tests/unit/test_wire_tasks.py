from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from volagent.config import LimitsConfig
from volagent.domain.tasks import (
    TASK_KINDS,
    TASK_TYPES,
    SnapshotRollbackTask,
    Task,
    VolumeCreateTask,
    VolumeDeleteTask,
    ZoneRestartTask,
    ZoneUpdateTask,
    decode_task,
    task_id_of,
    task_kind_of,
)
from volagent.errors import (
    DeadlineExceeded,
    InvalidParameter,
    InvalidTask,
    TaskRejected,
    UnknownTaskKind,
    WrongNode,
)

CN = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
OTHER_CN = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
TASK_ID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
VOL = "3e2d1c0b-9a8f-4e7d-8c6b-5a4f3e2d1c0b"
OWNER = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
NOW = datetime(2026, 11, 21, 10, 5, tzinfo=UTC)
LIMITS = LimitsConfig()
NIC = {"ip": "10.0.0.5", "prefix": 24, "network": "tenant"}

MINIMAL_PARAMS: dict[str, dict[str, Any]] = {
    "volume.create": {
        "uuid": VOL,
        "name": "data",
        "owner_uuid": OWNER,
        "size_mib": 1024,
        "nic": NIC,
    },
    "volume.delete": {"uuid": VOL},
    "volume.resize": {"uuid": VOL, "size_mib": 2048},
    "volume.get": {"uuid": VOL},
    "volume.list": {},
    "volume.set_access": {"uuid": VOL, "allowed_clients": [], "read_only": True},
    "snapshot.create": {"volume_uuid": VOL, "name": "before-upgrade"},
    "snapshot.delete": {"volume_uuid": VOL, "name": "before-upgrade"},
    "snapshot.list": {"volume_uuid": VOL},
    "snapshot.rollback": {"volume_uuid": VOL, "name": "before-upgrade"},
    "zone.restart": {"uuid": VOL},
    "zone.update": {"uuid": VOL},
}


def message(
    kind: str = "volume.get", params: dict[str, Any] | None = None, /, **fields: Any
) -> bytes:
    envelope: dict[str, Any] = {
        "v": 1,
        "id": TASK_ID,
        "kind": kind,
        "cn": CN,
        "created": "2026-11-21T10:00:00Z",
        "params": MINIMAL_PARAMS[kind] if params is None else params,
    }
    envelope.update(fields)
    return json.dumps({k: v for k, v in envelope.items() if v is not ...}).encode()


def decode(raw: bytes, *, limits: LimitsConfig = LIMITS) -> Task:
    return decode_task(raw, cn=CN, limits=limits, now=NOW)


def rejected(raw: bytes, error: type[TaskRejected], **kw: Any) -> TaskRejected:
    with pytest.raises(error) as info:
        decode(raw, **kw)
    assert type(info.value) is error
    return info.value


def create_params(**changes: Any) -> dict[str, Any]:
    return {**MINIMAL_PARAMS["volume.create"], **changes}


# ------------------------------------------------------------------------------ valid tasks


def test_the_table_lists_every_kind_of_the_protocol() -> None:
    assert set(TASK_KINDS) == set(MINIMAL_PARAMS)


@pytest.mark.parametrize("kind", sorted(MINIMAL_PARAMS))
def test_every_kind_decodes_with_its_minimal_params(kind: str) -> None:
    task = decode(message(kind))
    assert type(task) is TASK_TYPES[kind]
    assert (task.id, task.kind, task.cn, task.v) == (TASK_ID, kind, CN, 1)
    assert task.created == datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert task.deadline is None


@pytest.mark.parametrize(
    ("kind", "volume"),
    [("volume.create", VOL), ("volume.list", None), ("snapshot.list", VOL), ("zone.update", VOL)],
)
def test_params_name_the_volume_a_task_acts_on(kind: str, volume: str | None) -> None:
    task = decode(message(kind))
    assert isinstance(task, TASK_TYPES[kind])
    assert task.params.volume == volume


def test_volume_create_defaults_follow_the_protocol_table() -> None:
    task = decode(message("volume.create"))
    assert isinstance(task, VolumeCreateTask)
    params = task.params
    assert params.allowed_clients is None
    assert params.nfs_versions == [3, 4]
    assert params.read_only is False
    assert params.labels == {}
    assert params.nic.gateway is None
    spec = params.spec()
    assert spec.allowed_clients == ["10.0.0.0/24"]  # the nic's subnet
    assert spec.nfs_versions == [3, 4]


def test_null_allowed_clients_means_the_default() -> None:
    task = decode(message("volume.create", create_params(allowed_clients=None)))
    assert isinstance(task, VolumeCreateTask)
    assert task.params.spec().allowed_clients == ["10.0.0.0/24"]


def test_other_defaults_follow_the_protocol_table() -> None:
    for kind in ("volume.delete", "zone.restart", "zone.update"):
        task = decode(message(kind))
        assert isinstance(task, VolumeDeleteTask | ZoneRestartTask | ZoneUpdateTask)
        assert task.params.force is False
    rollback = decode(message("snapshot.rollback"))
    assert isinstance(rollback, SnapshotRollbackTask)
    assert rollback.params.destroy_newer is False


def test_volume_create_values_are_made_canonical() -> None:
    params = create_params(
        nic={"ip": "FD00:0::0005", "prefix": 64, "network": "v6net", "gateway": "fd00::1"},
        allowed_clients=["fd00::/64", "10.1.0.0/16", "192.168.1.7/32", "10.1.0.0/16", "10.0.0.9"],
        nfs_versions=[4, 3, 4],
        labels={"team": "storage", "tier": "gold"},
        read_only=True,
    )
    task = decode(message("volume.create", params))
    assert isinstance(task, VolumeCreateTask)
    p = task.params
    assert p.nic.ip == "fd00::5"
    assert p.allowed_clients == ["10.0.0.9", "10.1.0.0/16", "192.168.1.7", "fd00::/64"]
    assert p.nfs_versions == [3, 4]
    assert p.read_only is True
    assert p.spec().labels == {"team": "storage", "tier": "gold"}


def test_unknown_envelope_fields_are_ignored() -> None:
    task = decode(message("volume.get", trace="abc", priority=3))
    assert task.kind == "volume.get"


def test_a_deadline_in_the_future_is_kept() -> None:
    task = decode(message("volume.get", deadline="2026-11-21T11:10:00+01:00"))
    assert task.deadline == datetime(2026, 11, 21, 10, 10, tzinfo=UTC)
    assert task.deadline_passed(datetime(2026, 11, 21, 10, 10, 0, 1000, tzinfo=UTC))
    task = decode(message("volume.get", deadline="2026-11-21T10:05:00Z"))
    assert not task.deadline_passed(NOW)  # exactly now: still in time


def test_the_size_limit_comes_from_the_configuration() -> None:
    at_limit = message("volume.create", create_params(size_mib=LIMITS.max_volume_mib))
    assert decode(at_limit)
    small = LimitsConfig(max_volume_mib=100)
    err = rejected(
        message("volume.resize", {"uuid": VOL, "size_mib": 101}), InvalidParameter, limits=small
    )
    assert err.details["parameter"] == "size_mib"
    assert "100" in err.details["reason"]


def test_a_task_round_trips_through_its_json() -> None:
    task = decode(
        message("volume.create", create_params(labels={"é": "ü"}), deadline="2027-01-01T00:00:00Z")
    )
    again = decode(task.to_json_bytes())
    assert again == task


# ----------------------------------------------------------------------------- InvalidTask


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # a byte order mark is not JSON
        (b'{"v": NaN}', "NaN is not JSON"),
        (b'{"v": Infinity}', "Infinity is not JSON"),
        (b'{"v": 1, "v": 1}', "duplicate key 'v'"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[" * 200_000, "nested too deeply"),
        (b'{"v": ' + b"1" * 5000 + b"}", "not JSON"),
    ],
)
def test_messages_that_are_not_json_objects_are_invalid_tasks(raw: bytes, reason: str) -> None:
    err = rejected(raw, InvalidTask)
    assert reason in err.details["reason"]
    assert err.code == "InvalidTask"


def test_an_oversize_message_is_an_invalid_task() -> None:
    limits = LimitsConfig(max_task_bytes=300)
    raw = message("volume.create", create_params(labels={"pad": "x" * 200}))
    assert len(raw) > 300
    err = rejected(raw, InvalidTask, limits=limits)
    assert "limits.max_task_bytes" in err.details["reason"]
    assert task_id_of(raw) == TASK_ID  # a failed event can still be sent


def test_the_default_size_limit_is_256_kib() -> None:
    padding = "x" * (256 * 1024)
    err = rejected(message("volume.get", pad=padding), InvalidTask)
    assert "262144" in err.details["reason"]


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"v": ...}, "v", "is required"),
        ({"v": 2}, "v", "must be 1"),
        ({"v": "1"}, "v", "must be an integer"),
        ({"v": True}, "v", "must be an integer"),
        ({"v": 1.0}, "v", "must be an integer"),
        ({"id": ...}, "id", "is required"),
        ({"id": 7}, "id", "must be a string"),
        ({"id": "not-a-uuid"}, "id", "uuid"),
        ({"id": TASK_ID.upper()}, "id", "lowercase"),
        ({"kind": ...}, "kind", "is required"),
        ({"kind": ["volume.get"]}, "kind", "must be a string"),
        ({"cn": ...}, "cn", "is required"),
        ({"cn": "node-1"}, "cn", "uuid"),
        ({"created": ...}, "created", "is required"),
        ({"created": "yesterday"}, "created", "RFC 3339"),
        ({"created": "2026-11-21T10:00:00"}, "created", "time zone"),
        ({"created": "2026-02-30T10:00:00Z"}, "created", "not a valid date"),
        ({"created": "0001-01-01T00:00:00+01:00"}, "created", "not a valid date"),
        ({"created": 1700000000}, "created", "must be a timestamp string"),
        ({"deadline": "soon"}, "deadline", "RFC 3339"),
        ({"params": ...}, "params", "is required"),
        ({"params": []}, "params", "must be an object"),
        ({"params": None}, "params", "must be an object"),
    ],
)
def test_bad_envelope_fields_are_invalid_tasks(
    fields: dict[str, Any], field: str, reason: str
) -> None:
    err = rejected(message("volume.get", **fields), InvalidTask)
    assert err.details["field"] == field
    assert reason in err.details["reason"]


# ------------------------------------------------------------------ WrongNode, UnknownTaskKind


def test_a_task_for_another_node_fails_with_wrong_node() -> None:
    err = rejected(message("volume.get", cn=OTHER_CN), WrongNode)
    assert err.details == {"cn": OTHER_CN}


def test_wrong_node_is_decided_before_the_kind_and_params() -> None:
    rejected(message("volume.nope", {"x": 1}, cn=OTHER_CN), WrongNode)


@pytest.mark.parametrize("kind", ["volume.nope", "Volume.Create", "", "volume.create "])
def test_an_unknown_kind_fails_with_unknown_task_kind(kind: str) -> None:
    err = rejected(message("volume.get", kind=kind), UnknownTaskKind)
    assert err.details == {"kind": kind}


def test_unknown_kind_is_decided_before_the_params() -> None:
    rejected(message("volume.get", {"bogus": 1}, kind="volume.nope"), UnknownTaskKind)


# ------------------------------------------------------------------------ InvalidParameter


@pytest.mark.parametrize(
    ("kind", "params", "parameter", "reason"),
    [
        ("volume.get", {}, "uuid", "is required"),
        ("volume.get", {"uuid": VOL, "extra": 1}, "extra", "is not a known parameter"),
        ("volume.list", {"uuid": VOL}, "uuid", "is not a known parameter"),
        ("volume.get", {"uuid": "x"}, "uuid", "uuid"),
        ("volume.get", {"uuid": VOL.upper()}, "uuid", "lowercase"),
        ("volume.get", {"uuid": 5}, "uuid", "must be a string"),
        ("volume.delete", {"uuid": VOL, "force": "yes"}, "force", "must be true or false"),
        ("volume.delete", {"uuid": VOL, "force": 1}, "force", "must be true or false"),
        ("volume.resize", {"uuid": VOL, "size_mib": 0}, "size_mib", "must be at least 1"),
        ("volume.resize", {"uuid": VOL, "size_mib": -5}, "size_mib", "must be at least 1"),
        ("volume.resize", {"uuid": VOL, "size_mib": 1.5}, "size_mib", "must be an integer"),
        ("volume.resize", {"uuid": VOL, "size_mib": 2.0}, "size_mib", "must be an integer"),
        ("volume.resize", {"uuid": VOL, "size_mib": "10"}, "size_mib", "must be an integer"),
        ("volume.resize", {"uuid": VOL, "size_mib": True}, "size_mib", "must be an integer"),
        ("volume.resize", {"uuid": VOL, "size_mib": 10**30}, "size_mib", "limits.max_volume_mib"),
        ("volume.resize", {"uuid": VOL}, "size_mib", "is required"),
        ("volume.set_access", {"uuid": VOL, "read_only": True}, "allowed_clients", "is required"),
        ("volume.set_access", {"uuid": VOL, "allowed_clients": []}, "read_only", "is required"),
        (
            "volume.set_access",
            {"uuid": VOL, "allowed_clients": "10.0.0.0/8", "read_only": False},
            "allowed_clients",
            "must be an array",
        ),
        (
            "volume.set_access",
            {"uuid": VOL, "allowed_clients": ["10.0.0.1/8"], "read_only": False},
            "allowed_clients[0]",
            "no host bits",
        ),
        (
            "volume.set_access",
            {"uuid": VOL, "allowed_clients": ["ok", "x"], "read_only": False},
            "allowed_clients[0]",
            "IP address",
        ),
        (
            "volume.set_access",
            {"uuid": VOL, "allowed_clients": ["10.0.0.0/33"], "read_only": False},
            "allowed_clients[0]",
            "IP address",
        ),
        ("snapshot.create", {"volume_uuid": VOL, "name": "-x"}, "name", "must match"),
        ("snapshot.create", {"volume_uuid": VOL, "name": "a@b"}, "name", "must match"),
        ("snapshot.create", {"volume_uuid": VOL, "name": "a" * 65}, "name", "64 characters"),
        ("snapshot.create", {"name": "x"}, "volume_uuid", "is required"),
        (
            "snapshot.rollback",
            {"volume_uuid": VOL, "name": "x", "destroy_newer": None},
            "destroy_newer",
            "must be true or false",
        ),
        (
            "zone.restart",
            {"uuid": VOL, "force": False, "reason": "x"},
            "reason",
            "is not a known parameter",
        ),
    ],
)
def test_bad_params_are_invalid_parameters_naming_the_parameter(
    kind: str, params: dict[str, Any], parameter: str, reason: str
) -> None:
    err = rejected(message(kind, params), InvalidParameter)
    assert err.details["parameter"] == parameter
    assert reason in err.details["reason"], err.details
    assert set(err.details) == {"parameter", "reason"}


@pytest.mark.parametrize(
    ("changes", "parameter", "reason"),
    [
        ({"name": ""}, "name", "must match"),
        ({"name": "a/b"}, "name", "must match"),
        ({"name": "x" * 257}, "name", "256 characters"),
        ({"name": "..."}, "name", "must match"),
        ({"owner_uuid": "nobody"}, "owner_uuid", "uuid"),
        ({"size_mib": 0}, "size_mib", "must be at least 1"),
        ({"size_mib": 1048577}, "size_mib", "limits.max_volume_mib"),
        ({"nic": "10.0.0.5/24"}, "nic", "must be an object"),
        ({"nic": {**NIC, "ip": "10.0.0.256"}}, "nic.ip", "IPv4 or IPv6"),
        ({"nic": {**NIC, "ip": "0.0.0.0"}}, "nic.ip", "unicast"),  # noqa: S104  # refused, not bound
        ({"nic": {**NIC, "ip": "127.0.0.1"}}, "nic.ip", "unicast"),
        ({"nic": {**NIC, "ip": "224.0.0.1"}}, "nic.ip", "unicast"),
        ({"nic": {**NIC, "ip": "fe80::1%eth0"}}, "nic.ip", "zone index"),
        ({"nic": {**NIC, "prefix": 0}}, "nic.prefix", "must be at least 1"),
        ({"nic": {**NIC, "prefix": 33}}, "nic.prefix", "at most 32"),
        ({"nic": {**NIC, "prefix": "24"}}, "nic.prefix", "must be an integer"),
        ({"nic": {**NIC, "ip": "10.0.0.0"}}, "nic.prefix", "network address"),
        ({"nic": {**NIC, "ip": "10.0.0.255"}}, "nic.prefix", "broadcast address"),
        (
            {"nic": {**NIC, "gateway": "10.0.1.1"}},
            "nic.gateway",
            "must be an address in 10.0.0.0/24",
        ),
        ({"nic": {**NIC, "gateway": "10.0.0.5"}}, "nic.gateway", "own address"),
        ({"nic": {**NIC, "gateway": "fd00::1"}}, "nic.gateway", "must be an address in"),
        ({"nic": {**NIC, "network": "a b"}}, "nic.network", "must match"),
        ({"nic": {**NIC, "network": ...}}, "nic.network", "is required"),
        ({"nic": {**NIC, "mac": "00:11:22:33:44:55"}}, "nic.mac", "is not a known parameter"),
        ({"allowed_clients": ["10.0.0.0/8"] * 101}, "allowed_clients", "at most 100"),
        ({"nfs_versions": []}, "nfs_versions", "at least one"),
        ({"nfs_versions": [2, 3]}, "nfs_versions", "versions 3 and 4"),
        ({"nfs_versions": [3.0]}, "nfs_versions[0]", "must be an integer"),
        ({"nfs_versions": [True]}, "nfs_versions[0]", "must be an integer"),
        ({"nfs_versions": "3,4"}, "nfs_versions", "must be an array"),
        ({"read_only": "false"}, "read_only", "must be true or false"),
        ({"labels": []}, "labels", "must be an object"),
        ({"labels": {"a": 1}}, "labels.a", "must be a string"),
        ({"labels": {"": "x"}}, "labels[key]", "at least 1 characters"),
        ({"labels": {"k": "v" * 5000}}, "labels", "more than 4096"),
        ({"uuid": ...}, "uuid", "is required"),
    ],
)
def test_bad_volume_create_params_name_the_parameter(
    changes: dict[str, Any], parameter: str, reason: str
) -> None:
    params = {k: v for k, v in create_params(**changes).items() if v is not ...}
    if isinstance(params["nic"], dict):
        params["nic"] = {k: v for k, v in params["nic"].items() if v is not ...}
    err = rejected(message("volume.create", params), InvalidParameter)
    assert (err.details["parameter"], reason in err.details["reason"]) == (parameter, True), (
        err.details
    )


def test_nic_edge_cases_that_are_valid() -> None:
    for nic in [
        {"ip": "10.0.0.0", "prefix": 31, "network": "p2p"},  # /31: both addresses are hosts
        {"ip": "10.0.0.7", "prefix": 32, "network": "host"},
        {"ip": "fd00::", "prefix": 64, "network": "v6", "gateway": "fd00::1"},
        {"ip": "192.168.5.9", "prefix": 16, "network": "n", "gateway": None},
    ]:
        task = decode(message("volume.create", create_params(nic=nic)))
        assert isinstance(task, VolumeCreateTask), nic


def test_invalid_parameter_is_decided_before_the_deadline() -> None:
    raw = message("volume.get", {"uuid": "x"}, deadline="2026-11-21T10:00:01Z")
    rejected(raw, InvalidParameter)


# ------------------------------------------------------------------------ DeadlineExceeded


def test_a_task_past_its_deadline_fails_with_deadline_exceeded() -> None:
    err = rejected(message("volume.get", deadline="2026-11-21T10:04:59.999Z"), DeadlineExceeded)
    assert err.details == {"deadline": "2026-11-21T10:04:59.999Z"}


# --------------------------------------------------------------------- reading failed tasks


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (message("volume.get", cn=OTHER_CN), TASK_ID),
        (message("volume.get", kind="volume.nope"), TASK_ID),
        (json.dumps({"id": TASK_ID}).encode(), TASK_ID),
        (b'{"id": "' + TASK_ID.encode() + b'", "kind": "volume.get", "x": "\xff"}', TASK_ID),
        (b'{"id": "' + TASK_ID.encode() + b'", "v": NaN}', TASK_ID),
        (json.dumps({"id": TASK_ID.upper()}).encode(), None),
        (json.dumps({"id": 17}).encode(), None),
        (json.dumps({"params": {"id": TASK_ID}}).encode(), None),
        (json.dumps([TASK_ID]).encode(), None),
        (b"\x00\x01garbage", None),
        (b"[" * 100_000, None),
        (b"", None),
    ],
)
def test_task_id_of_reads_a_valid_id_when_there_is_one(raw: bytes, expected: str | None) -> None:
    assert task_id_of(raw) == expected


def test_task_id_of_survives_anything_passed_to_it() -> None:
    assert task_id_of("not bytes") is None  # type: ignore[arg-type]  # the point of the test
    assert task_id_of(None) is None  # type: ignore[arg-type]  # the point of the test


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("volume.get", "volume.get"),
        ("volume.nope", "volume.nope"),
        ("Volume.Get", ""),
        ("x" * 65, ""),
        ('a"b', ""),
        (7, ""),
    ],
)
def test_task_kind_of_echoes_only_what_looks_like_a_kind(kind: object, expected: str) -> None:
    assert task_kind_of(json.dumps({"id": TASK_ID, "kind": kind}).encode()) == expected
