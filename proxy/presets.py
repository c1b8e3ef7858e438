"""The four vendors' fixed facts, from their auth docs, and nothing else vendor-specific.

A preset fills keys the user left out; every key set explicitly wins, so a
preset can be pointed at another host (a sandbox, an emulator).
"""

from __future__ import annotations

from typing import Any

from proxy.problems import ConfigError

_SIMACAN_AUTH = {
    "production": "https://auth-service.services.simacan.com/api/v1",
    "staging": "https://auth-service-stg.services.simacan.com/api/v1",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Simacan: form POST of exactly username+password, refresh with exactly
    # refresh_token; each refresh rotates the refresh token.
    "simacan": {"grant": "simacan"},
    # Simplifi: client credentials, id/secret by HTTP Basic as its own example sends them
    # (requests' auth=(id, secret): not form-encoded first), 1 h tokens.
    "simplifi": {
        "grant": "client_credentials",
        "client_auth": "basic_raw",
        "token_url": "https://dev.simplifi.work/oauth/token",
        "default_lifetime": 3600,
    },
    # SimpleDocs: client credentials in the body, "read write" must be asked for.
    "simpledocs": {
        "grant": "client_credentials",
        "client_auth": "body",
        "token_url": "https://app.simpledocs.com/api/oauth/token",
        "scope": "read write",
        "default_lifetime": 7200,
    },
    # SIPSIM: client credentials in the body, space-separated scopes.
    "sipsim": {
        "grant": "client_credentials",
        "client_auth": "body",
        "token_url": "https://app.sipsim.com/oauth/token",
        "default_lifetime": 7200,
    },
}


def apply_preset(data: dict[str, Any], file: str, loc: tuple[str | int, ...]) -> dict[str, Any]:
    """Merge the named preset under ``data``."""
    name = data.get("preset")
    if name is None:
        return data
    if name not in PRESETS:
        where = ".".join(str(p) for p in (*loc, "preset"))
        raise ConfigError(file, where, f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    merged = dict(PRESETS[name])
    if name == "simacan":
        env = data.get("environment", "production")
        base = _SIMACAN_AUTH.get(env, _SIMACAN_AUTH["production"])
        if "auth_base" in data:
            base = str(data["auth_base"]).rstrip("/")
        merged["token_url"] = f"{base}/auth/password"
        merged["refresh_url"] = f"{base}/auth/refresh"
    merged.update({k: v for k, v in data.items() if k != "auth_base"})
    return merged
