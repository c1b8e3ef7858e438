"""Streamed bodies spliced from the upstream's callback into the client's transport.

The splice has no task loop to notice trouble, so each way a long body can go wrong is
driven here over real sockets: a client that stops reading (the upstream must be held
back, not buffered), a client slower than the read timeout (not an upstream stall), an
upstream that stalls or dies mid-body (the client is cut, never sent a short body as if
complete), a client that leaves (the upstream connection is dropped, not pooled), and an
HTTP/1.0 client (close-delimited framing).

No sleeps: "the upstream is blocked" is seen as its writes making no progress for QUIET
seconds, a wait on an event with a timeout; every other wait is for an event or a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import StartUpstream
from tests.helpers import OwnProxy, start_own_proxy

WAIT = 10.0  # outer bound on any single wait: a hang fails, never stalls the suite
QUIET = 0.5  # an upstream whose writes made no progress this long is blocked
MIB = 1024 * 1024
BLOCK = 256 * 1024
HUGE = 64 * MIB
SOCKET_BUFFER = 64 * 1024  # the test's own sockets: the upstream's send, the client's receive
READ_TIMEOUT = 0.5
_BASE = random.Random(1234).randbytes(BLOCK)


def config(up: URL, read: float = 5.0) -> str:
    return f"""
routes:
  - prefix: /svc/
    upstream: {up}/base/
    timeout: {{connect: 2, read: {read}}}
"""


def wmem_max() -> int:
    """How far Linux may grow a socket's send queue (the proxy's, towards the client)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * MIB


# What the pipeline may hold while the client reads nothing: the proxy's send queue towards
# the client, plus its receive queue from the upstream, its transport buffers and the test's
# own (shrunk) socket buffers. A proxy that kept reading would let the upstream write it all.
BOUNDED = wmem_max() + 4 * MIB


def block(i: int) -> bytes:
    """Distinct incompressible blocks, made on demand: the test never holds a whole body."""
    return i.to_bytes(8, "big") + _BASE[8:]


class Hasher:
    """SHA-256 and length of a body seen piece by piece."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


# --- a proxy whose access log a test can wait on


StartLogged = Callable[[str], Awaitable[OwnProxy]]


@pytest.fixture
async def start_logged(tmp_path: Path) -> AsyncIterator[StartLogged]:
    runners: list[web.AppRunner] = []

    async def start(text: str) -> OwnProxy:
        proxy = await start_own_proxy(text, tmp_path)
        runners.append(proxy.runner)
        return proxy

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


# --- upstreams


@dataclass
class Producer:
    """An aiohttp upstream streaming ``total`` bytes; counts what its writes got through.

    ``after`` bytes in, it waits for ``gate`` (when given) before writing the rest.
    """

    total: int
    chunked: bool = False
    after: int = 0
    gate: asyncio.Event | None = None
    written: int = 0
    digest: Hasher = field(default_factory=Hasher)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if self.chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = self.total
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        await resp.prepare(request)
        try:
            await self._produce(resp)
        finally:
            self.cut.set()  # also when cancelled: the proxy closed the connection
        return resp

    async def _produce(self, resp: web.StreamResponse) -> None:
        i = 0
        while self.written < self.total:
            if self.gate is not None and self.written >= self.after:
                await self.gate.wait()
            data = block(i)[: self.total - self.written]
            self.digest.update(data)
            await resp.write(data)
            self.written += len(data)
            self.progress.set()
            i += 1
        await resp.write_eof()
        self.finished.set()

    async def blocked(self) -> None:
        await until_quiet(self.progress, self.finished)


async def until_quiet(progress: asyncio.Event, finished: asyncio.Event) -> None:
    """Return once a writer made no progress for QUIET seconds, or finished its body."""
    async with asyncio.timeout(WAIT):
        while not finished.is_set():
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), QUIET)
            except TimeoutError:
                return


PART = 200 * 1024
FULL = MIB
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawUpstream:
    """A raw TCP upstream with numbered connections and canned behaviours by path:
    ``small`` (keep-alive), ``endless`` (writes until the proxy drops it), ``die-fin``,
    ``die-rst`` and ``die-chunked`` (part of a body, then a close once ``release`` fires)."""

    served: list[tuple[int, str]] = field(default_factory=list)
    connections: int = 0
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.served.append((number, path))
                if not await self._answer(path, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is done with."""
        if path.endswith("/small"):
            writer.write(SMALL)
            await writer.drain()
            return True
        if path.endswith("/endless"):
            await self._endless(writer)
        elif "/die-" in path:
            await self._die(writer, path.rsplit("-", 1)[1])
        return False

    async def _endless(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE)
        try:
            for i in range(HUGE // BLOCK):
                writer.write(block(i))
                await writer.drain()
                self.progress.set()
            self.finished.set()
        except ConnectionError:
            self.gone.set()

    async def _die(self, writer: asyncio.StreamWriter, how: str) -> None:
        if how == "chunked":
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"%x\r\n%s\r\n" % (PART, _BASE[:PART]))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FULL + _BASE[:PART])
        await writer.drain()
        await self.release.wait()
        if how == "rst":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[RawUpstream, URL]]:
    up = RawUpstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    yield up, URL(f"http://127.0.0.1:{port}")
    server.close()
    for task in list(up.tasks):
        task.cancel()
    await asyncio.gather(*up.tasks, return_exceptions=True)
    await server.wait_closed()


