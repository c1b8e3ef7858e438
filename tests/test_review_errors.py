"""Requests aiohttp's parser refuses are answered like every other error the proxy makes.

Review 3, finding 6: over-long lines, too many headers, bad bytes and bad framing got
aiohttp's text/plain answer (quoting the refused bytes), no request id, no access line,
and 400 where 414 or 431 is right. Everything here goes over real sockets to a real proxy.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy
from multidict import CIMultiDict

from proxy.guard import refusal
from proxy.problems import PROBLEM_TYPE_BASE
from tests.conftest import StartProxy
from tests.helpers import LogStream, OwnProxy, Recorder, own_proxy, parse_answer_head

WAIT = 5.0
SECRET = "Bearer SECRET-tok-3f9a"


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    closed: bool  # the proxy closed the connection after the answer

    def json(self) -> Any:
        return orjson.loads(self.body)


async def send(port: int, data: bytes, answers: int = 1) -> list[Answer]:
    """Send raw bytes; read ``answers`` responses, then whether the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT):
            out = [await _answer(reader) for _ in range(answers)]
            closed = await reader.read() == b""
        out[-1].closed = closed
        return out
    finally:
        writer.close()


async def _answer(reader: asyncio.StreamReader) -> Answer:
    _, status, headers = parse_answer_head(await reader.readuntil(b"\r\n\r\n"))
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return Answer(status, headers, body, closed=False)


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[OwnProxy, Recorder]]:
    rec = Recorder()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = f"routes:\n  - prefix: /svc/\n    upstream: http://127.0.0.1:{port}/base/\n"
    try:
        async with own_proxy(config, tmp_path) as p:
            yield p, rec
    finally:
        server.close()


def head(target: bytes = b"/svc/a", extra: bytes = b"", line: bytes | None = None) -> bytes:
    first = line if line is not None else b"GET " + target + b" HTTP/1.1"
    return first + b"\r\nHost: h\r\nX-Request-Id: client-id-1\r\n" + extra + b"\r\n"


