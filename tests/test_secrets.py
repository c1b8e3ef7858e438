"""Marker secrets in the config; every error path driven; no marker anywhere it could leak.

Searched: the proxy's own log stream, everything Python logging caught (aiohttp's server
and access loggers included), every response (heads and bodies), the metrics and admin
pages, and the output of ``tokenrelay check`` and ``tokenrelay token`` run as subprocesses.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from yarl import URL

from tests.conftest import StartProxy, StartUpstream
from tests.helpers import raw_exchange
from tests.vendors import Simacan, serve

CLIENT_SECRET = "MARKER-client-secret-7d1f"
PASSWORD = "MARKER-password-4c2a"
STATIC = "MARKER-static-token-9e3b"
INBOUND = "MARKER-inbound-key-2b8c"
CRLF_TOKEN = "MARKER-crlf-token-5a0d"
MARKERS = (CLIENT_SECRET, PASSWORD, STATIC, INBOUND, CRLF_TOKEN)
ROOT = Path(__file__).resolve().parents[1]


def assert_clean(text: str, where: str) -> None:
    for marker in MARKERS:
        assert marker not in text, f"{marker} leaked into {where}"
    assert "MARKER-" not in text, f"a marker leaked into {where}"


async def hostile_vendor(request: web.Request) -> web.Response:
    """Token endpoints that fail loudly, echoing what they got, as some vendors do."""
    form = await request.post()
    if request.path == "/crlf/token":
        body = {"access_token": CRLF_TOKEN + "\r\nX-Injected: 1", "expires_in": 3600}
        return web.json_response(body)
    echoed = f"internal error for {dict(form)} {request.headers.get('Authorization')}"
    return web.Response(status=500, text=echoed)


async def upstream(request: web.Request) -> web.Response:
    """Answers 401 to everything under /st/401 (never echoing the token), 500 elsewhere."""
    if request.path.startswith("/st/401"):
        return web.Response(status=401, text="token rejected")
    return web.Response(status=500, text="upstream exploded")


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[URL, Path]]:
    """An HTTPS upstream whose certificate the proxy will not trust (wrong CA file)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(ctx)
    wrong_ca = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    app = web.Application()
    app.router.add_route("*", "/{t:.*}", upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    yield URL(f"https://127.0.0.1:{runner.addresses[0][1]}"), wrong_ca
    await runner.cleanup()


def config(sim: Simacan, vendor: URL, up: URL, tls_up: URL, wrong_ca: Path) -> str:
    return f"""
clients:
  - id: app
    key: "{INBOUND}"
providers:
  sim:
    grant: simacan
    token_url: {sim.token_url}
    refresh_url: {sim.refresh_url}
    username: {sim.username}
    password: "{PASSWORD}"
    retry: {{attempts: 1}}
  cc:
    grant: client_credentials
    token_url: {vendor}/cc/token
    client_id: cid
    client_secret: "{CLIENT_SECRET}"
    retry: {{attempts: 1}}
  crlf:
    grant: client_credentials
    token_url: {vendor}/crlf/token
    client_id: cid
    client_secret: "{CLIENT_SECRET}"
  st: {{grant: static, token: "{STATIC}"}}
routes:
  - {{prefix: /sim/, upstream: "{up}/", provider: sim}}
  - {{prefix: /cc/, upstream: "{up}/", provider: cc}}
  - {{prefix: /crlf/, upstream: "{up}/", provider: crlf}}
  - {{prefix: /st/, upstream: "{up}/st/", provider: st}}
  - {{prefix: /gone/, upstream: "http://127.0.0.1:9/", provider: st, timeout: {{connect: 1}}}}
  - prefix: /tls/
    upstream: "{tls_up}/"
    provider: st
    tls: {{ca_file: "{wrong_ca}"}}
"""


async def test_no_secret_leaks_anywhere(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    tls_upstream: tuple[URL, Path],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    vendor_app = web.Application()
    vendor_app.router.add_route("*", "/{t:.*}", hostile_vendor)
    vendor = await start_upstream(vendor_app)
    up_app = web.Application()
    up_app.router.add_route("*", "/{t:.*}", upstream)
    up = await start_upstream(up_app)
    tls_up, wrong_ca = tls_upstream
    seen: list[str] = []
    async with serve(Simacan(password="the-vendor-knows-another-one")) as sim:
        text = config(sim, vendor, up, tls_up, wrong_ca)
        proxy = await start_proxy(text)
        key = {"X-Api-Key": INBOUND}
        async with aiohttp.ClientSession() as client:
            for path, headers in [
                ("/st/x", {}),  # no key: 401
                ("/st/x", {"X-Api-Key": INBOUND[:-1]}),  # wrong key: 401
                ("/sim/x", key),  # bad password at the vendor: 502
                ("/cc/x", key),  # vendor 500 echoing the client secret
                ("/crlf/x", key),  # a token that would inject a header
                ("/st/401", key),  # upstream 401: invalidate, replay, pass on
                ("/st/500", key),  # upstream 500
                ("/gone/x", key),  # connection refused
                ("/tls/x", key),  # certificate not trusted
                ("/-/metrics", {}),
                ("/-/tokens", {}),
                ("/-/tokens/sim/renew", {}),
            ]:
                method = "POST" if path.endswith("/renew") else "GET"
                async with client.request(method, proxy.url.with_path(path), headers=headers) as r:
                    seen.append(f"{path} {r.status} {dict(r.headers)} {await r.text()}")
        framing = await raw_exchange(
            proxy.port,
            f"POST /st/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {INBOUND}\r\n"
            f"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".encode(),
        )
        seen.append(framing.decode("latin-1"))
    statuses = [int(s.split()[1]) for s in seen[:9]]
    # a token with CR/LF is refused by the grant layer: 502 token-unavailable
    assert statuses[:4] == [401, 401, 502, 502]
    assert statuses[4] == 502
    assert statuses[5:9] == [401, 500, 502, 502]
    assert framing.startswith(b"HTTP/1.1 400")
    assert_clean("\n".join(seen), "responses")
    assert_clean(proxy.log_text(), "the proxy log")
    assert_clean(caplog.text, "Python logging")
    assert_clean(cli(tmp_path, text, "check"), "tokenrelay check")
    assert_clean(cli(tmp_path, text, "token", "sim"), "tokenrelay token")
    assert_clean(cli(tmp_path, text, "token", "cc"), "tokenrelay token")


def cli(tmp_path: Path, text: str, *args: str) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    cmd = [sys.executable, "-m", "proxy", *args, "--config", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    "broken",
    [
        f'providers:\n  cc: {{grant: client_credentials, client_secret: "{CLIENT_SECRET}"}}\n',
        f'providers:\n  cc: {{grant: static, token: "{STATIC}", colour: red}}\n',
        f'providers:\n  p: {{grant: password, token_url: "nope", username: u, '
        f'password: "{PASSWORD}"}}\n',
        f'clients:\n  - {{id: a, key: "{INBOUND}", key_sha256: "{INBOUND}"}}\n',
        f'clients:\n  - {{id: a, key: ["{INBOUND}"]}}\n',
        f'providers:\n  st: {{grant: static, token: ["{STATIC}"]}}\n',
        f"providers: {{st: {{grant: static, token: {STATIC}]\n",
    ],
)
def test_invalid_config_errors_hide_secrets(tmp_path: Path, broken: str) -> None:
    out = cli(tmp_path, broken, "check")
    assert "config error" in out
    assert_clean(out, "tokenrelay check")
