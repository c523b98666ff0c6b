"""The Storage port over the ``zfs`` and ``zpool`` programs (OpenZFS, illumos, zfs-fuse).

Every call goes through :mod:`volagent.adapters.proc`. Exact values are read only with
``zfs get -H -p -o name,property,value,source``; the human-rounded ``zfs list`` output is never
parsed. What this ZFS can do is probed once (:meth:`ZfsCli.detect_capabilities`), without side
effects, by giving each option to its subcommand without arguments (or to a read-only call on
the pool) and reading the complaint: ``invalid option`` or ``unrecognized command`` means no.

User property values are stored so that any text reads back unchanged: non-empty printable
ASCII is kept as is, anything else (and anything starting with ``b64:``) as ``b64:`` plus its
UTF-8 bytes in base64. A stored value may be at most :data:`MAX_USER_VALUE_BYTES` long; a
longer one is refused with :class:`~volagent.errors.InvalidParameter` before any call.

Mutating calls hold a per-dataset :class:`asyncio.Lock`. Nothing is ever forced (no ``-f``):
a busy dataset is retried a few times, then reported as :class:`DatasetBusy`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import errno
import functools
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Final

import structlog

from volagent import aio
from volagent.adapters import proc
from volagent.adapters.zfs_errors import (
    DatasetBusy,
    DatasetExists,
    DatasetNotFound,
    MountFailed,
    UnsupportedOption,
    ZfsError,
    ZfsUnavailable,
    classify,
)
from volagent.domain.names import (
    PROPERTY_MODULE,
    validate_dataset_component,
    validate_dataset_name,
    validate_property_key,
    validate_property_name,
    validate_snapshot_fullname,
    validate_volume_uuid,
    volume_dataset_name,
)
from volagent.errors import CommandError, CommandTimeout, InvalidParameter
from volagent.ports.storage import (
    Capabilities,
    DatasetOptions,
    DatasetProperties,
    PoolInfo,
    ProgressCallback,
    ReceiveResult,
    SendStream,
    SnapshotInfo,
    VolumeDataset,
    VolumeScan,
)

_log = structlog.get_logger(__name__)

#: Longest stored user property value (``ZAP_MAXVALUELEN`` 8192 with its NUL; zfs-fuse aborts
#: with "Argument list too long" beyond it).
MAX_USER_VALUE_BYTES: Final = 8191
#: The user property written last when a volume's dataset is complete, and its value.
COMPLETE_PROPERTY: Final = f"{PROPERTY_MODULE}:complete"
COMPLETE_VALUE: Final = "yes"

_B64: Final = "b64:"
_CHUNK: Final = 256 * 1024
#: Detaches a dead zfs-fuse mount (see :meth:`ZfsCli.mount`).
UMOUNT: Final = "umount"
_GET: Final = ("get", "-H", "-p", "-o", "name,property,value,source")
_SNAPSHOT_PROPS: Final = ("type", "guid", "createtxg", "creation", "used", "userrefs")
_VOLUME_PROPS: Final = (
    "type",
    "used",
    "referenced",
    "available",
    "quota",
    "refquota",
    "mounted",
    "mountpoint",
    "readonly",
    "creation",
)
_NOT_SUPPORTED: Final = ("invalid option", "unrecognized command", "internal error")


def encode_user_value(value: str, *, param: str) -> str:
    """The stored form of a user property value (see the module docstring)."""
    if not isinstance(value, str):
        raise InvalidParameter(
            f"{param}: the value must be a string",
            details={"parameter": param, "reason": "must be a string"},
        )
    if value and value.isascii() and value.isprintable() and not value.startswith(_B64):
        stored = value
    else:
        stored = _B64 + base64.b64encode(value.encode()).decode("ascii")
    if len(stored) > MAX_USER_VALUE_BYTES:
        reason = f"stored value is {len(stored)} bytes, more than {MAX_USER_VALUE_BYTES}"
        raise InvalidParameter(f"{param}: {reason}", details={"parameter": param, "reason": reason})
    return stored


def decode_user_value(stored: str) -> str:
    """The value a stored user property stands for; a malformed ``b64:`` value is kept."""
    if not stored.startswith(_B64):
        return stored
    try:
        return base64.b64decode(stored[len(_B64) :], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return stored


def _native_value(prop: str, value: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        reason = "must be a non-empty string of printable characters"
        raise InvalidParameter(
            f"invalid value for {prop}: {value!r}", details={"parameter": prop, "reason": reason}
        )
    return value


def _assignment(prop: str, value: str) -> str:
    name = validate_property_name(prop)
    if ":" in name:
        return f"{name}={encode_user_value(value, param=name)}"
    return f"{name}={_native_value(name, value)}"


def _option_args(options: DatasetOptions | None) -> list[str]:
    """``-o prop=value`` arguments for a create or clone."""
    if options is None:
        return []
    values: dict[str, str] = {}
    for prop, size in (("quota", options.quota_bytes), ("refquota", options.refquota_bytes)):
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidParameter(
                    f"{prop} must be a byte count, not {size!r}",
                    details={"parameter": prop, "reason": "must be an integer >= 0"},
                )
            values[prop] = str(size) if size else "none"
    if options.mountpoint is not None:
        mp = options.mountpoint
        if mp not in ("none", "legacy") and (not mp.startswith("/") or "//" in mp):
            raise InvalidParameter(
                f"invalid mountpoint {mp!r}",
                details={"parameter": "mountpoint", "reason": "absolute path, none or legacy"},
            )
        values["mountpoint"] = mp
    for prop, flag in (("atime", options.atime), ("readonly", options.readonly)):
        if flag is not None:
            values[prop] = "on" if flag else "off"
    if options.canmount is not None:
        values["canmount"] = str(options.canmount)
    values.update(options.user)
    args: list[str] = []
    for prop, value in values.items():
        args += ["-o", _assignment(prop, value)]
    return args


def _parse_get(argv: Sequence[str], text: str) -> list[DatasetProperties]:
    """Parse ``zfs get -H -p -o name,property,value,source`` output, in the order given."""
    values: dict[str, dict[str, str]] = {}
    sources: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3 or "\t" not in parts[2]:
            raise ZfsError(f"unparsable zfs get output line: {line[:200]!r}", argv=argv)
        name, prop, rest = parts
        value, source = rest.rsplit("\t", 1)
        values.setdefault(name, {})
        sources.setdefault(name, {})[prop] = source
        if value == "-" and source == "-" and ":" in prop:
            continue  # an unset user property
        values[name][prop] = decode_user_value(value) if ":" in prop else value
    return [DatasetProperties(name, values[name], sources[name]) for name in values]


def _dead_mount(path: str) -> bool:
    """Whether ``path`` is a FUSE mount whose daemon is gone (ENOTCONN on any access).

    Asked with statfs, which always reaches the daemon: the kernel may answer a stat of the
    mount's root from its cache even when the daemon is gone.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _dataset_or_snapshot(name: str) -> str:
    if "@" in name:
        fs, _, snap = name.partition("@")
        return validate_snapshot_fullname(fs, snap, param="name")
    return validate_dataset_name(name, param="name")


