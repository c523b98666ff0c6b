from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from volagent.domain.events import ErrorBody, Event, EventState, Progress
from volagent.errors import CommandError, InvalidParameter, VolumeInUse

TASK = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
CN = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
TS = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


def event(state: EventState, **body: Any) -> Event:
    return Event(task=TASK, kind="volume.create", cn=CN, seq=3, ts=TS, state=state, **body)


def test_an_accepted_event_is_compact_json_in_protocol_order() -> None:
    raw = event(EventState.ACCEPTED).to_json_bytes()
    assert raw == (
        b'{"v":1,"task":"6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b","kind":"volume.create",'
        b'"cn":"0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f","seq":3,"ts":"2026-11-21T10:00:00.123Z",'
        b'"state":"accepted"}'
    )


def test_a_progress_event_carries_its_progress() -> None:
    raw = event(EventState.PROGRESS, progress=Progress(phase="zone", done=1, total=3))
    assert json.loads(raw.to_json_bytes())["progress"] == {"phase": "zone", "done": 1, "total": 3}
    assert raw.to_json_bytes().endswith(b',"progress":{"done":1,"phase":"zone","total":3}}')


def test_a_succeeded_event_carries_its_result_with_sorted_keys() -> None:
    result = {"uuid": "x", "already_absent": False, "nested": {"b": 1, "a": [None, "é"]}}
    raw = event(EventState.SUCCEEDED, result=result).to_json_bytes()
    assert raw.endswith(
        b',"state":"succeeded","result":{"already_absent":false,"nested":{"a":[null,"\\u00e9"]'
        b',"b":1},"uuid":"x"}}'
    )
    assert json.loads(raw)["result"] == result


def test_a_failed_event_carries_the_wire_form_of_the_error() -> None:
    exc = VolumeInUse("2 clients are connected", details={"clients": ["10.0.0.7", "10.0.0.9"]})
    raw = event(EventState.FAILED, error=ErrorBody.from_error(exc)).to_json_bytes()
    assert json.loads(raw)["error"] == {
        "code": "VolumeInUse",
        "message": "2 clients are connected",
        "retryable": False,
        "details": {"clients": ["10.0.0.7", "10.0.0.9"]},
    }


def test_an_internal_error_goes_out_as_internal_with_json_safe_details() -> None:
    exc = CommandError("zfs failed", argv=["zfs", "list"], returncode=1, stderr="boom")
    exc.details["path"] = Path("/tank")
    exc.details["ratio"] = float("nan")
    exc.details[7] = ("a", 1.5)  # type: ignore[index]  # a foreign key type must not break events
    body = ErrorBody.from_error(exc)
    assert body.code == "Internal"
    assert body.details["cause"] == "CommandFailed"
    assert body.details["path"] == "/tank"
    assert body.details["ratio"] == "nan"
    assert body.details["7"] == ["a", 1.5]
    event(EventState.FAILED, error=body).to_json_bytes()


@pytest.mark.parametrize(
    ("state", "body"),
    [
        (EventState.ACCEPTED, {"result": {}}),
        (EventState.RUNNING, {"progress": Progress(phase="x", done=0, total=0)}),
        (EventState.PROGRESS, {}),
        (EventState.SUCCEEDED, {}),
        (EventState.SUCCEEDED, {"result": {}, "error": ErrorBody.from_error(VolumeInUse("x"))}),
        (EventState.FAILED, {}),
        (EventState.FAILED, {"result": {}}),
    ],
)
def test_the_body_must_match_the_state(state: EventState, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        event(state, **body)


@pytest.mark.parametrize(
    "changes",
    [
        {"task": "not-a-uuid"},
        {"cn": CN.upper()},
        {"seq": -1},
        {"ts": datetime(2026, 11, 21, 10, 0)},  # noqa: DTZ001  # a naive time is refused
        {"kind": "Volume Create"},
        {"v": 2},
    ],
)
def test_bad_event_values_are_refused(changes: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "task": TASK,
        "kind": "volume.get",
        "cn": CN,
        "seq": 0,
        "ts": TS,
        "state": EventState.RUNNING,
    }
    with pytest.raises(ValidationError):
        Event(**{**values, **changes})


def test_error_codes_must_be_protocol_codes() -> None:
    with pytest.raises(ValidationError):
        ErrorBody(code="CommandFailed", message="x", retryable=False, details={})


def test_an_unreadable_kind_is_echoed_as_empty() -> None:
    error = ErrorBody.from_error(InvalidParameter("x"))
    unread = Event(task=TASK, kind="", cn=CN, seq=0, ts=TS, state=EventState.FAILED, error=error)
    assert b'"kind":""' in unread.to_json_bytes()


def test_terminal_states() -> None:
    assert {s for s in EventState if s.terminal} == {EventState.SUCCEEDED, EventState.FAILED}
    assert event(EventState.FAILED, error=ErrorBody.from_error(InvalidParameter("x"))).terminal
    assert not event(EventState.RUNNING).terminal


def test_the_timestamp_is_written_in_utc_with_milliseconds() -> None:
    local = TS.astimezone(timezone(timedelta(hours=-5)))
    raw = event(EventState.RUNNING).model_copy(update={"ts": local}).to_json_bytes()
    assert b'"ts":"2026-11-21T10:00:00.123Z"' in raw


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_objects = st.dictionaries(
    st.text(),
    st.recursive(
        json_leaves, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=8
    ),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(json_objects, st.integers(min_value=0, max_value=2**40))
def test_events_are_reproducible_byte_for_byte_from_their_values(
    result: dict[str, Any], seq: int
) -> None:
    first = Event(
        task=TASK,
        kind="volume.list",
        cn=CN,
        seq=seq,
        ts=TS,
        state=EventState.SUCCEEDED,
        result=result,
    )
    shuffled = dict(reversed(list(result.items())))
    second = Event(
        task=TASK,
        kind="volume.list",
        cn=CN,
        seq=seq,
        ts=TS,
        state=EventState.SUCCEEDED,
        result=shuffled,
    )
    raw = first.to_json_bytes()
    assert raw == second.to_json_bytes()
    assert raw.isascii()
    assert json.loads(raw)["result"] == result
    again = Event.model_validate_json(raw)
    assert again.to_json_bytes() == raw
