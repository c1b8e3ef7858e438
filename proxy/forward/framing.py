"""Request-smuggling defences: refuse any request whose body framing two parsers could read
differently, before a byte of it is forwarded.

aiohttp's parsers (llhttp and the pure-Python fallback) already refuse most malformed
heads with 400 and a closed connection; these checks cover what one or both of them let
through (measured against the http-desync-guardian corpus, see docs/security.md):

- ``Transfer-Encoding`` other than exactly one ``chunked`` (the Python parser accepts
  ``chunked,chunked``; both accept ``gzip, chunked`` and would drop the ``gzip`` silently);
- a ``Content-Length`` that does not fit in 63 bits (the Python parser accepts 2**64);
- header names that a WSGI/CGI upstream folds into ``Content-Length`` or
  ``Transfer-Encoding`` (``Content_Length``, ``Transfer---Encoding``);
- bodies on GET, HEAD and TRACE, which some upstreams ignore, leaving the body to be
  read as the next request on a pooled connection;
- ``Transfer-Encoding`` in HTTP/1.0 (RFC 9112 §6.1: the framing is faulty), and any
  version but 1.0 and 1.1 (llhttp accepts HTTP/0.9 request lines with headers).

The remaining checks repeat what both parsers do today, so that a parser change or a
lenient flag cannot open the hole again. A request refused here gets 400 and the
connection is closed: its body, if any, was never read, so nothing after the head can be
trusted to be the start of the next request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web

from proxy.problems import BadRequest

MAX_CONTENT_LENGTH_DIGITS = 18  # < 2**63: no parser along the way can overflow
NO_BODY_METHODS = frozenset({"GET", "HEAD", "TRACE"})
SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]+")
_NOT_ALNUM = re.compile(rb"[^a-z0-9]")
_FRAMING = {b"contentlength": b"content-length", b"transferencoding": b"transfer-encoding"}
_OWS = b" \t"


class FramingError(BadRequest):
    """A request whose framing is unsafe: answer 400 and close the connection."""

    slug = "bad-framing"
    title = "Ambiguous or malformed request framing"


def validate_request(
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    method: str,
    version: tuple[int, int],
) -> None:
    """Raise FramingError unless the request's head frames its body in exactly one way."""
    if (version[0], version[1]) not in SUPPORTED_VERSIONS:
        raise FramingError(f"HTTP/{version[0]}.{version[1]} is not supported")
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts = 0
    for name, value in raw_headers:
        lname = _check_field(name, value)
        if lname == b"content-length":
            lengths.append(value.strip(_OWS))
        elif lname == b"transfer-encoding":
            codings.append(value.strip(_OWS))
        elif lname == b"host":
            hosts += 1
    if hosts > 1:
        raise FramingError("more than one Host header")
    _check_body_framing(lengths, codings, method.upper(), version)


def _check_field(name: bytes, value: bytes) -> bytes:
    """Validate one header field and return its lower-cased name."""
    if not _TOKEN.fullmatch(name):
        raise FramingError("header name is not an RFC 9110 token")
    if _CTL.search(value):
        raise FramingError("control character in a header value")
    lname = name.lower()
    lookalike = _FRAMING.get(_NOT_ALNUM.sub(b"", lname))
    if lookalike is not None and lname != lookalike:
        raise FramingError(f"header name imitates {lookalike.decode()}")
    return lname


def _check_body_framing(
    lengths: list[bytes], codings: list[bytes], method: str, version: tuple[int, int]
) -> None:
    if lengths and codings:
        raise FramingError("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise FramingError("more than one Content-Length")
    if len(codings) > 1:
        raise FramingError("more than one Transfer-Encoding")
    if codings:
        if codings[0].lower() != b"chunked":
            raise FramingError("Transfer-Encoding other than chunked is not supported")
        if version == (1, 0):
            raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
        if method in NO_BODY_METHODS:
            raise FramingError(f"a {method} request must not have a body")
    if lengths:
        length = lengths[0]
        if not _DIGITS.fullmatch(length) or len(length) > MAX_CONTENT_LENGTH_DIGITS:
            raise FramingError("Content-Length is not a decimal number of bytes")
        if method in NO_BODY_METHODS and int(length) != 0:
            raise FramingError(f"a {method} request must not have a body")


async def close_after(request: web.BaseRequest, resp: web.StreamResponse) -> web.StreamResponse:
    """Send ``resp`` now, then close the connection.

    ``resp.force_close()`` alone is not enough: aiohttp would first read and discard the
    unread body for up to its lingering time (10 s), trusting the very framing refused here.
    """
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    if request.transport is not None:
        request.transport.close()
    return resp
