"""A volume's spec: what ``volume.create`` asked for, kept on the dataset as user properties.

The dataset is the source of truth for a volume, so the spec is written to it as flat
``key → text`` pairs (the storage driver stores each as the user property ``volagent:<key>``)
and read back from there by :func:`spec_from_props`. The format, version ``1``:

==================  ===================================================================
key                 value
==================  ===================================================================
``spec_version``    ``1``
``name``            the volume name
``owner_uuid``      the owner's uuid
``size_mib``        decimal integer
``nic``             compact JSON object, sorted keys (``gateway`` left out when unset)
``allowed_clients`` compact JSON array of canonical addresses/networks, sorted
``nfs_versions``    compact JSON array, sorted (``[3,4]``)
``read_only``       ``true`` or ``false``
``labels``          compact JSON object, sorted keys
==================  ===================================================================

JSON values are ASCII only (other characters as JSON escapes), so the driver stores them as
they are; every value fits one property (at most 8191 bytes): labels are limited to
:data:`MAX_LABELS_BYTES` of JSON and allowed clients to
:data:`~volagent.domain.network.MAX_ALLOWED_CLIENTS` entries.

The export path of a volume is ``/<volume name>`` (``nfs://10.0.0.1/foo`` for a volume
``foo``, as in RFD 26), the same for NFSv3 and NFSv4.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Final

from pydantic import AfterValidator, Field, ValidationError, WithJsonSchema

from volagent.domain.network import Clients, Nic
from volagent.domain.wire import Uuid, VolumeName, WireModel, dumps, invalid, problem_of
from volagent.errors import InvalidParameter
from volagent.ports import zones

#: The version of the property format written by :func:`spec_to_props`.
SPEC_VERSION: Final = "1"
#: The spec keys, in the order :func:`spec_to_props` writes them (for ``list_volumes``).
SPEC_KEYS: Final = (
    "spec_version",
    "name",
    "owner_uuid",
    "size_mib",
    "nic",
    "allowed_clients",
    "nfs_versions",
    "read_only",
    "labels",
)
#: Longest labels object, as compact ASCII JSON (fits a property even if base64-encoded).
MAX_LABELS_BYTES: Final = 4096
#: The NFS versions a volume can be served with.
NFS_VERSIONS: Final = (3, 4)


def _versions(versions: list[int]) -> list[int]:
    if not versions:
        msg = "must name at least one NFS version"
        raise invalid(msg)
    if any(v not in NFS_VERSIONS for v in versions):
        msg = "only NFS versions 3 and 4 are served"
        raise invalid(msg)
    return sorted(set(versions))


def _labels_fit(labels: dict[str, str]) -> dict[str, str]:
    size = len(dumps(labels))
    if size > MAX_LABELS_BYTES:
        raise invalid(f"take {size} bytes as JSON, more than {MAX_LABELS_BYTES}")
    return labels


#: A size in MiB, at least 1 (the upper bound is ``limits.max_volume_mib``).
SizeMib = Annotated[
    int, Field(ge=1, description="MiB; at most limits.max_volume_mib (1048576 by default).")
]
#: The NFS versions to serve: 3 and/or 4, sorted, without repeats.
NfsVersions = Annotated[
    list[int],
    AfterValidator(_versions),
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "integer", "enum": list(NFS_VERSIONS)},
            "minItems": 1,
            "uniqueItems": True,
        }
    ),
]
#: Free-form string labels, at most :data:`MAX_LABELS_BYTES` as compact JSON.
Labels = Annotated[dict[Annotated[str, Field(min_length=1)], str], AfterValidator(_labels_fit)]


def export_path(name: str) -> str:
    """The path clients mount a volume by (NFSv3 and NFSv4 alike): ``/<volume name>``."""
    return f"/{name}"


class VolumeSpec(WireModel):
    """What a volume is meant to be; every value canonical, so equal specs compare equal."""

    name: VolumeName
    owner_uuid: Uuid
    size_mib: SizeMib
    nic: Nic
    allowed_clients: Clients
    nfs_versions: NfsVersions
    read_only: bool
    labels: Labels

    @property
    def export_path(self) -> str:
        """The path clients mount: ``/<name>``."""
        return export_path(self.name)

    def zone_spec(self, volume_uuid: str, source: str) -> zones.ZoneSpec:
        """What the zone runtime needs to serve this volume from the directory ``source``."""
        nic = self.nic
        return zones.ZoneSpec(
            volume_uuid=volume_uuid,
            source=source,
            export_path=self.export_path,
            nic=zones.Nic(ip=nic.ip, prefix=nic.prefix, network=nic.network, gateway=nic.gateway),
            allowed_clients=tuple(self.allowed_clients),
            read_only=self.read_only,
            nfs_versions=tuple(self.nfs_versions),
        )


def spec_differences(a: VolumeSpec, b: VolumeSpec) -> list[str]:
    """The spec keys whose values differ between ``a`` and ``b``, in :data:`SPEC_KEYS` order."""
    props_a, props_b = spec_to_props(a), spec_to_props(b)
    return [key for key in SPEC_KEYS if props_a[key] != props_b[key]]


def same_spec(a: VolumeSpec, b: VolumeSpec) -> bool:
    """Whether two specs ask for the same volume (an idempotent ``volume.create``)."""
    return not spec_differences(a, b)


def spec_to_props(spec: VolumeSpec) -> dict[str, str]:
    """The spec as the flat text mapping the storage driver keeps (see the module docstring)."""
    return {
        "spec_version": SPEC_VERSION,
        "name": spec.name,
        "owner_uuid": spec.owner_uuid,
        "size_mib": str(spec.size_mib),
        "nic": dumps(spec.nic.to_json_dict()),
        "allowed_clients": dumps(spec.allowed_clients),
        "nfs_versions": dumps(spec.nfs_versions),
        "read_only": "true" if spec.read_only else "false",
        "labels": dumps(spec.labels),
    }


def _bad(*, key: str, reason: str) -> InvalidParameter:
    param = f"volagent:{key}"
    return InvalidParameter(
        f"stored spec {param}: {reason}", details={"parameter": param, "reason": reason}
    )


def _json(props: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(props[key])
    except (ValueError, RecursionError) as exc:
        raise _bad(key=key, reason="is not valid JSON") from exc


def spec_from_props(props: Mapping[str, str]) -> VolumeSpec:
    """Read a spec written by :func:`spec_to_props`; keys not in :data:`SPEC_KEYS` are ignored.

    Raises InvalidParameter naming the property (``volagent:<key>``) when a key is missing
    or a value is not what this version writes.
    """
    for key in SPEC_KEYS:
        if key not in props:
            raise _bad(key=key, reason="is missing")
    if props["spec_version"] != SPEC_VERSION:
        raise _bad(
            key="spec_version", reason=f"is not {SPEC_VERSION}, the version this agent reads"
        )
    if props["read_only"] not in ("true", "false"):
        raise _bad(key="read_only", reason="must be true or false")
    size = props["size_mib"]
    if not (size.isascii() and size.isdigit() and len(size) <= 20):
        raise _bad(key="size_mib", reason="must be a decimal integer of at most 20 digits")
    data = {
        "name": props["name"],
        "owner_uuid": props["owner_uuid"],
        "size_mib": int(size),
        "nic": _json(props, "nic"),
        "allowed_clients": _json(props, "allowed_clients"),
        "nfs_versions": _json(props, "nfs_versions"),
        "read_only": props["read_only"] == "true",
        "labels": _json(props, "labels"),
    }
    try:
        return VolumeSpec.model_validate(data)
    except ValidationError as exc:
        key, reason = problem_of(exc.errors()[0])
        raise _bad(key=key, reason=reason) from exc
