"""The pure parts of the ZFS driver: value encoding, output parsing, stderr classification.

Each class is proven against a real pool in tests/integration/test_zfs_*.py; the messages here
also cover the wording of OpenZFS and illumos, which this test bed cannot run.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volagent.adapters import zfs_errors as ze
from volagent.adapters.zfs import (
    MAX_USER_VALUE_BYTES,
    _parse_get,
    decode_user_value,
    encode_user_value,
)
from volagent.errors import (
    CommandError,
    InsufficientSpace,
    InvalidParameter,
    StorageUnavailable,
    VolagentError,
)


@given(st.text(max_size=2000))
def test_any_text_survives_encoding(value: str) -> None:
    stored = encode_user_value(value, param="volagent:x")
    assert stored
    assert stored.isascii()
    assert stored.isprintable()
    assert decode_user_value(stored) == value


@pytest.mark.parametrize("value", ["plain", "with spaces", "a=b,c", "-", "x" * 100])
def test_printable_ascii_is_stored_as_is(value: str) -> None:
    assert encode_user_value(value, param="p") == value


@pytest.mark.parametrize("value", ["", "tab\there", "line\n", "é", "b64:looks-encoded"])
def test_other_text_is_stored_in_base64(value: str) -> None:
    assert encode_user_value(value, param="p").startswith("b64:")


def test_value_longer_than_the_limit_is_refused_naming_the_property() -> None:
    assert len(encode_user_value("a" * MAX_USER_VALUE_BYTES, param="p")) == MAX_USER_VALUE_BYTES
    with pytest.raises(InvalidParameter) as info:
        encode_user_value("a" * (MAX_USER_VALUE_BYTES + 1), param="volagent:labels")
    assert info.value.details["parameter"] == "volagent:labels"
    with pytest.raises(InvalidParameter):  # base64 grows by a third
        encode_user_value("é" * 3100, param="p")


def test_malformed_base64_is_returned_as_stored() -> None:
    assert decode_user_value("b64:%%%") == "b64:%%%"


def test_parse_get_keeps_order_skips_unset_user_properties_and_decodes() -> None:
    text = (
        "p/a\tused\t1024\t-\n"
        "p/a\tvolagent:name\tb64:w6k=\tlocal\n"
        "p/a\tvolagent:unset\t-\t-\n"
        "p/a@s\tused\t0\t-\n"
        "p/b\tmountpoint\t/mnt/with\ttab\tinherited from p\n"
    )
    a, snap, b = _parse_get(["zfs", "get"], text)
    assert a.name == "p/a"
    assert a.values == {"used": "1024", "volagent:name": "é"}
    assert a.sources["volagent:unset"] == "-"
    assert a.get_int("used") == 1024
    assert a.is_local("volagent:name")
    assert not a.is_local("used")
    assert snap.name == "p/a@s"
    assert b.get("mountpoint") == "/mnt/with\ttab"
    assert b.sources["mountpoint"] == "inherited from p"


def test_parse_get_refuses_lines_it_cannot_read() -> None:
    with pytest.raises(ze.ZfsError, match="unparsable"):
        _parse_get(["zfs", "get"], "p/a\tused\n")


MESSAGES = [
    # zfs-fuse 0.7 (seen on the test bed)
    ("cannot open 'p/x': dataset does not exist", ze.DatasetNotFound),
    ("cannot open 'nopool': no such pool", ze.DatasetNotFound),
    ("cannot release 't' from 'p/a@s': no such tag on this dataset", ze.DatasetNotFound),
    ("cannot create 'p/a': dataset already exists", ze.DatasetExists),
    ("cannot hold 'p/a@s': tag already exists on this dataset", ze.DatasetExists),
    (
        (
            "cannot receive new filesystem stream: destination 'p/r' exists\n"
            "must specify -F to overwrite it"
        ),
        ze.DatasetExists,
    ),
    ("cannot destroy 'p/a': dataset is busy", ze.DatasetBusy),
    (
        "umount: /m/a: target is busy.\ncannot unmount '/m/a': umount failed",
        ze.DatasetBusy,
    ),
    ("cannot destroy 'p/a': filesystem has children", ze.HasDependents),
    ("cannot destroy 'p/a@s': snapshot has dependent clones", ze.HasDependents),
    ("cannot rollback to 'p/a@s': more recent snapshots exist", ze.NewerSnapshotsExist),
    (
        (
            "cannot receive incremental stream: most recent snapshot of p/r does not\n"
            "match incremental source"
        ),
        ze.IncrementalMismatch,
    ),
    (
        "warning: cannot send 'p/a@s1': not an earlier snapshot from the same fs",
        ze.IncrementalMismatch,
    ),
    (
        (
            "cannot receive incremental stream: destination p/r has been modified\n"
            "since most recent snapshot"
        ),
        ze.TargetModified,
    ),
    ("cannot create snapshot 'p/a@s': out of space", ze.OutOfSpace),
    ("cannot set property for 'p/a': size is greater than available space", ze.OutOfSpace),
    (
        "cannot set property for 'p/a': size is less than current used or reserved space",
        ze.QuotaExceeded,
    ),
    (
        (
            "cannot mount '/m/a/c': failed to create mountpoint\n"
            "filesystem successfully created, but not mounted"
        ),
        ze.MountFailed,
    ),
    ("invalid option 'p'\nusage:\n\tlist [-rH]", ze.UnsupportedOption),
    ("unrecognized command 'bookmark'", ze.UnsupportedOption),
    (
        (
            "connect: No such file or directory\nPlease make sure that the zfs-fuse daemon is "
            "running.\ninternal error: failed to initialize ZFS library"
        ),
        ze.ZfsUnavailable,
    ),
    # OpenZFS 2.x and illumos wording
    ("The ZFS modules are not loaded.\nTry running 'modprobe zfs'", ze.ZfsUnavailable),
    ("Failed to initialize the libzfs library.", ze.ZfsUnavailable),
    ("cannot open 'p': pool I/O is currently suspended", ze.ZfsUnavailable),
    ("could not find any snapshots to destroy; check snapshot names.", ze.DatasetNotFound),
    ("cannot unmount '/m/a': pool or dataset is busy", ze.DatasetBusy),
    ("cannot receive: destination p/r space quota exceeded.", ze.QuotaExceeded),
    (
        "cannot rollback to 'p/a@s': more recent snapshots or bookmarks exist",
        ze.NewerSnapshotsExist,
    ),
    ("cannot frobnicate: something new", ze.ZfsError),
]


@pytest.mark.parametrize(("stderr", "cls"), MESSAGES)
def test_classify(stderr: str, cls: type[ze.ZfsError]) -> None:
    err = ze.classify(["zfs", "verb", "x"], 1, stderr)
    assert type(err) is cls
    assert err.argv == ("zfs", "verb", "x")
    assert err.stderr == stderr
    assert err.message.startswith("zfs verb failed: ")


def test_error_classes_fit_the_protocol_tree() -> None:
    assert issubclass(ze.OutOfSpace, InsufficientSpace)
    assert issubclass(ze.OutOfSpace, CommandError)
    assert ze.OutOfSpace.code == "InsufficientSpace"
    assert issubclass(ze.ZfsUnavailable, StorageUnavailable)
    unavailable = ze.ZfsUnavailable("x", argv=["zfs"])
    assert unavailable.retryable
    assert unavailable.wire_code == "StorageUnavailable"
    busy = ze.DatasetBusy("x", argv=["zfs"])
    assert not busy.retryable
    assert busy.wire_code == "Internal"
    codes = [
        cls.code
        for cls in (
            ze.ZfsError,
            ze.DatasetNotFound,
            ze.DatasetExists,
            ze.DatasetBusy,
            ze.HasDependents,
            ze.QuotaExceeded,
            ze.IncrementalMismatch,
            ze.TargetModified,
            ze.NewerSnapshotsExist,
            ze.MountFailed,
            ze.UnsupportedOption,
        )
    ]
    assert len(set(codes)) == len(codes)
    assert all(issubclass(cls, VolagentError) for cls in (ze.ZfsError, ze.OutOfSpace))
