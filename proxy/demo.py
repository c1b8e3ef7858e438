"""A demo vendor, shipped so a first-time user sees injection, refresh and replay without
any vendor account.

It speaks two dialects the proxy supports:

* Simacan's: ``POST /auth/password`` (form ``username``, ``password``) and
  ``POST /auth/refresh`` (form ``refresh_token``), answering ``token_type: "bearer"`` and
  ``expires_in`` as a string; every refresh rotates the refresh token and kills the old one.
* OAuth 2 client credentials: ``POST /oauth/token`` with the client id and secret by HTTP
  Basic (or in the form body) and ``grant_type=client_credentials``.

``/api/{anything}`` (any method) checks the Bearer token and echoes what arrived, naming the
token by its issue number instead of showing it. ``POST /api/-/expire-now`` revokes every
live access token early (``?refresh=true`` also revokes refresh tokens), so the next proxied
request is answered 401 and the proxy's refresh-and-replay is visible.

The fixed credentials below are demo values, not secrets.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web

from proxy.tokens.source import Clock, system_clock

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "demo-password"
DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"
EXPIRE_NOW_PATH = "/api/-/expire-now"

GrantName = Literal["password", "refresh", "client_credentials"]
_HIDDEN_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})


@dataclass(frozen=True)
class DemoCredentials:
    """What the demo vendor accepts; overridable so a user can watch a bad password fail."""

    username: str = DEMO_USERNAME
    password: str = field(default=DEMO_PASSWORD, repr=False)
    client_id: str = DEMO_CLIENT_ID
    client_secret: str = field(default=DEMO_CLIENT_SECRET, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DemoCredentials:
        """Read ``DEMO_USERNAME``, ``DEMO_PASSWORD``, ``DEMO_CLIENT_ID``, ``DEMO_CLIENT_SECRET``."""
        return cls(
            username=env.get("DEMO_USERNAME", DEMO_USERNAME),
            password=env.get("DEMO_PASSWORD", DEMO_PASSWORD),
            client_id=env.get("DEMO_CLIENT_ID", DEMO_CLIENT_ID),
            client_secret=env.get("DEMO_CLIENT_SECRET", DEMO_CLIENT_SECRET),
        )


@dataclass(slots=True)
class Issued:
    """One access token's bookkeeping; the token string itself is only the dict key."""

    number: int
    grant: GrantName
    issued_at: float
    expires_at: float
    revoked: bool = False


@dataclass(slots=True)
class Counters:
    """What the vendor has seen; echoed so the user can watch refreshes happen."""

    logins: int = 0
    refreshes: int = 0
    client_credentials: int = 0
    rejected: int = 0
    uploads_cut: int = 0  # bodies whose sender went away before the end (the proxy cut them)


class Vendor:
    """Token rules kept apart from HTTP, so each rule reads in one place."""

    def __init__(self, lifetime: float, refresh_lifetime: float, clock: Clock) -> None:
        self.lifetime = lifetime
        self.refresh_lifetime = refresh_lifetime
        self.clock = clock
        self.access: dict[str, Issued] = {}
        self.refresh: dict[str, float] = {}  # refresh token -> expires_at
        self.issued = 0
        self.counters = Counters()

    def issue(self, grant: GrantName) -> str:
        self._prune()
        now = self.clock()
        self.issued += 1
        token = secrets.token_urlsafe(24)
        self.access[token] = Issued(self.issued, grant, now, now + self.lifetime)
        return token

    def issue_refresh(self) -> str:
        token = secrets.token_urlsafe(32)
        self.refresh[token] = self.clock() + self.refresh_lifetime
        return token

    def rotate(self, refresh_token: str) -> bool:
        """Consume a refresh token; a second use of the same one fails, as at Simacan."""
        expires_at = self.refresh.pop(refresh_token, None)
        return expires_at is not None and self.clock() < expires_at

    def check(self, token: str) -> Issued | str:
        """The token's record, or why it is refused."""
        issued = self.access.get(token)
        if issued is None:
            return "unknown token"
        if issued.revoked:
            return "token revoked"
        if self.clock() >= issued.expires_at:
            return "token expired"
        return issued

    def expire_now(self, *, refresh_too: bool) -> tuple[int, int]:
        live = [i for i in self.access.values() if not i.revoked]
        for issued in live:
            issued.revoked = True
        dropped = len(self.refresh) if refresh_too else 0
        if refresh_too:
            self.refresh.clear()
        return len(live), dropped

    def _prune(self) -> None:
        """Forget long-dead tokens so a demo left running does not grow without bound."""
        horizon = self.clock() - self.lifetime
        self.access = {t: i for t, i in self.access.items() if i.expires_at > horizon}
        now = self.clock()
        self.refresh = {t: e for t, e in self.refresh.items() if e > now}


VENDOR = web.AppKey("vendor", Vendor)
CREDENTIALS = web.AppKey("credentials", DemoCredentials)


def demo_app(
    lifetime: float = 60,
    *,
    clock: Clock = system_clock,
    refresh_lifetime: float | None = None,
    credentials: DemoCredentials | None = None,
) -> web.Application:
    """The demo vendor. Refresh tokens live ten access-token lifetimes unless told otherwise."""
    if lifetime <= 0:
        raise ValueError("lifetime must be positive")
    app = web.Application()
    app[VENDOR] = Vendor(lifetime, refresh_lifetime or 10 * lifetime, clock)
    app[CREDENTIALS] = credentials or DemoCredentials()
    app.router.add_post("/auth/password", _password)
    app.router.add_post("/auth/refresh", _refresh)
    app.router.add_post("/oauth/token", _client_credentials)
    app.router.add_post(EXPIRE_NOW_PATH, _expire_now)
    app.router.add_route("*", "/api/{tail:.*}", _echo)
    return app


