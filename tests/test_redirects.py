"""Location and Content-Location that point into the upstream base come back under the prefix."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.forward.redirects import rewrite_location, rewrite_locations
from tests.conftest import StartProxy, StartUpstream

API = URL("https://api.example.com")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://api.example.com/v1/x", "/simacan/x"),
        ("https://api.example.com/v1/x?a=%2F&b=1#frag", "/simacan/x?a=%2F&b=1#frag"),
        ("/v1/trips/7", "/simacan/trips/7"),
        ("/v1", "/simacan"),
        ("/v1/", "/simacan/"),
        ("/v1?page=2", "/simacan?page=2"),
        ("//api.example.com/v1/z", "/simacan/z"),
        ("https://API.Example.com:443/v1/y", "/simacan/y"),
        ("HTTPS://api.example.com/v1/a%2Fb", "/simacan/a%2Fb"),
        # outside the base, another origin, or relative: untouched
        ("/v10/x", "/v10/x"),
        ("/v2/x", "/v2/x"),
        ("https://api.example.com/", "https://api.example.com/"),
        ("http://api.example.com/v1/x", "http://api.example.com/v1/x"),
        ("https://api.example.com:8443/v1/x", "https://api.example.com:8443/v1/x"),
        ("https://evil.example/v1/x", "https://evil.example/v1/x"),
        ("https://api.example.com.evil.example/v1/x", "https://api.example.com.evil.example/v1/x"),
        ("https://u:p@api.example.com/v1/x", "https://u:p@api.example.com/v1/x"),
        ("https://[broken/v1/x", "https://[broken/v1/x"),
        ("x/y", "x/y"),
        ("../v1/x", "../v1/x"),
        ("", ""),
    ],
)
def test_rewrite_location(value: str, expected: str) -> None:
    assert rewrite_location(value, API, "/v1/", "/simacan/") == expected


def test_root_base_maps_everything_on_that_origin() -> None:
    up = URL("http://127.0.0.1:9999")
    assert rewrite_location("/a/b?c", up, "/", "/svc/") == "/svc/a/b?c"
    assert rewrite_location("http://127.0.0.1:9999", up, "/", "/svc/") == "/svc/"
    assert rewrite_location("/", up, "/", "/") == "/"


def test_rewrite_locations_touches_only_location_headers() -> None:
    headers = CIMultiDict(
        {"Location": "/v1/a", "Content-Location": "https://api.example.com/v1/b", "Link": "/v1/c"}
    )
    rewrite_locations(headers, API, "/v1/", "/simacan/")
    assert dict(headers) == {
        "Location": "/simacan/a",
        "Content-Location": "/simacan/b",
        "Link": "/v1/c",
    }


async def test_redirects_through_the_proxy(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    """Needs the rewrite wired into Forwarder._relay (see the report)."""
    own: list[URL] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        target = {
            "abs": f"{own[0]}/base/next?x=%2F1",
            "path": "/base/deeper/",
            "out": "/elsewhere/x",
            "foreign": "https://vendor-cdn.example/base/x",
        }[kind]
        return web.Response(
            status=302, headers={"Location": target, "Content-Location": "/base/self"}
        )

    app = web.Application()
    app.router.add_get("/base/r/{kind}", redirect)
    up = await start_upstream(app)
    own.append(up)
    proxy = await start_proxy(f"routes:\n  - prefix: /svc/\n    upstream: {up}/base/\n")
    expected = {
        "abs": "/svc/next?x=%2F1",
        "path": "/svc/deeper/",
        "out": "/elsewhere/x",
        "foreign": "https://vendor-cdn.example/base/x",
    }
    async with aiohttp.ClientSession() as client:
        for kind, location in expected.items():
            async with client.get(proxy.url / "svc" / "r" / kind, allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == location
                assert resp.headers["Content-Location"] == "/svc/self"
