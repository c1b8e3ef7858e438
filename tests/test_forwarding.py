"""The path every request takes: routing, headers, bodies both ways, errors."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from tests.conftest import StartProxy, StartUpstream
from tests.helpers import Echo, Recorder, raw_exchange


def config(upstream: URL, *, provider: bool = True, extra_route: str = "") -> str:
    prov = "    provider: static\n" if provider else ""
    return f"""
providers:
  static: {{grant: static, token: "tok-STATIC-123"}}
routes:
  - prefix: /svc/
    upstream: {upstream}/base/
{prov}    timeout: {{connect: 2, read: 2}}
  - prefix: /open/
    upstream: {upstream}/o/
{extra_route}"""


async def test_path_and_query_forwarded_byte_exact(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    target = "/svc/a%2Fb/c+d/%7Euser?x=1&x=2&y=%20+&x=3&empty="
    async with client.get(URL(str(proxy.url) + target, encoded=True)) as resp:
        assert resp.status == 200
        await resp.read()
    assert e.seen[0].raw_path == "/base/a%2Fb/c+d/%7Euser?x=1&x=2&y=%20+&x=3&empty="
    async with client.get(proxy.url / "svc") as resp:
        assert resp.status == 200
    assert e.seen[1].raw_path == "/base/"


async def test_no_route_is_problem_json_404(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    async with client.get(proxy.url / "svcx" / "a", headers={"X-Request-Id": "abc-1"}) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
        body = orjson.loads(await resp.read())
    assert body["status"] == 404
    assert body["request_id"] == "abc-1" == resp.headers["X-Request-Id"]
    assert body["type"].endswith("/no-route")


async def test_traversal_answered_400_and_never_forwarded(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    for target in (
        "/svc/../etc",
        "/svc/%2e%2e/x",
        "/svc/%252e%252e/x",
        "/svc/a\\..\\b",
        "/svc/..;/x",
    ):
        raw = await raw_exchange(
            proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert raw.startswith(b"HTTP/1.1 400"), (target, raw[:200])
        assert b"application/problem+json" in raw
    assert e.seen == []


async def test_request_headers_rewritten(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    request = (
        b"GET /svc/h HTTP/1.1\r\nHost: front.example\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: secret-hop\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Authorization: Bearer client-own-token\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Multi: one\r\nX-Multi: two\r\nAccept-Encoding: br\r\n\r\n"
    )
    raw = await raw_exchange(
        proxy.port,
        request + b"GET /open/h HTTP/1.1\r\nHost: f\r\n"
        b"Authorization: Bearer client-own\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200") == 2
    seen = e.seen[0]
    names = {k.lower() for k, _ in seen.headers}
    for hop in ("x-hop", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"):
        assert hop not in names
    assert seen.header("Host") == f"127.0.0.1:{up.port}"
    assert seen.header("Authorization") == "Bearer tok-STATIC-123"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"  # an untrusted hop's value is replaced
    assert seen.header("X-Forwarded-Host") == "front.example"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header_all("X-Multi") == ["one", "two"]
    assert seen.header("Accept-Encoding") == "br"
    assert seen.header("User-Agent") is None  # nothing added that the client did not send
    assert seen.header("X-Request-Id")
    # a route without a provider passes the client's Authorization through unchanged
    assert e.seen[1].header("Authorization") == "Bearer client-own"


async def test_response_headers_and_encoded_bodies_pass_through(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    async with client.get(proxy.url / "svc" / "cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert resp.headers.getall("X-Multi") == ["one", "two"]
        assert resp.headers["X-Request-Id"]
    async with client.get(proxy.url / "svc" / "gzip") as resp:
        body = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert body == gzip.compress(b"hello " * 100, mtime=0)
        assert resp.headers["Content-Length"] == str(len(body))
    async with client.get(proxy.url / "svc" / "redirect", allow_redirects=False) as resp:
        assert resp.status == 302  # never followed by the proxy
        assert resp.headers["Location"] == "http://elsewhere.invalid/x"


async def test_uploads_stream_with_and_without_length(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    blob = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), 100_000):
            yield blob[i : i + 100_000]

    async with client.post(proxy.url / "svc" / "up", data=chunks()) as resp:
        assert resp.status == 200
    async with client.put(proxy.url / "svc" / "up", data=blob) as resp:
        assert resp.status == 200
    async with client.post(proxy.url / "svc" / "small", data=b"tiny") as resp:
        assert resp.status == 200
    digest = hashlib.sha256(blob).hexdigest()
    assert [s.body_sha256 for s in e.seen[:2]] == [digest, digest]
    assert e.seen[0].header("Transfer-Encoding") == "chunked"
    assert e.seen[1].header("Content-Length") == str(len(blob))
    assert e.seen[2].body_sha256 == hashlib.sha256(b"tiny").hexdigest()


async def test_large_download_streams(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    size = 50 * 1024 * 1024 + 3
    async with client.get(proxy.url.with_path("/svc/big").with_query(size=size)) as resp:
        assert resp.headers["Content-Length"] == str(size)
        n = 0
        async for chunk in resp.content.iter_chunked(1 << 20):
            n += len(chunk)
    assert n == size
    async with client.get(proxy.url / "svc" / "chunked") as resp:
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert await resp.read() == b"part0;part1;part2;part3;part4;"


async def test_head_204_304_have_no_body(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    raw = await raw_exchange(
        proxy.port,
        b"HEAD /svc/big?size=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /svc/nocontent HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /svc/notmodified HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    parts = raw.split(b"HTTP/1.1 ")
    assert [p[:3] for p in parts[1:]] == [b"200", b"204", b"304"]
    head, no_content, not_modified = parts[1:]
    assert b"Content-Length: 1000" in head
    assert head.endswith(b"\r\n\r\n") and no_content.endswith(b"\r\n\r\n")
    assert not_modified.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in no_content


async def test_expect_100_continue(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /svc/e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200")
    assert e.seen[0].body_sha256 == hashlib.sha256(b"hello").hexdigest()


async def test_unreachable_is_502_and_slow_is_504(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, up = echo
    dead = "http://127.0.0.1:9"  # discard port: nothing listens there
    extra = f"  - prefix: /dead/\n    upstream: {dead}/\n"
    extra += f"  - prefix: /slow/\n    upstream: {up}/\n    timeout: {{connect: 1, read: 0.3}}\n"
    proxy = await start_proxy(config(up, extra_route=extra))
    async with client.get(proxy.url / "dead" / "x") as resp:
        assert resp.status == 502
        body = orjson.loads(await resp.read())
        assert body["upstream_error"] == "connect"
    async with client.get(proxy.url / "slow" / "never") as resp:
        assert resp.status == 504
        assert resp.content_type == "application/problem+json"


async def test_sse_flows_and_disconnect_releases_upstream(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    resp = await client.get(proxy.url / "svc" / "gate")
    await e.stream_gate.put(b"data: one\n\n")
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert first == b"data: one\n\n"  # arrived while the stream is still open
    await e.stream_gate.put(b"data: two\n\n")
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"data: two\n\n"
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(e.released.wait(), 5)


async def test_admin_health_and_ready(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up))
    async with client.get(proxy.url / "-" / "health") as resp:
        assert resp.status == 200
    async with client.get(proxy.url / "-" / "ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"


async def test_websocket_proxied_with_token(
    start_upstream: StartUpstream, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    seen_auth: list[str | None] = []

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        seen_auth.append(request.headers.get("Authorization"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/base/ws", ws_handler)
    up = await start_upstream(app)
    proxy = await start_proxy(config(up))
    async with client.ws_connect(proxy.url / "svc" / "ws") as ws:
        await ws.send_str("hi")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.data == "echo:hi"
    assert seen_auth == ["Bearer tok-STATIC-123"]


async def test_upstream_connections_are_kept_alive(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(config(URL(f"http://127.0.0.1:{port}")))
        for _ in range(5):
            async with client.get(proxy.url / "svc" / "k") as resp:
                assert await resp.read() == b"ok"
        assert recorder.connections == 1
    finally:
        server.close()


async def test_trusted_hop_forwarded_headers_are_appended(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up) + "trusted_proxies: [127.0.0.0/8]\n")
    raw = await raw_exchange(
        proxy.port,
        b"GET /open/t HTTP/1.1\r\nHost: inner\r\nX-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: public.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200")
    seen = e.seen[0]
    assert seen.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == "public.example"


async def test_unknown_expectation_is_417(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    raw = await raw_exchange(
        proxy.port,
        b"POST /svc/e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: teapot\r\n"
        b"Connection: close\r\n\r\nhi",
    )
    assert raw.startswith(b"HTTP/1.1 417")
    assert e.seen == []