# ---------------------------------------------------------------------------
# token endpoints


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _error(status: int, error: str, description: str, **headers: str) -> web.Response:
    body = {"error": error, "error_description": description}
    return web.json_response(body, status=status, headers=headers or None)


def _simacan_pair(vendor: Vendor, grant: GrantName) -> web.Response:
    """Simacan's answer shape: lower-case ``bearer`` and ``expires_in`` as a string."""
    body = {
        "access_token": vendor.issue(grant),
        "refresh_token": vendor.issue_refresh(),
        "token_type": "bearer",
        "expires_in": format(vendor.lifetime, "g"),
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def _password(request: web.Request) -> web.Response:
    form = await request.post()
    creds, vendor = request.app[CREDENTIALS], request.app[VENDOR]
    username, password = form.get("username"), form.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return _error(400, "invalid_request", "form fields username and password are required")
    if not (_same(username, creds.username) and _same(password, creds.password)):
        vendor.counters.rejected += 1
        return _error(401, "invalid_grant", "invalid username or password")
    vendor.counters.logins += 1
    return _simacan_pair(vendor, "password")


async def _refresh(request: web.Request) -> web.Response:
    form = await request.post()
    vendor = request.app[VENDOR]
    refresh_token = form.get("refresh_token")
    if not isinstance(refresh_token, str):
        return _error(400, "invalid_request", "form field refresh_token is required")
    if not vendor.rotate(refresh_token):
        vendor.counters.rejected += 1
        return _error(401, "invalid_grant", "refresh token unknown, used or expired")
    vendor.counters.refreshes += 1
    return _simacan_pair(vendor, "refresh")


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else None


async def _client_credentials(request: web.Request) -> web.Response:
    form = await request.post()
    creds, vendor = request.app[CREDENTIALS], request.app[VENDOR]
    basic = _basic_auth(request.headers.get("Authorization"))
    in_body = form.get("client_id"), form.get("client_secret")
    if basic is not None and in_body != (None, None):
        return _error(400, "invalid_request", "send client credentials one way, not two")
    client_id, secret = basic or in_body
    if not (
        isinstance(client_id, str)
        and isinstance(secret, str)
        and _same(client_id, creds.client_id)
        and _same(secret, creds.client_secret)
    ):
        vendor.counters.rejected += 1
        challenge = {"WWW-Authenticate": 'Basic realm="demo"'}
        return _error(401, "invalid_client", "client authentication failed", **challenge)
    if form.get("grant_type") != "client_credentials":
        return _error(400, "unsupported_grant_type", "only client_credentials is supported")
    vendor.counters.client_credentials += 1
    body: dict[str, Any] = {
        "access_token": vendor.issue("client_credentials"),
        "token_type": "Bearer",
        "expires_in": round(vendor.lifetime),
    }
    if isinstance(scope := form.get("scope"), str):
        body["scope"] = scope
    return web.json_response(body, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------------
# the protected API


async def _expire_now(request: web.Request) -> web.Response:
    """No token needed: the user calls it directly or through the proxy, either works."""
    refresh_too = request.query.get("refresh", "").lower() in ("1", "true", "yes")
    access, refresh = request.app[VENDOR].expire_now(refresh_too=refresh_too)
    return web.json_response({"revoked_access_tokens": access, "revoked_refresh_tokens": refresh})


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _unauthorized(vendor: Vendor, reason: str, error: str = "invalid_token") -> web.Response:
    vendor.counters.rejected += 1
    challenge = f'Bearer realm="demo", error="{error}", error_description="{reason}"'
    return _error(401, error, reason, **{"WWW-Authenticate": challenge})


async def _echo(request: web.Request) -> web.Response:
    vendor = request.app[VENDOR]
    token = _bearer(request)
    if token is None:
        return _unauthorized(vendor, "missing bearer token", "invalid_request")
    issued = vendor.check(token)
    if isinstance(issued, str):
        return _unauthorized(vendor, issued)
    try:
        length, digest = await _digest_body(request)
    except ConnectionError:  # e.g. the proxy cut an upload over max_body: not a vendor crash
        vendor.counters.uploads_cut += 1
        return web.Response(status=400, text="upload cut short")  # nobody is left to read it
    raw_path, _, raw_query = request.raw_path.partition("?")
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": raw_path,  # as it arrived: shows whether a proxy re-quoted anything
            "query": raw_query,
            "token": _describe(issued, vendor.clock()),
            "body": {"length": length, "sha256": digest},
            "headers": {
                k: v for k, v in request.headers.items() if k.lower() not in _HIDDEN_HEADERS
            },
            "vendor": asdict(vendor.counters),
        }
    )


async def _digest_body(request: web.Request) -> tuple[int, str]:
    """Hash in chunks: a demo upload of any size must not be held in memory."""
    sha, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        sha.update(chunk)
        length += len(chunk)
    return length, sha.hexdigest()


def _describe(issued: Issued, now: float) -> dict[str, Any]:
    age, left = now - issued.issued_at, issued.expires_at - now
    return {
        "number": issued.number,
        "grant": issued.grant,
        "age_seconds": round(age, 1),
        "expires_in_seconds": round(left, 1),
        "summary": (
            f"token #{issued.number} ({issued.grant} grant), "
            f"issued {age:.0f} s ago, expires in {left:.0f} s"
        ),
    }
