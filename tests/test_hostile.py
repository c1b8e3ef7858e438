"""Hostile clients: oversized heads and bodies, idle and slow connections, path confusion."""

from __future__ import annotations

import asyncio
import re

import pytest
from yarl import URL

from tests.conftest import Proxy, StartProxy
from tests.helpers import Echo, raw_exchange


def config(up: URL, limits: str = "") -> str:
    return f"""
routes:
  - prefix: /svc/
    upstream: {up}/base/
  - prefix: /small/
    upstream: {up}/small/
    max_body: 1KiB
{limits}"""


def status_of(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else 0


async def test_oversized_heads_are_refused(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    """Production defaults: 8190-byte lines and fields, 100 headers."""
    e, up = echo
    proxy = await start_proxy(config(up))
    long_line = b"GET /svc/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    long_field = b"GET /svc/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n"
    many = b"GET /svc/a HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    for request in (long_line, long_field, many + b"\r\n"):
        raw = await raw_exchange(proxy.port, request)
        assert status_of(raw) in (400, 414, 431), raw[:200]
    assert e.seen == []
    fits = b"GET /svc/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(90)
    )
    assert status_of(await raw_exchange(proxy.port, fits + b"\r\n")) == 200


async def test_body_limit_before_and_while_streaming(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    declared = b"POST /small/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000
    raw = await raw_exchange(proxy.port, declared)
    assert status_of(raw) == 413
    assert b"payload-too-large" in raw
    assert e.seen == []  # refused on Content-Length alone, nothing forwarded
    chunk = b"400\r\n" + b"b" * 1024 + b"\r\n"
    chunked = (
        b"POST /small/y HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk * 3
        + b"0\r\n\r\n"
    )
    raw = await raw_exchange(proxy.port, chunked)
    assert status_of(raw) == 413
    assert all(s.body_len <= 1024 for s in e.seen)  # never a complete oversized body
    ok = b"POST /small/z HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1024\r\n\r\n"
    assert status_of(await raw_exchange(proxy.port, ok + b"c" * 1024)) == 200


async def wait_closed(reader: asyncio.StreamReader, limit: float = 10) -> bool:
    """Read until the server closes; False when it keeps the connection past ``limit``."""
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    return True


async def test_idle_keepalive_connection_is_closed(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up, "limits: {keepalive_timeout: 0.2}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /svc/a HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 200
    assert await wait_closed(reader)
    writer.close()


async def slow_head(proxy: Proxy) -> bool:
    """Open a connection, send half a request head, then nothing: is it closed?"""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /svc/a HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    try:
        return await wait_closed(reader, 5)
    finally:
        writer.close()


async def test_slow_request_head_is_cut(echo: tuple[Echo, URL], start_proxy: StartProxy) -> None:
    _, up = echo
    proxy = await start_proxy(config(up, "limits: {header_timeout: 0.3}"))
    assert await slow_head(proxy)


async def test_connections_over_the_limit_are_refused(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    _, up = echo
    proxy = await start_proxy(config(up, "limits: {max_connections: 2}"))
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /svc/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = b""
    try:
        async with asyncio.timeout(5):
            raw = await reader.read()
    except TimeoutError:
        pass
    for _, w in [*held, (reader, writer)]:
        w.close()
    assert status_of(raw) in (0, 503)


CONFUSED = [
    "/svc/%252e%252e/x",
    "/svc/%25252e%25252e/x",
    "/svc/%c0%ae%c0%ae/x",
    "/svc/%e0%80%ae%e0%80%ae/x",
    "/svc/%u002e%u002e/x",
    "/svc/..;/x",
    "/svc/..%3b/x",
    "/svc/a/..%5c..%5cx",
    "/svc/a\\..\\x",
    "/svc/%2e%2e%2fx",
    "/svc/.%2e/x",
]


@pytest.mark.parametrize("target", CONFUSED)
async def test_path_confusion_refused(
    target: str, echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    raw = await raw_exchange(
        proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(raw) == 400, raw[:300]
    assert e.seen == []


@pytest.mark.parametrize(
    ("target", "upstream_path"),
    [
        ("//evil.example/svc/x", None),
        ("/svc//evil.example/x", "/base//evil.example/x"),
        ("http://evil.example/svc/x", "/base/x"),
        ("https://evil.example:444/svc/x?q=1", "/base/x?q=1"),
        ("http://evil.example", None),
    ],
)
async def test_upstream_host_never_changes(
    target: str,
    upstream_path: str | None,
    echo: tuple[Echo, URL],
    start_proxy: StartProxy,
) -> None:
    e, up = echo
    proxy = await start_proxy(config(up))
    raw = await raw_exchange(
        proxy.port,
        f"GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode(),
    )
    if upstream_path is None:
        assert status_of(raw) in (400, 404) and e.seen == []
        return
    assert status_of(raw) == 200
    assert [s.raw_path for s in e.seen] == [upstream_path]
    assert e.seen[0].header("Host") == f"127.0.0.1:{up.port}"


async def test_stalled_small_body_meets_the_read_timeout(
    echo: tuple[Echo, URL], start_proxy: StartProxy
) -> None:
    e, up = echo
    proxy = await start_proxy(
        f"routes:\n  - prefix: /svc/\n    upstream: {up}/\n    timeout: {{connect: 1, read: 0.3}}\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /svc/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert e.seen == []
