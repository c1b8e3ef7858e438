"""Review 3, findings 5, 8 and 9, and issue 12's path forms, over real sockets: what the
upstream and the client get.

Also a defect found on the way: header names were matched by their spelling, so a
lowercase ``host``, ``x-forwarded-for`` or upstream ``transfer-encoding`` went through.

A raw recording upstream keeps the exact bytes of each request it got; raw-socket clients
send each request on both server paths: the lean one (a GET) and aiohttp's (a chunked POST,
which the lean server hands over).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.forward.headers import request_headers
from proxy.forward.pathsafety import refusal
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
from tests.path_cases import HARMLESS, TRAVERSALS

CHUNKED = "Transfer-Encoding: chunked\r\nConnection: close\r\n"
PATHS = ("lean", "aiohttp")


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, URL]]:
    rec = Recorder()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield rec, URL(f"http://127.0.0.1:{port}")
    finally:
        server.close()


async def send(proxy: Proxy, target: str, via: str, headers: str = "") -> bytes:
    """One request on the chosen server path; the client's raw answer."""
    if via == "lean":
        data = raw_request(target, headers + "Connection: close\r\n")
    else:
        data = raw_request(target, headers + CHUNKED, method="POST", body=b"2\r\nhi\r\n0\r\n\r\n")
    return await raw_exchange(proxy.port, data)


def upstream_head(rec: Recorder) -> list[bytes]:
    """The lines of the one request head the upstream got."""
    head, sep, _ = bytes(rec.received).partition(b"\r\n\r\n")
    assert sep, rec.received
    return head.split(b"\r\n")


# --- finding 5 and issue 12: what no decoder reading makes unsafe is forwarded byte-exact;
# every classic traversal form is refused before anything reaches the upstream


