"""The emulators behave as the vendor docs say, and the grants send exactly what the docs ask.

Raw aiohttp clients talk to the emulators here, so a wrong emulator cannot hide a wrong grant.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest

from proxy.problems import TokenError
from proxy.tokens.grants import make_grant
from tests.vendors import Events, FakeClock, Simacan, SimpleDocs, Simplifi, Sipsim, serve

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    """Status and JSON body (None when the body is not JSON)."""
    async with session.post(url, **kw) as resp:
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, None


async def get(
    session: aiohttp.ClientSession, url: str, token: str, method: str = "GET"
) -> tuple[int, Any]:
    """Call the protected API with ``token``."""
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, url, headers=headers) as resp:
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, None


# -- Simacan ---------------------------------------------------------------------


async def test_simacan_login_answer_is_as_documented(session: aiohttp.ClientSession) -> None:
    async with serve(Simacan()) as v:
        form = {"username": v.username, "password": v.password}
        status, body = await post(session, v.token_url, data=form)
        assert status == 200
        assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
        assert body["expires_in"] == "3600" and body["token_type"] == "bearer"
        assert jwt.decode(body["access_token"], options={"verify_signature": False})["exp"]
        assert v.requests[-1].content_type == FORM
        status, _ = await post(session, v.token_url, data={**form, "grant_type": "password"})
        assert status == 400  # exactly username and password
        status, _ = await post(session, v.token_url, data={**form, "password": "wrong"})
        assert status == 401


async def test_simacan_refresh_rotates_and_kills_the_old_refresh_token(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(Simacan()) as v:
        _, first = await post(
            session, v.token_url, data={"username": v.username, "password": v.password}
        )
        status, second = await post(
            session, v.refresh_url, data={"refresh_token": first["refresh_token"]}
        )
        assert status == 200 and second["refresh_token"] != first["refresh_token"]
        status, _ = await post(
            session, v.refresh_url, data={"refresh_token": first["refresh_token"]}
        )
        assert status == 401
        status, _ = await get(session, f"{v.url}/api/v1/trips", second["access_token"])
        assert status == 200


async def test_simacan_grant_sends_exactly_the_documented_forms(
    session: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    async with serve(Simacan(clock=clock)) as v:
        grant = make_grant(v.provider(), session, clock=clock)
        token, _ = await grant.fetch(None)
        await grant.fetch(token)
        login, refresh = v.requests
        assert (login.endpoint, login.fields()) == (
            "password",
            {"username": v.username, "password": v.password},
        )
        assert (refresh.endpoint, refresh.fields()) == (
            "refresh",
            {"refresh_token": token.refresh_token},
        )
        assert login.content_type == refresh.content_type == FORM
        assert "Authorization" not in login.headers


# -- Simplifi --------------------------------------------------------------------


def _basic(client_id: str, secret: str) -> str:
    """What Simplifi's own example sends: requests' ``auth=(id, secret)``, parts as they are."""
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


async def test_simplifi_accepts_basic_only(session: aiohttp.ClientSession) -> None:
    async with serve(Simplifi()) as v:
        body_creds = {
            "grant_type": "client_credentials",
            "client_id": v.client_id,
            "client_secret": v.client_secret,
        }
        status, body = await post(session, v.token_url, data=body_creds)
        assert (status, body["error"]) == (401, "invalid_client")
        headers = {"Authorization": _basic(v.client_id, v.client_secret)}
        status, body = await post(
            session, v.token_url, data={"grant_type": "client_credentials"}, headers=headers
        )
        assert status == 200
        assert body["__type"] == "SSJSON_Token_Access" and body["expires_in"] == 3600
        assert {"refresh_token", "scope", "token_type"} <= set(body)


async def test_simplifi_grant_sends_basic_as_its_example_does(
    session: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    async with serve(Simplifi(clock=clock)) as v:
        await make_grant(v.provider(), session, clock=clock).fetch(None)
        rec = v.requests[-1]
        assert rec.fields() == {"grant_type": "client_credentials"}
        assert rec.headers["Authorization"] == _basic(v.client_id, v.client_secret)
        assert "+/%" in base64.b64decode(rec.headers["Authorization"][6:]).decode()


async def test_basic_client_auth_form_encodes_each_part(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with serve(Simplifi(clock=clock)) as v:
        with pytest.raises(TokenError):  # Simplifi takes its credentials as they are
            await make_grant(v.provider(client_auth="basic"), session, clock=clock).fetch(None)
        sent = base64.b64decode(v.requests[-1].headers["Authorization"][6:]).decode()
    assert sent == f"{quote_plus(v.client_id, safe='')}:{quote_plus(v.client_secret, safe='')}"


# -- SimpleDocs -------------------------------------------------------------------


async def test_simpledocs_scopes_and_problem_bodies(session: aiohttp.ClientSession) -> None:
    async with serve(SimpleDocs()) as v:
        creds = {"grant_type": "client_credentials", "client_id": v.client_id}
        status, body = await post(session, v.token_url, data={**creds, "client_secret": "nope"})
        assert (status, body["type"]) == (401, "invalid_client")
        creds["client_secret"] = v.client_secret
        _, read_only = await post(session, v.token_url, data=creds)
        assert read_only["scope"] == "read" and read_only["expires_in"] == 7200
        assert "created_at" in read_only
        _, both = await post(session, v.token_url, data={**creds, "scope": "read write"})
        assert both["scope"] == "read write"
        api = f"{v.url}/api/v1/workflows"
        assert (await get(session, api, read_only["access_token"], "POST"))[0] == 403
        status, body = await get(session, api, both["access_token"], "POST")
        assert status == 200 and body["method"] == "POST"
        v.revoke_all()
        status, body = await get(session, api, both["access_token"])
        assert status == 401 and body["type"] == "token_expired"


async def test_simpledocs_grant_puts_credentials_and_scope_in_the_body(
    session: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    async with serve(SimpleDocs(clock=clock)) as v:
        token, _ = await make_grant(v.provider(), session, clock=clock).fetch(None)
        rec = v.requests[-1]
        assert rec.fields() == {
            "grant_type": "client_credentials",
            "client_id": v.client_id,
            "client_secret": v.client_secret,
            "scope": "read write",
        }
        assert "Authorization" not in rec.headers
        assert token.scope == "read write"


# -- SIPSIM ----------------------------------------------------------------------


async def test_sipsim_rfc6749_errors_and_scoped_api(session: aiohttp.ClientSession) -> None:
    async with serve(Sipsim()) as v:
        creds = {"grant_type": "client_credentials", "client_id": v.client_id}
        status, body = await post(session, v.token_url, data={**creds, "client_secret": "x"})
        assert status == 401
        assert body == {
            "error": "invalid_client",
            "error_description": "Client authentication failed",
        }
        creds["client_secret"] = v.client_secret
        status, body = await post(session, v.token_url, data={**creds, "scope": "account.write"})
        assert (status, body["error"]) == (400, "invalid_scope")
        scope = "account.read calls.read phones.read"
        status, body = await post(session, v.token_url, data={**creds, "scope": scope})
        assert status == 200 and body["scope"] == scope and body["expires_in"] == 7200
        token = body["access_token"]
        assert (await get(session, f"{v.url}/api/v2/calls", token))[0] == 200
        assert (await get(session, f"{v.url}/api/v2/calls", token, "POST"))[0] == 403
        assert (await get(session, f"{v.url}/api/v2/tags", token))[0] == 403
        status, body = await get(session, f"{v.url}/api/v2/calls", "forged")
        assert (status, body["error"]) == (401, "invalid_token")


async def test_sipsim_grant_sends_extras_exactly(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with serve(Sipsim(clock=clock)) as v:
        provider = v.provider(
            scope="calls.read",
            audience="https://api.sipsim.example",
            token_params={"resource": "calls"},
            token_headers={"X-Tenant": "t-1"},
        )
        await make_grant(provider, session, clock=clock).fetch(None)
        rec = v.requests[-1]
        assert rec.fields() == {
            "grant_type": "client_credentials",
            "client_id": v.client_id,
            "client_secret": v.client_secret,
            "scope": "calls.read",
            "audience": "https://api.sipsim.example",
            "resource": "calls",
        }
        assert rec.headers["X-Tenant"] == "t-1"
        assert rec.headers["Accept"] == "application/json"


# -- emulator knobs ------------------------------------------------------------------


async def test_knobs_fail_next_hold_and_date(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with serve(Sipsim(clock=clock)) as v:
        v.server_time_offset = 120
        v.fail_next(429, {"error": "slow_down"}, headers={"Retry-After": "3"})
        async with session.post(v.token_url, data={}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "3"
            served = parsedate_to_datetime(resp.headers["Date"]).timestamp()
            assert served == int(clock() + 120)
        status, _ = await post(session, v.token_url, data={})
        assert status == 401  # the canned answer was used once
        assert v.calls["token"] == 2


async def test_grant_events_never_carry_values(session: aiohttp.ClientSession) -> None:
    clock, events = FakeClock(), Events()
    async with serve(Simacan(clock=clock)) as v:
        grant = make_grant(v.provider(), session, clock=clock, on_event=events)
        token, _ = await grant.fetch(None)
        await grant.fetch(token)
        assert [f["step"] for f in events.of("token_request")] == ["login", "refresh"]
        assert all(f["outcome"] == "success" for f in events.of("token_request"))
        text = repr(events.seen) + repr(grant) + repr(token)
        assert not [s for s in v.secret_values() if s in text]
