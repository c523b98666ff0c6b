"""The central API client against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from tenacity import AsyncRetrying, RetryCallState

from tests.support.central import CentralServer
from volagent import __version__
from volagent.adapters.central import BODY_EXCERPT_CHARS, CentralClient, CentralUnavailable
from volagent.errors import InvalidParameter, VolagentError
from volagent.services.reporter import backoff_wait, heartbeat_body

VOL = "0f6c8f0e-5d6b-4a43-9a57-2d2c3b1e4f01"
CN = "44454c4c-3800-1048-8052-b3c04f4e4b31"
BODY = b'{"uuid":"0f6c8f0e-5d6b-4a43-9a57-2d2c3b1e4f01","generation":3}'


@pytest.fixture
async def server() -> AsyncIterator[CentralServer]:
    async with CentralServer() as srv:
        yield srv


def client(
    server: CentralServer, token_file: Path | None = None, timeout_s: float = 10.0
) -> CentralClient:
    return CentralClient(server.url, token_file=token_file, timeout_s=timeout_s)


async def test_put_volume_sends_the_body_as_given(server: CentralServer) -> None:
    async with client(server) as c:
        assert await c.put_volume(VOL, BODY) == 200
    (req,) = server.requests
    assert (req.method, req.path, req.body) == ("PUT", f"/volumes/{VOL}", BODY)
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == f"volagent/{__version__}"
    assert "Authorization" not in req.headers


@pytest.mark.parametrize("status", [201, 204, 409])
async def test_2xx_and_409_count_as_delivered(server: CentralServer, status: int) -> None:
    server.answer(status)
    async with client(server) as c:
        assert await c.put_volume(VOL, BODY) == status


@pytest.mark.parametrize("status", [500, 503, 400, 401, 404, 302])
async def test_other_answers_raise_central_unavailable(server: CentralServer, status: int) -> None:
    server.answer(status)
    async with client(server) as c:
        with pytest.raises(CentralUnavailable) as caught:
            await c.put_volume(VOL, BODY)
    err = caught.value
    assert (err.code, err.retryable) == ("CentralUnavailable", True)
    assert err.details["status"] == status
    assert err.details["url"] == f"{server.url}/volumes/{VOL}"
    assert err.details["body"] == f"answered {status}"
    assert str(status) in err.message
    assert len(server.requests) == 1  # a redirect is not followed


async def test_an_error_body_is_cut_short() -> None:
    async def long_error(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(status=500, text="x" * 5000)

    app = aiohttp.web.Application()
    app.router.add_put("/volumes/{uuid}", long_error)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with CentralClient(f"http://127.0.0.1:{port}", token_file=None, timeout_s=10) as c:
            with pytest.raises(CentralUnavailable) as caught:
                await c.put_volume(VOL, BODY)
        assert caught.value.details["body"] == "x" * BODY_EXCERPT_CHARS
    finally:
        await runner.cleanup()


async def test_heartbeat_posts_to_the_node(server: CentralServer) -> None:
    async with client(server) as c:
        await c.heartbeat(CN, b'{"cn":"x"}')
        server.answer(409)
        with pytest.raises(CentralUnavailable) as caught:
            await c.heartbeat(CN, b'{"cn":"x"}')
    assert caught.value.details["status"] == 409  # 409 means delivered for volumes only
    assert [(r.method, r.path, r.body) for r in server.requests] == [
        ("POST", f"/nodes/{CN}/heartbeat", b'{"cn":"x"}')
    ] * 2


async def test_a_base_path_and_trailing_slash_are_kept(server: CentralServer) -> None:
    async with CentralClient(f"{server.url}/api/v1/", token_file=None, timeout_s=10) as c:
        with pytest.raises(CentralUnavailable):  # the test server knows no /api/v1 prefix
            await c.put_volume(VOL, BODY)
    assert [r.path for r in server.requests] == [f"/api/v1/volumes/{VOL}"]


async def test_a_timeout_raises_central_unavailable(server: CentralServer) -> None:
    server.hang()
    async with client(server, timeout_s=0.2) as c, asyncio.timeout(30):
        with pytest.raises(CentralUnavailable) as caught:
            await c.put_volume(VOL, BODY)
    assert caught.value.details["status"] is None
    assert "did not answer" in caught.value.message
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert len(server.requests) == 1


async def test_a_refused_connection_raises_central_unavailable(server: CentralServer) -> None:
    await server.stop()
    async with client(server) as c, asyncio.timeout(30):
        with pytest.raises(CentralUnavailable) as caught:
            await c.put_volume(VOL, BODY)
        assert isinstance(caught.value.__cause__, aiohttp.ClientConnectionError)
        assert caught.value.details["status"] is None
        await server.start()
        assert await c.put_volume(VOL, BODY) == 200  # the same client recovers
    assert [r.status for r in server.requests] == [200]


async def test_the_token_is_read_for_every_request(server: CentralServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  first-token\n")
    async with client(server, token_file=token) as c:
        await c.put_volume(VOL, BODY)
        token.write_text("second-token")
        await c.heartbeat(CN, b"{}")
    assert [r.headers["Authorization"] for r in server.requests] == [
        "Bearer first-token",
        "Bearer second-token",
    ]


@pytest.mark.parametrize("content", [None, "  \n", b"\xff\xfe"])
async def test_an_unusable_token_file_sends_nothing(
    server: CentralServer, tmp_path: Path, content: str | bytes | None
) -> None:
    token = tmp_path / "token"
    if isinstance(content, str):
        token.write_text(content)
    elif isinstance(content, bytes):
        token.write_bytes(content)
    async with client(server, token_file=token) as c:
        with pytest.raises(CentralUnavailable, match=str(token)) as caught:
            await c.put_volume(VOL, BODY)
    assert caught.value.retryable
    assert caught.value.details["token_file"] == str(token)
    assert server.requests == []


@pytest.mark.parametrize("bad", ["../etc", "0F6C8F0E-5D6B-4A43-9A57-2D2C3B1E4F01", "", "a/b"])
async def test_malformed_ids_never_reach_a_url(server: CentralServer, bad: str) -> None:
    async with client(server) as c:
        with pytest.raises(InvalidParameter):
            await c.put_volume(bad, BODY)
        with pytest.raises(InvalidParameter) as caught:
            await c.heartbeat(bad, b"{}")
    assert caught.value.details["parameter"] == "cn"
    assert server.requests == []


async def test_a_given_session_stays_open_and_an_own_one_is_closed(server: CentralServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with CentralClient(server.url, token_file=None, timeout_s=10, session=session) as c:
            await c.put_volume(VOL, BODY)
        assert not session.closed
        own = CentralClient(server.url, token_file=None, timeout_s=10)
        async with own:
            await own.put_volume(VOL, BODY)
            opened = own._session
        assert opened is not None
        assert opened.closed
        assert own._session is None


def test_central_unavailable_is_in_the_error_tree() -> None:
    err = CentralUnavailable("down", details={"status": None})
    assert isinstance(err, VolagentError)
    assert err.wire_code == "Internal"
    assert err.to_wire()["details"] == {"status": None, "cause": "CentralUnavailable"}


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        CentralClient("http://127.0.0.1:1", token_file=None, timeout_s=0)


def test_heartbeat_body_has_the_protocol_shape() -> None:
    ts = datetime(2026, 11, 21, 10, 0, 1, 234567, tzinfo=UTC)
    pool = {"size_bytes": 4096, "free_bytes": 1024}
    body = heartbeat_body(CN, "1.2.3", ts, pool, 7, broker_connected=True)
    assert body == {
        "cn": CN,
        "agent_version": "1.2.3",
        "ts": "2026-11-21T10:00:01.234Z",
        "pool": pool,
        "volumes": 7,
        "broker": "connected",
    }
    json.dumps(body, allow_nan=False)
    unknown = heartbeat_body(CN, "1.2.3", ts, None, 0, broker_connected=False)
    assert (unknown["pool"], unknown["broker"]) == ({}, "disconnected")


def test_backoff_is_exponential_with_the_upper_half_random() -> None:
    wait = backoff_wait(0.5, 30.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (40, 30.0)]:
        state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        delays = [wait(state) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not fixed
