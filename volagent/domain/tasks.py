"""Task messages of protocol v1 and the decoder that turns untrusted bytes into a task.

:func:`decode_task` checks, in this order, and raises the first problem found:

1. size at most ``limits.max_task_bytes``, UTF-8, JSON (no duplicate keys, no ``NaN``), an
   object, the envelope fields ``v``, ``id``, ``kind``, ``cn``, ``created``, ``deadline``,
   ``params`` present and well typed: else :class:`~volagent.errors.InvalidTask`
   (details ``{"field", "reason"}``, or ``{"reason"}`` for the message as a whole);
2. ``cn`` is this node: else :class:`~volagent.errors.WrongNode`;
3. ``kind`` is known: else :class:`~volagent.errors.UnknownTaskKind`;
4. the kind's parameters: else :class:`~volagent.errors.InvalidParameter` with details
   ``{"parameter", "reason"}`` (``nic.ip``, ``allowed_clients[2]``...);
5. ``deadline`` not passed: else :class:`~volagent.errors.DeadlineExceeded`.

Unknown envelope fields are ignored (the protocol grows by optional fields); unknown
parameters are refused. Whatever the input, the decoder returns a task or raises one of
these five errors; :func:`task_id_of` and :func:`task_kind_of` read what a failed event can
carry from a message that did not decode, and never raise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field, ValidationError

from volagent.config import LimitsConfig
from volagent.domain import names
from volagent.domain.params import (
    SnapshotCreateParams,
    SnapshotDeleteParams,
    SnapshotListParams,
    SnapshotRollbackParams,
    VolumeCreateParams,
    VolumeDeleteParams,
    VolumeGetParams,
    VolumeListParams,
    VolumeResizeParams,
    VolumeSetAccessParams,
    ZoneRestartParams,
    ZoneUpdateParams,
    check_limits,
)
from volagent.domain.wire import (
    Timestamp,
    Uuid,
    Version,
    WireModel,
    format_timestamp,
    is_none,
    problem_of,
)
from volagent.errors import (
    DeadlineExceeded,
    InvalidParameter,
    InvalidTask,
    UnknownTaskKind,
    WrongNode,
)

#: :func:`task_id_of` and :func:`task_kind_of` do not read messages larger than this.
PEEK_LIMIT_BYTES: Final = 16 * 1024 * 1024
#: What a kind read from a message that did not decode must look like to be echoed.
_KIND_RE: Final = re.compile(r"[a-z][a-z0-9_.]{0,63}")


class TaskBase(WireModel):
    """The envelope every task shares; a task's kind fixes the type of its ``params``."""

    # The protocol grows by optional fields: unknown envelope fields are ignored.
    model_config = ConfigDict(extra="ignore")

    v: Version
    id: Uuid
    kind: str
    cn: Uuid
    created: Timestamp
    deadline: Timestamp | None = Field(
        default=None,
        exclude_if=is_none,
        description="A task not started by then fails with DeadlineExceeded.",
    )

    def deadline_passed(self, now: datetime) -> bool:
        """Whether the deadline (if any) is before ``now`` (timezone-aware)."""
        return self.deadline is not None and now > self.deadline


class _Envelope(TaskBase):
    """The envelope alone, checked before the kind is looked at."""

    params: dict[str, Any]


class VolumeCreateTask(TaskBase):
    """A ``volume.create`` task."""

    kind: Literal["volume.create"]
    params: VolumeCreateParams


class VolumeDeleteTask(TaskBase):
    """A ``volume.delete`` task."""

    kind: Literal["volume.delete"]
    params: VolumeDeleteParams


class VolumeResizeTask(TaskBase):
    """A ``volume.resize`` task."""

    kind: Literal["volume.resize"]
    params: VolumeResizeParams


class VolumeGetTask(TaskBase):
    """A ``volume.get`` task."""

    kind: Literal["volume.get"]
    params: VolumeGetParams


class VolumeListTask(TaskBase):
    """A ``volume.list`` task."""

    kind: Literal["volume.list"]
    params: VolumeListParams


class VolumeSetAccessTask(TaskBase):
    """A ``volume.set_access`` task."""

    kind: Literal["volume.set_access"]
    params: VolumeSetAccessParams


class SnapshotCreateTask(TaskBase):
    """A ``snapshot.create`` task."""

    kind: Literal["snapshot.create"]
    params: SnapshotCreateParams


class SnapshotDeleteTask(TaskBase):
    """A ``snapshot.delete`` task."""

    kind: Literal["snapshot.delete"]
    params: SnapshotDeleteParams


class SnapshotListTask(TaskBase):
    """A ``snapshot.list`` task."""

    kind: Literal["snapshot.list"]
    params: SnapshotListParams


class SnapshotRollbackTask(TaskBase):
    """A ``snapshot.rollback`` task."""

    kind: Literal["snapshot.rollback"]
    params: SnapshotRollbackParams


class ZoneRestartTask(TaskBase):
    """A ``zone.restart`` task."""

    kind: Literal["zone.restart"]
    params: ZoneRestartParams


