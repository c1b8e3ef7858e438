"""Content-Length request bodies on the lean server, spoken to over raw sockets.

The lean server now receives bodies itself (queued as they arrived, the socket paused past
a high-water mark) and answers ``Expect: 100-continue``. These tests pin down what a client
and an upstream see: exact bytes with one framing, interim and final answers, bounded
buffering, early answers and refusals that end the connection, disconnects, stalls, and a
replay that sends the same body twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from proxy.app import RUNTIME
from tests.conftest import StartProxy, StartUpstream
from tests.helpers import (
    Answer,
    Echo,
    assert_problem,
    own_proxy,
    parse_answer_head,
    provider_json,
)
from tests.helpers import raw_request as req
from tests.helpers import svc_config as config
from tests.vendors import Simplifi, serve

WAIT = 10.0  # outer bound on any single wait: a hang fails, never stalls
KIB, MIB = 1024, 1024 * 1024


def upload(
    target: str, body: bytes, headers: str = "", *, method: str = "POST", version: str = "1.1"
) -> bytes:
    length = f"Content-Length: {len(body)}\r\n{headers}"
    return req(target, length, method=method, version=version, body=body)


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a raw client that keeps every byte, even when the proxy resets the connection


class Wire(asyncio.Protocol):
    """A client connection whose received bytes survive a reset: a proxy closing a connection
    with an unread body resets it, and a StreamReader would then drop the answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.gone = False
        self.changed = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._writable.set()
        self.changed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.gone:
            self.transport.write(data)

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.drain()

    async def drain(self) -> None:
        async with asyncio.timeout(WAIT):
            await self._writable.wait()

    def small_send_buffer(self) -> None:
        """Keep the client's own kernel buffer out of what the proxy is measured to take."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KIB)

    @property
    def unsent(self) -> int:
        """Bytes written but not yet taken by the kernel (the proxy stopped reading)."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    async def _wait(self) -> None:
        if self.gone:
            raise ConnectionError(f"closed; unparsed: {bytes(self.data[:200])!r}")
        self.changed.clear()
        await self.changed.wait()

    async def _take(self, n: int) -> bytes:
        while len(self.data) < n:
            await self._wait()
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    async def answer(self, method: str = "POST") -> Answer:
        """The next response, read exactly as framed (Content-Length or no body)."""
        async with asyncio.timeout(WAIT):
            while (end := self.data.find(b"\r\n\r\n")) < 0:
                await self._wait()
            head = await self._take(end + 4)
            version, status, headers = parse_answer_head(head)
            body = b""
            if method != "HEAD" and status >= 200 and status not in (204, 304):
                assert "Transfer-Encoding" not in headers, head
                body = await self._take(int(headers["Content-Length"]))
            return Answer(version, status, headers, body)

    async def closed(self) -> bytes:
        """Whatever arrives until the proxy closes the connection (fails if it never does)."""
        async with asyncio.timeout(WAIT):
            while not self.gone:
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.data)


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Wire]:
    loop = asyncio.get_running_loop()
    _, wire = await loop.create_connection(Wire, "127.0.0.1", port)
    try:
        yield wire
    finally:
        if wire.transport is not None:
            wire.transport.close()


def assert_one_length(e: Echo, index: int, body: bytes) -> None:
    """The upstream got exactly ``body``, framed by a single Content-Length."""
    seen = e.seen[index]
    assert (seen.body_len, seen.body_sha256) == (len(body), sha(body))
    assert seen.header_all("Content-Length") == [str(len(body))]
    assert seen.header("Transfer-Encoding") is None
    assert seen.header("Expect") is None


# --- an upstream that reads bodies when told, and says how each read ended


@dataclass
class Got:
    """One request body as the upstream handler saw it end."""

    declared: int | None
    length: int
    digest: str
    error: str | None  # the exception that ended the read; None: read to its end


