"""Which request paths could leave a route's base on some upstream, and are refused.

The path is forwarded as sent, so what matters is how the upstream (or anything between
it and its files: a WAF, a servlet container, IIS) decodes it, and they disagree. Each
way of decoding is modelled as a *reading*, a small function from the path's bytes to the
bytes some decoder would see. The path is read under every chain of readings up to
``MAX_DEPTH`` long (the readings it reaches form a closed set: every reading of every
member is a member); it is refused when any of them holds a ``..`` segment or a NUL, when
a chain is still changing after ``MAX_DEPTH`` readings, or when the set outgrows
``MAX_READINGS`` or ``WORK_LIMIT`` (which bound what a crafted path costs to check).
Segments are split at ``/`` and ``\\``, and a segment is cut at ``;``, ``?`` or ``#`` and
loses trailing spaces before it is compared with ``..``, as Tomcat, re-parsing decoders
and Windows do. Any ``..`` segment is refused, not only one that climbs above the base: no
client needs one, and an upstream that resolves dot segments before routing would see a
different path than was checked.

A path that is plain ASCII without ``%``, ``\\``, NUL or ``..`` reads the same under every
reading and takes a fast exit.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from urllib.parse import unquote_to_bytes

from proxy.problems import BadRequest

MAX_DEPTH = 4  # a reading chain still changing after this many steps is refused
MAX_READINGS = 32  # distinct readings of one path; more is refused, not explored
WORK_LIMIT = 16 * 1024  # bytes of readings read on; bounds the time a crafted path costs


@dataclass(frozen=True, slots=True)
class Reading:
    """One way a decoder reads a path: ``read`` returns its input object when it does
    not apply, so that the common case costs a containment test."""

    name: str
    read: Callable[[bytes], bytes]


class Hazard(Enum):
    """Why a path is refused; the value is the start of the problem's detail."""

    DOT_SEGMENT = "dot segment in path"
    NUL = "NUL in path"
    TOO_DEEP = f"path is encoded too many times (still decoding after {MAX_DEPTH} readings)"
    TOO_MANY = "path has too many readings to check"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A hazard and the chain of reading names under which it appears (empty: as sent)."""

    hazard: Hazard
    chain: tuple[str, ...]

    @property
    def detail(self) -> str:
        """The problem detail: what was found and how it was read, never the path itself."""
        if not self.chain or self.hazard in (Hazard.TOO_DEEP, Hazard.TOO_MANY):
            return self.hazard.value
        return f"{self.hazard.value} once {', then '.join(self.chain)}"


# --- the readings

_U_ESCAPE = re.compile(rb"%[uU]([0-9A-Fa-f]{4})")
_LOOSE_ESCAPE = re.compile(rb"%[0-9A-Za-z]{2}")
_NOT_HEX_ESCAPE = re.compile(rb"%(?:[G-Zg-z][0-9A-Za-z]|[0-9A-Fa-f][G-Zg-z])")
# look-alikes that NFKC leaves alone but best-fit code page conversions and normalisers
# turn into a separator or a dot (NFKC already folds U+FF0E, U+FF0F, U+FF3C, U+FE52,
# U+FE68, U+2024, U+2025, U+FE30, U+FF05 and the like)
_LOOK_ALIKES = str.maketrans(
    {
        "\u2215": "/",  # division slash
        "\u2044": "/",  # fraction slash
        "\u29f8": "/",  # big solidus
        "\u2571": "/",  # box drawings light diagonal
        "\u2216": "\\",  # set minus
        "\u29f5": "\\",  # reverse solidus operator
        "\u29f9": "\\",  # big reverse solidus
        "\u00a5": "\\",  # yen sign: 0x5C in code page 932
        "\u20a9": "\\",  # won sign: 0x5C in code page 949
        "\u3002": ".",  # ideographic full stop
    }
)
_LOOK_ALIKE_CHARS = re.compile("[" + "".join(map(chr, _LOOK_ALIKES)) + "]")


def _is_utf8(data: bytes) -> bool:
    """Valid UTF-8 (ASCII included) reads the same under every UTF-8 reading below."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# how many bytes a lead byte announces, minimal or not; 1 for a byte that is no lead
