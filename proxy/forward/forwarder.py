"""rewrite → transport → replay → stream, with one place that translates failures.

The forwarder knows routes and token sources, never vendors. A request is sent
once; when the upstream answers 401 to a token, the token is invalidated and the
same bytes are sent once more with a fresh one. A 401 whose body (or a request whose
body) is too large to hold for that is passed on as the vendor sent it, unreplayed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Limits, Route
from proxy.forward.downstream import Downstream, Inbound, Sink
from proxy.forward.exchange import Exchange
from proxy.forward.headers import (
    AUTHORIZATION,
    Network,
    is_trusted,
    request_headers,
    response_headers,
    sendable_reason,
)
from proxy.forward.redirects import rewrite_locations
from proxy.forward.routing import upstream_url
from proxy.forward.spool import Budget, Spool
from proxy.forward.transport import Client, Response
from proxy.forward.upstream_rules import (
    ConnectFailed,
    ErrorKind,
    NotRepeated,
    ProtocolError,
    SinkFailed,
    TransportError,
)
from proxy.forward.via_proxy import NoRetry, ViaProxy, via_proxy
from proxy.problems import ClientTimeout, PayloadTooLarge, ProxyError, UpstreamError
from proxy.tokens.source import Token, TokenSource

READ_CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024  # read whole, send in one write: cheaper and trivially replayable
MAX_401_BODY = 64 * 1024  # a 401 body larger than this is passed on as sent, not replayed
NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class RouteRuntime:
    """A route as the hot path needs it: everything computed once at load."""

    config: Route
    prefix: str
    origin: URL
    base_path: str
    source: TokenSource | None
    provider: str
    waits_for: tuple[str, ...]
    timeout: aiohttp.ClientTimeout
    ssl: ssl.SSLContext | bool
    server_hostname: str | None
    drop_headers: frozenset[str]  # names in any case: matched lowercased
    max_body: int | None = None  # the route's or the global limit, resolved at load
    proxy: tuple[URL, aiohttp.BasicAuth | None] | None = None
    trusted: tuple[Network, ...] = ()  # peers whose X-Forwarded-* are appended to

    @property
    def replay(self) -> bool:
        return self.source is not None and self.config.replay.enabled


def rewrite(
    request: Inbound, route: RouteRuntime, remainder: str, query: str | None, ex: Exchange
) -> tuple[URL, CIMultiDict[str]]:
    """The upstream URL and headers for a request, before the token is set (Go's Rewrite)."""
    url = upstream_url(route.origin, route.base_path, remainder, query)
    headers = request_headers(
        request.headers,
        peer=ex.client,
        scheme=request.scheme,
        trusted_hop=is_trusted(ex.client, route.trusted),
        drop=route.drop_headers,
    )
    headers["X-Request-Id"] = ex.request_id
    return url, headers


async def _read_client(read: Awaitable[bytes], timeout: float) -> bytes:
    """A read of the client's body that a stalled client cannot hold open forever."""
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        raise ClientTimeout("client stopped sending its request body") from None


class UpstreamFailed(Exception):
    """The upstream failed after the response head went out: the client connection is cut."""


class BodyReader:
    """Reads the client's body exactly once, teeing it into a spool for a replay."""

    def __init__(
        self,
        down: Downstream,
        ex: Exchange,
        spool: Spool | None,
        limit: int | None,
        idle_timeout: float,
    ) -> None:
        self._down = down
        self._ex = ex
        self.spool = spool
        self._limit = limit
        self._idle = idle_timeout
        self._lock = asyncio.Lock()
        self.complete = False
        self.error: ProxyError | None = None

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._next()
            if not chunk:
                return
            yield chunk

    async def _next(self) -> bytes:
        async with self._lock:
            if self.complete:
                return b""
            try:  # what already arrived needs no timer; only a wait does
                chunk = self._down.read_nowait() or await _read_client(
                    self._down.read_any(), self._idle
                )
            except ClientTimeout as err:
                self.error = err
                raise
            if not chunk:
                self.complete = True
                return b""
            self._ex.bytes_in += len(chunk)
            if self._limit is not None and self._ex.bytes_in > self._limit:
                self.error = PayloadTooLarge(f"request body exceeds {self._limit} bytes")
                raise self.error
            if self.spool is not None:
                self.spool.write(chunk)
            return chunk

    async def finish(self) -> None:
        """Read what the upstream did not, so a replay can send all of it."""
        while await self._next():
            if self.spool is not None and not self.spool.replayable:
                return


class Forwarder:
    """Requests go out on the lean ``client``; routes behind an env proxy use ``session``.

    ``memory`` and ``disk`` are the process's replay budgets (``limits.replay_memory`` and
    ``limits.replay_disk``), shared by every route: small bodies read whole and spools draw
    on them, and a body they cannot hold streams without the replay option."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        spool_dir: Path,
        client: Client | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._session = session
        self._client = client or Client()
        self._spool_dir = spool_dir
        self.memory = Budget(0)
        self.disk = Budget(0)
        self.apply(limits or Limits())

    def apply(self, limits: Limits) -> None:
        """The budgets' sizes, at start and on reload; what is held stays held, and a lowered
        budget refuses new bodies until enough of it is given back."""
        self.memory.limit = int(limits.replay_memory)
        self.disk.limit = int(limits.replay_disk)

    async def aclose(self) -> None:
        """Close the pooled upstream connections (the session is the caller's)."""
        await self._client.close()

    async def forward(
        self,
        request: Downstream,
        route: RouteRuntime,
        remainder: str,
        query: str | None,
        ex: Exchange,
    ) -> None:
        url, headers = rewrite(request, route, remainder, query, ex)
        limit = route.max_body
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds {limit} bytes")
        if not request.body_exists:
            return await self._exchange(request, route, url, headers, ex, None, None)
        if length is not None and length <= SMALL_BODY and self.memory.reserve(length):
            try:  # else streamed below, as a larger body: its spool may still find disk
                body = await _read_client(request.read_exactly(length), route.config.timeout.read)
                ex.bytes_in = length
                return await self._exchange(request, route, url, headers, ex, body, None)
            finally:
                self.memory.release(length)
        spool = self._spool_for(route, length)
        try:
            reader = BodyReader(request, ex, spool, limit, route.config.timeout.read)
            try:
                return await self._exchange(request, route, url, headers, ex, None, reader)
            except UpstreamError:
                if reader.error is not None:
                    raise reader.error from None
                raise
        finally:
            if spool is not None:
                spool.close()

    def _spool_for(self, route: RouteRuntime, length: int | None) -> Spool | None:
        if not route.replay:
            return None
        cfg = route.config.replay
        if length is not None and length > cfg.max_body:
            return None
        return Spool(
            int(cfg.memory),
            int(cfg.max_body),
            self._spool_dir,
            memory=self.memory,
            disk=self.disk,
            length=length,
        )

    async def _exchange(
        self,
        request: Downstream,
        route: RouteRuntime,
        url: URL,
        headers: CIMultiDict[str],
        ex: Exchange,
        body: bytes | None,
        reader: BodyReader | None,
    ) -> None:
        token = await route.source.token() if route.source is not None else None
        data = body if reader is None else reader.stream()
        first = await self._send(request.method, url, headers, route, token, data, ex)
        if first.status != 401 or token is None or route.source is None:
            if reader is not None and reader.spool is not None:
                reader.spool.close()  # no replay now: the budget is free while the answer streams
            return await self._relay(request, first, ex, route)
        final = await self._maybe_replay(
            request, route, url, headers, ex, token, first, body, reader
        )
        return await self._relay(request, final, ex, route)

    async def _maybe_replay(
        self,
        request: Downstream,
        route: RouteRuntime,
        url: URL,
        headers: CIMultiDict[str],
        ex: Exchange,
        token: Token,
        first: Upstream,
        body: bytes | None,
        reader: BodyReader | None,
    ) -> Upstream | _Buffered | _Prefixed:
        assert route.source is not None
        route.source.invalidate(token)
        if not route.replay:
            return first
        if reader is not None and (reader.spool is None or not reader.spool.replayable):
            ex.replay_outcome = _not_kept(reader.spool)
            return first
        held = await _Buffered.hold(first, MAX_401_BODY)
        if not isinstance(held, _Buffered):
            ex.replay_outcome = "response_too_large"  # relayed as sent; the token is renewed
            return held
        if reader is not None:
            await reader.finish()
            assert reader.spool is not None
            if not reader.spool.replayable:
                ex.replay_outcome = _not_kept(reader.spool)
                return held
        fresh = await route.source.token()
        data: bytes | AsyncIterator[bytes] | None = body
        if reader is not None:
            assert reader.spool is not None
            data = reader.spool.chunks(READ_CHUNK)
            if request.content_length is not None:
                headers["Content-Length"] = str(reader.spool.size)
        ex.replayed = True
        second = await self._send(request.method, url, headers, route, fresh, data, ex)
        ex.replay_outcome = "unauthorized_again" if second.status == 401 else "succeeded"
        return second

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        route: RouteRuntime,
        token: Token | None,
        data: bytes | AsyncIterator[bytes] | None,
        ex: Exchange,
    ) -> Upstream:
        if token is not None:
            headers[AUTHORIZATION] = token.authorization
        try:
            if route.proxy is not None:
                resp: Upstream = await via_proxy(self._session, method, url, headers, route, data)
            else:
                resp = await self._client.request(
                    method,
                    url,
                    headers,
                    data,
                    ssl=route.ssl,
                    server_hostname=route.server_hostname,
                    connect_timeout=route.timeout.sock_connect,
                    read_timeout=route.timeout.sock_read,
                )
        except _CLIENT_ERRORS as exc:
            raise _translate(exc) from exc
        ex.upstream_status = resp.status
        if ex.ttfb is None:
            ex.ttfb = time.perf_counter() - ex.started
        return resp

    async def _relay(
        self,
        request: Downstream,
        resp: Upstream | _Buffered | _Prefixed,
        ex: Exchange,
        route: RouteRuntime,
    ) -> None:
        no_body = (
            request.method == "HEAD"
            or resp.status in NO_BODY_STATUSES
            or (100 <= resp.status < 200)
        )
        headers = response_headers(resp.headers)
        rewrite_locations(headers, route.origin, route.base_path, route.prefix)
        headers["X-Request-Id"] = ex.request_id
        ex.status = resp.status
        reason = sendable_reason(resp.reason)
        length = resp.content_length if resp.status not in NO_BODY_STATUSES else None
        complete = False
        try:
            if no_body:
                await request.respond(resp.status, reason, headers, b"", length)
                complete = True
                return
            body = resp.body if isinstance(resp, _Buffered) else await _arrived_body(resp)
            if body is None:
                assert not isinstance(resp, _Buffered)
                await request.start(resp.status, reason, headers, length)
                await self._stream(request, resp, ex)
                complete = True
                await request.finish()
                return
            await request.respond(resp.status, reason, headers, body, length)
            ex.bytes_out += len(body)
            complete = True
        finally:
            # a fully read response gives its keep-alive connection back; anything else
            # (client gone, upstream failed) must not reuse it
            resp.release() if complete else resp.close()

    async def _stream(self, request: Downstream, resp: Streamed, ex: Exchange) -> None:
        sink = request.sink
        if sink is not None and isinstance(resp, Response):
            await _splice(resp, sink, ex)
            return
        read, write = resp.readany, request.write
        while True:
            try:
                chunk = await read()
            except _CLIENT_ERRORS as exc:
                raise _aborted(exc, ex) from exc
            if not chunk:
                return
            await write(chunk)
            ex.bytes_out += len(chunk)


async def _splice(resp: Response, sink: Sink, ex: Exchange) -> None:
    """The body straight from the upstream's callback into the client's transport, the
    client's backpressure pausing the upstream: no task switch per chunk."""

    def deliver(chunk: bytes) -> None:
        sink.write_now(chunk)
        ex.bytes_out += len(chunk)

    sink.on_flow(resp.pause, resp.resume)
    try:
        await resp.splice(deliver)
    except SinkFailed as exc:
        raise ConnectionResetError("the client went away mid-body") from exc
    except _CLIENT_ERRORS as exc:
        raise _aborted(exc, ex) from exc
    finally:
        sink.on_flow(None, None)


def _not_kept(spool: Spool | None) -> str:
    """Why a request body cannot be replayed: over a budget, or over the route's limit."""
    return "budget" if spool is not None and spool.over_budget else "body_too_large"


def _aborted(exc: BaseException, ex: Exchange) -> UpstreamFailed:
    """The upstream failed mid-body: recorded, and the client connection is to be cut."""
    ex.upstream_error = _translate(exc).kind
    ex.error = "upstream_aborted"
    return UpstreamFailed(ex.upstream_error)


async def _arrived_body(resp: Streamed) -> bytes | None:
    """The whole body of a small response that has fully arrived, else None (streamed)."""
    if not isinstance(resp, Response) or not resp.done or resp.buffered > SMALL_BODY:
        return None
    parts = []
    while chunk := await resp.readany():  # all buffered: returns without waiting
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Buffered:
    """A small upstream response already read into memory (the first 401 of a replay)."""

    def __init__(self, resp: Upstream, body: bytes) -> None:
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers
        self.content_length: int | None = len(body)
        self.body = body

    @classmethod
    async def hold(cls, resp: Upstream, cap: int) -> _Buffered | Upstream | _Prefixed:
        """The response drained and released when its body fits in ``cap``. A larger one
        is left open to be relayed as the vendor sent it: as is when its Content-Length
        says so, else the bytes read so far ahead of the rest (memory stays near ``cap``)."""
        if resp.content_length is not None and resp.content_length > cap:
            return resp
        parts: list[bytes] = []
        size = 0
        try:
            while chunk := await resp.readany():
                parts.append(chunk)
                size += len(chunk)
                if size > cap:
                    return _Prefixed(resp, parts)
        except _CLIENT_ERRORS as exc:
            resp.close()
            raise _translate(exc) from exc
        except BaseException:  # cancelled (the client left): the connection is not reusable
            resp.close()
            raise
        resp.release()
        return cls(resp, b"".join(parts))

    def close(self) -> None:
        """Nothing to release: the connection went back when the body was drained."""

    def release(self) -> None:
        """As ``close``."""


Upstream = Response | ViaProxy


class _Prefixed:
    """An upstream response whose first chunks were already read (a 401 too large to hold):
    those chunks first, then the rest as it arrives, so the client gets every byte."""

    __slots__ = ("_parts", "_resp", "content_length", "headers", "reason", "status")

    def __init__(self, resp: Upstream, parts: list[bytes]) -> None:
        self._resp = resp
        self._parts = deque(parts)
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers
        self.content_length = resp.content_length

    async def readany(self) -> bytes:
        if self._parts:
            return self._parts.popleft()
        return await self._resp.readany()

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._parts.clear()
        self._resp.close()


Streamed = Upstream | _Prefixed  # a response whose body is read from the upstream

_CLIENT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError, TransportError)


def _translate(exc: BaseException) -> UpstreamError:
    """Low-level client failures, translated once into the proxy's error tree."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, NoRetry):
        detail = TransportError.detail if exc.repeated else NotRepeated.detail
        return UpstreamError(ErrorKind.RESET, detail)
    if isinstance(exc, TransportError):
        detail = exc.detail
        if exc.kind == ErrorKind.CONNECT and exc.__cause__ is not None:
            detail = f"{detail}: {_reason(exc.__cause__)}"
        return UpstreamError(exc.kind, detail)
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return UpstreamError(ErrorKind.TLS, f"TLS failure talking to the upstream: {_reason(exc)}")
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return UpstreamError(ErrorKind.TIMEOUT, "upstream did not answer in time", status=504)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(ErrorKind.CONNECT, f"{ConnectFailed.detail}: {_reason(exc)}")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return UpstreamError(ErrorKind.PROTOCOL, ProtocolError.detail)
    return UpstreamError(ErrorKind.RESET, TransportError.detail)


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "os_error", None) or getattr(exc, "certificate_error", None) or exc
    return (
        getattr(inner, "strerror", None) or getattr(inner, "reason", None) or type(inner).__name__
    )
