"""Request-smuggling cases written for this project, each with the outcome the proxy owes.

They follow RFC 9112 (message framing: §2.2 line endings, §3 request line, §5 field
syntax, §6 body length, §7.1 chunked coding) and the published desync technique classes:
CL.TE and TE.CL (two framings in one message), TE.TE (a Transfer-Encoding obfuscated so
that one parser sees it and another does not), CL.CL (lengths that disagree or parse two
ways), and the field-syntax tricks that make those possible (whitespace before the colon,
obs-fold, bare CR or LF, control bytes). Every request ends in ``Connection: close``, so
nothing after it on the connection is ever served.

``tests/test_desync.py`` sends each one as raw bytes on both server paths and checks:

* ``REFUSED``: 400, the connection closed, nothing reached the upstream (framing errors);
* ``REJECTED``: 400 and nothing reached the upstream, the connection may stay (a target or
  request line the proxy does not serve, with framing it could still read);
* ``ACCEPTED``: 200, exactly one cleanly framed request upstream, carrying ``body``.

Where aiohttp's two parsers (llhttp, and the pure-Python one the file is run again with)
answer differently, both answers are safe and ``pure_python`` says the second one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    REFUSED = "refused, connection closed"
    REJECTED = "rejected, nothing forwarded"
    ACCEPTED = "forwarded once, cleanly framed"


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: desync.test\r\n\r\n"
HOST = b"Host: desync.test\r\n"
CLOSE = b"Connection: close\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


@dataclass(frozen=True)
class DesyncCase:
    technique: str
    name: str
    raw: bytes  # the whole request as sent
    outcome: Outcome
    body: bytes = b""  # what the upstream must get, when ACCEPTED
    pure_python: Outcome | None = None  # aiohttp's pure-Python parser, where it differs

    def expected(self, *, pure_python: bool) -> Outcome:
        return self.pure_python or self.outcome if pure_python else self.outcome

    @property
    def id(self) -> str:
        return f"{self.technique}: {self.name}"


def post(fields: bytes, body: bytes = b"", *, line: bytes = b"POST / HTTP/1.1") -> bytes:
    """A request with ``fields`` (whole lines, CRLF-terminated) after Host and before close."""
    return line + b"\r\n" + HOST + fields + CLOSE + b"\r\n" + body


def chunked(body: bytes, extra: bytes = b"") -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n" + extra, body)


def length(value: bytes, body: bytes = b"hello") -> bytes:
    return post(b"Content-Length: " + value + b"\r\n", body)


R, J, A = Outcome.REFUSED, Outcome.REJECTED, Outcome.ACCEPTED

CASES: list[DesyncCase] = [
    # --- CL.TE / TE.CL: both framings in one message (RFC 9112 §6.1, §6.3 item 3)
    DesyncCase("CL.TE", "Content-Length then chunked", post(
        b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nX"), R),
    DesyncCase("TE.CL", "chunked then Content-Length", post(
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n"), R),
    DesyncCase("CL.TE", "zero length hiding a chunked body", post(
        b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.CL", "HTTP/1.0 with both", post(
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", HELLO_CHUNKED,
        line=b"POST / HTTP/1.0"), R),
    # --- TE.TE: a Transfer-Encoding only some parsers recognise
    DesyncCase("TE.TE", "xchunked", post(b"Transfer-Encoding: xchunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "chunked twice in one value", post(
        b"Transfer-Encoding: chunked, chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "chunked in two fields", post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "a second, empty Transfer-Encoding", post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "empty Transfer-Encoding", post(
        b"Transfer-Encoding: \r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "identity (removed by RFC 9112)", post(
        b"Transfer-Encoding: identity\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "gzip before chunked (only chunked is implemented)", post(
        b"Transfer-Encoding: gzip, chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "chunked with a parameter", post(
        b"Transfer-Encoding: chunked;q=1\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "whitespace before the colon", post(
        b"Transfer-Encoding : chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "tab before the colon", post(
        b"Transfer-Encoding\t: chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "leading space before the name (obs-fold of the Host line)", post(
        b" Transfer-Encoding: chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "value folded onto a continuation line", post(
        b"Transfer-Encoding:\r\n chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "field hidden in a fold of another", post(
        b"X-Note: a\r\n Transfer-Encoding: chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "underscore for the hyphen", post(
        b"Transfer_Encoding: chunked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "bare CR inside the value", post(
        b"Transfer-Encoding: chun\rked\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "NUL after chunked", post(
        b"Transfer-Encoding: chunked\x00\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE.TE", "vertical tab after chunked", post(
        b"Transfer-Encoding: chunked\x0b\r\n", HELLO_CHUNKED), R),
    DesyncCase("TE", "upper-case Chunked is chunked (codings are case-insensitive)", post(
        b"Transfer-Encoding: Chunked\r\n", HELLO_CHUNKED), A, b"hello"),
    DesyncCase("TE", "spaces and tabs around chunked are whitespace (OWS)", post(
        b"Transfer-Encoding: \t  chunked \r\n", HELLO_CHUNKED), A, b"hello"),
    # OWS too, yet llhttp refuses a tab after the value: refusing is the safe side
    DesyncCase("TE", "a tab after chunked", post(
        b"Transfer-Encoding: chunked\t\r\n", HELLO_CHUNKED), R, b"hello", pure_python=A),
    DesyncCase("TE", "HTTP/1.0 cannot be chunked", post(
        b"Transfer-Encoding: chunked\r\n", HELLO_CHUNKED, line=b"POST / HTTP/1.0"), R),
    # --- CL.CL: lengths that disagree or parse two ways (RFC 9112 §6.3 item 5, RFC 9110 §8.6)
    DesyncCase("CL.CL", "two different lengths", post(
        b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), R),
    DesyncCase("CL.CL", "the same length twice", post(
        b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), R),
    DesyncCase("CL.CL", "a list of equal lengths", length(b"5, 5"), R),
    DesyncCase("CL.CL", "a list of different lengths", length(b"5, 6", b"hello!"), R),
    DesyncCase("CL", "plus sign", length(b"+5"), R),
    DesyncCase("CL", "hexadecimal", length(b"0x5"), R),
    DesyncCase("CL", "negative", length(b"-1"), R),
    DesyncCase("CL", "exponent", length(b"5e0"), R),
    DesyncCase("CL", "empty", length(b""), R),
    DesyncCase("CL", "2**64 + 5 (wraps to 5 in 64 bits)", length(b"18446744073709551621"), R),
    DesyncCase("CL", "digits split by a space", length(b"1 5", b"hello"), R),
    DesyncCase("CL", "whitespace before the colon", post(
        b"Content-Length : 5\r\n", b"hello"), R),
    DesyncCase("CL", "underscore for the hyphen", post(b"Content_Length: 5\r\n", b"hello"), R),
    DesyncCase("CL", "folded onto a continuation line", post(
        b"Content-Length:\r\n 5\r\n", b"hello"), R),
    DesyncCase("CL", "a length on a GET (a body some servers ignore)", post(
        b"Content-Length: 5\r\n", b"hello", line=b"GET / HTTP/1.1"), R),
    DesyncCase("CL", "leading zeros are still 1*DIGIT", length(b"005"), A, b"hello"),
    DesyncCase("CL", "surrounding whitespace is OWS", length(b" 5\t"), A, b"hello"),
    DesyncCase("CL", "HTTP/1.0 with a length", post(
        b"Content-Length: 5\r\n", b"hello", line=b"POST / HTTP/1.0"), A, b"hello"),
    # --- chunked bodies (RFC 9112 §7.1)
    DesyncCase("chunk", "0x prefix on the size", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "empty size line", chunked(b"\r\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "space before the size", chunked(b" 5\r\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "negative size", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "a non-hex digit in the size", chunked(b"5g\r\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "data longer than its size", chunked(b"3\r\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "no CRLF after the data", chunked(b"5\r\nhello0\r\n\r\n"), R),
    DesyncCase("chunk", "bare LF after the size", chunked(b"5\nhello\r\n0\r\n\r\n"), R),
    DesyncCase("chunk", "bare LF after the data", chunked(b"5\r\nhello\n0\r\n\r\n"), R),
    DesyncCase("chunk", "no final CRLF: the next request read as a trailer", chunked(
        b"5\r\nhello\r\n0\r\n" + SMUGGLED), R),
    DesyncCase("chunk", "extension with a value", chunked(
        b"5;name=value\r\nhello\r\n0\r\n\r\n"), A, b"hello"),
    DesyncCase("chunk", "extension with a quoted value", chunked(
        b'5;name="v a l"\r\nhello\r\n0\r\n\r\n'), A, b"hello"),
    DesyncCase("chunk", "upper-case hex size", chunked(b"A\r\nhellohello\r\n0\r\n\r\n"),
               A, b"hellohello"),
    DesyncCase("chunk", "leading zeros on the size", chunked(b"0005\r\nhello\r\n0\r\n\r\n"),
               A, b"hello"),
    DesyncCase("chunk", "a trailer field", chunked(b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
               A, b"hello"),
    # --- line endings and bytes in the head (RFC 9112 §2.2, §5; RFC 9110 §5.5)
    DesyncCase("bytes", "bare LF ending every line",
               b"POST / HTTP/1.1\nHost: desync.test\nContent-Length: 5\nConnection: close\n\n"
               b"hello", R),
    DesyncCase("bytes", "bare LF ending one field", post(
        b"X-A: 1\nContent-Length: 5\r\n", b"hello"), R),
    DesyncCase("bytes", "bare CR ending one field", post(
        b"X-A: 1\rContent-Length: 5\r\n", b"hello"), R),
    DesyncCase("bytes", "NUL in a value", post(b"X-A: a\x00b\r\n"), R),
    DesyncCase("bytes", "NUL in a name", post(b"X-\x00A: b\r\n"), R),
    DesyncCase("bytes", "control byte in a value", post(b"X-A: a\x01b\r\n"), R),
    DesyncCase("bytes", "DEL in a name", post(b"X-\x7fA: b\r\n"), R),
    DesyncCase("bytes", "space inside a name", post(b"X A: b\r\n"), R),
    DesyncCase("bytes", "a field with no colon", post(b"X-A b\r\n"), R),
    DesyncCase("bytes", "an empty name", post(b": b\r\n"), R),
    DesyncCase("bytes", "a separator in a name", post(b"X(A): b\r\n"), R),
    DesyncCase("bytes", "tab and obs-text in a value are field content", post(
        b"X-A: caf\xc3\xa9\tau lait\r\nContent-Length: 5\r\n", b"hello"), A, b"hello"),
    # --- request line (RFC 9112 §3)
    DesyncCase("line", "HTTP/0.9 (no version)", b"GET /\r\n\r\n", R),
    DesyncCase("line", "HTTP/1.2", post(b"", line=b"GET / HTTP/1.2"), R),
    DesyncCase("line", "lower-case http", post(b"", line=b"GET / http/1.1"), R),
    DesyncCase("line", "two spaces: whitespace-delimited words (RFC 9112 §3), sent clean",
               length(b"5").replace(b"POST / ", b"POST  / "), A, b"hello", pure_python=R),
    DesyncCase("line", "tabs for spaces", post(b"", line=b"GET\t/\tHTTP/1.1"), R),
    DesyncCase("line", "a separator in the method", post(b"", line=b"GE(T / HTTP/1.1"), R),
    DesyncCase("line", "a space in the target", post(b"", line=b"GET /a b HTTP/1.1"), R),
    DesyncCase("line", "NUL in the target", post(b"", line=b"GET /a\x00b HTTP/1.1"), R),
    DesyncCase("line", "trailing space after the version", post(
        b"", line=b"GET / HTTP/1.1 "), R),
    DesyncCase("line", "absolute-form is accepted (RFC 9112 §3.2.2) and sent in origin-form",
               length(b"5").replace(b"POST / ", b"POST http://desync.test/ "), A, b"hello"),
    DesyncCase("line", "a dot-segment climbing above the route's base", post(
        b"", line=b"GET /a/%2e%2e/%2e%2e/etc HTTP/1.1"), J),
    DesyncCase("line", "an authority-form target on a GET", post(
        b"", line=b"GET desync.test:80 HTTP/1.1"), J),
    DesyncCase("line", "two Host fields", post(b"Host: other.test\r\n", line=b"GET / HTTP/1.1"),
               R),
]  # fmt: skip
