"""Client-side TLS settings for outgoing connections (token endpoints, upstreams).

aiohttp takes ``ssl=True`` for default verification, ``False`` to skip it, or a
context; building a context only when the settings need one keeps the common
case on aiohttp's shared default context. Config validation loads the same files
through ``load_ca``/``load_pair``, so a file that cannot be used is refused with its
key path before anything starts, not at start-up or on reload.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NoReturn, Protocol


class TLS(Protocol):
    """The client-side TLS settings read here (``proxy.config.TLS`` is one); a protocol, so
    this module sits below the config models instead of importing them."""

    @property
    def ca_file(self) -> Path | None: ...
    @property
    def client_cert_file(self) -> Path | None: ...
    @property
    def client_key_file(self) -> Path | None: ...
    @property
    def server_name(self) -> str | None: ...
    @property
    def insecure_skip_verify(self) -> bool: ...


class TLSFileError(ValueError):
    """A CA, certificate or key file that exists but cannot be used; ``key`` is the
    setting to blame (``ca_file``, ``client_cert_file`` or ``client_key_file``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def client_ssl(tls: TLS) -> ssl.SSLContext | bool:
    """The ``ssl=`` value for aiohttp requests made with these settings.

    Build it once per provider or route: loading CA and key files is slow.
    """
    custom_ca = tls.ca_file is not None
    mtls = tls.client_cert_file is not None
    if not custom_ca and not mtls:
        return not tls.insecure_skip_verify
    ctx = ssl.create_default_context()
    if tls.ca_file is not None:
        load_ca(ctx, tls.ca_file)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert_file is not None and tls.client_key_file is not None:
        load_pair(ctx, tls.client_cert_file, tls.client_key_file)
    return ctx


def load_ca(ctx: ssl.SSLContext, path: Path, *, key: str = "ca_file") -> None:
    """Trust the PEM certificates in ``path``; a file without any is an error."""
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError(key, f"cannot load {path} as PEM CA certificates: {_why(exc)}") from None


def load_pair(
    ctx: ssl.SSLContext,
    cert: Path,
    key: Path,
    *,
    keys: tuple[str, str] = ("client_cert_file", "client_key_file"),
) -> None:
    """Present this certificate and key; an encrypted key is refused, never prompted for.
    ``keys`` name the settings to blame: the certificate's, the key's."""
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except _Encrypted:
        raise TLSFileError(keys[1], f"{key} is an encrypted key; give an unencrypted one") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError(
            keys[0],
            f"cannot load {cert} with key {key} as a PEM certificate and key: {_why(exc)}",
        ) from None


def check_files(tls: TLS) -> None:
    """Load the files as ``client_ssl`` would, on a scratch context, to fail early."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is not None:
        load_ca(ctx, tls.ca_file)
    if tls.client_cert_file is not None and tls.client_key_file is not None:
        load_pair(ctx, tls.client_cert_file, tls.client_key_file)


class _Encrypted(Exception):
    pass


def _no_password() -> NoReturn:
    """OpenSSL would otherwise prompt on the terminal, blocking a server's start."""
    raise _Encrypted


def _why(exc: ssl.SSLError | OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if not exc.reason:
            return "not PEM, or empty"  # all OpenSSL says here is "PEM lib"
        return str(exc.reason).replace("_", " ").lower()
    return exc.strerror or str(exc)


def server_hostname(tls: TLS) -> str | None:
    """The name to send in SNI and check the certificate against (aiohttp ``server_hostname=``)."""
    return tls.server_name