_ANNOUNCED = bytes(
    1
    if b < 0xC0 or b >= 0xFE
    else 2
    if b < 0xE0
    else 3
    if b < 0xF0
    else 4
    if b < 0xF8
    else 5
    if b < 0xFC
    else 6
    for b in range(256)
)
_LEAD_BITS = {2: 0x1F, 3: 0x0F, 4: 0x07, 5: 0x03, 6: 0x01}


def _char(group: bytes) -> str | None:
    """The character a lead byte and the bytes after it spell from their low bits, or
    ``None`` when that is no scalar value (a surrogate or past U+10FFFF)."""
    cp = group[0] & _LEAD_BITS[len(group)]
    for byte in group[1:]:
        cp = cp << 6 | byte & 0x3F
    return None if cp > 0x10FFFF or 0xD800 <= cp < 0xE000 else chr(cp)


def _lenient(err: UnicodeError, *, checked: bool) -> tuple[str, int]:
    """Decode the group at an invalid position from the bytes its lead byte announces
    (``checked``: only when they are continuation bytes); otherwise keep the byte."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    data, at = err.object, err.start
    n = _ANNOUNCED[data[at]]
    group = data[at : at + n]
    if n > 1 and len(group) == n and (not checked or all(0x80 <= b < 0xC0 for b in group[1:])):
        char = _char(group)
        if char is not None:
            return char, at + n
    return chr(0xDC00 + data[at]), at + 1  # kept, as surrogateescape spells it


def _skip_group(err: UnicodeError) -> tuple[str, int]:
    """Drop an invalid position with the bytes its lead byte announces."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return "", min(err.start + _ANNOUNCED[err.object[err.start]], len(err.object))


def _decoded_with(data: bytes, errors: str) -> bytes:
    if _is_utf8(data):
        return data
    return data.decode("utf-8", errors).encode("utf-8", "surrogateescape")


codecs.register_error("tokenrelay-overlong", partial(_lenient, checked=True))
codecs.register_error("tokenrelay-unchecked", partial(_lenient, checked=False))
codecs.register_error("tokenrelay-skip-group", _skip_group)


def percent_decoded(data: bytes) -> bytes:
    """RFC 3986 percent-decoding, once."""
    return unquote_to_bytes(data) if b"%" in data else data


def loose_percent_decoded(data: bytes) -> bytes:
    """Percent-decoding by a hex parser that takes any letter as a digit (``'a'`` is 10, ``'v'``
    31) and keeps the low byte: IIS-era ``%c0%9v`` and ``%c0%qf`` are ``%c0%af``. Where every
    escape is hex this is plain percent-decoding, already a reading of its own."""
    if b"%" not in data or _NOT_HEX_ESCAPE.search(data) is None:
        return data
    return _LOOSE_ESCAPE.sub(lambda m: _LOOSE_BYTES[m[0]], data)


def _digit(char: int) -> int:
    c = char | 0x20
    return c - 0x30 if c <= 0x39 else c - 0x61 + 10


_ALNUM = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LOOSE_BYTES = {
    bytes([0x25, hi, lo]): bytes([(_digit(hi) * 16 + _digit(lo)) & 0xFF])
    for hi in _ALNUM
    for lo in _ALNUM
}


def plus_as_space(data: bytes) -> bytes:
    """Form decoding (Java's ``URLDecoder`` on a path): ``+`` is a space, so ``..+`` is ``.. ``."""
    return data.replace(b"+", b" ") if b"+" in data else data


def u_escapes_decoded(data: bytes) -> bytes:
    """IIS ``%uXXXX`` escapes as the UTF-8 of their code point."""
    if b"%u" not in data and b"%U" not in data:
        return data
    return _U_ESCAPE.sub(lambda m: chr(int(m[1], 16)).encode("utf-8", "surrogatepass"), data)


def overlong_decoded(data: bytes) -> bytes:
    """A decoder that checks continuation bytes but not minimal length: ``c0 ae`` is ``.``."""
    return _decoded_with(data, "tokenrelay-overlong")


def continuation_unchecked(data: bytes) -> bytes:
    """A decoder that takes the bytes a lead byte announces without checking they are
    continuation bytes, keeping their low six bits: ``c1 1c`` is ``\\``, ``c0 6e`` is ``.``."""
    return _decoded_with(data, "tokenrelay-unchecked")


