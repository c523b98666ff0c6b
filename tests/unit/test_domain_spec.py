from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volagent.domain.names import validate_property_key
from volagent.domain.network import MAX_ALLOWED_CLIENTS, Nic
from volagent.domain.spec import (
    MAX_LABELS_BYTES,
    SPEC_KEYS,
    VolumeSpec,
    export_path,
    same_spec,
    spec_differences,
    spec_from_props,
    spec_to_props,
)
from volagent.errors import InvalidParameter
from volagent.ports import zones

OWNER = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
VOL = "3e2d1c0b-9a8f-4e7d-8c6b-5a4f3e2d1c0b"
#: The most a ZFS user property value can hold (measured on zfs-fuse, see docs/storage.md).
MAX_PROPERTY_VALUE_BYTES = 8191


def spec(**changes: Any) -> VolumeSpec:
    values: dict[str, Any] = {
        "name": "data",
        "owner_uuid": OWNER,
        "size_mib": 1024,
        "nic": {"ip": "10.0.0.5", "prefix": 24, "network": "tenant", "gateway": "10.0.0.1"},
        "allowed_clients": ["10.0.0.0/24"],
        "nfs_versions": [3, 4],
        "read_only": False,
        "labels": {"team": "storage"},
    }
    return VolumeSpec.model_validate({**values, **changes})


def test_props_are_flat_text_in_a_documented_format() -> None:
    assert spec_to_props(spec()) == {
        "spec_version": "1",
        "name": "data",
        "owner_uuid": OWNER,
        "size_mib": "1024",
        "nic": '{"gateway":"10.0.0.1","ip":"10.0.0.5","network":"tenant","prefix":24}',
        "allowed_clients": '["10.0.0.0/24"]',
        "nfs_versions": "[3,4]",
        "read_only": "false",
        "labels": '{"team":"storage"}',
    }


def test_spec_keys_are_the_keys_written_and_valid_property_keys() -> None:
    assert tuple(spec_to_props(spec())) == SPEC_KEYS
    for key in SPEC_KEYS:
        assert validate_property_key(key) == key
    assert "complete" not in SPEC_KEYS  # the storage driver's completion marker


def test_a_nic_without_gateway_leaves_it_out() -> None:
    props = spec_to_props(spec(nic={"ip": "fd00::5", "prefix": 64, "network": "v6"}))
    assert props["nic"] == '{"ip":"fd00::5","network":"v6","prefix":64}'
    assert spec_from_props(props).nic.gateway is None


def test_non_ascii_labels_are_stored_as_ascii_json() -> None:
    props = spec_to_props(spec(labels={"équipe": "Zürich ☃"}))
    assert props["labels"] == '{"\\u00e9quipe":"Z\\u00fcrich \\u2603"}'
    assert spec_from_props(props).labels == {"équipe": "Zürich ☃"}


