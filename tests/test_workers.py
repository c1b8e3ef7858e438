"""``--workers N`` as a user runs it: real processes sharing one port and one token."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import parse_config
from proxy.problems import TokenError
from proxy.tokens.registry import TokenRegistry
from proxy.workers import (
    BROKER_PREFIX,
    WORKER_HEADER,
    BrokerClient,
    BrokeredRegistry,
    Supervisor,
    remove_stale_brokers,
)
from tests.helpers import provider_json
from tests.vendors import Events, FakeClock, Simplifi, serve

Line = dict[str, object]


class Cluster:
    """A ``--workers`` parent; its stderr (its own and its workers' lines) is read throughout,
    so a full pipe never stalls a worker."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[Line] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())
        self.url = URL()
        self.admin = URL()

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"event": "text", "text": raw.decode(errors="replace")})
            self._arrived.set()
        self._arrived.set()

    async def wait_for(self, test: Callable[[list[Line]], bool], what: str) -> None:
        async with asyncio.timeout(20):
            while not test(self.lines):
                if self._reader.done():
                    raise AssertionError(f"parent's stderr ended before {what}: {self.lines}")
                self._arrived.clear()
                await self._arrived.wait()

    def events(self, event: str) -> list[Line]:
        return [line for line in self.lines if line.get("event") == event]

    async def count(self, event: str, n: int) -> list[Line]:
        await self.wait_for(lambda _: len(self.events(event)) >= n, f"{n} x {event}")
        return self.events(event)

    def live_workers(self) -> dict[int, int]:
        """index -> pid, from the latest "listening" line of each worker."""
        return {int(str(ln["worker"])): int(str(ln["pid"])) for ln in self.events("listening")}


@pytest.fixture
async def vendor() -> AsyncIterator[Simplifi]:
    async with serve(Simplifi()) as v:
        yield v


@pytest.fixture
async def cluster(tmp_path: Path, vendor: Simplifi) -> AsyncIterator[Cluster]:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(config(vendor, "/s/"))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(cfg), "--port", "0", "--workers", "3"),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    c = Cluster(proc)
    started = (await c.count("started workers", 1))[0]
    c.url = URL(f"http://127.0.0.1:{started['port']}")
    c.admin = URL(f"http://127.0.0.1:{started['admin_port']}")
    await c.count("listening", 3)
    yield c
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    c._reader.cancel()
    shutil.rmtree(Path(str(started["broker"])).parent, ignore_errors=True)  # a killed parent's


def config(vendor: Simplifi, prefix: str) -> str:
    return (
        f"providers:\n  s: {provider_json(vendor)}\n"
        f'routes:\n  - {{prefix: {prefix}, upstream: "{vendor.url}/", provider: s}}\n'
        "shutdown_grace: 5\nadmin: {host: 127.0.0.1, port: 0}\n"
    )


async def fire(url: URL, n: int) -> list[int]:
    """``n`` GETs, each on a fresh connection so the kernel spreads them over the workers."""
    connector = aiohttp.TCPConnector(force_close=True, limit=20)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.get(url) as resp:
                body = await resp.json()
                assert resp.status == 200, body
                return int(body["token_serial"])

        return await asyncio.gather(*(one() for _ in range(n)))


async def workers_answering(c: Cluster, n: int = 30) -> set[str]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        seen = set()
        for _ in range(n):
            async with session.get(c.admin / "-" / "health") as resp:
                seen.add(resp.headers[WORKER_HEADER])
        return seen


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def exited(pid: int) -> None:
    """Wait (event driven, via a pidfd) until ``pid`` is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, gone.set)
    try:
        async with asyncio.timeout(20):
            await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_workers_share_one_token_and_one_renewal(cluster: Cluster, vendor: Simplifi) -> None:
    assert len(await workers_answering(cluster)) >= 2
    api = cluster.url / "s" / "api" / "items"
    assert set(await fire(api, 300)) == {1}
    assert vendor.calls["token"] == 1
    vendor.revoke_all()  # every worker's copy now gets 401: they must share one renewal
    assert set(await fire(api, 300)) == {2}
    assert vendor.calls["token"] == 2


async def test_sigterm_stops_everyone_and_removes_the_broker(cluster: Cluster) -> None:
    broker = Path(str(cluster.events("started workers")[0]["broker"]))
    assert mode(broker.parent) == 0o700
    assert mode(broker) == 0o600
    pids = cluster.live_workers().values()
    cluster.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(cluster.proc.wait(), 20) == 0
    assert not broker.parent.exists()
    for pid in pids:
        await exited(pid)
    assert len(cluster.events("stopped")) == 4  # three workers and the parent


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_broker_directories_of_dead_parents_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{BROKER_PREFIX}{dead_pid()}-abc"
    (dead / "sub").mkdir(parents=True)
    (dead / "broker.sock").write_text("")
    live = tmp_path / f"{BROKER_PREFIX}{os.getpid()}-def"
    live.mkdir()
    unnamed = tmp_path / f"{BROKER_PREFIX}oldstyle"  # no pid in the name: not ours to judge
    unnamed.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / f"{BROKER_PREFIX}{dead_pid()}-link"
    link.symlink_to(target)
    assert remove_stale_brokers(tmp_path) == [dead]
    assert not dead.exists()
    assert live.is_dir() and unnamed.is_dir() and link.is_symlink() and target.is_dir()


async def test_a_parent_removes_a_dead_parents_broker_at_start_and_its_own_at_exit(
    vendor: Simplifi,
) -> None:
    """What ``kill -9`` of a parent leaves behind is cleaned by the next start."""
    tmp = Path(tempfile.mkdtemp())  # short: a Unix socket path must fit in 108 bytes
    try:
        stale = tmp / f"{BROKER_PREFIX}{dead_pid()}-stale"
        stale.mkdir()
        live = tmp / f"{BROKER_PREFIX}{os.getpid()}-live"
        live.mkdir()
        cfg = tmp / "routes.yaml"
        cfg.write_text(config(vendor, "/s/"))
        argv = ("-m", "proxy", "--config", str(cfg), "--port", "0", "--workers", "2")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
        c = Cluster(proc)
        try:
            [removed] = await c.count("removed stale broker directory", 1)
            started = (await c.count("started workers", 1))[0]
            broker = Path(str(started["broker"]))
            assert removed["path"] == str(stale) and not stale.exists()
            assert live.is_dir()
            assert broker.parent.parent == tmp
            assert broker.parent.name.startswith(f"{BROKER_PREFIX}{proc.pid}-")
            await c.count("listening", 2)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            assert not broker.parent.exists()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            c._reader.cancel()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def test_a_dead_worker_is_replaced_and_gets_the_shared_token(
    cluster: Cluster, vendor: Simplifi
) -> None:
    await fire(cluster.url / "s" / "api" / "x", 30)
    os.kill(cluster.live_workers()[1], signal.SIGKILL)
    died = (await cluster.count("worker died", 1))[0]
    assert died["worker"] == 1
    await cluster.count("listening", 4)
    assert set(await fire(cluster.url / "s" / "api" / "x", 60)) == {1}
    assert vendor.calls["token"] == 1


async def test_sighup_or_admin_reload_reloads_parent_and_workers_keeping_the_token(
    cluster: Cluster, vendor: Simplifi, tmp_path: Path
) -> None:
    await fire(cluster.url / "s" / "api" / "x", 30)
    (tmp_path / "routes.yaml").write_text(config(vendor, "/t/"))
    cluster.proc.send_signal(signal.SIGHUP)
    await cluster.count("reloaded", 4)  # the parent's broker, then each worker
    assert set(await fire(cluster.url / "t" / "api" / "x", 60)) == {1}
    async with aiohttp.ClientSession() as session:
        async with session.get(cluster.url / "s" / "api") as resp:
            assert resp.status == 404
        (tmp_path / "routes.yaml").write_text(config(vendor, "/u/"))
        async with session.post(cluster.admin / "-" / "reload") as resp:
            assert resp.status == 200  # one worker answered: the parent and the others follow
        await cluster.count("reloaded", 7)  # parent, the two others; the caller answered above
        assert set(await fire(cluster.url / "u" / "api" / "x", 60)) == {1}
        (tmp_path / "routes.yaml").write_text(config(vendor, "no-slash/"))
        async with session.post(cluster.admin / "-" / "reload") as resp:
            assert resp.status == 422  # the parent refused it: its file and key path come back
            problem = await resp.json()
        assert problem["file"].endswith("routes.yaml") and problem["key_path"].startswith("routes")
        assert set(await fire(cluster.url / "u" / "api" / "x", 20)) == {1}  # nothing changed
    assert vendor.calls["token"] == 1


async def test_workers_leave_when_the_parent_is_killed(cluster: Cluster) -> None:
    pids = cluster.live_workers().values()
    cluster.proc.kill()
    await cluster.proc.wait()
    for pid in pids:
        await exited(pid)


# -- one worker's registry against a real broker, in this process, on an injected clock ------


class Brokered:
    """A broker (the parent's half) on a Unix socket, and one worker's registry using it."""

    def __init__(self, vendor: Simplifi, clock: FakeClock, sock: Path) -> None:
        providers = parse_config(f"providers:\n  s: {provider_json(vendor)}\n").config.providers
        self.session = aiohttp.ClientSession()
        self.parent_events, self.worker_events = Events(), Events()
        parent = TokenRegistry(providers, self.session, clock=clock, on_event=self.parent_events)
        self.sup = Supervisor(parse_config(""), [], "", parent)
        self.broker_calls = 0
        self.sock = sock
        client = BrokerClient(str(sock))
        self.worker = BrokeredRegistry(
            client, providers, self.session, clock=clock, on_event=self.worker_events
        )
        self.runner = web.AppRunner(self.sup.broker_app())

    async def start(self) -> None:
        async def count(_: web.Request, __: web.StreamResponse) -> None:
            self.broker_calls += 1

        self.runner.app.on_response_prepare.append(count)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.sock)).start()

    async def close(self) -> None:
        await self.worker.aclose()
        await self.runner.cleanup()
        await self.session.close()


@pytest.fixture
async def brokered(tmp_path: Path) -> AsyncIterator[tuple[Brokered, Simplifi, FakeClock]]:
    clock = FakeClock()
    async with serve(Simplifi(clock=clock, lifetime=1000)) as vendor:
        b = Brokered(vendor, clock, tmp_path / "b.sock")
        await b.start()
        yield b, vendor, clock
        await b.close()


async def test_worker_asks_the_broker_only_near_expiry_and_backs_off(
    brokered: tuple[Brokered, Simplifi, FakeClock],
) -> None:
    b, vendor, clock = brokered
    src = b.worker.sources["s"]
    first = await asyncio.gather(*(src.token() for _ in range(20)))
    assert {t.value for t in first} == {vendor.issued[0].value}
    for _ in range(50):
        await src.token()
    assert (b.broker_calls, vendor.calls["token"]) == (1, 1)
    clock.advance(950)  # 50 s left: both sides are in the refresh-ahead window (100 s)
    worker_done = b.worker_events.expect("token_refreshed_ahead")
    parent_done = b.parent_events.expect("token_refreshed_ahead")
    assert (await src.token()).value == vendor.issued[0].value
    await worker_done  # with the old token: the broker's refresh was still under way
    await parent_done
    assert (b.broker_calls, vendor.calls["token"]) == (2, 2)
    for _ in range(50):
        assert (await src.token()).value == vendor.issued[0].value
    assert src.state()["state"] == "valid"  # no re-asking per request meanwhile
    clock.advance(30)  # past half of what was left
    worker_done = b.worker_events.expect("token_refreshed_ahead")
    await src.token()
    await worker_done
    assert (await src.token()).value == vendor.issued[1].value
    assert (b.broker_calls, vendor.calls["token"]) == (3, 2)


async def test_broker_refusal_reaches_the_worker_with_its_cooldown(
    brokered: tuple[Brokered, Simplifi, FakeClock],
) -> None:
    b, vendor, _ = brokered
    body = {"error": "invalid_client", "error_description": "bad secret"}
    vendor.fail_next(401, body, endpoint="token")
    src = b.worker.sources["s"]
    with pytest.raises(TokenError) as first:
        await src.token()
    assert first.value.code == "invalid_client"
    with pytest.raises(TokenError) as second:
        await src.token()
    assert second.value.status == 503
    assert second.value.retry_after is not None
    assert vendor.calls["token"] == 1  # the broker's cool-down held; the worker has none
    assert b.broker_calls == 2


async def test_unreachable_broker_is_a_503(tmp_path: Path) -> None:
    loaded = parse_config("providers:\n  p: {grant: static, token: 'SECRET-MARKER-9'}\n")
    async with aiohttp.ClientSession() as session:
        reg = BrokeredRegistry(
            BrokerClient(str(tmp_path / "none")), loaded.config.providers, session
        )
        with pytest.raises(TokenError) as err:
            await reg.sources["p"].token()
        await reg.aclose()
    assert err.value.status == 503
