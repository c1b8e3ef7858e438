"""TLS to upstreams and token endpoints, with a CA made in the test (trustme)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web
from yarl import URL

from proxy.config import parse_config
from proxy.problems import ConfigError
from tests.conftest import StartProxy

StartTLS = Callable[..., Awaitable[URL]]
TOKEN = "tok-over-tls-91b2"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """CA file, a second (wrong) CA, and a client certificate for mTLS, all on disk."""
    paths = {k: tmp_path / f"{k}.pem" for k in ("ca", "other_ca", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    client = ca.issue_cert("legacy-client@tokenrelay.test")
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return paths


async def upstream_handler(request: web.Request) -> web.Response:
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    names = [value for kind, value in cert.get("subjectAltName", ())] if cert else []
    return web.json_response(
        {
            "path": request.raw_path,
            "authorization": request.headers.get("Authorization"),
            "client_cert": names[0] if names else None,
        }
    )


async def token_handler(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600})


@pytest.fixture
async def start_tls(ca: trustme.CA) -> AsyncIterator[StartTLS]:
    runners: list[web.AppRunner] = []

    async def start(*, names: tuple[str, ...] = ("127.0.0.1",), mtls: bool = False) -> URL:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        if mtls:
            ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_post("/oauth/token", token_handler)
        app.router.add_route("*", "/{tail:.*}", upstream_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        return URL(f"https://127.0.0.1:{runner.addresses[0][1]}")

    yield start
    for r in runners:
        await r.cleanup()


def route(up: URL, tls: str, provider: str = "") -> str:
    prov = f"\n    provider: {provider}" if provider else ""
    return f"""
routes:
  - prefix: /svc/
    upstream: {up}/base/{prov}
    tls: {tls}
"""


async def get(proxy_url: URL, path: str = "/svc/x") -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(proxy_url.with_path(path)) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_verified_with_own_ca(
    start_tls: StartTLS, start_proxy: StartProxy, pki: dict[str, Path]
) -> None:
    up = await start_tls()
    proxy = await start_proxy(route(up, f"{{ca_file: {pki['ca']}}}"))
    assert await get(proxy.url) == (
        200,
        {"path": "/base/x", "authorization": None, "client_cert": None},
    )


async def test_wrong_ca_is_a_502_naming_tls(
    start_tls: StartTLS, start_proxy: StartProxy, pki: dict[str, Path]
) -> None:
    up = await start_tls()
    for tls in (f"{{ca_file: {pki['other_ca']}}}", "{}"):  # another CA; the system store
        proxy = await start_proxy(route(up, tls))
        status, body = await get(proxy.url)
        assert status == 502
        assert body["upstream_error"] == "tls"
        assert "TLS" in str(body["detail"])
        assert "CERTIFICATE_VERIFY_FAILED" in str(body["detail"]).upper().replace(" ", "_")


async def test_server_name_checked_and_sent(
    start_tls: StartTLS, start_proxy: StartProxy, pki: dict[str, Path]
) -> None:
    up = await start_tls(names=("upstream.test",))
    named = await start_proxy(route(up, f"{{ca_file: {pki['ca']}, server_name: upstream.test}}"))
    assert (await get(named.url))[0] == 200
    unnamed = await start_proxy(route(up, f"{{ca_file: {pki['ca']}}}"))
    status, body = await get(unnamed.url)
    assert (status, body["upstream_error"]) == (502, "tls")


async def test_client_certificate(
    start_tls: StartTLS, start_proxy: StartProxy, pki: dict[str, Path]
) -> None:
    up = await start_tls(mtls=True)
    tls = (
        f"{{ca_file: {pki['ca']}, client_cert_file: {pki['client_cert']}, "
        f"client_key_file: {pki['client_key']}}}"
    )
    proxy = await start_proxy(route(up, tls))
    status, body = await get(proxy.url)
    assert (status, body["client_cert"]) == (200, "legacy-client@tokenrelay.test")
    without = await start_proxy(route(up, f"{{ca_file: {pki['ca']}}}"))
    status, body = await get(without.url)
    assert status == 502 and body["upstream_error"] in ("tls", "reset", "protocol")


async def test_insecure_skip_verify(start_tls: StartTLS, start_proxy: StartProxy) -> None:
    up = await start_tls()
    proxy = await start_proxy(route(up, "{insecure_skip_verify: true}"))
    assert (await get(proxy.url))[0] == 200


async def test_insecure_skip_verify_is_warned_at_start(
    start_tls: StartTLS, start_proxy: StartProxy
) -> None:
    """Needs the start-up warning wired in app._lifecycle (see the report)."""
    up = await start_tls()
    proxy = await start_proxy(route(up, "{insecure_skip_verify: true}"))
    lines = [orjson.loads(line) for line in proxy.log_text().splitlines()]
    warned = [e for e in lines if e.get("level") == "warning" and "insecure" in e["event"]]
    assert warned and warned[0].get("route") == "/svc/"


async def test_token_endpoint_over_tls(
    start_tls: StartTLS, start_proxy: StartProxy, pki: dict[str, Path]
) -> None:
    up = await start_tls()
    provider = f"""
providers:
  vendor:
    grant: client_credentials
    token_url: {up}/oauth/token
    client_id: cid
    client_secret: s3cret-over-tls
    tls: {{ca_file: {pki["ca"]}}}
"""
    proxy = await start_proxy(provider + route(up, f"{{ca_file: {pki['ca']}}}", "vendor"))
    status, body = await get(proxy.url)
    assert (status, body["authorization"]) == (200, f"Bearer {TOKEN}")
    wrong = provider.replace(str(pki["ca"]), str(pki["other_ca"]), 1)
    proxy = await start_proxy(wrong + route(up, f"{{ca_file: {pki['ca']}}}", "vendor"))
    status, body = await get(proxy.url)
    assert status == 502  # not retried: a certificate does not heal
    assert body["type"] == "https://tokenrelay.dev/problems/token-unavailable"
    assert body["provider_error"] == "tls"
    assert "Certificate" in str(body["detail"])
    assert "s3cret-over-tls" not in str(body)


@pytest.mark.parametrize(
    ("upstream", "allow", "refused"),
    [
        ("http://vendor.example/v1/", False, True),
        ("http://vendor.example/v1/", True, False),
        ("http://127.0.0.1:9/v1/", False, False),
        ("https://vendor.example/v1/", False, False),
    ],
)
def test_no_token_over_plain_http_to_remote_hosts(
    upstream: str, allow: bool, refused: bool
) -> None:
    """Needs the check in Config._cross_checks (see the report)."""
    text = f"""
providers:
  static: {{grant: static, token: "t"}}
routes:
  - prefix: /svc/
    upstream: {upstream}
    provider: static
    allow_plain_http: {str(allow).lower()}
"""
    if not refused:
        parse_config(text, "t.yaml", {})
        return
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml", {})
    assert info.value.path == "routes[0].upstream"
    assert "allow_plain_http" in info.value.problem


async def test_http_proxy_from_environment(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trust_env: an HTTP upstream is reached through HTTP_PROXY (a recording forward proxy)."""
    seen: list[str] = []

    async def forward_proxy(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.url}")
        return web.json_response({"via": "forward-proxy"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward_proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        proxy = await start_proxy(route(URL("http://upstream.test"), "{}"))
        assert await get(proxy.url) == (200, {"via": "forward-proxy"})
        assert seen == ["GET http://upstream.test/base/x"]
    finally:
        await runner.cleanup()
