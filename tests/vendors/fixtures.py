"""Shared test helpers for token tests: a fake clock, recorded sleeps, captured events."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordedSleep:
    """An injectable ``sleep`` that records each delay and moves the clock instead of waiting."""

    clock: FakeClock
    sleeps: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)


@dataclass
class Events:
    """An ``on_event`` sink that keeps everything, for assertions and leak searches."""

    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _waiters: dict[str, asyncio.Event] = field(default_factory=dict)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.seen.append((event, dict(fields)))
        if event in self._waiters:
            self._waiters.pop(event).set()

    def expect(self, event: str) -> Coroutine[Any, Any, None]:
        """Register now, await later: how tests wait for background work without sleeping."""
        waiter = self._waiters.setdefault(event, asyncio.Event())

        async def wait() -> None:
            async with asyncio.timeout(10):  # a guard against hanging, not a timing assertion
                await waiter.wait()

        return wait()

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]

    def of(self, event: str) -> list[dict[str, Any]]:
        return [f for name, f in self.seen if name == event]


def leaks(text: str, secrets: list[str]) -> list[str]:
    """The secret values found in ``text``, shortened so a failing assert does not print them."""
    return [s[:6] + "…" for s in secrets if s and s in text]