@dataclass
class Taker:
    """An aiohttp upstream: waits for ``gate`` before reading, or answers ``early`` unread."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    early: int | None = None
    url: URL = field(default_factory=URL)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    got: asyncio.Queue[Got] = field(default_factory=asyncio.Queue)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @classmethod
    async def started(cls, start: StartUpstream, *, reads: bool = True) -> Taker:
        """A running Taker; ``reads``: its gate is open from the start."""
        taker = cls()
        if reads:
            taker.gate.set()
        taker.url = await start(taker.app())
        return taker

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived.set()
        if self.early is not None:
            return web.json_response({"early": True}, status=self.early)
        await self.gate.wait()
        digest, n, error = hashlib.sha256(), 0, None
        try:
            async for chunk in request.content.iter_any():
                self.reading.set()
                digest.update(chunk)
                n += len(chunk)
        except BaseException as exc:  # cancelled, or the payload failed: the proxy cut it
            error = type(exc).__name__
            raise
        finally:
            self.got.put_nowait(Got(request.content_length, n, digest.hexdigest(), error))
        return web.json_response({"sha256": digest.hexdigest(), "len": n})

    async def next_body(self) -> Got:
        async with asyncio.timeout(WAIT):
            return await self.got.get()


# --- 1. bodies of every size, then the connection goes on

SIZES = [0, 1, 64 * KIB, 64 * KIB + 1, 5 * MIB]


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("size", SIZES, ids=["0", "1", "64k", "64k+1", "5m"])
async def test_body_arrives_exact_and_the_connection_goes_on(
    size: int, method: str, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    body = payload(size)
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(upload("/svc/one", body, method=method))
        first = await c.answer()
        await c.send(req("/svc/after-one"))
        after_one = await c.answer("GET")
        await c.send(upload("/svc/two", body, method=method) + req("/svc/after-two"))
        second, after_two = await c.answer(), await c.answer("GET")
    for answer in (first, second):
        assert answer.status == 200 and "Connection" not in answer.headers
        assert answer.json()["body_sha256"] == sha(body)
        assert answer.json()["method"] == method
    assert after_one.json()["raw_path"] == "/base/after-one"
    assert after_two.json()["raw_path"] == "/base/after-two"
    paths = ["/base/one", "/base/after-one", "/base/two", "/base/after-two"]
    assert [s.raw_path for s in e.seen] == paths
    assert_one_length(e, 0, body)
    assert_one_length(e, 2, body)


# --- 2. Expect


@pytest.mark.parametrize("size", [1000, 300 * KIB], ids=["small", "streamed"])
async def test_100_continue_comes_before_the_body_is_sent(
    size: int, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    body = payload(size)
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        head = upload("/svc/exp", body, "Expect: 100-continue\r\n")[: -len(body)]
        await c.send(head)
        interim = await c.answer()
        assert (interim.version, interim.status, len(interim.headers)) == ("1.1", 100, 0)
        assert e.seen == []  # the upstream waits for the body, the client for the 100
        await c.send(body)
        final = await c.answer()
        await c.send(req("/svc/next", "Connection: close\r\n"))
        following = await c.answer("GET")
        assert await c.closed() == b""  # nothing but the three answers
    assert final.status == 200 and final.json()["raw_path"] == "/base/exp"
    assert following.json()["raw_path"] == "/base/next"
    assert_one_length(e, 0, body)


async def test_body_sent_with_the_head_gets_one_final_answer(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    body = payload(5000)
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(upload("/svc/eager", body, "Expect: 100-continue\r\n") + req("/svc/next"))
        answer = await c.answer()
        if answer.status == 100:  # allowed, yet not needed: the body came with the head
            answer = await c.answer()
        following = await c.answer("GET")
        await c.send(req("/svc/last", "Connection: close\r\n"))
        last = await c.answer("GET")
        assert await c.closed() == b""
    assert answer.status == 200 and answer.json()["raw_path"] == "/base/eager"
    assert following.json()["raw_path"] == "/base/next"
    assert last.json()["raw_path"] == "/base/last"
    assert_one_length(e, 0, body)


async def test_unknown_expectation_is_417_from_aiohttp(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        await c.send(upload("/svc/odd", b"hello", "Expect: something-else\r\n"))
        answer = await c.answer()
    assert answer.status == 417
    assert e.seen == []


async def test_http10_ignores_expect(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    e, up = echo
    body = payload(2000)
    proxy = await start_proxy(config(up))
    async with connect(proxy.port) as c:
        request = upload("/svc/old", body, "Expect: 100-continue\r\n", version="1.0")
        await c.send(request[: -len(body)])
        await c.send(body)
        answer = await c.answer()  # the first answer is the final one: no 100
        assert await c.closed() == b""
    assert (answer.version, answer.status) == ("1.0", 200)
    assert answer.json()["raw_path"] == "/base/old"
    assert_one_length(e, 0, body)


CHUNKED_PRIME = req(
    "/svc/prime", "Transfer-Encoding: chunked\r\n", method="POST", body=b"2\r\nhi\r\n0\r\n\r\n"
)


async def on_path(c: Wire, via: str) -> None:
    """Put the connection on the chosen server: a chunked request hands it to aiohttp."""
    if via == "aiohttp":
        await c.send(CHUNKED_PRIME)
        assert (await c.answer()).status == 200


@pytest.mark.parametrize("via", ["lean", "aiohttp"])
@pytest.mark.parametrize(
    ("target", "status"), [("/svc/big", 413), ("/nowhere", 404)], ids=["too-large", "no-route"]
)
async def test_a_request_refused_before_its_body_gets_no_100_continue(
    via: str, target: str, status: int, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    """The proxy knows from the head alone (a Content-Length above max_body, no route) that
    it refuses: the client is not invited to send a body that would only be thrown away."""
    e, up = echo
    proxy = await start_proxy(config(up, "    max_body: 1KiB\n"))
    async with connect(proxy.port) as c:
        await on_path(c, via)
        head = f"Content-Length: {10 * MIB}\r\nExpect: 100-continue\r\n"
        await c.send(req(target, head, method="PUT"))  # and waits, as curl does
        refused = await c.answer("PUT")  # the first answer: a 100 here would fail
    assert_problem(refused, status)
    assert [s.raw_path for s in e.seen] == (["/base/prime"] if via == "aiohttp" else [])


@pytest.mark.parametrize("via", ["lean", "aiohttp"])
async def test_first_bytes_after_an_oversized_expect_head_are_the_413(
    via: str, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up, "    max_body: 1KiB\n"))
    async with connect(proxy.port) as c:
        await on_path(c, via)
        head = f"Content-Length: {KIB + 1}\r\nExpect: 100-continue\r\n"
        await c.send(req("/svc/big", head, method="POST"))
        async with asyncio.timeout(WAIT):
            while len(c.data) < 12:
                await c._wait()
        assert bytes(c.data).startswith(b"HTTP/1.1 413"), bytes(c.data[:100])
        assert b"100 Continue" not in bytes(c.data)


@pytest.mark.parametrize("via", ["lean", "aiohttp"])
async def test_100_continue_still_comes_when_the_body_is_wanted(
    via: str, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    body = payload(KIB)
    proxy = await start_proxy(config(up, "    max_body: 1KiB\n"))
    async with connect(proxy.port) as c:
        await on_path(c, via)
        await c.send(upload("/svc/fits", body, "Expect: 100-continue\r\n")[: -len(body)])
        assert (await c.answer()).status == 100
        await c.send(body)
        assert (await c.answer()).status == 200
    assert e.seen[-1].raw_path == "/base/fits"
    assert_one_length(e, len(e.seen) - 1, body)


# --- 3. backpressure on uploads

BIG = 64 * MIB
STEP = 256 * KIB
STALL = 0.5  # a drain not done in this long counts as stalled: the guard, not an assertion


async def push_until_stalled(c: Wire, body: bytes) -> int:
    """Write ``body`` in steps until a drain stalls; returns the bytes the proxy took."""
    sent = 0
    while sent < len(body):
        c.write(body[sent : sent + STEP])
        sent += min(STEP, len(body) - sent)
        try:
            async with asyncio.timeout(STALL):
                await c.drain()
        except TimeoutError:
            return sent - c.unsent
    return sent - c.unsent


async def test_upload_to_a_stalled_upstream_is_bounded_then_arrives_exact(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    taker = await Taker.started(start_upstream, reads=False)
    proxy = await start_proxy(config(taker.url))
    body = random.Random(64).randbytes(BIG)
    async with connect(proxy.port) as c:
        c.small_send_buffer()
        await c.send(req("/svc/big", f"Content-Length: {BIG}\r\n", method="POST"))
        async with asyncio.timeout(WAIT):
            await taker.arrived.wait()
        taken = await push_until_stalled(c, body)
        assert 0 < taken < BIG // 2, taken  # kernel buffers and 1 MiB in the proxy, no more
        assert taker.got.empty()
        taker.gate.set()
        c.write(body[taken + c.unsent :])
        await c.drain()
        answer = await c.answer()
    got = await taker.next_body()
    assert got == Got(BIG, BIG, sha(body), None)
    assert answer.status == 200 and answer.json() == {"sha256": sha(body), "len": BIG}


# --- 4. the upstream answers before it read the body


@pytest.mark.parametrize("status", [200, 413])
async def test_early_answer_ends_the_connection(
    status: int, start_upstream: StartUpstream, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    taker = Taker(early=status)
    early_up = await start_upstream(taker.app())
    e, up = echo
    route = f"  - prefix: /early/\n    upstream: {early_up}/\n"
    proxy = await start_proxy(config(up, top=route))
    body = payload(5 * MIB)
    async with connect(proxy.port) as c:
        c.write(upload("/early/x", body) + req("/svc/never"))
        answer = await c.answer()
        assert await c.closed() == b""
    assert answer.status == status and answer.json() == {"early": True}
    assert answer.headers["Connection"] == "close"
    async with connect(proxy.port) as c:
        small = payload(100)
        await c.send(upload("/svc/fresh", small))
        assert (await c.answer()).status == 200
    assert [s.raw_path for s in e.seen] == ["/base/fresh"]
    assert_one_length(e, 0, small)


# --- 5. max_body


LIMITS = pytest.mark.parametrize(
    ("route", "top"),
    [("    max_body: 1KiB\n", ""), ("", "limits: {max_body: 1KiB}\n")],
    ids=["route", "global"],
)


@LIMITS
async def test_announced_length_over_max_body_is_413_and_closed(
    route: str, top: str, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up, route, top))
    fits = payload(KIB)
    async with connect(proxy.port) as c:
        await c.send(upload("/svc/fits", fits))
        assert (await c.answer()).status == 200
        over = f"Content-Length: {KIB + 1}\r\nX-Request-Id: rid-413\r\n"
        await c.send(req("/svc/over", over, method="POST"))  # the body is still to come
        refused = await c.answer()
        assert await c.closed() == b""
    assert_problem(refused, 413, "rid-413")
    assert refused.headers["Connection"] == "close"
    async with connect(proxy.port) as c:  # 10 MiB announced, a little sent: refused at once
        await c.send(req("/svc/huge", f"Content-Length: {10 * MIB}\r\n", method="PUT") + fits)
        refused = await c.answer()
        assert await c.closed() == b""
    assert_problem(refused, 413)
    assert refused.headers["Connection"] == "close"
    assert [s.raw_path for s in e.seen] == ["/base/fits"]
    assert_one_length(e, 0, fits)


@LIMITS
async def test_over_max_body_sent_whole_is_never_read_as_a_head(
    route: str, top: str, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    """A refused body that arrived whole may leave the connection open (it was all taken
    off the wire); either way, a head inside it is never served."""
    e, up = echo
    proxy = await start_proxy(config(up, route, top))
    smuggled = req("/svc/smuggled")
    body = smuggled + b"x" * (KIB + 1 - len(smuggled))
    async with connect(proxy.port) as c:
        await c.send(upload("/svc/over", body) + req("/svc/after"))
        refused = await c.answer()
        if refused.headers.get("Connection") == "close":
            assert await c.closed() == b""
        else:
            assert (await c.answer("GET")).json()["raw_path"] == "/base/after"
    assert_problem(refused, 413)
    assert "/base/smuggled" not in [s.raw_path for s in e.seen]


# --- 6. the client goes away mid-body


@pytest.mark.parametrize("size", [10 * KIB, 5 * MIB], ids=["small", "streamed"])
async def test_client_gone_mid_body_aborts_the_upstream_request(
    size: int, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    taker = await Taker.started(start_upstream)
    body = payload(size)
    async with own_proxy(config(taker.url), tmp_path) as proxy:
        async with connect(proxy.port) as c:
            await c.send(upload("/svc/gone", body)[: -size // 2])
            if size > 64 * KIB:  # streamed: the upstream is reading when the client goes
                async with asyncio.timeout(WAIT):
                    await taker.reading.wait()
            assert c.transport is not None
            c.transport.abort()
        line = await proxy.logs.access_line("/svc/gone")
        assert line["error"] == "client_gone"
        assert proxy.app[RUNTIME].observer.metrics.in_flight_now == 0
        if size > 64 * KIB:
            got = await taker.next_body()
            assert got.error is not None and got.length < size
        else:
            assert not taker.arrived.is_set()  # a small body is read whole before sending
        async with connect(proxy.port) as c:
            small = payload(300)
            await c.send(upload("/svc/next", small))
            answer = await c.answer()
        assert answer.json() == {"sha256": sha(small), "len": 300}


# --- 7. a replay sends the lean path's body again


@dataclass
class Gatekeeper:
    """An upstream that rejects the first token it sees, reading the body or answering early."""

    early: bool
    seen: list[tuple[str, str | None, int, str | None]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        length = request.headers.get("Content-Length")
        rejected = not self.seen or auth == self.seen[0][0]
        if self.early and rejected:
            self.seen.append((auth, None, 0, length))
            return web.json_response({"error": "expired"}, status=401)
        data = await request.read()
        self.seen.append((auth, sha(data), len(data), length))
        if rejected:
            return web.json_response({"error": "expired"}, status=401)
        return web.json_response({"sha256": sha(data), "len": len(data)})


@pytest.mark.parametrize("early", [False, True], ids=["read", "early"])
async def test_replay_sends_the_same_body_again(
    early: bool, start_upstream: StartUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    gate = Gatekeeper(early)
    up = await start_upstream(gate.app())
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    body = payload(2 * MIB)
    async with serve(Simplifi()) as vendor:
        proxy = await start_proxy(f"""
