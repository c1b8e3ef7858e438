"""Secrets and keys rotated on disk are picked up without SIGHUP; a broken file keeps the old."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.app import reload_on_file_change
from proxy.filewatch import FileWatch, watch
from tests.conftest import Proxy, StartProxy, StartUpstream
from tests.helpers import Echo


class Ticks:
    """The watch's sleep: each ``tick()`` lets one look happen, and waits until it is done."""

    def __init__(self) -> None:
        self._go: asyncio.Queue[None] = asyncio.Queue()
        self._done: asyncio.Queue[None] = asyncio.Queue()
        self._first = True

    async def sleep(self, _seconds: float) -> None:
        if not self._first:
            self._done.put_nowait(None)
        self._first = False
        await self._go.get()

    async def tick(self) -> None:
        self._go.put_nowait(None)
        await asyncio.wait_for(self._done.get(), 10)


class Logins:
    """A password-grant token endpoint that records the passwords it was sent."""

    def __init__(self) -> None:
        self.passwords: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.passwords.append(str(form["password"]))
        n = len(self.passwords)
        return web.json_response({"access_token": f"at-{n}", "expires_in": 3600})


def config(idp: URL, up: URL, secret: Path) -> str:
    rotating = {
        "grant": "password",
        "token_url": f"{idp}/token",
        "username": "u",
        "password_file": str(secret),
    }
    fixed = {"grant": "static", "token": "static-token"}
    return (
        f"providers:\n  rot: {json.dumps(rotating)}\n  fixed: {json.dumps(fixed)}\n"
        f"routes:\n  - {{prefix: /r/, upstream: '{up}/', provider: rot}}\n"
        f"  - {{prefix: /f/, upstream: '{up}/', provider: fixed}}\n"
    )


async def started(
    tmp_path: Path, start_proxy: StartProxy, start_upstream: StartUpstream, up: URL
) -> tuple[Proxy, Logins, Path]:
    logins = Logins()
    idp = await start_upstream(logins.app())
    secret = tmp_path / "password"
    secret.write_text("PW-OLD-1\n")
    text = config(idp, up, secret)
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(text)
    proxy = await start_proxy(text)
    from proxy.serving import load_for_run

    proxy.runtime.reloader = lambda: asyncio.to_thread(load_for_run, str(cfg), None, None)
    proxy.runtime.loaded = await proxy.runtime.reloader()
    return proxy, logins, secret


async def test_a_rotated_password_file_rebuilds_only_its_provider(
    tmp_path: Path,
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
) -> None:
    e, up = echo
    proxy, logins, secret = await started(tmp_path, start_proxy, start_upstream, up)
    rt = proxy.runtime
    ticks = Ticks()
    task = asyncio.ensure_future(
        watch(
            lambda: rt.loaded.secret_files,
            lambda changed: reload_on_file_change(rt, changed),
            sleep=ticks.sleep,
        )
    )
    try:
        async with client.get(proxy.url / "r" / "x") as resp:
            assert resp.status == 200
        assert rt.generation is not None
        fixed_before = rt.generation.registry.sources["fixed"]
        await ticks.tick()  # nothing changed: no reload
        assert logins.passwords == ["PW-OLD-1"]
        # Kubernetes style: a new file swapped in under the same name
        new = tmp_path / "password.new"
        new.write_text("PW-NEW-2\n")
        os.replace(new, secret)
        await ticks.tick()
        async with client.get(proxy.url / "r" / "x") as resp:
            assert resp.status == 200
        assert logins.passwords == ["PW-OLD-1", "PW-NEW-2"]  # the old token was dropped
        assert rt.generation.registry.sources["fixed"] is fixed_before
        assert e.seen[-1].header("Authorization") == "Bearer at-2"
        async with client.get(proxy.url / "-" / "metrics") as resp:
            assert "tokenrelay_secret_file_changes_total 1.0" in await resp.text()
        # gone: the reload fails, the running provider keeps its token and password
        secret.unlink()
        await ticks.tick()
        async with client.get(proxy.url / "r" / "x") as resp:
            assert resp.status == 200
        assert logins.passwords == ["PW-OLD-1", "PW-NEW-2"]
        async with client.get(proxy.url / "-" / "metrics") as resp:
            assert 'tokenrelay_config_reload_total{outcome="error"} 1.0' in await resp.text()
        await ticks.tick()  # still gone: said once, not on every look
        async with client.get(proxy.url / "-" / "metrics") as resp:
            assert 'tokenrelay_config_reload_total{outcome="error"} 1.0' in await resp.text()
    finally:
        task.cancel()
    assert "PW-NEW-2" not in proxy.log_text() and "PW-OLD-1" not in proxy.log_text()


def test_the_watch_sees_content_not_timestamps(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("a")
    seen = FileWatch({"providers.p.password_file": f})
    assert seen.changed() == []
    stat = f.stat()
    f.write_text("b")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, other content
    assert seen.changed() == ["providers.p.password_file"]
    assert seen.changed() == []
