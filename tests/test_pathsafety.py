# ruff: noqa: RUF001  (look-alike characters are what these cases are about)
"""The traversal check at the function level: each decoder reading, the issue's forms, a list
of classic payloads, what stays forwarded, and both directions as hypothesis properties.
The same lists go through the real proxy on both server paths in test_review_wire."""

from __future__ import annotations

import string
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.forward import pathsafety as ps
from proxy.forward.pathsafety import Hazard, check_remainder, refusal
from proxy.problems import BadRequest
from tests.path_cases import HARMLESS, ISSUE_FORMS, TRAVERSALS, climbs, closure, harmless, unsafe


def raw(remainder: str) -> bytes:
    return remainder.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("reading", "data", "read_as"),
    [
        (ps.percent_decoded, b"%2e%252e%zz", b".%2e%zz"),
        (
            ps.loose_percent_decoded,
            b"%c0%9v%c0%qf%c1%8s%c1%pc%2e",
            b"\xc0\xaf\xc0\xaf\xc1\x9c\xc1\x9c.",
        ),
        (ps.loose_percent_decoded, b"%2e%41", b"%2e%41"),  # all hex: plain decoding's reading
        (ps.plus_as_space, b"..+/a+b", b".. /a b"),
        (ps.u_escapes_decoded, b"%u002e%U002E%uff0e%u00", b"..\xef\xbc\x8e%u00"),
        (ps.overlong_decoded, b"\xc0\xae\xe0\x80\xae\xf0\x80\x80\xaf\xc1\x9c", b"../\\"),
        (ps.overlong_decoded, b"\xf8\x80\x80\x80\xae\xfc\x80\x80\x80\x80\xae", b".."),
        (ps.overlong_decoded, b"\xc0\x2e\xc0A\xc3\xa9", b"\xc0\x2e\xc0A\xc3\xa9"),
        (ps.continuation_unchecked, b"\xc1\x1c\xc0\x6e\xc0\x2e\xc0A", b"\\..\x01"),
        (ps.continuation_unchecked, b"caf\xc3\xa9\xe9t", b"caf\xc3\xa9\xe9t"),
        (ps.invalid_bytes_dropped, b"\xc0.\xc1.\xff/\x80x\xc3\xa9", b"../x\xc3\xa9"),
        (ps.invalid_groups_dropped, b".\xc0x.\xe0ab/\xc3\xa9", b"../\xc3\xa9"),
        (ps.look_alikes_folded, "．‥／＼﹒∕⁄¥。％".encode(), b".../\\.//\\.%"),
        (ps.look_alikes_folded, "café\udcc0".encode("utf-8", "surrogateescape"), None),
    ],
)
def test_each_reading_reads_as_its_decoder_does(
    reading: Callable[[bytes], bytes], data: bytes, read_as: bytes | None
) -> None:
    assert reading(data) == (data if read_as is None else read_as)


@pytest.mark.parametrize("remainder", ISSUE_FORMS)
def test_a_dropped_c0_before_each_byte_is_refused(remainder: str) -> None:
    found = refusal(raw(remainder))
    assert found is not None and found.hazard is Hazard.DOT_SEGMENT
    with pytest.raises(BadRequest, match="dot segment in path once percent-decoded, then"):
        check_remainder(remainder)


