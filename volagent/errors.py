"""One error tree for the whole agent.

Every error the agent raises on purpose is a :class:`VolagentError`. Each class carries:

* ``code``: a stable identifier. Codes of the wire protocol (``docs/protocol.md``) are sent to
  the central side as they are; the others are internal and go on the wire as ``Internal``
  (see :attr:`VolagentError.wire_code`).
* ``retryable``: whether the same task may succeed if sent again later unchanged.
* ``exit_code``: the process exit status when this error ends a command-line run.

The tree::

    VolagentError (Internal)
    ├── ConfigError (ConfigInvalid)                 exit 78
    ├── StartupError (StartupFailed)                exit 3
    ├── TaskRejected                                input that is not a valid task
    │   ├── InvalidTask
    │   ├── UnknownTaskKind
    │   ├── WrongNode
    │   ├── InvalidParameter
    │   └── DeadlineExceeded
    ├── VolumeAlreadyExists
    ├── VolumeNotFound
    ├── VolumeInUse
    ├── VolumeSizeTooSmall
    ├── InsufficientSpace
    ├── SnapshotAlreadyExists
    ├── SnapshotNotFound
    ├── SnapshotLimitReached
    ├── SnapshotNotLatest
    ├── ZoneFailed
    ├── StorageUnavailable                          retryable
    ├── NetworkUnavailable
    ├── TaskTimedOut                                retryable; a task ran past its kind's limit
    └── CommandError (CommandFailed)                a subprocess went wrong (adapters/proc.py)
        ├── CommandNotFound
        └── CommandTimeout                          retryable

Adapters map third-party exceptions into this tree at their boundary, always with
``raise ... from exc``; nothing above the adapters sees a foreign exception type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_STARTUP: Final = 3
EXIT_CONFIG: Final = 78  # EX_CONFIG from sysexits.h

#: The error codes of protocol v1, in the order the protocol lists them.
WIRE_CODES: Final = frozenset(
    {
        "InvalidTask",
        "UnknownTaskKind",
        "WrongNode",
        "InvalidParameter",
        "DeadlineExceeded",
        "VolumeAlreadyExists",
        "VolumeNotFound",
        "VolumeInUse",
        "VolumeSizeTooSmall",
        "InsufficientSpace",
        "SnapshotAlreadyExists",
        "SnapshotNotFound",
        "SnapshotLimitReached",
        "SnapshotNotLatest",
        "ZoneFailed",
        "StorageUnavailable",
        "NetworkUnavailable",
        "Internal",
    }
)


class VolagentError(Exception):
    """Base of every error the agent raises on purpose."""

    code: ClassVar[str] = "Internal"
    retryable: bool = False
    exit_code: ClassVar[int] = EXIT_FAILURE

    def __init__(
        self,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        if retryable is not None:
            self.retryable = retryable

    @property
    def wire_code(self) -> str:
        """The code sent to the central side: our own code if the protocol knows it."""
        return self.code if self.code in WIRE_CODES else "Internal"

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` object of a failed task event."""
        details = dict(self.details)
        if self.wire_code != self.code:
            details.setdefault("cause", self.code)
        return {
            "code": self.wire_code,
            "message": self.message,
            "retryable": self.retryable,
            "details": details,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"


class ConfigError(VolagentError):
    """The configuration is invalid; ``problems`` lists ``(key, message)`` pairs."""

    code: ClassVar[str] = "ConfigInvalid"
    exit_code: ClassVar[int] = EXIT_CONFIG

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message, details={"problems": [list(p) for p in problems]})
        self.problems: list[tuple[str, str]] = list(problems)


class StartupError(VolagentError):
    """The daemon could not start (a dependency is missing or the state is unusable)."""

    code: ClassVar[str] = "StartupFailed"
    exit_code: ClassVar[int] = EXIT_STARTUP


class TaskRejected(VolagentError):
    """A message was refused before any work was done."""

    code: ClassVar[str] = "InvalidTask"