def test_the_largest_spec_fits_zfs_user_properties_as_printable_ascii() -> None:
    clients = [
        str(ipaddress.IPv6Network((0xFFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FF00 - (i << 8), 120)))
        for i in range(MAX_ALLOWED_CLIENTS)
    ]
    labels = {"k": "\x7f" * ((MAX_LABELS_BYTES - 8) // 6)}  # each escaped as \u007f
    big = spec(name="n" * 256, allowed_clients=clients, labels=labels)
    assert len(big.allowed_clients) == MAX_ALLOWED_CLIENTS
    for key, value in spec_to_props(big).items():
        assert len(value.encode()) <= MAX_PROPERTY_VALUE_BYTES, key
        assert value.isascii(), key
        assert value.isprintable(), key  # so the driver stores it as is, without base64
    assert spec_from_props(spec_to_props(big)) == big


def test_labels_larger_than_the_limit_are_refused() -> None:
    with pytest.raises(ValueError, match="more than 4096"):
        spec(labels={"k": "v" * MAX_LABELS_BYTES})


# ----------------------------------------------------------------------------- round trip

addresses_v4 = st.integers(min_value=0x0A00_0001, max_value=0x0AFF_FFFE).map(
    lambda n: str(ipaddress.IPv4Address(n))
)
any_clients = st.lists(
    st.one_of(
        st.builds(
            lambda n, p: str(ipaddress.ip_network((n, p), strict=False)),
            st.integers(0, 2**32 - 1),
            st.integers(1, 32),
        ),
        st.builds(
            lambda n, p: str(ipaddress.ip_network((n, p), strict=False)),
            st.integers(0, 2**128 - 1),
            st.integers(1, 128),
        ),
    ),
    max_size=10,
)


@st.composite
def specs(draw: st.DrawFn) -> VolumeSpec:
    ip = draw(addresses_v4)
    nic: dict[str, Any] = {
        "ip": ip,
        "prefix": 31,
        "network": draw(st.from_regex(r"\A[a-z0-9]{1,10}\Z")),
    }
    return VolumeSpec.model_validate(
        {
            "name": draw(st.from_regex(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,255}\Z")),
            "owner_uuid": str(draw(st.uuids())),
            "size_mib": draw(st.integers(1, 2**40)),
            "nic": nic,
            "allowed_clients": draw(any_clients),
            "nfs_versions": draw(st.lists(st.sampled_from([3, 4]), min_size=1, max_size=4)),
            "read_only": draw(st.booleans()),
            "labels": draw(
                st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=8)
            ),
        }
    )


@settings(max_examples=300, deadline=None)
@given(specs())
def test_specs_round_trip_through_props(value: VolumeSpec) -> None:
    props = spec_to_props(value)
    assert set(props) == set(SPEC_KEYS)
    assert all(isinstance(v, str) and v.isascii() for v in props.values())
    again = spec_from_props(props)
    assert again == value
    assert same_spec(again, value)
    assert spec_to_props(again) == props  # deterministic text


@settings(max_examples=100, deadline=None)
@given(specs(), st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9_]{0,10}\Z"), st.text(max_size=10)))
def test_unknown_props_are_ignored(value: VolumeSpec, extra: dict[str, str]) -> None:
    props = {**extra, **spec_to_props(value)}
    assert spec_from_props(props) == value


def test_values_are_canonical_so_equal_meaning_compares_equal() -> None:
    a = spec(allowed_clients=["192.168.0.0/16", "10.0.0.1", "10.0.0.1/32"], nfs_versions=[4, 3])
    b = spec(allowed_clients=["10.0.0.1", "192.168.0.0/16"], nfs_versions=[3, 4, 3])
    assert a.allowed_clients == ["10.0.0.1", "192.168.0.0/16"]
    assert same_spec(a, b)
    assert spec_to_props(a) == spec_to_props(b)


def test_spec_differences_name_the_keys_that_differ() -> None:
    base = spec()
    assert spec_differences(base, spec()) == []
    other = spec(size_mib=2048, read_only=True, labels={})
    assert spec_differences(base, other) == ["size_mib", "read_only", "labels"]
    assert not same_spec(base, other)
    moved = spec(nic={"ip": "10.0.0.6", "prefix": 24, "network": "tenant", "gateway": "10.0.0.1"})
    assert spec_differences(base, moved) == ["nic"]


# ------------------------------------------------------------------------------ bad props


@pytest.mark.parametrize(
    ("changes", "parameter", "reason"),
    [
        ({"spec_version": "2"}, "volagent:spec_version", "is not 1"),
        ({"read_only": "on"}, "volagent:read_only", "true or false"),
        ({"size_mib": "-1"}, "volagent:size_mib", "decimal integer"),
        ({"size_mib": "1e3"}, "volagent:size_mib", "decimal integer"),
        ({"size_mib": "9" * 5000}, "volagent:size_mib", "decimal integer"),
        ({"size_mib": "0"}, "volagent:size_mib", "at least 1"),
        ({"size_mib": "١٢"}, "volagent:size_mib", "decimal integer"),  # Arabic-Indic digits
        ({"nic": "{"}, "volagent:nic", "not valid JSON"),
        ({"nic": "[" * 100_000}, "volagent:nic", "not valid JSON"),
        ({"nic": '{"ip":"10.0.0.5","prefix":24}'}, "volagent:nic.network", "is required"),
        ({"allowed_clients": '["nope"]'}, "volagent:allowed_clients[0]", "IP address"),
        ({"nfs_versions": "[2]"}, "volagent:nfs_versions", "versions 3 and 4"),
        ({"labels": '{"a":1}'}, "volagent:labels.a", "must be a string"),
        ({"name": "-bad"}, "volagent:name", "must match"),
        ({"owner_uuid": "x"}, "volagent:owner_uuid", "uuid"),
    ],
)
def test_bad_props_are_refused_naming_the_property(
    changes: dict[str, str], parameter: str, reason: str
) -> None:
    props = {**spec_to_props(spec()), **changes}
    with pytest.raises(InvalidParameter) as info:
        spec_from_props(props)
    assert info.value.details["parameter"] == parameter
    assert reason in info.value.details["reason"]


@pytest.mark.parametrize("key", SPEC_KEYS)
def test_a_missing_prop_is_refused(key: str) -> None:
    props = spec_to_props(spec())
    del props[key]
    with pytest.raises(InvalidParameter) as info:
        spec_from_props(props)
    assert info.value.details == {"parameter": f"volagent:{key}", "reason": "is missing"}


# ------------------------------------------------------------------------- export and zone


def test_the_export_path_is_the_volume_name() -> None:
    assert export_path("foo") == "/foo"
    assert spec(name="My.Vol-1").export_path == "/My.Vol-1"


def test_zone_spec_carries_everything_the_runtime_needs() -> None:
    value = spec(read_only=True, nfs_versions=[4])
    zone = value.zone_spec(VOL, "/tank/volumes/" + VOL)
    assert zone == zones.ZoneSpec(
        volume_uuid=VOL,
        source="/tank/volumes/" + VOL,
        export_path="/data",
        nic=zones.Nic(ip="10.0.0.5", prefix=24, network="tenant", gateway="10.0.0.1"),
        allowed_clients=("10.0.0.0/24",),
        read_only=True,
        nfs_versions=(4,),
    )


def test_nic_subnet_and_url_host() -> None:
    v4 = Nic.model_validate({"ip": "192.168.7.9", "prefix": 20, "network": "n"})
    assert (v4.subnet, v4.url_host) == ("192.168.0.0/20", "192.168.7.9")
    v6 = Nic.model_validate({"ip": "FD00::9", "prefix": 128, "network": "n"})
    assert (v6.ip, v6.subnet, v6.url_host) == ("fd00::9", "fd00::9", "[fd00::9]")
