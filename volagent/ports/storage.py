"""The Storage port: what services may ask of the dataset store, whatever drives it.

The services talk to ZFS only through :class:`Storage`. The complete backend drives the
``zfs``/``zpool`` programs (``volagent.adapters.zfs``); a backend over libzfs_core can
implement the same protocol later. Nothing here names a program, an option or an output
format: values are typed, names are ZFS names (``pool/a/b``, a snapshot is a dataset plus a
snapshot name), and failures are the errors of ``volagent.errors`` (a backend's own errors
subclass them).

Volume datasets: each volume lives in ``<root>/<volume uuid>``; its spec is a flat mapping of
lowercase keys to strings, kept as the user properties ``volagent:<key>``, and a completion
marker written last tells a finished volume from a half-created one.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

#: Property values a backend reports for "no value" (an unset quota is ``0`` or ``none``).
_NO_VALUE = frozenset({"-", "none", ""})


class CanMount(StrEnum):
    """Whether a file system may be mounted (``noauto``: only when asked explicitly)."""

    ON = "on"
    OFF = "off"
    NOAUTO = "noauto"


@dataclass(frozen=True, slots=True)
class DatasetOptions:
    """Properties to give a file system when it is created; ``None`` leaves the default.

    ``quota_bytes``/``refquota_bytes`` of 0 mean no quota. ``mountpoint`` is an absolute path,
    or ``"none"``/``"legacy"``. ``user`` maps user property names (``module:key``, lowercase)
    to values of any text; a backend stores them so that they read back unchanged.
    """

    quota_bytes: int | None = None
    refquota_bytes: int | None = None
    mountpoint: str | None = None
    atime: bool | None = None
    canmount: CanMount | None = None
    readonly: bool | None = None
    user: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DatasetProperties:
    """Exact property values of one dataset, as text (sizes in bytes, times in epoch seconds).

    ``values`` holds every property that has a value (an unset user property is absent);
    ``sources`` says where each came from (``local``, ``default``, ``inherited from <ds>``,
    ``received``, ``-``).
    """

    name: str
    values: Mapping[str, str]
    sources: Mapping[str, str]

    def get(self, prop: str) -> str | None:
        """The value of ``prop``, or None when it has none."""
        return self.values.get(prop)

    def get_int(self, prop: str) -> int | None:
        """The value of ``prop`` as an integer; None when unset, ``-`` or ``none``."""
        value = self.values.get(prop)
        return None if value is None or value in _NO_VALUE else int(value)

    def get_bool(self, prop: str) -> bool | None:
        """``on``/``yes`` as True, ``off``/``no`` as False, None when unset."""
        value = self.values.get(prop)
        if value in ("on", "yes"):
            return True
        if value in ("off", "no"):
            return False
        return None

    def is_local(self, prop: str) -> bool:
        """Whether ``prop`` is set on this dataset itself (locally or by a receive)."""
        return self.sources.get(prop) in ("local", "received")


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot of a file system. ``holds`` counts user holds (``userrefs``)."""

    dataset: str
    name: str
    guid: int
    createtxg: int
    created: datetime
    used_bytes: int
    holds: int

    @property
    def fullname(self) -> str:
        """``dataset@name``."""
        return f"{self.dataset}@{self.name}"


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """Space usable by datasets of the pool (after ZFS's own reserve) and the pool's health."""

    name: str
    size_bytes: int
    free_bytes: int
    health: str

    @property
    def healthy(self) -> bool:
        """Whether the pool reports ``ONLINE``."""
        return self.health == "ONLINE"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this ZFS can do, detected once at start-up; never assumed."""

    #: exact numbers from the list command (``zfs list -p``)
    parsable_list: bool = False
    #: bookmarks (``zfs bookmark``)
    bookmarks: bool = False
    #: resumable receive and send (``receive -s``, ``send -t``)
    resumable_streams: bool = False
    #: stream size estimates before sending (``send -n -P``)
    send_estimate: bool = False
    #: compressed streams (``send -c``)
    compressed_send: bool = False
    #: raw (still encrypted) streams (``send -w``)
    raw_send: bool = False
    #: listing the tags of holds (``zfs holds``); the count is always known
    hold_listing: bool = False
    #: several properties set in one atomic call (``zfs set a=1 b=2``)
    multi_property_set: bool = False
    #: exact pool properties (``zpool get -H -p -o``)
    parsable_pool_get: bool = False
    #: exact pool list (``zpool list -p``)
    parsable_pool_list: bool = False

    def as_dict(self) -> dict[str, bool]:
        """Every capability by name (for logs, ``/status`` and ``doctor``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class VolumeDataset:
    """A volume's dataset as found under the dataset root.

    ``complete`` is False for a volume whose creation did not finish (the marker written last
    is missing). ``spec`` holds the keys asked for that are set on the dataset itself.
    ``quota_bytes``/``refquota_bytes`` are None when unset.
    """

    uuid: str
    dataset: str
    spec: Mapping[str, str]
    complete: bool
    used_bytes: int
    referenced_bytes: int
    available_bytes: int
    quota_bytes: int | None
    refquota_bytes: int | None
    mounted: bool
    mountpoint: str | None
    readonly: bool
    created: datetime


@dataclass(frozen=True, slots=True)
class VolumeScan:
    """What lies directly under a dataset root, from one read.

    ``volumes`` are the volume datasets (as :meth:`Storage.list_volumes` gives them);
    ``others`` names, sorted, every other dataset directly under the root (one that is not a
    file system named by a volume uuid). Snapshots are not datasets here.
    """

    volumes: list[VolumeDataset]
    others: list[str]


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    """A finished receive: the bytes read from the stream and how long it took."""

    target: str
    bytes_received: int
    duration_s: float


class SendStream(Protocol):
    """The bytes of a send, read as an async iterator; ``bytes_sent`` counts them so far."""

    @property
    def bytes_sent(self) -> int:
        """Bytes yielded so far."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Iterate over the stream's chunks; a failed send raises when the stream ends."""
        ...


#: Called with the total number of bytes received so far.
ProgressCallback = Callable[[int], None]


class Storage(Protocol):
    """The dataset store: file systems, snapshots, streams, pools and volume datasets.

    Mutating calls on one dataset are serialised by the backend; calls on different datasets
    may run concurrently. Names are checked before anything runs
    (:class:`~volagent.errors.InvalidParameter`).
    """

    @property
    def capabilities(self) -> Capabilities:
        """What was detected by :meth:`detect_capabilities` (all False before)."""
        ...

    async def detect_capabilities(self, pool: str) -> Capabilities:
        """Probe the store once, without side effects, and remember the answer."""
        ...

    async def pool_info(self, pool: str) -> PoolInfo:
        """Usable size, free space and health of ``pool``."""
        ...

    # ------------------------------------------------------------------ file systems

    async def create_dataset(
        self, name: str, options: DatasetOptions | None = None, *, exist_ok: bool = False
    ) -> bool:
        """Create file system ``name`` (its parent must exist); False if it existed."""
        ...

    async def destroy_dataset(
        self, name: str, *, recursive: bool = False, missing_ok: bool = False
    ) -> bool:
        """Unmount and destroy ``name`` (with children and snapshots when ``recursive``).

        Never forced: a dataset that stays busy raises and is left mounted. Returns False when
        it did not exist and ``missing_ok``.
        """
        ...

    async def exists(self, name: str) -> bool:
        """Whether the dataset (or ``fs@snap``) exists."""
        ...

    async def get_properties(self, name: str, props: Sequence[str]) -> DatasetProperties:
        """Exact values of ``props`` of one dataset."""
        ...

    async def set_properties(self, name: str, values: Mapping[str, str]) -> None:
        """Set properties (native or user) of ``name``; atomically where the store can."""
        ...

    async def inherit_property(self, name: str, prop: str) -> None:
        """Clear a local value so that ``prop`` is inherited (or removed, for user ones)."""
        ...

    async def list_datasets(
        self, root: str, props: Sequence[str], *, depth: int | None = None
    ) -> list[DatasetProperties]:
        """``root`` and the file systems under it (to ``depth`` levels), in one read."""
        ...

    async def rename_dataset(self, name: str, new_name: str) -> None:
        """Rename a file system within its pool."""
        ...

    async def mount(self, name: str) -> None:
        """Mount ``name``; nothing to do when it is mounted already."""
        ...

    async def unmount(self, name: str) -> None:
        """Unmount ``name`` (never forced); nothing to do when it is not mounted."""
        ...

    async def mount_dead(self, name: str) -> bool:
        """Whether ``name`` is listed as mounted but its mount is dead (its daemon died)."""
        ...

    # ------------------------------------------------------------------ snapshots

    async def create_snapshot(self, dataset: str, snapshot: str) -> None:
        """Snapshot ``dataset`` as ``dataset@snapshot``."""
        ...

    async def destroy_snapshot(
        self, dataset: str, snapshot: str, *, missing_ok: bool = False
    ) -> bool:
        """Destroy one snapshot; False when it did not exist and ``missing_ok``."""
        ...

    async def rollback(self, dataset: str, snapshot: str, *, destroy_newer: bool = False) -> None:
        """Roll ``dataset`` back to ``snapshot``, destroying newer snapshots if asked."""
        ...

    async def list_snapshots(self, dataset: str) -> list[SnapshotInfo]:
        """The snapshots of ``dataset`` (not of its children), oldest first by createtxg."""
        ...

    async def hold(self, dataset: str, snapshot: str, tag: str) -> None:
        """Put a user hold ``tag`` on a snapshot (it cannot be destroyed while held)."""
        ...

    async def release(self, dataset: str, snapshot: str, tag: str) -> None:
        """Release the hold ``tag``."""
        ...

    async def clone(
        self, dataset: str, snapshot: str, target: str, options: DatasetOptions | None = None
    ) -> None:
        """Create file system ``target`` as a clone of ``dataset@snapshot``."""
        ...

    async def promote(self, name: str) -> None:
        """Make clone ``name`` independent of its origin."""
        ...

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
        """Stream ``dataset@snapshot``: full, or incremental from snapshot ``base``.

        ``intermediates`` includes every snapshot between ``base`` and ``snapshot``;
        ``properties`` carries the file system's properties. Leaving the context before the
        stream ends stops the send.
        """
        ...

    async def receive(
        self,
        target: str,
        stream: AsyncIterable[bytes],
        *,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> ReceiveResult:
        """Receive a stream into file system ``target``, which is left unmounted.

        ``force`` first rolls ``target`` back to its latest snapshot. If the stream fails or
        ends early, the receive fails and ``target`` is left as it was.
        """
        ...

    # ------------------------------------------------------------------ volume datasets

    async def create_volume(
        self, root: str, uuid: str, spec: Mapping[str, str], options: DatasetOptions
    ) -> VolumeDataset:
        """Create ``<root>/<uuid>`` with its spec, then write the completion marker."""
        ...

    async def complete_volume(self, root: str, uuid: str) -> None:
        """Write the completion marker of a volume whose spec is already in place."""
        ...

    async def update_volume_spec(self, root: str, uuid: str, changes: Mapping[str, str]) -> None:
        """Change spec keys of an existing volume."""
        ...

    async def get_volume(
        self, root: str, uuid: str, spec_keys: Collection[str]
    ) -> VolumeDataset | None:
        """One volume dataset with the given spec keys; None when absent."""
        ...

    async def get_volume_and_snapshots(
        self, root: str, uuid: str, spec_keys: Collection[str]
    ) -> tuple[VolumeDataset, list[SnapshotInfo]] | None:
        """A volume dataset and its snapshots (oldest first) from one read; None when absent."""
        ...

    async def list_volumes(self, root: str, spec_keys: Collection[str]) -> list[VolumeDataset]:
        """Every volume dataset directly under ``root`` with the given spec keys, in one read."""
        ...

    async def scan_volumes(self, root: str, spec_keys: Collection[str]) -> VolumeScan:
        """The volume datasets under ``root`` and the names of the others, in one read."""
        ...