def invalid_bytes_dropped(data: bytes) -> bytes:
    """A decoder that drops every byte that is not valid UTF-8: ``c0 2e`` is ``.``."""
    return _decoded_with(data, "ignore")


def invalid_groups_dropped(data: bytes) -> bytes:
    """A decoder that drops an invalid sequence together with the bytes its lead byte
    announced: ``.`` ``c0 78`` ``.`` is ``..``."""
    return _decoded_with(data, "tokenrelay-skip-group")


def look_alikes_folded(data: bytes) -> bytes:
    """Unicode compatibility folding (NFKC) and best-fit look-alikes: full-width and small
    dots, slashes, backslashes and percent signs become ASCII. Invalid bytes stay."""
    if data.isascii():
        return data
    text = data.decode("utf-8", "surrogateescape")
    folded = unicodedata.normalize("NFKC", text)
    if _LOOK_ALIKE_CHARS.search(folded) is not None:
        folded = folded.translate(_LOOK_ALIKES)
    return data if folded == text else folded.encode("utf-8", "surrogateescape")


READINGS: tuple[Reading, ...] = (
    Reading("percent-decoded", percent_decoded),
    Reading("percent-decoded with loose hex digits", loose_percent_decoded),
    Reading("%u escapes decoded", u_escapes_decoded),
    Reading("+ read as a space", plus_as_space),
    Reading("overlong UTF-8 decoded", overlong_decoded),
    Reading("UTF-8 read without checking continuation bytes", continuation_unchecked),
    Reading("invalid UTF-8 bytes dropped", invalid_bytes_dropped),
    Reading("invalid UTF-8 sequences dropped whole", invalid_groups_dropped),
    Reading("look-alike characters folded", look_alikes_folded),
)


# --- the check

_SEPARATORS = re.compile(rb"[/\\]")
_SEGMENT_END = re.compile(rb"[;?#]")


def hazard_in(data: bytes) -> Hazard | None:
    """What one reading of a path holds that no upstream may see."""
    if b"\x00" in data:
        return Hazard.NUL
    if b".." in data:
        for segment in _SEPARATORS.split(data):
            if _SEGMENT_END.split(segment, 1)[0].rstrip(b" ") == b"..":
                return Hazard.DOT_SEGMENT
    return None


def refusal(data: bytes) -> Refusal | None:
    """Why a path is refused under some chain of readings, or ``None``: it is safe under all.

    Breadth first, so each reading is met at its shortest chain; a chain that would need a
    step past ``MAX_DEPTH`` to reach a reading not yet met is refused, and so is a path whose
    readings add up to more than ``MAX_READINGS`` or ``WORK_LIMIT`` bytes.
    """
    frontier: dict[bytes, tuple[str, ...]] = {data: ()}
    seen = {data}
    work = 0
    for depth in range(MAX_DEPTH + 1):
        following: dict[bytes, tuple[str, ...]] = {}
        for current, chain in frontier.items():
            hazard = hazard_in(current)
            if hazard is not None:
                return Refusal(hazard, chain)
            work += len(current)
            if work > WORK_LIMIT:
                return Refusal(Hazard.TOO_MANY, chain)
            for reading in READINGS:
                out = reading.read(current)
                if out is current or out in seen:
                    continue
                if depth == MAX_DEPTH:
                    return Refusal(Hazard.TOO_DEEP, (*chain, reading.name))
                if len(seen) == MAX_READINGS:
                    return Refusal(Hazard.TOO_MANY, chain)
                seen.add(out)
                following[out] = (*chain, reading.name)
        if not following:
            return None
        frontier = following
    return None  # pragma: no cover - the last round returns or adds nothing


def check_remainder(remainder: str) -> None:
    """Refuse (400) a path remainder that could leave the route's base on some upstream."""
    if (
        remainder.isascii()
        and "%" not in remainder
        and "\\" not in remainder
        and ".." not in remainder
        and "\x00" not in remainder
    ):
        return  # every reading is the path itself, and it has no dot segment
    found = refusal(remainder.encode("utf-8", "surrogateescape"))
    if found is not None:
        raise BadRequest(found.detail)