class ZoneUpdateTask(TaskBase):
    """A ``zone.update`` task."""

    kind: Literal["zone.update"]
    params: ZoneUpdateParams


AnyTask = (
    VolumeCreateTask
    | VolumeDeleteTask
    | VolumeResizeTask
    | VolumeGetTask
    | VolumeListTask
    | VolumeSetAccessTask
    | SnapshotCreateTask
    | SnapshotDeleteTask
    | SnapshotListTask
    | SnapshotRollbackTask
    | ZoneRestartTask
    | ZoneUpdateTask
)
#: A decoded task of any kind, told apart by ``kind`` (the JSON Schema's ``oneOf``).
Task = Annotated[AnyTask, Field(discriminator="kind")]

#: The task model of each kind, in the protocol's order.
TASK_TYPES: Final[Mapping[str, type[AnyTask]]] = {
    "volume.create": VolumeCreateTask,
    "volume.delete": VolumeDeleteTask,
    "volume.resize": VolumeResizeTask,
    "volume.get": VolumeGetTask,
    "volume.list": VolumeListTask,
    "volume.set_access": VolumeSetAccessTask,
    "snapshot.create": SnapshotCreateTask,
    "snapshot.delete": SnapshotDeleteTask,
    "snapshot.list": SnapshotListTask,
    "snapshot.rollback": SnapshotRollbackTask,
    "zone.restart": ZoneRestartTask,
    "zone.update": ZoneUpdateTask,
}
#: Every task kind this agent knows.
TASK_KINDS: Final = tuple(TASK_TYPES)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:100]!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _load(raw: bytes, limit: int) -> dict[str, Any]:
    """The message as a JSON object; InvalidTask when it is not one."""
    if len(raw) > limit:
        reason = f"the message has {len(raw)} bytes, more than {limit} (limits.max_task_bytes)"
        raise InvalidTask(f"invalid task: {reason}", details={"reason": reason})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 ({exc.reason} at byte {exc.start})"
        raise InvalidTask(f"invalid task: {reason}", details={"reason": reason}) from exc
    try:
        value = json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except RecursionError as exc:
        reason = "not JSON this agent reads: nested too deeply"
        raise InvalidTask(f"invalid task: {reason}", details={"reason": reason}) from exc
    except ValueError as exc:
        reason = f"not JSON: {str(exc)[:200]}"
        raise InvalidTask(f"invalid task: {reason}", details={"reason": reason}) from exc
    if not isinstance(value, dict):
        reason = "not a JSON object"
        raise InvalidTask(f"invalid task: {reason}", details={"reason": reason})
    return value


def decode_task(raw: bytes, *, cn: str, limits: LimitsConfig, now: datetime) -> Task:
    """Decode and check one task message for node ``cn`` (see the module docstring).

    ``now`` is timezone-aware; it is compared with the task's deadline.
    """
    obj = _load(raw, limits.max_task_bytes)
    try:
        envelope = _Envelope.model_validate(obj)
    except ValidationError as exc:
        field, reason = problem_of(exc.errors()[0])
        raise InvalidTask(
            f"invalid task field {field}: {reason}", details={"field": field, "reason": reason}
        ) from exc
    if envelope.cn != cn:
        raise WrongNode(
            f"task {envelope.id} is for node {envelope.cn}, not this node {cn}",
            details={"cn": envelope.cn},
        )
    task_type = TASK_TYPES.get(envelope.kind)
    if task_type is None:
        shown = envelope.kind[:100]
        raise UnknownTaskKind(f"unknown task kind {shown!r}", details={"kind": shown})
    try:
        task = task_type.model_validate(obj)
    except ValidationError as exc:
        parameter, reason = problem_of(exc.errors()[0], skip=1)
        raise InvalidParameter(
            f"invalid parameter {parameter}: {reason}",
            details={"parameter": parameter, "reason": reason},
        ) from exc
    check_limits(task.params, limits)
    if task.deadline_passed(now):
        deadline = format_timestamp(task.deadline) if task.deadline else ""
        raise DeadlineExceeded(
            f"task {task.id} was not started by its deadline {deadline}",
            details={"deadline": deadline},
        )
    return task


def _peek(raw: bytes) -> dict[str, Any] | None:
    """The message as a JSON object if it reads as one at all (leniently), else None."""
    try:
        if len(raw) > PEEK_LIMIT_BYTES:
            return None
        value = json.loads(bytes(raw).decode("utf-8", errors="replace"))
    except (ValueError, RecursionError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def task_id_of(raw: bytes) -> str | None:
    """The ``id`` of a message that did not decode, if it has a valid one; never raises."""
    value = (_peek(raw) or {}).get("id")
    if isinstance(value, str) and re.fullmatch(names.UUID_PATTERN, value):
        return value
    return None


def task_kind_of(raw: bytes) -> str:
    """The ``kind`` of a message that did not decode, or ``""``; never raises.

    A kind is echoed only when it looks like one (``[a-z][a-z0-9_.]{0,63}``).
    """
    value = (_peek(raw) or {}).get("kind")
    if isinstance(value, str) and _KIND_RE.fullmatch(value):
        return value
    return ""
