"""Header rewriting in both directions, written once.

As in Go's ``httputil.ReverseProxy``: hop-by-hop headers (and every header the
Connection header names) are dropped before anything is added, so the headers
the proxy injects survive.
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
_REQUEST_DROP = HOP_BY_HOP | _X_FORWARDED | {istr("Host"), istr("Expect"), istr("X-Request-Id")}
_AUTHORIZATION = istr("Authorization")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Headers listed in Connection are hop-by-hop for this message too."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(istr(t.strip()) for t in value.split(",") if t.strip())
    return frozenset(named)


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
    skip = _REQUEST_DROP | drop
    named = connection_named(incoming) if "Connection" in incoming else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name in skip or name in named:
            continue
        out.add(name, value)
    prior = ", ".join(incoming.getall("X-Forwarded-For", ())) if trusted_hop else ""
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    hop_proto = incoming.get("X-Forwarded-Proto") if trusted_hop else None
    hop_host = incoming.get("X-Forwarded-Host") if trusted_hop else None
    out["X-Forwarded-Proto"] = hop_proto or scheme
    host = hop_host or incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers for the client's response; framing is decided by the proxy's own writer."""
    named = connection_named(incoming) if "Connection" in incoming else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name in HOP_BY_HOP or name in named or name == "Content-Length":
            continue
        out.add(name, value)
    return out


AUTHORIZATION = _AUTHORIZATION
