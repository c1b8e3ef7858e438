"""A reload applies what it can and names what only a restart applies; nothing is ignored."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.config import parse_config
from proxy.problems import ConfigError
from proxy.serving import load_for_run
from proxy.startonly import check_exposure, keep_running, restart_needed
from tests.conftest import StartProxy
from tests.helpers import Echo
from tests.test_cli import Running, running  # noqa: F401  (fixture)

BASE = "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1:9/'}\n"


def test_start_only_changes_are_named_by_key_path() -> None:
    old = parse_config(BASE, "routes.yaml", {}, None).config
    new = parse_config(
        "listen: {host: localhost, port: 9000}\nadmin: {port: 9001}\n"
        "limits: {max_connections: 5, header_timeout: 3, max_body: 10}\ntrust_env: false\n" + BASE,
        "routes.yaml",
        {},
        None,
    ).config
    assert restart_needed(old, new) == [
        "listen.host",
        "listen.port",
        "admin",
        "trust_env",
        "limits.header_timeout",
        "limits.max_connections",
    ]
    assert restart_needed(old, old) == []


def test_a_reload_runs_the_old_listener_values_and_the_new_body_limit() -> None:
    old = parse_config(BASE, "routes.yaml", {}, None).config
    new = parse_config(
        "listen: {port: 9000}\nlimits: {max_connections: 5, max_body: 10}\n" + BASE,
        "routes.yaml",
        {},
        None,
    ).config
    kept = keep_running(old, new)
    assert kept.listen == old.listen
    assert kept.limits.max_connections == old.limits.max_connections
    assert kept.limits.max_body == 10


def test_a_reload_cannot_open_the_running_listener(tmp_path: Path) -> None:
    """Running on 0.0.0.0 with keys, a file moved to loopback without keys would leave the
    open port without keys: the listener that stays up is the one checked."""
    with_token = (
        "providers:\n  p: {grant: static, token: t0ken}\n"
        "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1:9/', provider: p}\n"
    )
    running_cfg = parse_config(
        "listen: {host: 0.0.0.0}\nclients:\n  - {id: c, key: k3y}\n" + with_token,
        "routes.yaml",
        {},
        tmp_path,
    ).config
    new = parse_config(with_token, "routes.yaml", {}, tmp_path)
    check_exposure(new)  # fine on its own: loopback
    new.config = keep_running(running_cfg, new.config)
    with pytest.raises(ConfigError) as err:
        check_exposure(new)
    assert err.value.path == "listen.host"


async def test_admin_reload_answers_which_keys_need_a_restart(
    start_proxy: StartProxy,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, up = echo
    good = f"admin: {{port: 0}}\nroutes:\n  - {{prefix: /a/, upstream: '{up}/'}}\n"
    proxy = await start_proxy(good)
    assert proxy.admin_url is not None
    file = tmp_path / "routes.yaml"
    file.write_text("listen: {port: 1}\nlimits: {max_headers: 7, max_body: 4}\n" + good)
    proxy.runtime.reloader = lambda: asyncio.to_thread(load_for_run, str(file), None, None)
    async with client.post(proxy.admin_url / "-" / "reload") as r:
        assert r.status == 200
        assert (await r.json())["restart_needed"] == ["listen.port", "limits.max_headers"]
    async with client.post(proxy.url / "a" / "x", data=b"12345") as r:
        assert r.status == 413  # max_body is applied by the reload
    async with client.get(proxy.url / "a" / "x") as r:
        assert r.status == 200  # still served where it listened
    assert proxy.runtime.loaded.config.listen.port != 1
    assert proxy.runtime.loaded.config.limits.max_headers == 100
    assert "restart needed for listen.port" in capsys.readouterr().out


async def test_sighup_logs_restart_needed_for_a_changed_listener(
    running: tuple[object, Path],  # noqa: F811
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
) -> None:
    start, file = running
    _, up = echo
    file.write_text(f"routes:\n  - prefix: /a/\n    upstream: {up}/\n")
    r: Running = await start()  # type: ignore[operator]
    file.write_text(f"listen: {{host: localhost}}\nroutes:\n  - prefix: /b/\n    upstream: {up}/\n")
    r.proc.send_signal(signal.SIGHUP)
    line = await r.read_until("restart needed for listen.host")
    assert line["key_path"] == "listen.host" and line["level"] == "warning"
    async with client.get(r.url / "b" / "x") as resp:
        assert resp.status == 200  # the routes were applied
