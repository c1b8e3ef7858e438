"""The process's replay budgets (``limits.replay_memory``, ``limits.replay_disk``): however
many uploads are in flight, the bodies kept for a replay never hold more than the budgets;
a body past them streams upstream intact but is not replayed on 401."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.config import parse_config
from proxy.forward.exchange import Exchange
from proxy.forward.forwarder import Forwarder
from tests.conftest import Proxy, StartProxy, StartUpstream
from tests.helpers import provider_json
from tests.test_replay import Gatekeeper
from tests.vendors import Simplifi, serve

KIB, MIB = 1024, 1024 * 1024
WAIT = 20.0  # outer bound on any wait: a hang fails, never stalls


@dataclass
class Holder:
    """An upstream that reads each body whole and holds every first attempt until
    ``expected`` have arrived, then answers them 401; a request with another token (a
    replay) is answered 200 at once. Every body's hash is recorded."""

    expected: int
    first_token: str = ""
    held: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    first: dict[str, str] = field(default_factory=dict)  # path -> body hash, first attempt
    replayed: dict[str, str] = field(default_factory=dict)  # path -> body hash, replay

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        digest = hashlib.sha256(await request.read()).hexdigest()
        if not self.first_token:
            self.first_token = auth
        if auth != self.first_token:
            self.replayed[request.path] = digest
            return web.json_response({"sha256": digest})
        self.first[request.path] = digest
        self.held += 1
        if self.held == self.expected:
            self.all_in.set()
        await self.release.wait()
        return web.json_response({"error": "expired"}, status=401)


@dataclass
class Env:
    proxy: Proxy
    holder: Holder
    spool_dir: Path
    done: list[Exchange]
    finished: asyncio.Event

    @property
    def forwarder(self) -> Forwarder:
        forwarder = self.proxy.runtime.forwarder
        assert forwarder is not None
        return forwarder

    def spool_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.spool_dir.rglob("*") if p.is_file())


async def start_env(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    vendor: Simplifi,
    tmp_path: Path,
    *,
    uploads: int,
    memory: str,
    disk: str,
    route_memory: str = "512KiB",
) -> Env:
    holder = Holder(expected=uploads)
    up = await start_upstream(holder.app())
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    proxy = await start_proxy(f"""
spool_dir: {spool_dir}
limits: {{replay_memory: {memory}, replay_disk: {disk}}}
providers:
  v: {provider_json(vendor)}
routes:
  - prefix: /api/
    upstream: {up}/
    provider: v
    replay: {{memory: {route_memory}, max_body: 10MiB}}
    timeout: {{connect: 2, read: {WAIT}}}
""")
    done: list[Exchange] = []
    finished = asyncio.Event()
    observer = proxy.runtime.observer
    original = observer.request_done

    def record(ex: Exchange) -> None:  # called once the exchange, spool included, has ended
        original(ex)
        if ex.path.startswith("/api/"):
            done.append(ex)
            if len(done) == uploads:
                finished.set()

    observer.request_done = record  # type: ignore[method-assign]
    return Env(proxy, holder, spool_dir, done, finished)


def gauges(metrics: str) -> tuple[float, float]:
    """The replay budgets' use as the proxy's own /-/metrics reports it."""
    found = dict(re.findall(r"^(tokenrelay_replay_\w+_bytes) (\S+)$", metrics, re.M))
    return float(found["tokenrelay_replay_memory_bytes"]), float(
        found["tokenrelay_replay_disk_bytes"]
    )


async def chunked(blob: bytes, size: int = 16 * KIB) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


async def run_uploads(
    env: Env, client: aiohttp.ClientSession, blobs: list[bytes], *, via: str
) -> tuple[list[int], tuple[float, float]]:
    """All uploads at once; while the upstream holds them all, the gauges are read and
    checked against the files on disk. Returns each upload's status and those gauges."""
    memory, disk = env.forwarder.memory, env.forwarder.disk

    async def one(i: int, blob: bytes) -> int:
        data = blob if via == "lean" else chunked(blob)
        async with client.post(env.proxy.url / "api" / f"u{i}", data=data) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one(i, b)) for i, b in enumerate(blobs)]
    async with asyncio.timeout(WAIT):
        await env.holder.all_in.wait()
        async with client.get(env.proxy.url / "-" / "metrics") as resp:
            held = gauges(await resp.text())
        assert held == (memory.used, disk.used)
        assert held[1] == env.spool_bytes(), "the disk gauge counts what the files hold"
        env.holder.release.set()
        statuses = await asyncio.gather(*tasks)
        await env.finished.wait()
    return statuses, held


