"""WebSocket upgrades: the handshake is sent once (a redirect is the client's answer, never
followed with the token) and messages are capped both ways at ``websocket.max_message``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from proxy.config import parse_config
from proxy.problems import ConfigError
from tests.conftest import StartProxy, StartUpstream
from tests.helpers import Recorder

WAIT = 5.0
TOKEN = "Bearer tok-WS-123"


def config(upstream: URL, websocket: str = "") -> str:
    ws = f"    websocket: {websocket}\n" if websocket else ""
    return f"""
providers:
  static: {{grant: static, token: "tok-WS-123"}}
routes:
  - prefix: /svc/
    upstream: {upstream}/base/
    provider: static
    timeout: {{connect: 2, read: 5}}
{ws}"""


def handshake() -> dict[str, str]:
    """A client's upgrade request headers, sent as a plain request to see the raw answer."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }


class Upstream:
    """An aiohttp upstream: ``/base/ws`` answers ``redirect`` (a Location) with a 307, or
    accepts and echoes; every path records what reached it, with the token it carried."""

    def __init__(self, redirect: str | None = None, send_on_open: bytes = b"") -> None:
        self.redirect = redirect
        self.send_on_open = send_on_open
        self.seen: list[tuple[str, str | None]] = []
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization")))
        if request.path != "/base/ws":
            return web.Response(text="reached")
        if self.redirect is not None:
            raise web.HTTPTemporaryRedirect(self.redirect)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        if self.send_on_open:
            await ws.send_bytes(self.send_on_open)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        if not self.closed.done():
            self.closed.set_result(ws.close_code)
        return ws


# --- redirects: relayed, never followed


@pytest.mark.parametrize(
    ("location", "relayed"),
    [
        ("/outside/of/base", "/outside/of/base"),  # outside the base: passed untouched
        ("/base/elsewhere?x=1", "/svc/elsewhere?x=1"),  # inside: mapped into the prefix
    ],
)
async def test_handshake_redirect_is_relayed_not_followed(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    location: str,
    relayed: str,
) -> None:
    up = Upstream(redirect=location)
    url = await start_upstream(up.app())
    proxy = await start_proxy(config(url))
    async with client.get(
        proxy.url / "svc" / "ws", headers=handshake(), allow_redirects=False
    ) as resp:
        assert resp.status == 307
        assert resp.headers["Location"] == relayed
        assert resp.headers["X-Request-Id"]
        assert await resp.read() == b""
    assert up.seen == [("/base/ws", TOKEN)]  # the token went once, to the route's path only


async def test_handshake_redirect_to_another_host_makes_no_connection(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    other = Recorder()
    server = await asyncio.start_server(other.handle, "127.0.0.1", 0)
    target = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/steal"
    try:
        up = Upstream(redirect=target)
        proxy = await start_proxy(config(await start_upstream(up.app())))
        async with client.get(
            proxy.url / "svc" / "ws", headers=handshake(), allow_redirects=False
        ) as resp:
            assert (resp.status, resp.headers["Location"]) == (307, target)
    finally:
        server.close()
    assert other.connections == 0 and other.received == b""
    assert up.seen == [("/base/ws", TOKEN)]


async def test_http_redirect_via_session_still_relayed(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """The session middleware stops only handshakes: a plain request's 3xx passes as ever."""
    up = Upstream(redirect="/base/x")
    proxy = await start_proxy(config(await start_upstream(up.app())))
    async with client.get(proxy.url / "svc" / "ws", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (307, "/svc/x")


# --- message size: capped both ways


async def test_client_message_over_the_cap_closes_client_1009_and_upstream_cleanly(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    proxy = await start_proxy(config(await start_upstream(up.app()), "{max_message: 1KiB}"))
    async with client.ws_connect(proxy.url / "svc" / "ws", max_msg_size=0) as ws:
        await ws.send_bytes(b"a" * 1024)  # at the cap: passes
        echoed = await asyncio.wait_for(ws.receive(), WAIT)
        assert (echoed.type, len(echoed.data)) == (WSMsgType.BINARY, 1024)
        await ws.send_bytes(b"b" * 1025)
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type == WSMsgType.CLOSE
        assert closing.data == WSCloseCode.MESSAGE_TOO_BIG
    assert await asyncio.wait_for(up.closed, WAIT) == WSCloseCode.OK


async def test_upstream_message_over_the_cap_closes_upstream_1009_and_client_cleanly(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    up = Upstream(send_on_open=b"c" * 2048)
    proxy = await start_proxy(config(await start_upstream(up.app()), "{max_message: 1KiB}"))
    async with client.ws_connect(proxy.url / "svc" / "ws", max_msg_size=0) as ws:
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type == WSMsgType.CLOSE
        assert closing.data == WSCloseCode.OK
    assert await asyncio.wait_for(up.closed, WAIT) == WSCloseCode.MESSAGE_TOO_BIG


async def test_default_cap_is_4mib_both_ways(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    proxy = await start_proxy(config(await start_upstream(up.app())))
    cap = 4 * 1024 * 1024
    async with client.ws_connect(proxy.url / "svc" / "ws", max_msg_size=0) as ws:
        await ws.send_bytes(b"d" * cap)  # at the cap, there and back (echoed)
        echoed = await asyncio.wait_for(ws.receive(), WAIT)
        assert (echoed.type, len(echoed.data)) == (WSMsgType.BINARY, cap)
        with contextlib.suppress(ConnectionError):  # the proxy may close before all is sent
            await ws.send_bytes(b"e" * (cap + 1))
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        assert closing.type != WSMsgType.CLOSE or closing.data == WSCloseCode.MESSAGE_TOO_BIG
    assert await asyncio.wait_for(up.closed, WAIT) == WSCloseCode.OK


# --- config: a bool or a mapping


def _route_ws(text: str, tmp_path: Path) -> tuple[bool, int]:
    ws = parse_config(config(URL("http://127.0.0.1:9"), text), "t.yaml", {}, tmp_path)
    setting = ws.config.routes[0].websocket
    return setting.enabled, int(setting.max_message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (True, 4 * 1024 * 1024)),
        ("false", (False, 4 * 1024 * 1024)),
        ("true", (True, 4 * 1024 * 1024)),
        ("{enabled: false}", (False, 4 * 1024 * 1024)),
        ("{max_message: 64KiB}", (True, 64 * 1024)),
    ],
)
def test_websocket_key_is_a_bool_or_a_mapping(
    text: str, expected: tuple[bool, int], tmp_path: Path
) -> None:
    assert _route_ws(text, tmp_path) == expected


@pytest.mark.parametrize("text", ["{max_message: 0}", "{max_size: 1KiB}", "maybe"])
def test_bad_websocket_setting_is_refused_at_its_key_path(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _route_ws(text, tmp_path)
    assert err.value.path.startswith("routes[0].websocket"), err.value.path
    assert "WebSocket" not in err.value.problem  # the class name is not the user's word


async def test_websocket_off_refuses_the_upgrade(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    proxy = await start_proxy(config(await start_upstream(up.app()), "{enabled: false}"))
    async with client.get(proxy.url / "svc" / "ws", headers=handshake()) as resp:
        assert resp.status == 400
    assert up.seen == []
