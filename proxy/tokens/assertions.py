"""Signed client assertions: OIDC Core §9 ``private_key_jwt`` and ``client_secret_jwt``.

A client assertion (RFC 7523 §2.2) is a short-lived JWT that the client signs to prove who it
is: ``iss`` = ``sub`` = the client id, ``aud`` = the token endpoint, a fresh ``jti`` every
time (IdPs refuse a ``jti`` they have seen), ``iat`` and ``exp`` a minute apart. PyJWT signs
it; nothing here touches JWS itself. Keys come from ``proxy.signing_keys``.
"""

from __future__ import annotations

import secrets
from typing import Any

from proxy.signing_keys import SigningKey

ASSERTION_METHODS = frozenset({"private_key_jwt", "client_secret_jwt"})
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LIFETIME = 60.0  # seconds: long enough for clock skew, short enough to be useless if leaked


def client_assertion(
    client_id: str, audience: str, now: float, *, key: SigningKey | None, secret: str | None
) -> str:
    """A fresh assertion: signed by ``key`` (private_key_jwt) or, without one, by HS256 under
    ``secret`` (client_secret_jwt)."""
    import jwt  # imported on first use, as in grants: most providers never need it

    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": int(now),
        "exp": int(now + LIFETIME),
        "jti": secrets.token_urlsafe(24),
    }
    if key is not None:
        headers = {"kid": key.key_id} if key.key_id else None
        return jwt.encode(claims, key.key, algorithm=key.alg, headers=headers)
    assert secret is not None  # config validation: client_secret_jwt needs client_secret
    return jwt.encode(claims, secret, algorithm="HS256")
