"""Longest-prefix routing and the byte-exact mapping of a request target to an upstream URL.

The path is never decoded for forwarding: what the client sent is what the
upstream gets. Whether it could leave the route's base under some upstream's
decoding is ``pathsafety.check_remainder``'s to say.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from yarl import URL

from proxy.forward.pathsafety import check_remainder
from proxy.problems import BadRequest

T = TypeVar("T")
_ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


@dataclass(frozen=True, slots=True)
class Target:
    """A request target split into its raw path and raw query (``None``: no ``?``)."""

    path: str
    query: str | None

    @classmethod
    def parse(cls, raw: str) -> Target:
        """Split a request target; absolute-form keeps only its path, never its host."""
        if raw[:1] != "/":  # origin-form, the usual case, cannot be absolute-form
            m = _ABSOLUTE_FORM.match(raw)
            if m:
                raw = raw[m.end() :] or "/"
            if not raw.startswith("/"):
                raise BadRequest("request target must be a path")
        if "#" in raw:
            raw = raw.split("#", 1)[0]
        path, sep, query = raw.partition("?")
        return cls(path, query if sep else None)


class RouteTable(Generic[T]):
    """Maps path prefixes to routes; lookup walks the path's segment boundaries once."""

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._by_prefix: dict[str, T] = {}
        for prefix, value in entries:
            key = prefix.rstrip("/") or "/"
            self._by_prefix[key] = value

    def __len__(self) -> int:
        return len(self._by_prefix)

    def lookup(self, path: str) -> tuple[T, str] | None:
        """The route with the longest prefix matching ``path`` and the remainder after it."""
        get = self._by_prefix.get
        end = len(path)
        while end > 0:
            candidate = path[:end]
            hit = get(candidate)
            if hit is not None:
                return hit, path[end:]
            end = path.rfind("/", 0, end)
        hit = get("/")
        if hit is not None:
            return hit, path
        return None


def join_path(base_path: str, remainder: str) -> str:
    """``/v1/`` + ``/trips/7`` → ``/v1/trips/7``; an empty remainder maps to the base itself."""
    if not remainder:
        return base_path
    if remainder.startswith("/"):
        return base_path.rstrip("/") + remainder
    return base_path + remainder


def upstream_url(origin: URL, base_path: str, remainder: str, query: str | None) -> URL:
    """The upstream URL, nothing re-quoted: its ``raw_path_qs`` is the exact request target.

    yarl has no empty query, so the ``?`` of ``/x?`` ends the raw path instead, where
    ``raw_path_qs`` (what the transport and aiohttp write in the request line) still sends it;
    ``path`` and ``raw_path`` then end in it too, so the target is read from ``raw_path_qs``.
    """
    check_remainder(remainder)
    path = join_path(base_path, remainder)
    if query == "":
        path += "?"
    return URL.build(
        scheme=origin.scheme,
        authority=origin.raw_authority,
        path=path,
        query_string=query or "",
        encoded=True,
    )
