"""Grants against the vendor emulators: answers parsed once, failures classified once."""

from __future__ import annotations

import math
import socket
import ssl
from email.utils import formatdate
from pathlib import Path

import aiohttp
import jwt
import pytest
import trustme

from proxy.config import TLS, Provider
from proxy.problems import TokenError
from proxy.tls import client_ssl, server_hostname
from proxy.tokens.grants import (
    ClientCredentialsGrant,
    PasswordGrant,
    SimacanGrant,
    StaticGrant,
    TransientTokenError,
    make_grant,
)
from proxy.tokens.source import Token
from tests.vendors import (
    Events,
    FakeClock,
    PasswordIdP,
    Simacan,
    SimpleDocs,
    Simplifi,
    Sipsim,
    leaks,
    serve,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- dispatch and success paths ------------------------------------------------------


async def test_make_grant_picks_the_class_per_grant(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Simacan()) as simacan, serve(Sipsim()) as sipsim:
        cases = [
            (simacan.provider(), SimacanGrant),
            (sipsim.provider(), ClientCredentialsGrant),
            (PasswordIdP().provider(token_url="http://127.0.0.1:1/t"), PasswordGrant),
            (Provider(grant="static", token="k"), StaticGrant),
        ]
        for provider, kind in cases:
            assert type(make_grant(provider, session, clock=clock)) is kind


async def test_client_credentials_ignores_extra_fields_and_refresh_token(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Simplifi(clock=clock)) as v:
        token, step = await make_grant(v.provider(), session, clock=clock).fetch(None)
    assert step == "client_credentials"
    assert token.value == v.issued[0].value
    assert token.refresh_token is None  # Simplifi sends one; re-authenticating is the way
    assert (token.obtained_at, token.expires_at) == (clock(), clock() + 3600)
    assert token.scope == "read" and token.token_type == "Bearer"


async def test_simacan_string_expires_in_and_rotation(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Simacan(clock=clock)) as v:
        grant = make_grant(v.provider(), session, clock=clock)
        first, step = await grant.fetch(None)
        assert step == "login" and first.expires_at == clock() + 3600
        second, step = await grant.fetch(first)
        assert step == "refresh"
        assert second.refresh_token != first.refresh_token
        assert first.refresh_token in v.dead_refresh_tokens
        assert second.refresh_token in v.live_refresh_tokens
        assert (v.calls["password"], v.calls["refresh"]) == (1, 1)


async def test_simacan_refused_refresh_logs_in_once(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    events = Events()
    async with serve(Simacan(clock=clock)) as v:
        grant = make_grant(v.provider(), session, clock=clock, on_event=events)
        first, _ = await grant.fetch(None)
        v.refuse_refresh = True
        token, step = await grant.fetch(first)
        assert step == "login" and token.value == v.issued[-1].value
        assert (v.calls["password"], v.calls["refresh"]) == (2, 1)
        assert events.names().count("refresh_refused_login") == 1


async def test_simacan_wrong_password_is_a_credential_failure(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Simacan(clock=clock)) as v:
        grant = make_grant(v.provider(password="wrong-password-marker"), session, clock=clock)
        with pytest.raises(TokenError) as err:
            await grant.fetch(None)
    assert not isinstance(err.value, TransientTokenError)
    assert err.value.credential_failure and err.value.status == 502
    assert "simacan" in str(err.value) and "401" in str(err.value)
    assert "wrong-password-marker" not in str(err.value)


async def test_password_grant_refresh_keeps_refresh_token_and_falls_back(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(PasswordIdP(clock=clock)) as v:
        grant = make_grant(v.provider(scope="profile"), session, clock=clock)
        first, step = await grant.fetch(None)
        assert step == "login" and v.requests[-1].fields() == {
            "grant_type": "password",
            "username": v.username,
            "password": v.password,
            "scope": "profile",
        }
        second, step = await grant.fetch(first)
        assert step == "refresh" and second.refresh_token == first.refresh_token
        assert v.requests[-1].fields() == {
            "grant_type": "refresh_token",
            "refresh_token": first.refresh_token,
        }
        assert v.requests[-1].headers["Authorization"].startswith("Basic ")
        v.refuse_refresh = True  # 400 invalid_grant → login again
        third, step = await grant.fetch(second)
        assert step == "login" and third.value == v.issued[-1].value
        assert v.calls["token"] == 4


async def test_password_grant_uses_refresh_url_when_set(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(PasswordIdP(clock=clock)) as v, serve(PasswordIdP(clock=clock)) as other:
        grant = make_grant(v.provider(refresh_url=other.token_url), session, clock=clock)
        first, _ = await grant.fetch(None)
        other.refresh_tokens.add(str(first.refresh_token))
        _, step = await grant.fetch(first)
    assert step == "refresh" and other.calls["token"] == 1 and v.calls["token"] == 1


async def test_static_grant_never_expires(clock: FakeClock) -> None:
    grant = StaticGrant(
        Provider(name="s", grant="static", token="static-TOKEN-marker"), clock=clock
    )
    token, step = await grant.fetch(None)
    assert step == "static" and token.value == "static-TOKEN-marker"
    assert math.isinf(token.expires_at)
    assert "static-TOKEN-marker" not in repr(token) + repr(grant)


# -- response parsing ----------------------------------------------------------------


async def test_missing_expires_in_reads_the_jwt_exp(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Simplifi(clock=clock, expires_in="missing", jwt_tokens=True)) as v:
        v.lifetime = 1800
        token, _ = await make_grant(v.provider(), session, clock=clock).fetch(None)
    exp = jwt.decode(token.value, options={"verify_signature": False})["exp"]
    assert token.expires_at == exp == int(clock() + 1800)


async def test_missing_expires_in_without_jwt_uses_default_lifetime(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(SimpleDocs(clock=clock, expires_in="missing")) as v:
        provider = v.provider(default_lifetime=1234)
        token, _ = await make_grant(provider, session, clock=clock).fetch(None)
    assert token.expires_at == clock() + 1234


@pytest.mark.parametrize(("offset", "expected_life"), [(3600, 1800), (-900, 1800), (3, 1803)])
async def test_clock_skew_via_date_header(
    session: aiohttp.ClientSession, clock: FakeClock, offset: float, expected_life: float
) -> None:
    """A JWT exp is on the server's clock: beyond 5 s of skew it is moved onto ours."""
    async with serve(Simplifi(clock=clock, expires_in="missing", jwt_tokens=True)) as v:
        v.lifetime, v.server_time_offset = 1800, offset
        token, _ = await make_grant(v.provider(), session, clock=clock).fetch(None)
    assert token.expires_at - clock() == pytest.approx(expected_life, abs=1)


async def test_expires_in_is_relative_whatever_the_skew(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Sipsim(clock=clock)) as v:
        v.server_time_offset = -7200
        token, _ = await make_grant(v.provider(), session, clock=clock).fetch(None)
    assert token.expires_at == clock() + 7200


async def test_response_field_mapping_and_token_type_case(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Sipsim(clock=clock)) as v:
        v.fail_next(200, {"accessToken": "mapped-AT", "ttl": "60", "kind": "BEARER"})
        fields = {"access_token": "accessToken", "expires_in": "ttl", "token_type": "kind"}
        provider = v.provider(response=fields)
        token, _ = await make_grant(provider, session, clock=clock).fetch(None)
    assert token.value == "mapped-AT" and token.expires_at == clock() + 60


@pytest.mark.parametrize(
    ("status", "body", "content_type", "says"),
    [
        (200, "<html><body>Sign in</body></html>", "text/html", "not a JSON object"),
        (200, "not json at all", "text/plain", "not a JSON object"),
        (200, {"token_type": "Bearer", "expires_in": 60}, None, "no access_token"),
        (200, {"access_token": "x", "expires_in": "soon"}, None, "non-numeric expires_in"),
        (200, {"access_token": "x", "token_type": "MAC"}, None, "not supported"),
        (302, "", None, "redirected"),
        (404, "<html>Not Found</html>", "text/html", "HTTP 404"),
    ],
)
async def test_unusable_answers_are_token_errors(
    session: aiohttp.ClientSession,
    clock: FakeClock,
    status: int,
    body: str | dict[str, object],
    content_type: str | None,
    says: str,
) -> None:
    async with serve(SimpleDocs(clock=clock)) as v:
        headers = {"Location": f"{v.url}/elsewhere"} if status == 302 else None
        v.fail_next(status, body, content_type=content_type, headers=headers)
        with pytest.raises(TokenError) as err:
            await make_grant(v.provider(), session, clock=clock).fetch(None)
    assert not isinstance(err.value, TransientTokenError)
    assert says in err.value.detail and err.value.provider == "simpledocs"
    assert not err.value.credential_failure
    assert v.calls["token"] == 1 and not leaks(str(err.value), v.secret_values())


# -- error classification ----------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "overrides", "code", "status"),
    [
        (Sipsim, {"client_secret": "bad-SECRET-marker"}, "invalid_client", 401),
        (Sipsim, {"scope": "account.write"}, "invalid_scope", 400),
        (SimpleDocs, {"client_secret": "bad-SECRET-marker"}, "invalid_client", 401),
        (SimpleDocs, {"scope": "admin"}, "invalid_scope", 400),
        (Simplifi, {"client_auth": "body"}, "invalid_client", 401),
    ],
)
async def test_credential_failures_carry_the_vendor_code(
    session: aiohttp.ClientSession,
    clock: FakeClock,
    vendor: type[Sipsim | SimpleDocs | Simplifi],
    overrides: dict[str, str],
    code: str,
    status: int,
) -> None:
    async with serve(vendor(clock=clock)) as v:
        with pytest.raises(TokenError) as err:
            await make_grant(v.provider(**overrides), session, clock=clock).fetch(None)
    e = err.value
    assert (e.code, e.credential_failure, e.status) == (code, True, 502)
    assert f"HTTP {status} {code}" in e.detail
    assert e.extra["provider_error"] == code
    assert "bad-SECRET-marker" not in str(e) and not leaks(str(e), v.secret_values())


async def test_vendor_description_echoing_a_secret_is_masked(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Sipsim(clock=clock)) as v:
        v.fail_next(400, {"error": "invalid_client", "error_description": f"bad {v.client_secret}"})
        with pytest.raises(TokenError) as err:
            await make_grant(v.provider(), session, clock=clock).fetch(None)
    assert "bad ***" in (err.value.vendor_detail or "") and v.client_secret not in str(err.value)
    assert "bad" not in err.value.detail  # the vendor's words stay out of the client's answer


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_server_errors_and_429_are_transient(
    session: aiohttp.ClientSession, clock: FakeClock, status: int
) -> None:
    async with serve(Simplifi(clock=clock)) as v:
        v.fail_next(status, "<html>busy</html>", content_type="text/html")
        with pytest.raises(TransientTokenError) as err:
            await make_grant(v.provider(), session, clock=clock).fetch(None)
    assert err.value.idp_status == status and err.value.retry_after is None


async def test_retry_after_seconds_and_http_date(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with serve(Simplifi(clock=clock)) as v:
        grant = make_grant(v.provider(), session, clock=clock)
        v.fail_next(429, headers={"Retry-After": "7"})
        with pytest.raises(TransientTokenError) as err:
            await grant.fetch(None)
        assert err.value.retry_after == 7
        v.server_time_offset = 600  # the date is read on the server's clock, not ours
        later = formatdate(v.now() + 42, usegmt=True)
        v.fail_next(503, headers={"Retry-After": later})
        with pytest.raises(TransientTokenError) as err:
            await grant.fetch(None)
        assert err.value.retry_after == pytest.approx(42, abs=1)
        assert err.value.headers["Retry-After"] == "42"


async def test_unreachable_endpoint_is_transient_without_status(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    provider = Sipsim().provider(token_url=f"http://127.0.0.1:{closed_port()}/oauth/token")
    with pytest.raises(TransientTokenError) as err:
        await make_grant(provider, session, clock=clock).fetch(None)
    assert err.value.idp_status is None and err.value.status == 503
    assert "ClientConnectorError" in err.value.detail


async def test_errors_emit_token_request_outcomes(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    events = Events()
    async with serve(Sipsim(clock=clock)) as v:
        grant = make_grant(v.provider(), session, clock=clock, on_event=events)
        v.fail_next(500)
        v.fail_next(401, {"error": "invalid_client"})
        for _ in range(2):
            with pytest.raises(TokenError):
                await grant.fetch(None)
        await grant.fetch(None)
    outcomes = [(f["outcome"], f["code"]) for f in events.of("token_request")]
    assert outcomes == [("transient", None), ("error", "invalid_client"), ("success", None)]


# -- TLS --------------------------------------------------------------------------


def test_client_ssl_defaults_and_skip_verify(tmp_path: Path) -> None:
    assert client_ssl(TLS()) is True
    assert client_ssl(TLS(insecure_skip_verify=True)) is False
    assert server_hostname(TLS(server_name="idp.internal")) == "idp.internal"
    assert server_hostname(TLS()) is None
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = client_ssl(TLS(ca_file=tmp_path / "ca.pem", insecure_skip_verify=True))
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_NONE


async def test_tls_token_endpoint_with_ca_server_name_and_client_cert(
    session: aiohttp.ClientSession, clock: FakeClock, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("idp.internal").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # mTLS: the IdP wants our client certificate
    client = ca.issue_cert("tokenrelay-client")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    tls = TLS(
        ca_file=tmp_path / "ca.pem",
        server_name="idp.internal",
        client_cert_file=tmp_path / "client.pem",
        client_key_file=tmp_path / "client.key",
    )
    async with serve(Sipsim(clock=clock), ssl_context=server_ctx) as v:
        token, _ = await make_grant(v.provider(tls=tls), session, clock=clock).fetch(None)
        assert token.value == v.issued[0].value
        untrusted = TLS(server_name="idp.internal")  # system CAs do not know this CA
        with pytest.raises(TokenError) as err:
            await make_grant(v.provider(tls=untrusted), session, clock=clock).fetch(None)
        assert not isinstance(err.value, TransientTokenError)  # a bad certificate is final
        assert err.value.code == "tls"
        assert len(v.issued) == 1


def test_token_repr_hides_values() -> None:
    token = Token("AT-marker", 1.0, 0.0, refresh_token="RT-marker")
    assert "marker" not in repr(token)
