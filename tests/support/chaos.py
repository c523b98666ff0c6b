"""A stream of mixed tasks over a few volumes, and what running it once in order must leave.

Pure: no I/O. :func:`plan` draws, from a seeded :class:`random.Random`, a task stream in which
every task succeeds when run exactly once in publish order (the runner keeps each volume's
tasks in arrival order), and a model of each volume after every task: the result each task
must return and the end state ZFS, the zones and the journal must agree on.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The volume-object fields a task's expectation may name; see :func:`volume_view`.
VIEW_KEYS = ("state", "size_mib", "allowed_clients", "read_only", "snapshots", "zone_state")
#: Relative weights of the kinds drawn for a volume (a kind is drawn only when it can succeed).
WEIGHTS: Mapping[str, float] = {
    "snapshot.create": 3.0,
    "volume.resize": 1.5,
    "volume.set_access": 1.5,
    "snapshot.delete": 1.0,
    "snapshot.rollback": 1.0,
    "volume.get": 1.0,
    "zone.restart": 1.0,
    "snapshot.list": 1.0,
}
#: How much a resize grows a volume, in MiB.
GROWTH_MIB = (8, 16, 32)
#: The least number of mixed tasks each volume gets.
MIN_PER_VOLUME = 6
#: How often a rollback goes to an older snapshot (destroying the newer ones) when it can.
DESTROY_NEWER_P = 0.3


def canonical_clients(clients: Sequence[str]) -> list[str]:
    """An ``allowed_clients`` list as sorted CIDR networks (``10.0.0.7`` is ``10.0.0.7/32``)."""
    return sorted({str(ipaddress.ip_network(c, strict=True)) for c in clients})


def volume_view(volume: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The named fields of a volume object, in the model's terms (see :data:`VIEW_KEYS`)."""
    full = {
        "state": volume["state"],
        "size_mib": volume["size_mib"],
        "allowed_clients": canonical_clients(volume["allowed_clients"]),
        "read_only": volume["read_only"],
        "snapshots": [s["name"] for s in volume["snapshots"]],
        "zone_state": volume["zone"]["state"],
    }
    return {k: full[k] for k in keys}


@dataclass
class VolumeModel:
    """One volume as the stream leaves it so far."""

    uuid: str
    name: str
    size_mib: int
    allowed_clients: list[str]
    read_only: bool = False
    #: Live snapshot names, oldest first.
    snapshots: list[str] = field(default_factory=list)
    #: Every snapshot name created, in order (names are never reused).
    created: list[str] = field(default_factory=list)
    zone_restarts: int = 0
    rollbacks: int = 0

    def view(self, keys: Sequence[str]) -> dict[str, Any]:
        """The named fields as a volume object of this model would show them."""
        full = {
            "state": "ready",
            "size_mib": self.size_mib,
            "allowed_clients": canonical_clients(self.allowed_clients),
            "read_only": self.read_only,
            "snapshots": list(self.snapshots),
            "zone_state": "running",
        }
        return {k: full[k] for k in keys}


@dataclass(frozen=True)
class Planned:
    """One task of the stream and what its successful result must show.

    ``expect`` holds the volume-object fields (:data:`VIEW_KEYS`) of the result for kinds that
    return a volume; for the other kinds it holds the result's own fields (``name``,
    ``already_absent``, ``snapshots`` as a list of names). ``volume.list`` expects nothing:
    its answer depends on how far the other volumes have got.
    """

    kind: str
    params: dict[str, Any]
    volume: str | None
    expect: dict[str, Any]


@dataclass(frozen=True)
class Stream:
    """The tasks in publish order and every volume's model after the last of them."""

    tasks: list[Planned]
    volumes: dict[str, VolumeModel]

    def count(self, kind: str) -> int:
        """How many tasks of ``kind`` the stream holds."""
        return sum(1 for t in self.tasks if t.kind == kind)


def _draw(rng: random.Random, vol: VolumeModel, clients: Sequence[str]) -> Planned:
    """One task for ``vol`` that succeeds in its current state; the model moves past it."""
    needs_one = ("snapshot.delete", "snapshot.rollback")
    kinds = [k for k in WEIGHTS if vol.snapshots or k not in needs_one]
    kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
    make: dict[str, Callable[[], Planned]] = {
        "snapshot.create": lambda: _snapshot_create(vol),
        "volume.resize": lambda: _resize(rng, vol),
        "volume.set_access": lambda: _set_access(rng, vol, clients),
        "snapshot.delete": lambda: _snapshot_delete(rng, vol),
        "snapshot.rollback": lambda: _rollback(rng, vol),
        "volume.get": lambda: Planned(kind, {"uuid": vol.uuid}, vol.uuid, vol.view(VIEW_KEYS)),
        "zone.restart": lambda: _zone_restart(vol),
        "snapshot.list": lambda: Planned(
            kind, {"volume_uuid": vol.uuid}, vol.uuid, {"snapshots": list(vol.snapshots)}
        ),
    }
    return make[kind]()


