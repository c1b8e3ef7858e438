"""Connection-level limits aiohttp lacks: a deadline for request heads, a connection cap.

slowhttptest showed that a client sending its head one byte at a time keeps a
connection (and a slot) forever: aiohttp's keep-alive timer stops at the first
byte. Here every request head must be complete within ``header_timeout`` of its
first byte (or of the connection opening), and connections past
``max_connections`` are closed at once.

Requests aiohttp's parser refuses (over-long lines, too many headers, bad bytes, bad
framing) are answered here as the proxy answers every other error: problem+json with a
request id, one access line, and nothing of the offending bytes echoed back (they may hold
an Authorization header). The connection is closed after, as aiohttp does.
"""

from __future__ import annotations

import asyncio
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

import httptools
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from proxy.config import Limits
from proxy.forward.exchange import Exchange
from proxy.forward.framing import FramingError
from proxy.listener_tls import ServerTLS
from proxy.observability import Observer, request_id_from
from proxy.problems import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    RequestLineTooLong,
    problem_response,
)
from proxy.server import Dispatch, FastProtocol


class GuardedHandler(RequestHandler):
    """aiohttp's request handler with a head deadline and a connection cap."""

    def __init__(
        self,
        manager: Any,
        *,
        header_timeout: float,
        max_connections: int,
        observer: Observer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._observer = observer
        self._head_timer: asyncio.TimerHandle | None = None
        self._mirror: _UpgradeMirror | None = _UpgradeMirror()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._max_connections:
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        mirror = self._mirror
        while mirror is not None and data:
            end = mirror.feed(data)
            if mirror.done:
                self._mirror = mirror = None
            if end is None:
                break
            self._received(data[:end])  # ends at the upgrade request's end: nothing lost
            data = data[end:]
        if data:
            self._received(data)

    def _received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_parsed():
            self._disarm()
        elif self._head_timer is None:
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Parser refusals and handler failures as problems; aiohttp still raises when a
        response is already out (the connection is cut) and logs the handler's failures."""
        if isinstance(exc, HttpProcessingError) and status < 500:  # the parser refused it
            return self._refuse(request, refusal(exc))
        resp = super().handle_error(request, status, exc, message)  # logs; raises if too late
        if status != 500:
            return resp
        rid = request_id_from(request.headers.get("X-Request-Id"))
        return _closing(problem_response(ProxyError("the proxy failed on this request"), rid))

    def _refuse(self, request: web.BaseRequest, err: ProxyError) -> web.StreamResponse:
        """No header of it can be trusted, a client's X-Request-Id included: a fresh id."""
        rid = request_id_from(None)
        if self._observer is not None:
            ex = Exchange(rid, "", "", request.remote or "", time.perf_counter())
            ex.status, ex.error = err.status, err.slug
            self._observer.request_done(ex)
        return _closing(problem_response(err, rid))

    def _head_parsed(self) -> bool:
        return bool(self._messages) or self._request_in_progress

    def _arm(self) -> None:
        self._head_timer = self._loop.call_later(self._header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if not self._head_parsed() and self.transport is not None:
            self.transport.close()


class _UpgradeMirror:
    """Finds where a request asking for a protocol switch aiohttp does not make (``Upgrade:
    h2c``) ends. aiohttp's compiled parser stops there and drops the rest of what it was
    given, so a request pipelined behind would never be answered; fed in two parts, nothing
    is lost, and the request is served as HTTP/1.1 (``Upgrade`` is hop-by-hop: never
    forwarded). A second llhttp over the same bytes, on the aiohttp path only; it stops at
    the first switch aiohttp does make (WebSocket, CONNECT) or head it refuses."""

    __slots__ = ("_done", "_parser", "_upgrade")

    on_url = on_body = on_message_complete = on_headers_complete = None
    on_chunk_header = on_chunk_complete = None

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._upgrade = b""
        self._done = False

    def on_message_begin(self) -> None:
        self._upgrade = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._upgrade and name.lower() == b"upgrade":  # the first, as aiohttp reads it
            self._upgrade = value.strip().lower() or b" "

    def feed(self, data: bytes) -> int | None:
        """Where in ``data`` a non-tunnelled upgrade request ends; None: nowhere. Stops the
        mirror (``done``) at a switch aiohttp makes or an error (aiohttp's to answer)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade == b"websocket" or self._parser.get_method() == b"CONNECT":
                self._done = True
                return None
            return int(exc.args[0])
        except httptools.HttpParserError:
            self._done = True
        return None

    @property
    def done(self) -> bool:
        return self._done


def _closing(resp: web.Response) -> web.Response:
    """Said in the head too: an HTTP/1.0 answer (all refusals are) has no implicit close."""
    resp.force_close()
    resp.headers["Connection"] = "close"
    return resp


def refusal(exc: HttpProcessingError) -> ProxyError:
    """The problem for a request aiohttp's parser refused; its message is never copied
    as is, since it quotes the refused bytes."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        longer = f" longer than {limit} bytes" if limit is not None else " too long"
        if _in_request_line(exc):
            return RequestLineTooLong(f"the request line is{longer}")
        return HeadersTooLarge(f"a header field is{longer}")
    reason = _reason(exc)
    if reason.startswith("Too many headers"):
        return HeadersTooLarge("too many header fields")
    if isinstance(exc, TransferEncodingError | ContentLengthError) or _FRAMING.search(reason):
        return FramingError(f"malformed request: {reason}")
    return BadRequest(f"malformed request: {reason}")


_HEADER_CALLBACKS = frozenset({"cb_on_header_field", "cb_on_header_value"})
_LINE_CALLBACKS = frozenset({"cb_on_url", "cb_on_status", "cb_on_method", "cb_on_version"})


def _in_request_line(exc: LineTooLong) -> bool:
    """aiohttp raises the same LineTooLong for the request line and a header field. Its
    compiled parser names the callback that raised in the traceback; the pure-Python one
    gives the line's first 100 bytes: a request line has a space there (after the method),
    a header field a colon before any space, or (an over-long name) neither."""
    names = {f.f_code.co_name.rpartition(".")[2] for f, _ in traceback.walk_tb(exc.__traceback__)}
    if names & _HEADER_CALLBACKS:
        return False
    if names & _LINE_CALLBACKS:
        return True
    line = exc.args[0] if exc.args else b""
    if not isinstance(line, bytes):
        return False
    word, space, _ = line.partition(b" ")
    return bool(space) and b":" not in word


_FRAMING = re.compile(r"content-length|transfer-encoding|chunk", re.IGNORECASE)
_SAFE_REASON = re.compile(r"[A-Za-z0-9 ,./'()-]{1,100}")
_FIXED_MESSAGES = re.compile(
    r"Too many (headers|trailers) received|Missing 'Host' header in request\."
    r"|Duplicate '[A-Za-z0-9-]+' header found\.|Received HTTPS traffic on an HTTP port"
    r"|Transfer-Encoding can't be present with Content-Length|Bad line ending, expected CRLF"
)
_BY_TYPE: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "invalid method"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (InvalidHeader, "invalid header field"),
    (TransferEncodingError, "invalid chunked body"),
    (ContentLengthError, "body shorter than its Content-Length"),
)


def _reason(exc: HttpProcessingError) -> str:
    """llhttp's own reason (a fixed text, before the quoted bytes), one of aiohttp's fixed
    messages, or a phrase for the exception's type."""
    message = exc.message
    if ":\n\n" in message:  # llhttp: "reason:\n\n  b'<bytes>'\n  ^" (after "Bad status line:")
        reason = message.split(":\n\n", 1)[0].rsplit("\n", 1)[-1].strip()
        if _SAFE_REASON.fullmatch(reason):
            return reason
    elif _FIXED_MESSAGES.fullmatch(message):
        return message
    return next((text for kind, text in _BY_TYPE if isinstance(exc, kind)), "unparsable head")


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are ``GuardedHandler``s (or lean ones handing over to
    them). With ``tls``, asyncio's SSL transport wraps either protocol; a handshake must end
    within the head deadline, and plain HTTP fails the handshake and is closed at once."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        handler_kwargs: dict[str, Any],
        limits: Limits,
        reuse_port: bool = False,
        backlog: int = 1024,
        dispatch: Dispatch | None = None,
        observer: Observer | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        ctx = None if tls is None else tls.context
        super().__init__(
            runner, host, port, backlog=backlog, reuse_port=reuse_port, ssl_context=ctx
        )
        self.tls = tls
        self._handler_kwargs = handler_kwargs
        self._limits = limits
        self._dispatch = dispatch
        self._observer = observer

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def factory() -> GuardedHandler:
            return GuardedHandler(
                server,
                loop=loop,
                header_timeout=self._limits.header_timeout,
                max_connections=self._limits.max_connections,
                observer=self._observer,
                **self._handler_kwargs,
            )

        dispatch, limits = self._dispatch, self._limits
        protocol: Callable[[], asyncio.Protocol] = factory
        if dispatch is not None:

            def protocol() -> asyncio.Protocol:
                return FastProtocol(server, dispatch, factory, limits, loop)

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._limits.header_timeout if self._ssl_context else None,
        )
        if self.tls is not None:
            self.tls.start()

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.stop()
        await super().stop()
