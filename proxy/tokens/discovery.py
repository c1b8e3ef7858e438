"""OpenID Connect Discovery 1.0: the token endpoint an ``issuer`` publishes.

A provider given ``issuer`` instead of ``token_url`` reads
``{issuer}/.well-known/openid-configuration`` at start, again after every reload, and on its
first token request if neither has succeeded yet. The last good document is kept: an IdP
whose discovery document is unreachable for a while keeps working from it, and only a
provider that never read one fails (503, naming the provider and what failed), never the
proxy. A configured ``client_auth`` that the IdP does not list is logged as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from proxy.config import Provider, plain_remote
from proxy.problems import TokenError, os_reason
from proxy.tls import client_ssl, server_hostname

WELL_KNOWN = "/.well-known/openid-configuration"
# tokenrelay's client_auth → the name OIDC discovery lists it under
AUTH_METHOD_NAMES = {
    "basic": "client_secret_basic",
    "basic_raw": "client_secret_basic",
    "body": "client_secret_post",
    "private_key_jwt": "private_key_jwt",
    "client_secret_jwt": "client_secret_jwt",
    "tls_client_auth": "tls_client_auth",
}
_MAX_DOCUMENT = 1 << 20
Warn = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Document:
    token_endpoint: str
    auth_methods: frozenset[str] | None  # None: the IdP did not say


class DiscoveryFailed(Exception):
    """The document could not be read or does not say what it must; the text says why."""


class Discovery:
    """One issuer's discovery document, read once at a time and kept when a read fails."""

    def __init__(
        self,
        provider: Provider,
        session: aiohttp.ClientSession,
        warn: Warn | None = None,
    ) -> None:
        assert provider.issuer is not None
        self.issuer = provider.issuer.rstrip("/")
        self._provider = provider
        self._session = session
        self._warn = warn
        self._ssl = client_ssl(provider.tls)
        self._timeout = aiohttp.ClientTimeout(
            total=provider.timeout.connect + provider.timeout.read,
            sock_connect=provider.timeout.connect,
        )
        self._doc: Document | None = None
        self._lock = asyncio.Lock()
        self.last_error: str | None = None

    async def token_endpoint(self) -> str:
        """The token endpoint; reads the document first if no read has succeeded yet."""
        if self._doc is None:
            async with self._lock:
                if self._doc is None:
                    await self._read_or_raise()
        assert self._doc is not None
        return self._doc.token_endpoint

    async def refresh(self) -> None:
        """Read the document again (start, reload); a failure keeps the last good one."""
        async with self._lock:
            with contextlib.suppress(TokenError):
                await self._read_or_raise()

    async def _read_or_raise(self) -> None:
        try:
            doc = await self._read()
        except DiscoveryFailed as exc:
            self.last_error = str(exc)
            self._say("discovery_failed", detail=str(exc), kept_last_good=self._doc is not None)
            if self._doc is None:
                name = self._provider.name
                raise TokenError(
                    name, f"provider {name}: {exc}", status=503, code="discovery"
                ) from None
            return
        self.last_error = None
        self._doc = doc
        wanted = AUTH_METHOD_NAMES[self._provider.client_auth]
        if doc.auth_methods is not None and wanted not in doc.auth_methods:
            listed = ", ".join(sorted(doc.auth_methods))
            self._say(
                "client_auth_not_listed",
                client_auth=self._provider.client_auth,
                detail=f"{self.issuer} lists {listed} and not {wanted}",
            )

    async def _read(self) -> Document:
        url = self.issuer + WELL_KNOWN
        try:
            async with self._session.get(
                url,
                headers={"Accept": "application/json"},
                allow_redirects=False,
                ssl=self._ssl,
                server_hostname=server_hostname(self._provider.tls),
                timeout=self._timeout,
            ) as resp:
                body = await resp.content.read(_MAX_DOCUMENT)
                status = resp.status
        except TimeoutError:
            raise DiscoveryFailed(f"discovery at {url} timed out") from None
        except aiohttp.ClientError as exc:
            raise DiscoveryFailed(f"discovery at {url} failed: {_why(exc)}") from None
        if status != 200:
            raise DiscoveryFailed(f"discovery at {url} answered HTTP {status}")
        return self._parse(url, body)

    def _parse(self, url: str, body: bytes) -> Document:
        try:
            data = json.loads(body)
        except ValueError:
            raise DiscoveryFailed(f"discovery at {url} is not JSON") from None
        if not isinstance(data, dict):
            raise DiscoveryFailed(f"discovery at {url} is not a JSON object")
        if str(data.get("issuer", "")).rstrip("/") != self.issuer:  # OIDC Discovery §4.3
            raise DiscoveryFailed(f"discovery at {url} names another issuer")
        endpoint = data.get("token_endpoint")
        if not isinstance(endpoint, str) or URL(endpoint).scheme not in ("http", "https"):
            raise DiscoveryFailed(f"discovery at {url} has no usable token_endpoint")
        if plain_remote(endpoint) and not self._provider.allow_plain_http:
            raise DiscoveryFailed(f"discovery at {url} gives a plain-http token_endpoint")
        methods = data.get("token_endpoint_auth_methods_supported")
        listed = frozenset(str(m) for m in methods) if isinstance(methods, list) else None
        return Document(endpoint, listed)

    def _say(self, event: str, **fields: Any) -> None:
        if self._warn is not None:
            self._warn(event, {"provider": self._provider.name, "issuer": self.issuer, **fields})


def _why(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect to {exc.host}:{exc.port}: {os_reason(exc.os_error)}"
    return type(exc).__name__
