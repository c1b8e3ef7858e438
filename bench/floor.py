"""A calibration floor for ``make bench``: the least a Python proxy can cost on this machine.

Not part of tokenrelay and not usable as a proxy: one upstream, GET only, whole responses
held in memory, no checks, no token, no logs, no metrics, no error handling. It is the
design the performance notes measured fastest (a callback-only protocol on both sides,
httptools parsers, uvloop), stripped of every feature, so the bench can show what CPython
itself costs per request here next to what tokenrelay costs with every feature on.

Usage: ``python bench/floor.py PORT UPSTREAM_HOST:UPSTREAM_PORT``
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """A pooled upstream connection; hands each complete response to its client."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.parts: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        data, self.parts = b"".join(self.parts), []
        self.pool.append(self)
        if client is not None and client.transport is not None:
            client.transport.write(data)


class Client(asyncio.Protocol):
    """One client connection: each request's head is rewritten and sent upstream."""

    def __init__(self, upstream: tuple[str, int], pool: list[Upstream]) -> None:
        self.upstream = upstream
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.sending: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() != b"host":
            self.fields.append(name + b": " + value + b"\r\n")

    def on_message_complete(self) -> None:
        path = self.url.split(b"/", 2)[2] if self.url.count(b"/") >= 2 else b""
        head = b"".join([b"GET /", path, b" HTTP/1.1\r\nHost: upstream\r\n", *self.fields, b"\r\n"])
        self.fields = []
        self.sending = asyncio.ensure_future(self.send(head))  # a reference keeps it alive

    async def send(self, head: bytes) -> None:
        if self.pool:
            up = self.pool.pop()
        else:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(lambda: Upstream(self.pool), *self.upstream)
        up.client = self
        assert up.transport is not None
        up.transport.write(head)


async def main(port: int, upstream: tuple[str, int]) -> None:
    pool: list[Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream, pool), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    host, _, up_port = sys.argv[2].rpartition(":")
    uvloop.run(main(int(sys.argv[1]), (host, int(up_port))))
