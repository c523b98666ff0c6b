from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import socket
import stat
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from tests.support.run import sh
from volagent import log
from volagent.errors import ConfigError, StartupError, VolagentError
from volagent.http import Check, LocalApi, NodeView
from volagent.http.openapi import document, render
from volagent.http.routes import ROUTES, ApiErrorCode
from volagent.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
VOLUME = "6f1c2d3e-4a5b-4c6d-8e7f-901234567890"
TASK = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CN = "3c8e0a52-1b7d-4d5e-9f60-0123456789ab"


class FakeView:
    """A NodeView whose answers a test sets; records the calls it gets."""

    def __init__(self) -> None:
        self.checks = [
            Check("broker", ok=True, detail="connected"),
            Check("zfs", ok=True, detail="pool tank online"),
            Check("zones", ok=True, detail="2 running"),
            Check("central", ok=True, detail="outbox empty"),
        ]
        self.registry = Metrics(version="9.9.9")
        self.volume_objects: dict[str, dict[str, Any]] = {
            VOLUME: {"uuid": VOLUME, "name": "data", "state": "ready", "generation": 3}
        }
        self.tasks: dict[str, dict[str, Any]] = {
            TASK: {
                "id": TASK,
                "kind": "volume.get",
                "state": "succeeded",
                "received": datetime(2026, 11, 21, 10, 0, 0, 123000, tzinfo=UTC),
                "started": "2026-11-21T10:00:00.200Z",
                "finished": "2026-11-21T10:00:00.300Z",
                "attempts": 1,
                "volume_uuid": VOLUME,
                "result": {"uuid": VOLUME},
                "error": None,
            }
        }
        self.calls: list[str] = []
        self.fail: Exception | None = None
        self.hang = False
        self.entered = asyncio.Event()

    async def _enter(self, name: str) -> None:
        self.calls.append(name)
        self.entered.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail

    async def ready(self) -> list[Check]:
        await self._enter("ready")
        return self.checks

    async def status(self) -> Mapping[str, Any]:
        await self._enter("status")
        return {
            "version": "9.9.9",
            "cn": CN,
            "uptime_s": 12.5,
            "broker": {"connected": True, "since": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},
            "tasks": {"received": 0, "running": 1, "succeeded": 4, "failed": 0},
            "volumes": {"ready": 1, "total": 1},
        }

    async def volumes(self) -> list[Mapping[str, Any]]:
        await self._enter("volumes")
        return list(self.volume_objects.values())

    async def volume(self, uuid: str) -> Mapping[str, Any] | None:
        await self._enter("volume")
        return self.volume_objects.get(uuid)

    async def task(self, task_id: str) -> Mapping[str, Any] | None:
        await self._enter("task")
        return self.tasks.get(task_id)

    async def metrics(self) -> bytes:
        await self._enter("metrics")
        return self.registry.render()


def _is_view(view: NodeView) -> NodeView:
    return view


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
async def api(view: FakeView) -> AsyncIterator[LocalApi]:
    server = LocalApi(
        _is_view(view), listen="127.0.0.1:0", allow_non_loopback=False, view_timeout_s=1.0
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(api: LocalApi) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(f"http://{api.address}", timeout=timeout) as session:
        yield session


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure(level="info", fmt="json", stream=stream)
    yield stream
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, log._Handler)]:
        root.removeHandler(handler)
        handler.close()


