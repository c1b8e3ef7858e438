"""Connection-level limits aiohttp lacks: a deadline for request heads, a connection cap.

slowhttptest showed that a client sending its head one byte at a time keeps a
connection (and a slot) forever: aiohttp's keep-alive timer stops at the first
byte. Here every request head must be complete within ``header_timeout`` of its
first byte (or of the connection opening), and connections past
``max_connections`` are closed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.config import Limits
from proxy.server import Dispatch, FastProtocol


class GuardedHandler(RequestHandler):
    """aiohttp's request handler with a head deadline and a connection cap."""

    def __init__(
        self, manager: Any, *, header_timeout: float, max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._max_connections:
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_parsed():
            self._disarm()
        elif self._head_timer is None:
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are ``GuardedHandler``s."""

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
    ) -> None:
        super().__init__(runner, host, port, backlog=backlog, reuse_port=reuse_port)
        self._handler_kwargs = handler_kwargs
        self._limits = limits
        self._dispatch = dispatch

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
        )
