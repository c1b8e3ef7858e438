"""The one protocol the forwarder knows: give me a valid token; this one was rejected."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds since the epoch; injected so tests never sleep."""

    def __call__(self) -> float: ...


def system_clock() -> float:
    return time.time()


@dataclass(frozen=True, slots=True)
class Token:
    """An access token. ``value`` and ``refresh_token`` never appear in repr."""

    value: str = field(repr=False)
    expires_at: float
    obtained_at: float
    token_type: str = "Bearer"
    scope: str | None = None
    refresh_token: str | None = field(default=None, repr=False)

    @property
    def authorization(self) -> str:
        return f"Bearer {self.value}"

    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at


class TokenSource(Protocol):
    """A source of valid tokens, safe for concurrent use."""

    name: str

    async def token(self) -> Token:
        """A token valid now; raises ``proxy.problems.TokenError`` when none can be had."""
        ...

    def invalidate(self, stale: Token) -> None:
        """The upstream rejected ``stale``; renew only if it is still the current token."""
        ...
