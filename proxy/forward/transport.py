"""A lean HTTP/1.1 client for upstream requests: pooled keep-alive connections, httptools.

aiohttp's ClientSession spends most of a small proxied request's CPU in per-request
machinery (request objects, default headers, connector bookkeeping, a parser that builds
Python objects line by line). The forwarder needs far less: one request head written at
once, a C parser for the answer, and body chunks handed over as they arrive, never joined.

What ClientSession gave for free is rebuilt here on purpose: TLS (asyncio's SSL transport),
a small DNS cache, connect and idle-read timeouts, idle expiry of pooled connections, one
retry when a pooled connection turns out dead before it answered (only for a request that is
safe to send twice: ``upstream_rules.repeatable``), 1xx interim responses skipped, and
read-until-close bodies. A response head is judged before it is handed over (the status,
Transfer-Encoding and header text rules of ``upstream_rules``), so a response the proxy cannot
relay as sent becomes a 502 while no byte of it has reached the client.

A connection goes back to the pool only when both the request and the response were
complete and neither side asked to close; anything else closes it, so a half-read or
half-sent exchange can never leak into the next request.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.forward.headers import encode_head
from proxy.forward.upstream_rules import BodyFailed as BodyFailed
from proxy.forward.upstream_rules import ConnectFailed as ConnectFailed
from proxy.forward.upstream_rules import ConnectionLost as ConnectionLost
from proxy.forward.upstream_rules import NotRepeated as NotRepeated
from proxy.forward.upstream_rules import ProtocolError as ProtocolError
from proxy.forward.upstream_rules import SinkFailed as SinkFailed
from proxy.forward.upstream_rules import TransportError as TransportError
from proxy.forward.upstream_rules import check_status, check_transfer_encoding, repeatable

KEEPALIVE = 30.0  # idle pooled connections older than this are closed (aiohttp's default)
DNS_TTL = 10.0
HIGH_WATER = 512 * 1024  # response bytes buffered before the socket stops being read
LOW_WATER = 128 * 1024
MAX_HEAD = 64 * 1024  # response header bytes accepted
MAX_HEADERS = 100
_NO_LENGTH_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FRAMING_NAMES = ("content-length", "transfer-encoding")
Body = bytes | AsyncIterable[bytes] | None


class _Stale(ConnectionLost):
    """A pooled connection died before answering a request that can be sent again."""


@dataclass(slots=True)
class _Resolver:
    """getaddrinfo results kept for a few seconds: uvloop caches nothing."""

    ttl: float = DNS_TTL
    _cache: dict[tuple[str, int], tuple[float, list[tuple[int, str, int]]]] = field(
        default_factory=dict
    )

    async def resolve(self, host: str, port: int) -> list[tuple[int, str, int]]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        hit = self._cache.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectFailed(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        addrs = [(int(family), str(addr[0]), int(addr[1])) for family, _, _, _, addr in infos]
        self._cache[(host, port)] = (now + self.ttl, addrs)
        return addrs


class Response:
    """One upstream response: the head once parsed, the body as the chunks that arrived.

    It is also the httptools callback target; a new parser per request keeps a HEAD
    response (whose Content-Length announces no body) from confusing the next one.
    """

    __slots__ = (
        "_buffered", "_callback_error", "_chunks", "_conn", "_error", "_head_bytes",
        "_head_done", "_head_only", "_idle_timer", "_interim", "_keep_alive", "_left", "_loop",
        "_parser", "_paused", "_raw", "_read_timeout", "_sink", "_sink_error", "_sink_last",
        "_sink_paused", "_status_text", "_until_close", "_waiter", "content_length", "done",
        "got_bytes", "headers", "keep_alive", "reason", "sender", "sent", "status",
    )  # fmt: skip

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content_length: int | None
    on_chunk_header = on_chunk_complete = None  # looked up by httptools: None is cheaper

    def __init__(self, conn: _Connection, method: str, read_timeout: float | None) -> None:
        self._conn: _Connection | None = conn
        self._loop = conn.loop
        self._head_only = method == "HEAD"
        self._read_timeout = read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self._raw: CIMultiDict[str] = CIMultiDict()
        self._status_text = b""
        self._head_bytes = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._sink: collections.abc.Callable[[bytes], None] | None = None
        self._sink_error: BaseException | None = None
        self._sink_last = 0.0  # when the sink last got a chunk: the idle read timeout's start
        self._sink_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None  # the read timeout of _wait
        self._error: BaseException | None = None
        self._callback_error: TransportError | None = None
        self._head_done = False
        self._interim = False
        self._until_close = False
        self._left: int | None = None  # Content-Length body bytes still to come
        self._keep_alive = False
        self.done = False
        self.keep_alive = False
        self.got_bytes = False
        self.sender: asyncio.Task[None] | None = None
        self.sent = False

    # --- what the forwarder uses

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read: bounded by the backpressure marks."""
        return self._buffered

    async def readany(self) -> bytes:
        """The next chunk as it arrived (no copies joined); ``b""`` once the body is complete."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= LOW_WATER:
                    self._resume()
                return chunk
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            await self._wait()

    async def splice(self, sink: collections.abc.Callable[[bytes], None]) -> None:
        """Hand the rest of the body to ``sink`` from the connection's own callback, chunk by
        chunk as it arrives, and return once it is complete. A streamed body then costs no
        task switch per chunk; ``pause``/``resume`` carry the sink's backpressure.

        Raises ``SinkFailed`` when ``sink`` raised (the client went away), the transport's
        errors when the upstream failed, and TimeoutError when it stalled for the read timeout.
        """
        while self._chunks:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            sink(chunk)
        self._sink = sink
        self._sink_last = self._loop.time()
        if self._paused:  # the queue is drained; the sink's own pause still holds
            self._paused = False
            if not self._sink_paused and self._conn is not None:
                self._conn.resume_reading()
        try:
            while not self.done:
                if self._error is not None:
                    break
                await self._wait(idle=True)
        finally:
            self._sink = None
        if self._sink_error is not None:
            raise SinkFailed("the sink failed") from self._sink_error
        if self._error is not None:
            raise self._error

    def pause(self) -> None:
        """The sink is full: stop reading the upstream."""
        if not self._sink_paused:
            self._sink_paused = True
            if self._conn is not None:
                self._conn.pause_reading()

    def resume(self) -> None:
        if self._sink_paused:
            self._sink_paused = False
            self._sink_last = self._loop.time()
            if self._conn is not None:
                self._conn.resume_reading()

    def release(self) -> None:
        """Give the connection back when the exchange is complete; close it otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.done and self.keep_alive and self.sent and not conn.closed:
            if self._paused or self._sink_paused:  # a pooled connection must hear its close
                self._paused = self._sink_paused = False
                conn.resume_reading()
            conn.park()
        else:
            self._abort(conn)

    def close(self) -> None:
        """Drop the connection whatever its state (the client went away, an error)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._abort(conn)

    # --- the connection feeds these

    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        if self._left is not None and not self.done:
            self._feed_body(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            error = self._callback_error or ProtocolError(f"malformed upstream response: {exc}")
            self._fail(error)

    def _feed_body(self, data: bytes) -> None:
        """A Content-Length body past its head: counted, not parsed (saves httptools a copy)."""
        left = self._left
        assert left is not None
        extra = len(data) > left
        if extra:
            data = data[:left]
        if data:
            self.on_body(data)
        if self._left == 0:
            self.keep_alive = self._keep_alive and not extra
            self._finish()

    def lost(self, exc: BaseException | None) -> None:
        """The connection is gone: the end of a read-until-close body when it closed cleanly;
        an error otherwise (a reset is never the end of a body: the client would get a
        shorter one that looks complete)."""
        if self.done:
            return
        if self._head_done and self._until_close and not self._interim and exc is None:
            self._finish()
            return
        where = "mid-body" if self._head_done else "before answering"
        error = ConnectionLost(f"upstream closed the connection {where}")
        error.__cause__ = exc
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.done:
            self._error = error
            self._wake()
        if self._conn is not None:
            self._conn.shut()

    def sender_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.sent = True
            self._wake()  # the wait for the head is timed from now on
            return
        if isinstance(exc, TimeoutError):
            self._fail(TimeoutError("upstream stopped reading the request body"))
            return
        if isinstance(exc, TransportError):
            self._fail(exc)
            return
        error = BodyFailed("the request body could not be read")
        error.__cause__ = exc
        self._fail(error)

    async def wait_head(self) -> None:
        """The head, timed only once the body is out: until then an upstream that says
        nothing is still reading, and a stalled client is the body reader's to time out."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait(timed=self.sent)

    # --- httptools callbacks

    def on_message_begin(self) -> None:
        if self._head_done:  # bytes after the response: the framing cannot be trusted
            self._callback_error = ProtocolError("upstream sent data after its response")
            raise self._callback_error
        self._raw = CIMultiDict()
        self._status_text = b""
        self._head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._status_text += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # trailers: not passed on
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD or len(self._raw) >= MAX_HEADERS:
            self._callback_error = ProtocolError("upstream response head too large")
            raise self._callback_error
        try:  # bytes that are not UTF-8 could not go out as received on aiohttp's server
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            self._callback_error = ProtocolError("upstream header holds bytes that are not UTF-8")
            raise self._callback_error from None
        self._raw.add(name.decode("ascii", "surrogateescape"), text)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        try:
            check_status(status)
        except ProtocolError as exc:
            self._callback_error = exc
            raise
        if status == 101:  # never asked for: WebSockets go through aiohttp
            self._callback_error = ProtocolError("upstream switched protocols unasked")
            raise self._callback_error
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: wait for the real answer
            return
        self._interim = False
        self.status = status
        # kept as sent; one that is not UTF-8 gets the standard phrase (sendable_reason)
        self.reason = self._status_text.decode("utf-8", "surrogateescape")
        self.headers = CIMultiDictProxy(self._raw)
        self.content_length = self._framing(not self._head_only and status not in (204, 304))
        self._keep_alive = self._parser.should_keep_alive()
        if self.content_length is not None and not self._head_only and status not in (204, 304):
            self._left = self.content_length
        self._head_done = True
        self._wake()
        if self._head_only or status in (204, 304):
            self.keep_alive = self._parser.should_keep_alive()
            self._finish()

    def _framing(self, body: bool) -> int | None:
        """The Content-Length, None when chunked or until close; judged before the head is
        handed over, so an unrelayable framing is a 502 and not a cut after a 200."""
        raw = self._raw
        lengths = raw.getall("Content-Length", ())
        te = raw.get("Transfer-Encoding")
        if len(lengths) > 1 or (lengths and te is not None):
            self._callback_error = ProtocolError("upstream response framed two ways")
            raise self._callback_error
        if body and te is not None:
            try:
                check_transfer_encoding(raw.getall("Transfer-Encoding", ()))
            except ProtocolError as exc:
                self._callback_error = exc
                raise
        length = int(lengths[0]) if lengths and lengths[0].strip().isdigit() else None
        self._until_close = length is None and te is None
        return length

    def on_body(self, body: bytes) -> None:
        if self.done:  # a body after HEAD, 204 or 304: the connection cannot be reused
            self._fail(ProtocolError("upstream sent a body where none belongs"))
            return
        if self._sink is not None:
            self._to_sink(body)
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._left is not None:
            self._left -= len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._head_done = False
            return
        if not self.done:
            self.keep_alive = self._parser.should_keep_alive()
            self._finish()

    # --- internals

    def _finish(self) -> None:
        self.done = True
        self._until_close = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, idle: bool = False, timed: bool = True) -> None:
        """Wait for the next event; ``idle``: only a stall of the spliced body times out."""
        waiter = self._waiter = self._loop.create_future()
        if self._read_timeout is not None and timed:
            check = self._idle_check if idle else self._timed_out
            self._idle_timer = self._loop.call_at(self._loop.time() + self._read_timeout, check)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

    def _timed_out(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._fail(TimeoutError("upstream sent nothing within the read timeout"))

    def _to_sink(self, body: bytes) -> None:
        if self._left is not None:
            self._left -= len(body)
        self._sink_last = self._loop.time()
        try:
            assert self._sink is not None
            self._sink(body)
        except Exception as exc:  # the client side failed: stop reading, tell splice()
            self._sink_error = exc
            self._sink = None
            self._fail(SinkFailed("the sink failed"))

    def _idle_check(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self._read_timeout is None:
            return
        if self._sink_paused:  # the client is slow, not the upstream: wait on
            self._sink_last = self._loop.time()
        due = self._sink_last + self._read_timeout
        if self._loop.time() >= due:
            self._fail(TimeoutError("upstream sent nothing within the read timeout"))
            return
        self._idle_timer = self._loop.call_at(due, self._idle_check)

    def _resume(self) -> None:
        self._paused = False
        if self._conn is not None:
            self._conn.resume_reading()

    def _abort(self, conn: _Connection) -> None:
        if self.sender is not None and not self.sender.done():
            self.sender.cancel()
        conn.shut()


class _Connection(asyncio.Protocol):
    """One upstream socket; feeds the current response, sits in its pool between requests."""

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # nothing was asked: a pooled connection must stay silent
            self.shut()
            return
        resp.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.response is not None:
            self.response.lost(exc)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionLost("upstream closed while the request was sent"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def write(self, data: bytes | list[bytes]) -> None:
        if self.transport is None or self.closed:
            raise ConnectionLost("upstream closed while the request was sent")
        if isinstance(data, list):
            self.transport.writelines(data)
        else:
            self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionLost("upstream closed while the request was sent")
        if self._write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    def park(self) -> None:
        self.response = None
        self.reused = True
        self.pool.put(self)

    def shut(self) -> None:
        """Close now; pending request bytes are dropped (nothing may follow them)."""
        self.response = None
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()


class _Pool:
    """Idle keep-alive connections to one origin with one set of TLS settings."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        sni: str | None,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.host = host
        self.keepalive = keepalive
        self.port = port
        self.ssl = ssl_context
        self.sni = sni
        default = port == (443 if ssl_context is not None else 80)
        hostport = f"[{host}]" if ":" in host else host
        self.host_line = f"Host: {hostport if default else f'{hostport}:{port}'}\r\n"
        self._idle: list[_Connection] = []
        self._swept = 0.0

    def take(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            conn.shut()
        return None

    def put(self, conn: _Connection) -> None:
        now = conn.loop.time()
        conn.idle_since = now
        self._idle.append(conn)
        if now - self._swept > self.keepalive / 4:
            self._swept = now
            self.sweep(now)

    def sweep(self, now: float) -> None:
        keep = []
        for conn in self._idle:
            if not conn.closed and now - conn.idle_since < self.keepalive:
                keep.append(conn)
            else:
                conn.shut()
        self._idle = keep

    def close(self) -> None:
        for conn in self._idle:
            conn.shut()
        self._idle = []


_PoolKey = tuple[str, str, int, ssl.SSLContext | bool, str | None]


class Client:
    """Sends requests over pooled connections; one per process, closed at shutdown."""

    def __init__(self, *, keepalive: float = KEEPALIVE) -> None:
        self._pools: dict[_PoolKey, _Pool] = {}
        self._resolver = _Resolver()
        self._keepalive = keepalive
        self._default_ssl: ssl.SSLContext | None = None
        self._insecure_ssl: ssl.SSLContext | None = None

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: Body = None,
        *,
        ssl: ssl.SSLContext | bool = True,
        server_hostname: str | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Response:
        """Send one request; returns once the response head is in (body still to read).

        ``body`` is bytes, an async iterable of bytes (sent with the caller's
        Content-Length, chunked without one) or None. The path and query go out exactly
        as ``url.raw_path_qs``.
        """
        pool = self._pool(url, ssl, server_hostname)
        framing, length = _framing(method, headers, body)
        head = _head(method, url, headers, framing, pool.host_line)
        send = _Send(head, body, length, repeatable(method, headers), read_timeout=read_timeout)
        conn = pool.take(asyncio.get_running_loop().time())
        if conn is not None:
            try:
                return await self._exchange(conn, method, send, read_timeout)
            except _Stale:
                pass  # safe to repeat and nothing of it was consumed: once more, fresh
        conn = await self._connect(pool, connect_timeout)
        return await self._exchange(conn, method, send, read_timeout)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, url: URL, verify: ssl.SSLContext | bool, sni: str | None) -> _Pool:
        scheme = url.scheme
        host = url.raw_host or ""
        port = url.port or _DEFAULT_PORTS.get(scheme, 80)
        key: _PoolKey = (scheme, host, port, verify, sni)
        pool = self._pools.get(key)
        if pool is None:
            context = self._context(verify) if scheme == "https" else None
            pool = self._pools[key] = _Pool(host, port, context, sni, self._keepalive)
        return pool

    def _context(self, verify: ssl.SSLContext | bool) -> ssl.SSLContext:
        if isinstance(verify, ssl.SSLContext):
            return verify
        if verify:
            if self._default_ssl is None:
                self._default_ssl = ssl.create_default_context()
            return self._default_ssl
        if self._insecure_ssl is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._insecure_ssl = ctx
        return self._insecure_ssl

    async def _connect(self, pool: _Pool, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            addrs = await self._resolver.resolve(pool.host, pool.port)
            failure: OSError | None = None
            for family, addr, port in addrs:
                try:
                    transport, conn = await loop.create_connection(
                        lambda: _Connection(pool, loop),
                        addr,
                        port,
                        family=family,
                        ssl=pool.ssl,
                        server_hostname=(pool.sni or pool.host) if pool.ssl else None,
                    )
                except ssl.SSLError:
                    raise
                except OSError as exc:
                    failure = exc
                    continue
                conn.transport = transport  # uvloop may call connection_made later
                return conn
        reason = failure.strerror if failure is not None and failure.strerror else "no address"
        raise ConnectFailed(f"cannot connect to {pool.host}:{pool.port}: {reason}") from failure

    async def _exchange(
        self, conn: _Connection, method: str, send: _Send, read_timeout: float | None
    ) -> Response:
        resp = Response(conn, method, read_timeout)
        conn.response = resp
        body = send.body
        try:
            if body is None or isinstance(body, bytes):
                conn.write(send.head + body if body else send.head)
                resp.sent = True
            else:
                conn.write(send.head)
                resp.sender = asyncio.create_task(send.stream(conn, body))
                resp.sender.add_done_callback(resp.sender_done)
            await resp.wait_head()
        except BaseException as exc:
            resp.close()
            if not (isinstance(exc, ConnectionLost) and conn.reused and not resp.got_bytes):
                raise
            # the keep-alive race: the upstream may have closed before reading the request,
            # or after acting on it; only a request that is safe twice is sent again
            if not send.repeatable:
                raise NotRepeated(str(exc)) from exc
            if not send.pulled:
                raise _Stale(str(exc)) from exc
            raise
        return resp


def _framing(method: str, headers: CIMultiDict[str], body: Body) -> tuple[str, int | None]:
    """The framing header line and the body length it announces (None: chunked)."""
    if isinstance(body, bytes):
        return f"Content-Length: {len(body)}\r\n", len(body)
    if body is not None:
        given = headers.get("Content-Length")
        if given is not None and given.isdigit():
            return f"Content-Length: {given}\r\n", int(given)
        return "Transfer-Encoding: chunked\r\n", None
    if method in _NO_LENGTH_METHODS:
        return "", 0
    return "Content-Length: 0\r\n", 0


def _head(method: str, url: URL, headers: CIMultiDict[str], framing: str, host_line: str) -> bytes:
    """The request head as one buffer; the framing headers are the transport's own."""
    items: collections.abc.Iterable[tuple[str, str]] = headers.items()
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        items = [(k, v) for k, v in items if k.lower() not in _FRAMING_NAMES]
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\n"]
    if "Host" not in headers:
        lines.append(host_line)
    lines.extend(f"{k}: {v}\r\n" for k, v in items)
    if framing:
        lines.append(framing)
    lines.append("\r\n")
    return encode_head(lines)


@dataclass(slots=True)
class _Send:
    """One request as it goes out, possibly twice: ``pulled`` once the body was touched."""

    head: bytes
    body: Body
    length: int | None
    repeatable: bool  # safe to send again when a reused connection closed before answering
    pulled: bool = False
    read_timeout: float | None = None  # how long the upstream may leave the body unread

    async def stream(self, conn: _Connection, body: AsyncIterable[bytes]) -> None:
        """Send the body after the head; a body not matching its Content-Length fails."""
        iterator = aiter(body)
        try:
            sent = await self._pump(conn, iterator)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:  # a generator stopped early runs its cleanup now
                await aclose()
        if self.length is None:
            conn.write(b"0\r\n\r\n")
        elif sent != self.length:
            raise BodyFailed("request body shorter than its Content-Length")

    async def _pump(self, conn: _Connection, iterator: AsyncIterator[bytes]) -> int:
        chunked = self.length is None
        sent = 0
        while True:
            if conn.closed:
                raise ConnectionLost("upstream closed while the request was sent")
            self.pulled = True  # from here on a cancelled pull may have consumed data
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return sent
            if not chunk:
                continue
            sent += len(chunk)
            if self.length is not None and sent > self.length:
                raise BodyFailed("request body longer than its Content-Length")
            conn.write([b"%x\r\n" % len(chunk), chunk, b"\r\n"] if chunked else chunk)
            if conn.write_paused:  # an upstream that stops reading is as stalled as a silent one
                async with asyncio.timeout(self.read_timeout):
                    await conn.drain()
