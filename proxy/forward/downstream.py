"""The client side of one proxied exchange, as the forwarder sees it.

Two servers feed the forwarder: the lean protocol in ``proxy.server`` (the hot path) and
aiohttp's, which takes every connection the lean one hands over. The forwarder reads the
request and writes the response through this one small interface, so the replay and
streaming logic exists once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
"""The interim answer to ``Expect: 100-continue``: both servers send it only once the
forwarder wants the body, so a request refused first never has its body invited."""


class Inbound(Protocol):
    """What rewriting a request needs to know about it."""

    @property
    def method(self) -> str: ...

    @property
    def scheme(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...


class Sink(Protocol):
    """A client connection a streamed body can be written to from a callback."""

    def write_now(self, chunk: bytes) -> None:
        """Queue ``chunk`` for the client; raises ConnectionError once it is gone."""
        ...

    def on_flow(self, pause: Callable[[], None] | None, resume: Callable[[], None] | None) -> None:
        """Call ``pause`` when the client falls behind and ``resume`` when it caught up."""
        ...


class Downstream(Inbound, Protocol):
    """One request's body in, its response out."""

    @property
    def sink(self) -> Sink | None:
        """Where a streamed body can go without a task switch per chunk (None: use write)."""
        ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body_exists(self) -> bool: ...

    async def read_exactly(self, n: int) -> bytes:
        """The whole body of announced length ``n``."""
        ...

    async def read_any(self) -> bytes:
        """The next body chunk; ``b""`` at its end."""
        ...

    def read_nowait(self) -> bytes:
        """Body bytes that already arrived; ``b""`` when none (or at the end)."""
        ...

    async def respond(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        body: bytes,
        length: int | None,
    ) -> None:
        """The whole response at once; ``length`` is the Content-Length to announce
        (a HEAD answer announces one without a body; None: no body, or ``len(body)``)."""
        ...

    async def start(
        self, status: int, reason: str | None, headers: CIMultiDict[str], length: int | None
    ) -> None:
        """Send the head of a streamed response (``length`` None: framed by the server)."""
        ...

    async def write(self, chunk: bytes) -> None:
        """One body chunk, waiting while the client is slower than the upstream."""
        ...

    async def finish(self) -> None:
        """The streamed body is complete."""
        ...


class _Relayed(web.StreamResponse):
    """An upstream's response, which goes out with the upstream's headers as the lean server
    sends them: ``prepare`` adds ``Content-Type: application/octet-stream`` to a response
    with a body and none (RFC 9110 §8.3 lets a recipient guess; a proxy should not), and
    ``relayed_headers`` takes it out again."""

    def __init__(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self.typed = "Content-Type" in headers


class _Coalesced(_Relayed):
    """Holds its head until the body (or the end) is written: one write, not two."""

    _send_headers_immediately = False


async def relayed_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` signal (run after aiohttp set its defaults, before the head
    is written): a relayed response keeps no Content-Type the upstream did not send. Date,
    Server and the framing headers are added as the lean server adds them."""
    if isinstance(response, _Relayed) and not response.typed:
        response.headers.popall("Content-Type", None)


class AiohttpDownstream:
    """An aiohttp request and the response the forwarder builds for it."""

    sink = None

    def __init__(self, request: web.Request, *, invite: bool = False) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self._invite = invite  # 100 Continue is owed before the first body read

    async def _continue(self) -> None:
        self._invite = False
        writer = self.request.writer
        await writer.write(CONTINUE)
        writer.output_size = 0  # the interim response is not part of the body count

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def scheme(self) -> str:
        return self.request.scheme

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.request.headers

    @property
    def content_length(self) -> int | None:
        return self.request.content_length

    @property
    def body_exists(self) -> bool:
        return self.request.body_exists

    async def read_exactly(self, n: int) -> bytes:
        if self._invite:
            await self._continue()
        return await self.request.content.readexactly(n)

    async def read_any(self) -> bytes:
        if self._invite:
            await self._continue()
        return await self.request.content.readany()

    def read_nowait(self) -> bytes:
        return self.request.content.read_nowait()

    async def respond(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        body: bytes,
        length: int | None,
    ) -> None:
        out = self.response = _Coalesced(status, reason, headers)
        if length is not None:
            out.content_length = length
        await out.prepare(self.request)
        await out.write_eof(body)  # the head is still held: one write for both

    async def start(
        self, status: int, reason: str | None, headers: CIMultiDict[str], length: int | None
    ) -> None:
        out = self.response = _Relayed(status, reason, headers)
        if length is not None:
            out.content_length = length
        await out.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()
