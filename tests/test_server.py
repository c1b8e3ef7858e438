"""The lean HTTP/1.1 server on the main listener, spoken to over raw sockets.

It serves bodiless proxied requests itself and hands everything else (and the rest of the
connection) to aiohttp; these tests pin down what a client sees on either side of that
line: framing, keep-alive, pipelining, the hand-over, timeouts, disconnects, shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from proxy.app import RUNTIME
from tests.conftest import StartProxy, StartUpstream
from tests.helpers import Answer, Echo, Recorder, assert_problem, own_proxy, parse_answer_head
from tests.helpers import raw_request as req
from tests.helpers import svc_config as config

WAIT = 5.0  # outer bound on any single wait for the proxy: a hang fails, never stalls


class Conn:
    """A raw client connection that reads responses exactly as framed, nothing more."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, method: str = "GET") -> Answer:
        async with asyncio.timeout(WAIT):
            return await self._answer(method)

    async def _answer(self, method: str) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        version, status, headers = parse_answer_head(head)
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif "Content-Length" in headers:
            body = await self.reader.readexactly(int(headers["Content-Length"]))
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = await self._dechunk()
        else:
            body = await self.reader.read()  # close-delimited
        return Answer(version, status, headers, body)

    async def _dechunk(self) -> bytes:
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await self.reader.readexactly(size))
            assert await self.reader.readexactly(2) == b"\r\n"
        assert await self.reader.readexactly(2) == b"\r\n"  # no trailers
        return b"".join(parts)

    async def closed(self) -> bytes:
        """Whatever arrives until the proxy closes the connection (fails if it never does)."""
        async with asyncio.timeout(WAIT):
            return await self.reader.read()


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()


def paths(e: Echo) -> list[str]:
    return [s.raw_path for s in e.seen]


# --- pipelining and keep-alive


async def test_pipelined_gets_answered_in_order(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/one") + req("/svc/two", "X-Request-Id: rid-two\r\n"))
        first, second = await c.answer(), await c.answer()
    assert (first.status, second.status) == (200, 200)
    assert first.json()["raw_path"] == "/base/one"
    assert second.json()["raw_path"] == "/base/two"
    assert second.headers["X-Request-Id"] == "rid-two"
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["X-Request-Id"])
    ids = [s.header("X-Request-Id") for s in e.seen]
    assert ids == [first.headers["X-Request-Id"], "rid-two"]


async def test_keep_alive_reuses_both_connections(start_proxy: StartProxy) -> None:
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    up = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        proxy = await start_proxy(config(up))
        async with connect(proxy.port) as c:
            for i in range(4):
                await c.send(req(f"/svc/k{i}"))
                answer = await c.answer()
                assert (answer.status, answer.body) == (200, b"ok")
                assert "Connection" not in answer.headers
        assert recorder.connections == 1
        assert re.findall(rb"GET /base/k(\d) HTTP/1.1", recorder.received) == [
            b"0",
            b"1",
            b"2",
            b"3",
        ]
    finally:
        server.close()


async def test_date_and_server_added_only_when_missing(start_proxy: StartProxy) -> None:
    vendor = b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: vendor-x\r\n"
    recorder = Recorder(response=b"HTTP/1.1 200 OK\r\n" + vendor + b"Content-Length: 2\r\n\r\nok")
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    bare = Recorder()
    bare_server = await asyncio.start_server(bare.handle, "127.0.0.1", 0)
    ports = [s.sockets[0].getsockname()[1] for s in (server, bare_server)]
    route = f"  - prefix: /bare/\n    upstream: http://127.0.0.1:{ports[1]}/\n"
    try:
        proxy = await start_proxy(config(URL(f"http://127.0.0.1:{ports[0]}"), route))
        async with connect(proxy.port) as c:
            await c.send(req("/svc/v") + req("/bare/v"))
            passed, added = await c.answer(), await c.answer()
    finally:
        server.close()
        bare_server.close()
    assert passed.headers.getall("Date") == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    assert passed.headers.getall("Server") == ["vendor-x"]
    assert len(added.headers.getall("Date")) == len(added.headers.getall("Server")) == 1
    assert added.headers["Date"].endswith(" GMT") and added.body == b"ok"


# --- hand-over to aiohttp within a connection

BODY = random.Random(5).randbytes(300 * 1024) + b"\r\n\r\nGET /svc/evil HTTP/1.1\r\n\r\n"


