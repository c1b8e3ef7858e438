"""Server-side TLS for the listeners: settings, checks, a context that follows its files.

The settings are checked as start-up would load them (``check_listener_tls``), so an
encrypted key, a key that is not the certificate's, or an expired certificate is a config
error at its key path. ``ServerTLS`` serves one listener: the context given to the server
never changes; an SNI callback (OpenSSL calls it for every ClientHello, with or without a
server name) moves each new handshake to the current context. A reload builds a whole new
context from the files and swaps it in only if it loads, so a bad new pair keeps the old
one and open connections are untouched. Files are polled (inode, mtime, size: cert-manager
and Kubernetes rotate them by swapping a symlink) and reloaded on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import ssl
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, field_validator

from proxy.tls import TLSFileError, load_ca, load_pair

log = structlog.get_logger("tokenrelay")

# Mozilla's "intermediate" profile for TLS 1.2 (TLS 1.3 suites are all modern); the DHE
# suites are left out since no DH parameters are loaded.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
EXPIRY_WARNING = dt.timedelta(days=14)
POLL_SECONDS = 5.0
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class ListenTLS(BaseModel):
    """``listen.tls`` / ``admin.tls``."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @field_validator("cert_file", "key_file", "client_ca_file")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v


def check_listener_tls(settings: ListenTLS, now: dt.datetime | None = None) -> dt.datetime:
    """Load the files as start-up would; the certificate's expiry, or TLSFileError."""
    return load_listener_tls(settings, now)[1]


def load_listener_tls(
    settings: ListenTLS, now: dt.datetime | None = None
) -> tuple[ssl.SSLContext, dt.datetime]:
    """The server context for these files and the certificate's expiry, or TLSFileError."""
    cert = _read_cert(settings.cert_file)
    key = _read_key(settings.key_file)
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise TLSFileError(
            "key_file",
            f"{settings.key_file} is not the key of the certificate in {settings.cert_file}",
        )
    expires = cert.not_valid_after_utc
    if expires <= (now or _utcnow()):
        raise TLSFileError(
            "cert_file", f"the certificate in {settings.cert_file} expired on {_day(expires)}"
        )
    return server_context(settings), expires


