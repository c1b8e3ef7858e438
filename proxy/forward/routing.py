"""Longest-prefix routing and the byte-exact mapping of a request target to an upstream URL.

The path is never decoded for forwarding: what the client sent is what the
upstream gets. Decoding happens only to *check* it: any path whose dot segments
appear after one or more rounds of percent-decoding, in overlong UTF-8 or
``%u`` forms, next to ``;`` parameters, or with a backslash is refused, because
upstreams disagree on how often they decode and what they treat as a separator.
Decoding stops at a fixed point: a literal ``%`` (``50%25off`` decodes to ``50%off``,
which decodes to itself) is data, not an escape still to come.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote_to_bytes

from yarl import URL

from proxy.problems import BadRequest

T = TypeVar("T")

DECODE_ROUNDS = 4  # a path still changing after this many decodings is refused
# What no decoding round may hold. An overlong form (a character spelt in more bytes than it
# needs) is how ``%c0%ae`` becomes ``.`` in a lenient decoder; a lone 0xC0/0xC1 is legacy
# Latin-1 (``À``/``Á``) and passes.
_HAZARDS = re.compile(
    rb"(\\)|(\x00)|(%[uU][0-9A-Fa-f]{4})"
    rb"|([\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x80-\x8f][\x80-\xbf]{2}|[\xf8-\xfd][\x80-\xbf]{4})"
)
_HAZARD_NAMES = {
    1: "encoded backslash in path",
    2: "NUL in path",
    3: "%u escape in path",
    4: "overlong UTF-8 in path",
}
_PLAIN = re.compile(r"[A-Za-z0-9/_.~-]*")
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


def check_remainder(remainder: str) -> None:
    """Refuse a path remainder that could leave the route's base on some upstream."""
    if _PLAIN.fullmatch(remainder) and ".." not in remainder:
        return  # no escapes, separators, parameters or non-ASCII: nothing to decode
    if "\\" in remainder:
        raise BadRequest("backslash in path")
    data = remainder.encode("utf-8", "surrogateescape")
    for _ in range(DECODE_ROUNDS):
        _check_segments(data)
        if b"%" not in data:
            return
        decoded = unquote_to_bytes(data)
        if decoded == data:  # only literal percent signs left: what any upstream sees
            return
        data = decoded
    _check_segments(data)
    if b"%" in data and unquote_to_bytes(data) != data:
        raise BadRequest("path is percent-encoded too many times")


def _check_segments(data: bytes) -> None:
    hazard = _HAZARDS.search(data)
    if hazard is not None:
        raise BadRequest(_HAZARD_NAMES[hazard.lastindex or 4])
    if b".." in data:
        for segment in data.split(b"/"):
            if segment.split(b";", 1)[0] == b"..":
                raise BadRequest("dot segment in path")


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
