"""The error tree, and its one rendering as RFC 9457 problem+json.

Low-level failures are translated into these types once, at the boundary where
they happen; everything above only sees ``ProxyError`` subclasses.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import orjson
from aiohttp import web

PROBLEM_TYPE_BASE = "https://tokenrelay.dev/problems/"


def os_reason(err: OSError) -> str:
    """What a failed connect says to a person ("connection refused"), not asyncio's text
    ("Connect call failed ('10.0.0.5', 443)") or a class name."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return "host name not resolved"
    if err.errno:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__


class ConfigError(Exception):
    """A configuration problem: names the file, the key path and what is wrong."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file = file
        self.path = path
        self.problem = problem
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {problem}")


class ProxyError(Exception):
    """An error the proxy answers itself, as problem+json."""

    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal proxy error"

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class BadRequest(ProxyError):
    status = 400
    slug = "bad-request"
    title = "Bad request"


class NotFound(ProxyError):
    status = 404
    slug = "no-route"
    title = "No route for this path"


class MethodNotAllowed(ProxyError):
    """A method the proxy never forwards, or one an admin endpoint does not take; ``Allow``
    lists those it does."""

    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    slug = "payload-too-large"
    title = "Request body too large"


class ClientTimeout(ProxyError):
    status = 408
    slug = "client-timeout"
    title = "Client too slow"


class Unauthorized(ProxyError):
    status = 401
    slug = "unauthorized"
    title = "Missing or invalid client key"


class Forbidden(ProxyError):
    status = 403
    slug = "forbidden"
    title = "Client not allowed on this route"


class TooManyRequests(ProxyError):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"


class RequestLineTooLong(ProxyError):
    status = 414
    slug = "request-line-too-long"
    title = "Request line too long"


class HeadersTooLarge(ProxyError):
    status = 431
    slug = "headers-too-large"
    title = "Request header fields too large"


class ExpectationFailed(ProxyError):
    status = 417
    slug = "expectation-failed"
    title = "Expectation not supported"


class TokenError(ProxyError):
    """No token could be had; ``code`` is the provider's error code when it sent one.

    ``detail`` goes to clients, so it names only the provider, the step, the HTTP status
    and the code. The vendor's own words (which may echo what it was sent) are kept apart,
    already scrubbed, in ``vendor_detail``: for logs and the admin token page only.
    """

    status = 502
    slug = "token-unavailable"
    title = "Could not obtain a vendor token"

    def __init__(
        self,
        provider: str,
        detail: str,
        *,
        code: str | None = None,
        status: int = 502,
        retry_after: float | None = None,
        credential_failure: bool = False,
        vendor_detail: str | None = None,
    ) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
        extra: dict[str, object] = {"provider": provider}
        if code:
            extra["provider_error"] = code
        super().__init__(detail, headers=headers, extra=extra)
        self.provider = provider
        self.code = code
        self.status = status
        self.retry_after = retry_after
        self.credential_failure = credential_failure
        self.vendor_detail = vendor_detail


class UpstreamError(ProxyError):
    """The upstream could not be reached or did not answer in time."""

    slug = "upstream-unavailable"
    title = "Upstream unavailable"

    def __init__(self, kind: str, detail: str, *, status: int = 502) -> None:
        super().__init__(detail, extra={"upstream_error": kind})
        self.kind = kind
        self.status = status
        if status == 504:
            self.slug = "upstream-timeout"
            self.title = "Upstream timed out"


class ServiceUnavailable(ProxyError):
    status = 503
    slug = "unavailable"
    title = "Service unavailable"


def problem_body(err: ProxyError, request_id: str, instance: str | None = None) -> bytes:
    doc: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + err.slug,
        "title": err.title,
        "status": err.status,
        "detail": err.detail,
        "request_id": request_id,
    }
    if instance is not None:
        doc["instance"] = instance
    doc.update(err.extra)
    return orjson.dumps(doc)


def problem_response(err: ProxyError, request_id: str, instance: str | None = None) -> web.Response:
    resp = web.Response(
        status=err.status,
        body=problem_body(err, request_id, instance),
        content_type="application/problem+json",
        headers=err.headers,
    )
    resp.headers["X-Request-Id"] = request_id
    return resp


class ConfigInvalid(ProxyError):
    """A reload refused: the admin caller learns the file, key path and problem."""

    status = 422
    slug = "config-invalid"
    title = "Configuration invalid; the running configuration is unchanged"

    def __init__(self, err: ConfigError) -> None:
        super().__init__(err.problem, extra={"file": err.file, "key_path": err.path})
