"""What counts as an upstream failure, and the rules both upstream clients apply to it:
which requests may be sent twice, and which response heads can be relayed as sent.

The lean client (``transport``) applies them from its parser's callbacks; aiohttp's client,
used for routes behind an env proxy, gets them from the forwarder once its head is in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from multidict import CIMultiDictProxy

# sent once more on a fresh connection when a reused one closed before answering, as Go's
# Transport does (TRACE too there; the proxy never forwards it)
REPEATABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IDEMPOTENCY_HEADERS = ("Idempotency-Key", "X-Idempotency-Key")


class ErrorKind(StrEnum):
    """Why an upstream exchange failed: ``upstream_error`` in problems, logs and metrics."""

    CONNECT = "connect"
    TLS = "tls"
    RESET = "reset"
    PROTOCOL = "protocol"
    TIMEOUT = "timeout"


class TransportError(Exception):
    """The upstream exchange failed; ``kind`` is the forwarder's ``upstream_error`` and
    ``detail`` what a client is told (the message may hold upstream text: logs only)."""

    kind = ErrorKind.RESET
    detail = "upstream connection failed"


class ConnectFailed(TransportError):
    """No TCP connection could be made (refused, unreachable, name not resolved)."""

    kind = ErrorKind.CONNECT
    detail = "cannot connect to the upstream"


class ProtocolError(TransportError):
    """The upstream's response is malformed or framed ambiguously: never trust the rest."""

    kind = ErrorKind.PROTOCOL
    detail = "upstream sent a malformed response"


class ConnectionLost(TransportError):
    """The upstream closed or reset the connection before the response was complete."""


class NotRepeated(ConnectionLost):
    """A reused connection closed before answering a request that is not safe to send twice:
    the upstream may have acted on it, so it is not sent again."""

    detail = (
        "upstream closed the connection before answering; the request was not sent again "
        "(not idempotent)"
    )


class BodyFailed(TransportError):
    """The request body's source raised; the exception is chained."""


class SinkFailed(TransportError):
    """What a spliced body was handed to failed (the client went away); the cause is chained."""


def repeatable(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request may be sent twice when the first attempt got no answer: a safe
    method, or one whose client vouches for it with an idempotency key (Go's rule)."""
    return method in REPEATABLE_METHODS or any(h in headers for h in IDEMPOTENCY_HEADERS)


def check_status(status: int) -> None:
    """A status outside 100-599 cannot be relayed as a status (RFC 9110 §15)."""
    if not 100 <= status <= 599:
        raise ProtocolError(f"upstream status {status} is outside 100-599")


def check_transfer_encoding(codings: Iterable[str]) -> None:
    """Exactly one ``chunked`` or none: any other coding (``gzip``, ``gzip, chunked``) leaves
    the body's end to a guess, and the proxy relays bodies unencoded by hop codings."""
    values = list(codings)
    if len(values) > 1 or (values and values[0].strip(" \t").lower() != "chunked"):
        raise ProtocolError("upstream Transfer-Encoding other than chunked")


def check_head(status: int, headers: CIMultiDictProxy[str], body: bool) -> None:
    """This module's rules for a head another client parsed (aiohttp's, via a proxy):
    ``body`` says whether the response has one (not HEAD, 204 or 304)."""
    check_status(status)
    if body:
        check_transfer_encoding(headers.getall("Transfer-Encoding", ()))
    for name, value in headers.items():
        if not (name.isascii() and (value.isascii() or _utf8(value))):
            raise ProtocolError("upstream header holds bytes that are not UTF-8")


def _utf8(text: str) -> bool:
    """``text`` was decoded from valid UTF-8 (no surrogate stands for a stray byte)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
