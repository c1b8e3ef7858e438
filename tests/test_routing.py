"""Prefix matching and the byte-exact path mapping, including hypothesis properties."""

from __future__ import annotations

import string
from urllib.parse import quote, unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.forward.pathsafety import check_remainder
from proxy.forward.routing import RouteTable, Target, upstream_url
from proxy.problems import BadRequest
from tests.path_cases import harmless

ORIGIN = URL("https://api.example.com")


def table() -> RouteTable[str]:
    return RouteTable(
        [("/simacan/", "simacan"), ("/simacan/v2/", "v2"), ("/", "root"), ("/a", "a")]
    )


@pytest.mark.parametrize(
    ("path", "route", "rest"),
    [
        ("/simacan/trips/7", "simacan", "/trips/7"),
        ("/simacan", "simacan", ""),
        ("/simacan/", "simacan", "/"),
        ("/simacan/v2/x", "v2", "/x"),
        ("/simacan/v2", "v2", ""),
        ("/simacanx", "root", "/simacanx"),
        ("/simacanx/y", "root", "/simacanx/y"),
        ("/a/b", "a", "/b"),
        ("/ab", "root", "/ab"),
        ("/", "root", ""),
    ],
)
def test_longest_prefix_at_segment_boundaries(path: str, route: str, rest: str) -> None:
    assert table().lookup(path) == (route, rest)


def test_no_route_without_catch_all() -> None:
    t: RouteTable[str] = RouteTable([("/simacan/", "s")])
    assert t.lookup("/simacanx") is None
    assert t.lookup("/") is None


@pytest.mark.parametrize(
    ("base", "remainder", "query", "expected"),
    [
        ("/v1/", "/trips/7", "from=2026", "https://api.example.com/v1/trips/7?from=2026"),
        ("/v1/", "", None, "https://api.example.com/v1/"),
        ("/v1/", "/a%2Fb", "q=a+b&q=c&x=%20", "https://api.example.com/v1/a%2Fb?q=a+b&q=c&x=%20"),
        ("/", "/x", "", "https://api.example.com/x?"),  # an empty query is kept
        ("/v1", "/x", None, "https://api.example.com/v1/x"),
    ],
)
def test_mapping_is_byte_exact(base: str, remainder: str, query: str | None, expected: str) -> None:
    url = upstream_url(ORIGIN, base, remainder, query)
    assert str(url) == expected
    assert url.raw_path_qs == expected.removeprefix("https://api.example.com")


@pytest.mark.parametrize(
    "remainder",
    [
        "/..",
        "/../x",
        "/a/../../x",
        "/%2e%2e/x",
        "/%2E%2e/x",
        "/.%2e/x",
        "/%2e./x",
        "/%252e%252e/x",
        "/%25252e%25252e/x",
        "/..;/x",
        "/..;jsessionid=1/x",
        "/%2e%2e;x/y",
        "/a\\..\\b",
        "/a%5c..%5cb",
        "/%c0%ae%c0%ae/x",
        "/%u002e%u002e/x",
        "/%e0%80%ae%e0%80%ae/",
        "/a%00b",
        "/..%2fx",
        "/%2e%2e%2fx",
    ],
)
def test_traversal_refused(remainder: str) -> None:
    with pytest.raises(BadRequest):
        upstream_url(ORIGIN, "/v1/", remainder, None)


@pytest.mark.parametrize("remainder", ["/a..b", "/...", "/.x", "/x/.", "/%2e", "/a;b=1"])
def test_harmless_dots_pass(remainder: str) -> None:
    check_remainder(remainder)


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/a?b=1", "/a", "b=1"),
        ("/a", "/a", None),
        ("/a?", "/a", ""),
        ("http://evil.example/x?y", "/x", "y"),
        ("https://evil.example", "/", None),
        ("//evil.example/x", "//evil.example/x", None),
    ],
)
def test_target_parse(raw: str, path: str, query: str | None) -> None:
    assert Target.parse(raw) == Target(path, query)


def test_target_must_be_a_path() -> None:
    with pytest.raises(BadRequest):
        Target.parse("*")


_SEGMENT_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%"


def _normalise(path: str) -> list[bytes]:
    """Resolve dot segments the way an upstream that decodes once would (RFC 3986 §5.2.4)."""
    out: list[bytes] = []
    for seg in unquote_to_bytes(path).split(b"/"):
        if seg == b"..":
            if out:
                out.pop()
        elif seg != b".":
            out.append(seg)
    return out


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.text(alphabet=_SEGMENT_CHARS + "/\\", max_size=12), max_size=8))
def test_no_generated_path_escapes_its_base(parts: list[str]) -> None:
    remainder = "/" + "/".join(parts)
    try:
        url = upstream_url(ORIGIN, "/v1/", remainder, None)
    except BadRequest:
        return
    decoded = _normalise(url.raw_path)
    assert decoded[:2] == [b"", b"v1"], url.raw_path


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=10), min_size=1, max_size=6),
    st.text(alphabet=string.ascii_letters + "=&+%20", max_size=20),
)
def test_percent_encoded_paths_arrive_byte_identical(parts: list[bytes], query: str) -> None:
    remainder = "/" + "/".join(quote(p, safe="") for p in parts)
    try:
        url = upstream_url(ORIGIN, "/v1/", remainder, query)
    except BadRequest:
        assert not harmless(remainder.encode())  # some decoder reading of it is unsafe
        return
    assert url.raw_path_qs == "/v1" + remainder + "?" + query
    assert str(url) == "https://api.example.com/v1" + remainder + "?" + query