MANY = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
REFUSED = {
    "request line too long": (head(b"/svc/" + b"a" * 9000), 414, "request-line-too-long"),
    "absolute-form line too long": (
        head(b"http://h/svc/" + b"a" * 9000),
        414,
        "request-line-too-long",
    ),
    "header value too long": (
        head(extra=b"X-Long: " + b"v" * 9000 + b"\r\n"),
        431,
        "headers-too-large",
    ),
    "value like a target": (
        head(extra=b"X-Path: /" + b"v" * 9000 + b"\r\n"),
        431,
        "headers-too-large",
    ),
    "header name too long": (
        head(extra=b"X-" + b"n" * 9000 + b": 1\r\n"),
        431,
        "headers-too-large",
    ),
    "too many headers": (head(extra=MANY), 431, "headers-too-large"),
    "control byte in a name": (head(extra=b"X-Bad\x01: y\r\n"), 400, "bad-request"),
    "raw UTF-8 in the target": (head(b"/svc/caf\xc3\xa9"), 400, "bad-request"),
    "space in the target": (head(b"/svc/a b"), 400, "bad-request"),
    "duplicate Content-Length": (
        head(b"/svc/a", b"Content-Length: 1\r\nContent-Length: 2\r\n", line=b"POST /svc/a HTTP/1.1")
        + b"ab",
        400,
        "bad-framing",
    ),
    "Content-Length and chunked": (
        head(
            extra=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            line=b"POST /svc/a HTTP/1.1",
        )
        + b"0\r\n\r\n",
        400,
        "bad-framing",
    ),
    "TLS on the plain port": (  # the lean server waits for a CRLF CRLF before handing over
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
        400,
        "bad-request",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_refusal_is_a_problem_with_a_fresh_id_and_the_connection_closes(
    name: str, proxy: tuple[OwnProxy, Recorder]
) -> None:
    p, rec = proxy
    data, status, slug = REFUSED[name]
    [answer] = await send(p.port, data)
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.headers["Connection"] == "close"
    assert answer.closed
    doc = answer.json()
    assert doc["type"] == PROBLEM_TYPE_BASE + slug
    assert doc["status"] == status
    rid = answer.headers["X-Request-Id"]
    assert doc["request_id"] == rid
    assert re.fullmatch(r"[0-9a-f]{32}", rid)  # made here: no header of the request is trusted
    assert rec.received == b""


SECRET_LEAKS = {
    "bad byte in Authorization": f"Authorization: {SECRET}\x7f\r\n".encode("latin-1"),
    "over-long Authorization": f"Authorization: {SECRET}{'x' * 9000}\r\n".encode(),
    "control byte after it": f"Authorization: {SECRET}\r\nX\x01: y\r\n".encode(),
}


@pytest.mark.parametrize("name", list(SECRET_LEAKS))
async def test_refused_bytes_are_never_echoed_nor_logged(
    name: str, proxy: tuple[OwnProxy, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    p, _ = proxy
    caplog.set_level(logging.DEBUG)
    [answer] = await send(p.port, head(extra=SECRET_LEAKS[name]))
    assert answer.status in (400, 431)
    assert b"SECRET" not in answer.body
    assert "SECRET" not in repr(answer.headers)
    assert "SECRET" not in caplog.text
    assert "SECRET" not in p.logs.getvalue()


async def test_the_reason_is_kept_when_it_quotes_nothing(proxy: tuple[OwnProxy, Recorder]) -> None:
    p, _ = proxy
    dup = head(extra=b"Content-Length: 1\r\nContent-Length: 2\r\n", line=b"POST /svc/a HTTP/1.1")
    [answer] = await send(p.port, dup + b"ab")
    assert answer.json()["detail"] == "malformed request: Duplicate Content-Length"
    [answer] = await send(p.port, head(b"/svc/" + b"a" * 9000))
    assert answer.json()["detail"] == "the request line is longer than 8190 bytes"


async def test_refusal_after_a_served_request_on_the_same_connection(
    proxy: tuple[OwnProxy, Recorder],
) -> None:
    """The lean server serves the first request and hands the rest to aiohttp."""
    p, rec = proxy
    good = b"GET /svc/ok HTTP/1.1\r\nHost: h\r\n\r\n"
    served, refused = await send(p.port, good + head(extra=MANY), answers=2)
    assert served.status == 200
    assert refused.status == 431
    assert refused.json()["type"] == PROBLEM_TYPE_BASE + "headers-too-large"
    assert refused.closed
    assert rec.received.count(b"GET /base/") == 1


async def access_lines(logs: LogStream, request_id: str) -> list[dict[str, Any]]:
    """The access lines of ``request_id``, once there is one."""
    async with asyncio.timeout(WAIT):
        while True:
            logs.written.clear()
            docs = [orjson.loads(line) for line in logs.getvalue().splitlines()]
            found = [
                d for d in docs if d.get("event") == "access" and d.get("request_id") == request_id
            ]
            if found:
                return found
            await logs.written.wait()


@pytest.mark.parametrize(
    "name", ["request line too long", "too many headers", "duplicate Content-Length"]
)
async def test_refusal_makes_one_access_line(name: str, proxy: tuple[OwnProxy, Recorder]) -> None:
    p, _ = proxy
    data, status, slug = REFUSED[name]
    [answer] = await send(p.port, data)
    rid = answer.headers["X-Request-Id"]
    [line] = await access_lines(p.logs, rid)
    assert line["status"] == status
    assert line["error"] == slug
    assert line["client"] == "127.0.0.1"
    assert line["route"] == ""


async def test_unknown_expectation_is_a_417_problem_with_an_access_line(
    proxy: tuple[OwnProxy, Recorder],
) -> None:
    p, rec = proxy
    extra = b"Expect: 200-ok\r\nContent-Length: 2\r\nConnection: close\r\n"
    [answer] = await send(p.port, head(extra=extra, line=b"POST /svc/a HTTP/1.1") + b"hi")
    assert answer.status == 417
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["type"] == PROBLEM_TYPE_BASE + "expectation-failed"
    assert answer.headers["X-Request-Id"] == "client-id-1"  # a parsed request: its id is kept
    [line] = await access_lines(p.logs, "client-id-1")
    assert line["status"] == 417
    assert rec.received == b""


async def test_a_failure_escaping_a_handler_is_a_500_problem(start_proxy: StartProxy) -> None:
    """The admin listener's handler lets non-ProxyErrors through (here: a reload with no
    reloader set up); aiohttp's 500 keeps its log line and closing, and becomes a problem."""
    p = await start_proxy("admin: {host: 127.0.0.1, port: 0}\nroutes: []\n")
    assert p.admin_url is not None and p.admin_url.port is not None
    request = b"POST /-/reload HTTP/1.1\r\nHost: h\r\nX-Request-Id: rid-500\r\n\r\n"
    [answer] = await send(p.admin_url.port, request)
    assert answer.status == 500
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.headers["X-Request-Id"] == "rid-500"
    assert answer.json()["type"] == PROBLEM_TYPE_BASE + "internal-error"
    assert answer.closed


def python_parser_refusal(data: bytes) -> HttpProcessingError:
    """What aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS) raises for ``data``."""
    loop = asyncio.get_running_loop()
    parser = HttpRequestParserPy(
        BaseProtocol(loop), loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=100
    )
    with pytest.raises(HttpProcessingError) as info:
        parser.feed_data(data)
    return info.value


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
        (b"GET http://h/" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Long: /" + b"v" * 9000 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-" + b"n" * 9000 + b": 1\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + MANY + b"\r\n", 431),
    ],
)
async def test_the_pure_python_parser_is_told_apart_too(data: bytes, status: int) -> None:
    assert refusal(python_parser_refusal(data)).status == status


async def test_pure_python_parser_messages_quoting_bytes_are_not_copied() -> None:
    exc = python_parser_refusal(f"GET / HTTP/1.1\r\nAuthorization: {SECRET}\x00\r\n\r\n".encode())
    err = refusal(exc)
    assert err.status == 400
    assert "SECRET" not in err.detail