# --- the client side


@dataclass
class Client:
    """A raw client connection; reads bodies incrementally, hashing rather than keeping them."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def get(self, target: str, version: str = "1.1") -> None:
        self.writer.write(f"GET {target} HTTP/{version}\r\nHost: front\r\n\r\n".encode())
        await self.writer.drain()

    async def head(self) -> tuple[str, CIMultiDict[str]]:
        async with asyncio.timeout(WAIT):
            raw = await self.reader.readuntil(b"\r\n\r\n")
        status, *lines = raw[:-4].decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
        return status, headers

    async def body_digest(self, headers: CIMultiDict[str]) -> tuple[int, str]:
        """Length and SHA-256 of the body, framed by length, chunks, or the close."""
        digest = Hasher()
        async with asyncio.timeout(WAIT * 3):
            if "Content-Length" in headers:
                await self._exactly(int(headers["Content-Length"]), digest)
            elif headers.get("Transfer-Encoding", "").lower() == "chunked":
                await self._dechunk(digest)
            else:
                while chunk := await self.reader.read(MIB):
                    digest.update(chunk)
        return digest.size, digest.hexdigest()

    async def _exactly(self, n: int, digest: Hasher) -> None:
        while n:
            chunk = await self.reader.read(min(n, MIB))
            assert chunk, f"connection closed {n} bytes short"
            digest.update(chunk)
            n -= len(chunk)

    async def _dechunk(self, digest: Hasher) -> None:
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await self._exactly(size, digest)
            assert await self.reader.readexactly(2) == b"\r\n"
        assert await self.reader.readexactly(2) == b"\r\n"  # no trailers

    async def until_cut(self) -> bytes:
        """Everything until the proxy closes or resets the connection."""
        parts = []
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await self.reader.read(MIB):
                    parts.append(chunk)
        return b"".join(parts)

    def abort(self) -> None:
        self.writer.transport.abort()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    """A client socket with a small receive buffer: the kernel holds little on its side."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield Client(reader, writer)
    finally:
        writer.close()