def _snapshot_create(vol: VolumeModel) -> Planned:
    name = f"c{len(vol.created)}"
    vol.created.append(name)
    vol.snapshots.append(name)
    return Planned(
        "snapshot.create", {"volume_uuid": vol.uuid, "name": name}, vol.uuid, {"name": name}
    )


def _resize(rng: random.Random, vol: VolumeModel) -> Planned:
    vol.size_mib += rng.choice(GROWTH_MIB)
    params = {"uuid": vol.uuid, "size_mib": vol.size_mib}
    return Planned("volume.resize", params, vol.uuid, vol.view(("state", "size_mib")))


def _set_access(rng: random.Random, vol: VolumeModel, clients: Sequence[str]) -> Planned:
    vol.allowed_clients = rng.sample(list(clients), rng.randint(1, len(clients)))
    vol.read_only = rng.random() < 0.3
    params = {"uuid": vol.uuid, "allowed_clients": vol.allowed_clients, "read_only": vol.read_only}
    keys = ("state", "allowed_clients", "read_only", "zone_state")
    return Planned("volume.set_access", params, vol.uuid, vol.view(keys))


def _snapshot_delete(rng: random.Random, vol: VolumeModel) -> Planned:
    name = rng.choice(vol.snapshots)
    vol.snapshots.remove(name)
    params = {"volume_uuid": vol.uuid, "name": name}
    return Planned("snapshot.delete", params, vol.uuid, {"name": name, "already_absent": False})


def _rollback(rng: random.Random, vol: VolumeModel) -> Planned:
    """To the latest snapshot, or now and then to an older one with ``destroy_newer``."""
    params: dict[str, Any] = {"volume_uuid": vol.uuid, "name": vol.snapshots[-1]}
    if len(vol.snapshots) > 1 and rng.random() < DESTROY_NEWER_P:
        keep = rng.randrange(len(vol.snapshots) - 1)
        params = {"volume_uuid": vol.uuid, "name": vol.snapshots[keep], "destroy_newer": True}
        del vol.snapshots[keep + 1 :]
    vol.rollbacks += 1
    return Planned("snapshot.rollback", params, vol.uuid, vol.view(VIEW_KEYS))


def _zone_restart(vol: VolumeModel) -> Planned:
    vol.zone_restarts += 1
    return Planned("zone.restart", {"uuid": vol.uuid}, vol.uuid, vol.view(("state", "zone_state")))


def plan(
    rng: random.Random,
    creates: Sequence[Mapping[str, Any]],
    mixed: int,
    clients: Sequence[str],
    lists: tuple[int, int] = (3, 6),
) -> Stream:
    """The creates of ``creates`` (``volume.create`` params), then ``mixed`` tasks on them.

    The mixed tasks are drawn per volume (at least :data:`MIN_PER_VOLUME` each), plus a few
    ``volume.list`` (between ``lists`` bounds), and shuffled into one stream that keeps each
    volume's own order. ``clients`` are the entries ``volume.set_access`` draws its lists from.
    """
    volumes = {
        str(p["uuid"]): VolumeModel(
            uuid=str(p["uuid"]),
            name=str(p["name"]),
            size_mib=int(p["size_mib"]),
            allowed_clients=[
                str(ipaddress.ip_interface(f"{p['nic']['ip']}/{p['nic']['prefix']}").network)
            ],
        )
        for p in creates
    }
    tasks = [
        Planned("volume.create", dict(p), str(p["uuid"]), vol.view(VIEW_KEYS))
        for p, vol in zip(creates, volumes.values(), strict=True)
    ]
    n_lists = rng.randint(*lists)
    counts = dict.fromkeys(volumes, MIN_PER_VOLUME)
    for _ in range(mixed - n_lists - MIN_PER_VOLUME * len(volumes)):
        counts[rng.choice(list(volumes))] += 1
    lanes: list[str | None] = [None] * n_lists
    for uuid, n in counts.items():
        lanes += [uuid] * n
    rng.shuffle(lanes)
    for lane in lanes:
        if lane is None:
            tasks.append(Planned("volume.list", {}, None, {}))
        else:
            tasks.append(_draw(rng, volumes[lane], clients))
    return Stream(tasks=tasks, volumes=volumes)


#: The kinds whose result is a volume object.
VOLUME_RESULTS = frozenset(
    {
        "volume.create",
        "volume.resize",
        "volume.set_access",
        "volume.get",
        "snapshot.rollback",
        "zone.restart",
    }
)


def result_view(task: Planned, result: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a task's ``result`` that its ``expect`` names, in the model's terms."""
    if task.kind in VOLUME_RESULTS:
        return volume_view(result, list(task.expect))
    if task.kind == "snapshot.list":
        return {"snapshots": [s["name"] for s in result["snapshots"]]}
    return {k: result[k] for k in task.expect}