def answer_of(raw: bytes) -> Answer:
    """The one response of a ``Connection: close`` exchange."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:300]
    version, status, headers = parse_answer_head(head)
    return Answer(version, status, headers, body)


@pytest.mark.parametrize("via", PATHS)
async def test_paths_harmless_under_every_reading_are_forwarded_byte_exact(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    proxy = await start_proxy(svc_config(up))
    method = b"GET" if via == "lean" else b"POST"
    for remainder in filter(str.isascii, HARMLESS):  # the HTTP parser refuses raw non-ASCII
        del rec.received[:]
        raw = await send(proxy, "/svc" + remainder, via)
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), (remainder, raw[:300])
        expected = ("/base" + remainder).encode()
        assert upstream_head(rec)[0] == method + b" " + expected + b" HTTP/1.1", remainder


@pytest.mark.parametrize("via", PATHS)
async def test_classic_traversal_payloads_never_reach_the_upstream(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    proxy = await start_proxy(svc_config(up))
    for remainder in TRAVERSALS:
        answer = answer_of(await send(proxy, "/svc" + remainder, via))
        assert_problem(answer, 400)
        assert answer.json()["type"].endswith("/bad-request"), remainder
        assert remainder.encode() not in answer.body
        if remainder.isascii():  # the HTTP parser refuses raw non-ASCII before any route
            found = refusal(remainder.encode())
            assert found is not None and answer.json()["detail"] == found.detail, remainder
    assert rec.received == b""
    assert rec.connections == 0


# --- finding 9: the request target keeps an empty query


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        ("/svc/x?", "/base/x?"),
        ("/svc?", "/base/?"),
        ("/svc/x?a=%20b&&c", "/base/x?a=%20b&&c"),
        ("/svc/x", "/base/x"),
        ("http://evil.example/svc/x?", "/base/x?"),
    ],
)
async def test_query_is_forwarded_as_received_even_empty(
    target: str,
    upstream: str,
    via: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
) -> None:
    rec, up = recorder
    proxy = await start_proxy(svc_config(up))
    raw = await send(proxy, target, via)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:300]
    assert upstream_head(rec)[0].split(b" ")[1] == upstream.encode()


# --- finding 9: a UTF-8 reason phrase reaches the client as the upstream's bytes


@pytest.mark.parametrize("via", PATHS)
async def test_utf8_reason_phrase_is_relayed_byte_exact(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    rec.response = "HTTP/1.1 200 Très Bien\r\nX-Name: café\r\nContent-Length: 2\r\n\r\nok".encode()
    proxy = await start_proxy(svc_config(up))
    raw = await send(proxy, "/svc/r", via)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == "HTTP/1.1 200 Très Bien".encode()
    assert "X-Name: café".encode() in head


@pytest.mark.parametrize("via", PATHS)
async def test_non_utf8_reason_phrase_gets_the_standard_one_on_both_paths(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    """aiohttp's server cannot write bytes that are not UTF-8; the lean one does the same
    (issue 17, item 12: one behaviour, the same bytes on both paths)."""
    rec, up = recorder
    rec.response = b"HTTP/1.1 404 Introuvable \xe0 Paris\r\nContent-Length: 2\r\n\r\nno"
    proxy = await start_proxy(svc_config(up))
    raw = await send(proxy, "/svc/r", via)
    assert raw.split(b"\r\n", 1)[0] == b"HTTP/1.1 404 Not Found"
    assert raw.endswith(b"\r\n\r\nno")


# --- finding 8: Forwarded and X-Real-IP are believed only from a trusted proxy

CLAIMS = (
    "Forwarded: for=6.6.6.6;host=evil.example;proto=https\r\n"
    "forwarded: for=7.7.7.7\r\n"
    "X-Real-IP: 6.6.6.6\r\n"
    "X-Forwarded-For: 6.6.6.6\r\n"
)


def header_values(lines: list[bytes], name: bytes) -> list[bytes]:
    out = []
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


@pytest.mark.parametrize("via", PATHS)
async def test_hop_claims_from_an_untrusted_peer_are_dropped(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    proxy = await start_proxy(svc_config(up, top="trusted_proxies: [10.0.0.0/8]\n"))
    raw = await send(proxy, "/svc/h", via, CLAIMS)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:300]
    lines = upstream_head(rec)
    assert header_values(lines, b"Forwarded") == []
    assert header_values(lines, b"X-Real-IP") == []
    assert header_values(lines, b"X-Forwarded-For") == [b"127.0.0.1"]
    assert b"6.6.6.6" not in bytes(rec.received)


@pytest.mark.parametrize("via", PATHS)
async def test_hop_claims_from_a_trusted_proxy_pass_through(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    proxy = await start_proxy(svc_config(up, top="trusted_proxies: [127.0.0.0/8]\n"))
    raw = await send(proxy, "/svc/h", via, CLAIMS)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:300]
    lines = upstream_head(rec)
    assert header_values(lines, b"Forwarded") == [
        b"for=6.6.6.6;host=evil.example;proto=https",
        b"for=7.7.7.7",
    ]
    assert header_values(lines, b"X-Real-IP") == [b"6.6.6.6"]
    assert header_values(lines, b"X-Forwarded-For") == [b"6.6.6.6, 127.0.0.1"]


# --- found while fixing 8: header names are matched whatever their case


@pytest.mark.parametrize("via", PATHS)
async def test_lowercase_hop_and_claim_headers_are_dropped_too(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    proxy = await start_proxy(svc_config(up))
    sent = (
        "x-forwarded-for: 6.6.6.6\r\nX-FORWARDED-HOST: evil.example\r\n"
        "x-forwarded-proto: gopher\r\n"
        "forwarded: for=6.6.6.6\r\nx-real-ip: 6.6.6.6\r\nproxy-authorization: Basic c2VjcmV0\r\n"
        "te: trailers\r\nkeep-alive: timeout=5\r\nx-request-id: client-id\r\n"
        "connection: X-Secret-Hop\r\nx-secret-hop: 1\r\nX-Kept: yes\r\n"
    )
    raw = await send(proxy, "/svc/h", via, sent)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:300]
    lines = upstream_head(rec)
    names = [line.partition(b":")[0].lower() for line in lines[1:]]
    for gone in (b"forwarded", b"x-real-ip", b"proxy-authorization", b"te", b"keep-alive"):
        assert gone not in names, lines
    assert b"x-secret-hop" not in names
    assert b"connection" not in names
    assert header_values(lines, b"Host") == [up.raw_authority.encode()]
    assert header_values(lines, b"X-Forwarded-For") == [b"127.0.0.1"]
    assert header_values(lines, b"X-Forwarded-Proto") == [b"http"]
    assert header_values(lines, b"X-Forwarded-Host") == [b"front.example"]
    assert header_values(lines, b"X-Request-Id") == [b"client-id"]
    assert header_values(lines, b"X-Kept") == [b"yes"]


def test_route_drop_set_matches_any_case() -> None:
    incoming = CIMultiDictProxy(CIMultiDict([("x-api-key", "client-key"), ("X-Kept", "1")]))
    out = request_headers(
        incoming, peer="10.0.0.1", scheme="http", trusted_hop=False, drop=frozenset({"X-Api-Key"})
    )
    assert "X-Api-Key" not in out
    assert out["X-Kept"] == "1"


@pytest.mark.parametrize("via", PATHS)
async def test_lowercase_upstream_framing_and_hop_headers_are_not_relayed(
    via: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    rec.response = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-up-hop\r\nx-up-hop: 1\r\n"
        b"keep-alive: timeout=5\r\nx-kept: yes\r\n\r\nok"
    )
    proxy = await start_proxy(svc_config(up))
    raw = await send(proxy, "/svc/r", via)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert header_values(lines, b"Content-Length") == [b"2"]
    assert header_values(lines, b"x-up-hop") == []
    assert header_values(lines, b"keep-alive") == []
    assert header_values(lines, b"x-kept") == [b"yes"]
    assert body == b"ok"


async def test_lowercase_upstream_chunked_is_not_announced_to_a_1_0_client(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy
) -> None:
    rec, up = recorder
    rec.response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    proxy = await start_proxy(svc_config(up))
    raw = await raw_exchange(proxy.port, raw_request("/svc/c", version="1.0"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n"), raw[:300]
    assert header_values(head.split(b"\r\n"), b"Transfer-Encoding") == []
    assert body == b"abc"  # close-delimited: the client reads it as sent
