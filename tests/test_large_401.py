"""A first 401 too large to hold for a replay reaches the client as the vendor sent it.

A 401 without a Content-Length (chunked, or read until the close) is read into memory for
the replay only up to MAX_401_BODY. Past that the proxy stops holding it and relays it
instead: the bytes already read, then the rest streamed. The token is still renewed, so
the next request succeeds; this one is not replayed. An upstream that dies mid-way through
such a body cuts the client's connection, never a silently short 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import RUNTIME
from proxy.forward.forwarder import MAX_401_BODY
from tests.conftest import StartUpstream
from tests.helpers import OwnProxy, own_proxy, provider_json
from tests.vendors import Simplifi, serve

WAIT = 10.0  # outer bound on any single wait: a hang fails, never stalls the suite
BLOB = random.Random(401).randbytes(200 * 1024)  # distinctive, incompressible
SMALL = b'{"error": "invalid_token", "detail": "' + b"x" * 1000 + b'"}'
CHALLENGE = 'Bearer realm="api", error="invalid_token"'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Vault:
    """An aiohttp upstream that answers the first token it sees with a chunked 401 of
    ``body`` (written in pieces, no Content-Length) and every other token with 200."""

    body: bytes = BLOB
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # path, token, body sha
    rejected: str | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        self.seen.append((request.path, auth, sha(await request.read())))
        if self.rejected is None:
            self.rejected = auth
        if auth != self.rejected:
            return web.json_response({"path": request.path})
        headers = {"WWW-Authenticate": CHALLENGE, "Content-Type": "application/octet-stream"}
        resp = web.StreamResponse(status=401, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(self.body), 16 * 1024):
            await resp.write(self.body[i : i + 16 * 1024])
        await resp.write_eof()
        return resp


@dataclass
class RawVendor:
    """A raw upstream whose first answer is ``first`` as bytes: after it the connection is
    closed (the end of a read-until-close body) or, with ``hang``, held until ``die`` is
    set and then closed (a body cut mid-way). Later requests get a 200."""

    first: bytes
    hang: bool = False
    die: asyncio.Event = field(default_factory=asyncio.Event)
    heads: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(self.first if len(self.heads) == 1 else OK)
            await writer.drain()
            if self.hang and len(self.heads) == 1:
                await self.die.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


@contextlib.asynccontextmanager
async def serve_raw(up: RawVendor) -> AsyncIterator[URL]:
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    try:
        yield URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    finally:
        up.die.set()
        server.close()
        await asyncio.gather(*up.tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.fixture
async def vendor() -> AsyncIterator[Simplifi]:
    async with serve(Simplifi()) as v:
        yield v


@contextlib.asynccontextmanager
async def proxy_to(up: URL, vendor: Simplifi, tmp_path: Path) -> AsyncIterator[OwnProxy]:
    """The proxy with one replaying route /api/ to ``up``, its tokens from ``vendor``."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    async with own_proxy(
        f"""
spool_dir: {spool}
providers:
  v: {provider_json(vendor)}
routes:
  - prefix: /api/
    upstream: {up}/
    provider: v
    timeout: {{connect: 2, read: {WAIT}}}
""",
        tmp_path,
    ) as proxy:
        yield proxy


def url(proxy: OwnProxy, path: str) -> URL:
    return URL(f"http://127.0.0.1:{proxy.port}{path}")


def replays_counted(proxy: OwnProxy) -> float:
    """Replays of any outcome the metrics counted on /api/."""
    text = proxy.app[RUNTIME].observer.render()[0].decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("tokenrelay_replays_total{")]
    assert lines  # the family is there: a zero below means nothing was counted
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if 'route="/api/"' in ln)


