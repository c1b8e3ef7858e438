"""Client-side TLS settings for outgoing connections (token endpoints, upstreams).

aiohttp takes ``ssl=True`` for default verification, ``False`` to skip it, or a
context; building a context only when the settings need one keeps the common
case on aiohttp's shared default context.
"""

from __future__ import annotations

import ssl

from proxy.config import TLS


def client_ssl(tls: TLS) -> ssl.SSLContext | bool:
    """The ``ssl=`` value for aiohttp requests made with these settings.

    Build it once per provider or route: loading CA and key files is slow.
    """
    custom_ca = tls.ca_file is not None
    mtls = tls.client_cert_file is not None
    if not custom_ca and not mtls:
        return not tls.insecure_skip_verify
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file is not None else None)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert_file is not None and tls.client_key_file is not None:
        ctx.load_cert_chain(str(tls.client_cert_file), str(tls.client_key_file))
    return ctx


def server_hostname(tls: TLS) -> str | None:
    """The name to send in SNI and check the certificate against (aiohttp ``server_hostname=``)."""
    return tls.server_name
