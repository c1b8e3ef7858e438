"""Token endpoint failures as a client, an operator and the logs see them (review 3, #4, #7).

#4: a vendor's error text can echo what it was sent (the refresh token, the access token,
the client secret raw, form-encoded or inside the Basic credential, the password). None of
it may reach a client's problem body, ``/-/tokens``, ``tokenrelay token`` or the logs.

#7: a token that is already expired on arrival is a refusal under the cool-down, not a
token cached for no time, which would cost one token endpoint call per request.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.cli import _probe_token
from proxy.problems import TokenError
from proxy.tokens.grants import TransientTokenError, make_grant
from tests.conftest import Proxy, StartProxy
from tests.helpers import provider_json
from tests.vendors import Events, FakeClock, PasswordIdP, Simacan, Simplifi, Sipsim, Vendor, serve
from tests.vendors.base import Handler, oauth_error

MODES = ("json", "text", "5xx")


# -- vendors that echo what they were sent, as some IdPs do in their error text ---------------


PIECES = ("body", "auth", "pair", "form", "json", "unicode", "token")


async def echoed(vendor: Vendor, request: web.Request) -> dict[str, str]:
    """What an echoing vendor repeats: the raw body, the Basic credential (encoded and
    decoded), the form as a dict and as JSON, and the access token it issued last."""
    rec = vendor.requests[-1]
    auth = rec.headers.get("Authorization", "")
    pair = base64.b64decode(auth.partition(" ")[2]).decode() if auth.startswith("Basic") else ""
    form = dict(rec.form)
    return {
        "body": await request.text(),
        "auth": auth,
        "pair": pair,
        "form": str(form),
        "json": json.dumps(form),
        "unicode": json.dumps(form, ensure_ascii=False),
        "token": vendor.issued[-1].value if vendor.issued else "",
    }


async def echo_failure(
    vendor: Vendor, request: web.Request, mode: str, piece: str | None = None
) -> web.Response:
    """A failure whose text repeats the request: every piece, or only ``piece`` (so that
    it comes first, before any cut)."""
    pieces = await echoed(vendor, request)
    shown = {piece: pieces[piece]} if piece else pieces
    said = "rejected " + " ".join(f"{k}={v}" for k, v in shown.items())
    if mode == "json":
        return oauth_error(400, "invalid_request", said)
    return web.Response(status=400 if mode == "text" else 500, text=said)


class Echoes(Vendor):
    """Once ``echo`` is set, every token endpoint fails repeating what it was sent."""

    echo: str | None = None
    piece: str | None = None

    def _token_endpoint(self, name: str, handler: Handler) -> Handler:
        async def answer(request: web.Request) -> web.StreamResponse:
            if self.echo:
                return await echo_failure(self, request, self.echo, self.piece)
            return await handler(request)

        return super()._token_endpoint(name, answer)


class EchoingSimacan(Echoes, Simacan):
    pass


class EchoingSimplifi(Echoes, Simplifi):
    pass


class EchoingSipsim(Echoes, Sipsim):
    pass


class EchoingIdP(Echoes, PasswordIdP):
    pass


Echoing = EchoingSimacan | EchoingSimplifi | EchoingSipsim | EchoingIdP

# secrets with every character form encoding, JSON or base64 treats differently
VENDORS: dict[str, Callable[[], Echoing]] = {
    "simacan": lambda: EchoingSimacan(password='Sim pw+/=&%"\\ä-7q'),
    "simplifi": lambda: EchoingSimplifi(client_secret="Spl sec:ret+/=&%ä-4k"),
    "sipsim": lambda: EchoingSipsim(client_secret='Sip sec+/=&%"ä-9z'),
    "idp": lambda: EchoingIdP(password="IdP pw+/=&%ä-2x", client_secret="IdP sec:+/=ä-5m"),
}


def forms(secret: str) -> set[str]:
    """Every form in which a secret could come back."""
    b64 = base64.b64encode(secret.encode()).decode()
    return {
        secret,
        quote_plus(secret, safe=""),
        quote(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        b64,
        b64.rstrip("="),
    }


def needles(vendor: Vendor) -> list[str]:
    """Each secret the vendor knows, in each form, and each Basic credential it received."""
    found = {f for s in vendor.secret_values() for f in forms(s)}
    for rec in vendor.requests:
        auth = rec.headers.get("Authorization", "")
        if auth:
            found |= {auth, auth.partition(" ")[2]}
    return sorted(found - {""})


def assert_clean(text: str, secrets: list[str], where: str) -> None:
    leaked = [s[:5] + "…" for s in secrets if s in text]
    assert not leaked, f"secrets leaked into {where}: {leaked}"


def config(vendor: Vendor, name: str) -> str:
    keys = provider_json(vendor, retry={"attempts": 1}, cooldown=300)
    return f"""
