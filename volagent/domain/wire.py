"""The building blocks of protocol v1 messages: model bases, timestamps, names, compact JSON.

Everything here is pure. Values checked here raise pydantic errors whose message is a short
reason (``must be a string``); :func:`problem_of` turns a pydantic error into the
``(parameter, reason)`` pair of the ``{"parameter", "reason"}`` details convention of
:mod:`volagent.domain.names`.

Timestamps are RFC 3339 texts with a time zone; they are held as UTC datetimes with
millisecond precision (finer digits are dropped when read) and written as
``2026-11-21T10:00:00.000Z``: fixed width, so they sort as text, and the form JavaScript's
``Date.toISOString`` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from volagent.domain import names
from volagent.errors import InvalidParameter

#: The protocol version every message carries in ``v``.
PROTOCOL_VERSION: Final = 1

_TIMESTAMP_RE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


class WireModel(BaseModel):
    """Base of the protocol's objects: frozen, strictly typed, unknown fields refused."""

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        json_schema_serialization_defaults_required=True,
    )

    def to_json_dict(self) -> dict[str, Any]:
        """The object as JSON values (optional fields without a value are left out)."""
        return self.model_dump(mode="json")

    def to_json_bytes(self) -> bytes:
        """The object as compact, deterministic JSON (see :func:`dumps`)."""
        return dumps(self.to_json_dict()).encode("ascii")


def is_none(value: object) -> bool:
    """Whether an optional field has no value: such fields are left out of the JSON.

    Used as ``Field(default=None, exclude_if=is_none)``.
    """
    return value is None


def invalid(reason: str) -> PydanticCustomError:
    """A validation error whose message is ``reason`` (raised inside validators)."""
    return PydanticCustomError("invalid_parameter", "{reason}", {"reason": reason})


def dumps(value: object) -> str:
    """Compact JSON with sorted keys, printable ASCII only, no NaN or infinity.

    Characters outside printable ASCII become JSON escapes (DEL too, which ``json`` leaves
    as it is), so the text is stored as it is wherever it goes.
    """
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.replace("\x7f", "\\u007f")  # DEL can only be inside a string


# ---------------------------------------------------------------------------- timestamps


def parse_timestamp(text: str) -> datetime:
    """Read an RFC 3339 timestamp with a time zone; ValueError when it is not one."""
    if _TIMESTAMP_RE.fullmatch(text) is None:
        msg = "must be an RFC 3339 timestamp with a time zone, like 2026-11-21T10:00:00Z"
        raise ValueError(msg)
    try:
        value = datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"is not a valid date and time: {exc}") from exc
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def format_timestamp(value: datetime) -> str:
    """Write a timezone-aware datetime as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC)."""
    if value.tzinfo is None:
        msg = "a timestamp needs a time zone"
        raise ValueError(msg)
    t = value.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond // 1000:03d}Z"
    )


def _to_timestamp(value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            raise invalid(str(exc)) from exc
    if isinstance(value, datetime):
        if value.tzinfo is None:
            msg = "must have a time zone"
            raise invalid(msg)
        utc = value.astimezone(UTC)
        return utc.replace(microsecond=utc.microsecond // 1000 * 1000)
    msg = "must be a timestamp string"
    raise invalid(msg)


#: A point in time: an RFC 3339 string on the wire, a UTC datetime (milliseconds) in Python.
Timestamp = Annotated[
    datetime,
    BeforeValidator(_to_timestamp),
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def _version(value: int) -> int:
    if value != PROTOCOL_VERSION:
        raise invalid(f"must be {PROTOCOL_VERSION} (the protocol version this agent speaks)")
    return value


#: The ``v`` of every message: the integer 1.
Version = Annotated[
    int,
    AfterValidator(_version),
    WithJsonSchema({"type": "integer", "const": PROTOCOL_VERSION}),
]


# ---------------------------------------------------------------------------- names


def _checked_by(check: Callable[..., str]) -> AfterValidator:
    """Run a :mod:`~volagent.domain.names` check as a pydantic validator."""

    def run(value: str) -> str:
        try:
            return check(value)
        except InvalidParameter as exc:
            raise invalid(str(exc.details.get("reason", exc.message))) from exc

    return AfterValidator(run)


def _string(pattern: str, description: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": f"^{pattern}$", "description": description})


#: A canonical lowercase uuid (task ids, volume uuids, owners, compute nodes).
Uuid = Annotated[
    str,
    _checked_by(names.validate_volume_uuid),
    _string(names.UUID_PATTERN, "A lowercase canonical UUID."),
]
#: A volume name, unique per owner among the node's live volumes.
VolumeName = Annotated[
    str,
    _checked_by(names.validate_volume_name),
    _string(names.VOLUME_NAME_PATTERN, "A volume name."),
]
#: A snapshot name, unique per volume.
SnapshotName = Annotated[
    str,
    _checked_by(names.validate_snapshot_name),
    _string(names.SNAPSHOT_NAME_PATTERN, "A snapshot name."),
]
#: The name of a tenant network (mapped to a host bridge by ``networks.<name>.bridge``).
NetworkName = Annotated[
    str,
    _checked_by(names.validate_network_name),
    _string(names.NETWORK_NAME_PATTERN, "A network name, mapped to a bridge by the node."),
]


# ---------------------------------------------------------------------------- errors

_REASONS: Final = {
    "missing": "is required",
    "extra_forbidden": "is not a known parameter",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "list_type": "must be an array",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "none_required": "must be null",
}


def problem_of(error: ErrorDetails, *, skip: int = 0) -> tuple[str, str]:
    """The ``(parameter, reason)`` of one pydantic error.

    The parameter is the error's location without its first ``skip`` parts, written like
    ``nic.ip``, ``allowed_clients[2]`` or ``labels[key]``; the reason is a short phrase.
    """
    parameter = ""
    loc = error["loc"][skip:]
    for index, part in enumerate(loc):
        if index + 1 < len(loc) and loc[index + 1] == "[key]":
            continue  # the key itself: the next part says the problem is with a key
        if isinstance(part, int) or part == "[key]":
            parameter += f"[{part}]" if isinstance(part, int) else part
        else:
            parameter += f".{part}" if parameter else part
    kind = error["type"]
    if kind == "greater_than_equal":
        reason = f"must be at least {error.get('ctx', {}).get('ge')}"
    elif kind == "less_than_equal":
        reason = f"must be at most {error.get('ctx', {}).get('le')}"
    elif kind == "too_long":
        reason = f"must have at most {error.get('ctx', {}).get('max_length')} items"
    elif kind == "too_short":
        reason = f"must have at least {error.get('ctx', {}).get('min_length')} items"
    elif kind == "string_too_short":
        reason = f"must have at least {error.get('ctx', {}).get('min_length')} characters"
    elif kind == "string_too_long":
        reason = f"must have at most {error.get('ctx', {}).get('max_length')} characters"
    else:
        reason = _REASONS.get(kind, error["msg"])
    return parameter, reason
