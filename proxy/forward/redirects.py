"""Location rewriting, as nginx's ``proxy_redirect default``.

A vendor that redirects to its own URL (``https://api.example.com/v1/x`` or ``/v1/x``)
would send a legacy client straight to the vendor, around the proxy and without a token.
Such references are mapped back to the route's local prefix (``/simacan/x``); every other
value, including other hosts and relative references, passes untouched. Only strings are
cut and joined, so nothing in the path, query or fragment is re-quoted.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict
from yarl import URL

LOCATION_HEADERS = ("Location", "Content-Location")
_ABSOLUTE = re.compile(r"^(?:([A-Za-z][A-Za-z0-9+.-]*):)?//([^/?#]*)")


def rewrite_location(value: str, upstream_origin: URL, base_path: str, prefix: str) -> str:
    """Map a reference into the upstream base onto ``prefix``; return others unchanged."""
    m = _ABSOLUTE.match(value)
    if m:
        if not _same_origin(m.group(1), m.group(2), upstream_origin):
            return value
        rest = value[m.end() :]
    elif value.startswith("/"):
        rest = value
    else:
        return value
    path, tail = _split_path(rest)
    base = base_path.rstrip("/")
    if path != base and not path.startswith(base + "/"):
        return value
    return (prefix.rstrip("/") + path[len(base) :] or "/") + tail


def rewrite_locations(
    headers: CIMultiDict[str], upstream_origin: URL, base_path: str, prefix: str
) -> None:
    """Apply ``rewrite_location`` to a response's Location and Content-Location, in place."""
    for name in LOCATION_HEADERS:
        value = headers.get(name)
        if value is not None:
            headers[name] = rewrite_location(value, upstream_origin, base_path, prefix)


def _same_origin(scheme: str | None, authority: str, origin: URL) -> bool:
    try:
        url = URL(f"{scheme or origin.scheme}://{authority}/")
    except ValueError:
        return False
    if url.user is not None or url.password is not None:
        return False
    return (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)


def _split_path(rest: str) -> tuple[str, str]:
    """``/v1/x?q#f`` → (``/v1/x``, ``?q#f``)."""
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return rest[:cut] or "/", rest[cut:]
