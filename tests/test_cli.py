"""The command line as a user meets it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy import __version__
from tests.helpers import Echo

PY = sys.executable


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"tokenrelay {__version__}"


@pytest.mark.parametrize(
    ("body", "where", "problem"),
    [
        ("routes:\n  - prefix: /a/\n    upstream: ftp://x/\n", "routes[0].upstream", "http"),
        (
            "routes:\n  - prefix: /a/\n    upstream: http://x/\n    colour: red\n",
            "routes[0].colour",
            "unknown key",
        ),
        (
            "routes:\n  - {prefix: /a/, upstream: 'http://x/'}\n  - {prefix: /a, upstream: 'http://y/'}\n",
            "routes[1].prefix",
            "duplicate prefix",
        ),
        (
            "routes:\n  - {prefix: /a/, upstream: 'http://x/', provider: nope}\n",
            "routes[0].provider",
            "not defined",
        ),
        (
            "providers:\n  p: {grant: static, token: '${TR_TEST_UNSET}'}\n",
            "providers.p.token",
            "TR_TEST_UNSET is not set",
        ),
        ("routes:\n  - {prefix: /-/x/, upstream: 'http://x/'}\n", "routes[0].prefix", "reserved"),
        ("listen: {port: many}\n", "listen.port", "integer"),
        ("routes: [\n", "", "invalid YAML"),
    ],
)
def test_check_names_file_key_and_problem(
    tmp_path: Path, body: str, where: str, problem: str
) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(body)
    out = run_cli("check", "--config", str(cfg))
    assert out.returncode == 2
    assert str(cfg) in out.stderr
    assert where in out.stderr
    assert problem in out.stderr


def test_run_with_invalid_config_starts_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text("routes:\n  - prefix: nope\n    upstream: http://x/\n")
    out = run_cli("--config", str(cfg), "--port", "0")
    assert out.returncode == 2
    assert "routes[0].prefix" in out.stderr


def test_open_listener_with_credentials_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(
        "providers:\n  p: {grant: static, token: 'SECRET-MARKER-1'}\n"
        "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1:9/', provider: p}\n"
    )
    out = run_cli("--config", str(cfg), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2
    assert "allow_unauthenticated" in out.stderr
    assert "SECRET-MARKER-1" not in out.stderr + out.stdout
    assert "config error: command line --host: listen.host: listening on 0.0.0.0" in out.stderr
    cfg.write_text("listen: {host: 0.0.0.0}\n" + cfg.read_text())
    out = run_cli("--config", str(cfg), "--port", "0")
    assert f"config error: {cfg}: listen.host: listening on 0.0.0.0" in out.stderr


def test_check_accepts_the_shipped_config() -> None:
    out = run_cli("check", "--config", "routes.yaml")
    assert out.returncode == 0, out.stderr
    assert "route /demo/" in out.stdout
    assert "waits for SIMACAN_USERNAME, SIMACAN_PASSWORD" in out.stdout


class Running:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, object]] = []
        self.url = URL()

    async def read_until(self, event: str) -> dict[str, object]:
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"process ended before {event!r}: {self.lines}")
                try:
                    line: dict[str, object] = json.loads(raw)
                except ValueError:
                    continue
                self.lines.append(line)
                if line.get("event") == event:
                    return line


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Running, Path]]:
    cfg = tmp_path / "routes.yaml"
    procs: list[Running] = []

    async def start() -> Running:
        proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "proxy",
            "--config",
            str(cfg),
            "--port",
            "0",
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        r = Running(proc)
        line = await r.read_until("listening")
        r.url = URL(str(line["address"]))
        procs.append(r)
        return r

    yield start, cfg  # type: ignore[misc]
    for r in procs:
        if r.proc.returncode is None:
            r.proc.kill()
            await r.proc.wait()


async def test_sigterm_lets_inflight_stream_finish(
    running: tuple[object, Path], echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    start, cfg = running
    e, up = echo
    cfg.write_text(f"routes:\n  - prefix: /svc/\n    upstream: {up}/\nshutdown_grace: 20\n")
    r: Running = await start()  # type: ignore[operator]
    resp = await client.get(r.url / "svc" / "gate")
    await e.stream_gate.put(b"first;")
    assert await resp.content.readexactly(6) == b"first;"
    r.proc.send_signal(signal.SIGTERM)
    await r.read_until("shutting down")
    await e.stream_gate.put(b"second;")
    await e.stream_gate.put(None)
    assert await resp.content.read() == b"second;"
    assert await asyncio.wait_for(r.proc.wait(), 20) == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.get(r.url / "svc" / "x")


async def test_sighup_swaps_routes_and_keeps_them_on_a_bad_config(
    running: tuple[object, Path], echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    start, cfg = running
    _, up = echo
    cfg.write_text(f"routes:\n  - prefix: /a/\n    upstream: {up}/\n")
    r: Running = await start()  # type: ignore[operator]
    started = next(line for line in r.lines if line["event"] == "listening")
    assert started["pid"] == r.proc.pid and started["version"] == __version__
    async with client.get(r.url / "a" / "x") as resp:
        assert resp.status == 200
    cfg.write_text(f"routes:\n  - prefix: /b/\n    upstream: {up}/\n")
    r.proc.send_signal(signal.SIGHUP)
    await r.read_until("reloaded")
    async with client.get(r.url / "b" / "x") as resp:
        assert resp.status == 200
    async with client.get(r.url / "a" / "x") as resp:
        assert resp.status == 404
    cfg.write_text("routes:\n  - prefix: /c/\n    upstream: nope\n")
    r.proc.send_signal(signal.SIGHUP)
    line = await r.read_until("reload failed, config unchanged")
    assert line["key_path"] == "routes[0].upstream"
    assert line["file"] == str(cfg)
    async with client.get(r.url / "b" / "x") as resp:
        assert resp.status == 200
    async with client.get(r.url / "-" / "metrics") as resp:
        text = await resp.text()
    assert 'tokenrelay_config_reload_total{outcome="error"} 1.0' in text


async def test_token_command_prints_type_scope_expiry_redacted(tmp_path: Path) -> None:
    from tests.helpers import provider_json
    from tests.vendors import SimpleDocs, serve

    async with serve(SimpleDocs()) as vendor:
        cfg = tmp_path / "routes.yaml"
        cfg.write_text(f"providers:\n  docs: {provider_json(vendor)}\n")
        proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "proxy",
            "token",
            "docs",
            "--config",
            str(cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode() + err.decode()
    assert proc.returncode == 0, text
    assert "token_type: Bearer" in text
    assert "scope:      read write" in text
    assert "expires_in: 7200 s" in text or "expires_in: 7199 s" in text
    for secret in vendor.secret_values():
        assert secret not in text


def test_hash_key_prints_a_key_sha256_that_lets_the_key_in(tmp_path: Path) -> None:
    import hashlib

    out = subprocess.run(
        [PY, "-m", "proxy", "hash-key"], input="KEY-MARKER-7\n", capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256(b"KEY-MARKER-7").hexdigest()
    assert out.stdout == f"key_sha256: {digest}\n"
    assert "KEY-MARKER-7" not in out.stdout + out.stderr
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(f"clients:\n  - {{id: bi, key_sha256: {digest}}}\n")
    from proxy.access import ClientAccess
    from proxy.config import load_config

    access = ClientAccess(load_config(cfg).config.clients)
    assert access.check({"X-Api-Key": "KEY-MARKER-7"}, "/", "X-Api-Key") == "bi"


def test_hash_key_refuses_an_empty_key() -> None:
    out = subprocess.run([PY, "-m", "proxy", "hash-key"], input="", capture_output=True, text=True)
    assert out.returncode == 2
    assert "no key on stdin" in out.stderr


def test_check_refuses_a_plain_http_token_url_to_a_remote_host(tmp_path: Path) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(
        "providers:\n  p: {grant: client_credentials, token_url: 'http://idp.example.com/token',"
        " client_id: c, client_secret: 'CS-MARKER-3'}\n"
    )
    out = run_cli("check", "--config", str(cfg))
    assert out.returncode == 2
    assert "providers.p.token_url: plain http to idp.example.com" in out.stderr
    assert "CS-MARKER-3" not in out.stderr + out.stdout
