# ruff: noqa: RUF001  (look-alike characters are what these cases are about)
"""Path remainders the traversal check must refuse or forward, and the oracle the path
property tests judge it by.

Every remainder starts with ``/`` (what follows a route's prefix). The traversal list is
written from the classic encoding classes, not copied from a published list.
"""

from __future__ import annotations

import re

from proxy.forward.pathsafety import MAX_DEPTH, MAX_READINGS, READINGS, WORK_LIMIT

# the two forms from the issue: a lone C0 before each byte, read as dropped
ISSUE_FORMS = ["/%c0%2e%c0%2e%c0%2fetc/passwd", "/%c0%2e%c0%2e/etc/passwd"]

TRAVERSALS = [
    *ISSUE_FORMS,
    # as sent, with parameters, trailing spaces, a query or fragment cut after them
    "/../etc/passwd",
    "/a/../../etc/passwd",
    "/..;/etc/passwd",
    "/..;jsessionid=x/etc",
    "/..%3b/etc",
    "/..%20/etc",
    "/..+/etc",
    "/..%3fx=/etc",
    "/..%23/etc",
    # percent-encoded once, twice, three times, with an encoded percent sign
    "/%2e%2e/etc/passwd",
    "/%2E%2E/etc",
    "/%2e%2e%2fetc%2fpasswd",
    "/..%2fetc%2fpasswd",
    "/.%2e/etc",
    "/%2e./etc",
    "/%252e%252e/etc",
    "/%252e%252e%252fetc",
    "/..%252fetc",
    "/%25252e%25252e/etc",
    "/%%32%65%%32%65/etc",
    "/%25%32%65%25%32%65/etc",
    # IIS %u escapes, plain and encoded
    "/%u002e%u002e/etc",
    "/%U002E%U002E/etc",
    "/%u002e%u002e%u2215etc",
    "/..%u2215etc",
    "/..%u2216etc",
    "/%uff0e%uff0e/etc",
    "/%25u002e%25u002e/etc",
    # overlong UTF-8, 2 to 6 bytes, and encoded once more
    "/%c0%ae%c0%ae/etc",
    "/..%c0%afetc",
    "/a/%c0%af../x",
    "/%c0%ae%c0%ae%c0%afetc",
    "/..%c1%9cetc",
    "/%e0%80%ae%e0%80%ae/etc",
    "/..%e0%80%afetc",
    "/%f0%80%80%ae%f0%80%80%ae/etc",
    "/%f8%80%80%80%ae%f8%80%80%80%ae/etc",
    "/%fc%80%80%80%80%ae%fc%80%80%80%80%ae/etc",
    "/%25c0%25ae%25c0%25ae/etc",
    # an invalid lead byte dropped, alone or with the bytes it announces
    "/%c0.%c0./etc",
    "/%c1%2e%c1%2e/etc",
    "/%ff%2e%ff%2e/etc",
    "/%80%2e%80%2e/etc",
    "/..%c0/etc",
    "/%e0%2e%2e/etc",
    "/.%c0x./etc",
    # continuation bytes not checked: only their low six bits are read
    "/..%c1%1cetc",
    "/%c0%6e%c0%6e/etc",
    "/..%c0%6fetc",
    # IIS-era hex digits: %9v, %qf, %8s and %pc read as af, af, 9c, 9c
    "/..%c0%9vetc",
    "/..%c0%qfetc",
    "/..%c1%8setc",
    "/..%c1%pcetc",
    # backslash as a separator
    "/..\\etc",
    "/..%5cetc",
    "/..%255cetc",
    "/%2e%2e%5cetc",
    "/..%c0%5cetc",
    # full-width and look-alike dots and slashes, percent-encoded
    "/%ef%bc%8e%ef%bc%8e%ef%bc%8fetc",
    "/..%ef%bc%8fetc",
    "/..%ef%bc%bcetc",
    "/%e2%80%a5/etc",
    "/%e2%80%a4%e2%80%a4/etc",
    "/..%e2%88%95etc",
    "/..%e2%81%84etc",
    "/%ef%b9%92%ef%b9%92/etc",
    "/%ef%b8%b0/etc",
    "/..%ef%b9%a8etc",
    "/..%e2%88%96etc",
    "/..%c2%a5etc",
    "/%e3%80%82%e3%80%82/etc",
    "/%ef%bc%85%32%65%ef%bc%85%32%65/etc",
    # the same in raw UTF-8
    "/．．/etc",
    "/．．／etc",
    "/‥/etc",
    "/..∕etc",
    "/..⁄etc",
    "/﹒﹒/etc",
    "/..＼etc",
    # NUL, and a path still decoding after every reading allowed
    "/..%00/etc",
    "/x%00.pdf",
    "/%c0%80x",
    "/%252500",
    "/%2525252525252e%2525252525252e/etc",
]

