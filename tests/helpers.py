"""Real servers for the tests: an echo upstream, a raw-bytes recorder, a raw client."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.app import RUNTIME, create_app, start_runner
from proxy.config import parse_config
from proxy.observability import Observer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """What the echo upstream received, in order."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_len: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Echo:
    """An upstream that answers with what it received, plus some special paths."""

    seen: list[Seen] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    stream_gate: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    statuses: list[int] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        special = {
            "/big": self._big,
            "/cookies": self._cookies,
            "/gzip": self._gzip,
            "/never": self._never,
            "/gate": self._gate,
            "/nocontent": self._no_content,
            "/notmodified": self._not_modified,
            "/redirect": self._redirect,
            "/chunked": self._chunked,
        }
        for suffix, fn in special.items():
            if path.endswith(suffix):
                await request.read()
                return await fn(request)
        digest = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            n += len(chunk)
        seen = Seen(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            digest.hexdigest(),
            n,
        )
        self.seen.append(seen)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(
            status=status, body=orjson.dumps(seen.__dict__), content_type="application/json"
        )

    async def _big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "1048576"))
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        block = b"x" * 65536
        left = size
        while left:
            n = min(left, len(block))
            await resp.write(block[:n])
            left -= n
        return resp

    async def _cookies(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        return resp

    async def _gzip(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(b"hello " * 100, mtime=0),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def _never(self, request: web.Request) -> web.StreamResponse:
        self.hold.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def _gate(self, request: web.Request) -> web.StreamResponse:
        """Streams whatever the test puts in ``stream_gate``; None ends the body."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while (item := await self.stream_gate.get()) is not None:
                await resp.write(item)
        finally:
            self.released.set()
        return resp

    async def _no_content(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _not_modified(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "http://elsewhere.invalid/x"})

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
        return resp


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


@dataclass
class Recorder:
    """A raw TCP upstream that records the bytes it gets and answers a fixed response."""

    received: bytearray = field(default_factory=bytearray)
    response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.received += head
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    if line.lower().startswith(b"transfer-encoding:"):
                        length = -1
                if length > 0:
                    self.received += await reader.readexactly(length)
                elif length < 0:
                    while True:
                        size_line = await reader.readuntil(b"\r\n")
                        self.received += size_line
                        size = int(size_line.split(b";")[0], 16)
                        self.received += await reader.readexactly(size + 2)
                        if size == 0:
                            break
                writer.write(self.response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def provider_json(vendor: object, **overrides: object) -> str:
    """A vendor emulator's provider as a YAML flow mapping (JSON is YAML)."""
    from proxy.presets import PRESETS

    preset = getattr(vendor, "preset", None)
    keys: dict[str, object] = {"preset": preset} if preset in PRESETS else {}
    keys.update(vendor.provider_keys())  # type: ignore[attr-defined]
    keys.update(overrides)
    return orjson.dumps(keys).decode()


class LogStream(io.StringIO):
    """The proxy's log stream; ``written`` fires on every write, so a test can wait for a line."""

    def __init__(self, wait: float = 10.0) -> None:
        super().__init__()
        self.written = asyncio.Event()
        self.wait = wait

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)

    async def access_line(self, path: str) -> dict[str, Any]:
        """The access line for ``path``, once it has been written."""
        async with asyncio.timeout(self.wait):
            while True:
                self.written.clear()
                for line in self.getvalue().splitlines():
                    doc = orjson.loads(line)
                    if doc.get("event") == "access" and doc.get("path") == path:
                        return dict(doc)
                await self.written.wait()


@dataclass
class OwnProxy:
    """A proxy a test starts and stops itself (``runner.cleanup`` is the shutdown)."""

    port: int
    runner: web.AppRunner
    app: web.Application
    logs: LogStream

    @property
    def in_flight(self) -> int:
        return self.app[RUNTIME].observer.metrics.in_flight_now


async def start_own_proxy(text: str, tmp_path: Path) -> OwnProxy:
    loaded = parse_config(text, "t.yaml", {}, tmp_path)
    cfg, logs = loaded.config, LogStream()
    app = create_app(loaded, Observer("json", stream=logs))
    runner, port = await start_runner(app, cfg, cfg.listen.model_copy(update={"port": 0}))
    return OwnProxy(port, runner, app, logs)


@asynccontextmanager
async def own_proxy(text: str, tmp_path: Path) -> AsyncIterator[OwnProxy]:
    """A proxy whose log stream a test can wait on, stopped at the end unless the test did."""
    proxy = await start_own_proxy(text, tmp_path)
    try:
        yield proxy
    finally:
        if proxy.runner.server is not None:
            await proxy.runner.cleanup()


def svc_config(up: object, route: str = "", top: str = "") -> str:
    """One route /svc/ to ``up``/base/; ``route`` adds keys to it (lines indented 4),
    ``top`` adds top-level keys."""
    return f"""
routes:
  - prefix: /svc/
    upstream: {up}/base/
    timeout: {{connect: 2, read: 5}}
{route}{top}"""


def raw_request(
    target: str, headers: str = "", *, method: str = "GET", version: str = "1.1", body: bytes = b""
) -> bytes:
    """A raw request; ``headers`` are whole lines, each ending in CRLF."""
    head = f"{method} {target} HTTP/{version}\r\nHost: front.example\r\n{headers}\r\n"
    return head.encode() + body


# --- responses read off a raw socket


@dataclass
class Answer:
    """One response as it came off the wire."""

    version: str
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_answer_head(head: bytes) -> tuple[str, int, CIMultiDict[str]]:
    """Version, status and headers of a response head, as the bytes say them."""
    status_line, *lines = head.removesuffix(b"\r\n\r\n").decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/(1\.[01]) (\d{3}) ?.*", status_line)
    assert m is not None, head[:200]
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name, value.strip())
    return m.group(1), int(m.group(2)), headers


def assert_problem(answer: Answer, status: int, request_id: str | None = None) -> str:
    """A well-formed RFC 9457 answer; returns its request id."""
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert int(answer.headers["Content-Length"]) == len(answer.body)
    doc = answer.json()
    assert doc["status"] == status and doc["type"] and doc["title"]
    assert doc["request_id"] == answer.headers["X-Request-Id"]
    if request_id is not None:
        assert doc["request_id"] == request_id
    return str(doc["request_id"])


async def read_event(stream: asyncio.StreamReader, event: str) -> dict[str, Any]:
    """The next JSON log line of a real tokenrelay process whose ``event`` is ``event``."""
    async with asyncio.timeout(30):
        while raw := await stream.readline():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(line, dict) and line.get("event") == event:
                return line
    raise AssertionError(f"process ended before {event!r}")