def server_context(settings: ListenTLS) -> ssl.SSLContext:
    """A hardened server context for these files: TLS 1.2+ (or 1.3), intermediate ciphers,
    no compression, renegotiation or tickets, ALPN http/1.1, client certificates if asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(["http/1.1"])
    load_pair(ctx, settings.cert_file, settings.key_file, keys=("cert_file", "key_file"))
    if settings.client_ca_file is not None:
        load_ca(ctx, settings.client_ca_file, key="client_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TLSFileError("cert_file", f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise TLSFileError("cert_file", f"{path} holds no PEM certificate") from None


def _read_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSFileError("key_file", f"cannot read {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise TLSFileError(
            "key_file", f"{path} is an encrypted key; give an unencrypted one"
        ) from None
    except ValueError:
        raise TLSFileError("key_file", f"{path} holds no PEM private key") from None


def _spki(public_key: object) -> bytes:
    as_bytes = getattr(public_key, "public_bytes", None)
    if as_bytes is None:
        return b""
    out: bytes = as_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_expiry(expires: dt.datetime, now: dt.datetime | None = None) -> str:
    """``2027-01-31 12:00:00 UTC (in 58 days)``: what ``tokenrelay check`` prints."""
    left = expires - (now or _utcnow())
    return f"{_day(expires)} (in {left.days} days)"


Signature = tuple[tuple[int, int, int, int], ...]


def _signature(paths: Iterable[Path]) -> Signature:
    """What changes when a file is rewritten or a symlink swapped to a new one."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((0, 0, 0, -1))
        else:
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class ServerTLS:
    """One listener's TLS: ``context`` for the server, ``reload``/``poll`` for its files."""

    def __init__(
        self,
        settings: ListenTLS,
        name: str = "listen",
        *,
        poll_seconds: float = POLL_SECONDS,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.name = name
        self._now = now
        self._poll_seconds = poll_seconds
        self._files = [settings.cert_file, settings.key_file]
        self._files += [settings.client_ca_file] if settings.client_ca_file else []
        self._seen = _signature(self._files)
        self.context, self.expires = load_listener_tls(settings, now())
        self.context.sni_callback = self._pick
        self._current = self.context
        self._task: asyncio.Task[None] | None = None
        self.reloaded = asyncio.Event()  # set at each pair taken (what a test waits for)
        self._warn_if_expiring()

    def _pick(self, obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._current is not self.context:
            obj.context = self._current

    def poll(self) -> bool:
        """Reload if a file changed since the last look; whether a new pair was taken."""
        now = _signature(self._files)
        if now == self._seen:
            return False
        self._seen = now  # a bad pair is reported once, not at every poll
        return self.reload()

    def reload(self) -> bool:
        """Build a context from the files now; swap it in, or keep the old and say why."""
        self._seen = _signature(self._files)
        try:
            ctx, expires = load_listener_tls(self.settings, self._now())
        except TLSFileError as exc:
            log.error(
                "listener certificate reload failed, keeping the old one",
                listener=self.name,
                key_path=f"{self.name}.tls.{exc.key}",
                problem=str(exc),
            )
            return False
        ctx.sni_callback = self._pick
        self._current, self.expires = ctx, expires
        self.reloaded.set()
        log.info("listener certificate reloaded", listener=self.name, expires=_day(expires))
        self._warn_if_expiring()
        return True

    def seconds_left(self) -> float:
        return (self.expires - self._now()).total_seconds()

    def _warn_if_expiring(self) -> None:
        if self.expires - self._now() <= EXPIRY_WARNING:
            log.warning(
                "listener certificate expires soon",
                listener=self.name,
                key_path=f"{self.name}.tls.cert_file",
                expires=describe_expiry(self.expires, self._now()),
            )

    def start(self) -> None:
        """Poll the files in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise: the old pair serves on
                log.exception("listener certificate poll failed", listener=self.name)


# --- the expiry metric: one collector per metrics registry, fed by every listener on it


class _ExpiryCollector:
    def __init__(self) -> None:
        self.listeners: weakref.WeakSet[ServerTLS] = weakref.WeakSet()

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "tokenrelay_listener_cert_expiry_seconds",
            "Seconds until the listener's certificate expires",
            labels=["listener"],
        )
        for tls in sorted(self.listeners, key=lambda t: t.name):
            family.add_metric([tls.name], tls.seconds_left())
        yield family


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _ExpiryCollector] = (
    weakref.WeakKeyDictionary()
)


def expose_expiry(registry: CollectorRegistry, tls: ServerTLS) -> None:
    """Add ``tls`` to ``tokenrelay_listener_cert_expiry_seconds`` on ``registry``."""
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = _ExpiryCollector()
        registry.register(collector)
    collector.listeners.add(tls)


# --- client identities from certificates (mutual TLS)


def canonical_subject(text: str) -> str:
    """``CN=bi-tool,O=Acme`` in the one spelling certificates are compared in."""
    try:
        return _canonical(x509.Name.from_rfc4514_string(text))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a distinguished name in RFC 4514 form, e.g. CN=bi-tool,O=Acme "
            "(openssl x509 -noout -subject -nameopt RFC2253 prints it so)"
        ) from None


def _canonical(name: x509.Name) -> str:
    """Every attribute must match, in whatever order the certificate lists them."""
    return ",".join(sorted(rdn.rfc4514_string() for rdn in name.rdns))


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What a verified client certificate says about its holder."""

    subject: str  # as ``canonical_subject`` spells it
    sans: frozenset[str]  # DNS names lower-cased; URIs, e-mail addresses and IPs as they are

    def has_san(self, name: str) -> bool:
        return name in self.sans or name.lower() in self.sans


def peer_identity(transport: object) -> PeerIdentity | None:
    """The verified client certificate of a TLS connection (None: none, or no TLS)."""
    get = getattr(transport, "get_extra_info", None)
    obj = get("ssl_object") if get is not None else None
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return _identity(der) if der else None


@functools.lru_cache(maxsize=512)
def _identity(der: bytes) -> PeerIdentity:
    cert = x509.load_der_x509_certificate(der)
    sans: set[str] = set()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        general = ext.value
        sans.update(n.lower() for n in general.get_values_for_type(x509.DNSName))
        sans.update(general.get_values_for_type(x509.UniformResourceIdentifier))
        sans.update(general.get_values_for_type(x509.RFC822Name))
        sans.update(str(ip) for ip in general.get_values_for_type(x509.IPAddress))
    return PeerIdentity(_canonical(cert.subject), frozenset(sans))
