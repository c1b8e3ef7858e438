"""Replay once on 401: renew the token and send the same bytes again."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from tests.conftest import Proxy, StartProxy, StartUpstream
from tests.helpers import provider_json
from tests.vendors import FakeClock, Simacan, SimpleDocs, Simplifi, Vendor, serve


@dataclass
class Gatekeeper:
    """An upstream that rejects chosen tokens, reading the body fully or answering early."""

    early: bool = False
    reject_first: int = 1  # how many distinct tokens to reject, in order of arrival
    seen: list[tuple[str, str | None, int]] = field(default_factory=list)
    rejected: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def _verdict(self, auth: str) -> bool:
        if auth in self.rejected:
            return False
        if auth in self.accepted:
            return True
        if len(self.rejected) < self.reject_first:
            self.rejected.add(auth)
            return False
        self.accepted.add(auth)
        return True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if self.early and not self._verdict(auth):
            self.seen.append((auth, None, 0))
            return web.json_response(
                {"error": "expired"}, status=401, headers={"Connection": "close"}
            )
        digest = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            n += len(chunk)
        self.seen.append((auth, digest.hexdigest(), n))
        if not self.early and not self._verdict(auth):
            return web.json_response({"error": "expired"}, status=401)
        return web.json_response({"sha256": digest.hexdigest(), "len": n})


@dataclass
class Env:
    proxy: Proxy
    vendor: Simplifi
    gate: Gatekeeper
    spool_dir: Path


async def env_for(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    vendor: Simplifi,
    tmp_path: Path,
    *,
    early: bool = False,
    replay: str = "{memory: 64KiB, max_body: 4MiB}",
    read: float = 5,
) -> Env:
    gate = Gatekeeper(early=early)
    up = await start_upstream(gate.app())
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    proxy = await start_proxy(f"""
spool_dir: {spool_dir}
providers:
  v: {provider_json(vendor)}
routes:
  - prefix: /api/
    upstream: {up}/
    provider: v
    replay: {replay}
    timeout: {{connect: 2, read: {read}}}
""")
    return Env(proxy, vendor, gate, spool_dir)


def vendor_config(vendor: Vendor, name: str, route_extra: str = "") -> str:
    """One provider for ``vendor`` and one route /name/ to its API."""
    url = vendor.url
    return (
        f"providers:\n  {name}: {provider_json(vendor)}\nroutes:\n"
        f'  - {{prefix: /{name}/, upstream: "{url}/", provider: {name}{route_extra}}}\n'
    )


def spool_files(spool_dir: Path) -> list[Path]:
    return [p for p in spool_dir.rglob("*") if p.is_file()]


async def body_chunks(blob: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


async def test_early_expiry_is_invisible_simacan_refresh(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with serve(Simacan()) as vendor:
        proxy = await start_proxy(vendor_config(vendor, "s"))
        async with client.get(proxy.url / "s" / "api" / "trips") as resp:
            assert resp.status == 200
        vendor.revoke_all()  # the vendor expires the token before expires_in
        async with client.get(proxy.url / "s" / "api" / "trips") as resp:
            assert resp.status == 200
            assert (await resp.json())["token_serial"] == 2
        assert vendor.calls["password"] == 1
        assert vendor.calls["refresh"] == 1
        assert vendor.calls["api"] == 3


async def test_refused_refresh_falls_back_to_password_then_replays(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with serve(Simacan()) as vendor:
        proxy = await start_proxy(vendor_config(vendor, "s"))
        async with client.post(proxy.url / "s" / "api" / "x", data=b"payload") as resp:
            assert resp.status == 200
        vendor.revoke_all()
        vendor.refuse_refresh = True
        async with client.post(proxy.url / "s" / "api" / "x", data=b"payload") as resp:
            assert resp.status == 200
        assert vendor.calls["refresh"] == 1
        assert vendor.calls["password"] == 2


async def test_200_concurrent_401s_one_renewal_all_replayed(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with serve(Simacan()) as vendor:
        proxy = await start_proxy(vendor_config(vendor, "s"))
        async with client.get(proxy.url / "s" / "api" / "warm") as resp:
            assert resp.status == 200
        vendor.revoke_all()

        async def one(i: int) -> int:
            async with client.post(proxy.url / "s" / "api" / f"n{i}", data=f"b{i}") as r:
                body = await r.json()
                assert body["path"].endswith(f"/n{i}")
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses == [200] * 200
        assert vendor.calls["refresh"] == 1
        assert vendor.calls["password"] == 1


async def test_ten_megabytes_replayed_byte_identical(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(
            start_proxy, start_upstream, vendor, tmp_path, replay="{memory: 1MiB, max_body: 20MiB}"
        )
        blob = os.urandom(10 * 1024 * 1024)
        async with client.put(env.proxy.url / "api" / "doc", data=blob) as resp:
            assert resp.status == 200
            assert (await resp.json())["sha256"] == hashlib.sha256(blob).hexdigest()
        (a1, h1, n1), (a2, h2, n2) = env.gate.seen
        assert a1 != a2 and h1 == h2 == hashlib.sha256(blob).hexdigest()
        assert n1 == n2 == len(blob)
        assert vendor.calls["token"] == 2
        assert spool_files(env.spool_dir) == []


async def test_chunked_body_spooled_to_disk_replayed_after_early_401(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(start_proxy, start_upstream, vendor, tmp_path, early=True)
        blob = os.urandom(3 * 1024 * 1024 + 5)  # above memory (64 KiB): spooled to a file
        async with client.post(env.proxy.url / "api" / "up", data=body_chunks(blob)) as resp:
            assert resp.status == 200
            assert (await resp.json()) == {
                "sha256": hashlib.sha256(blob).hexdigest(),
                "len": len(blob),
            }
        assert [s[1] for s in env.gate.seen] == [None, hashlib.sha256(blob).hexdigest()]
        assert spool_files(env.spool_dir) == []


async def test_body_above_max_passes_401_and_next_request_succeeds(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(
            start_proxy, start_upstream, vendor, tmp_path, replay="{memory: 64KiB, max_body: 1MiB}"
        )
        env.gate.reject_first = 2
        blob = os.urandom(2 * 1024 * 1024)
        async with client.post(env.proxy.url / "api" / "big", data=body_chunks(blob)) as resp:
            assert resp.status == 401
            assert await resp.json() == {"error": "expired"}  # as the vendor sent it
        async with client.post(env.proxy.url / "api" / "big", data=blob) as resp:
            assert resp.status == 401  # Content-Length above max: not even spooled
        async with client.get(env.proxy.url / "api" / "small") as resp:
            assert resp.status == 200  # each 401 renewed the token
        assert vendor.calls["token"] == 3
        assert len(env.gate.seen) == 3
        assert spool_files(env.spool_dir) == []
        metrics = env.proxy.runtime.observer.render()[0].decode()
        assert 'tokenrelay_replays_total{outcome="body_too_large",route="/api/"} 2.0' in metrics


async def test_replay_401_again_goes_to_client_once(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(start_proxy, start_upstream, vendor, tmp_path)
        env.gate.reject_first = 10**6
        async with client.post(env.proxy.url / "api" / "x", data=b"abc") as resp:
            assert resp.status == 401
        assert len(env.gate.seen) == 2  # never a loop
        metrics = env.proxy.runtime.observer.render()[0].decode()
        assert 'outcome="unauthorized_again"' in metrics


async def test_403_insufficient_scope_is_never_replayed(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with serve(SimpleDocs()) as vendor:
        proxy = await start_proxy(f"""
