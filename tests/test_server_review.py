"""Regression tests for the review's findings (commit 0df99c2), over real sockets.

Each test replays one reviewer reproduction: a pipelining client that never reads, a head
that never ends, a big upload refused early, a pooled upstream connection parked while
paused, and a splice that forgot a client's pause. No sleeps for timing: "stopped growing"
is an event not set within QUIET seconds; every other wait is on an event or a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy import server
from proxy.forward.transport import Client, Response
from tests.conftest import StartProxy, StartUpstream
from tests.helpers import Echo

WAIT = 15.0  # outer bound on any wait: a hang fails, never stalls the suite
QUIET = 0.5  # no progress this long: the thing stopped growing
KIB, MIB = 1024, 1024 * 1024


def config(up: URL, top: str = "") -> str:
    return f"""
allow_unauthenticated: true
routes:
  - prefix: /svc/
    upstream: {up}/base/
    timeout: {{connect: 2, read: 5}}
{top}"""


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response off a raw stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def until_quiet(event: asyncio.Event) -> None:
    """Return once ``event`` stays unset for QUIET seconds."""
    while True:
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), QUIET)
        except TimeoutError:
            return


# --- 1. a pipelining client that never reads gets no answers piled up for it

PIPELINED = 2000
ANSWER = 60_000


@dataclass
class Counting:
    """An upstream answering 60 KB bodies that start with the request's number."""

    served: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/base/{n}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.served += 1
        self.progress.set()
        tag = b"%08d" % int(request.match_info["n"])
        return web.Response(body=tag + b"y" * (ANSWER - len(tag)))


