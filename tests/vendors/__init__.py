"""Vendor emulators: real aiohttp apps behaving as each vendor's auth doc says.

Usage::

    from tests.vendors import Simacan, serve

    async with serve(Simacan(clock=clock)) as vendor:   # free 127.0.0.1 port
        provider = vendor.provider()                      # preset pointed at the emulator
        ...                                               # vendor.url is the base URL

Vendors (tests/vendors/emulators.py):

- ``Simacan``: POST /api/v1/auth/password (form of exactly username, password) and
  /api/v1/auth/refresh (exactly refresh_token; rotates, the old one then gets 401);
  JWT access tokens, ``expires_in`` as the string "3600". ``refuse_refresh = True``.
- ``Simplifi``: POST /oauth/token, client credentials by HTTP Basic only; answer with
  ``__type``, refresh_token, scope "read".
- ``SimpleDocs``: POST /api/oauth/token, credentials in the body, scope "read write",
  7200 s, ``created_at``; problem bodies (``type``) for errors and ``token_expired``;
  GET needs scope read, other methods write (else 403 insufficient_scope).
- ``Sipsim``: POST /oauth/token, credentials in the body, space-separated scopes, RFC 6749
  error bodies; /api/v2/<resource> needs <resource>.read (GET) or .write.
- ``PasswordIdP``: a plain RFC 6749 password + refresh_token IdP at /oauth/token (client
  by Basic); refused refresh → 400 invalid_grant (``refuse_refresh = True``).

Every vendor (tests/vendors/base.py, ``Vendor``):

- ``/api/{anything}`` (any method) is the protected API: checks ``Authorization: Bearer``,
  answers the vendor's 401 / 403, else 200 JSON {vendor, method, path, query, body,
  token_serial} (``token_serial`` is the 1-based index in ``issued``).
- knobs: ``clock`` (the emulator's time), ``lifetime``, ``expires_in`` ("number",
  "string", "missing"), ``jwt_tokens``, ``server_time_offset`` (server clock skew; the
  Date header follows it), ``hold`` (an asyncio.Event token endpoints wait for),
  ``fail_next(status, body, times=, content_type=, headers=, endpoint=)``, ``revoke_all()``.
- records: ``calls`` (Counter by endpoint name: "token", "password", "refresh", "api"),
  ``requests`` (``Recorded``: endpoint, form pairs, headers), ``issued`` (``Issued``:
  value, expires_at, scope, serial), ``secret_values()`` (for leak checks).
- ``provider(name=None, **overrides)``: a validated ``proxy.config.Provider``.

Helpers (tests/vendors/fixtures.py): ``FakeClock`` (``advance()``), ``RecordedSleep``
(injectable sleep that records and advances the clock), ``Events`` (an on_event sink),
``leaks(text, secrets)``.
"""

from tests.vendors.base import Issued, Recorded, Vendor, serve
from tests.vendors.emulators import PasswordIdP, Simacan, SimpleDocs, Simplifi, Sipsim
from tests.vendors.fixtures import Events, FakeClock, RecordedSleep, leaks

__all__ = [
    "Events",
    "FakeClock",
    "Issued",
    "PasswordIdP",
    "Recorded",
    "RecordedSleep",
    "Simacan",
    "SimpleDocs",
    "Simplifi",
    "Sipsim",
    "Vendor",
    "leaks",
    "serve",
]
