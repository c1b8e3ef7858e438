"""Inbound client keys and certificates, route permissions and per-client rate limits.

Only SHA-256 digests of client keys are kept (``key`` and ``key_file`` are hashed at
load), so a memory dump or a repr shows no key. A presented key is hashed and compared
with every known digest using ``hmac.compare_digest``, without stopping at a match, so
neither the position of a match nor a shared prefix shows in the timing.

Under mutual TLS a client may be named by its verified certificate (``cert_subject``, the
whole subject; ``cert_san``, one subject alternative name) instead of a key, or besides
one: an entry with both needs both. A key that is sent must be a known one, whatever the
certificate; without a key, the first certificate-only entry the certificate matches wins.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.config import Client
from proxy.listener_tls import PeerIdentity
from proxy.problems import Forbidden, TooManyRequests, Unauthorized
from proxy.tokens.source import Clock, system_clock

_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(\d+(?:\.\d+)?)/([smh])")


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_rate(rate: str) -> float:
    """``50/s`` → 50.0 requests per second; ``600/m`` → 10.0."""
    m = _RATE.fullmatch(rate)
    if m is None:
        raise ValueError(f"rate must look like 50/s, 600/m or 1000/h, got {rate!r}")
    return float(m.group(1)) / _PER[m.group(2)]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per request."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate if self.rate > 0 else math.inf


@dataclass(frozen=True, slots=True)
class _Entry:
    id: str
    digest: bytes | None
    prefixes: tuple[str, ...]
    bucket: TokenBucket | None
    subject: str | None = None
    san: str | None = None

    @property
    def by_cert(self) -> bool:
        return self.subject is not None or self.san is not None

    def cert_matches(self, peer: PeerIdentity | None) -> bool:
        if peer is None or not self.by_cert:
            return False
        if self.subject is not None and peer.subject != self.subject:
            return False
        return self.san is None or peer.has_san(self.san)

    def allows(self, route_prefix: str) -> bool:
        route = _norm(route_prefix)
        return any(p == "/" or route == p or route.startswith(p + "/") for p in self.prefixes)

    def __repr__(self) -> str:
        return f"_Entry(id={self.id!r}, prefixes={self.prefixes!r})"


def _norm(prefix: str) -> str:
    return prefix.rstrip("/") or "/"


class ClientAccess:
    """Who may use which route, how often. Empty ``clients``: open access (check returns "")."""

    def __init__(
        self,
        clients: Sequence[Client],
        *,
        clock: Clock = system_clock,
        previous: ClientAccess | None = None,
    ) -> None:
        entries = tuple(_entry(c, clock) for c in clients)
        if previous is not None:  # a reload must not hand every client a fresh burst
            entries = tuple(previous._carried(e) for e in entries)
        self._entries = entries

    @property
    def open(self) -> bool:
        return not self._entries

    def check(
        self,
        headers: Mapping[str, str],
        route_prefix: str,
        key_header: str,
        peer: PeerIdentity | None = None,
    ) -> str:
        """The client id for this request, or Unauthorized / Forbidden / TooManyRequests;
        ``peer`` is the connection's verified client certificate, if any."""
        if not self._entries:
            return ""
        entry = self._identify(headers.get(key_header), peer, key_header)
        if not entry.allows(route_prefix):
            raise Forbidden(f"client {entry.id} may not use route {route_prefix}")
        if entry.bucket is not None:
            wait = entry.bucket.take()
            if wait > 0:
                retry = str(max(1, math.ceil(wait))) if math.isfinite(wait) else "3600"
                raise TooManyRequests(
                    f"client {entry.id} is over its rate limit",
                    headers={"Retry-After": retry},
                )
        return entry.id

    def _identify(self, presented: str | None, peer: PeerIdentity | None, header: str) -> _Entry:
        if presented:
            entry = self._match(key_digest(presented))
            if entry is None:
                raise Unauthorized(f"the key in {header} is not a known client key")
            if entry.by_cert and not entry.cert_matches(peer):
                raise Unauthorized(f"client {entry.id} must also present its client certificate")
            return entry
        for entry in self._entries:
            if entry.digest is None and entry.cert_matches(peer):
                return entry
        if peer is not None:
            raise Unauthorized(
                f"no client is identified by this certificate; send the client key in {header}"
            )
        raise Unauthorized(f"send the client key in the {header} header")

    def _carried(self, new: _Entry) -> _Entry:
        """``new`` with the bucket it had before a reload, when its key and limits are the
        same; a changed client starts afresh."""
        for old in self._entries:
            if _who(old) == _who(new) and _limits(old) == _limits(new):
                return _Entry(new.id, new.digest, new.prefixes, old.bucket, new.subject, new.san)
        return new

    def _match(self, digest: bytes) -> _Entry | None:
        found = None
        for entry in self._entries:
            if entry.digest is not None and hmac.compare_digest(entry.digest, digest):
                found = entry
        return found


def _who(entry: _Entry) -> tuple[str, bytes | None, str | None, str | None]:
    return entry.id, entry.digest, entry.subject, entry.san


def _limits(entry: _Entry) -> tuple[float, float] | None:
    return None if entry.bucket is None else (entry.bucket.rate, entry.bucket.burst)


def _entry(client: Client, clock: Clock) -> _Entry:
    digest = None  # the config model demands a key, a certificate identity or both
    if client.key_sha256 is not None:
        digest = bytes.fromhex(client.key_sha256)
    elif client.key is not None:
        digest = key_digest(client.key.get_secret_value())
    bucket = None
    if client.rate is not None:
        rate = parse_rate(client.rate)
        burst = client.burst if client.burst is not None else max(1, math.ceil(rate))
        bucket = TokenBucket(rate, burst, clock)
    prefixes = tuple(_norm(p) for p in client.routes)
    return _Entry(client.id, digest, prefixes, bucket, client.cert_subject, client.cert_san)