providers:
  {name}: {keys}
routes:
  - {{prefix: /v/, upstream: "{vendor.url}/api/", provider: {name}}}
"""


async def get(client: aiohttp.ClientSession, proxy: Proxy, path: str) -> tuple[int, str]:
    async with client.get(proxy.url.with_path(path)) as resp:
        return resp.status, f"{dict(resp.headers)}\n{await resp.text()}"


def token_request_lines(proxy: Proxy) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in proxy.log_text().splitlines()]
    return [d for d in lines if d.get("event") == "token_request" and d.get("vendor_detail")]


# -- #4 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(VENDORS))
async def test_vendor_text_echoing_secrets_reaches_no_client_page_log_or_cli(
    kind: str,
    mode: str,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(VENDORS[kind]()) as vendor:
        proxy = await start_proxy(config(vendor, kind))
        assert (await get(client, proxy, "/v/x"))[0] == 200  # a token (and refresh token) held
        vendor.echo = mode
        vendor.revoke_all()  # the held token is refused: refresh or re-authenticate, echoed
        status, answer = await get(client, proxy, "/v/x")
        _, tokens = await get(client, proxy, "/-/tokens")
        assert await _probe_token(proxy.runtime.loaded.config, kind) == 1
        cli = capsys.readouterr()
        secrets = needles(vendor)
    assert status == 502, answer
    problem = orjson.loads(answer.split("\n", 1)[1])
    assert problem["provider"] == kind and problem["detail"].startswith(f"provider {kind}: ")
    step = "refresh" if kind in ("simacan", "idp") else "client_credentials"
    assert f"{step} request" in problem["detail"] and "HTTP " in problem["detail"]
    if mode == "json":
        assert problem["provider_error"] == "invalid_request"
    assert "rejected" not in answer  # the vendor's own words stay out of the client's answer
    assert "the IdP said: " in cli.err  # ...and reach the operator, scrubbed (checked below)
    for text, where in [
        (answer, "the client's answer"),
        (tokens, "/-/tokens"),
        (proxy.log_text(), "the proxy log"),
        (caplog.text, "Python logging"),
        (cli.out + cli.err, "tokenrelay token"),
    ]:
        assert_clean(text, secrets, where)
    assert cli.err.startswith(f"tokenrelay: {kind}: provider {kind}: ")
    said = [d["vendor_detail"] for d in token_request_lines(proxy)]
    assert said and all("rejected" in s and "***" in s for s in said), said  # kept for operators


async def test_client_facing_detail_has_no_vendor_text_but_the_error_keeps_it_scrubbed(
    session: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    async with serve(VENDORS["idp"]()) as vendor:
        grant = make_grant(vendor.provider("idp"), session, clock=clock)
        held, _ = await grant.fetch(None)
        vendor.echo = "json"
        with pytest.raises(TokenError) as err:
            await grant.fetch(held)
        secrets = needles(vendor)
    exc = err.value
    assert not isinstance(exc, TransientTokenError) and exc.credential_failure
    assert exc.detail == "provider idp: refresh request refused: HTTP 400 invalid_request"
    assert exc.code == "invalid_request"
    assert exc.vendor_detail is not None and exc.vendor_detail.startswith("rejected body=")
    assert len(exc.vendor_detail) <= 200
    for text in (exc.detail, exc.vendor_detail, str(exc), repr(exc)):
        assert_clean(text, secrets, "the error")


async def test_a_secret_cut_by_the_length_limit_leaves_no_prefix(
    session: aiohttp.ClientSession,
) -> None:
    """Masking comes before cutting: a secret straddling the cut shows none of its head."""
    vendor = Sipsim(client_secret="Sip-cut-SECRET-value-0123456789")
    async with serve(vendor):
        pad = "x " * 95  # the secret begins a few characters before the 200-character cut
        said = {"error": "invalid_client", "error_description": f"{pad}s={vendor.client_secret}"}
        vendor.fail_next(400, said)
        with pytest.raises(TokenError) as err:
            await make_grant(vendor.provider(), session, clock=FakeClock()).fetch(None)
    text = err.value.vendor_detail or ""
    assert text.startswith("x x") and "Sip-" not in text


async def test_a_secret_with_whitespace_in_a_plain_text_body_is_masked(
    session: aiohttp.ClientSession,
) -> None:
    """Whitespace is folded for the log line only after masking, so such a secret matches."""
    vendor = Sipsim(client_secret="Sip  two\tspaced\nSECRET")
    async with serve(vendor):
        vendor.fail_next(401, f"bad client secret\n{vendor.client_secret}\n")
        with pytest.raises(TokenError) as err:
            await make_grant(vendor.provider(), session, clock=FakeClock()).fetch(None)
    assert err.value.vendor_detail == "bad client secret ***"
    assert err.value.detail == "provider sipsim: client_credentials request refused: HTTP 401"


# pieces that carry no secret: no Basic credential (body auth), or a form of grant_type only
NO_SECRET_SENT = {(k, p) for k in ("simacan", "sipsim") for p in ("auth", "pair")} | {
    ("simplifi", p) for p in ("body", "form", "json", "unicode")
}


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("kind", sorted(VENDORS))
async def test_each_echoed_form_of_a_secret_is_masked_in_the_vendor_text(
    kind: str, piece: str, session: aiohttp.ClientSession
) -> None:
    """Each piece alone, first in the text, so the 200-character cut hides nothing."""
    clock, events = FakeClock(), Events()
    async with serve(VENDORS[kind]()) as vendor:
        grant = make_grant(vendor.provider(kind), session, clock=clock, on_event=events)
        held, _ = await grant.fetch(None)
        vendor.echo, vendor.piece = "json", piece
        with pytest.raises(TokenError) as err:
            await grant.fetch(held)
        secrets = needles(vendor)
    said = err.value.vendor_detail or ""
    logged = [f.get("vendor_detail", "") for f in events.of("token_request")]
    assert said.startswith(f"rejected {piece}=") and said in logged
    assert_clean(said, secrets, "the vendor text")
    if (kind, piece) not in NO_SECRET_SENT:
        assert "***" in said.removeprefix(f"rejected {piece}=")


# -- #7 ---------------------------------------------------------------------------------------


async def test_token_expired_on_arrival_is_refused_under_the_cooldown(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    # a JWT whose exp is 10 s in the past, no expires_in; the Date header agrees with us
    vendor = Sipsim(clock=clock, jwt_tokens=True, expires_in="missing", lifetime=-10)
    async with serve(vendor):
        proxy = await start_proxy(config(vendor, "sipsim"), clock=clock)
        answers = [await get(client, proxy, "/v/x") for _ in range(5)]
        calls_in_cooldown = vendor.calls["token"]
        clock.advance(301)  # the cool-down is over: one more try, refused the same way
        after = await get(client, proxy, "/v/x")
        calls_after = vendor.calls["token"]
        probe = await _probe_token(proxy.runtime.loaded.config, "sipsim")
    statuses = [status for status, _ in answers]
    assert statuses == [502, 503, 503, 503, 503]
    first = orjson.loads(answers[0][1].split("\n", 1)[1])
    assert "already expired" in first["detail"] and first["provider"] == "sipsim"
    assert "'Retry-After': '300'" in answers[1][1]
    assert (calls_in_cooldown, after[0], calls_after) == (1, 502, 2)
    assert vendor.calls["api"] == 0  # no expired token was ever sent upstream
    assert probe == 1  # tokenrelay token: no "expires_in: -10 s" and exit 0


async def test_expired_jwt_is_a_final_error_not_a_token(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    vendor = Simacan(clock=clock, expires_in="missing", lifetime=-1)
    async with serve(vendor):
        with pytest.raises(TokenError) as err:
            await make_grant(vendor.provider(), session, clock=clock).fetch(None)
        ok = Simacan(clock=clock, expires_in="missing", lifetime=60)
        async with serve(ok):
            token, _ = await make_grant(ok.provider(), session, clock=clock).fetch(None)
    assert not isinstance(err.value, TransientTokenError)
    assert err.value.detail == (
        "provider simacan: login request: token endpoint answered a token that is already"
        " expired (-1 s left)"
    )
    assert token.expires_at == clock() + 60  # a JWT with time left is still read from exp