providers:
  d: {provider_json(vendor, scope="read")}
routes:
  - {{prefix: /d/, upstream: "{vendor.url}/", provider: d}}
""")
        async with client.post(proxy.url / "d" / "api" / "documents", data=b"{}") as resp:
            assert resp.status == 403
            assert (await resp.json())["type"] == "insufficient_scope"
        assert vendor.calls["token"] == 1
        assert vendor.calls["api"] == 1


async def test_replay_off_passes_401_but_renews(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    async with serve(SimpleDocs(clock=clock)) as vendor:
        proxy = await start_proxy(
            f"""
providers:
  d: {provider_json(vendor)}
routes:
  - {{prefix: /d/, upstream: "{vendor.url}/", provider: d, replay: {{enabled: false}}}}
""",
            clock=clock,
        )
        async with client.get(proxy.url / "d" / "api" / "w") as resp:
            assert resp.status == 200
        vendor.revoke_all()
        async with client.get(proxy.url / "d" / "api" / "w") as resp:
            assert resp.status == 401
            assert (await resp.json())["type"] == "token_expired"
        async with client.get(proxy.url / "d" / "api" / "w") as resp:
            assert resp.status == 200
        assert vendor.calls["token"] == 2


async def test_client_disconnect_mid_body_leaves_no_spool(
    start_proxy: StartProxy, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(start_proxy, start_upstream, vendor, tmp_path)
        done = asyncio.Event()
        observer = env.proxy.runtime.observer
        original = observer.request_done

        def record(ex: object) -> None:
            original(ex)  # type: ignore[arg-type]
            done.set()

        observer.request_done = record  # type: ignore[method-assign]
        _reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
        writer.write(b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = os.urandom(200_000)
        writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        await writer.drain()
        writer.close()  # gone mid-body
        await asyncio.wait_for(done.wait(), 10)
        assert spool_files(env.spool_dir) == []


async def test_stalled_client_after_early_401_meets_read_timeout(
    start_proxy: StartProxy, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(start_proxy, start_upstream, vendor, tmp_path, early=True, read=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
        writer.write(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.split(b" ")[1] in (b"408", b"401")
        assert spool_files(env.spool_dir) == []


async def test_problem_when_no_token_can_be_had(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(Simplifi()) as vendor:
        env = await env_for(start_proxy, start_upstream, vendor, tmp_path)
        vendor.fail_next(401, {"error": "invalid_client"}, times=5)
        async with client.get(env.proxy.url / "api" / "x") as resp:
            assert resp.status == 502
            body = orjson.loads(await resp.read())
        assert body["provider"] == "v"
        assert body["provider_error"] == "invalid_client"
        async with client.get(env.proxy.url / "api" / "x") as resp:
            assert resp.status == 503  # cooling down: the vendor is not asked again
            assert int(resp.headers["Retry-After"]) > 0
        assert vendor.calls["token"] == 1
        assert env.gate.seen == []  # the upstream is never called without a token
        _ = URL
