import asyncio
import io
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from volagent import log
from volagent.errors import ConfigError

TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if isinstance(h, log._Handler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_the_bunyan_fields(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    log.get_logger("worker").info("task finished", task_id="t-1")
    (line,) = lines(stream)
    assert list(line)[:7] == ["v", "name", "hostname", "pid", "level", "msg", "time"]
    assert line["v"] == 0
    assert line["name"] == "volagent"
    assert line["hostname"] == socket.gethostname()
    assert line["pid"] == os.getpid()
    assert line["level"] == 30
    assert line["msg"] == "task finished"
    assert "event" not in line
    assert TIME.match(line["time"])
    stamped = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%f%z")
    assert abs(datetime.now(UTC) - stamped) < timedelta(minutes=5)  # UTC, not local time
    assert line["component"] == "worker"
    assert line["task_id"] == "t-1"


def test_name_is_configurable(stream: io.StringIO) -> None:
    log.configure(stream=stream, name="volagent-test")
    log.get_logger().info("hello")
    (line,) = lines(stream)
    assert line["name"] == "volagent-test"
    assert line["component"] == __name__


@pytest.mark.parametrize(
    ("method", "number"),
    [
        ("debug", 20),
        ("info", 30),
        ("warning", 40),
        ("warn", 40),
        ("error", 50),
        ("exception", 50),
        ("critical", 60),
        ("fatal", 60),
    ],
)
def test_levels_are_bunyan_numbers(stream: io.StringIO, method: str, number: int) -> None:
    log.configure(stream=stream, level="debug")
    getattr(log.get_logger("c"), method)("event")
    assert [line["level"] for line in lines(stream)] == [number]


def test_levels_mapping() -> None:
    assert dict(log.LEVELS) == {
        "trace": 10,
        "debug": 20,
        "info": 30,
        "warn": 40,
        "error": 50,
        "fatal": 60,
    }


def test_level_filters_structlog_and_stdlib(stream: io.StringIO) -> None:
    log.configure(stream=stream, level="warn")
    logger = log.get_logger("c")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logging.getLogger("lib").info("stdlib info")
    logging.getLogger("lib").error("stdlib error")
    assert [line["msg"] for line in lines(stream)] == ["w", "stdlib error"]


def test_trace_lets_debug_through(stream: io.StringIO) -> None:
    log.configure(stream=stream, level="trace")
    log.get_logger("c").debug("d")
    logging.getLogger("lib").debug("stdlib debug")
    assert [line["level"] for line in lines(stream)] == [20, 20]


def test_unknown_level_or_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="log level"):
        log.configure(level="verbose")
    with pytest.raises(ConfigError, match="log format"):
        log.configure(fmt="xml")  # type: ignore[arg-type]  # the check guards untyped callers


def _fail() -> None:
    message = "bad volume"
    raise ValueError(message)


@pytest.mark.parametrize("how", ["exception", "exc_info", "instance"])
def test_exception_becomes_err(stream: io.StringIO, how: str) -> None:
    log.configure(stream=stream)
    logger = log.get_logger("c")
    try:
        _fail()
    except ValueError as exc:
        if how == "exception":
            logger.exception("failed")
        elif how == "exc_info":
            logger.error("failed", exc_info=True)  # noqa: G201  # this spelling is under test
        else:
            logger.error("failed", exc_info=exc)  # noqa: TRY400  # this spelling is under test
    (line,) = lines(stream)
    assert line["level"] == 50
    assert line["err"]["name"] == "ValueError"
    assert line["err"]["message"] == "bad volume"
    assert line["err"]["stack"].startswith("Traceback")
    assert "in _fail" in line["err"]["stack"]
    assert "exc_info" not in line


def test_exc_info_without_exception_adds_no_err(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    log.get_logger("c").exception("nothing raised")
    (line,) = lines(stream)
    assert "err" not in line
    assert "exc_info" not in line


def test_stdlib_records_share_the_format(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    stdlib = logging.getLogger("aiomqtt.client")
    stdlib.warning("reconnecting in %d s", 3)
    try:
        _fail()
    except ValueError:
        stdlib.exception("gave up")
    first, second = lines(stream)
    assert first["msg"] == "reconnecting in 3 s"
    assert first["level"] == 40
    assert first["component"] == "aiomqtt.client"
    assert first["v"] == 0
    assert first["pid"] == os.getpid()
    assert TIME.match(first["time"])
    assert second["level"] == 50
    assert second["err"]["name"] == "ValueError"


def test_values_that_are_not_json_are_rendered_with_str(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    log.get_logger("c").info("odd", path=Path("/tank/v1"), kinds={"a"}, n=3)
    (line,) = lines(stream)
    assert line["path"] == "/tank/v1"
    assert line["kinds"] == "{'a'}"
    assert line["n"] == 3


def test_fields_clashing_with_bunyan_are_kept_aside(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    log.get_logger("c").info("created", name="vol1", pid=12)
    (line,) = lines(stream)
    assert line["name"] == "volagent"
    assert line["pid"] == os.getpid()
    assert line["name_"] == "vol1"
    assert line["pid_"] == 12


def test_bind_adds_ids_and_restores_them(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    logger = log.get_logger("c")
    with log.bind(task_id="t-1", volume="v1"):
        logger.info("outer")
        with log.bind(task_id="t-2"):
            logger.info("inner")
            logging.getLogger("lib").info("from stdlib")
        logger.info("outer again")
    logger.info("after")
    got = [(line["msg"], line.get("task_id"), line.get("volume")) for line in lines(stream)]
    assert got == [
        ("outer", "t-1", "v1"),
        ("inner", "t-2", "v1"),
        ("from stdlib", "t-2", "v1"),
        ("outer again", "t-1", "v1"),
        ("after", None, None),
    ]


async def test_bound_ids_reach_tasks_started_inside(stream: io.StringIO) -> None:
    log.configure(stream=stream)

    async def child() -> None:
        log.get_logger("child").info("in child")
        logging.getLogger("lib").info("stdlib in child")

    with log.bind(task_id="t-1"):
        await asyncio.create_task(child())
    log.get_logger("c").info("after")
    assert [line.get("task_id") for line in lines(stream)] == ["t-1", "t-1", None]


async def test_bound_ids_do_not_leak_into_sibling_tasks(stream: io.StringIO) -> None:
    log.configure(stream=stream)
    logger = log.get_logger("c")
    both_bound = asyncio.Barrier(2)

    async def work(task_id: str) -> None:
        with log.bind(task_id=task_id):
            await both_bound.wait()
            logger.info("inside", expected=task_id)
        logger.info("outside")

    await asyncio.gather(work("a"), work("b"))
    got = lines(stream)
    inside = [line for line in got if line["msg"] == "inside"]
    assert sorted(line["task_id"] for line in inside) == ["a", "b"]
    assert all(line["task_id"] == line["expected"] for line in inside)
    assert [line.get("task_id") for line in got if line["msg"] == "outside"] == [None, None]


def test_reconfigure_takes_effect() -> None:
    first, second = io.StringIO(), io.StringIO()
    log.configure(stream=first, level="info")
    log.get_logger("c").debug("hidden")
    log.get_logger("c").info("one")
    log.configure(stream=second, level="debug", name="other")
    log.get_logger("c").debug("two")
    logging.getLogger("lib").debug("three")
    assert [line["msg"] for line in lines(first)] == ["one"]
    assert [(line["msg"], line["name"]) for line in lines(second)] == [
        ("two", "other"),
        ("three", "other"),
    ]


def test_logger_created_before_configure_follows_it(stream: io.StringIO) -> None:
    early = structlog.get_logger("early")
    log.configure(stream=stream, level="warn")
    early.info("dropped")
    early.warning("kept")
    (line,) = lines(stream)
    assert line["msg"] == "kept"
    assert line["component"] == "early"


def test_auto_picks_console_on_a_tty() -> None:
    tty = TTYStream()
    log.configure(stream=tty)
    log.get_logger("c").info("hello", volume="v1")
    out = tty.getvalue()
    assert "hello" in out
    assert "volume" in out
    assert "\x1b[" in out  # colours on a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_auto_picks_json_off_a_tty(stream: io.StringIO) -> None:
    log.configure(stream=stream, fmt="auto")
    log.get_logger("c").info("hello")
    assert lines(stream)[0]["msg"] == "hello"


def test_explicit_formats_override_the_tty_check(stream: io.StringIO) -> None:
    log.configure(stream=stream, fmt="console")
    log.get_logger("c").info("hello", volume="v1")
    out = stream.getvalue()
    assert "hello" in out
    assert "volume=v1" in out
    assert "\x1b[" not in out  # no colours off a terminal
    tty = TTYStream()
    log.configure(stream=tty, fmt="json")
    log.get_logger("c").info("hello")
    assert lines(tty)[0]["msg"] == "hello"


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(fmt="json")
    log.get_logger("c").info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["msg"] == "to stderr"
