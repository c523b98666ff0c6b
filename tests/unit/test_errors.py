from __future__ import annotations

import pytest

from volagent import errors


def test_every_protocol_code_has_a_class_and_shared_codes_are_refinements() -> None:
    import volagent.adapters.zfs_errors  # noqa: F401, PLC0415  # its classes join the tree

    classes = errors.all_error_classes()
    by_code: dict[str, list[type[errors.VolagentError]]] = {}
    for cls in classes:
        by_code.setdefault(cls.code, []).append(cls)
    for code in errors.WIRE_CODES:
        assert code in by_code, f"no class for wire code {code}"
    # A code names one kind of failure: classes sharing it all refine the first class that
    # defined it (an adapter's OutOfSpace is an InsufficientSpace with the same wire code).
    for code, group in by_code.items():
        root = group[0]
        strays = [c.__name__ for c in group if not issubclass(c, root)]
        assert strays == [], f"{code} is used by unrelated classes {strays} and {root.__name__}"


def test_protocol_error_goes_on_the_wire_with_its_code() -> None:
    exc = errors.VolumeInUse("clients connected", details={"clients": ["10.0.0.5"]})
    assert exc.to_wire() == {
        "code": "VolumeInUse",
        "message": "clients connected",
        "retryable": False,
        "details": {"clients": ["10.0.0.5"]},
    }


def test_internal_error_goes_on_the_wire_as_internal_with_its_cause() -> None:
    exc = errors.CommandError("zfs failed", argv=["zfs", "list"], returncode=1, stderr="boom")
    wire = exc.to_wire()
    assert wire["code"] == "Internal"
    assert wire["details"]["cause"] == "CommandFailed"
    assert wire["details"]["argv"] == ["zfs", "list"]
    assert wire["details"]["stderr"] == "boom"


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (errors.StorageUnavailable, True),
        (errors.CommandTimeout, True),
        (errors.VolumeNotFound, False),
        (errors.CommandError, False),
    ],
)
def test_retryable_defaults(cls: type[errors.VolagentError], retryable: bool) -> None:
    if issubclass(cls, errors.CommandError):
        exc: errors.VolagentError = cls("x", argv=["true"])
    else:
        exc = cls("x")
    assert exc.retryable is retryable


def test_retryable_can_be_set_per_instance_without_touching_the_class() -> None:
    exc = errors.VolumeNotFound("gone", retryable=True)
    assert exc.retryable is True
    assert errors.VolumeNotFound("gone").retryable is False


def test_exit_codes() -> None:
    assert errors.ConfigError("bad", [("mqtt.url", "no")]).exit_code == errors.EXIT_CONFIG == 78
    assert errors.StartupError("no zfs").exit_code == errors.EXIT_STARTUP
    assert errors.VolumeNotFound("x").exit_code == errors.EXIT_FAILURE


def test_config_error_keeps_its_problems() -> None:
    exc = errors.ConfigError("2 problems", [("node.uuid", "missing"), ("mqtt.url", "bad")])
    assert exc.problems == [("node.uuid", "missing"), ("mqtt.url", "bad")]
    assert exc.to_wire()["details"]["problems"] == [["node.uuid", "missing"], ["mqtt.url", "bad"]]
