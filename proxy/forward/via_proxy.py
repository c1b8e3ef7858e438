"""Routes behind an env HTTP(S) proxy: aiohttp's client speaks to it (CONNECT tunnels
included), which the lean client does not; given the lean client's rules here."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.forward.upstream_rules import ProtocolError, check_head, repeatable


class ProxiedRoute(Protocol):
    """What a request through an env proxy needs of its route (``RouteRuntime`` is one)."""

    @property
    def proxy(self) -> tuple[URL, aiohttp.BasicAuth | None] | None: ...
    @property
    def timeout(self) -> aiohttp.ClientTimeout: ...
    @property
    def ssl(self) -> ssl.SSLContext | bool: ...
    @property
    def server_hostname(self) -> str | None: ...


async def via_proxy(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    route: ProxiedRoute,
    data: bytes | AsyncIterator[bytes] | None,
) -> ViaProxy:
    """The request through the route's proxy; returns once a head that passes
    ``check_head`` is in (a streamed body is never sent twice)."""
    assert route.proxy is not None
    again = repeatable(method, headers) and not isinstance(data, AsyncIterator)
    resp = await session.request(
        method,
        url,
        headers=headers,
        data=data,
        allow_redirects=False,
        timeout=route.timeout,
        ssl=route.ssl,
        server_hostname=route.server_hostname,
        proxy=route.proxy[0],
        proxy_auth=route.proxy[1],
        middlewares=(_retry_rule(again),),
    )
    try:
        check_head(resp.status, resp.headers, method != "HEAD" and resp.status not in (204, 304))
    except ProtocolError:
        resp.close()
        raise
    return ViaProxy(resp)


class NoRetry(aiohttp.ClientConnectionError):
    """aiohttp's connection failure before an answer, as an error aiohttp does not retry."""

    def __init__(self, message: str, repeated: bool) -> None:
        super().__init__(message)
        self.repeated = repeated


_BEFORE_ANSWER = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)
_NOT_RETRIED = (aiohttp.ClientConnectorError, aiohttp.ClientSSLError)


def _retry_rule(again: bool) -> aiohttp.ClientMiddlewareType:
    """The lean client's retry rule on aiohttp's client (routes behind an env proxy).

    aiohttp sends a request once more when the connection fails before the answer
    (``ClientOSError``, ``ServerDisconnectedError``) if its method is in its own idempotent
    set, which holds PUT and DELETE, and never a POST with an idempotency key. This
    middleware runs inside that loop and turns such a failure into one aiohttp does not
    retry; a ``repeatable`` request with its body in memory (``again``) is sent once more
    here instead. aiohttp does not say whether the connection was a reused one, so this
    retry also covers a fresh connection that failed before answering.
    """

    async def rule(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        for attempt in (1, 2):
            try:
                return await handler(req)
            except _NOT_RETRIED:
                raise
            except _BEFORE_ANSWER as exc:
                if not again or attempt == 2:
                    raise NoRetry(str(exc), repeated=attempt == 2) from exc
        raise AssertionError("unreachable")

    return rule


class ViaProxy:
    """An aiohttp response (a route behind an env proxy) as the forwarder reads responses."""

    __slots__ = ("_resp", "content_length", "headers", "reason", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers
        self.content_length = resp.content_length

    async def readany(self) -> bytes:
        return await self._resp.content.readany()

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()
