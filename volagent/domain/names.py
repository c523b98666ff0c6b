"""Names that may reach a command line or a dataset: checked here, before any argv is built.

Two families of rules live here:

* the wire protocol's names (volume uuid, volume name, snapshot name), and
* ZFS names (dataset components, full dataset names, snapshot and hold-tag components,
  user property keys), restricted to a safe subset of what ZFS accepts: ASCII letters,
  digits and ``_ . : -``; no ``@ # % ,``, no spaces, no ``..``, no leading ``-``, no empty
  component, at most :data:`MAX_DATASET_NAME_LEN` characters in all.

Every check returns the value unchanged when it is valid and raises
:class:`~volagent.errors.InvalidParameter` otherwise, with ``details["parameter"]`` naming
the parameter and ``details["reason"]`` saying what is wrong.
"""

from __future__ import annotations

import re
from typing import Final

from volagent.errors import InvalidParameter

#: Longest full dataset or snapshot name ZFS accepts (``ZFS_MAX_DATASET_NAME_LEN`` - 1).
MAX_DATASET_NAME_LEN: Final = 255
#: Longest user property name ZFS accepts (``ZAP_MAXNAMELEN`` - 1).
MAX_PROPERTY_NAME_LEN: Final = 255

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,255}")
_SNAPSHOT_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,63}")
_COMPONENT = re.compile(r"[a-zA-Z0-9_.:-]+")
_POOL_START = re.compile(r"[a-zA-Z]")
_PROPERTY_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_USER_PROPERTY = re.compile(r"[a-z0-9_.-]+:[a-z0-9_.:-]+")
_NATIVE_PROPERTY = re.compile(r"[a-z][a-z0-9_]*")
#: The module of every user property the agent writes.
PROPERTY_MODULE: Final = "volagent"

_NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
#: The patterns of the protocol's names (unanchored; match the whole text), for JSON Schemas.
UUID_PATTERN: Final = _UUID.pattern
VOLUME_NAME_PATTERN: Final = _VOLUME_NAME.pattern
SNAPSHOT_NAME_PATTERN: Final = _SNAPSHOT_NAME.pattern
NETWORK_NAME_PATTERN: Final = _NETWORK_NAME.pattern


def _invalid(param: str, value: object, reason: str) -> InvalidParameter:
    shown = value if isinstance(value, str) and len(value) <= 300 else f"{str(value)[:300]}..."
    return InvalidParameter(
        f"invalid {param} {shown!r}: {reason}",
        details={"parameter": param, "reason": reason},
    )


def _text(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _invalid(param, value, "must be a string")
    return value


def validate_volume_uuid(value: object, *, param: str = "uuid") -> str:
    """Check a volume uuid: canonical lowercase ``8-4-4-4-12`` hexadecimal form."""
    text = _text(value, param)
    if _UUID.fullmatch(text) is None:
        raise _invalid(param, text, "must be a lowercase canonical uuid (8-4-4-4-12 hex digits)")
    return text


def validate_volume_name(value: object, *, param: str = "name") -> str:
    """Check a volume name: ``^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,255}$``."""
    text = _text(value, param)
    if _VOLUME_NAME.fullmatch(text) is None:
        raise _invalid(
            param, text, "must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,255}$ (1 to 256 characters)"
        )
    return text


def validate_snapshot_name(value: object, *, param: str = "name") -> str:
    """Check a protocol snapshot name: ``^[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,63}$``."""
    text = _text(value, param)
    if _SNAPSHOT_NAME.fullmatch(text) is None:
        raise _invalid(
            param, text, "must match ^[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,63}$ (1 to 64 characters)"
        )
    return text


def validate_network_name(value: object, *, param: str = "network") -> str:
    """Check a network name (a key of ``[networks]``): ``^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$``."""
    text = _text(value, param)
    if _NETWORK_NAME.fullmatch(text) is None:
        raise _invalid(
            param, text, "must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$ (1 to 64 characters)"
        )
    return text


def _component_problem(text: str) -> str | None:
    if not text:
        return "empty name component"
    if len(text) > MAX_DATASET_NAME_LEN:
        return f"longer than {MAX_DATASET_NAME_LEN} characters"
    if text.startswith("-"):
        return "must not start with '-'"
    if ".." in text or text == ".":
        return "must not be '.' or contain '..'"
    if _COMPONENT.fullmatch(text) is None:
        return "only ASCII letters, digits and _ . : - are allowed"
    return None


def validate_dataset_component(value: object, *, param: str = "component") -> str:
    """Check one component of a dataset name, or a snapshot or hold-tag name."""
    text = _text(value, param)
    problem = _component_problem(text)
    if problem is not None:
        raise _invalid(param, text, problem)
    return text


def validate_dataset_name(value: object, *, param: str = "dataset") -> str:
    """Check a full dataset name ``pool[/component]*`` (no snapshot part)."""
    text = _text(value, param)
    if len(text) > MAX_DATASET_NAME_LEN:
        raise _invalid(param, text, f"longer than {MAX_DATASET_NAME_LEN} characters")
    for component in text.split("/"):
        problem = _component_problem(component)
        if problem is not None:
            raise _invalid(param, text, problem)
    if _POOL_START.match(text) is None:
        raise _invalid(param, text, "the pool name must start with a letter")
    return text


def validate_snapshot_fullname(dataset: object, snapshot: object, *, param: str) -> str:
    """Check a dataset and a snapshot component together; return ``dataset@snapshot``."""
    fs = validate_dataset_name(dataset, param=param)
    snap = validate_dataset_component(snapshot, param=param)
    full = f"{fs}@{snap}"
    if len(full) > MAX_DATASET_NAME_LEN:
        raise _invalid(param, full, f"longer than {MAX_DATASET_NAME_LEN} characters")
    return full


def validate_property_name(value: object, *, param: str = "property") -> str:
    """Check a property name: a native one (``quota``) or a lowercase user one (``mod:key``)."""
    text = _text(value, param)
    if len(text) > MAX_PROPERTY_NAME_LEN:
        raise _invalid(param, text, f"longer than {MAX_PROPERTY_NAME_LEN} characters")
    if _NATIVE_PROPERTY.fullmatch(text) is None and _USER_PROPERTY.fullmatch(text) is None:
        raise _invalid(
            param,
            text,
            "must be a native name or a lowercase 'module:key' of [a-z0-9_.:-]",
        )
    return text


def validate_property_key(value: object, *, param: str = "key") -> str:
    """Check a spec key, stored as the user property ``volagent:<key>``."""
    text = _text(value, param)
    longest = MAX_PROPERTY_NAME_LEN - len(PROPERTY_MODULE) - 1
    if _PROPERTY_KEY.fullmatch(text) is None or len(text) > longest:
        raise _invalid(param, text, "must be lowercase [a-z0-9_.-], not starting with _ . -")
    return text


def volume_dataset_name(root: object, uuid: object, *, param: str = "dataset_root") -> str:
    """The dataset of a volume: ``<root>/<uuid>``, both checked."""
    base = validate_dataset_name(root, param=param)
    name = f"{base}/{validate_volume_uuid(uuid)}"
    if len(name) > MAX_DATASET_NAME_LEN:
        raise _invalid(param, base, "too long to hold volume datasets")
    return name