spool_dir: {spool_dir}
providers:
  v: {provider_json(vendor)}
routes:
  - prefix: /api/
    upstream: {up}/
    provider: v
    replay: {{memory: 64KiB, max_body: 4MiB}}
""")
        async with connect(proxy.port) as c:
            await c.send(upload("/api/doc", body) + req("/api/next"))
            answer = await c.answer()
            following = await c.answer("GET")
        assert vendor.calls["token"] == 2
    assert answer.status == 200 and answer.json() == {"sha256": sha(body), "len": len(body)}
    assert following.status == 200
    (a1, h1, n1, l1), (a2, h2, n2, l2), _ = gate.seen
    assert a1 != a2
    assert (h2, n2, l2) == (sha(body), len(body), str(len(body)))
    assert l1 == str(len(body))
    if not early:
        assert (h1, n1) == (sha(body), len(body))
    assert [p for p in spool_dir.rglob("*") if p.is_file()] == []


# --- 8. a client that stops sending its body


async def stall(size: int, sent: int, taker: Taker, start_proxy: StartProxy) -> Answer:
    """Send the head and ``sent`` of ``size`` body bytes, then nothing (route read: 0.5 s)."""
    proxy = await start_proxy(config(taker.url).replace("read: 5", "read: 0.5"))
    request = upload("/svc/slow", payload(size), "X-Request-Id: rid-slow\r\n")
    async with connect(proxy.port) as c:
        await c.send(request[: len(request) - size + sent])
        answer = await c.answer()
        assert await c.closed() == b""
    assert answer.headers["Connection"] == "close"
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["request_id"] == "rid-slow"
    return answer


async def test_stalled_small_body_is_408_and_never_forwarded(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    taker = await Taker.started(start_upstream)
    answer = await stall(1000, 100, taker, start_proxy)
    assert_problem(answer, 408, "rid-slow")
    assert not taker.arrived.is_set()  # a small body is read whole before it is sent


async def test_stalled_streamed_body_is_never_presented_as_complete(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    taker = await Taker.started(start_upstream)
    answer = await stall(MIB, 300 * KIB, taker, start_proxy)
    assert answer.status == 408
    got = await taker.next_body()
    assert got.error is not None and got.length < MIB


async def test_stalled_streamed_body_is_blamed_on_the_client(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    taker = await Taker.started(start_upstream)
    answer = await stall(MIB, 300 * KIB, taker, start_proxy)
    assert_problem(answer, 408, "rid-slow")


async def test_upstream_that_stops_reading_the_body_is_an_upstream_timeout(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    """The read timeout, off while the body goes out, covers an upstream not taking it."""
    taker = await Taker.started(start_upstream, reads=False)
    proxy = await start_proxy(config(taker.url).replace("read: 5", "read: 0.5"))
    body = random.Random(65).randbytes(BIG)
    async with connect(proxy.port) as c:
        c.small_send_buffer()
        await c.send(upload("/svc/big", body, "X-Request-Id: rid-up\r\n")[: -len(body)])
        await push_until_stalled(c, body)
        answer = await c.answer()
        assert await c.closed() == b""
    assert_problem(answer, 504, "rid-up")
    assert answer.json()["type"].endswith("upstream-timeout")
    assert answer.headers["Connection"] == "close"
    assert taker.got.empty()
