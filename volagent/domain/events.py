"""Task events of protocol v1: what the agent publishes about each task it accepted.

An event is built with every value given, the timestamp too, so the same values always give
the same bytes: :meth:`Event.to_json_bytes` writes the top-level keys in the protocol's order
(``v, task, kind, cn, seq, ts, state`` then ``progress``, ``result`` or ``error``), nested
objects with sorted keys, compact and ASCII only. A terminal event published again is
therefore the same bytes, whether replayed from the journal or rebuilt from its values.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, Field, JsonValue, model_validator
from pydantic.json_schema import SkipJsonSchema

from volagent.domain.wire import Timestamp, Uuid, Version, WireModel, dumps, invalid, is_none
from volagent.errors import WIRE_CODES, VolagentError


class EventState(StrEnum):
    """Where a task is; ``succeeded`` and ``failed`` are terminal."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """Whether no event follows this one."""
        return self in (EventState.SUCCEEDED, EventState.FAILED)


def _wire_code(code: str) -> str:
    if code not in WIRE_CODES:
        raise invalid(f"must be an error code of the protocol, not {code[:100]!r}")
    return code


#: A task kind as echoed in events: a known kind, an unknown one that looks like a kind, or
#: ``""`` when the message had none that could be read.
EventKind = Annotated[str, Field(pattern=r"^([a-z][a-z0-9_.]{0,63})?$")]
WireCode = Annotated[
    str,
    AfterValidator(_wire_code),
    Field(json_schema_extra={"enum": sorted(WIRE_CODES)}),
]


class Progress(WireModel):
    """How far a long step has come (``state: progress``)."""

    phase: Annotated[str, Field(min_length=1, max_length=64)]
    done: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=0)]


def _json_safe(value: object) -> JsonValue:
    """``value`` as JSON values; anything else (paths, NaN, objects) becomes its text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)


class ErrorBody(WireModel):
    """The ``error`` of a failed event."""

    code: WireCode
    message: str
    retryable: bool
    details: dict[str, JsonValue]

    @classmethod
    def from_error(cls, exc: VolagentError) -> ErrorBody:
        """The error object of ``exc`` (internal codes go out as ``Internal``)."""
        wire = exc.to_wire()
        details = _json_safe(wire["details"])
        return cls(
            code=wire["code"],
            message=wire["message"],
            retryable=wire["retryable"],
            details=details if isinstance(details, dict) else {},
        )


class Event(WireModel):
    """One event of one task; ``seq`` increases per task."""

    v: Version = 1
    task: Uuid
    kind: EventKind
    cn: Uuid
    seq: Annotated[int, Field(ge=0)]
    ts: Timestamp
    state: EventState
    progress: Progress | SkipJsonSchema[None] = Field(
        default=None, exclude_if=is_none, description="With state progress only."
    )
    result: dict[str, JsonValue] | SkipJsonSchema[None] = Field(
        default=None,
        exclude_if=is_none,
        description="With state succeeded only: the kind's result (see docs/protocol.md).",
    )
    error: ErrorBody | SkipJsonSchema[None] = Field(
        default=None, exclude_if=is_none, description="With state failed only."
    )

    @model_validator(mode="after")
    def _body_matches_state(self) -> Event:
        expected = {
            "progress": self.state is EventState.PROGRESS,
            "result": self.state is EventState.SUCCEEDED,
            "error": self.state is EventState.FAILED,
        }
        for name, wanted in expected.items():
            present = getattr(self, name) is not None
            if present != wanted:
                verb = "needs" if wanted else "must not have"
                raise invalid(f"an event in state {self.state.value} {verb} {name!r}")
        return self

    @property
    def terminal(self) -> bool:
        """Whether this is the task's last event."""
        return self.state.terminal

    def to_json_bytes(self) -> bytes:
        """The event as compact ASCII JSON: top-level keys in protocol order, nested sorted."""
        data: dict[str, Any] = self.model_dump(mode="json")
        body = ",".join(f"{json.dumps(key)}:{dumps(value)}" for key, value in data.items())
        return ("{" + body + "}").encode("ascii")
