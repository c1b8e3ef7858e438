"""The main listener's HTTP/1.1 server: httptools heads, one task per request, no framework.

aiohttp's server builds a request object, a payload stream, a response object and a
writer for every request; for a proxy of small requests that was a large part of the CPU.
This protocol serves the common request itself (a complete head with no body or a
Content-Length one, accepted by ``dispatch``) and hands the connection over to aiohttp
for everything else: chunked bodies, unknown expectations, Upgrade, admin paths and
anything malformed or over a limit. The hand-over
switches the transport to an aiohttp protocol and gives it every byte not yet served,
so aiohttp answers exactly as it does without this layer in front.

Connections are registered with aiohttp's server (``manager``), so the connection cap,
``pre_shutdown`` (stop taking requests) and ``shutdown`` (let in-flight ones finish)
cover them too.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Limits
from proxy.forward.downstream import CONTINUE
from proxy.forward.headers import encode_head
from proxy.problems import ProxyError, problem_body

MAX_PIPELINED = 256 * 1024  # unserved bytes buffered before the socket stops being read
MAX_METHOD = 64  # a method is judged by this many of its bytes before the head is whole
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (what may be one)
_PHRASES = {s.value: s.phrase for s in HTTPStatus}


@dataclass(slots=True)
class Head:
    """A parsed request head; strings decoded as aiohttp decodes them."""

    method: str
    version: str  # "1.1" or "1.0"
    target: str  # the raw request target
    raw_headers: list[tuple[bytes, bytes]]
    headers: CIMultiDictProxy[str]
    keep_alive: bool
    content_length: int | None = None  # the announced body length; None: no body
    expect_continue: bool = False  # answer 100 Continue before the body is read


Serve = Callable[["FastDownstream"], Coroutine[Any, Any, None]]
Dispatch = Callable[[Head], Serve | None]
"""Decides, without side effects, whether the lean path serves a request (None: aiohttp)."""


class _HeadParser:
    """httptools judges the head; the fields are then split from its bytes (cheaper than a
    Python callback per header, and the same fields once the parser has accepted them)."""

    __slots__ = ("complete", "keep_alive", "parser")

    # callbacks httptools looks up and this class leaves out: found as None, a failed
    # attribute lookup (an exception raised and caught) per parser is not paid
    on_url = on_header = on_body = on_message_begin = on_message_complete = None
    on_chunk_header = on_chunk_complete = None

    def __init__(self) -> None:
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # reset once the message is complete
        self.complete = True


def parse_head(data: bytes, limits: Limits) -> Head | None:
    """The head (ending in CRLF CRLF) of a request with no body or a Content-Length one;
    None: aiohttp judges it (chunked bodies, upgrades, unknown expectations, anything odd)."""
    cb = _HeadParser()
    try:
        cb.parser.feed_data(data)
    except httptools.HttpParserUpgrade:  # served below only if no protocol switch is asked
        if not cb.complete or data.startswith(b"CONNECT "):
            return None
    except httptools.HttpParserError:  # aiohttp answers those
        return None
    lines = data[:-4].split(b"\r\n")
    first = lines[0].split(b" ")
    if not cb.complete or len(first) != 3 or len(lines[0]) > limits.max_line_size:
        return None
    if len(lines) > limits.max_headers + 1:
        return None
    raw = []
    for line in lines[1:]:
        if len(line) > limits.max_field_size:
            return None
        name, _, value = line.partition(b":")
        raw.append((name, value.strip(b" \t")))
    if len(raw) > 1 and _repeats_a_singleton(raw):
        return None
    headers = CIMultiDict([(n.decode(_ENC, _ERR), v.decode(_ENC, _ERR)) for n, v in raw])
    if "Transfer-Encoding" in headers or _tunnels(headers):
        return None
    version = first[2][5:].decode("ascii")
    length = headers.get("Content-Length")
    expect = headers.get("Expect")
    if length is not None and (not length.isdigit() or len(length) > 18):
        return None
    continue_ = expect is not None and version == "1.1"  # HTTP/1.0 ignores Expect
    if continue_ and expect is not None and expect.lower() != "100-continue":
        return None  # aiohttp answers 417
    return Head(
        method=first[0].decode("ascii"),
        version=version,
        target=first[1].decode(_ENC, _ERR),
        raw_headers=raw,
        headers=CIMultiDictProxy(headers),
        keep_alive=cb.keep_alive,
        content_length=None if length is None else int(length),
        expect_continue=continue_,
    )


_ENC, _ERR = "utf-8", "surrogateescape"


def _tunnels(headers: CIMultiDict[str]) -> bool:
    """Whether the request asks for a protocol the proxy tunnels (WebSocket: aiohttp's path).
    Any other ``Upgrade`` (``h2c``...) is ignored: the request is served as HTTP/1.1, and
    the header, hop-by-hop, is never forwarded."""
    return any(v.strip().lower() == "websocket" for v in headers.getall("Upgrade", ()))


_SINGLETONS = frozenset(name.encode() for name in SINGLETON_HEADERS)


def _repeats_a_singleton(raw: list[tuple[bytes, bytes]]) -> bool:
    """aiohttp refuses a repeated User-Agent, Content-Type, ETag...: so does this path."""
    names = [name.lower() for name, _ in raw]
    if len(set(names)) == len(names):
        return False
    seen: set[bytes] = set()
    for name in names:
        if name in seen and name in _SINGLETONS:
            return True
        seen.add(name)
    return False


class FastProtocol(asyncio.Protocol):
    """One client connection: serves heads while ``dispatch`` accepts them."""

    _task_handler = None  # what aiohttp's server looks for on a closing connection

    def __init__(
        self,
        manager: Any,
        dispatch: Dispatch,
        fallback: Callable[[], asyncio.Protocol],
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._manager = manager
        self._dispatch = dispatch
        self._fallback = fallback
        self._limits = limits
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.scheme = "http"  # "https" on a TLS listener (asyncio's SSL transport wraps this)
        self._buf = b""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._holds: set[str] = set()  # why the socket is not read (see hold_reading)
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0  # start of the current wait: for a head, or idle between requests
        self._limit = limits.header_timeout
        self.keep_alive = True  # cleared when a response must end the connection
        self._body: _Body | None = None  # the request body being received
        self._discard = 0  # body bytes still to drop before closing (see _linger)
        self.flow: tuple[Callable[[], None], Callable[[], None]] | None = None  # see on_flow

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._manager.connection_made(self, transport)
        if len(self._manager.connections) > self._limits.max_connections:
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._wait_for(self._limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._discard:  # lingering: the rest of a body nobody will read
            self._discard -= min(self._discard, len(data))
            if not self._discard:
                self._end_linger()
            return
        body = self._body
        if body is not None and body.left:
            data = body.feed(data)  # the request body's bytes, as they came: no copy
            if not data:
                return
        first = not self._buf
        self._buf = self._buf + data if self._buf else data
        if self._task is not None:
            if len(self._buf) > MAX_PIPELINED:
                self.hold_reading("pipelined", True)
            return
        self._next()
        if first and self._buf and self._task is None:
            self._wait_for(self._limits.header_timeout)  # a head has begun: due in time

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._stop_timer()
        if self._body is not None:
            self._body.lost()
        if self._task is not None:
            self._task.cancel()  # as aiohttp's handler_cancellation: the client is gone
        self._wake_drain(ConnectionResetError("client closed the connection"))
        self._manager.connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.flow is not None:
            self.flow[0]()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain(None)
        if self.flow is not None:
            self.flow[1]()
        if "answers" in self._holds and self._task is None and self.transport is not None:
            self.hold_reading("answers", False)
            self._next_or_wait()

    # --- aiohttp's server calls these at shutdown

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Take no further requests; close now when idle."""
        self._closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Let the request in flight finish within ``timeout``, then close."""
        self._closing = True
        task = self._task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        if self.transport is not None:
            self.transport.close()

    # --- serving

    def _next(self) -> None:
        """Serve the next buffered head, wait for the rest of it, or hand the connection over."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if self._unfinished_head_refused(buf):
                self._hand_over()
            return
        if self._closing:
            if self.transport is not None:
                self.transport.close()
            return
        head = parse_head(buf[: end + 4], self._limits)
        serve = None if head is None else self._dispatch(head)
        if serve is None or head is None:
            self._hand_over()
            return
        rest = buf[end + 4 :]
        down = FastDownstream(self, head)
        if head.content_length:
            self._body = body = _Body(self, head.content_length, invite=head.expect_continue)
            down.body = body
            rest = body.feed(rest) if rest else rest
        self._buf = rest
        self._task = self._loop.create_task(serve(down))
        self._task.add_done_callback(self._served)

    def _unfinished_head_refused(self, buf: bytes) -> bool:
        """Whether aiohttp would refuse this head before its end arrives: a bare LF, a line
        already over its limit, or bytes that cannot begin a request line (a TLS hello on
        the plain port). Waiting would only delay its answer."""
        method = buf.split(b" ", 1)[0][:MAX_METHOD]
        if _METHOD.fullmatch(method) is None:
            return True
        lines = buf.count(b"\r\n")
        if buf.count(b"\n") != lines or lines > self._limits.max_headers + 1:
            return True
        start = buf.rfind(b"\n") + 1
        limit = self._limits.max_line_size if start == 0 else self._limits.max_field_size
        return len(buf) - start > limit

    def _served(self, task: asyncio.Task[None]) -> None:
        self._task = None
        down_keeps = not task.cancelled() and task.exception() is None
        body, self._body = self._body, None
        unread = body is not None and body.left > 0  # nothing after it is a head
        if self._holds:  # the request is over: what it held back no longer holds
            self._release_reading()
        transport = self.transport
        if transport is None:
            return
        if unread and not transport.is_closing():
            assert body is not None
            self._linger(body.left)
            return
        if self._closing or not down_keeps or not self.keep_alive or transport.is_closing():
            transport.close()
            return
        if self.write_paused:  # a client not reading its answers gets no more of them
            self.hold_reading("answers", True)
            return
        self._next_or_wait()

    def _next_or_wait(self) -> None:
        """After a response: serve what is buffered, or start the idle wait."""
        if not self._buf:
            self._wait_for(self._limits.keepalive_timeout)
            return
        self._next()
        if self._buf and self._task is None:
            self._wait_for(self._limits.header_timeout)

    def _linger(self, left: int) -> None:
        """Close our side now and drop the rest of an unread body before closing for good
        (a lingering close, as nginx does): closing with bytes unread would reset the
        connection, and a client still sending would lose the answer just sent."""
        self._discard = left
        self._buf = b""
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._release_reading()
        self._stop_timer()
        self._timer = self._loop.call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _hand_over(self) -> None:
        """Give the connection and its unserved bytes to aiohttp, for good."""
        transport = self.transport
        if transport is None:
            return
        self._stop_timer()
        self._manager.connection_lost(self, None)
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.write_paused:  # the transport will not say so again
            protocol.pause_writing()
        self._release_reading()
        buf, self._buf = self._buf, b""
        if buf and not transport.is_closing():
            protocol.data_received(buf)

    # --- timers: one per connection, re-armed only when it fires early

    def _wait_for(self, limit: float) -> None:
        self._since = self._loop.time()
        self._limit = limit
        deadline = self._since + limit
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._task is not None or self.transport is None:
            return  # busy: the wait starts again when the response is done
        deadline = self._since + self._limit
        if self._loop.time() >= deadline:
            self.transport.close()
            return
        self._timer = self._loop.call_at(deadline, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- writing

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client closed the connection")
        transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client closed the connection")
        transport.writelines(parts)

    async def drain(self) -> None:
        if self.write_paused:
            self._drain = self._loop.create_future()
            await self._drain

    def _wake_drain(self, exc: Exception | None) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            if exc is None:
                drain.set_result(None)
            else:
                drain.set_exception(exc)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def hold_reading(self, reason: str, held: bool) -> None:
        """The socket is not read while any reason holds: a full request-body queue
        ("body"), too much pipelined while busy ("pipelined"), a client not reading its
        answers ("answers")."""
        was = bool(self._holds)
        if held:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        transport = self.transport
        if transport is None or transport.is_closing() or was == bool(self._holds):
            return
        if self._holds:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _release_reading(self) -> None:
        for reason in list(self._holds):
            self.hold_reading(reason, False)

    @property
    def body_unread(self) -> bool:
        return self._body is not None and self._body.left > 0


LINGER_SECONDS = 10.0  # how long an unread body is drained before closing (aiohttp's)
BODY_HIGH_WATER = 1024 * 1024  # request body bytes queued before the socket stops being read
BODY_LOW_WATER = 256 * 1024


class _Body:
    """A Content-Length request body as it arrives: chunks queued for the forwarder
    without copies, the socket paused while too much waits."""

    __slots__ = ("_chunks", "_conn", "_invite", "_lost", "_paused", "_queued", "_waiter", "left")

    def __init__(self, conn: FastProtocol, length: int, *, invite: bool = False) -> None:
        self._conn = conn
        self.left = length  # bytes still to arrive
        self._invite = invite  # 100 Continue is owed once the body is waited for
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False  # the socket is not read while too much waits here
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> bytes:
        """Take this body's share of ``data``; returns what follows the body."""
        take = data if len(data) <= self.left else data[: self.left]
        self.left -= len(take)
        self._chunks.append(take)
        self._queued += len(take)
        if self._queued > BODY_HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.hold_reading("body", True)
        self._wake()
        return data[len(take) :] if len(take) < len(data) else b""

    def lost(self) -> None:
        self._lost = True
        self._wake()

    def read_nowait(self) -> bytes:
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._paused and self._queued <= BODY_LOW_WATER:
            self._paused = False
            self._conn.hold_reading("body", False)
        return chunk

    async def read_any(self) -> bytes:
        while not self._chunks:
            if not self.left:
                return b""
            if self._lost:
                raise ConnectionResetError("client closed the connection mid-body")
            if self._invite:  # not before: a request refused first never invites its body
                self._invite = False
                self._conn.write(CONTINUE)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.read_nowait()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class FastDownstream:
    """One request on a ``FastProtocol``, as the forwarder's ``Downstream``."""

    __slots__ = ("_chunked", "_conn", "_head", "body", "head_sent")

    def __init__(self, conn: FastProtocol, head: Head) -> None:
        self._conn = conn
        self._head = head
        self._chunked = False
        self.head_sent = False
        self.body: _Body | None = None

    @property
    def content_length(self) -> int | None:
        return self._head.content_length

    @property
    def body_exists(self) -> bool:
        return self.body is not None

    @property
    def method(self) -> str:
        return self._head.method

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._head.headers

    @property
    def peer(self) -> str:
        return self._conn.peer

    @property
    def scheme(self) -> str:
        return self._conn.scheme

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client connection (TLS details: its client certificate)."""
        return self._conn.transport

    async def read_exactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read_any()
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_any(self) -> bytes:
        return b"" if self.body is None else await self.body.read_any()

    def read_nowait(self) -> bytes:
        return b"" if self.body is None else self.body.read_nowait()

    async def respond(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        body: bytes,
        length: int | None,
    ) -> None:
        if length is not None:
            framing = f"Content-Length: {length}\r\n"
        elif self._head.method == "HEAD" or status in (204, 304) or status < 200:
            framing = ""
        else:  # the upstream framed it without a length: so does the proxy (chunked)
            await self.start(status, reason, headers, None)
            if body:
                await self.write(body)
            await self.finish()
            return
        head = self._head_bytes(status, reason, headers, framing)
        self._conn.write(head + body if body else head)

    async def start(
        self, status: int, reason: str | None, headers: CIMultiDict[str], length: int | None
    ) -> None:
        if length is not None:
            framing = f"Content-Length: {length}\r\n"
        elif self._head.version == "1.1":
            framing, self._chunked = "Transfer-Encoding: chunked\r\n", True
        else:  # HTTP/1.0: the end of the body is the end of the connection
            framing, self._conn.keep_alive = "", False
        self._conn.write(self._head_bytes(status, reason, headers, framing))

    @property
    def sink(self) -> FastDownstream:
        return self

    def write_now(self, chunk: bytes) -> None:
        if not chunk:
            return  # an empty chunk would end a chunked body
        if self._chunked:
            self._conn.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
        else:
            self._conn.write(chunk)

    def on_flow(self, pause: Callable[[], None] | None, resume: Callable[[], None] | None) -> None:
        self._conn.flow = None if pause is None or resume is None else (pause, resume)
        if pause is not None and self._conn.write_paused:
            pause()

    async def write(self, chunk: bytes) -> None:
        self.write_now(chunk)
        if self._conn.write_paused:
            await self._conn.drain()

    async def finish(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")

    def problem(self, err: ProxyError, request_id: str) -> None:
        """The proxy's own error; once a head is out only cutting the connection is honest."""
        if self.head_sent:
            self._conn.abort()
            return
        headers = CIMultiDict(err.headers)
        headers["Content-Type"] = "application/problem+json"
        headers["X-Request-Id"] = request_id
        body = problem_body(err, request_id)
        framing = f"Content-Length: {len(body)}\r\n"
        self._conn.write(self._head_bytes(err.status, None, headers, framing) + body)

    def abort(self) -> None:
        self._conn.abort()

    def _head_bytes(
        self, status: int, reason: str | None, headers: CIMultiDict[str], framing: str
    ) -> bytes:
        head = self._head
        conn = self._conn
        keep = head.keep_alive and conn.keep_alive and not conn.closing and not conn.body_unread
        if not keep:
            self._conn.keep_alive = False
        if reason is None:
            reason = _PHRASES.get(status, "")
        lines = [f"HTTP/{head.version} {status} {reason}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        if framing:  # then Date and Server: the order aiohttp's server writes them in
            lines.append(framing)
        if "Date" not in headers:
            lines.append(f"Date: {_http_date()}\r\n")
        if "Server" not in headers:
            lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
        if not keep and head.version == "1.1":
            lines.append("Connection: close\r\n")
        elif keep and head.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        data = encode_head(lines)
        self.head_sent = True
        return data


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
