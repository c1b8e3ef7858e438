"""The four vendors, each exactly as its auth doc in /work/shared/vendor-docs/ says."""

from __future__ import annotations

import base64
import binascii
import secrets
from abc import abstractmethod
from typing import Any, ClassVar
from urllib.parse import unquote_plus

from aiohttp import web

from tests.vendors.base import Handler, Recorded, Vendor, oauth_error


def _form(vendor: Vendor) -> dict[str, str]:
    """The form of the request being handled (recorded by the endpoint wrapper)."""
    return vendor.requests[-1].fields()


def _last(vendor: Vendor) -> Recorded:
    return vendor.requests[-1]


def _basic(rec: Recorded, *, form_encoded: bool = True) -> tuple[str, str] | None:
    """Client id and secret from HTTP Basic, each form-decoded (RFC 6749 §2.3.1) or, for a
    vendor whose example sends them as they are, taken as they are."""
    scheme, _, b64 = rec.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        pair = base64.b64decode(b64.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = pair.partition(":")
    if not sep:
        return None
    return (unquote_plus(user), unquote_plus(password)) if form_encoded else (user, password)


class Simacan(Vendor):
    """Auth API 1.0: /auth/password (exactly username+password), /auth/refresh (exactly
    refresh_token, rotating). expires_in comes as a string ("3600"); tokens are JWTs.
    ``refuse_refresh = True`` makes /auth/refresh answer 401 (the refresh token expired).
    """

    preset = "simacan"
    default_lifetime = 3600
    default_expires_in = "string"
    auth_path = "/api/v1/auth"

    def __init__(
        self,
        username: str = "fleet@example.com",
        password: str = "Simacan-PASSWORD-marker p@ss&=+%/",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("jwt_tokens", True)
        super().__init__(**kwargs)
        self.username = username
        self.password = password
        self.refuse_refresh = False
        self.live_refresh_tokens: set[str] = set()
        self.dead_refresh_tokens: set[str] = set()

    @property
    def token_url(self) -> str:
        return f"{self.url}{self.auth_path}/password"

    @property
    def refresh_url(self) -> str:
        return f"{self.url}{self.auth_path}/refresh"

    def credentials(self) -> list[str]:
        return [self.password]

    def extra_secrets(self) -> list[str]:
        return [*self.live_refresh_tokens, *self.dead_refresh_tokens]

    def provider_keys(self) -> dict[str, Any]:
        return {
            "token_url": self.token_url,
            "refresh_url": self.refresh_url,
            "username": self.username,
            "password": self.password,
        }

    def token_endpoints(self) -> list[tuple[str, str, Handler]]:
        return [
            (f"{self.auth_path}/password", "password", self._password),
            (f"{self.auth_path}/refresh", "refresh", self._refresh),
        ]

    async def _password(self, request: web.Request) -> web.Response:
        form = _form(self)
        if set(form) != {"username", "password"}:
            return web.Response(status=400, text="expected exactly username and password")
        if (form["username"], form["password"]) != (self.username, self.password):
            return web.Response(status=401, text="Unauthorized")
        return self._pair()

    async def _refresh(self, request: web.Request) -> web.Response:
        form = _form(self)
        if set(form) != {"refresh_token"}:
            return web.Response(status=400, text="expected exactly refresh_token")
        old = form["refresh_token"]
        if self.refuse_refresh or old not in self.live_refresh_tokens:
            return web.Response(status=401, text="Unauthorized")
        self.live_refresh_tokens.discard(old)
        self.dead_refresh_tokens.add(old)
        return self._pair()

    def _pair(self) -> web.Response:
        access = self.issue()
        refresh = f"simacan-rt-{secrets.token_urlsafe(18)}"
        self.live_refresh_tokens.add(refresh)
        body = {"access_token": access.value, "refresh_token": refresh, "token_type": "bearer"}
        return web.json_response(body | self.expires_in_field())


class _ClientCredentialsVendor(Vendor):
    """What the three client-credentials vendors share: one token endpoint, id and secret."""

    token_path: ClassVar[str] = "/oauth/token"
    client_id: str
    client_secret: str

    @property
    def token_url(self) -> str:
        return f"{self.url}{self.token_path}"

    def credentials(self) -> list[str]:
        return [self.client_secret]

    def provider_keys(self) -> dict[str, Any]:
        return {
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }

    def token_endpoints(self) -> list[tuple[str, str, Handler]]:
        return [(self.token_path, "token", self._token)]

    @abstractmethod
    async def _token(self, request: web.Request) -> web.Response:
        """The vendor's token endpoint."""


class Simplifi(_ClientCredentialsVendor):
    """/oauth/token, client credentials by HTTP Basic only; the answer carries ``__type``,
    a refresh token and a scope nobody asked for."""

    preset = "simplifi"
    default_lifetime = 3600

    def __init__(
        self,
        client_id: str = "simplifi-client",
        client_secret: str = "Simplifi-SECRET:marker +/%",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client_id = client_id
        self.client_secret = client_secret

    async def _token(self, request: web.Request) -> web.Response:
        rec = _last(self)
        if rec.fields().get("grant_type") != "client_credentials":
            return oauth_error(400, "unsupported_grant_type", "only client_credentials")
        if _basic(rec, form_encoded=False) != (self.client_id, self.client_secret):
            return oauth_error(401, "invalid_client", "Client authentication failed")
        access = self.issue("read")
        body = {
            "__type": "SSJSON_Token_Access",
            "access_token": access.value,
            "refresh_token": f"simplifi-rt-{secrets.token_urlsafe(12)}",
            "scope": "read",
            "token_type": "Bearer",
        }
        return web.json_response(body | self.expires_in_field())


class SimpleDocs(_ClientCredentialsVendor):
    """/api/oauth/token with credentials in the body; scope defaults to "read", "read write"
    must be asked for; errors and expired tokens are problem bodies with a ``type``."""

    preset = "simpledocs"
    default_lifetime = 7200
    token_path = "/api/oauth/token"

    def __init__(
        self,
        client_id: str = "simpledocs-app",
        client_secret: str = "SimpleDocs-SECRET-marker",
        app_scopes: frozenset[str] = frozenset({"read", "write"}),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_scopes = app_scopes

    async def _token(self, request: web.Request) -> web.Response:
        form = _form(self)
        if form.get("grant_type") != "client_credentials":
            return _problem(400, "unsupported_grant_type", "Unsupported Grant Type")
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return _problem(401, "invalid_client", "Invalid Client")
        scope = form.get("scope", "read")
        if not set(scope.split()) <= self.app_scopes:
            return _problem(400, "invalid_scope", "Invalid Scope")
        access = self.issue(scope)
        body = {
            "access_token": access.value,
            "token_type": "Bearer",
            "scope": scope,
            "created_at": int(self.now()),
        }
        return web.json_response(body | self.expires_in_field())

    def required_scope(self, method: str, tail: str) -> str | None:
        return "read" if method in ("GET", "HEAD") else "write"

    def unauthorized(self) -> web.Response:
        return _problem(401, "token_expired", "Token Expired", "The access token has expired.")

    def forbidden(self, scope: str) -> web.Response:
        return _problem(403, "insufficient_scope", "Insufficient Scope")


def _problem(status: int, kind: str, title: str, detail: str | None = None) -> web.Response:
    doc = {"type": kind, "status": status, "title": title, "detail": detail or title}
    return web.json_response(doc, status=status)


class Sipsim(_ClientCredentialsVendor):
    """/oauth/token with credentials in the body, space-separated scopes, RFC 6749 errors;
    the API at /api/v2/<resource> needs <resource>.read (GET) or <resource>.write."""

    preset = "sipsim"
    default_lifetime = 7200
    all_scopes = frozenset(
        f"{r}.{a}" for r in ("account", "calls", "phones", "tags") for a in ("read", "write")
    )

    def __init__(
        self,
        client_id: str = "sipsim-client",
        client_secret: str = "Sipsim-SECRET-marker",
        app_scopes: frozenset[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_scopes = self.all_scopes - {"account.write"} if app_scopes is None else app_scopes

    async def _token(self, request: web.Request) -> web.Response:
        form = _form(self)
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return oauth_error(401, "invalid_client", "Client authentication failed")
        if form.get("grant_type") != "client_credentials":
            return oauth_error(400, "unauthorized_client", "Client not authorized for this grant")
        scope = form.get("scope", "account.read")
        if not set(scope.split()) <= self.app_scopes:
            return oauth_error(400, "invalid_scope", "Requested scope not allowed")
        access = self.issue(scope)
        body = {
            "access_token": access.value,
            "token_type": "Bearer",
            "scope": scope,
            "created_at": int(self.now()),
        }
        return web.json_response(body | self.expires_in_field())

    def required_scope(self, method: str, tail: str) -> str | None:
        parts = tail.split("/")
        if len(parts) < 2 or parts[0] != "v2":
            return None
        action = "read" if method in ("GET", "HEAD") else "write"
        scope = f"{parts[1]}.{action}"
        return scope if scope in self.all_scopes else None

    def unauthorized(self) -> web.Response:
        return oauth_error(401, "invalid_token", "The access token is invalid or expired")


class PasswordIdP(Vendor):
    """A plain RFC 6749 IdP for the password grant (§4.3) and refresh (§6), no preset.

    Refresh answers carry no new refresh token (the client keeps its old one);
    ``refuse_refresh = True`` answers 400 invalid_grant.
    """

    preset = "password"
    default_lifetime = 900

    def __init__(
        self,
        username: str = "svc-user",
        password: str = "IdP-PASSWORD-marker",
        client_id: str = "idp-client",
        client_secret: str = "IdP-SECRET-marker",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.username, self.password = username, password
        self.client_id, self.client_secret = client_id, client_secret
        self.refuse_refresh = False
        self.refresh_tokens: set[str] = set()

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    def credentials(self) -> list[str]:
        return [self.password, self.client_secret]

    def extra_secrets(self) -> list[str]:
        return sorted(self.refresh_tokens)

    def provider_keys(self) -> dict[str, Any]:
        return {
            "grant": "password",
            "token_url": self.token_url,
            "username": self.username,
            "password": self.password,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }

    def token_endpoints(self) -> list[tuple[str, str, Handler]]:
        return [("/oauth/token", "token", self._token)]

    async def _token(self, request: web.Request) -> web.Response:
        rec = _last(self)
        form = rec.fields()
        if _basic(rec) != (self.client_id, self.client_secret):
            return oauth_error(401, "invalid_client", "Client authentication failed")
        if form.get("grant_type") == "password":
            if (form.get("username"), form.get("password")) != (self.username, self.password):
                return oauth_error(400, "invalid_grant", "Bad username or password")
            refresh = f"idp-rt-{secrets.token_urlsafe(12)}"
            self.refresh_tokens.add(refresh)
            return self._answer(form.get("scope", ""), refresh)
        if form.get("grant_type") == "refresh_token":
            if self.refuse_refresh or form.get("refresh_token") not in self.refresh_tokens:
                return oauth_error(400, "invalid_grant", "Refresh token expired")
            return self._answer("", None)
        return oauth_error(400, "unsupported_grant_type", "password or refresh_token")

    def _answer(self, scope: str, refresh: str | None) -> web.Response:
        access = self.issue(scope)
        body: dict[str, Any] = {"access_token": access.value, "token_type": "Bearer"}
        if refresh is not None:
            body["refresh_token"] = refresh
        return web.json_response(body | self.expires_in_field())
