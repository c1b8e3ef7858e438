"""Header rewriting in both directions, written once.

As in Go's ``httputil.ReverseProxy``: hop-by-hop headers (and every header the
Connection header names) are dropped before anything is added, so the headers
the proxy injects survive. Names are compared lowercased: a multidict's ``istr`` keys
hash by their spelling, so ``x-forwarded-for`` or ``transfer-encoding`` would slip past a
set of canonical names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy, istr

HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
    )
)
_X_FORWARDED = frozenset(
    istr(h) for h in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")
)
# what a client says about earlier hops: believed only from a trusted proxy, which the
# X-Forwarded-* are rebuilt from; the others pass through from it untouched
_HOP_CLAIMS = frozenset(("forwarded", "x-real-ip"))
_REQUEST_DROP = frozenset(
    h.lower() for h in HOP_BY_HOP | _X_FORWARDED | {"Host", "Expect", "X-Request-Id"}
)
_RESPONSE_DROP = frozenset(h.lower() for h in HOP_BY_HOP | {"Content-Length"})
_AUTHORIZATION = istr("Authorization")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Headers listed in Connection are hop-by-hop for this message too (lowercased)."""
    values = tuple(headers.getall("Connection", ()))
    named = _NAMED.get(values)
    if named is None:
        named = frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
        if len(_NAMED) < 256:  # the usual values (keep-alive, close) repeat endlessly
            _NAMED[values] = named
    return named


_NAMED: dict[tuple[str, ...], frozenset[str]] = {}


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(i, strict=False) for i in items)


def is_trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    if not trusted:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    peer: str,
    scheme: str,
    trusted_hop: bool,
    drop: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """Headers for the upstream request, before the token and request id are set."""
    skip = _skip_set(drop, trusted_hop)
    named = connection_named(incoming) if "Connection" in incoming else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        low = name.lower()
        if low in skip or low in named:
            continue
        out.add(name, value)
    # the X-Forwarded-* were all skipped above: add is set, without the search
    prior = ", ".join(incoming.getall("X-Forwarded-For", ())) if trusted_hop else ""
    out.add("X-Forwarded-For", f"{prior}, {peer}" if prior else peer)
    hop_proto = incoming.get("X-Forwarded-Proto") if trusted_hop else None
    hop_host = incoming.get("X-Forwarded-Host") if trusted_hop else None
    out.add("X-Forwarded-Proto", hop_proto or scheme)
    host = hop_host or incoming.get("Host")
    if host:
        out.add("X-Forwarded-Host", host)
    return out


_SKIP_SETS: dict[tuple[frozenset[str], bool], frozenset[str]] = {}


def _skip_set(drop: frozenset[str], trusted_hop: bool) -> frozenset[str]:
    """The per-route drop set joined with the fixed one, once per route and peer kind rather
    than per request (routes are few: the cache stays small)."""
    skip = _SKIP_SETS.get((drop, trusted_hop))
    if skip is None:
        skip = _REQUEST_DROP | {h.lower() for h in drop}
        if not trusted_hop:
            skip |= _HOP_CLAIMS
        _SKIP_SETS[(drop, trusted_hop)] = skip
    return skip


def response_headers(
    incoming: CIMultiDictProxy[str], into: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """Headers for the client's response; framing is decided by the proxy's own writer.

    ``into``: the response's own header map, filled in place (saves a copy)."""
    named = connection_named(incoming) if "Connection" in incoming else frozenset()
    out: CIMultiDict[str] = CIMultiDict() if into is None else into
    for name, value in incoming.items():
        low = name.lower()
        if low in _RESPONSE_DROP or low in named:
            continue
        out.add(name, value)
    return out


def sendable_reason(reason: str | None) -> str | None:
    """The upstream's reason phrase, or None (the standard phrase) when it holds bytes that
    are not UTF-8 (kept as surrogates): aiohttp's server writes a head as UTF-8 and cannot
    send them as received, so neither server does. Clients ignore the phrase (RFC 9112 §4)."""
    if reason is None or reason.isascii():
        return reason
    try:
        reason.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return reason


def encode_head(lines: list[str]) -> bytes:
    """A message head from its lines (each ending in CRLF, the last one empty), refusing a
    name or value that would smuggle in a line of its own."""
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("a header name or value holds a line break")
    return text.encode("utf-8", "surrogateescape")


AUTHORIZATION = _AUTHORIZATION
