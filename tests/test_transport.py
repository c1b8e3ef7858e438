"""The lean upstream client against real sockets: framing, reuse, backpressure, TLS, timeouts.

Every test runs on both the default asyncio loop and uvloop: the proxy runs on uvloop, and
the two call protocol callbacks at different moments.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.forward.transport import (
    HIGH_WATER,
    Client,
    ConnectFailed,
    ConnectionLost,
    NotRepeated,
    ProtocolError,
    Response,
)

Reply = Callable[[int, int, bytes], bytes | None]
"""(connection number, request number on it, request head) → bytes to answer, None: hang up."""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# pytest-asyncio 1.x prefers a conftest hook for loop factories; this module keeps its own
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


@dataclass
class Upstream:
    """A raw HTTP/1.1 upstream: reads each request fully, answers what ``reply`` says."""

    reply: Reply
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append((head, await _read_body(reader, head)))
                out = self.reply(conn, n, head)
                n += 1
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if b"connection: close" in out.lower() or out.startswith(b"HTTP/1.0"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
        return body
    if b"content-length: " in lower:
        length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
        return await reader.readexactly(length)
    return b""


Serve = Callable[..., Awaitable[URL]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        ssl_context: ssl.SSLContext | None = None,
    ) -> URL:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return URL(f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}")

    yield start
    for s in servers:
        s.close()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    await c.close()


async def body_of(resp: Response) -> bytes:
    parts = []
    while chunk := await resp.readany():
        parts.append(chunk)
    return b"".join(parts)


async def fetch(
    client: Client,
    url: URL,
    method: str = "GET",
    headers: CIMultiDict[str] | None = None,
    **kw: object,
) -> tuple[int, bytes]:
    resp = await client.request(method, url, headers or CIMultiDict(), **kw)  # type: ignore[arg-type]
    body = b"" if method == "HEAD" else await body_of(resp)
    resp.release()
    return resp.status, body


async def test_keep_alive_reuses_one_connection(serve: Serve, client: Client) -> None:
    up = Upstream(lambda c, n, h: OK)
    url = await serve(up.handle)
    for _ in range(3):
        assert await fetch(client, url / "x") == (200, b"ok")
    assert up.connections == 1


async def test_connection_close_is_not_reused(serve: Serve, client: Client) -> None:
    up = Upstream(
        lambda c, n, h: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n!"
    )
    url = await serve(up.handle)
    assert await fetch(client, url) == (200, b"!")
    assert await fetch(client, url) == (200, b"!")
    assert up.connections == 2


async def test_idle_connections_expire(serve: Serve) -> None:
    up = Upstream(lambda c, n, h: OK)
    url = await serve(up.handle)
    client = Client(keepalive=0.0)
    try:
        await fetch(client, url)
        await fetch(client, url)
    finally:
        await client.close()
    assert up.connections == 2


async def test_request_head_is_exact(serve: Serve, client: Client) -> None:
    up = Upstream(lambda c, n, h: OK)
    url = await serve(up.handle)
    target = URL(str(url) + "/a%2Fb/%7e?q=%20x&y", encoded=True)
    headers = CIMultiDict([("X-One", "1"), ("X-One", "2"), ("Content-Length", "99")])
    resp = await client.request("POST", target, headers, b"hello")
    resp.release()
    head, body = up.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /a%2Fb/%7e?q=%20x&y HTTP/1.1"
    assert f"Host: 127.0.0.1:{url.port}" in lines
    assert [ln for ln in lines if ln.startswith("X-One")] == ["X-One: 1", "X-One: 2"]
    assert [ln for ln in lines if ln.startswith("Content-Length")] == ["Content-Length: 5"]
    assert body == b"hello"
    with pytest.raises(ValueError, match="line break"):
        await client.request("GET", url, CIMultiDict({"X-Bad": "a\r\nX-Injected: 1"}))


async def test_streamed_bodies_chunked_or_with_length(serve: Serve, client: Client) -> None:
    up = Upstream(lambda c, n, h: OK)
    url = await serve(up.handle)

    async def parts() -> AsyncIterator[bytes]:
        for p in (b"abc", b"", b"defg"):
            yield p

    assert await fetch(client, url, "PUT", body=parts()) == (200, b"ok")
    headers = CIMultiDict({"Content-Length": "7"})
    resp = await client.request("PUT", url, headers, parts())
    assert await body_of(resp) == b"ok"
    resp.release()
    (chunked_head, chunked), (length_head, with_length) = up.requests
    assert b"Transfer-Encoding: chunked" in chunked_head and chunked == b"abcdefg"
    assert b"Content-Length: 7" in length_head and with_length == b"abcdefg"
    assert up.connections == 1  # both exchanges complete: the connection was reused


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\n\r\nhello",  # until close
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",  # until close
    ],
)
async def test_body_framings(serve: Serve, client: Client, answer: bytes) -> None:
    up = Upstream(lambda c, n, h: answer if n == 0 else None)
    url = await serve(up.handle)
    assert await fetch(client, url) == (200, b"hello")


async def test_head_and_no_content_have_no_body_and_keep_the_connection(
    serve: Serve, client: Client
) -> None:
    answers = {
        b"HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"GET ": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"POST": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
    }
    up = Upstream(lambda c, n, h: answers[h[:4]])
    url = await serve(up.handle)
    assert await fetch(client, url, "HEAD") == (200, b"")
    assert await fetch(client, url, "GET") == (204, b"")
    assert await fetch(client, url, "POST") == (304, b"")
    assert up.connections == 1


async def test_repeated_headers_kept(serve: Serve, client: Client) -> None:
    answer = b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    url = await serve(Upstream(lambda c, n, h: answer).handle)
    resp = await client.request("GET", url, CIMultiDict())
    assert (resp.status, resp.reason, resp.content_length) == (200, "Fine", 0)
    assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    resp.release()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
async def test_bad_framing_is_a_protocol_error(serve: Serve, client: Client, answer: bytes) -> None:
    url = await serve(Upstream(lambda c, n, h: answer).handle)
    with pytest.raises(ProtocolError):
        resp = await client.request("GET", url, CIMultiDict())
        await body_of(resp)


async def test_bytes_after_the_response_drop_the_connection(serve: Serve, client: Client) -> None:
    up = Upstream(lambda c, n, h: OK + b"HTTP/1.1 200 OK\r\n\r\n")
    url = await serve(up.handle)
    assert await fetch(client, url) == (200, b"ok")
    assert await fetch(client, url) == (200, b"ok")
    assert up.connections == 2


async def test_errors_mid_body_are_never_a_short_body(serve: Serve, client: Client) -> None:
    bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"
    short = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 10\r\n\r\nonly5"
    answers = [bad_chunk, short]
    up = Upstream(lambda c, n, h: answers[c] if n == 0 else None)
    url = await serve(up.handle)
    resp = await client.request("GET", url, CIMultiDict())
    with pytest.raises(ProtocolError):
        await body_of(resp)
    resp.close()
    resp = await client.request("GET", url, CIMultiDict())
    with pytest.raises(ConnectionLost):
        await body_of(resp)
    resp.close()


async def test_a_body_until_close_ended_by_a_reset_is_an_error(
    serve: Serve, client: Client
) -> None:
    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of it")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # linger 0: an RST, not a FIN

    url = await serve(reset_mid_body)
    resp = await client.request("GET", url, CIMultiDict())
    with pytest.raises(ConnectionLost):
        await body_of(resp)
    resp.close()


async def test_stale_pooled_connection_retried_once_for_a_safe_request(
    serve: Serve, client: Client
) -> None:
    # the first connection answers once, then reads the next request and hangs up: the
    # keep-alive race, where the upstream may have acted on what it read
    up = Upstream(lambda c, n, h: OK if c > 0 or n == 0 else None)
    url = await serve(up.handle)
    assert await fetch(client, url) == (200, b"ok")
    assert await fetch(client, url, "GET") == (200, b"ok")
    assert up.connections == 2
    assert len(up.requests) == 3  # the GET twice: once unanswered, once on a fresh connection


@pytest.mark.parametrize("method", ["POST", "PATCH", "DELETE", "PUT"])
async def test_stale_pooled_connection_not_retried_for_a_request_not_safe_twice(
    method: str, serve: Serve, client: Client
) -> None:
    up = Upstream(lambda c, n, h: OK if c > 0 or n == 0 else None)
    url = await serve(up.handle)
    assert await fetch(client, url) == (200, b"ok")
    with pytest.raises(NotRepeated):
        await fetch(client, url, method, body=b"once")
    assert up.connections == 1
    assert [body for _, body in up.requests] == [b"", b"once"]


async def test_stale_pooled_connection_retried_for_a_post_with_an_idempotency_key(
    serve: Serve, client: Client
) -> None:
    up = Upstream(lambda c, n, h: OK if c > 0 or n == 0 else None)
    url = await serve(up.handle)
    assert await fetch(client, url) == (200, b"ok")
    key = CIMultiDict({"Idempotency-Key": "k-1"})
    assert await fetch(client, url, "POST", body=b"again", headers=key) == (200, b"ok")
    assert up.connections == 2
    assert [body for _, body in up.requests] == [b"", b"again", b"again"]


async def test_stale_connection_not_retried_once_a_stream_was_read(
    serve: Serve, client: Client
) -> None:
    up = Upstream(lambda c, n, h: OK if n == 0 else None)
    url = await serve(up.handle)
    await fetch(client, url)

    async def once() -> AsyncIterator[bytes]:
        yield b"only once"

    with pytest.raises(ConnectionLost):
        await client.request("POST", url, CIMultiDict(), once())
    assert up.connections == 1


async def test_early_answer_stops_the_upload_and_drops_the_connection(
    serve: Serve, client: Client
) -> None:
    connections = 0

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        await reader.read()  # keeps reading: only the client can end this exchange
        writer.close()

    pulled = 0
    stopped = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        try:
            while True:
                pulled += 1
                yield b"x" * 65536
        finally:
            stopped.set()

    url = await serve(early)
    resp = await client.request("POST", url, CIMultiDict(), endless())
    assert resp.status == 401 and await body_of(resp) == b"nope"
    resp.release()
    await asyncio.wait_for(stopped.wait(), 5)
    assert await fetch(client, url) == (401, b"nope")
    assert connections == 2  # the half-sent exchange did not go back to the pool
    assert pulled > 0


async def test_slow_reader_bounds_the_buffer(serve: Serve, client: Client) -> None:
    total = 32 * 1024 * 1024
    stalled = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"y" * 65536
        for _ in range(total // len(block)):
            writer.write(block)
            if writer.transport.get_write_buffer_size():
                stalled.set()  # the kernel buffers are full: the client stopped reading
            await writer.drain()
        writer.close()

    url = await serve(flood)
    resp = await client.request("GET", url, CIMultiDict())
    first = await resp.readany()
    await asyncio.wait_for(stalled.wait(), 10)
    assert resp.buffered <= HIGH_WATER + 512 * 1024
    assert len(first) + len(await body_of(resp)) == total
    resp.release()


async def test_read_timeout_and_refused_connect(serve: Serve, client: Client) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    url = await serve(silent)
    with pytest.raises(TimeoutError):
        await client.request("GET", url, CIMultiDict(), read_timeout=0.2)
    with pytest.raises(ConnectFailed):
        await client.request("GET", URL("http://127.0.0.1:9/"), CIMultiDict(), connect_timeout=5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_verification_and_server_hostname(
    serve: Serve, client: Client, ca: trustme.CA
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("upstream.test").configure_cert(server_ctx)
    up = Upstream(lambda c, n, h: OK)
    url = await serve(up.handle, server_ctx)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    assert await fetch(client, url, ssl=trusting, server_hostname="upstream.test") == (200, b"ok")
    assert await fetch(client, url, ssl=trusting, server_hostname="upstream.test") == (200, b"ok")
    assert up.connections == 1
    assert await fetch(client, url, ssl=False) == (200, b"ok")
    with pytest.raises(ssl.SSLError):
        await fetch(client, url, ssl=True, server_hostname="upstream.test")  # CA not trusted
    with pytest.raises(ssl.SSLError):
        await fetch(client, url, ssl=trusting, server_hostname="other.test")


async def test_against_aiohttp_server(client: Client) -> None:
    """The real upstream kind: an aiohttp app, with its own keep-alive and framing choices."""

    async def handler(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        resp = web.StreamResponse(headers={"X-Len": str(len(data))})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(data[::-1])
        return resp

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{t:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = URL(f"http://127.0.0.1:{runner.addresses[0][1]}/echo")
        for n in range(3):
            payload = bytes(range(256)) * (n * 1000 + 1)
            status, body = await fetch(client, url, "POST", body=payload)
            assert status == 200 and body == payload[::-1]
    finally:
        await runner.cleanup()