async def test_pipelined_requests_from_a_client_not_reading_are_not_all_served(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = Counting()
    proxy = await start_proxy(config(await start_upstream(up.app())))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
    sock.connect(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        async with asyncio.timeout(WAIT * 2):
            for start in range(0, PIPELINED, 400):
                writer.write(
                    b"".join(
                        b"GET /svc/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                        for i in range(start, start + 400)
                    )
                )
            await until_quiet(up.progress)
            assert 0 < up.served < 200
            for i in range(PIPELINED):
                status, _, body = await read_answer(reader)
                assert status == 200
                assert len(body) == ANSWER and body[:8] == b"%08d" % i
        assert up.served == PIPELINED
    finally:
        writer.close()


# --- 2. an endless head is refused after about max_headers lines


async def test_endless_head_is_refused_past_max_headers(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, url = echo
    proxy = await start_proxy(config(url))  # default limits: 100 headers, 30 s header timeout
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    pad = b"X-Pad: " + b"p" * 60 + b"\r\n"
    writer.write(b"GET /svc/a HTTP/1.1\r\nHost: x\r\n" + pad * 105)  # never the blank line
    try:
        async with asyncio.timeout(10):  # well under the 30 s header timeout
            got = await reader.read()
    finally:
        writer.close()
    assert got.split(b" ", 2)[1] == b"431"  # too many header fields
    assert e.seen == []


async def test_bytes_that_cannot_begin_a_request_are_refused_at_once(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, url = echo
    proxy = await start_proxy(config(url))  # a 30 s header timeout: the answer must not wait
    hello = bytes.fromhex("160301020001") + b"\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32
    for start in (hello, b"GET", b"G\x00T /svc/a HTTP/1.1\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(start)  # never a whole head
        try:
            async with asyncio.timeout(10):
                got = await reader.read() if start != b"GET" else b""
                if start == b"GET":  # a method still arriving is waited for, not refused
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(QUIET):
                            await reader.read(1)
        finally:
            writer.close()
        if start != b"GET":
            assert got.split(b" ", 2)[1] == b"400", start
    assert e.seen == []


# --- 3. an early answer to a blind upload arrives whole, then the connection closes


async def push(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write blindly, as a client not waiting for an answer; the proxy may cut us."""
    with contextlib.suppress(ConnectionError):
        for at in range(0, len(data), MIB):
            writer.write(data[at : at + MIB])
            await writer.drain()


async def test_early_413_reaches_a_client_still_sending(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, url = echo
    proxy = await start_proxy(config(url, "limits: {max_body: 1000000}\n"))
    size = 20 * 1000 * 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    head = b"POST /svc/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
    sender = asyncio.create_task(push(writer, head + b"z" * size))
    try:
        async with asyncio.timeout(WAIT):
            status, headers, body = await read_answer(reader)
            assert await reader.read() == b""  # then closed, not reset
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    assert status == 413
    assert headers["content-type"].startswith("application/problem+json")
    assert orjson.loads(body)["status"] == 413
    assert e.seen == []


async def test_a_client_that_stops_sending_after_an_early_answer_gets_it_and_an_end(
    echo: tuple[Echo, URL], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lingering close answers at once and ends the proxy's side, whatever the client
    still owes; the proxy goes on dropping what comes for ``LINGER_SECONDS`` at most."""
    monkeypatch.setattr(server, "LINGER_SECONDS", 0.3)
    e, url = echo
    proxy = await start_proxy(config(url, "limits: {max_body: 1000}\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST /svc/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nzz")
        async with asyncio.timeout(WAIT):
            status, headers, _ = await read_answer(reader)
            assert await reader.read() == b""
    finally:
        writer.close()
    assert status == 413 and headers["connection"] == "close"
    assert e.seen == []


# --- 4 and 5: the transport layer directly, against raw upstreams


@dataclass
class Raw:
    """A raw upstream answering each request with ``body`` in blocks; counts connections and
    requests, and signals each block its socket took."""

    body: bytes
    connections: int = 0
    requests: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set per block written
    _open: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
                for at in range(0, len(self.body), 64 * KIB):
                    writer.write(self.body[at : at + 64 * KIB])
                    await writer.drain()
                    self.progress.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._open.pop(task, None)

    async def stop(self, server: asyncio.Server) -> None:
        """Close the listener and every connection, and let their handlers end."""
        server.close()
        tasks = list(self._open)
        for writer in self._open.values():
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def url(self) -> tuple[asyncio.Server, URL]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return server, URL(f"http://127.0.0.1:{port}/x")


async def read_all(resp: Response) -> bytes:
    parts = []
    while chunk := await resp.readany():
        parts.append(chunk)
    return b"".join(parts)


async def test_a_connection_paused_at_its_last_byte_is_pooled_reading() -> None:
    up = Raw(b"b" * 100_000)
    server, url = await up.url()
    client = Client()
    try:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", url, CIMultiDict(), read_timeout=WAIT)
            got = bytearray()

            def sink(chunk: bytes) -> None:
                got.extend(chunk)
                if len(got) == len(up.body):
                    resp.pause()  # the client's buffer filled with the final byte

            await resp.splice(sink)
            resp.release()
            assert got == up.body
            second = await client.request("GET", url, CIMultiDict(), read_timeout=WAIT)
            assert second.status == 200
            assert await read_all(second) == up.body
            second.release()
        assert (up.connections, up.requests) == (1, 2)
    finally:
        await client.close()
        await up.stop(server)


def _big_body() -> bytes:
    return random.Random(5).randbytes(8 * MIB)


async def test_splice_keeps_the_clients_pause() -> None:
    up = Raw(_big_body())
    server, url = await up.url()
    client = Client()
    try:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", url, CIMultiDict(), read_timeout=WAIT)
            await until_quiet(up.progress)  # the upstream is blocked: the Response paused
            assert resp.buffered > 512 * KIB
            got = hashlib.sha256()
            size = 0
            arrived = asyncio.Event()

            def sink(chunk: bytes) -> None:
                nonlocal size
                got.update(chunk)
                size += len(chunk)
                arrived.set()

            before = resp.buffered
            resp.pause()  # the client's transport is already full
            task = asyncio.create_task(resp.splice(sink))
            await until_quiet(arrived)
            assert size == before  # only what was already buffered: the socket stays unread
            resp.resume()
            await task
            resp.release()
        assert size == len(up.body)
        assert got.hexdigest() == hashlib.sha256(up.body).hexdigest()
    finally:
        await client.close()
        await up.stop(server)