@pytest.mark.parametrize("remainder", TRAVERSALS)
def test_classic_traversal_payloads_are_refused(remainder: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_remainder(remainder)
    assert remainder not in caught.value.detail and "etc" not in caught.value.detail


@pytest.mark.parametrize("remainder", HARMLESS)
def test_what_no_reading_makes_unsafe_is_forwarded(remainder: str) -> None:
    check_remainder(remainder)
    assert harmless(raw(remainder))


@pytest.mark.parametrize(
    ("remainder", "detail"),
    [
        ("/../x", "dot segment in path"),
        ("/%252e%252e/x", "dot segment in path once percent-decoded, then percent-decoded"),
        ("/..%c1%1cx", "once percent-decoded, then UTF-8 read without checking continuation"),
        ("/..%c1%pcx", "once percent-decoded with loose hex digits, then overlong UTF-8"),
        ("/%u002e%u002e", "once %u escapes decoded"),
        ("/%ef%bc%8e%ef%bc%8e", "once percent-decoded, then look-alike characters folded"),
        ("/.%c0x./", "once percent-decoded, then invalid UTF-8 sequences dropped whole"),
        ("/%2500", "NUL in path once percent-decoded, then percent-decoded"),
        ("/%2525252525", "encoded too many times"),
        ("/" + "%c0%25" * 2000, "too many readings to check"),
    ],
)
def test_refusals_say_what_they_found_and_how_it_was_read(remainder: str, detail: str) -> None:
    with pytest.raises(BadRequest, match=detail):
        check_remainder(remainder)


def test_too_many_distinct_readings_are_refused_not_explored() -> None:
    # every combination of a few independent escapes is its own reading
    remainder = "/" + "/".join(["%2541", "%C0A", "%u0041", "％41", "%zz41", "%e9ta"] * 2)
    levels, _ = closure(raw(remainder), ps.MAX_DEPTH)
    assert sum(map(len, levels)) > ps.MAX_READINGS
    found = refusal(raw(remainder))
    assert found is not None and found.hazard is Hazard.TOO_MANY


_FAST = st.text(alphabet=st.characters(max_codepoint=127, exclude_characters="%\\\x00"))


@settings(max_examples=500, deadline=None)
@given(_FAST)
def test_the_fast_exit_is_exact(text: str) -> None:
    """ASCII without %, backslash or NUL: only ``+`` reads as anything else (a space), and
    that matters only next to ``..``; so a path without ``..`` is harmless under every
    reading and passes at once, and one with it passes exactly when no reading is unsafe."""
    data = raw("/" + text)
    if ".." not in text:
        assert all(r.read(data) is data for r in ps.READINGS if r.read is not ps.plus_as_space)
        assert harmless(data)
    _agrees_with_the_oracle("/" + text)


# tokens from every encoding class, so that generated paths mix them
_HOSTILE = st.sampled_from(
    [
        *"./\\;%25aeEfuxc0 +",
        "%2e", "%2E", "%25", "%2f", "%5c", "%c0", "%c1", "%e0", "%f0", "%80", "%ae", "%af",
        "%9c", "%1c", "%6e", "%u", "%u002e", "%U2215", "%zz", "%9v", "%00", "%20", "%3b",
        "．", "／", "‥", "∕", "＼", "％", "é", "\udcc0", "\udcae", "\udce0", "\udc80",
    ]
)  # fmt: skip
_BENIGN = st.sampled_from(
    [
        *string.ascii_letters, *string.digits, "-", "_", "~", "/", ".", ";", "=",
        "%20", "%25", "%2525", "%2F", "%C0", "%c1", "%E9", "%C3%A9", "%E2%80%A5", "%EF%BC%8E",
        "é", "日", "．", "%u0041", "\udcc0", "%41",
    ]
)  # fmt: skip


def _paths(tokens: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(tokens, max_size=14).map(lambda parts: "/" + "".join(parts))


def _agrees_with_the_oracle(remainder: str) -> None:
    data = raw(remainder)
    try:
        check_remainder(remainder)
    except BadRequest:
        passed = False
    else:
        passed = True
        # (a) nothing that passes is unsafe, nor climbs, under any chain of readings, even
        # chains longer than the check looked at: its readings are closed
        levels, _ = closure(data, ps.MAX_DEPTH + 3)
        assert not any(levels[ps.MAX_DEPTH + 1 :]), remainder
        for level in levels:
            for reading in level:
                assert not unsafe(reading) and not climbs(reading), (remainder, reading)
    # (b) whatever is harmless under every reading, within the stated bounds, passes; and
    # nothing else does
    assert passed == harmless(data), remainder


@settings(max_examples=1500, deadline=None)
@given(_paths(_HOSTILE))
def test_hostile_mixes_pass_exactly_when_no_reading_is_unsafe(remainder: str) -> None:
    _agrees_with_the_oracle(remainder)


@settings(max_examples=1000, deadline=None)
@given(_paths(_BENIGN))
def test_ordinary_names_pass_exactly_when_no_reading_is_unsafe(remainder: str) -> None:
    _agrees_with_the_oracle(remainder)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=24))
def test_any_bytes_pass_exactly_when_no_reading_is_unsafe(data: bytes) -> None:
    _agrees_with_the_oracle("/" + data.decode("utf-8", "surrogateescape"))
