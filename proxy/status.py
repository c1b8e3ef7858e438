"""The status page (``GET /-/``) and its data (``GET /-/status``).

The page is a static HTML file and a small script shipped in the package (``proxy/static``):
no external asset, no build step. The script fetches ``/-/status`` every few seconds and
writes it into the page with ``textContent`` only, so nothing the proxy reports can become
markup. Every answer carries a strict Content-Security-Policy and ``X-Frame-Options: DENY``.
The page's buttons POST with the per-process CSRF token from the page's ``<meta>``; a POST
that a browser sends (it says so with ``Origin`` or ``Sec-Fetch-Site``) must carry it, so
another site cannot make an operator's browser renew tokens. curl and scripts, which send
neither header, are not browsers and need no token.

What the document holds is chosen field by field: route prefixes, statuses, problem slugs,
request ids, provider states and the IdP's masked error text. Never a header or query value,
a token or a secret.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.config import Loaded
from proxy.observability import Observer
from proxy.problems import Forbidden

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
CSRF_HEADER = "X-CSRF-Token"
CLIENT_AUTH_GRANTS = frozenset({"client_credentials", "password"})
ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}
_SAME_SITE = frozenset({"same-origin", "none"})


def _static(name: str) -> bytes:
    return resources.files("proxy").joinpath("static", name).read_bytes()


def page(csrf: str) -> web.Response:
    html = _static("status.html").replace(b"{{csrf}}", csrf.encode("ascii"))
    return web.Response(
        body=html, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS
    )


def asset(name: str) -> web.Response:
    return web.Response(body=_static(name), content_type=ASSETS[name], headers=SECURITY_HEADERS)


def check_csrf(request: web.Request, csrf: str) -> None:
    """Refuse a browser's POST without this process's token (see the module docstring)."""
    headers = request.headers
    fetch_site = headers.get("Sec-Fetch-Site")
    from_browser = "Origin" in headers or fetch_site is not None
    if not from_browser:
        return
    if fetch_site is not None and fetch_site not in _SAME_SITE:
        raise Forbidden("a cross-site request may not call admin endpoints")
    sent = headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), csrf.encode()):
        raise Forbidden(f"a browser's POST needs the page's {CSRF_HEADER}")


def document(
    loaded: Loaded,
    observer: Observer,
    providers: Mapping[str, Mapping[str, object]],
    routes: list[dict[str, object]],
    worker: str | None,
) -> dict[str, Any]:
    """The whole status document; ``providers`` are the token sources' states."""
    recent = observer.recent.routes()
    tokens = observer.recent_tokens
    cfg = loaded.config
    return {
        "version": __version__,
        "pid": os.getpid(),
        "worker": worker,
        "uptime_seconds": round(observer.wall() - observer.started_at, 1),
        "config": loaded.path,
        "last_reload": observer.last_reload,
        "store": {"type": "memory"},
        "providers": [
            _provider(name, state, cfg.providers.get(name), tokens)
            for name, state in providers.items()
        ],
        "routes": [route | _stats(recent.get(str(route["prefix"]))) for route in routes],
        "errors": list(observer.recent.errors),
    }


def _provider(name: str, state: Mapping[str, object], provider: Any, tokens: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "grant": provider.grant if provider is not None else None,
        "client_auth": (  # only these grants authenticate the client itself
            provider.client_auth
            if provider is not None and provider.grant in CLIENT_AUTH_GRANTS
            else None
        ),
        "token_calls_last_hour": tokens.calls_last_hour(name),
        "last_renewal": tokens.last_renewal.get(name),
    }
    keep = (
        "state",
        "seconds_left",
        "refresh_in_seconds",
        "cooldown_seconds_left",
        "last_step",
        "last_error",
        "last_error_vendor_detail",
    )
    out |= {k: _finite(state.get(k)) for k in keep}
    return out


def _stats(found: Mapping[str, Any] | None) -> dict[str, Any]:
    empty: dict[str, Any] = {"rps_1m": 0.0, "rps_5m": 0.0}
    empty |= {"error_ratio_1m": 0.0, "error_ratio_5m": 0.0}
    empty |= {"replays_5m": {}, "p50_seconds": None, "p95_seconds": None}
    return {k: _finite(v) for k, v in (found or empty).items()}


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
