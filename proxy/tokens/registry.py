"""The token sources of one configuration, rebuilt on reload without needless logins."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any

import aiohttp

from proxy.config import Provider
from proxy.tokens.cache import CachedTokenSource, Sleep
from proxy.tokens.discovery import Discovery
from proxy.tokens.grants import EventSink, make_grant
from proxy.tokens.source import Clock, system_clock


class TokenRegistry:
    """One ``CachedTokenSource`` per configured provider, by provider name."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        session: aiohttp.ClientSession,
        *,
        clock: Clock = system_clock,
        on_event: EventSink | None = None,
        sleep: Sleep = asyncio.sleep,
        _keep: Mapping[str, tuple[str, CachedTokenSource]] | None = None,
        _discoveries: Mapping[str, Discovery] | None = None,
    ) -> None:
        self._session = session
        self._clock = clock
        self._on_event = on_event
        self._sleep = sleep
        self._fingerprints: dict[str, str] = {}
        self._known = dict(_discoveries or {})  # by what a document depends on: kept if equal
        self.discoveries: dict[str, Discovery] = {}
        self.sources: dict[str, CachedTokenSource] = {}
        for name, provider in providers.items():
            fingerprint = _fingerprint(provider)
            kept = (_keep or {}).get(name)
            if kept is not None and kept[0] == fingerprint:
                source = kept[1]
                self._discovery(provider)  # the one its grant holds, found by its key
            else:
                source = self._build(name, provider)
            self.sources[name] = source
            self._fingerprints[name] = fingerprint

    def __repr__(self) -> str:
        return f"<TokenRegistry {sorted(self.sources)}>"

    def rebuild(self, new_providers: Mapping[str, Provider]) -> TokenRegistry:
        """A registry for a new config that keeps the sources (and tokens) of unchanged providers.

        Sources of removed or changed providers are not closed here: requests in
        flight may still hold them. ``retired(new)`` lists them for closing later.
        """
        keep = {name: (self._fingerprints[name], s) for name, s in self.sources.items()}
        return TokenRegistry(
            new_providers,
            self._session,
            clock=self._clock,
            on_event=self._on_event,
            sleep=self._sleep,
            _keep=keep,
            _discoveries=self.discoveries,
        )

    async def refresh_discovery(self) -> None:
        """Read every issuer's discovery document again (start, reload); failures keep the
        last good document and are logged by each ``Discovery``."""
        await asyncio.gather(*(d.refresh() for d in self.discoveries.values()))

    def retired(self, successor: TokenRegistry) -> list[CachedTokenSource]:
        """This registry's sources that ``successor`` no longer uses."""
        alive = {id(s) for s in successor.sources.values()}
        return [s for s in self.sources.values() if id(s) not in alive]

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: source.state() for name, source in self.sources.items()}

    async def aclose(self) -> None:
        """Cancel every fetch in flight (shutdown)."""
        for source in self.sources.values():
            await source.aclose()

    def _discovery(self, provider: Provider) -> Discovery | None:
        if provider.issuer is None:
            return None
        key = repr((provider.issuer, provider.tls, provider.timeout, provider.client_auth))
        found = self._known.get(key) or Discovery(provider, self._session, self._on_event)
        self.discoveries[key] = found
        return found

    def _build(self, name: str, provider: Provider) -> CachedTokenSource:
        grant = make_grant(
            provider,
            self._session,
            clock=self._clock,
            on_event=self._on_event,
            discovery=self._discovery(provider),
        )
        return CachedTokenSource(
            name,
            grant,
            clock=self._clock,
            refresh_ahead=provider.refresh_ahead,
            retry=provider.retry,
            cooldown=provider.cooldown,
            sleep=self._sleep,
            on_event=self._on_event,
        )


def _fingerprint(provider: Provider) -> str:
    """A digest of ``settings_key()``, so the secrets in it are not kept around in clear."""
    return hashlib.sha256(provider.settings_key().encode()).hexdigest()
