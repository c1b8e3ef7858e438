"""Command line: run the proxy, check a config, try a provider's credentials."""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.access import key_digest
from proxy.app import (
    make_token_session,
)
from proxy.config import Config, Listen, Loaded, load_config
from proxy.listener_tls import check_listener_tls, describe_expiry
from proxy.observability import configure_logging
from proxy.problems import ConfigError, TokenError
from proxy.serving import (
    EXIT_CONFIG,
    Serving,
    config_failed,
    install_uvloop,
    load_for_run,
    log,
    serve_app,
)
from proxy.tokens.registry import TokenRegistry
from proxy.tokens.source import system_clock


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("TOKENRELAY_CONFIG") or "routes.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenrelay",
        description="Authenticating reverse proxy: injects vendor Bearer tokens.",
        epilog="subcommands: 'tokenrelay check [--config PATH]', "
        "'tokenrelay token PROVIDER [--config PATH]', "
        "'tokenrelay hash-key' (a client key on stdin → its key_sha256)",
    )
    p.add_argument("--version", action="version", version=f"tokenrelay {__version__}")
    p.add_argument("--config", help="routes.yaml (default: $TOKENRELAY_CONFIG, ./routes.yaml)")
    p.add_argument("--host", help="listen address (overrides listen.host)")
    p.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port and tokens")
    return p


def _sub_parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"tokenrelay {name}")
    p.add_argument("--config", help="routes.yaml (default: $TOKENRELAY_CONFIG, ./routes.yaml)")
    if name == "token":
        p.add_argument("provider", help="provider name from routes.yaml")
    return p


def _hash_key(argv: list[str]) -> int:
    """The ``key_sha256`` for a client key read from stdin (a prompt on a terminal), so the
    key itself never has to be written into routes.yaml or a shell history."""
    argparse.ArgumentParser(
        prog="tokenrelay hash-key",
        description="Reads a client key from stdin; prints the key_sha256 line for clients:.",
    ).parse_args(argv)
    key = getpass.getpass("client key: ") if sys.stdin.isatty() else sys.stdin.read()
    key = key.rstrip("\r\n")  # as key_file does: a file's or echo's final newline is no part
    if not key:
        print("tokenrelay hash-key: no key on stdin", file=sys.stderr)
        return EXIT_CONFIG
    print(f"key_sha256: {key_digest(key).hex()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["hash-key"]:
        return _hash_key(args_list[1:])
    if args_list and args_list[0] in ("check", "token"):
        sub = _sub_parser(args_list[0]).parse_args(args_list[1:])
        if args_list[0] == "check":
            return _check(_config_path(sub.config))
        return _token(_config_path(sub.config), sub.provider)
    args = _parser().parse_args(args_list)
    configure_logging(args.log_format)
    try:
        loaded = load_for_run(_config_path(args.config), args.host, args.port)
    except ConfigError as err:
        return config_failed(err)
    install_uvloop()
    if args.workers > 1:
        from proxy.workers import supervise

        path = _config_path(args.config)
        cli_listen = (args.host, args.port)
        return asyncio.run(supervise(loaded, args.workers, args.log_format, path, cli_listen))
    return asyncio.run(
        serve(loaded, args.log_format, _config_path(args.config), args.host, args.port)
    )


def _check(path: str) -> int:
    try:
        loaded = load_for_run(path, None, None)
    except ConfigError as err:
        return config_failed(err)
    _describe(loaded)
    print("config OK")
    return 0


def _describe(loaded: Loaded) -> None:
    cfg = loaded.config
    for r in cfg.routes:
        waits = loaded.route_waits_for(r)
        state = f"waits for {', '.join(waits)}" if waits else "active"
        provider = f" provider={r.provider}" if r.provider else ""
        print(f"route {r.prefix} -> {r.upstream}{provider} [{state}]")
    for key, listen in (("listen", cfg.listen), ("admin", cfg.admin)):
        if listen is not None and listen.tls is not None:
            expires = describe_expiry(check_listener_tls(listen.tls))
            mtls = ", client certificates required" if listen.mtls else ""
            print(f"{key}.tls: certificate {listen.tls.cert_file} expires {expires}{mtls}")


def _token(path: str, provider: str) -> int:
    try:
        loaded = load_config(path)
    except ConfigError as err:
        return config_failed(err)
    if provider in loaded.inactive_providers:
        missing = ", ".join(loaded.inactive_providers[provider])
        print(f"tokenrelay: provider {provider} waits for {missing}", file=sys.stderr)
        return EXIT_CONFIG
    if provider not in loaded.config.providers:
        print(f"tokenrelay: no provider {provider!r} in {path}", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(_probe_token(loaded.config, provider))


async def _probe_token(config: Config, provider: str) -> int:
    async with make_token_session(config) as session:
        registry = TokenRegistry(config.providers, session, clock=system_clock)
        try:
            token = await registry.sources[provider].token()
        except TokenError as err:
            code = f" ({err.code})" if err.code else ""
            print(f"tokenrelay: {provider}: {err.detail}{code}", file=sys.stderr)
            if err.vendor_detail:  # scrubbed of every secret form; the operator's to read
                print(f"tokenrelay: {provider}: the IdP said: {err.vendor_detail}", file=sys.stderr)
            return 1
    left = token.expires_at - system_clock()
    p = config.providers[provider]
    print(f"provider:   {provider}")
    print(f"grant:      {p.grant}")
    if p.grant != "static":
        print(f"client_auth: {p.client_auth}" + (f" (issuer {p.issuer})" if p.issuer else ""))
    print(f"token_type: {token.token_type}")
    print(f"scope:      {token.scope or '-'}")
    print(f"expires_in: {left:.0f} s")
    print(f"token:      *** (redacted, {len(token.value)} chars)")
    return 0


async def serve(
    loaded: Loaded,
    log_format: str,
    config_path: str,
    host: str | None,
    port: int | None,
    ready: asyncio.Event | None = None,
) -> int:
    """The single process: the shared sequence, reading the config file itself on reload."""

    async def reloader() -> Loaded:
        return await asyncio.to_thread(load_for_run, config_path, host, port)

    how = Serving(announce=functools.partial(_announce, loaded), reloader=reloader)
    return await serve_app(loaded, log_format, how, ready)


def _announce(loaded: Loaded, port: int, admin_port: int | None) -> None:
    cfg = loaded.config
    active = [r.prefix for r in cfg.routes if not loaded.route_waits_for(r)]
    waiting = {r.prefix: loaded.route_waits_for(r) for r in cfg.routes if loaded.route_waits_for(r)}
    log.info(
        "listening",
        address=f"{_scheme(cfg.listen)}://{cfg.listen.host}:{port}",
        admin=f"{_scheme(cfg.admin)}://{cfg.admin.host}:{admin_port}"
        if cfg.admin
        else "same listener",
        active_routes=active,
        waiting_routes=waiting,
        config=loaded.path,
        pid=os.getpid(),
        version=__version__,
    )


def _scheme(listen: Listen) -> str:
    return "https" if listen.tls is not None else "http"
