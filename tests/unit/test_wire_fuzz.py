"""The decoder against generated input: valid tasks, random bytes, random JSON, mutations."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volagent.config import LimitsConfig
from volagent.domain.events import ErrorBody, Event, EventState
from volagent.domain.tasks import (
    TASK_TYPES,
    Task,
    TaskBase,
    decode_task,
    task_id_of,
    task_kind_of,
)
from volagent.errors import InvalidTask, TaskRejected, VolagentError

CN = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
OTHER_CN = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
NOW = datetime(2026, 11, 21, 10, 5, tzinfo=UTC)
LIMITS = LimitsConfig(max_task_bytes=4096)
REJECTION_CODES = {
    "InvalidTask",
    "UnknownTaskKind",
    "WrongNode",
    "InvalidParameter",
    "DeadlineExceeded",
}
MIN_MESSAGES = 2000

uuids = st.uuids().map(str)
volume_names = st.from_regex(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,30}\Z")
snapshot_names = st.from_regex(r"\A[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,30}\Z")
network_names = st.from_regex(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,15}\Z")
sizes = st.integers(min_value=1, max_value=LIMITS.max_volume_mib)
labels = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4)


@st.composite
def nics(draw: st.DrawFn) -> dict[str, Any]:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address
    if draw(st.booleans()):
        prefix = draw(st.integers(min_value=8, max_value=30))
        base = int(ipaddress.IPv4Address("10.0.0.0"))
        net = ipaddress.IPv4Network((base + draw(st.integers(0, 2**24 - 1)), 32), strict=False)
        net = net.supernet(new_prefix=prefix)
        hosts = int(net.num_addresses) - 2
        ip = net.network_address + draw(st.integers(1, hosts))
        gateway = net.network_address + draw(st.integers(1, hosts))
    else:
        prefix = 64
        net6 = ipaddress.IPv6Network("fd00:1234:5678:9abc::/64")
        ip = net6.network_address + draw(st.integers(1, 2**64 - 1))
        gateway = net6.network_address + 1
    nic: dict[str, Any] = {"ip": str(ip), "prefix": prefix, "network": draw(network_names)}
    if gateway != ip and draw(st.booleans()):
        nic["gateway"] = str(gateway)
    return nic


clients = st.lists(
    st.sampled_from(["10.0.0.0/8", "192.168.7.0/24", "172.16.0.9", "fd00::/64", "2001:db8::1"]),
    max_size=5,
)
versions = st.lists(st.sampled_from([3, 4]), min_size=1, max_size=3)


def _optional(**values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=values)


PARAMS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "volume.create": st.builds(
        lambda req, opt: {**req, **opt},
        st.fixed_dictionaries(
            {
                "uuid": uuids,
                "name": volume_names,
                "owner_uuid": uuids,
                "size_mib": sizes,
                "nic": nics(),
            }
        ),
        _optional(
            allowed_clients=clients, nfs_versions=versions, read_only=st.booleans(), labels=labels
        ),
    ),
    "volume.delete": st.builds(
        lambda u, o: {"uuid": u, **o}, uuids, _optional(force=st.booleans())
    ),
    "volume.resize": st.fixed_dictionaries({"uuid": uuids, "size_mib": sizes}),
    "volume.get": st.fixed_dictionaries({"uuid": uuids}),
    "volume.list": st.just({}),
    "volume.set_access": st.fixed_dictionaries(
        {"uuid": uuids, "allowed_clients": clients, "read_only": st.booleans()}
    ),
    "snapshot.create": st.fixed_dictionaries({"volume_uuid": uuids, "name": snapshot_names}),
    "snapshot.delete": st.fixed_dictionaries({"volume_uuid": uuids, "name": snapshot_names}),
    "snapshot.list": st.fixed_dictionaries({"volume_uuid": uuids}),
    "snapshot.rollback": st.builds(
        lambda r, o: {**r, **o},
        st.fixed_dictionaries({"volume_uuid": uuids, "name": snapshot_names}),
        _optional(destroy_newer=st.booleans()),
    ),
    "zone.restart": st.builds(lambda u, o: {"uuid": u, **o}, uuids, _optional(force=st.booleans())),
    "zone.update": st.builds(lambda u, o: {"uuid": u, **o}, uuids, _optional(force=st.booleans())),
}


@st.composite
def valid_tasks(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(PARAMS)))
    task: dict[str, Any] = {
        "v": 1,
        "id": draw(uuids),
        "kind": kind,
        "cn": CN,
        "created": "2026-11-21T10:00:00Z",
        "params": draw(PARAMS[kind]),
    }
    if draw(st.booleans()):
        task["deadline"] = "2026-11-21T11:30:00.5+01:00"
    return task


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([CN, "volume.create", "10.0.0.5", "2026-11-21T10:00:00Z", "", "-1"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


#: Values near the valid ones: other nodes, past deadlines, unknown kinds, edge sizes.
plausible: st.SearchStrategy[Any] = st.sampled_from(
    [
        OTHER_CN,
        CN,
        "2026-11-21T10:04:00Z",
        "volume.nope",
        "volume.get",
        "snapshot.list",
        0,
        -1,
        10**12,
        2**63,
        "",
        "a b",
        "-x",
        "10.0.0.0/8",
        "10.0.0.1/8",
        [],
        {},
        True,
        None,
        3.0,
    ]
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _container(task: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        task = task[part]
    return task


@st.composite
def mutated_tasks(draw: st.DrawFn) -> bytes:
    task = draw(valid_tasks())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(task) if p]
        in_params = [p for p in paths if p[0] == "params" and len(p) > 1]
        if in_params and draw(st.integers(0, 3)) > 0:  # mostly the parameters
            paths = in_params
        path = draw(st.sampled_from(paths))
        holder = _container(task, path)
        action = draw(st.sampled_from(["replace", "plausible", "envelope", "delete", "add"]))
        if action == "replace":
            holder[path[-1]] = draw(json_values)
        elif action == "plausible":
            holder[path[-1]] = draw(plausible)
        elif action == "envelope":
            field = draw(st.sampled_from(["cn", "kind", "deadline", "v", "id", "created"]))
            task[field] = draw(plausible)
        elif action == "delete":
            del holder[path[-1]]
        elif isinstance(holder, dict):
            holder[draw(st.text(max_size=10))] = draw(json_values)
        else:
            holder.append(draw(json_values))
    raw = json.dumps(task).encode()
    if draw(st.integers(0, 3)) == 0:  # damage the bytes too: flip, cut or insert
        at = draw(st.integers(0, len(raw)))
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip" and at < len(raw):
            raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
        elif how == "cut":
            raw = raw[:at]
        else:
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return raw


messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.dictionaries(
        st.sampled_from(["v", "id", "kind", "cn", "created", "deadline", "params"]), json_values
    ).map(lambda value: json.dumps(value).encode()),
    valid_tasks().map(lambda task: json.dumps(task).encode()),
    mutated_tasks(),
    mutated_tasks(),
)


def _decode(raw: bytes) -> Task | TaskRejected:
    try:
        return decode_task(raw, cn=CN, limits=LIMITS, now=NOW)
    except TaskRejected as exc:
        return exc


def _check(raw: bytes) -> str:
    """Decode ``raw`` twice; return ``ok`` or the error code; check a failed event can be built."""
    try:
        result = _decode(raw)
    except VolagentError as exc:
        raise AssertionError(f"{type(exc).__name__} is not a TaskRejected: {raw!r}") from exc
    again = _decode(raw)  # the same input gets the same answer
    task_id, kind = task_id_of(raw), task_kind_of(raw)
    if isinstance(result, TaskBase):
        assert type(result) is TASK_TYPES[result.kind]
        assert again == result
        assert task_id == result.id
        return "ok"
    assert result.code in REJECTION_CODES
    assert isinstance(again, TaskRejected)
    assert (again.code, again.message, again.details) == (
        result.code,
        result.message,
        result.details,
    )
    if task_id is not None:  # the failed event the agent would publish can be built
        event = Event(
            task=task_id,
            kind=kind,
            cn=CN,
            seq=1,
            ts=NOW,
            state=EventState.FAILED,
            error=ErrorBody.from_error(result),
        )
        assert json.loads(event.to_json_bytes())["error"]["code"] == result.code
    return result.code


def test_the_decoder_answers_every_generated_message_with_a_task_or_a_rejection() -> None:
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=2500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages)
    def run(raw: bytes) -> None:
        outcomes[_check(raw)] += 1

    run()
    assert outcomes.total() >= MIN_MESSAGES
    # the mix reaches past the envelope: valid tasks and bad parameters, not only bad JSON
    assert {"ok", "InvalidTask", "InvalidParameter"} <= set(outcomes), outcomes


@settings(max_examples=300, deadline=None)
@given(valid_tasks())
def test_every_valid_task_decodes_and_round_trips(task: dict[str, Any]) -> None:
    decoded = decode_task(json.dumps(task).encode(), cn=CN, limits=LIMITS, now=NOW)
    assert decoded.kind == task["kind"]
    assert decode_task(decoded.to_json_bytes(), cn=CN, limits=LIMITS, now=NOW) == decoded


@settings(max_examples=300, deadline=None)
@given(valid_tasks(), st.sampled_from(["v", "id", "kind", "cn", "created", "params"]))
def test_a_valid_task_without_an_envelope_field_is_invalid(
    task: dict[str, Any], field: str
) -> None:
    del task[field]
    with pytest.raises(InvalidTask) as info:
        decode_task(json.dumps(task).encode(), cn=CN, limits=LIMITS, now=NOW)
    assert info.value.details["field"] == field
