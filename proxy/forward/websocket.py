"""WebSocket upgrades: the upstream handshake carries the token, frames are pumped both ways."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web

from proxy.forward.exchange import Exchange
from proxy.forward.forwarder import RouteRuntime, _translate, rewrite
from proxy.forward.headers import AUTHORIZATION

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
    upgrade = request.headers.get("Upgrade", "")
    return (
        upgrade.lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


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
        )
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
        max_msg_size=0,
    )
    await client.prepare(request)
    ex.status = 101
    try:
        await _pump_both(client, upstream)
    finally:
        await upstream.close()
        await client.close()
    return client


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
    await dst.close()
