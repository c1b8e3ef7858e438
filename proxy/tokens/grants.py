"""How each grant obtains a token from a vendor: one request (or two) per ``fetch``.

Grants do no caching, retrying or locking (that is ``proxy.tokens.cache``); they
translate every HTTP or transport failure once, here, into ``TokenError`` (give
up) or ``TransientTokenError`` (worth retrying). An error's ``detail`` reaches
clients, so it names only the provider, the step, the HTTP status and the vendor's error
code; the vendor's own text, which may echo what it was sent, is scrubbed of every form
of every secret the request carried or the grant holds and kept apart as
``vendor_detail``, for logs and operators.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, quote_plus

import aiohttp

from proxy.config import Provider
from proxy.problems import TokenError
from proxy.signing_keys import load_signing_key
from proxy.tls import client_ssl, server_hostname
from proxy.tokens.assertions import ASSERTION_METHODS, ASSERTION_TYPE, client_assertion
from proxy.tokens.discovery import Discovery
from proxy.tokens.source import Clock, Token

EventSink = Callable[[str, dict[str, Any]], None]

# RFC 6749 §5.2 codes that mean "these credentials or this request will not work".
CREDENTIAL_CODES = frozenset(
    {"invalid_client", "invalid_grant", "unauthorized_client", "invalid_scope", "access_denied"}
)
MAX_SKEW = 5.0  # seconds of Date-header disagreement tolerated before correcting
MIN_LIFETIME = 1.0  # a token living less than this on arrival is refused, never cached
MASK = "***"
_DETAIL_LIMIT = 200
_READ_LIMIT = 65536  # vendor text is scrubbed whole up to here, then cut to _DETAIL_LIMIT
# a run that looks like a key, a base64 value or a JWT: masked even when it is no known secret
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9+/=_.~%-]{32,}")
_SECRET_NAME = re.compile(r"(?i)secret|password|passwd|token|key|auth|credential|assertion")


class TransientTokenError(TokenError):
    """A failure worth retrying: no answer, a timeout, 5xx or 429.

    ``idp_status`` is the HTTP status when the token endpoint answered at all,
    so the cache can tell "unreachable" (503) from "answered with an error" (502).
    """

    def __init__(
        self,
        provider: str,
        detail: str,
        *,
        retry_after: float | None = None,
        idp_status: int | None = None,
        vendor_detail: str | None = None,
    ) -> None:
        super().__init__(
            provider,
            f"provider {provider}: {detail}",
            status=503,
            retry_after=retry_after,
            vendor_detail=vendor_detail,
        )
        self.idp_status = idp_status


class _RefreshRefused(Exception):
    """The IdP will never accept this refresh token: log in again (never seen outside)."""


def token_error(provider: str, detail: str, **kwargs: Any) -> TokenError:
    """A final ``TokenError`` whose text names the provider."""
    return TokenError(provider, f"provider {provider}: {detail}", **kwargs)


class Scrubber:
    """Masks every form in which a secret can come back in a vendor's error text.

    A vendor may echo what it was sent: the raw value, its form encoding (``quote_plus``
    or ``quote``), its JSON escaping, its base64, or the whole Basic credential. Every one
    of those is masked, longest first, before the text is cut short, so a cut never leaves
    a secret's prefix behind; any other key-looking run is masked as well.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.update(_encodings(secret))
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = text[:_READ_LIMIT]
        for form in self._forms:
            text = text.replace(form, MASK)
        text = _TOKEN_LIKE.sub(_mask_token_like, text)
        text = "".join(c if c.isprintable() else " " for c in text)
        return text[:_DETAIL_LIMIT]


