"""The token cache against real emulators: single flight, refresh ahead, retry, cool-down."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy.config import Provider, RefreshAhead, Retry
from proxy.problems import TokenError, problem_body
from proxy.tokens.cache import CachedTokenSource
from proxy.tokens.grants import make_grant
from proxy.tokens.registry import TokenRegistry
from proxy.tokens.source import Token
from tests.vendors import (
    Events,
    FakeClock,
    RecordedSleep,
    Simacan,
    SimpleDocs,
    Simplifi,
    Sipsim,
    Vendor,
    leaks,
    serve,
)


@dataclass
class Rig:
    """A cache over one emulated vendor, with the clock, sleeps and events it used."""

    vendor: Vendor
    source: CachedTokenSource
    clock: FakeClock
    sleep: RecordedSleep
    events: Events
    errors: list[str] = field(default_factory=list)

    async def token(self) -> Token:
        try:
            return await self.source.token()
        except TokenError as exc:
            self.errors += [str(exc), repr(exc), problem_body(exc, "rid").decode()]
            raise


def build(
    vendor: Vendor,
    session: aiohttp.ClientSession,
    provider: Provider | None = None,
    **overrides: Any,
) -> Rig:
    clock = vendor.clock
    assert isinstance(clock, FakeClock)
    events, sleep = Events(), RecordedSleep(clock)
    provider = provider or vendor.provider(**overrides)
    grant = make_grant(provider, session, clock=clock, on_event=events)
    source = CachedTokenSource(
        provider.name,
        grant,
        clock=clock,
        refresh_ahead=provider.refresh_ahead,
        retry=provider.retry,
        cooldown=provider.cooldown,
        sleep=sleep,
        on_event=events,
    )
    return Rig(vendor, source, clock, sleep, events)


@pytest.fixture
async def sipsim(session: aiohttp.ClientSession) -> AsyncIterator[Rig]:
    async with serve(Sipsim(clock=FakeClock())) as v:
        yield build(v, session)


@pytest.fixture
async def simacan(session: aiohttp.ClientSession) -> AsyncIterator[Rig]:
    async with serve(Simacan(clock=FakeClock())) as v:
        yield build(v, session)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- single flight ---------------------------------------------------------------


async def test_1000_cold_callers_make_one_token_request(sipsim: Rig) -> None:
    tokens = await asyncio.gather(*(sipsim.token() for _ in range(1000)))
    assert sipsim.vendor.calls["token"] == 1
    assert {t.value for t in tokens} == {sipsim.vendor.issued[0].value}
    assert sipsim.events.names().count("token_obtained") == 1


async def test_valid_token_is_reused_until_refresh_ahead(sipsim: Rig) -> None:
    first = await sipsim.token()
    sipsim.clock.advance(7200 - 721)  # 10 % of 7200 s is 720 s: not yet due
    assert await sipsim.token() is first
    assert sipsim.vendor.calls["token"] == 1


async def test_expired_token_blocks_callers_until_the_new_one(sipsim: Rig) -> None:
    first = await sipsim.token()
    sipsim.clock.advance(7200)
    tokens = await asyncio.gather(*(sipsim.token() for _ in range(50)))
    assert {t.value for t in tokens} == {sipsim.vendor.issued[1].value} != {first.value}
    assert sipsim.vendor.calls["token"] == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(sipsim: Rig) -> None:
    sipsim.vendor.hold = asyncio.Event()
    arrived = sipsim.events.expect("token_obtained")
    impatient = asyncio.create_task(sipsim.token())
    patient = asyncio.create_task(sipsim.token())
    await asyncio.sleep(0)  # one yield: both callers now wait on the fetch impatient started
    assert sipsim.source.state()["state"] == "refreshing"
    impatient.cancel()
    sipsim.vendor.hold.set()
    await arrived
    assert (await patient).value == sipsim.vendor.issued[0].value
    assert impatient.cancelled() and sipsim.vendor.calls["token"] == 1


# -- refresh ahead ----------------------------------------------------------------


async def test_refresh_ahead_serves_the_current_token_and_refreshes_once(sipsim: Rig) -> None:
    first = await sipsim.token()
    sipsim.clock.advance(7200 - 700)  # inside the 720 s margin
    sipsim.vendor.hold = asyncio.Event()  # the IdP is slow
    done = sipsim.events.expect("token_refreshed_ahead")
    async with asyncio.timeout(10):  # would hang if a caller waited for the refresh
        served = await asyncio.gather(*(sipsim.token() for _ in range(100)))
    assert {t.value for t in served} == {first.value}
    assert sipsim.source.state()["state"] == "refreshing"
    sipsim.vendor.hold.set()
    await done
    assert sipsim.vendor.calls["token"] == 2
    assert (await sipsim.token()).value == sipsim.vendor.issued[1].value


async def test_refresh_ahead_min_seconds_and_cap(session: aiohttp.ClientSession) -> None:
    async with serve(Simplifi(clock=FakeClock(), lifetime=100)) as v:
        ahead = {"fraction": 0.01, "min_seconds": 500}  # capped to half of the 100 s life
        rig = build(v, session, refresh_ahead=ahead)
        await rig.token()
        rig.clock.advance(49)
        await rig.token()
        assert v.calls["token"] == 1  # 51 s left, margin 50 s
        done = rig.events.expect("token_refreshed_ahead")
        rig.clock.advance(2)
        await rig.token()
        await done
        assert v.calls["token"] == 2


async def test_still_valid_token_served_while_idp_fails(sipsim: Rig) -> None:
    first = await sipsim.token()
    sipsim.clock.advance(7200 - 700)
    sipsim.vendor.fail_next(500, times=3)
    failed = sipsim.events.expect("token_fetch_failed")
    assert await sipsim.token() is first
    await failed
    state = sipsim.source.state()
    assert (state["state"], state["last_error"]) == ("valid", "http_500")
    assert sipsim.vendor.calls["token"] == 4
    assert await sipsim.token() is first  # backing off: no new attempt yet
    assert sipsim.vendor.calls["token"] == 4
    sipsim.clock.advance(10)  # past the background backoff (retry.max_backoff, 5 s)
    done = sipsim.events.expect("token_refreshed_ahead")
    assert await sipsim.token() is first
    await done
    assert sipsim.source.state()["last_error"] is None
    assert (await sipsim.token()).value == sipsim.vendor.issued[-1].value


async def test_only_an_expired_token_stops_traffic(sipsim: Rig) -> None:
    await sipsim.token()
    sipsim.clock.advance(7200)
    sipsim.vendor.fail_next(503, times=3)
    with pytest.raises(TokenError) as err:
        await sipsim.token()
    assert err.value.status == 502 and err.value.code == "http_503"
    assert sipsim.source.state()["state"] == "expired"


# -- invalidate ---------------------------------------------------------------------


async def test_invalidate_with_a_stale_token_is_a_no_op(sipsim: Rig) -> None:
    first = await sipsim.token()
    sipsim.source.invalidate(first)
    second = await sipsim.token()
    assert second.value != first.value
    sipsim.source.invalidate(first)  # a late 401 for the old token
    assert await sipsim.token() is second
    assert sipsim.vendor.calls["token"] == 2
    assert sipsim.events.names().count("token_renewed_after_401") == 1


async def test_200_concurrent_invalidations_renew_once(sipsim: Rig) -> None:
    first = await sipsim.token()
    sipsim.vendor.revoke_all()

    async def rejected_then_retry() -> Token:
        sipsim.source.invalidate(first)
        return await sipsim.token()

    tokens = await asyncio.gather(*(rejected_then_retry() for _ in range(200)))
    assert sipsim.vendor.calls["token"] == 2
    assert {t.value for t in tokens} == {sipsim.vendor.issued[1].value}
    assert sipsim.events.names().count("token_renewed_after_401") == 1


async def test_simacan_renewal_after_401_refreshes_then_logs_in(simacan: Rig) -> None:
    first = await simacan.token()
    simacan.source.invalidate(first)
    second = await simacan.token()
    assert (simacan.vendor.calls["password"], simacan.vendor.calls["refresh"]) == (1, 1)
    assert simacan.source.state()["last_step"] == "refresh"
    assert isinstance(simacan.vendor, Simacan)
    simacan.vendor.refuse_refresh = True
    simacan.source.invalidate(second)
    third = await simacan.token()
    assert third.value == simacan.vendor.issued[-1].value
    assert (simacan.vendor.calls["password"], simacan.vendor.calls["refresh"]) == (2, 2)
    assert simacan.events.names().count("refresh_refused_login") == 1


# -- retries -----------------------------------------------------------------------


async def test_transient_failures_are_retried_then_succeed(sipsim: Rig) -> None:
    sipsim.vendor.fail_next(500, times=2)
    token = await sipsim.token()
    assert token.value == sipsim.vendor.issued[0].value
    assert sipsim.vendor.calls["token"] == 3 and len(sipsim.sleep.sleeps) == 2
    assert all(0 <= s <= 5 for s in sipsim.sleep.sleeps)  # jittered, capped by max_backoff
    outcomes = [f["outcome"] for f in sipsim.events.of("token_request")]
    assert outcomes == ["transient", "transient", "success"]


async def test_retry_after_is_honoured(sipsim: Rig) -> None:
    sipsim.vendor.fail_next(429, headers={"Retry-After": "4"})
    sipsim.vendor.fail_next(503, headers={"Retry-After": "2"})
    await sipsim.token()
    assert sipsim.sleep.sleeps[0] >= 4 and sipsim.sleep.sleeps[1] >= 2


async def test_retries_stop_before_max_time(session: aiohttp.ClientSession) -> None:
    async with serve(Sipsim(clock=FakeClock())) as v:
        rig = build(v, session, retry={"attempts": 10, "max_time": 10})
        v.fail_next(503, headers={"Retry-After": "4"}, times=10)
        with pytest.raises(TokenError) as err:
            await rig.token()
    assert rig.sleep.sleeps == [4, 4] and v.calls["token"] == 3
    assert err.value.status == 502 and err.value.retry_after == 4
    assert err.value.headers["Retry-After"] == "4"


async def test_unreachable_idp_gives_503_after_attempts(session: aiohttp.ClientSession) -> None:
    vendor = Sipsim(clock=FakeClock())
    provider = vendor.provider(token_url=f"http://127.0.0.1:{closed_port()}/oauth/token")
    rig = build(vendor, session, provider)
    with pytest.raises(TokenError) as err:
        await rig.token()
    assert err.value.status == 503 and err.value.code is None
    assert len(rig.sleep.sleeps) == 2  # three attempts
    assert rig.source.state()["state"] == "empty"


# -- cool-down ----------------------------------------------------------------------


async def test_credential_failure_cools_down_without_calling_the_vendor(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(SimpleDocs(clock=FakeClock())) as v:
        rig = build(v, session, client_secret="wrong-SECRET-marker", cooldown=30)
        with pytest.raises(TokenError) as err:
            await rig.token()
        assert (err.value.status, err.value.code) == (502, "invalid_client")
        assert err.value.credential_failure and rig.sleep.sleeps == []  # not retried
        rig.clock.advance(10)
        for _ in range(5):
            with pytest.raises(TokenError) as err:
                await rig.token()
            assert err.value.status == 503 and err.value.headers["Retry-After"] == "20"
            assert err.value.code == "invalid_client"
        assert v.calls["token"] == 1
        assert rig.source.state()["state"] == "cooldown"
        rig.clock.advance(20)
        with pytest.raises(TokenError) as err:
            await rig.token()
        assert err.value.status == 502 and v.calls["token"] == 2
    assert rig.events.names().count("cooldown_entered") == 2
    assert rig.events.names().count("cooldown_left") == 1
    assert not leaks(" ".join(rig.errors) + repr(rig.events.seen), ["wrong-SECRET-marker"])


async def test_forced_renew_honours_the_cooldown_then_clears_it(sipsim: Rig) -> None:
    sipsim.vendor.fail_next(401, {"error": "invalid_client"})
    with pytest.raises(TokenError):
        await sipsim.token()
    for _ in range(10):  # an admin endpoint called in a loop: not one more IdP call
        with pytest.raises(TokenError) as err:
            await sipsim.source.renew()
        assert err.value.status == 503 and "Retry-After" in err.value.headers
    assert sipsim.vendor.calls["token"] == 1
    sipsim.clock.advance(sipsim.source.state()["cooldown_seconds_left"])
    token = await sipsim.source.renew()
    assert sipsim.vendor.calls["token"] == 2
    assert token.value == sipsim.vendor.issued[0].value
    assert sipsim.source.state()["state"] == "valid"
    assert "cooldown_left" in sipsim.events.names()
    assert await sipsim.token() is token


# -- state and secrecy ---------------------------------------------------------------


async def test_state_reports_without_the_token(simacan: Rig) -> None:
    assert simacan.source.state()["state"] == "empty"
    token = await simacan.token()
    state = simacan.source.state()
    assert state["state"] == "valid" and state["last_step"] == "login"
    assert state["expires_at"] == token.expires_at and state["seconds_left"] == 3600
    simacan.clock.advance(3600)
    assert simacan.source.state()["state"] == "expired"
    assert not leaks(repr(state) + repr(simacan.source), simacan.vendor.secret_values())


async def test_static_source_never_renews(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    provider = Provider(name="legacy", grant="static", token="static-TOKEN-marker")
    source = CachedTokenSource(
        "legacy",
        make_grant(provider, session, clock=clock),
        clock=clock,
        refresh_ahead=RefreshAhead(),
        retry=Retry(),
        cooldown=30,
    )
    first = await source.token()
    clock.advance(10 * 365 * 86400)
    assert await source.token() is first
    assert source.state()["expires_at"] is None and source.state()["state"] == "valid"


async def test_nothing_secret_in_errors_events_reprs_or_state(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(Simacan(clock=FakeClock())) as v:
        rig = build(v, session)
        token = await rig.token()
        rig.source.invalidate(token)
        await rig.token()
        v.refuse_refresh = True
        rig.clock.advance(3600)
        await rig.token()
        v.fail_next(401, {"error": "invalid_grant", "error_description": v.password})
        rig.source.invalidate(await rig.token())
        v.fail_next(401, {"error": "invalid_grant", "error_description": v.password})
        with pytest.raises(TokenError):
            await rig.token()
        with pytest.raises(TokenError):
            await rig.token()  # cool-down
        text = " ".join(
            [*rig.errors, repr(rig.events.seen), repr(rig.source), repr(rig.source.state())]
        )
    assert len(v.secret_values()) >= 6
    assert not leaks(text, v.secret_values())


# -- registry -----------------------------------------------------------------------


async def test_registry_rebuild_keeps_unchanged_sources(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with serve(Sipsim(clock=clock)) as a, serve(SimpleDocs(clock=clock)) as b:
        providers = {"sipsim": a.provider(), "docs": b.provider(name="docs")}
        registry = TokenRegistry(providers, session, clock=clock)
        await registry.sources["sipsim"].token()
        await registry.sources["docs"].token()
        changed = {
            "sipsim": a.provider(),
            "docs": b.provider(name="docs", scope="read"),
            "static": Provider(name="static", grant="static", token="t"),
        }
        rebuilt = registry.rebuild(changed)
        assert rebuilt.sources["sipsim"] is registry.sources["sipsim"]
        assert rebuilt.sources["docs"] is not registry.sources["docs"]
        assert registry.retired(rebuilt) == [registry.sources["docs"]]
        await rebuilt.sources["sipsim"].token()
        await rebuilt.sources["docs"].token()
        assert (a.calls["token"], b.calls["token"]) == (1, 2)  # no new login for sipsim
        assert set(rebuilt.state()) == {"sipsim", "docs", "static"}
        assert not leaks(repr(rebuilt) + repr(rebuilt.state()), a.secret_values())
        await rebuilt.aclose()
