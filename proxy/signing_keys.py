"""Private keys that sign client assertions: loaded, and refused, when the config is read.

An encrypted key, a key of another type, a short RSA key or an algorithm the key cannot sign
with is refused here with the reason (never the key's content), so a key that cannot sign
never reaches a token request. ``proxy.tokens.assertions`` signs with what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

RSA_ALGS = frozenset({"RS256", "PS256"})
EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384"}  # the curve fixes the algorithm


class KeyFileError(ValueError):
    """A private key file that cannot sign; the message says why, never what it holds."""


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and the algorithm it signs with."""

    key: RSAPrivateKey | EllipticCurvePrivateKey
    alg: str
    key_id: str | None


def load_signing_key(path: Path, alg: str | None, key_id: str | None) -> SigningKey:
    """Read a PEM RSA or EC private key; an encrypted key, another key type or an
    algorithm the key cannot sign with is a ``KeyFileError``."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(
            f"{path} is encrypted; give an unencrypted PEM key (mount it as a secret file)"
        ) from None
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise KeyFileError(f"{path}: an RSA key of {key.key_size} bits; 2048 at least")
        chosen = alg or "RS256"
        if chosen not in RSA_ALGS:
            raise KeyFileError(f"signing_alg {chosen} does not sign with an RSA key (RS256, PS256)")
        return SigningKey(key, chosen, key_id)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        fits = EC_ALGS.get(key.curve.name)
        if fits is None:
            raise KeyFileError(f"{path}: curve {key.curve.name}; P-256 or P-384 are supported")
        if alg is not None and alg != fits:
            raise KeyFileError(f"signing_alg {alg} does not sign with a {key.curve.name} key")
        return SigningKey(key, fits, key_id)
    raise KeyFileError(f"{path}: an RSA or EC (P-256, P-384) private key is needed")