class InvalidTask(TaskRejected):
    """Not a valid task message (not JSON, not an object, missing fields, too large)."""

    code: ClassVar[str] = "InvalidTask"


class UnknownTaskKind(TaskRejected):
    """A task kind this agent does not know."""

    code: ClassVar[str] = "UnknownTaskKind"


class WrongNode(TaskRejected):
    """A task addressed to another compute node."""

    code: ClassVar[str] = "WrongNode"


class InvalidParameter(TaskRejected):
    """A task parameter (or a name that would reach a command line) is not valid."""

    code: ClassVar[str] = "InvalidParameter"


class DeadlineExceeded(TaskRejected):
    """The task was not started before its deadline."""

    code: ClassVar[str] = "DeadlineExceeded"


class VolumeAlreadyExists(VolagentError):
    """The uuid exists with another spec, or the name is taken for the owner."""

    code: ClassVar[str] = "VolumeAlreadyExists"


class VolumeNotFound(VolagentError):
    """No such volume on this node."""

    code: ClassVar[str] = "VolumeNotFound"


class VolumeInUse(VolagentError):
    """Clients are connected; ``details['clients']`` lists their IPs."""

    code: ClassVar[str] = "VolumeInUse"


class VolumeSizeTooSmall(VolagentError):
    """The volume holds more data than the requested size."""

    code: ClassVar[str] = "VolumeSizeTooSmall"


class InsufficientSpace(VolagentError):
    """The pool (or the volume's quota) has no room for the operation."""

    code: ClassVar[str] = "InsufficientSpace"


class SnapshotAlreadyExists(VolagentError):
    """A snapshot with this name exists on the volume."""

    code: ClassVar[str] = "SnapshotAlreadyExists"


class SnapshotNotFound(VolagentError):
    """No snapshot with this name on the volume."""

    code: ClassVar[str] = "SnapshotNotFound"


class SnapshotLimitReached(VolagentError):
    """The volume has as many snapshots as ``limits.max_snapshots_per_volume`` allows."""

    code: ClassVar[str] = "SnapshotLimitReached"


class SnapshotNotLatest(VolagentError):
    """Newer snapshots exist and the rollback did not ask to destroy them."""

    code: ClassVar[str] = "SnapshotNotLatest"


class ZoneFailed(VolagentError):
    """The volume's NFS server zone could not be brought up or keeps failing."""

    code: ClassVar[str] = "ZoneFailed"


class StorageUnavailable(VolagentError):
    """ZFS does not answer (daemon down, pool unavailable); worth retrying later."""

    code: ClassVar[str] = "StorageUnavailable"
    retryable: bool = True


class NetworkUnavailable(VolagentError):
    """The volume's network is not mapped to a bridge on this node, or the bridge is missing."""

    code: ClassVar[str] = "NetworkUnavailable"


class TaskTimedOut(VolagentError):
    """A task ran longer than its kind's time limit and was stopped."""

    code: ClassVar[str] = "TaskTimedOut"
    retryable: bool = True


class CommandError(VolagentError):
    """A subprocess failed. Carries argv, exit code and (capped) stderr."""

    code: ClassVar[str] = "CommandFailed"

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str],
        returncode: int | None = None,
        stderr: str = "",
        stdout: str = "",
        retryable: bool | None = None,
    ) -> None:
        super().__init__(
            message,
            details={"argv": list(argv), "returncode": returncode, "stderr": stderr},
            retryable=retryable,
        )
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout


class CommandNotFound(CommandError):
    """The program to run does not exist or is not executable."""

    code: ClassVar[str] = "CommandNotFound"


class CommandTimeout(CommandError):
    """The program did not finish in time and was killed."""

    code: ClassVar[str] = "CommandTimeout"
    retryable: bool = True


def all_error_classes() -> list[type[VolagentError]]:
    """Every class of the tree, base first (used by tests and the schema generator)."""
    seen: list[type[VolagentError]] = []
    stack: list[type[VolagentError]] = [VolagentError]
    while stack:
        cls = stack.pop(0)
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen
