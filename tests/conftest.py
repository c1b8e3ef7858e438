"""Shared fixtures: real upstreams and a real proxy on free 127.0.0.1 ports."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import settings
from yarl import URL

from proxy.app import RUNTIME, Runtime, create_admin_app, create_app, start_runner
from proxy.config import Loaded, parse_config
from proxy.observability import Observer
from proxy.tokens.source import Clock, system_clock
from tests.helpers import Echo

# CI replays the same examples on every run, so a stop is never red by the draw; a developer's
# run explores new ones each time, and what it finds is pinned as an explicit case.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@dataclass
class Proxy:
    url: URL
    port: int
    app: web.Application
    logs: io.StringIO
    admin_url: URL | None = None

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    def log_text(self) -> str:
        return self.logs.getvalue()


StartUpstream = Callable[[web.Application], Awaitable[URL]]
StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> URL:
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return URL(f"http://127.0.0.1:{port}")

    yield start
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
async def echo(start_upstream: StartUpstream) -> AsyncIterator[tuple[Echo, URL]]:
    e = Echo()
    url = await start_upstream(e.app())
    yield e, url


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []

    async def start(
        config: str,
        *,
        env: Mapping[str, str] | None = None,
        clock: Clock = system_clock,
        log_format: str = "json",
    ) -> Proxy:
        loaded: Loaded = parse_config(config, "test.yaml", env or {}, tmp_path)
        logs = io.StringIO()
        observer = Observer(log_format, stream=logs)
        cfg = loaded.config
        app = create_app(loaded, observer, clock=clock, admin_on_main=cfg.admin is None)
        runner, port = await start_runner(app, cfg, cfg.listen.model_copy(update={"port": 0}))
        runners.append(runner)
        proxy = Proxy(URL(f"http://127.0.0.1:{port}"), port, app, logs)
        if cfg.admin is not None:
            admin_runner, admin_port = await start_runner(
                create_admin_app(app), cfg, cfg.admin.model_copy(update={"port": 0})
            )
            runners.append(admin_runner)
            proxy.admin_url = URL(f"http://127.0.0.1:{admin_port}")
        return proxy

    yield start
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session, as the token layer is given one."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
