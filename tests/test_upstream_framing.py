"""Malicious and odd upstream answers, judged before the client gets a byte of them.

A raw upstream sends one fixed answer per request. A response whose body framing the proxy
cannot relay as sent (a Transfer-Encoding other than exactly ``chunked``), a status outside
100-599, or a header holding bytes that are not UTF-8 is a 502 problem with
``upstream_error: protocol``, counted in ``tokenrelay_upstream_errors_total``; nothing of
it reaches the client. What is relayed goes out as the same bytes from both server paths:
the lean one (a GET) and aiohttp's (a chunked POST, which the lean server hands over), and
on a route behind an env HTTP proxy (aiohttp's client).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from tests.conftest import Proxy, StartProxy
from tests.helpers import (
    Answer,
    Recorder,
    assert_problem,
    parse_answer_head,
    raw_exchange,
    raw_request,
    svc_config,
)

PATHS = ("lean", "aiohttp", "env-proxy")
CHUNKED = "Transfer-Encoding: chunked\r\nConnection: close\r\n"
SAME_ID = "X-Request-Id: same-request-id\r\n"


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, URL]]:
    rec = Recorder()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    try:
        yield rec, URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    finally:
        server.close()


async def proxy_for(
    via: str, up: URL, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> Proxy:
    if via != "env-proxy":
        return await start_proxy(svc_config(up))
    monkeypatch.setenv("HTTP_PROXY", str(up))  # the raw upstream plays the forward proxy
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return await start_proxy(svc_config("http://upstream.test", top="trust_env: true\n"))


async def send(proxy: Proxy, via: str, headers: str = "") -> bytes:
    """One request on the chosen server path; the client's raw answer up to the close."""
    if via == "aiohttp":
        body = b"2\r\nhi\r\n0\r\n\r\n"
        data = raw_request("/svc/x", headers + CHUNKED, method="POST", body=body)
    else:
        data = raw_request("/svc/x", headers + "Connection: close\r\n")
    return await raw_exchange(proxy.port, data)


def answer_of(raw: bytes) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:300]
    version, status, headers = parse_answer_head(head + sep)
    return Answer(version, status, headers, body)


def protocol_errors(proxy: Proxy) -> float:
    """The route's protocol failures as a scrape of the proxy's own registry shows them."""
    scraped = generate_latest(proxy.runtime.observer.metrics.registry).decode()
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "tokenrelay_upstream_errors_total"
                and labels.get("kind") == "protocol"
                and labels.get("route") == "/svc/"
            ):
                return sample.value
    return 0.0


def assert_protocol_502(raw: bytes, proxy: Proxy, leaked: bytes) -> None:
    got = answer_of(raw)
    assert_problem(got, 502)
    assert got.json()["upstream_error"] == "protocol"
    assert leaked not in raw  # not a byte of the upstream's answer reached the client
    assert protocol_errors(proxy) == 1


TRANSFER_CODINGS = {
    "gzip": b"Transfer-Encoding: gzip\r\n\r\nSECRET-BODY",
    "gzip, chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\nb\r\nSECRET-BODY\r\n0\r\n\r\n",
    "chunked, gzip": b"Transfer-Encoding: chunked, gzip\r\n\r\nSECRET-BODY",
    "chunked twice": (
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"b\r\nSECRET-BODY\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("coding", list(TRANSFER_CODINGS))
async def test_a_transfer_encoding_other_than_chunked_is_a_502_before_any_head(
    via: str,
    coding: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, up = recorder
    rec.response = b"HTTP/1.1 200 OK\r\nX-Upstream: leaked\r\n" + TRANSFER_CODINGS[coding]
    proxy = await proxy_for(via, up, start_proxy, monkeypatch)
    raw = await send(proxy, via)
    assert_protocol_502(raw, proxy, b"leaked")
    assert b"SECRET-BODY" not in raw


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("status", [b"099", b"000", b"600", b"999", b"1000"])
async def test_a_status_outside_100_to_599_is_a_502(
    via: str,
    status: bytes,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, up = recorder
    rec.response = (
        b"HTTP/1.1 " + status + b" Odd\r\nX-Upstream: leaked\r\nContent-Length: 2\r\n\r\nok"
    )
    proxy = await proxy_for(via, up, start_proxy, monkeypatch)
    raw = await send(proxy, via)
    assert_protocol_502(raw, proxy, b"leaked")


@pytest.mark.parametrize("via", PATHS)
async def test_a_header_with_bytes_that_are_not_utf8_is_a_502(
    via: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, up = recorder
    rec.response = (
        b'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="caf\xe9-leaked"\r\n'
        b"Content-Length: 2\r\n\r\nok"
    )
    proxy = await proxy_for(via, up, start_proxy, monkeypatch)
    raw = await send(proxy, via)
    assert_protocol_502(raw, proxy, b"leaked")


# --- what is relayed: the same bytes on both server paths

RELAYED = {
    "no content type": b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "utf-8 header text": b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
    b'Content-Disposition: attachment; filename="caf\xc3\xa9 \xe2\x82\xac.txt"\r\n'
    b"Content-Length: 5\r\n\r\nhello",
    "chunked, no content type": b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "reason not utf-8": b"HTTP/1.1 200 \xff\xfeOK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
    b"Server: upstream/1\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.mark.parametrize("case", list(RELAYED))
async def test_both_server_paths_relay_the_same_head_bytes(
    case: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    rec.response = RELAYED[case]
    proxy = await start_proxy(svc_config(up))
    lean = await send(proxy, "lean", SAME_ID)
    handed_over = await send(proxy, "aiohttp", SAME_ID)
    lean_head, _, lean_body = lean.partition(b"\r\n\r\n")
    aiohttp_head, _, aiohttp_body = handed_over.partition(b"\r\n\r\n")
    assert lean_head == aiohttp_head
    assert lean_body == aiohttp_body
    got = answer_of(lean)
    assert got.status == 200
    assert "Content-Type" not in got.headers or case == "reason not utf-8"
    assert lean_head.startswith(b"HTTP/1.1 200 OK\r\n")
    if case == "utf-8 header text":
        assert b'filename="caf\xc3\xa9 \xe2\x82\xac.txt"' in lean_head