def post(path: str, body: bytes = BODY, headers: str = "") -> bytes:
    return req(path, f"Content-Length: {len(body)}\r\n{headers}", method="POST", body=body)


async def test_get_then_post_pipelined_in_one_write(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/g") + post("/svc/p") + req("/svc/after", "Connection: close\r\n"))
        answers = [await c.answer() for _ in range(3)]
        assert await c.closed() == b""
    assert [a.status for a in answers] == [200, 200, 200]
    assert paths(e) == ["/base/g", "/base/p", "/base/after"]  # the body never parsed as a head
    assert e.seen[1].body_sha256 == hashlib.sha256(BODY).hexdigest()
    assert e.seen[1].body_len == len(BODY)


async def test_get_then_post_one_after_the_other(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        for request in (req("/svc/g"), post("/svc/p"), req("/svc/again")):
            await c.send(request)
            assert (await c.answer()).status == 200
    assert paths(e) == ["/base/g", "/base/p", "/base/again"]
    assert e.seen[1].body_sha256 == hashlib.sha256(BODY).hexdigest()


async def test_get_then_admin_path_on_one_connection(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/g") + req("/-/health"))
        proxied, health = await c.answer(), await c.answer()
        await c.send(req("/svc/later"))
        later = await c.answer()
    assert proxied.status == 200 and proxied.json()["raw_path"] == "/base/g"
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert later.status == 200
    assert paths(e) == ["/base/g", "/base/later"]


async def test_head_sent_one_byte_at_a_time(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    request = req("/svc/slow?q=1", "X-Request-Id: rid-slow\r\nX-Extra: a b\r\n")
    async with connect(proxy.port) as c:
        await c.send(request)
        whole = await c.answer()
        for i in range(len(request)):
            await c.send(request[i : i + 1])
            await asyncio.sleep(0)  # one loop pass: the proxy reads each byte on its own
        trickled = await c.answer()
    assert whole.status == trickled.status == 200
    assert trickled.body == whole.body  # what the upstream saw, headers included
    assert trickled.json()["raw_path"] == "/base/slow?q=1"


# --- connection management


async def test_connection_close_ends_the_connection(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/a", "Connection: close\r\n") + req("/svc/never-sent"))
        answer = await c.answer()
        assert await c.closed() == b""
    assert answer.status == 200
    assert answer.headers["Connection"] == "close"
    assert paths(e) == ["/base/a"]


async def test_http10_closes_unless_keep_alive_asked(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/old", version="1.0"))
        old = await c.answer()
        assert await c.closed() == b""
    assert (old.version, old.status) == ("1.0", 200)
    assert old.headers.get("Connection", "close").lower() == "close"
    async with connect(proxy.port) as c:
        kept = []
        for i in range(2):
            await c.send(req(f"/svc/ka{i}", "Connection: keep-alive\r\n", version="1.0"))
            kept.append(await c.answer())
        await c.send(req("/svc/last", version="1.0"))
        assert (await c.answer()).status == 200
        assert await c.closed() == b""
    for answer in kept:
        assert (answer.version, answer.status) == ("1.0", 200)
        assert answer.headers["Connection"] == "keep-alive"
        assert int(answer.headers["Content-Length"]) == len(answer.body)
    assert paths(e) == ["/base/old", "/base/ka0", "/base/ka1", "/base/last"]


async def test_head_204_304_carry_no_body(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(
            req("/svc/big?size=1000", method="HEAD")
            + req("/svc/chunked", method="HEAD")
            + req("/svc/nocontent")
            + req("/svc/notmodified")
            + req("/svc/last", "Connection: close\r\n")
        )
        head = await c.answer("HEAD")
        chunked_head = await c.answer("HEAD")
        no_content, not_modified, last = [await c.answer() for _ in range(3)]
        assert await c.closed() == b""
    assert (head.status, head.headers["Content-Length"]) == (200, "1000")
    assert chunked_head.status == 200
    assert [no_content.status, not_modified.status] == [204, 304]
    for bodiless in (chunked_head, no_content, not_modified):
        assert "Content-Length" not in bodiless.headers
        assert "Transfer-Encoding" not in bodiless.headers
    assert not_modified.headers["ETag"] == '"v1"'
    assert last.json()["raw_path"] == "/base/last"  # right after the bodiless answers


# --- responses without a length from the upstream


def chunked_upstream() -> web.Application:
    """``/base/stream?size=N``: N deterministic bytes, chunked, in 16 KiB writes."""

    async def stream(request: web.Request) -> web.StreamResponse:
        data = payload(int(request.query["size"]))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 16384):
            await resp.write(data[i : i + 16384])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/base/stream", stream)
    return app


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("size", [100, 1024 * 1024 + 3])
async def test_unframed_upstream_body_is_rechunked_or_close_delimited(
    size: int, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream(chunked_upstream())
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req(f"/svc/stream?size={size}"))
        modern = await c.answer()
        await c.send(req("/svc/stream?size=5"))  # the chunked framing ended where it should
        assert (await c.answer()).body == payload(5)
    assert modern.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in modern.headers
    assert modern.body == payload(size)
    async with connect(proxy.port) as c:
        await c.send(req(f"/svc/stream?size={size}", "Connection: keep-alive\r\n", version="1.0"))
        old = await c.answer()  # read until the proxy closes
    assert (old.version, old.status) == ("1.0", 200)
    assert "Content-Length" not in old.headers and "Transfer-Encoding" not in old.headers
    assert old.body == payload(size)


# --- the proxy's own errors


async def dead_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


async def test_upstream_refused_is_502_and_the_connection_lives_on(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    dead = f"  - prefix: /dead/\n    upstream: http://127.0.0.1:{await dead_port()}/\n"
    proxy = await start_proxy(config(up, dead))
    async with connect(proxy.port) as c:
        await c.send(req("/dead/x", "X-Request-Id: rid-dead\r\n") + req("/dead/y"))
        assert_problem(await c.answer(), 502, "rid-dead")
        generated = assert_problem(await c.answer(), 502)
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        await c.send(req("/svc/alive"))
        assert (await c.answer()).status == 200
    assert paths(e) == ["/base/alive"]
    assert '"upstream_error":"connect"' in proxy.log_text()


async def test_refused_paths_are_problems_and_the_connection_lives_on(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/%2e%2e/etc", "X-Request-Id: rid-dots\r\n") + req("/nowhere/x"))
        assert_problem(await c.answer(), 400, "rid-dots")
        assert_problem(await c.answer(), 404)
        await c.send(req("/svc/alive"))
        assert (await c.answer()).status == 200
    assert paths(e) == ["/base/alive"]


async def test_client_key_refusal_on_the_lean_path(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up, top='clients:\n  - {id: a, key: "k-123456789"}\n'))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/nokey", "X-Request-Id: rid-key\r\n"))
        assert_problem(await c.answer(), 401, "rid-key")
        await c.send(req("/svc/key", "X-Api-Key: k-123456789\r\n"))
        assert (await c.answer()).status == 200
    assert paths(e) == ["/base/key"]
    assert e.seen[0].header("X-Api-Key") is None


# --- what aiohttp still refuses


async def test_bare_lf_head_is_400(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(b"GET /svc/a HTTP/1.1\nHost: x\n\n")
        assert (await c.answer()).status == 400
    assert e.seen == []


async def test_over_long_header_line_is_refused_by_aiohttp(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up, top="limits: {max_field_size: 512}\n"))
    long = f"X-Long: {'v' * 600}\r\n"
    async with connect(proxy.port) as c:
        await c.send(req("/svc/fits", f"X-Short: {'v' * 400}\r\n") + req("/svc/long", long))
        fits, refused = await c.answer(), await c.answer()
    assert fits.status == 200
    assert refused.status in (400, 431)
    async with connect(proxy.port) as c:  # never ends, past max_line_size + max_field_size
        await c.send(b"GET /svc/endless HTTP/1.1\r\nX-Long: " + b"v" * 9000)
        assert (await c.answer()).status in (400, 431)
    assert paths(e) == ["/base/fits"]


async def test_unfinished_head_with_an_over_long_field_is_refused_at_once(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    _, up = echo
    limits = "limits: {max_field_size: 512, header_timeout: 1}\n"
    proxy = await start_proxy(config(up, top=limits))
    async with connect(proxy.port) as c:
        await c.send(b"GET /svc/endless HTTP/1.1\r\nX-Long: " + b"v" * 2000)
        assert (await c.answer()).status in (400, 431)


async def test_head_ending_in_lf_crlf_is_400(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up, top="limits: {header_timeout: 1}\n"))
    async with connect(proxy.port) as c:
        await c.send(b"GET /svc/a HTTP/1.1\r\nHost: x\n\r\n")
        assert (await c.answer()).status == 400
    assert e.seen == []


async def test_repeated_singleton_header_is_refused_by_the_proxy(
    start_proxy: StartProxy,
) -> None:
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    up = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        proxy = await start_proxy(config(up))
        async with connect(proxy.port) as c:
            await c.send(req("/svc/a", "User-Agent: a\r\nUser-Agent: b\r\n"))
            assert (await c.answer()).status == 400
        assert recorder.received == b""
    finally:
        server.close()


async def test_length_and_chunked_together_is_400_and_closed(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    framing = "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    async with connect(proxy.port) as c:
        await c.send(req("/svc/ok") + req("/svc/x", framing, method="POST", body=b"0\r\n\r\n"))
        assert (await c.answer()).status == 200
        assert (await c.answer()).status == 400
        assert await c.closed() == b""
    assert paths(e) == ["/base/ok"]


# --- timeouts


async def test_idle_keep_alive_connection_is_closed(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up, top="limits: {keepalive_timeout: 0.3}\n"))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/a"))
        assert (await c.answer()).status == 200
        assert await c.closed() == b""


async def test_incomplete_head_is_cut_after_header_timeout(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up, top="limits: {header_timeout: 0.3}\n"))
    async with connect(proxy.port) as c:
        await c.send(req("/svc/first"))
        assert (await c.answer()).status == 200
        await c.send(b"GET /svc/partial HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert await c.closed() == b""
    assert paths(e) == ["/base/first"]


async def test_a_long_response_outlives_the_idle_timeout(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up, top="limits: {keepalive_timeout: 0.3}\n"))
    async with connect(proxy.port) as streaming, connect(proxy.port) as idle:
        await streaming.send(req("/svc/first"))
        assert (await streaming.answer()).status == 200
        await streaming.send(req("/svc/gate"))  # idle timer of this connection still armed
        await idle.send(req("/svc/clock"))
        assert (await idle.answer()).status == 200
        assert await idle.closed() == b""  # the idle timeout has passed for both by now
        await e.stream_gate.put(b"late")
        await e.stream_gate.put(None)
        gated = await streaming.answer()
        assert gated.body == b"late"
        await streaming.send(req("/svc/still-open"))
        assert (await streaming.answer()).status == 200


# --- disconnects and shutdown


async def test_client_gone_mid_stream_releases_the_upstream(
    echo: tuple[Echo, URL], tmp_path: Path
) -> None:
    e, up = echo
    async with own_proxy(config(up), tmp_path) as proxy:
        async with connect(proxy.port) as c:
            await c.send(req("/svc/gate"))
            await e.stream_gate.put(b"data: one\n\n")
            async with asyncio.timeout(WAIT):
                head = await c.reader.readuntil(b"\r\n\r\n")
                await c.reader.readuntil(b"data: one\n\n")
            assert head.startswith(b"HTTP/1.1 200")
            c.writer.transport.abort()
        async with asyncio.timeout(WAIT):
            await e.released.wait()
        line = await proxy.logs.access_line("/svc/gate")
        assert line["error"] == "client_gone"
        assert proxy.app[RUNTIME].observer.metrics.in_flight_now == 0


async def test_shutdown_lets_the_stream_in_flight_finish(
    echo: tuple[Echo, URL], tmp_path: Path
) -> None:
    e, up = echo
    async with (
        own_proxy(config(up, top="shutdown_grace: 5\n"), tmp_path) as proxy,
        connect(proxy.port) as streaming,
        connect(proxy.port) as idle,
    ):
        await streaming.send(req("/svc/gate") + req("/svc/queued-behind"))
        await e.stream_gate.put(b"one;")
        async with asyncio.timeout(WAIT):
            await streaming.reader.readuntil(b"one;")
        await idle.send(req("/svc/a"))
        assert (await idle.answer()).status == 200
        cleanup = asyncio.create_task(proxy.runner.cleanup())
        assert await idle.closed() == b""  # idle connections go at once
        await e.stream_gate.put(b"two;")
        await e.stream_gate.put(None)
        rest = await streaming.closed()
        assert rest.endswith(b"two;\r\n0\r\n\r\n")  # the whole chunked body, then the close
        async with asyncio.timeout(WAIT):
            await cleanup
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
    assert paths(e) == ["/base/a"]  # the request queued behind the stream was never taken
