"""What the proxy answers itself on both server paths, over raw sockets: TRACE and TRACK on
a route with a provider and CONNECT on any route are 405 before anything is forwarded;
an ``Upgrade`` the proxy does not tunnel (``h2c``) is ignored and the request served as
HTTP/1.1, with a request pipelined behind it answered too.

The lean server serves a plain request itself; a chunked request first on the connection
hands it to aiohttp for good, so the same bytes after it are aiohttp's path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from yarl import URL

from proxy.forward.methods import refuse_method
from proxy.forward.websocket import is_websocket_upgrade
from proxy.problems import MethodNotAllowed
from tests.conftest import StartProxy
from tests.helpers import Answer, assert_problem
from tests.helpers import raw_request as req
from tests.test_server import connect

TOKEN = "tok-TRACE-secret"
HAND_OVER = req("/open/first", "Transfer-Encoding: chunked\r\n", method="POST", body=b"0\r\n\r\n")
PATHS = {"lean": b"", "aiohttp": HAND_OVER}


class EchoUpstream:
    """A raw upstream that honours TRACE as Apache does: the request head is the body."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if b"transfer-encoding: chunked" in head.lower():
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readexactly(2)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def methods(self) -> list[bytes]:
        return [h.split(b" ", 1)[0] for h in self.heads]


@asynccontextmanager
async def echo_upstream() -> AsyncIterator[tuple[EchoUpstream, URL]]:
    up = EchoUpstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    try:
        yield up, URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    finally:
        server.close()


def config(up: URL) -> str:
    return f"""
providers:
  static: {{grant: static, token: "{TOKEN}"}}
routes:
  - prefix: /svc/
    upstream: {up}/base/
    provider: static
  - prefix: /open/
    upstream: {up}/o/
"""


async def exchange(port: int, first: bytes, request: bytes, method: str) -> list[Answer]:
    """``first`` (the hand-over, or nothing), ``request`` and a pipelined GET, in one write."""
    after = req("/svc/after", "Connection: close\r\n")
    async with connect(port) as c:
        await c.send(first + request + after)
        answers = [await c.answer()] if first else []
        answers += [await c.answer(method), await c.answer()]
        assert await c.closed() == b""
    return answers[-2:]


def same_problem(a: Answer, b: Answer) -> None:
    """The lean and aiohttp answers agree but for the request id and the date."""
    varying = {"date", "x-request-id"}
    assert {k.lower() for k in a.headers} - varying == {k.lower() for k in b.headers} - varying
    doc_a, doc_b = a.json(), b.json()
    doc_a.pop("request_id"), doc_b.pop("request_id")
    assert doc_a == doc_b and a.headers["Allow"] == b.headers["Allow"]


async def test_trace_is_405_on_a_provider_route_on_both_paths(start_proxy: StartProxy) -> None:
    method = "TRACE"
    async with echo_upstream() as (up, url):
        proxy = await start_proxy(config(url))
        answers = {}
        for path, first in PATHS.items():
            refused, after = await exchange(proxy.port, first, req("/svc/t", method=method), method)
            assert_problem(refused, 405)
            assert "GET" in refused.headers["Allow"] and method not in refused.headers["Allow"]
            assert TOKEN not in refused.body.decode()
            assert after.status == 200 and TOKEN in after.body.decode()  # the next one is served
            answers[path] = refused
    assert method.encode() not in up.methods()  # the upstream never saw it
    same_problem(answers["lean"], answers["aiohttp"])


async def test_track_is_never_forwarded(start_proxy: StartProxy) -> None:
    """llhttp knows no TRACK: the lean server hands it over and aiohttp's compiled parser
    refuses the head (400, closed); its pure-Python parser takes any token, and then the
    route's check answers 405."""
    async with echo_upstream() as (up, url):
        proxy = await start_proxy(config(url))
        async with connect(proxy.port) as c:
            await c.send(req("/svc/t", method="TRACK"))
            answer = await c.answer()
        assert answer.status in (400, 405) and TOKEN not in answer.body.decode()
    assert b"TRACK" not in up.methods()
    with pytest.raises(MethodNotAllowed):
        refuse_method("TRACK", has_provider=True)
    refuse_method("TRACK", has_provider=False)  # nothing to leak on a route without a token


async def test_trace_on_a_route_without_provider_is_forwarded(start_proxy: StartProxy) -> None:
    async with echo_upstream() as (up, url):
        proxy = await start_proxy(config(url))
        answer, _ = await exchange(proxy.port, b"", req("/open/t", method="TRACE"), "TRACE")
    assert up.methods() == [b"TRACE", b"GET"]
    assert answer.status == 200 and answer.body.startswith(b"TRACE /o/t HTTP/1.1")
    assert b"authorization" not in answer.body.lower()


@pytest.mark.parametrize(
    ("target", "status"),
    [("/svc/tunnel", 405), ("/open/tunnel", 405), ("example.com:443", 400)],
)
async def test_connect_is_refused_and_the_connection_closed_on_both_paths(
    start_proxy: StartProxy, target: str, status: int
) -> None:
    """A CONNECT with a path is 405 on every route (the lean server leaves CONNECT to
    aiohttp); one to an authority is 400, not a path. Either way what follows the head is
    the client's tunnel, not a request: the connection is closed after the answer."""
    async with echo_upstream() as (up, url):
        proxy = await start_proxy(config(url))
        for first in PATHS.values():
            async with connect(proxy.port) as c:
                await c.send(first + req(target, method="CONNECT") + req("/svc/after"))
                if first:
                    assert (await c.answer()).status == 200
                refused = await c.answer("CONNECT")
                assert await c.closed() == b""
            assert_problem(refused, status)
            assert refused.headers["Connection"] == "close"
            assert "Transfer-Encoding" not in refused.headers
            assert status != 405 or "CONNECT" not in refused.headers["Allow"]
    assert b"CONNECT" not in up.methods() and all(b"/after" not in h for h in up.heads)


H2C = "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAA\r\n"


@pytest.mark.parametrize("upgrade", [H2C, H2C + "Upgrade: websocket\r\n"], ids=["h2c", "h2c-first"])
@pytest.mark.parametrize("path", PATHS)
async def test_h2c_upgrade_is_ignored_and_the_pipelined_request_answered(
    start_proxy: StartProxy, path: str, upgrade: str
) -> None:
    async with echo_upstream() as (up, url):
        proxy = await start_proxy(config(url))
        served, after = await exchange(proxy.port, PATHS[path], req("/svc/u", upgrade), "GET")
    assert (served.status, after.status) == (200, 200)
    assert served.body.startswith(b"GET /base/u HTTP/1.1\r\n")
    assert after.body.startswith(b"GET /base/after HTTP/1.1\r\n")
    assert up.methods()[-2:] == [b"GET", b"GET"]
    forwarded = served.body.lower()
    assert b"upgrade" not in forwarded and b"http2-settings" not in forwarded


@pytest.mark.parametrize(
    ("connection", "upgrade"),
    [
        ("Upgrade", True),
        ("keep-alive, Upgrade", True),
        ("keep-alive,upgrade", True),
        ("notupgrade", False),
        ("upgraded", False),
        ("keep-alive", False),
    ],
)
def test_websocket_upgrade_needs_upgrade_as_a_connection_token(
    connection: str, upgrade: bool
) -> None:
    headers = CIMultiDict({"Upgrade": "websocket", "Connection": connection, "Host": "x"})
    request = make_mocked_request("GET", "/svc/ws", headers=headers)
    assert is_websocket_upgrade(request) is upgrade