def _epoch(value: str | None) -> datetime:
    return datetime.fromtimestamp(int(value or 0), tz=UTC)


class _KeyedLocks:
    """One :class:`asyncio.Lock` per dataset name, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, *names: str) -> AsyncIterator[None]:
        """Hold the locks of ``names``, taken in sorted order so that two holders never cross."""
        keys = sorted(set(names))
        for key in keys:
            self._users[key] = self._users.get(key, 0) + 1
            self._locks.setdefault(key, asyncio.Lock())
        taken: list[str] = []
        try:
            for key in keys:
                await self._locks[key].acquire()
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                self._locks[key].release()
            for key in keys:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key], self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class _CliSendStream:
    """The stdout of a running ``zfs send``; a failed send raises its typed error at the end."""

    def __init__(self, process: proc.Process, timeout: float) -> None:
        if process.stdout is None:  # spawn was asked for a pipe: never the case
            msg = "zfs send has no stdout pipe"
            raise ZfsError(msg, argv=process.argv)
        self._process = process
        self._stdout = process.stdout
        self._timeout = timeout
        self._sent = 0
        self._done = False

    @property
    def bytes_sent(self) -> int:
        """Bytes yielded so far."""
        return self._sent

    def __aiter__(self) -> _CliSendStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout(self._timeout):
                chunk = await self._stdout.read(_CHUNK)
        except TimeoutError as exc:
            self._done = True
            await self._process.kill()
            raise ZfsUnavailable(
                f"zfs send produced nothing for {self._timeout:g} s",
                argv=self._process.argv,
                stderr=self._process.stderr_text,
            ) from exc
        if chunk:
            self._sent += len(chunk)
            return chunk
        self._done = True
        try:
            done = await self._process.wait(timeout=self._timeout, check=False)
        except CommandTimeout as exc:
            raise ZfsUnavailable(str(exc), argv=exc.argv, stderr=exc.stderr) from exc
        if done.returncode != 0:
            raise classify(done.argv, done.returncode, done.stderr)
        raise StopAsyncIteration


#: The rows of a volume dataset and its snapshots (None: no such dataset), and those of a
#: batch of volume reads by dataset (an error for a dataset alone).
_VolumeRows = list[DatasetProperties] | None
_VolumeReadAnswers = dict[str, _VolumeRows | Exception]

#: ``zfs get`` commands reading volumes at once; more reads wait and then go together.
VOLUME_READS_PARALLEL: Final = 1
#: Datasets named in one such command, at most.
VOLUME_READS_BATCH: Final = 32


class ZfsCli:
    """The :class:`~volagent.ports.storage.Storage` port over the ``zfs``/``zpool`` programs.

    ``capabilities`` given here are used as they are instead of being detected (operators
    can switch a feature off; tests can pretend one is there).
    """

    def __init__(
        self,
        *,
        zfs_bin: str = "zfs",
        zpool_bin: str = "zpool",
        command_timeout_s: float = 60.0,
        capabilities: Capabilities | None = None,
        busy_retries: int = 10,
        busy_retry_delay_s: float = 0.075,
    ) -> None:
        self._zfs_bin = zfs_bin
        self._zpool_bin = zpool_bin
        self._timeout = command_timeout_s
        self._caps = capabilities or Capabilities()
        self._caps_given = capabilities is not None
        if busy_retries < 1:
            msg = f"busy_retries must be at least 1, not {busy_retries}"
            raise ValueError(msg)
        self._busy_retries = busy_retries
        self._busy_delay = busy_retry_delay_s
        self._locks = _KeyedLocks()
        #: Volume reads joined into one ``zfs get`` under load, per property list.
        self._volume_reads: dict[str, aio.Batcher[str, _VolumeRows]] = {}

    # ------------------------------------------------------------------ plumbing

    async def _run(
        self, program: str, args: Sequence[str], *, check: bool = True
    ) -> proc.Completed:
        """Run one command; map its failure to a typed error."""
        argv = [program, *args]
        try:
            return await proc.run(argv, timeout=self._timeout, check=check)
        except CommandTimeout as exc:
            raise ZfsUnavailable(
                f"{program} did not answer within {self._timeout:g} s",
                argv=argv,
                stderr=exc.stderr,
            ) from exc
        except CommandError as exc:
            if type(exc) is not CommandError:
                raise  # CommandNotFound: the program is missing, not failing
            raise classify(argv, exc.returncode, exc.stderr) from exc

    async def _zfs(self, *args: str) -> proc.Completed:
        return await self._run(self._zfs_bin, args)

    async def _get(self, args: Sequence[str]) -> list[DatasetProperties]:
        done = await self._zfs(*_GET, *args)
        return _parse_get(done.argv, done.text)

    # ------------------------------------------------------------------ capabilities

    @property
    def capabilities(self) -> Capabilities:
        """What was detected (all False before :meth:`detect_capabilities`)."""
        return self._caps

    async def detect_capabilities(self, pool: str) -> Capabilities:
        """Probe every feature once, concurrently and without side effects."""
        validate_dataset_name(pool, param="pool")
        if self._caps_given:
            return self._caps
        zfs, zpool = self._zfs_bin, self._zpool_bin
        probes = {
            "parsable_list": self._probe_runs(zfs, ["list", "-H", "-p", "-o", "name", pool]),
            "bookmarks": self._probe_usage(zfs, ["bookmark"]),
            "resumable_streams": self._probe_usage(zfs, ["receive", "-s"]),
            "send_estimate": self._probe_usage(zfs, ["send", "-n", "-P"]),
            "compressed_send": self._probe_usage(zfs, ["send", "-c"]),
            "raw_send": self._probe_usage(zfs, ["send", "-w"]),
            "hold_listing": self._probe_usage(zfs, ["holds"]),
            # All assignments and no dataset: a multi-property set asks for a dataset; an old
            # zfs takes the second assignment for a dataset name and rejects it.
            "multi_property_set": self._probe_usage(
                zfs, ["set", f"{COMPLETE_PROPERTY}=probe", f"{COMPLETE_PROPERTY}=probe"]
            ),
            "parsable_pool_get": self._probe_runs(
                zpool, ["get", "-H", "-p", "-o", "value", "health", pool]
            ),
            "parsable_pool_list": self._probe_runs(zpool, ["list", "-H", "-p", "-o", "name", pool]),
        }
        answers = await asyncio.gather(*probes.values())
        self._caps = Capabilities(**dict(zip(probes, answers, strict=True)))
        _log.info("zfs_capabilities", pool=pool, **self._caps.as_dict())
        return self._caps

    async def _probe(self, program: str, args: Sequence[str]) -> proc.Completed:
        done = await self._run(program, args, check=False)
        if done.returncode != 0:
            error = classify(done.argv, done.returncode, done.stderr)
            if isinstance(error, ZfsUnavailable | DatasetNotFound):
                raise error
        return done

    async def _probe_runs(self, program: str, args: Sequence[str]) -> bool:
        """A read-only call: supported when it succeeds."""
        return (await self._probe(program, args)).returncode == 0

    async def _probe_usage(self, program: str, args: Sequence[str]) -> bool:
        """Options without arguments: supported when the complaint is about arguments."""
        done = await self._probe(program, args)
        stderr = done.stderr.lower()
        if any(marker in stderr for marker in _NOT_SUPPORTED):
            return False
        return done.returncode != 0 and "usage" in stderr

    # ------------------------------------------------------------------ pools

    async def pool_info(self, pool: str) -> PoolInfo:
        """Space from the pool's root dataset (exact everywhere) and health from ``zpool``."""
        validate_dataset_name(pool, param="pool")
        if "/" in pool:
            raise InvalidParameter(
                f"not a pool name: {pool!r}", details={"parameter": "pool", "reason": "has '/'"}
            )
        (props,), health = await aio.both(
            self._get(["used,available", pool]),
            self._run(self._zpool_bin, ["list", "-H", "-o", "health", pool]),
        )
        used, available = props.get_int("used") or 0, props.get_int("available") or 0
        return PoolInfo(pool, used + available, available, health.text.strip())

    # ------------------------------------------------------------------ file systems

    async def create_dataset(
        self, name: str, options: DatasetOptions | None = None, *, exist_ok: bool = False
    ) -> bool:
        """Create file system ``name``; a create whose mount fails is undone and raises."""
        validate_dataset_name(name)
        args = _option_args(options)
        async with self._locks.hold(name):
            try:
                await self._zfs("create", *args, name)
            except MountFailed as exc:
                if "successfully created" in exc.stderr:
                    with suppress(ZfsError):
                        await self._destroy_locked(name, recursive=False)
                raise
            except DatasetExists:
                if exist_ok:
                    return False
                raise
        return True

    async def destroy_dataset(
        self, name: str, *, recursive: bool = False, missing_ok: bool = False
    ) -> bool:
        """Unmount and destroy; retried while busy, never forced; remounted if it stays busy."""
        validate_dataset_name(name)
        async with self._locks.hold(name):
            try:
                await self._destroy_locked(name, recursive=recursive)
            except DatasetNotFound:
                if missing_ok:
                    return False
                raise
        return True

    async def _destroy_locked(self, name: str, *, recursive: bool) -> None:
        depth = ["-r"] if recursive else []
        mounted = await self._mounted(name, recursive=recursive)
        await self._while_unmounted(name, mounted, ["destroy", *depth, name])

    async def _mounted(self, name: str, *, recursive: bool) -> list[str]:
        """The mounted file systems of ``name`` (and under it), deepest first."""
        found = await self._get([*(["-r"] if recursive else []), "type,mounted", name])
        return sorted(
            (p.name for p in found if p.get("type") == "filesystem" and p.get_bool("mounted")),
            key=lambda n: n.count("/"),
            reverse=True,
        )

    async def _while_unmounted(
        self, name: str, mounted: Sequence[str], args: Sequence[str]
    ) -> None:
        """Unmount ``mounted`` (deepest first), then run ``zfs args``; retry while busy.

        If it stays busy, what was unmounted is mounted again (so that no writes land in the
        parent's directory) and the last :class:`DatasetBusy` is raised.
        """
        unmounted: list[str] = []
        for attempt in range(1, self._busy_retries + 1):
            try:
                for fs in mounted:
                    if fs not in unmounted:
                        await self._unmount(fs)
                        unmounted.append(fs)
                await self._zfs(*args)
            except DatasetBusy:
                if attempt < self._busy_retries:
                    await asyncio.sleep(self._busy_delay)
                    continue
                for fs in reversed(unmounted):
                    with suppress(ZfsError):
                        await self._mount(fs)
                _log.warning("zfs_busy", dataset=name, command=args[0], attempts=attempt)
                raise
            return

    async def exists(self, name: str) -> bool:
        """Whether the dataset or ``fs@snap`` exists."""
        target = _dataset_or_snapshot(name)
        try:
            await self._get(["type", target])
        except DatasetNotFound:
            return False
        return True

    async def get_properties(self, name: str, props: Sequence[str]) -> DatasetProperties:
        """Exact values of ``props`` of one dataset (or ``fs@snap``)."""
        target = _dataset_or_snapshot(name)
        wanted = [validate_property_name(p) for p in props]
        if not wanted:
            msg = "no property asked for"
            raise InvalidParameter(msg, details={"parameter": "props"})
        (found,) = await self._get([",".join(wanted), target])
        return found

    async def set_properties(self, name: str, values: Mapping[str, str]) -> None:
        """Set properties; in one call where this ZFS can, else one call per property."""
        validate_dataset_name(name)
        assignments = [_assignment(prop, value) for prop, value in values.items()]
        if not assignments:
            return
        async with self._locks.hold(name):
            await self._set_locked(name, assignments)

    async def _set_locked(self, name: str, assignments: Sequence[str]) -> None:
        if self._caps.multi_property_set:
            await self._zfs("set", *assignments, name)
            return
        for assignment in assignments:
            await self._zfs("set", assignment, name)

    async def inherit_property(self, name: str, prop: str) -> None:
        """Clear a local value (a user property then disappears unless a parent has it)."""
        validate_dataset_name(name)
        validate_property_name(prop)
        async with self._locks.hold(name):
            await self._zfs("inherit", prop, name)

    async def list_datasets(
        self, root: str, props: Sequence[str], *, depth: int | None = None
    ) -> list[DatasetProperties]:
        """``root`` and file systems under it with ``props`` (and ``type``), in one call."""
        validate_dataset_name(root, param="root")
        wanted = ["type", *(validate_property_name(p) for p in props if p != "type")]
        if depth is not None and (isinstance(depth, bool) or depth < 0):
            raise InvalidParameter(f"invalid depth {depth!r}", details={"parameter": "depth"})
        scope = ["-r"] if depth is None else ["-d", str(depth)]
        found = await self._get([*scope, ",".join(wanted), root])
        return [p for p in found if p.get("type") != "snapshot"]

    async def rename_dataset(self, name: str, new_name: str) -> None:
        """Rename a file system within its pool: unmounted first, mounted again after."""
        validate_dataset_name(name)
        validate_dataset_name(new_name, param="new_name")
        async with self._locks.hold(name, new_name):
            mounted = await self._mounted(name, recursive=True)
            await self._while_unmounted(name, mounted, ["rename", name, new_name])
            for fs in reversed(mounted):
                await self._mount(new_name + fs[len(name) :])

    async def mount(self, name: str) -> None:
        """Mount ``name`` unless it is mounted already.

        A mount a dead zfs-fuse daemon left behind (ZFS lists it as mounted, since it reads
        the mount table, but every access fails with ENOTCONN) is detached first with
        ``umount -l``, and the dataset mounted afresh.
        """
        validate_dataset_name(name)
        async with self._locks.hold(name):
            try:
                await self._zfs("mount", name)
            except MountFailed as exc:
                if "already mounted" not in exc.stderr:
                    raise
                mountpoint = await self._dead_mountpoint(name)  # only then: not on every mount
                if mountpoint is None:
                    return
                _log.warning("detaching a dead mount", dataset=name, mountpoint=mountpoint)
                await self._run(UMOUNT, ["-l", mountpoint])
                await self._mount(name)

    async def mount_dead(self, name: str) -> bool:
        """Whether ``name`` is listed as mounted but every access fails with ENOTCONN.

        That is what a zfs-fuse daemon that died leaves of its mounts, even once it runs
        again (it reads the mount table to say what is mounted).
        """
        validate_dataset_name(name)
        return await self._dead_mountpoint(name) is not None

    async def _dead_mountpoint(self, name: str) -> str | None:
        props = (await self._get(["mounted,mountpoint", name]))[0]
        mountpoint = props.get("mountpoint") or ""
        if not props.get_bool("mounted") or not mountpoint.startswith("/"):
            return None
        return mountpoint if await asyncio.to_thread(_dead_mount, mountpoint) else None

    async def _mount(self, name: str) -> None:
        try:
            await self._zfs("mount", name)
        except MountFailed as exc:
            if "already mounted" not in exc.stderr:
                raise

    async def unmount(self, name: str) -> None:
        """Unmount ``name`` (never forced) unless it is not mounted."""
        validate_dataset_name(name)
        async with self._locks.hold(name):
            await self._unmount(name)

    async def _unmount(self, name: str) -> None:
        try:
            await self._zfs("unmount", name)
        except ZfsError as exc:
            if "not currently mounted" not in exc.stderr:
                raise

    # ------------------------------------------------------------------ snapshots

    async def create_snapshot(self, dataset: str, snapshot: str) -> None:
        """Snapshot ``dataset``."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        async with self._locks.hold(dataset):
            await self._zfs("snapshot", full)

    async def destroy_snapshot(
        self, dataset: str, snapshot: str, *, missing_ok: bool = False
    ) -> bool:
        """Destroy one snapshot, retried while busy; False if absent and ``missing_ok``."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        async with self._locks.hold(dataset):
            try:
                await self._while_unmounted(full, [], ["destroy", full])
            except DatasetNotFound:
                if missing_ok:
                    return False
                raise
        return True

    async def rollback(self, dataset: str, snapshot: str, *, destroy_newer: bool = False) -> None:
        """Roll back to ``snapshot``; with ``destroy_newer``, newer snapshots are destroyed."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        async with self._locks.hold(dataset):
            await self._zfs("rollback", *(["-r"] if destroy_newer else []), full)

    async def list_snapshots(self, dataset: str) -> list[SnapshotInfo]:
        """Snapshots of ``dataset`` itself, oldest first (by createtxg), in one call."""
        validate_dataset_name(dataset)
        return _snapshots(dataset, await self._get(["-d", "1", ",".join(_SNAPSHOT_PROPS), dataset]))

    async def hold(self, dataset: str, snapshot: str, tag: str) -> None:
        """Put the user hold ``tag`` on ``dataset@snapshot``."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        validate_dataset_component(tag, param="tag")
        async with self._locks.hold(dataset):
            await self._zfs("hold", tag, full)

    async def release(self, dataset: str, snapshot: str, tag: str) -> None:
        """Release the user hold ``tag``."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        validate_dataset_component(tag, param="tag")
        async with self._locks.hold(dataset):
            await self._zfs("release", tag, full)

    async def clone(
        self, dataset: str, snapshot: str, target: str, options: DatasetOptions | None = None
    ) -> None:
        """Create ``target`` as a clone of ``dataset@snapshot``."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        validate_dataset_name(target, param="target")
        args = _option_args(options)
        async with self._locks.hold(dataset, target):
            await self._zfs("clone", *args, full, target)

    async def promote(self, name: str) -> None:
        """Make clone ``name`` independent of its origin."""
        validate_dataset_name(name)
        async with self._locks.hold(name):
            await self._zfs("promote", name)

    # ------------------------------------------------------------------ streams

    def send(
        self,
        dataset: str,
        snapshot: str,
        *,
        base: str | None = None,
        intermediates: bool = False,
        properties: bool = False,
        compressed: bool = False,
    ) -> AbstractAsyncContextManager[SendStream]:
        """Stream ``dataset@snapshot`` (incremental from ``base`` when given)."""
        full = validate_snapshot_fullname(dataset, snapshot, param="snapshot")
        argv = [self._zfs_bin, "send"]
        if properties:
            argv.append("-p")
        if compressed:
            argv.append("-c")
        if base is not None:
            validate_snapshot_fullname(dataset, base, param="base")
            argv += ["-I" if intermediates else "-i", f"{dataset}@{base}"]
        elif intermediates:
            msg = "intermediates needs a base snapshot"
            raise InvalidParameter(msg, details={"parameter": "intermediates"})
        argv.append(full)
        if compressed and not self._caps.compressed_send:
            msg = "this zfs cannot send compressed streams"
            raise UnsupportedOption(msg, argv=argv)
        return self._send(argv)

    @asynccontextmanager
    async def _send(self, argv: Sequence[str]) -> AsyncIterator[SendStream]:
        async with proc.spawn(argv, stdin=proc.DEVNULL) as process:
            yield _CliSendStream(process, self._timeout)

    async def receive(
        self,
        target: str,
        stream: AsyncIterable[bytes],
        *,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> ReceiveResult:
        """Receive into ``target`` with ``-u`` (left unmounted); ``force`` adds ``-F``.

        When the stream fails, the receiver gets end-of-file, abandons the partial receive
        and the stream's error is raised (unless zfs had already accepted the complete stream:
        then the receive stands). When the receiver fails, its typed error is raised.
        """
        validate_dataset_name(target, param="target")
        argv = [self._zfs_bin, "receive", "-u", *(["-F"] if force else []), target]
        started = time.monotonic()
        async with (
            self._locks.hold(target),
            proc.spawn(argv, stdout=proc.DEVNULL) as process,
        ):
            stdin = process.stdin
            if stdin is None:  # spawn was asked for a pipe: never the case
                msg = "zfs receive has no stdin pipe"
                raise ZfsError(msg, argv=argv)
            try:
                received, source_error = await _feed(stdin, stream, self._timeout, on_progress)
            except TimeoutError as exc:
                raise ZfsUnavailable(
                    f"zfs receive took no data for {self._timeout:g} s",
                    argv=argv,
                    stderr=process.stderr_text,
                ) from exc
            stdin.close()
            try:
                done = await process.wait(timeout=self._timeout, check=False)
            except CommandTimeout as exc:
                raise ZfsUnavailable(str(exc), argv=argv, stderr=exc.stderr) from exc
        if done.returncode != 0:
            if source_error is not None:
                _log.warning(
                    "zfs_receive_source_failed",
                    target=target,
                    bytes=received,
                    receiver_stderr=done.stderr[-500:],
                )
                raise source_error
            raise classify(argv, done.returncode, done.stderr)
        if source_error is not None:
            # zfs accepted a complete, checksummed stream: the data is there. (On zfs-fuse the
            # daemon, not the killed ``zfs send`` client, writes the stream, so this happens.)
            _log.warning(
                "zfs_receive_complete_despite_source_error",
                target=target,
                bytes=received,
                error=repr(source_error),
            )
        return ReceiveResult(target, received, time.monotonic() - started)

    # ------------------------------------------------------------------ volume datasets

    async def create_volume(
        self, root: str, uuid: str, spec: Mapping[str, str], options: DatasetOptions
    ) -> VolumeDataset:
        """Create ``<root>/<uuid>`` with spec and options in one call, then the marker."""
        name = volume_dataset_name(root, uuid)
        user = dict(options.user)
        user.update(_spec_properties(spec))
        await self.create_dataset(name, dataclasses.replace(options, user=user))
        await self.complete_volume(root, uuid)
        found = await self.get_volume(root, uuid, spec.keys())
        if found is None:
            raise DatasetNotFound(f"{name} vanished after its creation", argv=[self._zfs_bin])
        return found

    async def complete_volume(self, root: str, uuid: str) -> None:
        """Write the completion marker."""
        name = volume_dataset_name(root, uuid)
        await self.set_properties(name, {COMPLETE_PROPERTY: COMPLETE_VALUE})

    async def update_volume_spec(self, root: str, uuid: str, changes: Mapping[str, str]) -> None:
        """Set changed spec keys."""
        await self.set_properties(volume_dataset_name(root, uuid), _spec_properties(changes))

    async def get_volume(
        self, root: str, uuid: str, spec_keys: Collection[str]
    ) -> VolumeDataset | None:
        """One volume dataset, or None when absent."""
        name = volume_dataset_name(root, uuid)
        try:
            (found,) = await self._get([volume_properties(spec_keys), name])
        except DatasetNotFound:
            return None
        return _volume(found, uuid, spec_keys)

    async def get_volume_and_snapshots(
        self, root: str, uuid: str, spec_keys: Collection[str]
    ) -> tuple[VolumeDataset, list[SnapshotInfo]] | None:
        """One volume dataset and its snapshots, oldest first, from a ``zfs get -d 1``.

        Concurrent reads of volumes are joined: while :data:`VOLUME_READS_PARALLEL` such
        commands run, the reads asked meanwhile wait and then go in one command (it names
        several datasets). Each read still comes from a command started after it was asked.
        """
        name = volume_dataset_name(root, uuid)
        props = volume_and_snapshot_properties(spec_keys)
        reads = self._volume_reads.get(props)
        if reads is None:
            reads = self._volume_reads[props] = aio.Batcher(
                functools.partial(self._read_volumes, props),
                parallel=VOLUME_READS_PARALLEL,
                max_batch=VOLUME_READS_BATCH,
                name="zfs-volume-reads",
            )
        found = await reads.get(name)
        if found is None:
            return None
        volume = next((p for p in found if p.name == name), None)
        if volume is None:
            return None
        return _volume(volume, uuid, spec_keys), _snapshots(name, found)

    async def _read_volumes(self, props: str, names: list[str]) -> _VolumeReadAnswers:
        """The ``zfs get -d 1`` rows of each dataset (None: it does not exist)."""
        if len(names) > 1:
            try:
                found = await self._get(["-d", "1", props, *names])
            except DatasetNotFound:
                pass  # one of them is gone: each is read on its own below, for its own answer
            else:
                rows: _VolumeReadAnswers = {n: [] for n in names}
                for p in found:
                    rows_of = rows.get(p.name.partition("@")[0])
                    if isinstance(rows_of, list):
                        rows_of.append(p)
                return rows
        outcomes = await asyncio.gather(
            *(self._read_volume(props, n) for n in names), return_exceptions=True
        )
        answers: _VolumeReadAnswers = {}
        for n, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            answers[n] = outcome
        return answers

    async def _read_volume(self, props: str, name: str) -> _VolumeRows:
        try:
            return await self._get(["-d", "1", props, name])
        except DatasetNotFound:
            return None

    async def list_volumes(self, root: str, spec_keys: Collection[str]) -> list[VolumeDataset]:
        """Every ``<root>/<uuid>`` file system with its spec, in one ``zfs get``."""
        return (await self.scan_volumes(root, spec_keys)).volumes

    async def scan_volumes(self, root: str, spec_keys: Collection[str]) -> VolumeScan:
        """The ``<root>/<uuid>`` file systems and the other children, in one ``zfs get``."""
        validate_dataset_name(root, param="root")
        found = await self._get(["-d", "1", volume_properties(spec_keys), root])
        volumes, others = [], []
        for props in found:
            parent, _, child = props.name.rpartition("/")
            kind = props.get("type")
            if parent != root or kind == "snapshot":
                continue
            try:
                uuid = validate_volume_uuid(child)
            except InvalidParameter:
                uuid = None
            if uuid is None or kind != "filesystem":
                _log.debug("zfs_not_a_volume", dataset=props.name)
                others.append(props.name)
                continue
            volumes.append(_volume(props, uuid, spec_keys))
        return VolumeScan(volumes, sorted(others))


async def _feed(
    stdin: asyncio.StreamWriter,
    stream: AsyncIterable[bytes],
    idle_s: float,
    on_progress: ProgressCallback | None,
) -> tuple[int, Exception | None]:
    """Copy ``stream`` into a receiver's stdin; return the bytes written and the source's error.

    Stops quietly when the receiver goes away (its exit status tells why). Raises TimeoutError
    when the receiver takes nothing for ``idle_s`` seconds.
    """
    chunks = aiter(stream)
    received = 0
    try:
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return received, None
            except Exception as exc:  # noqa: BLE001  # raised by the caller once the receiver is done
                return received, exc
            try:
                stdin.write(chunk)
                async with asyncio.timeout(idle_s):
                    await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                return received, None
            received += len(chunk)
            if on_progress is not None:
                on_progress(received)
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _spec_properties(spec: Mapping[str, str]) -> dict[str, str]:
    props = {}
    for key, value in spec.items():
        validate_property_key(key, param="spec key")
        prop = f"{PROPERTY_MODULE}:{key}"
        if prop == COMPLETE_PROPERTY:
            msg = "the spec key 'complete' is reserved for the completion marker"
            raise InvalidParameter(
                msg,
                details={"parameter": "spec key", "reason": "reserved"},
            )
        props[prop] = value
    return props


def volume_properties(spec_keys: Collection[str]) -> str:
    """The comma-separated properties one read of volume datasets asks for."""
    keys = [f"{PROPERTY_MODULE}:{validate_property_key(k, param='spec key')}" for k in spec_keys]
    return ",".join([*_VOLUME_PROPS, COMPLETE_PROPERTY, *keys])


def volume_and_snapshot_properties(spec_keys: Collection[str]) -> str:
    """What one read of a volume dataset with its snapshots asks for (``zfs get -d 1``)."""
    return ",".join(dict.fromkeys([*volume_properties(spec_keys).split(","), *_SNAPSHOT_PROPS]))


def _snapshots(dataset: str, found: Sequence[DatasetProperties]) -> list[SnapshotInfo]:
    """The snapshots of ``dataset`` itself in a ``zfs get -d 1`` of it, oldest first."""
    snaps = [
        SnapshotInfo(
            dataset=dataset,
            name=p.name.partition("@")[2],
            guid=p.get_int("guid") or 0,
            createtxg=p.get_int("createtxg") or 0,
            created=_epoch(p.get("creation")),
            used_bytes=p.get_int("used") or 0,
            holds=p.get_int("userrefs") or 0,
        )
        for p in found
        if p.get("type") == "snapshot" and p.name.startswith(f"{dataset}@")
    ]
    return sorted(snaps, key=lambda s: s.createtxg)


def _volume(props: DatasetProperties, uuid: str, spec_keys: Collection[str]) -> VolumeDataset:
    spec = {
        key: value
        for key in spec_keys
        if props.is_local(prop := f"{PROPERTY_MODULE}:{key}")
        and (value := props.get(prop)) is not None
    }
    mountpoint = props.get("mountpoint")
    return VolumeDataset(
        uuid=uuid,
        dataset=props.name,
        spec=spec,
        complete=props.is_local(COMPLETE_PROPERTY) and props.get(COMPLETE_PROPERTY) == "yes",
        used_bytes=props.get_int("used") or 0,
        referenced_bytes=props.get_int("referenced") or 0,
        available_bytes=props.get_int("available") or 0,
        quota_bytes=props.get_int("quota") or None,
        refquota_bytes=props.get_int("refquota") or None,
        mounted=props.get_bool("mounted") is True,
        mountpoint=None if mountpoint in (None, "none", "legacy", "-") else mountpoint,
        readonly=props.get_bool("readonly") is True,
        created=_epoch(props.get("creation")),
    )