def outcomes(env: Env) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in env.done:
        counts[ex.replay_outcome] = counts.get(ex.replay_outcome, 0) + 1
    return counts


async def assert_all_let_go(env: Env, client: aiohttp.ClientSession) -> None:
    """Every exchange over: nothing held, no spool file left, the gauges back at zero."""
    assert (env.forwarder.memory.used, env.forwarder.disk.used) == (0, 0)
    assert env.spool_bytes() == 0 and not [p for p in env.spool_dir.rglob("*") if p.is_file()]
    async with client.get(env.proxy.url / "-" / "metrics") as resp:
        assert gauges(await resp.text()) == (0.0, 0.0)


def payloads(n: int, size: int) -> list[bytes]:
    rnd = random.Random(size)
    return [rnd.randbytes(size) for _ in range(n)]


async def test_uploads_past_the_budgets_stream_intact_and_only_those_within_are_replayed(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Content-Length bodies (the lean server): each is reserved whole up front, so exactly
    as many as fit are kept, in memory first, then on disk."""
    size, uploads = 300 * KIB, 20
    async with serve(Simplifi()) as vendor:
        env = await start_env(
            start_proxy,
            start_upstream,
            vendor,
            tmp_path,
            uploads=uploads,
            memory="1MiB",
            disk="2MiB",
        )
        blobs = payloads(uploads, size)
        statuses, held = await run_uploads(env, client, blobs, via="lean")
        in_memory, on_disk = MIB // size, 2 * MIB // size
        assert held == (in_memory * size, on_disk * size)
        assert env.forwarder.memory.peak <= MIB and env.forwarder.disk.peak <= 2 * MIB
        sent = {f"/u{i}": hashlib.sha256(b).hexdigest() for i, b in enumerate(blobs)}
        assert env.holder.first == sent, "every upload reached the upstream intact"
        replayed = {p for p, s in enumerate(statuses) if s == 200}
        assert len(replayed) == in_memory + on_disk
        assert statuses.count(401) == uploads - len(replayed), "the vendor's 401, unreplayed"
        assert env.holder.replayed == {f"/u{i}": sent[f"/u{i}"] for i in replayed}
        assert outcomes(env) == {"succeeded": len(replayed), "budget": uploads - len(replayed)}
        metrics = env.proxy.runtime.observer.render()[0].decode()
        line = 'tokenrelay_replays_total{outcome="budget",route="/api/"}'
        assert f"{line} {float(uploads - len(replayed))}" in metrics
        assert vendor.calls["token"] == 2
        await assert_all_let_go(env, client)


async def test_chunked_uploads_never_hold_more_than_the_budgets(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Chunked bodies (aiohttp's server): no length to reserve, so each chunk is; a body
    whose next chunk fits neither budget stops being kept and streams on."""
    size, uploads = 300 * KIB, 20
    async with serve(Simplifi()) as vendor:
        env = await start_env(
            start_proxy,
            start_upstream,
            vendor,
            tmp_path,
            uploads=uploads,
            memory="1MiB",
            disk="2MiB",
        )
        blobs = payloads(uploads, size)
        statuses, held = await run_uploads(env, client, blobs, via="aiohttp")
        assert held[0] <= MIB and held[1] <= 2 * MIB
        assert env.forwarder.memory.peak <= MIB and env.forwarder.disk.peak <= 2 * MIB
        sent = {f"/u{i}": hashlib.sha256(b).hexdigest() for i, b in enumerate(blobs)}
        assert env.holder.first == sent, "every upload reached the upstream intact"
        replayed = [i for i, s in enumerate(statuses) if s == 200]
        assert len(replayed) * size <= 3 * MIB < uploads * size
        assert sorted(statuses) == [200] * len(replayed) + [401] * (uploads - len(replayed))
        assert env.holder.replayed == {f"/u{i}": sent[f"/u{i}"] for i in replayed}
        assert outcomes(env) == {
            k: v
            for k, v in {"succeeded": len(replayed), "budget": uploads - len(replayed)}.items()
            if v
        }
        await assert_all_let_go(env, client)


async def test_small_bodies_read_whole_count_against_the_memory_budget(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Content-Length bodies of at most 64 KiB are read whole before the upstream is asked
    (chunked ones never are); with room for one, the others stream, and with no disk
    budget they are not kept for a replay."""
    size, uploads = 60 * KIB, 3
    async with serve(Simplifi()) as vendor:
        env = await start_env(
            start_proxy,
            start_upstream,
            vendor,
            tmp_path,
            uploads=uploads,
            memory="100KiB",
            disk="0",
        )
        blobs = payloads(uploads, size)
        statuses, held = await run_uploads(env, client, blobs, via="lean")
        assert held == (size, 0)
        assert sorted(statuses) == [200, 401, 401]
        sent = {f"/u{i}": hashlib.sha256(b).hexdigest() for i, b in enumerate(blobs)}
        assert env.holder.first == sent
        assert outcomes(env) == {"succeeded": 1, "budget": 2}
        await assert_all_let_go(env, client)


async def test_a_spool_is_let_go_once_the_answer_is_no_401(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A replay can only follow a 401: a body answered otherwise gives its budget and file
    back before the answer streams to the client, however long that takes."""
    gate: asyncio.Queue[bytes | None] = asyncio.Queue()
    head_sent = asyncio.Event()

    async def download(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        await resp.prepare(request)
        head_sent.set()
        while (item := await gate.get()) is not None:
            await resp.write(item)
        return resp

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", download)
    up = await start_upstream(app)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    async with serve(Simplifi()) as vendor:
        proxy = await start_proxy(f"""
spool_dir: {spool_dir}
limits: {{replay_memory: 1MiB, replay_disk: 4MiB}}
providers:
  v: {provider_json(vendor)}
routes:
  - {{prefix: /api/, upstream: "{up}/", provider: v, replay: {{memory: 64KiB}}}}
""")
        forwarder = proxy.runtime.forwarder
        assert forwarder is not None
        blob = random.Random(1).randbytes(MIB)
        async with client.post(proxy.url / "api" / "x", data=blob) as resp:
            assert resp.status == 200
            await head_sent.wait()
            assert forwarder.disk.peak == MIB, "the body was kept while no answer had come"
            await gate.put(b"first part")
            assert await resp.content.readexactly(10) == b"first part"
            assert (forwarder.memory.used, forwarder.disk.used) == (0, 0)
            assert not [p for p in spool_dir.rglob("*") if p.is_file()]
            await gate.put(None)
            assert await resp.read() == b""


async def test_a_reload_resizes_the_budgets(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    gate = Gatekeeper(reject_first=2)  # the first two tokens are refused
    up = await start_upstream(gate.app())
    async with serve(Simplifi()) as vendor:

        def text(memory: str) -> str:
            return f"""
limits: {{replay_memory: {memory}, replay_disk: 0}}
providers:
  v: {provider_json(vendor)}
routes:
  - {{prefix: /api/, upstream: "{up}/", provider: v}}
"""

        proxy = await start_proxy(text("0"))
        blob = random.Random(2).randbytes(100 * KIB)
        async with client.post(proxy.url / "api" / "x", data=blob) as resp:
            assert resp.status == 401, "no budget: the vendor's 401, unreplayed"

        async def reloader() -> object:
            return parse_config(text("1MiB"), "test.yaml", {})

        proxy.runtime.reloader = reloader  # type: ignore[assignment]
        await proxy.runtime.reload()
        async with client.post(proxy.url / "api" / "x", data=blob) as resp:
            assert resp.status == 200, "room now: replayed with a fresh token"
            assert (await resp.json())["sha256"] == hashlib.sha256(blob).hexdigest()
        assert [n for _, _, n in gate.seen] == [len(blob)] * 3
        forwarder = proxy.runtime.forwarder
        assert forwarder is not None and forwarder.memory.limit == MIB
