"""Typed errors of the ``zfs``/``zpool`` programs, told apart by their standard error.

Every failure of a ZFS command is a :class:`ZfsError` (a :class:`~volagent.errors.CommandError`
carrying argv, exit status and stderr). The ones the protocol has a word for are also that
protocol error: :class:`OutOfSpace` is an :class:`~volagent.errors.InsufficientSpace` and
:class:`ZfsUnavailable` a :class:`~volagent.errors.StorageUnavailable`, so the services can
catch either. :func:`classify` maps a failed command to the most specific class; the messages
matched are those of zfs-fuse 0.7, OpenZFS 2.x and illumos (see ``docs/storage.md``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from volagent.errors import CommandError, InsufficientSpace, StorageUnavailable


class ZfsError(CommandError):
    """A ``zfs`` or ``zpool`` command failed for a reason without a more specific class."""

    code: ClassVar[str] = "ZfsError"


class DatasetNotFound(ZfsError):
    """The dataset, snapshot, pool or hold tag does not exist."""

    code: ClassVar[str] = "DatasetNotFound"


class DatasetExists(ZfsError):
    """The dataset, snapshot or hold already exists (or a receive target may not be replaced)."""

    code: ClassVar[str] = "DatasetExists"


class DatasetBusy(ZfsError):
    """The dataset is in use (open files, a mount, a hold) and was not forced."""

    code: ClassVar[str] = "DatasetBusy"


class HasDependents(ZfsError):
    """Children, snapshots or clones depend on the dataset (destroy or rollback refused)."""

    code: ClassVar[str] = "HasDependents"


class QuotaExceeded(ZfsError):
    """A quota is in the way: usage exceeds the quota asked for, or a write would exceed one."""

    code: ClassVar[str] = "QuotaExceeded"


class IncrementalMismatch(ZfsError):
    """An incremental stream does not start at the target's latest snapshot."""

    code: ClassVar[str] = "IncrementalMismatch"


class TargetModified(ZfsError):
    """The receive target changed since its latest snapshot (receive without force)."""

    code: ClassVar[str] = "TargetModified"


class NewerSnapshotsExist(ZfsError):
    """A rollback target is not the latest snapshot and newer ones were not to be destroyed."""

    code: ClassVar[str] = "NewerSnapshotsExist"


class MountFailed(ZfsError):
    """A file system could not be mounted (its mountpoint cannot be made, or is not empty)."""

    code: ClassVar[str] = "MountFailed"


class UnsupportedOption(ZfsError):
    """An option or subcommand that was used is unknown to this ZFS."""

    code: ClassVar[str] = "UnsupportedOption"


class OutOfSpace(ZfsError, InsufficientSpace):
    """The pool (or a quota, which zfs-fuse reports the same way) has no room."""

    code: ClassVar[str] = "InsufficientSpace"


class ZfsUnavailable(ZfsError, StorageUnavailable):
    """ZFS does not answer: daemon or kernel module absent, pool suspended, or a timeout."""

    code: ClassVar[str] = "StorageUnavailable"
    retryable: bool = True


# Most specific first: a receive error mentions the dataset, and "does not exist" or
# "exists" must not win over the receive-specific reason.
_RULES: tuple[tuple[re.Pattern[str], type[ZfsError]], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), cls)
    for pattern, cls in (
        (
            (
                r"failed to initiali[sz]e (the )?(zfs|libzfs) library|zfs-fuse daemon is running"
                r"|modules are not loaded|pool i/o is currently suspended|unable to open /dev/zfs"
            ),
            ZfsUnavailable,
        ),
        (r"invalid option '|unrecognized command|pyzfs\.py not found", UnsupportedOption),
        (r"has been modified\s+since most recent snapshot", TargetModified),
        (
            (
                r"does not\s+match incremental source|not an earlier snapshot"
                r"|incremental source .* (is not|must be)"
            ),
            IncrementalMismatch,
        ),
        (r"more recent snapshots( or bookmarks)? exist", NewerSnapshotsExist),
        (
            r"has children|has dependent clones|clones of previous snapshots exist",
            HasDependents,
        ),
        (r"quota exceeded|less than current used or reserved space", QuotaExceeded),
        (r"out of space|no space left|greater than available space", OutOfSpace),
        (
            r"dataset is busy|target is busy|resource busy|pool or dataset is busy",
            DatasetBusy,
        ),
        (
            r"successfully created, but not mounted|cannot mount|failed to create mountpoint",
            MountFailed,
        ),
        (
            r"already exists|destination '[^']*' exists|destination has snapshots",
            DatasetExists,
        ),
        (
            r"does not exist|no such pool|no such tag|could not find any snapshots",
            DatasetNotFound,
        ),
    )
)


def classify(argv: Sequence[str], returncode: int | None, stderr: str) -> ZfsError:
    """The typed error for a ZFS command that exited ``returncode`` with ``stderr``."""
    cls: type[ZfsError] = ZfsError
    for pattern, candidate in _RULES:
        if pattern.search(stderr):
            cls = candidate
            break
    reason = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    if not reason:
        reason = f"exit status {returncode}"
        if returncode is not None and returncode < 0:
            reason = f"killed by signal {-returncode}"
    prog = argv[0].rsplit("/", 1)[-1] if argv else "zfs"
    verb = argv[1] if len(argv) > 1 else ""
    return cls(
        f"{prog} {verb} failed: {reason[:300]}",
        argv=argv,
        returncode=returncode,
        stderr=stderr,
    )


def unavailable(argv: Sequence[str], reason: str, *, stderr: str = "") -> ZfsUnavailable:
    """The error for a ZFS command that did not answer (timed out) or could not be run."""
    return ZfsUnavailable(reason, argv=argv, stderr=stderr)