# harmless under every reading: forwarded as sent
HARMLESS = [
    "/report%20100%25.pdf",
    "/50%25off",
    "/100%25",
    "/%25",
    "/%2525",
    "/%2541",
    "/%25uZZ",
    "/%C0-latin1-A-grave",
    "/%C1rea/%c0",
    "/Voil%C0/x.pdf",
    "/%C0A",
    "/%C0%20",
    "/%c1x",
    "/%e0x",
    "/%f0%2f",
    "/%%",
    "/r%E9sum%E9.pdf",
    "/caf%C3%A9/r%C3%A9sum%C3%A9.pdf",
    "/%E6%97%A5%E6%9C%AC/%E3%83%95%E3%82%A1%E3%82%A4%E3%83%AB.pdf",
    "/日本語/ファイル.pdf",
    "/café/naïve.txt",
    "/v1.2/file..txt",
    "/a..b",
    "/...",
    "/.x",
    "/x/.",
    "/%2e",
    "/a;b=1",
    "/c++/a+b.txt",
    "/a%2Fb/c%3B%20d;v=1",
    "/%EF%BC%8E",  # one full-width dot: a "." segment
    "/%E2%80%A5x",  # two-dot leader then x: "..x"
    "/%u0041",  # an IIS escape for "A"
    "/a%5cb",  # a backslash is a separator, between two names
]


# --- the oracle: every reading, applied naively


def segments_of(data: bytes) -> list[bytes]:
    """The segments of one reading: split at / and \\, cut at ; ? #, trailing spaces off."""
    return [
        re.split(rb"[;?#]", seg, maxsplit=1)[0].rstrip(b" ") for seg in re.split(rb"[/\\]", data)
    ]


def unsafe(data: bytes) -> bool:
    """What the check promises no reading of a forwarded path holds."""
    return b"\x00" in data or b".." in segments_of(data)


def climbs(data: bytes) -> bool:
    """Whether resolving dot segments (RFC 3986 5.2.4) on this reading climbs above the base."""
    depth = 0
    for seg in segments_of(data)[1:]:
        if seg == b"..":
            depth -= 1
            if depth < 0:
                return True
        elif seg not in (b".", b""):
            depth += 1
    return False


def closure(data: bytes, depth: int) -> tuple[list[set[bytes]], int]:
    """The readings of ``data`` by chain length (every reading applied to every member, no
    shortcut), up to ``depth``; and the bytes the check reads on to expand them."""
    levels = [{data}]
    seen = {data}
    for _ in range(depth):
        nxt = {r.read(d) for d in levels[-1] for r in READINGS} - seen
        seen |= nxt
        levels.append(nxt)
    work = sum(len(d) for level in levels[: MAX_DEPTH + 1] for d in level)
    return levels, work


def harmless(data: bytes) -> bool:
    """Harmless under every reading, within the check's stated bounds: no reading is unsafe,
    every chain settles within MAX_DEPTH readings, and the readings fit the limits."""
    levels, work = closure(data, MAX_DEPTH + 1)
    members = set().union(*levels[: MAX_DEPTH + 1])
    return (
        not levels[MAX_DEPTH + 1]
        and len(members) <= MAX_READINGS
        and work <= WORK_LIMIT
        and not any(unsafe(d) for d in members)
    )
