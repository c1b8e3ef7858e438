"""A request is sent twice only when that is safe: the keep-alive race, over real sockets.

The upstream answers the first request on each connection, then reads the second one in
full and closes without a byte of answer: it may have acted on it. The proxy's pooled
connection to it is reused for that second request, which is sent again on a fresh
connection only when it is safe to repeat (GET, HEAD, OPTIONS, or an idempotency key);
anything else is a 502 ``upstream_error: reset``. Counted by the upstream itself, on both
server paths (the lean one, and aiohttp's after a chunked request handed the client
connection over) and on a route behind an env HTTP proxy (aiohttp's client).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from yarl import URL

from tests.conftest import StartProxy
from tests.helpers import Answer, assert_problem, parse_answer_head, raw_request, svc_config

WAIT = 10.0  # outer bound on any single wait: a hang fails, never stalls
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_WARM = raw_request(
    "/svc/warm", "Transfer-Encoding: chunked\r\n", method="POST", body=b"2\r\nhi\r\n0\r\n\r\n"
)
PATHS = ("lean", "aiohttp", "env-proxy")
NOT_SAFE = ("POST", "PATCH", "DELETE", "PUT")


@dataclass
class Flaky:
    """Answers the first request on a connection; reads the second whole, then hangs up."""

    seen: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, request line)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        try:
            for n in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                await _read_body(reader, head)
                self.seen.append((conn, head.split(b"\r\n", 1)[0]))
                if n == 0:
                    writer.write(OK[:-2] if head.startswith(b"HEAD ") else OK)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def count(self, method: str, path: str) -> int:
        """How many times the upstream read ``method`` on a target ending in ``path``."""
        wanted = (method.encode(), path.encode())
        return sum(1 for _, line in self.seen if _method_path(line, wanted))


def _method_path(line: bytes, wanted: tuple[bytes, bytes]) -> bool:
    method, target, _ = line.split(b" ")
    return method == wanted[0] and target.endswith(wanted[1])


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> None:
    lines = head.lower().split(b"\r\n")
    if b"transfer-encoding: chunked" in lines:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    for line in lines:
        if line.startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))


@asynccontextmanager
async def flaky() -> AsyncIterator[tuple[Flaky, URL]]:
    up = Flaky()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    try:
        yield up, URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    finally:
        server.close()


async def answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer:
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        version, status, headers = parse_answer_head(head)
        length = 0 if head_only else int(headers.get("Content-Length", "0"))
        body = await reader.readexactly(length)
    return Answer(version, status, headers, body)


async def warm_then(port: int, via: str, request: bytes) -> Answer:
    """A first request that leaves a pooled upstream connection, then ``request`` on the
    same client connection: on the aiohttp path the chunked first one hands it over."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(CHUNKED_WARM if via == "aiohttp" else raw_request("/svc/warm"))
        assert (await answer(reader)).status == 200
        writer.write(request)
        return await answer(reader, head_only=request.startswith(b"HEAD "))
    finally:
        writer.close()


async def proxy_for(
    via: str, up: URL, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> int:
    if via != "env-proxy":
        return (await start_proxy(svc_config(up))).port
    monkeypatch.setenv("HTTP_PROXY", str(up))  # the flaky server plays the forward proxy
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return (await start_proxy(svc_config("http://upstream.test", top="trust_env: true\n"))).port


def upload(method: str, headers: str = "") -> bytes:
    return raw_request(
        "/svc/order", f"Content-Length: 5\r\n{headers}", method=method, body=b"order"
    )


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("method", NOT_SAFE)
async def test_a_request_not_safe_to_repeat_is_sent_once_and_answered_502_reset(
    via: str, method: str, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with flaky() as (up, url):
        port = await proxy_for(via, url, start_proxy, monkeypatch)
        got = await warm_then(port, via, upload(method))
        assert up.count(method, "/order") == 1, up.seen
        assert up.connections == 1
    assert_problem(got, 502)
    doc = got.json()
    assert doc["upstream_error"] == "reset"
    assert "not sent again" in doc["detail"]


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_a_safe_request_is_sent_again_on_a_fresh_connection(
    via: str, method: str, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with flaky() as (up, url):
        port = await proxy_for(via, url, start_proxy, monkeypatch)
        got = await warm_then(port, via, raw_request("/svc/order", method=method))
        assert up.count(method, "/order") == 2, up.seen
        assert up.connections == 2
    assert got.status == 200
    assert got.body == (b"" if method == "HEAD" else b"ok")


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("key", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_a_post_with_an_idempotency_key_is_sent_again(
    via: str, key: str, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with flaky() as (up, url):
        port = await proxy_for(via, url, start_proxy, monkeypatch)
        got = await warm_then(port, via, upload("POST", f"{key}: order-77\r\n"))
        assert up.count("POST", "/order") == 2, up.seen
    assert got.status == 200 and got.body == b"ok"
