"""One cached token per provider: single flight, refresh ahead, retry, cool-down.

Written once around any ``Grant``. The rules, in the order ``token()`` applies them:

1. A valid token is returned at once; when it nears expiry, one background
   refresh starts (refresh ahead) and callers keep getting the current token.
2. Without a valid token, callers share the one fetch in flight, or start it.
3. During a cool-down (after the IdP refused our credentials) no fetch starts:
   callers get a 503 with Retry-After, so a wrong secret does not hammer the IdP.

Transient failures (no answer, 5xx, 429) are retried with jittered exponential
backoff that honours Retry-After, bounded by ``retry.attempts`` and ``retry.max_time``.

Events passed to ``on_event(event, fields)`` (fields name the provider, never a token):
token_obtained, token_refreshed_ahead, token_renewed_after_401 (step, reason, expires_at),
token_fetch_failed (reason, code, status, outcome), cooldown_entered (code, seconds),
cooldown_left; the grants add token_request (step, outcome, code, duration) and
refresh_refused_login.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from proxy.config import RefreshAhead, Retry
from proxy.problems import TokenError
from proxy.tokens.grants import EventSink, Grant, TransientTokenError
from proxy.tokens.source import Clock, Token

Sleep = Callable[[float], Awaitable[None]]
MAX_BACKGROUND_BACKOFF = 300.0

# why a fetch runs → the event its success emits
_SUCCESS_EVENT = {
    "ahead": "token_refreshed_ahead",
    "rejected": "token_renewed_after_401",
}


class CachedTokenSource:
    """A ``TokenSource`` keeping one provider's token; safe for any number of concurrent callers."""

    def __init__(
        self,
        name: str,
        grant: Grant,
        *,
        clock: Clock,
        refresh_ahead: RefreshAhead,
        retry: Retry,
        cooldown: float,
        sleep: Sleep = asyncio.sleep,
        on_event: EventSink | None = None,
    ) -> None:
        self.name = name
        self._grant = grant
        self._clock = clock
        self._ahead = refresh_ahead
        self._retry = retry
        self._cooldown = cooldown
        self._sleep = sleep
        self._on_event = on_event
        self._token: Token | None = None
        self._rejected = False  # the upstream refused self._token (invalidate)
        self._refresh_due = math.inf  # refresh ahead after this time
        self._inflight: asyncio.Task[Token] | None = None
        self._cooldown_until: float | None = None
        self._last_failure: TokenError | None = None
        self._last_step: str | None = None
        self._bg_failures = 0
        self._bg_not_before = 0.0
        self._jitter = wait_random_exponential(
            multiplier=retry.initial_backoff, max=retry.max_backoff
        )

    def __repr__(self) -> str:
        return f"<CachedTokenSource {self.name!r} {self.state()['state']}>"

    # -- the TokenSource protocol -------------------------------------------

    async def token(self) -> Token:
        """A token valid now; raises ``TokenError`` when none can be had."""
        now = self._clock()
        current = self._usable(now)
        if current is not None:
            if now > self._refresh_due:
                self._refresh_in_background(now)
            return current
        task = self._inflight
        if task is None:
            self._check_cooldown(now)
            reason = "cold" if self._token is None else "rejected" if self._rejected else "expired"
            task = self._start(reason)
        return await asyncio.shield(task)  # a caller giving up does not cancel it for the rest

    def invalidate(self, stale: Token) -> None:
        """Forget ``stale`` if it is still current, so N rejections of one token renew once."""
        current = self._token
        if current is None or self._rejected:
            return
        if stale is current or stale.value == current.value:
            self._rejected = True

    # -- admin ----------------------------------------------------------------

    async def renew(self, *, login: bool = False) -> Token:
        """Fetch a new token now (an operator asked), sharing a fetch in flight. A cool-down
        holds here too: whoever reaches the admin endpoint, however often, cannot make a
        refused password or secret hit the IdP again before it ends. ``login`` tests the
        credentials themselves: no refresh token is used."""
        task = self._inflight
        if task is None:
            self._check_cooldown(self._clock())
            task = self._start("tested" if login else "forced")
        return await asyncio.shield(task)

    def state(self) -> dict[str, Any]:
        """What the admin endpoint shows; never the token."""
        now = self._clock()
        tok = self._token
        finite = tok is not None and math.isfinite(tok.expires_at)
        failure = self._last_failure
        return {
            "provider": self.name,
            "state": self._state_name(now),
            "expires_at": tok.expires_at if tok is not None and finite else None,
            "seconds_left": round(tok.expires_at - now, 3) if tok is not None and finite else None,
            "last_step": self._last_step,
            "last_error": None if failure is None else (failure.code or "error"),
            "last_error_detail": None if failure is None else failure.detail,
            "last_error_vendor_detail": None if failure is None else failure.vendor_detail,
            "cooldown_seconds_left": self._cooldown_left(now),
            "refresh_in_seconds": (
                round(self._refresh_due - now, 3) if math.isfinite(self._refresh_due) else None
            ),
        }

    async def aclose(self) -> None:
        """Cancel a fetch in flight (shutdown, or the provider was removed)."""
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TokenError):
                await task

    # -- decisions --------------------------------------------------------------

    def _usable(self, now: float) -> Token | None:
        tok = self._token
        if tok is None or self._rejected or now >= tok.expires_at:
            return None
        return tok

    def _refresh_at(self, tok: Token) -> float:
        """When to refresh ahead: once less than max(fraction * lifetime, min_seconds) is left,
        capped at half the lifetime so a short-lived token is not due the moment it arrives."""
        lifetime = tok.lifetime()
        if not math.isfinite(lifetime):
            return math.inf
        margin = min(max(self._ahead.fraction * lifetime, self._ahead.min_seconds), lifetime / 2)
        return tok.expires_at - margin

    def _refresh_in_background(self, now: float) -> None:
        busy = self._inflight is not None or self._cooldown_left(now) is not None
        if not busy and now >= self._bg_not_before:
            self._start("ahead")

    def _check_cooldown(self, now: float) -> None:
        left = self._cooldown_left(now)
        if left is None:
            return
        failure = self._last_failure
        code = failure.code if failure is not None else None
        raise TokenError(
            self.name,
            f"provider {self.name}: the token endpoint refused our credentials ({code or 'error'});"
            f" not asking again for {math.ceil(left)} s",
            code=code,
            status=503,
            retry_after=left,
            credential_failure=failure is not None and failure.credential_failure,
        )

    def _cooldown_left(self, now: float) -> float | None:
        until = self._cooldown_until
        if until is None:
            return None
        if now < until:
            return until - now
        self._cooldown_until = None
        self._emit("cooldown_left")
        return None

    def _state_name(self, now: float) -> str:
        if self._inflight is not None:
            return "refreshing"
        if self._usable(now) is not None:
            return "valid"
        if self._cooldown_left(now) is not None:
            return "cooldown"
        return "empty" if self._token is None else "expired"

    # -- the one fetch in flight ------------------------------------------------

    def _start(self, reason: str) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._fetch(reason))
        self._inflight = task
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Token]) -> None:
        if self._inflight is task:  # cancelled, or failed unexpectedly
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here: a background failure has no awaiting caller

    async def _fetch(self, reason: str) -> Token:
        """The one fetch in flight; it clears ``_inflight`` itself, before anyone hears of it."""
        current = None if reason == "tested" else self._token
        try:
            token, step = await self._fetch_with_retries(current)
        except TransientTokenError as exc:
            self._inflight = None
            raise self._failed(reason, self._gave_up(exc)) from None
        except TokenError as exc:
            self._inflight = None
            raise self._failed(reason, exc, cooldown=True) from None
        self._inflight = None
        self._token, self._rejected = token, False
        self._refresh_due = self._refresh_at(token)
        self._last_step, self._last_failure = step, None
        self._bg_failures, self._bg_not_before = 0, 0.0
        if self._cooldown_until is not None:
            self._cooldown_until = None
            self._emit("cooldown_left")
        expires_at = token.expires_at if math.isfinite(token.expires_at) else None
        event = _SUCCESS_EVENT.get(reason, "token_obtained")
        self._emit(event, step=step, reason=reason, expires_at=expires_at)
        return token

    async def _fetch_with_retries(self, current: Token | None) -> tuple[Token, str]:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientTokenError),
            wait=self._wait,
            stop=stop_any(
                stop_after_attempt(self._retry.attempts),
                stop_after_delay(self._retry.max_time),
                _StopBeforeSleepingPast(self._retry.max_time),
            ),
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._grant.fetch(current)
        raise AssertionError("tenacity neither returned nor raised")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        """Jittered exponential backoff, never shorter than the IdP's Retry-After."""
        backoff = self._jitter(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        hint = exc.retry_after if isinstance(exc, TransientTokenError) else None
        return max(backoff, hint or 0.0)

    def _gave_up(self, exc: TransientTokenError) -> TokenError:
        answered = exc.idp_status is not None
        return TokenError(
            self.name,
            f"{exc.detail} (gave up after retrying)",
            code=f"http_{exc.idp_status}" if answered else None,
            status=502 if answered else 503,
            retry_after=exc.retry_after,
            vendor_detail=exc.vendor_detail,
        )

    def _failed(self, reason: str, exc: TokenError, *, cooldown: bool = False) -> TokenError:
        now = self._clock()
        self._last_failure = exc
        self._emit(
            "token_fetch_failed", reason=reason, code=exc.code, status=exc.status, outcome="error"
        )
        if reason == "ahead":
            self._bg_failures += 1
            backoff = max(self._retry.max_backoff, 1.0) * 2 ** (self._bg_failures - 1)
            self._bg_not_before = now + min(backoff, MAX_BACKGROUND_BACKOFF)
        if cooldown and self._cooldown > 0:
            self._cooldown_until = now + self._cooldown
            self._emit("cooldown_entered", code=exc.code, seconds=self._cooldown)
        return exc

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, {"provider": self.name, **fields})


class _StopBeforeSleepingPast(stop_base):
    """Stop rather than sleep past ``max_time``; counts planned sleeps, so injected ones count."""

    def __init__(self, max_time: float) -> None:
        self.max_time = max_time

    def __call__(self, retry_state: RetryCallState) -> bool:
        return retry_state.idle_for + retry_state.upcoming_sleep > self.max_time