async def body_chunks(blob: bytes, size: int = 32 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


async def assert_renewed(
    proxy: OwnProxy, client: aiohttp.ClientSession, vendor: Simplifi, status_body: bytes
) -> None:
    """The rejected token was dropped: the next request fetches a new one and succeeds."""
    assert vendor.calls["token"] == 1  # no fresh token was fetched: no replay was made
    async with client.get(url(proxy, "/api/next")) as resp:
        assert resp.status == 200
        assert status_body in await resp.read()
    assert vendor.calls["token"] == 2


# --- a 401 too large to hold is relayed as sent


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_large_chunked_401_is_passed_on_as_sent(
    method: str,
    start_upstream: StartUpstream,
    vendor: Simplifi,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    vault = Vault()
    up = await start_upstream(vault.app())
    sent = os.urandom(300 * 1024) if method == "POST" else b""  # POST: a spooled body
    async with proxy_to(up, vendor, tmp_path) as proxy:
        data = body_chunks(sent) if sent else None
        async with client.request(method, url(proxy, "/api/doc"), data=data) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == CHALLENGE
            assert resp.headers["Content-Type"] == "application/octet-stream"
            assert sha(await resp.read()) == sha(BLOB)
        assert [s[0] for s in vault.seen] == ["/doc"]  # not replayed
        assert vault.seen[0][2] == sha(sent)
        line = await proxy.logs.access_line("/api/doc")
        assert (line["status"], line["upstream_status"]) == (401, 401)
        assert (line["replayed"], line["replay_outcome"], line["error"]) == (
            False,
            "response_too_large",
            "",
        )
        assert line["bytes_out"] == len(BLOB)
        await assert_renewed(proxy, client, vendor, b"/next")
        assert vault.seen[1][1] != vault.seen[0][1]
        assert replays_counted(proxy) == 1


async def test_large_close_delimited_401_is_passed_on_as_sent(
    vendor: Simplifi, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    head = f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {CHALLENGE}\r\n"
    first = (head + "Connection: close\r\n\r\n").encode() + BLOB  # no length: ends at close
    up = RawVendor(first)
    async with serve_raw(up) as up_url, proxy_to(up_url, vendor, tmp_path) as proxy:
        async with client.get(url(proxy, "/api/doc")) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == CHALLENGE
            assert sha(await resp.read()) == sha(BLOB)
        assert len(up.heads) == 1  # not replayed
        line = await proxy.logs.access_line("/api/doc")
        assert (line["replayed"], line["error"], line["bytes_out"]) == (False, "", len(BLOB))
        await assert_renewed(proxy, client, vendor, b"ok")
        tokens = [h.split(b"Authorization: ")[1].split(b"\r\n")[0] for h in up.heads]
        assert tokens[0] != tokens[1]


# --- a 401 small enough to hold is still replayed


async def test_small_chunked_401_is_still_replayed(
    start_upstream: StartUpstream,
    vendor: Simplifi,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    vault = Vault(body=SMALL)
    up = await start_upstream(vault.app())
    async with proxy_to(up, vendor, tmp_path) as proxy:
        async with client.get(url(proxy, "/api/doc")) as resp:
            assert resp.status == 200
            assert await resp.json() == {"path": "/doc"}
        assert [s[0] for s in vault.seen] == ["/doc", "/doc"]
        assert vault.seen[0][1] != vault.seen[1][1]
        line = await proxy.logs.access_line("/api/doc")
        assert (line["replayed"], line["replay_outcome"]) == (True, "succeeded")
        assert vendor.calls["token"] == 2


# --- an upstream that dies mid-body


def chunked_401(size: int) -> bytes:
    """A chunked 401's head and ``size`` bytes of its body, never its last chunk."""
    head = f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {CHALLENGE}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n"
    return head.encode() + b"%x\r\n%s\r\n" % (size, BLOB[:size])


async def test_upstream_dying_mid_large_401_cuts_the_client(
    vendor: Simplifi, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    up = RawVendor(chunked_401(MAX_401_BODY + 32 * 1024), hang=True)
    async with serve_raw(up) as up_url, proxy_to(up_url, vendor, tmp_path) as proxy:
        async with client.get(url(proxy, "/api/doc")) as resp:
            assert resp.status == 401  # the head is out: only a cut can tell the client
            up.die.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        line = await proxy.logs.access_line("/api/doc")
        assert (line["error"], line["upstream_error"]) == ("upstream_aborted", "reset")
        assert line["replayed"] is False
        await assert_renewed(proxy, client, vendor, b"ok")


async def test_upstream_dying_while_401_is_held_is_a_502(
    vendor: Simplifi, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    up = RawVendor(chunked_401(10 * 1024))  # closed within the cap: nothing was relayed yet
    async with serve_raw(up) as up_url, proxy_to(up_url, vendor, tmp_path) as proxy:
        async with client.get(url(proxy, "/api/doc")) as resp:
            assert resp.status == 502
            assert resp.headers["Content-Type"] == "application/problem+json"
        line = await proxy.logs.access_line("/api/doc")
        assert (line["upstream_status"], line["upstream_error"]) == (401, "reset")
        assert len(up.heads) == 1
