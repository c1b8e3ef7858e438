"""Admin endpoints called with a method they do not take: 405 problem+json with ``Allow``.

Each path is served by one row of ``proxy.app.ADMIN_ENDPOINTS``; both the main listener
(to a loopback client, no ``admin:`` listener) and a separate admin listener answer from it.
"""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from proxy.app import ADMIN_ENDPOINTS
from proxy.problems import PROBLEM_TYPE_BASE
from tests.conftest import Proxy, StartProxy
from tests.helpers import provider_json
from tests.vendors import Simplifi, serve

ROUTES = "routes: []\n"
ADMIN = "admin: {host: 127.0.0.1, port: 0}\n"


def concrete(path: str) -> str:
    return path.replace("{provider}", "demo")


async def assert_405(
    client: aiohttp.ClientSession, url: URL, method: str, allow: str
) -> dict[str, object]:
    async with client.request(method, url, headers={"X-Request-Id": "rid-405"}) as r:
        assert r.status == 405, (method, url, await r.text())
        assert r.headers["Allow"] == allow
        assert r.headers["Content-Type"] == "application/problem+json"
        assert r.headers["X-Request-Id"] == "rid-405"
        doc: dict[str, object] = await r.json(content_type=None)
    assert doc["type"] == PROBLEM_TYPE_BASE + "method-not-allowed"
    assert doc["status"] == 405 and doc["request_id"] == "rid-405"
    return doc


async def admin_listener(start_proxy: StartProxy) -> tuple[Proxy, URL]:
    proxy = await start_proxy(ADMIN + ROUTES)
    assert proxy.admin_url is not None
    return proxy, proxy.admin_url


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/-/tokens", "GET, HEAD"),
        ("GET", "/-/tokens/demo/renew", "POST"),
        ("POST", "/-/metrics", "GET, HEAD"),
        ("PUT", "/-/health", "GET, HEAD"),
        ("DELETE", "/-/ready", "GET, HEAD"),
    ],
)
async def test_wrong_method_on_the_main_listener_is_405_with_allow(
    method: str, path: str, allow: str, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(ROUTES)
    doc = await assert_405(client, proxy.url.with_path(path), method, allow)
    assert allow in str(doc["detail"])


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/-/reload", "POST"),
        ("DELETE", "/-/tokens", "GET, HEAD"),
        ("GET", "/-/tokens/demo/renew", "POST"),
        ("POST", "/-/metrics", "GET, HEAD"),
    ],
)
async def test_wrong_method_on_the_admin_listener_is_405_with_allow(
    method: str, path: str, allow: str, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, admin = await admin_listener(start_proxy)
    await assert_405(client, admin.with_path(path), method, allow)


@pytest.mark.parametrize("path", sorted(ADMIN_ENDPOINTS))
async def test_every_admin_endpoint_refuses_a_method_outside_its_row(
    path: str, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    endpoint = ADMIN_ENDPOINTS[path]
    wrong = "PATCH"
    assert not endpoint.takes(wrong)
    _, admin = await admin_listener(start_proxy)
    await assert_405(client, admin.with_path(concrete(path)), wrong, endpoint.allow)


async def test_head_is_allowed_wherever_get_is(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, admin = await admin_listener(start_proxy)
    for path in ("/-/health", "/-/ready", "/-/metrics", "/-/tokens"):
        async with client.head(admin.with_path(path)) as r:
            assert r.status == 200, path
            assert await r.read() == b""


async def test_reload_stays_off_the_main_listener_whatever_the_method(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """The main listener has no reload endpoint: a 404, not a 405 inviting a POST."""
    proxy = await start_proxy(ROUTES)
    for method in ("GET", "POST"):
        async with client.request(method, proxy.url / "-" / "reload") as r:
            assert r.status == 404
            assert "Allow" not in r.headers


async def test_unknown_admin_path_is_still_404(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    _, admin = await admin_listener(start_proxy)
    for path in ("/-/nope", "/-/tokens/renew", "/-/tokens/a/b/renew", "/-/tokens/"):
        async with client.delete(admin.with_path(path)) as r:
            assert r.status == 404, path


async def test_right_methods_still_reach_their_handlers(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with serve(Simplifi()) as vendor:
        proxy = await start_proxy(f"{ADMIN}providers:\n  demo: {provider_json(vendor)}\n{ROUTES}")
        assert proxy.admin_url is not None
        async with client.post(proxy.admin_url / "-" / "tokens" / "demo" / "renew") as r:
            assert r.status == 200
            assert "demo" in await r.json()
        async with client.get(proxy.admin_url / "-" / "tokens") as r:
            assert r.status == 200