def _lines(stream: io.StringIO, msg: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    return [line for line in lines if line["msg"] == msg]


async def _get(
    client: aiohttp.ClientSession, path: str, method: str = "GET"
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with client.request(method, path) as response:
        body = await response.read()
        if response.content_type == "application/json":
            return response.status, json.loads(body), response
        return response.status, body, response


def _error(body: Any) -> tuple[str, str]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return body["error"]["code"], body["error"]["message"]


# ---------------------------------------------------------------- routes


async def test_health_answers_without_asking_the_view(
    client: aiohttp.ClientSession, view: FakeView
) -> None:
    view.hang = True
    status, body, response = await _get(client, "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert view.calls == []


async def test_ready_when_every_check_is_ok(client: aiohttp.ClientSession) -> None:
    status, body, _ = await _get(client, "/ready")
    assert status == 200
    assert body == {
        "ready": True,
        "checks": {
            "broker": {"ok": True, "detail": "connected"},
            "zfs": {"ok": True, "detail": "pool tank online"},
            "zones": {"ok": True, "detail": "2 running"},
            "central": {"ok": True, "detail": "outbox empty"},
        },
    }


async def test_not_ready_when_one_check_fails(
    client: aiohttp.ClientSession, view: FakeView
) -> None:
    view.checks[1] = Check("zfs", ok=False, detail="zfs does not answer")
    status, body, _ = await _get(client, "/ready")
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["zfs"] == {"ok": False, "detail": "zfs does not answer"}
    assert body["checks"]["broker"]["ok"] is True


async def test_status_is_the_views_document_with_timestamps_written_out(
    client: aiohttp.ClientSession,
) -> None:
    status, body, _ = await _get(client, "/status")
    assert status == 200
    assert body["cn"] == CN
    assert body["broker"] == {"connected": True, "since": "2026-01-02T03:04:05.000Z"}
    assert body["volumes"] == {"ready": 1, "total": 1}


async def test_metrics_are_the_prometheus_text_format(
    client: aiohttp.ClientSession, view: FakeView
) -> None:
    view.registry.task_finished("volume.create", "succeeded", None, 0.5)
    status, body, response = await _get(client, "/metrics")
    assert status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    key = ("volagent_tasks_total", (("kind", "volume.create"), ("outcome", "succeeded")))
    assert samples[key] == 1.0
    view.registry.task_finished("volume.create", "succeeded", None, 0.5)
    _, again, _ = await _get(client, "/metrics")
    assert 'volagent_tasks_total{kind="volume.create",outcome="succeeded"} 2.0' in again.decode()


async def test_volumes_lists_the_volume_objects(client: aiohttp.ClientSession) -> None:
    status, body, _ = await _get(client, "/volumes")
    assert status == 200
    assert body == {
        "volumes": [{"uuid": VOLUME, "name": "data", "state": "ready", "generation": 3}]
    }


async def test_one_volume_by_uuid(client: aiohttp.ClientSession) -> None:
    status, body, _ = await _get(client, f"/volumes/{VOLUME}")
    assert status == 200
    assert body["uuid"] == VOLUME


async def test_an_absent_volume_is_404_volume_not_found(client: aiohttp.ClientSession) -> None:
    absent = "00000000-0000-4000-8000-000000000000"
    status, body, _ = await _get(client, f"/volumes/{absent}")
    assert status == 404
    code, message = _error(body)
    assert code == "VolumeNotFound"
    assert absent in message


@pytest.mark.parametrize(
    "bad", ["nope", VOLUME.upper(), VOLUME + "0", "6f1c2d3e4a5b4c6d8e7f901234567890", "%20"]
)
async def test_a_malformed_volume_uuid_is_400_and_never_reaches_the_view(
    client: aiohttp.ClientSession, view: FakeView, bad: str
) -> None:
    status, body, _ = await _get(client, f"/volumes/{bad}")
    assert status == 400
    code, message = _error(body)
    assert code == "InvalidParameter"
    assert "uuid" in message
    assert view.calls == []


async def test_one_task_by_id(client: aiohttp.ClientSession) -> None:
    status, body, _ = await _get(client, f"/tasks/{TASK}")
    assert status == 200
    assert body["state"] == "succeeded"
    assert body["received"] == "2026-11-21T10:00:00.123Z"
    assert set(body) == {
        "id",
        "kind",
        "state",
        "received",
        "started",
        "finished",
        "attempts",
        "volume_uuid",
        "result",
        "error",
    }


async def test_an_unknown_task_is_404_task_not_found(client: aiohttp.ClientSession) -> None:
    status, body, _ = await _get(client, f"/tasks/{VOLUME}")
    assert status == 404
    assert _error(body)[0] == "TaskNotFound"


async def test_a_malformed_task_id_is_400(client: aiohttp.ClientSession, view: FakeView) -> None:
    status, body, _ = await _get(client, "/tasks/42")
    assert status == 400
    code, message = _error(body)
    assert code == "InvalidParameter"
    assert "id" in message
    assert view.calls == []


async def test_unknown_paths_are_404_json(client: aiohttp.ClientSession) -> None:
    for path in ("/", "/nope", "/volumes/", f"/volumes/{VOLUME}/snapshots", "/health/x"):
        status, body, _ = await _get(client, path)
        assert status == 404, path
        assert _error(body)[0] == "NotFound"


async def test_methods_other_than_get_are_405_json(client: aiohttp.ClientSession) -> None:
    for method, path in (("POST", "/health"), ("DELETE", f"/volumes/{VOLUME}"), ("PUT", "/ready")):
        status, body, response = await _get(client, path, method)
        assert status == 405, (method, path)
        code, message = _error(body)
        assert code == "MethodNotAllowed"
        assert method in message
        assert response.headers["Allow"] == "GET"


# ---------------------------------------------------------------- failures


async def test_a_failing_view_answers_500_logs_it_and_the_server_carries_on(
    client: aiohttp.ClientSession, view: FakeView, log_lines: io.StringIO
) -> None:
    view.fail = VolagentError("journal is gone")
    status, body, _ = await _get(client, "/status")
    assert status == 500
    code, message = _error(body)
    assert code == "Internal"
    assert "journal is gone" not in message
    [line] = _lines(log_lines, "http request failed")
    assert line["status"] == 500
    assert line["path"] == "/status"
    assert line["err"]["message"] == "journal is gone"
    view.fail = None
    status, _, _ = await _get(client, "/status")
    assert status == 200


async def test_a_value_the_view_cannot_encode_answers_500(
    client: aiohttp.ClientSession, view: FakeView
) -> None:
    view.volume_objects[VOLUME]["weird"] = {1, 2}
    status, body, _ = await _get(client, f"/volumes/{VOLUME}")
    assert status == 500
    assert _error(body)[0] == "Internal"


async def test_a_view_that_does_not_answer_in_time_gives_503(
    client: aiohttp.ClientSession, view: FakeView, log_lines: io.StringIO
) -> None:
    view.hang = True
    status, body, _ = await _get(client, "/ready")
    assert status == 503
    code, message = _error(body)
    assert code == "Unavailable"
    assert "1 s" in message
    [line] = _lines(log_lines, "http request timed out")
    assert (line["path"], line["status"], line["level"]) == ("/ready", 503, 40)
    view.hang = False
    status, _, _ = await _get(client, "/ready")
    assert status == 200


async def test_one_access_log_line_per_request(
    client: aiohttp.ClientSession, log_lines: io.StringIO
) -> None:
    await _get(client, "/health")
    await _get(client, "/nope")
    await _get(client, "/health", "POST")
    lines = _lines(log_lines, "http request")
    assert [(ln["method"], ln["path"], ln["status"]) for ln in lines] == [
        ("GET", "/health", 200),
        ("GET", "/nope", 404),
        ("POST", "/health", 405),
    ]
    for line in lines:
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0
        assert line["component"] == "volagent.http.app"
    assert "aiohttp.access" not in log_lines.getvalue()


# ---------------------------------------------------------------- OpenAPI


async def test_openapi_json_is_the_document_built_from_the_route_table(
    client: aiohttp.ClientSession, api: LocalApi
) -> None:
    status, body, _ = await _get(client, "/openapi.json")
    assert status == 200
    assert body == document()
    assert body["openapi"] == "3.1.0"
    served = {
        (resource.canonical, route.method)
        for resource in api._app.router.resources()
        for route in resource
    }
    documented = {(path, method.upper()) for path, ops in body["paths"].items() for method in ops}
    assert served == documented


def test_the_committed_document_is_current() -> None:
    path = ROOT / "docs" / "openapi.json"
    assert path.read_text(encoding="utf-8") == render(document()), (
        "docs/openapi.json is out of date with the code; run scripts/gen-openapi"
    )


def test_gen_openapi_checks_and_rewrites_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "gen-openapi"
    shutil.copy(ROOT / "scripts" / "gen-openapi", script)
    out = tmp_path / "docs" / "openapi.json"
    out.parent.mkdir()
    out.write_text("{}\n")

    stale = sh([sys.executable, str(script), "--check"], check=False)
    assert "docs/openapi.json is not current; run scripts/gen-openapi" in stale
    with pytest.raises(RuntimeError, match="exited 1"):
        sh([sys.executable, str(script), "--check"])
    assert out.read_text() == "{}\n"  # --check writes nothing

    assert sh([sys.executable, str(script)]) == "wrote docs/openapi.json\n"
    assert out.read_text(encoding="utf-8") == render(document())
    assert sh([sys.executable, str(script), "--check"]) == ""


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_of_the_document_resolves() -> None:
    doc = document()
    refs = set(_refs(doc))
    assert "#/components/schemas/Volume" in refs
    prefix = "#/components/schemas/"
    assert all(ref.startswith(prefix) for ref in refs)
    assert {ref.removeprefix(prefix) for ref in refs} <= set(doc["components"]["schemas"])


def test_routes_that_ask_the_view_document_500_and_503() -> None:
    doc = document()
    for route in ROUTES:
        responses = doc["paths"][route.path]["get"]["responses"]
        assert "200" in responses
        assert ("500" in responses) is route.asks_view
        assert ("503" in responses) is route.asks_view
    ready_503 = doc["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]
    assert {s["$ref"] for s in ready_503["schema"]["oneOf"]} == {
        "#/components/schemas/Ready",
        "#/components/schemas/ApiError",
    }
    codes = doc["components"]["schemas"]["ApiError"]["properties"]["error"]["properties"]["code"]
    assert set(codes["enum"]) == {code.value for code in ApiErrorCode}


def test_documented_path_parameters_match_the_paths() -> None:
    for path, ops in document()["paths"].items():
        params = {p["name"] for p in ops["get"].get("parameters", [])}
        in_path = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        assert params == in_path, path


async def test_real_answers_carry_the_documented_required_fields(
    client: aiohttp.ClientSession,
) -> None:
    schemas = document()["components"]["schemas"]
    for path, schema in (("/health", "Health"), ("/ready", "Ready"), ("/status", "Status")):
        _, body, _ = await _get(client, path)
        assert set(schemas[schema]["required"]) <= set(body), path
    _, body, _ = await _get(client, f"/tasks/{TASK}")
    assert set(schemas["Task"]["required"]) == set(body)


# ---------------------------------------------------------------- listening


def test_a_non_loopback_address_is_refused_unless_allowed(view: FakeView) -> None:
    for listen in ("0.0.0.0:5310", "192.0.2.1:5310", "[::]:5310", "example.com:5310"):
        with pytest.raises(ConfigError, match="allow_non_loopback") as info:
            LocalApi(view, listen=listen, allow_non_loopback=False)
        assert info.value.problems[0][0] == "http.listen"
        LocalApi(view, listen=listen, allow_non_loopback=True)


@pytest.mark.parametrize(
    "listen",
    ["", "5310", "127.0.0.1", "::1:5310", "[nope]:5310", "127.0.0.1:65536", "127.0.0.1:x",
     "unix:relative.sock", "unix:/" + "x" * 120],
)  # fmt: skip
def test_a_malformed_listen_address_is_a_config_error(view: FakeView, listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        LocalApi(view, listen=listen, allow_non_loopback=True)
    assert info.value.problems[0][0] == "http.listen"


async def test_ipv6_loopback_with_port_0_reports_the_bound_port(view: FakeView) -> None:
    server = LocalApi(view, listen="[::1]:0", allow_non_loopback=False)
    await server.start()
    try:
        assert server.address.startswith("[::1]:")
        port = int(server.address.rsplit(":", 1)[1])
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://[::1]:{port}/health") as response,
        ):
            assert response.status == 200
    finally:
        await server.stop()


async def test_a_port_in_use_is_a_startup_error(view: FakeView, api: LocalApi) -> None:
    other = LocalApi(view, listen=api.address, allow_non_loopback=False)
    with pytest.raises(StartupError, match="cannot listen"):
        await other.start()
    with pytest.raises(VolagentError, match="not started"):
        _ = other.address


async def test_address_before_start_and_after_stop(view: FakeView) -> None:
    server = LocalApi(view, listen="localhost:0", allow_non_loopback=False)
    with pytest.raises(VolagentError, match="not started"):
        _ = server.address
    await server.start()
    with pytest.raises(VolagentError, match="already started"):
        await server.start()
    address = server.address
    await server.stop()
    await server.stop()
    with pytest.raises(VolagentError, match="not started"):
        _ = server.address
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://{address}/health")


async def test_stop_is_bounded_while_a_request_hangs(view: FakeView) -> None:
    server = LocalApi(
        view,
        listen="127.0.0.1:0",
        allow_non_loopback=False,
        view_timeout_s=120.0,
        shutdown_timeout_s=0.5,
    )
    await server.start()
    view.hang = True
    async with aiohttp.ClientSession(f"http://{server.address}") as session:
        request = asyncio.ensure_future(session.get("/status"))
        await asyncio.wait_for(view.entered.wait(), 30)
        await asyncio.wait_for(server.stop(), 30)  # far above the 0.5 s it should take
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(request, 30)


# ---------------------------------------------------------------- unix socket


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


def _mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None


async def _unix_get(path: Path, url: str) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://localhost{url}") as response,
    ):
        return response.status, await response.json()


async def test_serves_on_a_unix_socket_with_mode_0660(view: FakeView, sock_path: Path) -> None:
    server = LocalApi(view, listen=f"unix:{sock_path}", allow_non_loopback=False)
    await server.start()
    try:
        assert server.address == f"unix:{sock_path}"
        mode = _mode(sock_path) or 0
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
        assert await _unix_get(sock_path, "/health") == (200, {"status": "ok"})
        status, body = await _unix_get(sock_path, f"/volumes/{VOLUME}")
        assert (status, body["uuid"]) == (200, VOLUME)
        status, body = await _unix_get(sock_path, "/nope")
        assert (status, body["error"]["code"]) == (404, "NotFound")
    finally:
        await server.stop()
    assert _mode(sock_path) is None


async def test_a_stale_socket_file_is_replaced(view: FakeView, sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays; nobody listens on it
    assert stat.S_ISSOCK(_mode(sock_path) or 0)
    server = LocalApi(view, listen=f"unix:{sock_path}", allow_non_loopback=False)
    await server.start()
    try:
        assert await _unix_get(sock_path, "/health") == (200, {"status": "ok"})
    finally:
        await server.stop()


async def test_a_socket_another_server_serves_is_left_alone(
    view: FakeView, sock_path: Path
) -> None:
    first = LocalApi(view, listen=f"unix:{sock_path}", allow_non_loopback=False)
    await first.start()
    try:
        second = LocalApi(view, listen=f"unix:{sock_path}", allow_non_loopback=False)
        with pytest.raises(StartupError, match="another process serves it"):
            await second.start()
        assert await _unix_get(sock_path, "/health") == (200, {"status": "ok"})
    finally:
        await first.stop()


async def test_a_path_that_is_not_a_socket_is_left_alone(view: FakeView, sock_path: Path) -> None:
    os.mkfifo(sock_path, 0o600)
    server = LocalApi(view, listen=f"unix:{sock_path}", allow_non_loopback=False)
    with pytest.raises(StartupError, match="not a socket"):
        await server.start()
    assert stat.S_ISFIFO(_mode(sock_path) or 0)


async def test_a_missing_socket_directory_is_a_startup_error(
    view: FakeView, tmp_path: Path
) -> None:
    path = tmp_path / "absent" / "api.sock"
    server = LocalApi(view, listen=f"unix:{path}", allow_non_loopback=False)
    with pytest.raises(StartupError, match="cannot listen"):
        await server.start()
