"""What happened lately, for the status page: per-route rates, errors, replays and latency
over the last 1 and 5 minutes, the proxy's own last 50 error answers, token calls in the
last hour and each provider's last renewal.

Prometheus keeps the long history; this keeps just enough to answer "what is it doing now"
without one. Counts go into ten-second slots of a ring, so a request costs a dict lookup and
a few additions; the event loop is the only writer, so nothing here takes a lock. Nothing
from a request's headers, query or body is kept: route prefix, status, problem slug, id.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.forward.exchange import Exchange

SLOT = 10.0  # seconds per slot
SLOTS = 30  # five minutes of them
LAST_ERRORS = 50
TOKEN_WINDOW = 3600.0
QUANTILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REPLAY_KINDS = ("succeeded", "unauthorized_again")  # anything else: not replayable
NOT_COUNTED_ERRORS = frozenset({"", "client_gone"})  # the client left: no answer was made
RENEWAL_EVENTS = frozenset({"token_obtained", "token_refreshed_ahead", "token_renewed_after_401"})
WHY = {  # the cache's reason for a fetch → how the page says it
    "cold": "first token",
    "expired": "expired",
    "rejected": "after 401",
    "ahead": "ahead",
    "forced": "forced",
}


@dataclass(slots=True)
class _Slot:
    """One route's counts for one ten-second slot."""

    start: float
    requests: int = 0
    errors: int = 0  # 5xx answers, the proxy's own or the vendor's
    replays: dict[str, int] = field(default_factory=dict)
    durations: list[int] = field(default_factory=lambda: [0] * (len(QUANTILE_BUCKETS) + 1))


class RecentRequests:
    """Rolling per-route figures and the last error answers the proxy made itself."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._routes: dict[str, deque[_Slot]] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=LAST_ERRORS)

    def observe(self, ex: Exchange, duration: float) -> None:
        now = self._wall()
        slot = self._slot(ex.route or "none", now)
        slot.requests += 1
        if ex.status >= 500:
            slot.errors += 1
        if ex.replay_outcome:
            slot.replays[ex.replay_outcome] = slot.replays.get(ex.replay_outcome, 0) + 1
        slot.durations[bisect_left(QUANTILE_BUCKETS, duration)] += 1
        if ex.status >= 400 and ex.error not in NOT_COUNTED_ERRORS:
            self.errors.appendleft(
                {
                    "time": now,
                    "request_id": ex.request_id,
                    "route": ex.route or "none",
                    "problem": ex.error,
                    "status": ex.status,
                }
            )

    def _slot(self, route: str, now: float) -> _Slot:
        ring = self._routes.get(route)
        if ring is None:
            ring = self._routes[route] = deque(maxlen=SLOTS)
        start = now - now % SLOT
        if not ring or ring[-1].start != start:
            ring.append(_Slot(start))
        return ring[-1]

    def routes(self) -> dict[str, dict[str, Any]]:
        """Per route: rates and error ratio over 1 and 5 minutes, replays, p50/p95."""
        now = self._wall()
        return {route: _summary(ring, now) for route, ring in self._routes.items()}


def _summary(ring: deque[_Slot], now: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, window in (("1m", 60.0), ("5m", 300.0)):
        slots = [s for s in ring if s.start > now - window]
        n = sum(s.requests for s in slots)
        errors = sum(s.errors for s in slots)
        out[f"rps_{label}"] = round(n / window, 3)
        out[f"error_ratio_{label}"] = round(errors / n, 4) if n else 0.0
    recent = [s for s in ring if s.start > now - 300.0]
    replays = {kind: 0 for kind in (*REPLAY_KINDS, "not_replayable")}
    for s in recent:
        for outcome, n in s.replays.items():
            kind = outcome if outcome in REPLAY_KINDS else "not_replayable"
            replays[kind] += n
    out["replays_5m"] = replays
    counts = [sum(col) for col in zip(*(s.durations for s in recent), strict=False)]
    out["p50_seconds"] = _quantile(counts, 0.5)
    out["p95_seconds"] = _quantile(counts, 0.95)
    return out


def _quantile(counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (as Prometheus would bound it)."""
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= q * total:
            return QUANTILE_BUCKETS[i] if i < len(QUANTILE_BUCKETS) else float("inf")
    return None


class RecentTokens:
    """Per provider: token endpoint calls in the last hour, and the last renewal and why."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._calls: dict[str, deque[float]] = {}
        self.last_renewal: dict[str, dict[str, Any]] = {}

    def event(self, event: str, fields: Mapping[str, object]) -> None:
        provider = str(fields.get("provider") or "")
        now = self._wall()
        if event == "token_request":
            calls = self._calls.setdefault(provider, deque())
            calls.append(now)
            while calls and calls[0] < now - TOKEN_WINDOW:
                calls.popleft()
        if event in RENEWAL_EVENTS:
            reason = str(fields.get("reason") or "")
            why = WHY.get(reason, reason)
            self.last_renewal[provider] = {"time": now, "why": why, "step": fields.get("step")}

    def calls_last_hour(self, provider: str) -> int:
        calls = self._calls.get(provider)
        if not calls:
            return 0
        cutoff = self._wall() - TOKEN_WINDOW
        return sum(1 for t in calls if t >= cutoff)
