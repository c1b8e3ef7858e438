"""WebSocket upgrades: the upstream handshake carries the token, frames are pumped both ways.

The handshake is sent once: an upstream's redirect is the client's answer (its Location
mapped into the route's prefix, as for HTTP), never followed with the token. Messages are
capped both ways at the route's ``websocket.max_message``; the side that sends a larger one
is closed with 1009, the other side with a normal close.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.forward.exchange import Exchange
from proxy.forward.forwarder import RouteRuntime, _translate, rewrite
from proxy.forward.headers import AUTHORIZATION, connection_named, response_headers
from proxy.forward.redirects import rewrite_locations

REDIRECTS = frozenset({301, 302, 303, 307, 308})  # the statuses aiohttp's client follows

_WS_OWN = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


def is_websocket_upgrade(request: web.Request) -> bool:
    """``Upgrade: websocket`` with ``upgrade`` as a token of Connection (not a substring)."""
    headers = request.headers
    return headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection_named(
        headers
    )


class _Redirected(Exception):
    """The upstream answered the handshake with a redirect: relayed, not followed."""

    def __init__(self, status: int, reason: str | None, headers: CIMultiDictProxy[str]) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.headers = headers


async def no_handshake_redirects(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    """A session middleware: ``ws_connect`` has no ``allow_redirects`` and would follow a 3xx,
    token and all, to any path or host. A WebSocket handshake's redirect stops here instead
    (other requests pass untouched: they are sent with ``allow_redirects=False``)."""
    resp = await handler(req)
    if resp.status in REDIRECTS and req.headers.get("Upgrade", "").lower() == "websocket":
        resp.close()
        raise _Redirected(resp.status, resp.reason, resp.headers)
    return resp


async def proxy_websocket(
    request: web.Request,
    session: aiohttp.ClientSession | None,
    route: RouteRuntime,
    remainder: str,
    query: str | None,
    ex: Exchange,
) -> web.StreamResponse:
    """Connect upstream first (its failure is a normal 502), then accept the client."""
    assert session is not None
    url, headers = rewrite(request, route, remainder, query, ex)
    url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    for name in list(headers):
        if name.lower() in _WS_OWN:
            del headers[name]
    if route.source is not None:
        token = await route.source.token()
        headers[AUTHORIZATION] = token.authorization
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    cap = int(route.config.websocket.max_message) + 1  # aiohttp refuses a message of its cap
    try:
        upstream = await session.ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            ssl=route.ssl,
            server_hostname=route.server_hostname,
            autoclose=False,
            autoping=False,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            max_msg_size=cap,
        )
    except _Redirected as redirect:
        ex.upstream_status = ex.status = redirect.status
        return _relay_redirect(redirect, route, ex)
    except aiohttp.WSServerHandshakeError as exc:
        ex.upstream_status = exc.status
        if exc.status == 401 and route.source is not None:
            route.source.invalidate(token)
        return web.Response(
            status=exc.status if exc.status >= 400 else 502, headers={"X-Request-Id": ex.request_id}
        )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise _translate(exc) from exc
    ex.upstream_status = 101
    client = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else (),
        autoclose=False,
        autoping=False,
        max_msg_size=cap,
    )
    await client.prepare(request)
    ex.status = 101
    try:
        await _pump_both(client, upstream)
    finally:
        await upstream.close()
        await client.close()
    return client


def _relay_redirect(redirect: _Redirected, route: RouteRuntime, ex: Exchange) -> web.Response:
    """The upstream's redirect as the client's answer, as an HTTP response's would be."""
    headers: CIMultiDict[str] = response_headers(redirect.headers)
    rewrite_locations(headers, route.origin, route.base_path, route.prefix)
    headers["X-Request-Id"] = ex.request_id
    return web.Response(status=redirect.status, reason=redirect.reason, headers=headers)


async def _pump_both(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    a = asyncio.create_task(_pump(client, upstream))
    b = asyncio.create_task(_pump(upstream, client))
    try:
        await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (a, b):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in src:
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type == WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            await dst.close(code=msg.data or 1000, message=(msg.extra or "").encode())
            return
        elif msg.type == WSMsgType.ERROR:  # src is closed already (1009 for a message too big)
            break
    await dst.close()
