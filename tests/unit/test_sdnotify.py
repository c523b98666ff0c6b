from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from volagent.adapters.sdnotify import Notifier

RECV_TIMEOUT_S = 5.0  # generous: only guards against a hang


class Receiver:
    """A real AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Every datagram queued now, without waiting."""
        got: list[bytes] = []
        self.sock.settimeout(0)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except BlockingIOError:
            return got
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECV_TIMEOUT_S)
        yield Receiver(sock, str(path))


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"volagent-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT_S)
        yield Receiver(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def receiver(
    request: pytest.FixtureRequest, path_receiver: Receiver, abstract_receiver: Receiver
) -> Receiver:
    return path_receiver if request.param == "path" else abstract_receiver


def test_every_notification_is_one_datagram_with_exact_bytes(receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": receiver.notify_socket}
    notifier = Notifier.from_env(env)
    assert notifier.enabled

    notifier.ready()
    assert receiver.recv() == b"READY=1"
    notifier.ready("serving 3 volumes")
    assert receiver.recv() == b"READY=1\nSTATUS=serving 3 volumes"
    notifier.status("reconciling: 2 of 7 zones")
    assert receiver.recv() == b"STATUS=reconciling: 2 of 7 zones"
    notifier.watchdog()
    assert receiver.recv() == b"WATCHDOG=1"
    notifier.stopping()
    assert receiver.recv() == b"STOPPING=1"
    assert receiver.pending() == []


def test_reloading_carries_the_monotonic_time_in_microseconds(receiver: Receiver) -> None:
    notifier = Notifier(receiver.notify_socket, monotonic_ns=lambda: 1_234_567_891)
    notifier.reloading()
    assert receiver.recv() == b"RELOADING=1\nMONOTONIC_USEC=1234567"


def test_reloading_uses_the_monotonic_clock_by_default(receiver: Receiver) -> None:
    before = time.monotonic_ns() // 1000
    Notifier(receiver.notify_socket).reloading()
    first, second = receiver.recv().split(b"\n")
    after = time.monotonic_ns() // 1000
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_kept_to_one_line_and_utf8(receiver: Receiver) -> None:
    notifier = Notifier(receiver.notify_socket)
    notifier.status("zone failed:\nganesha exited\r\nREADY=1\0x")
    assert receiver.recv() == b"STATUS=zone failed: ganesha exited READY=1 x"
    notifier.status("volume \u00e9t\u00e9 \udcff")
    assert receiver.recv() == "STATUS=volume \u00e9t\u00e9 ?".encode()


def test_without_notify_socket_every_method_is_a_no_op() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        notifier = Notifier.from_env(env)
        assert not notifier.enabled
        assert notifier.watchdog_interval_s is None
        with capture_logs() as logs:
            notifier.ready("x")
            notifier.status("x")
            notifier.watchdog()
            notifier.stopping()
            notifier.reloading()
        assert logs == []


def test_an_unsupported_address_disables_with_a_warning() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "100"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("sdnotify_socket_unsupported", "warning")
    ]
    with pytest.raises(ValueError, match="not a socket path"):
        Notifier("@")
    with pytest.raises(ValueError, match="not a socket path"):
        Notifier("relative/path")


def test_a_send_failure_never_raises_and_warns_once(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.status("still here")
    assert len(logs) == 1
    assert logs[0]["event"] == "sdnotify_send_failed"
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["notification"] == "READY=1"
    assert logs[0]["notify_socket"] == str(tmp_path / "nobody-listens")


def test_a_full_receiver_queue_does_not_block_the_sender(path_receiver: Receiver) -> None:
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    notifier = Notifier(path_receiver.notify_socket)
    with capture_logs() as logs:
        # Nobody reads: past the queue length a blocking send would wait for the reader.
        def ping() -> None:
            for _ in range(qlen + 5):
                notifier.watchdog()

        sender = threading.Thread(target=ping)
        sender.start()
        sender.join(timeout=30)
        stuck = sender.is_alive()
        queued = path_receiver.pending()  # unblocks a stuck sender before the assertions
    sender.join(timeout=30)
    assert not stuck
    assert 1 <= len(queued) < qlen + 5
    assert set(queued) == {b"WATCHDOG=1"}
    assert [e["event"] for e in logs] == ["sdnotify_send_failed"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", "self", 15.0),
        ("30000000", None, 15.0),
        ("1", "self", 0.0000005),
        ("30000000", "other", None),
        ("30000000", "not-a-pid", None),
        ("0", "self", None),
        ("-30", "self", None),
        ("30s", "self", None),
        ("", "self", None),
        (None, "self", None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    usec: str | None, pid: str | None, expected: float | None
) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(
            pid, pid
        )
    assert Notifier.from_env(env).watchdog_interval_s == expected


def test_unset_removes_the_variables_so_children_do_not_inherit_them() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    kept = Notifier.from_env(dict(env))
    notifier = Notifier.from_env(env, unset=True)
    assert env == {"PATH": "/usr/bin"}
    assert notifier.enabled
    assert notifier.watchdog_interval_s == kept.watchdog_interval_s == 15.0


def test_from_env_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, abstract_receiver: Receiver
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_receiver.notify_socket)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval_s == 2.0
    notifier.watchdog()
    assert abstract_receiver.recv() == b"WATCHDOG=1"