def _encodings(secret: str) -> set[str]:
    raw = secret.encode()
    b64s = (base64.b64encode(raw).decode("ascii"), base64.urlsafe_b64encode(raw).decode("ascii"))
    return {
        secret,
        quote_plus(secret, safe=""),
        quote(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        *b64s,
        *(b.rstrip("=") for b in b64s),
    } - {""}


def _mask_token_like(match: re.Match[str]) -> str:
    run = match.group()
    looks_random = any(c.isdigit() for c in run) and any(c.isalpha() for c in run)
    return MASK if looks_random else run


class Grant(Protocol):
    """Obtains a token; ``current`` is the last token, for grants that can refresh it."""

    async def fetch(self, current: Token | None) -> tuple[Token, str]:
        """The new token and the step used: client_credentials, login, refresh or static."""
        ...


@dataclass(frozen=True, slots=True)
class _Answer:
    """A token endpoint's answer, read in full (token answers are small)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    content_type: str


def make_grant(
    provider: Provider,
    session: aiohttp.ClientSession,
    *,
    clock: Clock,
    on_event: EventSink | None = None,
    discovery: Discovery | None = None,
) -> Grant:
    """The grant class for ``provider.grant``; ``discovery`` gives the token endpoint of a
    provider configured with ``issuer``."""
    if provider.grant == "static":
        return StaticGrant(provider, clock=clock)
    kinds: dict[str, Callable[..., Grant]] = {
        "client_credentials": ClientCredentialsGrant,
        "password": PasswordGrant,
        "simacan": SimacanGrant,
    }
    grant = kinds[provider.grant]
    return grant(provider, session, clock=clock, on_event=on_event, discovery=discovery)


class StaticGrant:
    """A configured token that never expires (the vendor hands out long-lived keys)."""

    def __init__(self, provider: Provider, *, clock: Clock) -> None:
        if provider.token is None:
            raise ValueError(f"provider {provider.name}: static grant needs a token")
        self._value = provider.token.get_secret_value()
        self._clock = clock

    async def fetch(self, current: Token | None) -> tuple[Token, str]:
        now = self._clock()
        return Token(self._value, expires_at=math.inf, obtained_at=now), "static"


class _HttpGrant:
    """What every HTTP grant shares: posting a form, timing it, reading the answer."""

    def __init__(
        self,
        provider: Provider,
        session: aiohttp.ClientSession,
        *,
        clock: Clock,
        on_event: EventSink | None = None,
        discovery: Discovery | None = None,
    ) -> None:
        self.provider = provider
        self._discovery = discovery
        self._session = session
        self._clock = clock
        self._on_event = on_event
        self._ssl = client_ssl(provider.tls)
        self._key = (
            load_signing_key(provider.private_key_file, provider.signing_alg, provider.key_id)
            if provider.private_key_file is not None
            else None
        )
        self._timeout = aiohttp.ClientTimeout(
            total=provider.timeout.connect + provider.timeout.read,
            sock_connect=provider.timeout.connect,
            sock_read=provider.timeout.read,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} provider={self.provider.name!r}>"

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, {"provider": self.provider.name, **fields})

    def _client_auth(self, form: dict[str, str], headers: dict[str, str], url: str) -> None:
        """Add client credentials: Basic with each part form-encoded as RFC 6749 §2.3.1 says,
        Basic as they are (what a vendor's own ``requests`` example sends), the body, a signed
        assertion for ``url`` (OIDC Core §9), or only the id, the TLS client certificate
        being the proof (RFC 8705 §2)."""
        p = self.provider
        if p.client_id is not None and p.client_auth in ASSERTION_METHODS:
            form["client_id"] = p.client_id
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion(p.client_id, url)
            return
        if p.client_id is not None and p.client_auth == "tls_client_auth":
            form["client_id"] = p.client_id
            return
        if p.client_id is None or p.client_secret is None:
            return
        secret = p.client_secret.get_secret_value()
        if p.client_auth == "body":
            form["client_id"] = p.client_id
            form["client_secret"] = secret
            return
        if p.client_auth == "basic_raw":
            pair = f"{p.client_id}:{secret}"
        else:
            pair = f"{quote_plus(p.client_id, safe='')}:{quote_plus(secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")

    async def _token_url(self) -> str:
        """``token_url``, or what the issuer's discovery document names."""
        if self._discovery is not None:
            return await self._discovery.token_endpoint()
        return _url(self.provider.token_url)

    def _assertion(self, client_id: str, url: str) -> str:
        p = self.provider
        secret = p.client_secret.get_secret_value() if p.client_secret is not None else None
        audience = p.assertion_audience or url
        return client_assertion(client_id, audience, self._clock(), key=self._key, secret=secret)

    def _oauth_extras(self, form: dict[str, str]) -> None:
        p = self.provider
        if p.scope:
            form["scope"] = p.scope
        if p.audience:
            form["audience"] = p.audience
        for k, v in p.token_params.items():
            form.setdefault(k, v)

    async def _request(
        self,
        step: str,
        url: str,
        form: dict[str, str],
        headers: dict[str, str] | None = None,
        current: Token | None = None,
    ) -> Token:
        """POST ``form`` and read the token; a refused refresh raises ``_RefreshRefused``.

        ``current`` is the token held now: its values are masked in vendor text too.
        """
        headers = headers or {}
        scrub = self._scrubber(form, headers, current)
        started = time.perf_counter()
        outcome, code, said = "error", None, None
        try:
            answer, sent_at = await self._post(step, url, form, headers)
            if step == "refresh" and _refused(answer):
                code, said = _error_code(answer, scrub), vendor_text(answer, scrub)
                raise _RefreshRefused
            token = self._token_from(step, answer, sent_at, scrub)
            outcome = "success"
            return token
        except TokenError as exc:
            outcome = "transient" if isinstance(exc, TransientTokenError) else "error"
            code, said = exc.code, exc.vendor_detail
            raise
        finally:
            self._emit(
                "token_request",
                step=step,
                outcome=outcome,
                code=code,
                duration=round(time.perf_counter() - started, 6),
                **({"vendor_detail": said} if said else {}),
            )

    def _scrubber(
        self, form: Mapping[str, str], headers: Mapping[str, str], current: Token | None
    ) -> Scrubber:
        """Every secret this request sent or the grant holds, in the forms a vendor may echo."""
        p = self.provider
        held = [s.get_secret_value() for s in (p.client_secret, p.password, p.token) if s]
        if current is not None:
            held += [current.value, current.refresh_token or ""]
        sent = {**p.token_params, **form, **p.token_headers, **headers}
        for name, value in sent.items():
            if _SECRET_NAME.search(name):
                held += [value, value.partition(" ")[2]]  # "Basic <b64>": the whole and the b64
        return Scrubber(held)

    async def _post(
        self, step: str, url: str, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[_Answer, float]:
        sent_at = self._clock()
        all_headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            **self.provider.token_headers,
            **headers,
        }
        try:
            async with self._session.post(
                url,
                data=form,
                headers=all_headers,
                allow_redirects=False,
                ssl=self._ssl,
                server_hostname=server_hostname(self.provider.tls),
                timeout=self._timeout,
            ) as resp:
                body = await resp.read()
                answer = _Answer(resp.status, resp.headers, body, resp.content_type)
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            # a certificate that fails verification does not heal by retrying
            raise token_error(
                self.provider.name,
                f"{step} request to the token endpoint failed TLS: {type(exc).__name__}",
                code="tls",
            ) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise TransientTokenError(
                self.provider.name, f"{step} request to the token endpoint failed: {what}"
            ) from None
        return answer, sent_at

    def _token_from(self, step: str, answer: _Answer, sent_at: float, scrub: Scrubber) -> Token:
        if 200 <= answer.status < 300:
            return parse_token(self.provider, answer, sent_at, scrub, step=step)
        raise classify_failure(self.provider.name, step, answer, sent_at, scrub)


class ClientCredentialsGrant(_HttpGrant):
    """RFC 6749 §4.4; a refresh token in the answer is ignored (re-authenticating is free)."""

    async def fetch(self, current: Token | None) -> tuple[Token, str]:
        step = "client_credentials"
        form = {"grant_type": "client_credentials"}
        headers: dict[str, str] = {}
        url = await self._token_url()
        self._client_auth(form, headers, url)
        self._oauth_extras(form)
        token = await self._request(step, url, form, headers, current)
        return replace(token, refresh_token=None), step


class PasswordGrant(_HttpGrant):
    """RFC 6749 §4.3 with §6 refresh; a refused refresh falls back to one login."""

    async def fetch(self, current: Token | None) -> tuple[Token, str]:
        if current is not None and current.refresh_token is not None:
            try:
                token = await self._refresh(current, current.refresh_token)
            except _RefreshRefused:
                self._emit("refresh_refused_login", step="refresh")
            else:
                kept = token.refresh_token or current.refresh_token
                return replace(token, refresh_token=kept), "refresh"
        return await self._login(current), "login"

    async def _login(self, current: Token | None) -> Token:
        p = self.provider
        password = p.password.get_secret_value() if p.password is not None else ""
        form = {"grant_type": "password", "username": p.username or "", "password": password}
        headers: dict[str, str] = {}
        url = await self._token_url()
        self._client_auth(form, headers, url)
        self._oauth_extras(form)
        return await self._request("login", url, form, headers, current)

    async def _refresh(self, current: Token, refresh_token: str) -> Token:
        p = self.provider
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        headers: dict[str, str] = {}
        url = _url(p.refresh_url) if p.refresh_url else await self._token_url()
        self._client_auth(form, headers, url)
        return await self._request("refresh", url, form, headers, current)


class SimacanGrant(_HttpGrant):
    """Simacan's dialect: exactly username+password, or exactly refresh_token.

    Every refresh rotates the refresh token, so only the newest is kept; the
    password endpoint is used only when there is no refresh token or it was refused.
    """

    async def fetch(self, current: Token | None) -> tuple[Token, str]:
        p = self.provider
        if current is not None and current.refresh_token is not None:
            form = {"refresh_token": current.refresh_token}
            url = _url(p.refresh_url)
            try:
                return await self._request("refresh", url, form, current=current), "refresh"
            except _RefreshRefused:
                self._emit("refresh_refused_login", step="refresh")
        password = p.password.get_secret_value() if p.password is not None else ""
        form = {"username": p.username or "", "password": password}
        return await self._request("login", _url(p.token_url), form, current=current), "login"


# ---------------------------------------------------------------------------
# reading answers, written once for every grant


def parse_token(
    provider: Provider,
    answer: _Answer,
    now: float,
    scrub: Callable[[str], str],
    *,
    step: str = "token",
) -> Token:
    """A successful answer → Token; a body we cannot use → TokenError saying why.

    The errors name the step and what is missing; what the vendor actually sent goes only
    to ``vendor_detail``, scrubbed (with the answer's own token values masked too).
    """
    doc = _json_object(answer)
    if doc is None:
        raise token_error(
            provider.name,
            f"{step} request: token endpoint answered {answer.status} with a body that is not"
            " a JSON object",
            vendor_detail=f"content type {scrub(answer.content_type or 'none')}",
        )
    fields = provider.response
    value = doc.get(fields.access_token)
    if not isinstance(value, str) or not value:
        raise token_error(
            provider.name, f"{step} request: token endpoint answer has no {fields.access_token}"
        )
    if not value.isascii() or not value.isprintable() or " " in value:
        # RFC 6750 b64token: a token that would break the Authorization header is refused here
        raise token_error(
            provider.name, f"{step} request: {fields.access_token} has characters a token cannot"
        )
    token_type = doc.get(fields.token_type)
    if token_type is not None and str(token_type).lower() != "bearer":
        raise token_error(
            provider.name,
            f"{step} request: the token type is not supported (only Bearer)",
            vendor_detail=f"token type {scrub(str(token_type).replace(value, MASK))!r}",
        )
    lifetime = _lifetime(provider, doc.get(fields.expires_in), value, answer, now)
    if lifetime < MIN_LIFETIME:
        # caching it would mean one token endpoint call per request; refusing it means the
        # cool-down applies, as for any other refusal
        raise token_error(
            provider.name,
            f"{step} request: token endpoint answered a token that is already expired"
            f" ({lifetime:.0f} s left)",
        )
    refresh = doc.get(fields.refresh_token)
    return Token(
        value,
        expires_at=now + lifetime,
        obtained_at=now,
        scope=_scope(doc.get(fields.scope)),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
    )


def _json_object(answer: _Answer) -> dict[str, Any] | None:
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _lifetime(provider: Provider, raw: object, value: str, answer: _Answer, now: float) -> float:
    """Seconds the token lives: expires_in (number or numeric string), JWT exp, or the default."""
    if raw is None:
        exp = _jwt_exp(value)
        if exp is None:
            return provider.default_lifetime
        return exp + _skew(answer, now) - now
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise token_error(provider.name, "token endpoint answer has a non-numeric expires_in")
    try:
        seconds = float(raw)
    except ValueError:
        raise token_error(
            provider.name, "token endpoint answer has a non-numeric expires_in"
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise token_error(provider.name, "token endpoint answer has a non-positive expires_in")
    return seconds


def _jwt_exp(value: str) -> float | None:
    """The ``exp`` claim when the token is a JWT; read, not trusted (it is not ours to verify)."""
    if value.count(".") != 2:
        return None
    import jwt  # imported on first use: PyJWT costs ~19 MB of RSS, most tokens never need it

    try:
        claims = jwt.decode(value, options={"verify_signature": False, "verify_exp": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _skew(answer: _Answer, now: float) -> float:
    """How far our clock is ahead of the server's, when beyond ``MAX_SKEW``; else 0.

    Absolute times the server sends (JWT ``exp``, Retry-After dates) are in its
    clock; adding this puts them on ours.
    """
    server = _http_date(answer.headers.get("Date"))
    if server is None or abs(now - server) <= MAX_SKEW:
        return 0.0
    return now - server


def _http_date(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        return parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _scope(raw: object) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        return " ".join(str(s) for s in raw)
    return None


def classify_failure(
    provider: str,
    step: str,
    answer: _Answer,
    now: float,
    scrub: Callable[[str], str],
) -> TokenError:
    """A non-2xx answer → the error to raise: transient (retry) or final (credentials, config).

    The detail carries the step, the HTTP status and the vendor's error code, never the
    vendor's free text: that text may echo a secret in a form no scrubber knows.
    """
    status, said = answer.status, vendor_text(answer, scrub)
    if status == 429 or status == 408 or status >= 500:
        return TransientTokenError(
            provider,
            f"{step} request: token endpoint answered HTTP {status}",
            retry_after=retry_after(answer, now),
            idp_status=status,
            vendor_detail=said,
        )
    if 300 <= status < 400:
        return token_error(
            provider,
            f"{step} request: token endpoint redirected ({status})",
            vendor_detail=said,
        )
    code = _error_code(answer, scrub)
    credential = status == 401 or (status in (400, 403) and code is not None)
    label = f" {code}" if code else ""
    return token_error(
        provider,
        f"{step} request refused: HTTP {status}{label}",
        code=code,
        credential_failure=credential,
        vendor_detail=said,
    )


def vendor_text(answer: _Answer, scrub: Callable[[str], str]) -> str | None:
    """What the vendor said about a failure, scrubbed: for logs and the admin page only."""
    doc = _json_object(answer)
    if doc is not None:
        said = doc.get("error_description") or doc.get("detail") or doc.get("title")
        return scrub(said) if isinstance(said, str) and said else None
    text = " ".join(scrub(answer.body[:_READ_LIMIT].decode("utf-8", "replace")).split())
    return text or None  # scrubbed before whitespace is folded: a secret may hold some


def _error_code(answer: _Answer, scrub: Callable[[str], str] = str) -> str | None:
    """RFC 6749 ``error``, or an RFC 9457-style problem ``type`` (SimpleDocs); scrubbed, as
    it reaches clients."""
    doc = _json_object(answer)
    if doc is None:
        return None
    for key in ("error", "type"):
        code = doc.get(key)
        if isinstance(code, str) and code and len(code) <= 100:
            return scrub(code)
    return None


def _refused(answer: _Answer) -> bool:
    """A refresh the IdP will never accept: log in again instead."""
    return answer.status == 401 or (
        answer.status == 400 and _error_code(answer) in ("invalid_grant", "invalid_token")
    )


def retry_after(answer: _Answer, now: float) -> float | None:
    """Retry-After in seconds: delta-seconds, or an HTTP date read on the server's clock."""
    raw = answer.headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    when = _http_date(raw)
    if when is None:
        return None
    server_now = _http_date(answer.headers.get("Date")) or now
    return max(0.0, when - server_now)


def _url(url: str | None) -> str:
    if url is None:  # config validation guarantees it; this keeps the type checker honest
        raise ValueError("token endpoint URL is not configured")
    return url
