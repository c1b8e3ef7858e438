"""What a reload cannot apply, and the rule that a running listener must stay protected.

The listeners, the spool directory, the token session's ``trust_env``, the drain time and
the parser and connection limits are set up once, when the process starts. A reload keeps
their running values, names each changed key ("restart needed for listen.port") and
applies the rest, so what runs is always exactly what the running config says.
"""

from __future__ import annotations

from typing import Any

from proxy.config import Config, Loaded
from proxy.problems import ConfigError

START_ONLY = ("listen", "admin", "spool_dir", "trust_env", "shutdown_grace", "limits")
RELOADABLE_LIMITS = frozenset({"max_body", "replay_memory", "replay_disk"})  # applied per reload


def restart_needed(running: Config, new: Config) -> list[str]:
    """Key paths of start-only settings whose value ``new`` changes."""
    changed: list[str] = []
    for key in START_ONLY:
        old_v, new_v = _plain(getattr(running, key)), _plain(getattr(new, key))
        changed += _differences(key, old_v, new_v)
    return [k for k in changed if k.removeprefix("limits.") not in RELOADABLE_LIMITS]


def keep_running(running: Config, new: Config) -> Config:
    """``new`` with the start-only values that the process actually runs with."""
    kept: dict[str, Any] = {key: getattr(running, key) for key in START_ONLY}
    kept["limits"] = running.limits.model_copy(
        update={name: getattr(new.limits, name) for name in RELOADABLE_LIMITS}
    )
    return new.model_copy(update=kept)


def check_exposure(loaded: Loaded) -> None:
    """Like Redis's protected mode: credentials on an open port need an explicit choice."""
    cfg = loaded.config
    with_token = [r.prefix for r in cfg.routes if r.provider is not None]
    if cfg.listen.is_loopback() or not with_token or cfg.clients or cfg.allow_unauthenticated:
        return
    if cfg.listen.mtls:  # only holders of a certificate from client_ca_file get in
        return
    raise ConfigError(
        loaded.path,
        "listen.host",
        f"listening on {cfg.listen.host} would let anyone who reaches it use the vendor "
        f"credentials of {', '.join(with_token)}; configure 'clients' (inbound keys), "
        "listen.tls.client_ca_file (mutual TLS) or set "
        "'allow_unauthenticated: true' if something else (a mesh policy) protects the port",
    )


def _plain(value: object) -> object:
    dump = getattr(value, "model_dump", None)
    return dump() if dump is not None else value


def _differences(path: str, old: object, new: object) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for name in old.keys() | new.keys():
            out += _differences(f"{path}.{name}", old.get(name), new.get(name))
        return sorted(out)
    return [path] if old != new else []
