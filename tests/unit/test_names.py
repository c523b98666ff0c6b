import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volagent.domain import names
from volagent.errors import InvalidParameter

FORBIDDEN = "@#%, /\t\n\x00"


def rejected(func: object, value: object, **kw: str) -> InvalidParameter:
    assert callable(func)
    with pytest.raises(InvalidParameter) as info:
        func(value, **kw)
    return info.value


# ------------------------------------------------------------------------------- volume uuid


def test_uuid_canonical_lowercase_is_accepted() -> None:
    value = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
    assert names.validate_volume_uuid(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "0F8C1D2E-3B4A-4C5D-8E6F-7A8B9C0D1E2F",  # upper case
        "0f8c1d2e3b4a4c5d8e6f7a8b9c0d1e2f",  # no dashes
        "{0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f}",
        "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f\n",  # a trailing newline must not slip through
        "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2",
        "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2g",
        "",
    ],
)
def test_uuid_non_canonical_is_rejected(value: str) -> None:
    err = rejected(names.validate_volume_uuid, value)
    assert err.details["parameter"] == "uuid"
    assert err.code == "InvalidParameter"


def test_uuid_non_string_is_rejected_and_names_the_parameter() -> None:
    err = rejected(names.validate_volume_uuid, 42, param="volume_uuid")
    assert err.details == {"parameter": "volume_uuid", "reason": "must be a string"}


@given(st.uuids())
def test_every_uuid_in_canonical_form_is_accepted(value: uuid.UUID) -> None:
    assert names.validate_volume_uuid(str(value)) == str(value)


# ------------------------------------------------------------------------- protocol names


@pytest.mark.parametrize("value", ["a", "Vol_1.data-2", "9", "a" * 256])
def test_volume_names_accepted(value: str) -> None:
    assert names.validate_volume_name(value) == value


@pytest.mark.parametrize("value", ["", "-a", ".a", "_a", "a b", "a/b", "a:b", "a@b", "a" * 257])
def test_volume_names_rejected(value: str) -> None:
    assert rejected(names.validate_volume_name, value).details["parameter"] == "name"


@pytest.mark.parametrize("value", ["s", "daily:2026-11-21", "a.b_c-d", "x" * 64])
def test_snapshot_names_accepted(value: str) -> None:
    assert names.validate_snapshot_name(value) == value


@pytest.mark.parametrize("value", ["", ":a", "-a", "a b", "a@b", "a/b", "a#b", "x" * 65, "é"])
def test_snapshot_names_rejected(value: str) -> None:
    assert rejected(names.validate_snapshot_name, value).details["parameter"] == "name"


# ---------------------------------------------------------------------------- ZFS names


@pytest.mark.parametrize("value", ["a", "vol.1", "x:y", "A_b-c", "a" * 255])
def test_dataset_components_accepted(value: str) -> None:
    assert names.validate_dataset_component(value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("-rf", "'-'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".", "'..'"),
        ("a@b", "only ASCII"),
        ("a#b", "only ASCII"),
        ("a%b", "only ASCII"),
        ("a,b", "only ASCII"),
        ("a b", "only ASCII"),
        ("a/b", "only ASCII"),
        ("é", "only ASCII"),
        ("a" * 256, "longer than 255"),
    ],
)
def test_dataset_components_rejected(value: str, reason: str) -> None:
    err = rejected(names.validate_dataset_component, value, param="tag")
    assert err.details["parameter"] == "tag"
    assert reason in err.details["reason"]


@pytest.mark.parametrize("value", ["tank", "tank/volumes", "t/a/b.c/d:e"])
def test_dataset_names_accepted(value: str) -> None:
    assert names.validate_dataset_name(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "/tank",
        "tank/",
        "tank//a",
        "tank/-a",
        "tank/..",
        "tank/a b",
        "tank@snap",
        "tank#bm",
        "9tank/a",  # a pool name starts with a letter
        "tank/" + "a" * 251,
    ],
)
def test_dataset_names_rejected(value: str) -> None:
    assert rejected(names.validate_dataset_name, value).details["parameter"] == "dataset"


def test_snapshot_fullname_is_checked_as_a_whole() -> None:
    assert names.validate_snapshot_fullname("tank/a", "s1", param="snapshot") == "tank/a@s1"
    with pytest.raises(InvalidParameter):
        names.validate_snapshot_fullname("tank/a", "s@1", param="snapshot")
    with pytest.raises(InvalidParameter) as info:
        names.validate_snapshot_fullname("tank/" + "a" * 240, "s" * 20, param="snapshot")
    assert "longer than 255" in info.value.details["reason"]


@pytest.mark.parametrize("value", ["quota", "usedbysnapshots", "volagent:name", "com.x:a.b-c"])
def test_property_names_accepted(value: str) -> None:
    assert names.validate_property_name(value) == value


@pytest.mark.parametrize("value", ["", "Quota", "volagent:Name", "a=b", "x:", ":x", "a b", "-o"])
def test_property_names_rejected(value: str) -> None:
    rejected(names.validate_property_name, value)


def test_volume_dataset_name_joins_checked_parts() -> None:
    uid = "0f8c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
    assert names.volume_dataset_name("tank/vols", uid) == f"tank/vols/{uid}"
    assert rejected(names.volume_dataset_name, "tank/-v", uuid=uid).details["parameter"] == (
        "dataset_root"
    )
    with pytest.raises(InvalidParameter):
        names.volume_dataset_name("tank/vols", uid.upper())


_SAFE = re.compile(r"[A-Za-z0-9_.:-]+")


@given(st.text(max_size=300))
def test_an_accepted_component_can_never_break_an_argv_or_a_name(value: str) -> None:
    """Whatever text comes in, what passes is safe to put on a zfs command line."""
    try:
        names.validate_dataset_component(value)
    except InvalidParameter:
        return
    assert _SAFE.fullmatch(value)
    assert not value.startswith("-")
    assert ".." not in value
    assert not any(ch in value for ch in FORBIDDEN)
    assert 1 <= len(value) <= names.MAX_DATASET_NAME_LEN


@given(st.lists(st.text(alphabet="ab.-_:/@ ", min_size=0, max_size=6), min_size=1, max_size=5))
def test_dataset_name_accepted_iff_every_component_is(parts: list[str]) -> None:
    name = "p" + "/".join(parts)
    components_ok = True
    for part in name.split("/"):
        try:
            names.validate_dataset_component(part)
        except InvalidParameter:
            components_ok = False
    try:
        names.validate_dataset_name(name)
    except InvalidParameter:
        assert not components_ok or len(name) > names.MAX_DATASET_NAME_LEN
    else:
        assert components_ok
