from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from volagent.domain import names
from volagent.domain.wire import (
    Timestamp,
    WireModel,
    dumps,
    format_timestamp,
    parse_timestamp,
    problem_of,
)
from volagent.errors import InvalidParameter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-21T10:00:00Z", datetime(2026, 11, 21, 10, tzinfo=UTC)),
        ("2026-11-21T10:00:00.5Z", datetime(2026, 11, 21, 10, 0, 0, 500_000, tzinfo=UTC)),
        ("2026-11-21T10:00:00.123456789Z", datetime(2026, 11, 21, 10, 0, 0, 123_000, tzinfo=UTC)),
        ("2026-11-21T11:30:00+01:30", datetime(2026, 11, 21, 10, tzinfo=UTC)),
        ("2026-11-21T05:00:00-05:00", datetime(2026, 11, 21, 10, tzinfo=UTC)),
    ],
)
def test_timestamps_are_read_as_utc_milliseconds(text: str, expected: datetime) -> None:
    value = parse_timestamp(text)
    assert value == expected
    assert value.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-21T10:00:00",  # no time zone
        "2026-11-21 10:00:00Z",
        "2026-11-21t10:00:00z",
        "2026-11-21",
        "2026-11-21T10:00Z",
        "2026-13-01T00:00:00Z",
        "2026-11-21T24:00:00Z",
        "2026-11-21T10:00:60Z",
        "2026-11-21T10:00:00+24:00",
        "٢٠٢٦-11-21T10:00:00Z",  # other digits than ASCII
        "9999-12-31T23:59:59-01:00",  # beyond what a datetime holds once in UTC
        " 2026-11-21T10:00:00Z",
    ],
)
def test_other_texts_are_not_timestamps(text: str) -> None:
    with pytest.raises(ValueError, match=r"timestamp|date and time"):
        parse_timestamp(text)


def test_timestamps_are_written_fixed_width_in_utc() -> None:
    value = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(value) == "2026-01-02T01:04:05.678Z"
    assert format_timestamp(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000Z"
    with pytest.raises(ValueError, match="time zone"):
        format_timestamp(datetime(2026, 1, 1))  # noqa: DTZ001  # naive on purpose


@given(
    st.datetimes(
        timezones=st.just(UTC),
        min_value=datetime(1, 1, 2),  # noqa: DTZ001  # hypothesis bounds are naive by API
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001  # as above
    )
)
def test_timestamps_round_trip_at_millisecond_precision(value: datetime) -> None:
    text = format_timestamp(value)
    assert len(text) == 24
    assert parse_timestamp(text) == value.replace(microsecond=value.microsecond // 1000 * 1000)
    assert format_timestamp(parse_timestamp(text)) == text


class Stamped(BaseModel):
    at: Timestamp


def test_the_timestamp_type_accepts_text_and_aware_datetimes_only() -> None:
    assert Stamped.model_validate({"at": "2026-11-21T10:00:00Z"}).at.tzinfo is UTC
    local = datetime(2026, 11, 21, 11, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=1)))
    assert Stamped(at=local).at == datetime(2026, 11, 21, 10, 0, 0, 999_000, tzinfo=UTC)
    assert Stamped(at=local).model_dump_json() == '{"at":"2026-11-21T10:00:00.999Z"}'
    for bad in [datetime(2026, 1, 1), 1700000000, None]:  # noqa: DTZ001  # naive on purpose
        with pytest.raises(ValidationError):
            Stamped.model_validate({"at": bad})


def test_dumps_is_compact_sorted_printable_ascii() -> None:
    text = dumps({"b": [1, "é", "\x7f", "\n"], "a": {"z": None, "y": True}})
    assert text == '{"a":{"y":true,"z":null},"b":[1,"\\u00e9","\\u007f","\\n"]}'
    assert text.isascii()
    assert text.isprintable()
    assert json.loads(text) == {"b": [1, "é", "\x7f", "\n"], "a": {"z": None, "y": True}}
    with pytest.raises(ValueError, match="JSON compliant"):
        dumps(float("nan"))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_dumps_always_gives_printable_ascii_that_reads_back(value: object) -> None:
    text = dumps(value)
    assert text.isascii()
    assert text.isprintable()
    assert json.loads(text) == value


class Deep(WireModel):
    labels: dict[str, str]
    items: list[int]


@pytest.mark.parametrize(
    ("data", "skip", "expected"),
    [
        ({"labels": {"k": 1}, "items": []}, 0, ("labels.k", "must be a string")),
        ({"labels": {"k": 1}, "items": []}, 1, ("k", "must be a string")),
        ({"labels": {}, "items": [1, "2"]}, 0, ("items[1]", "must be an integer")),
        ({"labels": {}}, 0, ("items", "is required")),
        ({"labels": {}, "items": [], "x": 1}, 0, ("x", "is not a known parameter")),
        ({"labels": [], "items": []}, 0, ("labels", "must be an object")),
    ],
)
def test_problem_of_names_the_parameter_and_the_reason(
    data: dict[str, object], skip: int, expected: tuple[str, str]
) -> None:
    with pytest.raises(ValidationError) as info:
        Deep.model_validate(data)
    assert problem_of(info.value.errors()[0], skip=skip) == expected


def test_network_names_follow_the_configuration_rule() -> None:
    assert names.validate_network_name("tenant-1.a_b") == "tenant-1.a_b"
    assert names.validate_network_name("n" * 64) == "n" * 64
    for bad in ["", "-x", "a b", "n" * 65, "a/b", "tenant\n"]:
        with pytest.raises(InvalidParameter) as info:
            names.validate_network_name(bad, param="nic.network")
        assert info.value.details["parameter"] == "nic.network"


@pytest.mark.parametrize(
    ("pattern", "check"),
    [
        (names.UUID_PATTERN, names.validate_volume_uuid),
        (names.VOLUME_NAME_PATTERN, names.validate_volume_name),
        (names.SNAPSHOT_NAME_PATTERN, names.validate_snapshot_name),
        (names.NETWORK_NAME_PATTERN, names.validate_network_name),
    ],
)
def test_published_patterns_are_the_ones_checked(pattern: str, check: object) -> None:
    assert callable(check)
    for sample in [
        "a",
        "A-1.b_c",
        "x:y",
        "-a",
        "",
        "3e2d1c0b-9a8f-4e7d-8c6b-5a4f3e2d1c0b",
        "a" * 300,
    ]:
        try:
            check(sample)
        except InvalidParameter:
            accepted = False
        else:
            accepted = True
        assert (re.fullmatch(pattern, sample) is not None) is accepted, sample
