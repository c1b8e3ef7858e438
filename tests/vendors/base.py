"""What every vendor emulator shares: token bookkeeping, test knobs, the protected API."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, ClassVar, Literal, TypeVar

import jwt
import orjson
from aiohttp import web
from multidict import MultiDict

from proxy.config import Provider
from proxy.presets import PRESETS, apply_preset

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpiresIn = Literal["number", "string", "missing"]
V = TypeVar("V", bound="Vendor")


@dataclass(frozen=True)
class Recorded:
    """One request a token endpoint received: which endpoint, the form as sent, the headers."""

    endpoint: str
    form: list[tuple[str, str]]
    headers: Mapping[str, str]
    content_type: str

    def fields(self) -> dict[str, str]:
        return dict(self.form)


@dataclass
class Issued:
    """An access token the emulator handed out."""

    value: str
    expires_at: float  # on the emulator's (server's) clock
    scope: str
    serial: int
    revoked: bool = False


@dataclass
class Canned:
    """A scripted answer served instead of the real one (500s, 429s, HTML...)."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    endpoint: str | None = None  # None: the next call to any token endpoint


class Vendor(ABC):
    """An emulated vendor. Subclasses add their token endpoints and say how the API rejects.

    Knobs: ``lifetime``, ``expires_in`` (number/string/missing), ``jwt_tokens``,
    ``server_time_offset`` (the server's clock runs this far ahead of ``clock``),
    ``hold`` (an Event token endpoints wait for), ``fail_next()``, ``revoke_all()``.
    Records: ``calls`` (per endpoint name), ``requests`` (token endpoint requests),
    ``issued`` (every access token, in order).
    """

    preset: ClassVar[str]
    default_lifetime: ClassVar[int]
    default_expires_in: ClassVar[ExpiresIn] = "number"

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        lifetime: int | None = None,
        expires_in: ExpiresIn | None = None,
        jwt_tokens: bool = False,
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime or self.default_lifetime
        self.expires_in: ExpiresIn = expires_in or self.default_expires_in
        self.jwt_tokens = jwt_tokens
        self.server_time_offset = 0.0
        self.hold: asyncio.Event | None = None
        self.url = ""  # set by serve()
        self.calls: Counter[str] = Counter()
        self.requests: list[Recorded] = []
        self.issued: list[Issued] = []
        self._by_value: dict[str, Issued] = {}
        self._canned: deque[Canned] = deque()
        self._jwt_key = secrets.token_bytes(32)

    # -- knobs --------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        body: bytes | str | Mapping[str, Any] = b"",
        *,
        times: int = 1,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        endpoint: str | None = None,
    ) -> None:
        """Answer the next ``times`` token endpoint calls with this instead."""
        if isinstance(body, Mapping):
            raw, ctype = orjson.dumps(dict(body)), content_type or "application/json"
        else:
            raw = body.encode() if isinstance(body, str) else body
            ctype = content_type or "text/plain"
        for _ in range(times):
            self._canned.append(Canned(status, raw, ctype, dict(headers or {}), endpoint))

    def revoke_all(self) -> None:
        """Every access token issued so far stops working now (the vendor expired them early)."""
        for t in self.issued:
            t.revoked = True

    def now(self) -> float:
        """The server's clock."""
        return self.clock() + self.server_time_offset

    def secret_values(self) -> list[str]:
        """Every credential and token value this vendor knows: none may leak anywhere."""
        return [*self.credentials(), *(t.value for t in self.issued), *self.extra_secrets()]

    @abstractmethod
    def credentials(self) -> list[str]:
        """The configured credentials (secrets and passwords)."""

    def extra_secrets(self) -> list[str]:
        return []

    # -- config ---------------------------------------------------------------

    def provider(self, name: str | None = None, **overrides: Any) -> Provider:
        """A Provider using this vendor's preset, pointed at the emulator; overrides win."""
        preset = {"preset": self.preset} if self.preset in PRESETS else {}
        data: dict[str, Any] = {**preset, **self.provider_keys(), **overrides}
        merged = apply_preset(data, "<test>", ("providers", name or self.preset))
        return Provider.model_validate({**merged, "name": name or self.preset})

    @abstractmethod
    def provider_keys(self) -> dict[str, Any]:
        """Config keys pointing the preset at this emulator, credentials included."""

    # -- the app --------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        for path, name, handler in self.token_endpoints():
            app.router.add_post(path, self._token_endpoint(name, handler))
        app.router.add_route("*", "/api/{tail:.*}", self._api)
        return app

    @abstractmethod
    def token_endpoints(self) -> list[tuple[str, str, Handler]]:
        """(path, endpoint name, handler) of each token endpoint."""

    def _token_endpoint(self, name: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.calls[name] += 1
            form = await request.post() if _is_form(request) else MultiDict[str]()
            self.requests.append(
                Recorded(
                    name,
                    [(k, str(v)) for k, v in form.items()],
                    dict(request.headers),
                    request.content_type,
                )
            )
            if self.hold is not None:
                await self.hold.wait()
            canned = self._take_canned(name)
            resp = await handler(request) if canned is None else _canned_response(canned)
            resp.headers.setdefault("Date", formatdate(self.now(), usegmt=True))
            return resp

        return wrapped

    def _take_canned(self, endpoint: str) -> Canned | None:
        for c in self._canned:
            if c.endpoint in (None, endpoint):
                self._canned.remove(c)
                return c
        return None

    # -- tokens ----------------------------------------------------------------

    def issue(self, scope: str = "") -> Issued:
        now = self.now()
        serial = len(self.issued) + 1
        if self.jwt_tokens:
            claims = {"exp": int(now + self.lifetime), "iat": int(now), "jti": secrets.token_hex(8)}
            value = jwt.encode(claims, self._jwt_key, algorithm="HS256")
        else:
            value = f"{self.preset}-at-{serial}-{secrets.token_urlsafe(18)}"
        token = Issued(value, now + self.lifetime, scope, serial)
        self.issued.append(token)
        self._by_value[value] = token
        return token

    def expires_in_field(self) -> dict[str, Any]:
        if self.expires_in == "missing":
            return {}
        if self.expires_in == "string":
            return {"expires_in": str(self.lifetime)}
        return {"expires_in": self.lifetime}

    # -- the protected API ------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        self.calls["api"] += 1
        token = self._bearer(request)
        if token is None or token.revoked or self.now() >= token.expires_at:
            return self.unauthorized()
        needed = self.required_scope(request.method, request.match_info["tail"])
        if needed is not None and needed not in token.scope.split():
            return self.forbidden(needed)
        body = await request.read()
        return web.json_response(
            {
                "vendor": self.preset,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "body": body.decode("utf-8", "replace"),
                "token_serial": token.serial,
            }
        )

    def _bearer(self, request: web.Request) -> Issued | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._by_value.get(value.strip())

    def required_scope(self, method: str, tail: str) -> str | None:
        return None

    def unauthorized(self) -> web.Response:
        return web.Response(
            status=401,
            text="Unauthorized",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    def forbidden(self, scope: str) -> web.Response:
        return oauth_error(403, "insufficient_scope", f"this endpoint needs scope {scope}")


def _is_form(request: web.Request) -> bool:
    return request.content_type == "application/x-www-form-urlencoded"


def _canned_response(c: Canned) -> web.Response:
    return web.Response(
        status=c.status, body=c.body, content_type=c.content_type, headers=c.headers
    )


def oauth_error(status: int, error: str, description: str) -> web.Response:
    """An RFC 6749 §5.2 error body."""
    return web.json_response({"error": error, "error_description": description}, status=status)


@asynccontextmanager
async def serve(vendor: V, *, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[V]:
    """Run ``vendor`` on a free 127.0.0.1 port; ``vendor.url`` is its base URL meanwhile."""
    runner = web.AppRunner(vendor.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if ssl_context is not None else "http"
    vendor.url = f"{scheme}://{host}:{port}"
    try:
        yield vendor
    finally:
        await runner.cleanup()