def rss() -> int:
    """This process's resident memory in bytes: the proxy runs in it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- backpressure


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_a_client_that_does_not_read_holds_the_upstream_back(
    chunked: bool, start_upstream: StartUpstream, start_logged: StartLogged
) -> None:
    producer = Producer(HUGE, chunked=chunked)
    proxy = await start_logged(config(await start_upstream(producer.app())))
    before = rss()
    async with connect(proxy.port) as c:
        await c.get("/svc/huge")
        status, headers = await c.head()
        await producer.blocked()
        held, grown = producer.written, rss() - before
        assert held < BOUNDED, f"the upstream got {held} bytes out to a client reading nothing"
        assert grown < HUGE // 2, f"the process grew by {grown} bytes"
        size, digest = await c.body_digest(headers)
    assert status == "HTTP/1.1 200 OK"
    assert headers.get("Transfer-Encoding") == ("chunked" if chunked else None)
    assert (size, digest) == (HUGE, producer.digest.hexdigest())
    assert producer.finished.is_set()


async def test_a_client_slower_than_the_read_timeout_gets_the_whole_body(
    start_upstream: StartUpstream, start_logged: StartLogged
) -> None:
    producer = Producer(2 * BOUNDED, chunked=True)
    up = await start_upstream(producer.app())
    proxy = await start_logged(config(up, read=READ_TIMEOUT))
    async with connect(proxy.port) as c:
        await c.get("/svc/slow-reader")
        _, headers = await c.head()
        await producer.blocked()  # the proxy stopped reading the upstream
        assert not producer.finished.is_set()
        with contextlib.suppress(TimeoutError):  # paused for three read timeouts in all
            await asyncio.wait_for(asyncio.Event().wait(), 2 * READ_TIMEOUT)
        size, digest = await c.body_digest(headers)
    assert (size, digest) == (producer.total, producer.digest.hexdigest())
    line = await proxy.logs.access_line("/svc/slow-reader")
    assert (line["status"], line["error"], line["bytes_out"]) == (200, "", producer.total)


# --- the upstream fails mid-body


async def test_an_upstream_stalling_mid_body_is_cut_at_the_read_timeout(
    start_upstream: StartUpstream, start_logged: StartLogged
) -> None:
    gate = asyncio.Event()  # never set: the upstream stalls after its first block
    producer = Producer(FULL, after=PART, gate=gate)
    up = await start_upstream(producer.app())
    proxy = await start_logged(config(up, read=READ_TIMEOUT))
    async with connect(proxy.port) as c:
        await c.get("/svc/stall")
        status, headers = await c.head()
        body = await c.until_cut()
    assert status == "HTTP/1.1 200 OK" and headers["Content-Length"] == str(FULL)
    sent = block(0)  # what the upstream wrote before it stalled
    assert len(body) < FULL and sent.startswith(body)
    line = await proxy.logs.access_line("/svc/stall")
    assert (line["error"], line["upstream_error"]) == ("upstream_aborted", "timeout")
    async with asyncio.timeout(WAIT):
        await producer.cut.wait()  # the stalled upstream connection was closed, not kept
    assert proxy.in_flight == 0


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_an_upstream_dying_mid_body_cuts_the_client(
    how: str, raw_upstream: tuple[RawUpstream, URL], start_logged: StartLogged
) -> None:
    up, url = raw_upstream
    proxy = await start_logged(config(url))
    async with connect(proxy.port) as c:
        await c.get(f"/svc/die-{how}")
        status, headers = await c.head()
        up.release.set()  # the head is through: now the upstream goes
        body = await c.until_cut()
    assert status == "HTTP/1.1 200 OK" and headers["Content-Length"] == str(FULL)
    assert len(body) < FULL and _BASE[:PART].startswith(body)
    line = await proxy.logs.access_line(f"/svc/die-{how}")
    assert (line["error"], line["upstream_error"]) == ("upstream_aborted", "reset")
    await assert_serves_small(proxy)


async def test_an_upstream_dying_mid_chunked_body_never_gets_a_last_chunk(
    raw_upstream: tuple[RawUpstream, URL], start_logged: StartLogged
) -> None:
    up, url = raw_upstream
    proxy = await start_logged(config(url))
    async with connect(proxy.port) as c:
        await c.get("/svc/die-chunked")
        status, headers = await c.head()
        up.release.set()
        raw = await c.until_cut()
    assert status == "HTTP/1.1 200 OK" and headers["Transfer-Encoding"] == "chunked"
    assert not raw.endswith(b"0\r\n\r\n"), "a cut body was framed as complete"
    line = await proxy.logs.access_line("/svc/die-chunked")
    assert (line["error"], line["upstream_error"]) == ("upstream_aborted", "reset")
    await assert_serves_small(proxy)


async def assert_serves_small(proxy: OwnProxy) -> None:
    """The proxy is healthy: a new connection gets a normal answer, nothing is in flight."""
    async with connect(proxy.port) as c:
        await c.get("/svc/small")
        status, headers = await c.head()
        assert await c.body_digest(headers) == (2, hashlib.sha256(b"ok").hexdigest())
    assert status == "HTTP/1.1 200 OK"
    assert proxy.in_flight == 0


# --- the client leaves mid-body


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "paused"])
async def test_a_client_leaving_mid_splice_drops_the_upstream_connection(
    reading: bool, raw_upstream: tuple[RawUpstream, URL], start_logged: StartLogged
) -> None:
    up, url = raw_upstream
    proxy = await start_logged(config(url))
    async with connect(proxy.port) as c:  # leaves a keep-alive upstream connection pooled
        await c.get("/svc/small")
        assert (await c.head())[0] == "HTTP/1.1 200 OK"
    async with connect(proxy.port) as c:
        await c.get("/svc/endless")
        await c.head()
        if reading:
            async with asyncio.timeout(WAIT):
                await c.reader.readexactly(2 * MIB)
        else:
            await until_quiet(up.progress, up.finished)  # the splice is paused
            assert not up.finished.is_set()
        c.abort()
    async with asyncio.timeout(WAIT):
        await up.gone.wait()  # the upstream's write failed: the proxy closed its connection
    line = await proxy.logs.access_line("/svc/endless")
    assert (line["status"], line["error"]) == (200, "client_gone")
    await assert_serves_small(proxy)
    assert up.served == [(1, "/base/small"), (1, "/base/endless"), (2, "/base/small")]


# --- HTTP/1.0


async def test_http10_client_gets_a_chunked_upstream_body_close_delimited(
    start_upstream: StartUpstream, start_logged: StartLogged
) -> None:
    gate = asyncio.Event()
    producer = Producer(3 * MIB + 17, chunked=True, after=MIB, gate=gate)
    proxy = await start_logged(config(await start_upstream(producer.app())))
    async with connect(proxy.port) as c:
        await c.get("/svc/old", version="1.0")
        status, headers = await c.head()
        gate.set()  # the rest of the body comes once the head is out: spliced, not buffered
        size, digest = await c.body_digest(headers)
    assert status == "HTTP/1.0 200 OK"
    assert "Content-Length" not in headers and "Transfer-Encoding" not in headers
    assert (size, digest) == (producer.total, producer.digest.hexdigest())
    line = await proxy.logs.access_line("/svc/old")
    assert (line["status"], line["error"], line["bytes_out"]) == (200, "", producer.total)
