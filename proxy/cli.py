"""Command line: run the proxy, check a config, try a provider's credentials."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from proxy import __version__
from proxy.access import key_digest
from proxy.app import (
    RUNTIME,
    RegistryFactory,
    create_admin_app,
    create_app,
    make_token_session,
    reload_and_report,
    reload_on_file_change,
    start_runner,
)
from proxy.config import Config, Listen, Loaded, load_config
from proxy.filewatch import watch as watch_files
from proxy.guard import GuardedSite
from proxy.listener_tls import check_listener_tls, describe_expiry
from proxy.observability import Observer, configure_logging
from proxy.problems import ConfigError, ConfigInvalid, TokenError
from proxy.startonly import check_exposure
from proxy.tls import TLSFileError
from proxy.tokens.registry import TokenRegistry
from proxy.tokens.source import system_clock

EXIT_CONFIG = 2
log = structlog.get_logger("tokenrelay")
_background: set[asyncio.Task[Any]] = set()


def config_failed(err: ConfigError, who: str = "tokenrelay") -> int:
    """A config error ends the command the same way wherever it is found: said, exit 2."""
    print(f"{who}: config error: {err}", file=sys.stderr)
    return EXIT_CONFIG


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
        loaded = _load_for_run(_config_path(args.config), args.host, args.port)
    except ConfigError as err:
        return config_failed(err)
    _install_uvloop()
    if args.workers > 1:
        from proxy.workers import supervise

        path = _config_path(args.config)
        cli_listen = (args.host, args.port)
        return asyncio.run(supervise(loaded, args.workers, args.log_format, path, cli_listen))
    return asyncio.run(
        serve(loaded, args.log_format, _config_path(args.config), args.host, args.port)
    )


def _load_for_run(path: str, host: str | None, port: int | None) -> Loaded:
    """The one check of ``check``, start-up and reload: what passes here can start."""
    loaded = load_config(path)
    cfg = loaded.config
    try:
        listen = Listen(
            host=host or cfg.listen.host,
            port=cfg.listen.port if port is None else port,
            tls=cfg.listen.tls,
        )
    except ValidationError as exc:  # --host/--port: the config file is not to blame
        err = exc.errors()[0]
        key = "listen." + ".".join(str(p) for p in err["loc"])
        problem = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError("command line", key, problem) from None
    loaded.config = cfg.model_copy(update={"listen": listen})
    try:
        check_exposure(loaded)
    except ConfigError as err:
        if host is None or host == cfg.listen.host:
            raise
        raise ConfigError("command line --host", err.path, err.problem) from None
    return loaded


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _check(path: str) -> int:
    try:
        loaded = _load_for_run(path, None, None)
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
        return await asyncio.to_thread(_load_for_run, config_path, host, port)

    how = Serving(announce=functools.partial(_announce, loaded), reloader=reloader)
    return await serve_app(loaded, log_format, how, ready)


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` in the background, held here so the task is not collected mid-way."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def reload_in_background(app: web.Application) -> None:
    """SIGHUP: a signal handler cannot await, so the reload runs as its own task."""
    spawn(_sighup(app))


ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


@dataclass(frozen=True)
class Serving:
    """What a ``--workers`` worker does differently from the single process, so both run
    one start-up and shutdown sequence; the defaults are the single process's."""

    announce: Callable[[int, int | None], None]
    """Logs "listening", given the main and the admin port actually bound."""
    reloader: Callable[[], Awaitable[Loaded]]
    """Reads the config anew, for SIGHUP and the admin /-/reload."""
    on_hangup: Callable[[web.Application], None] = reload_in_background
    reuse_port: bool = False
    registry_factory: RegistryFactory | None = None
    on_response: ResponseHook | None = None
    """Added to every app served (main and admin), before start-up freezes the signals."""
    until: Callable[[], Awaitable[None]] | None = None
    """Stops serving when it returns, as SIGTERM would: a worker's parent gone."""
    fields: Mapping[str, object] = field(default_factory=dict)
    """Added to the "shutting down" and "stopped" lines: which worker."""
    watch_files: bool = True
    """Reload when a secret or key file changes (a worker's parent does it for all)."""


async def serve_app(
    loaded: Loaded, log_format: str, how: Serving, ready: asyncio.Event | None = None
) -> int:
    """Run until SIGTERM/SIGINT (or ``how.until``); SIGHUP reloads. In-flight requests get
    the grace period; ``ready`` is set once the ports are bound and the signals handled."""
    cfg = loaded.config
    app = _build_app(loaded, log_format, how)
    # before "listening" is said: a SIGHUP sent on that line must reload, not kill us
    runners: list[web.AppRunner] = []
    stop = on_signals(lambda: _hangup(app, runners, how) if app[RUNTIME].generation else None)
    try:
        runners += await _start_runners(app, loaded, how)
    except ConfigError as err:  # as a config error before the start: exit 2, no traceback
        return config_failed(err)
    watch = asyncio.ensure_future(how.until()) if how.until is not None else None
    if watch is not None:
        watch.add_done_callback(lambda _: stop.set())
    rt = app[RUNTIME]
    files = None
    if how.watch_files:
        changed = functools.partial(reload_on_file_change, rt)
        files = asyncio.ensure_future(watch_files(lambda: rt.loaded.secret_files, changed))
    if ready is not None:
        ready.set()
    await stop.wait()
    for task in (watch, files):
        if task is not None:
            task.cancel()
    log.info("shutting down", **how.fields, grace_seconds=cfg.shutdown_grace)
    app[RUNTIME].draining = True
    for runner in reversed(runners):
        await runner.cleanup()
    log.info("stopped", **how.fields)
    return 0


def _hangup(app: web.Application, runners: list[web.AppRunner], how: Serving) -> None:
    """SIGHUP: the config, and the listeners' certificates (a bad new pair keeps the old)."""
    how.on_hangup(app)
    for runner in runners:
        for site in runner.sites:
            if isinstance(site, GuardedSite) and site.tls is not None:
                site.tls.reload()


def _build_app(loaded: Loaded, log_format: str, how: Serving) -> web.Application:
    app = create_app(
        loaded,
        Observer(log_format),
        admin_on_main=loaded.config.admin is None,
        registry_factory=how.registry_factory,
    )
    app[RUNTIME].reloader = how.reloader
    if how.on_response is not None:
        app.on_response_prepare.append(how.on_response)
    return app


async def _start_runners(app: web.Application, loaded: Loaded, how: Serving) -> list[web.AppRunner]:
    """Main listener first, then the admin one: shutdown cleans them up in reverse. A port
    that cannot be had is a ConfigError naming the listener's key, with nothing left open."""
    cfg = loaded.config
    observer = app[RUNTIME].observer
    runner, port = await _listen(app, loaded, "listen", cfg.listen, how, observer)
    runners, admin_port = [runner], None
    if cfg.admin is not None:
        admin_app = create_admin_app(app)
        if how.on_response is not None:
            admin_app.on_response_prepare.append(how.on_response)
        try:
            admin, admin_port = await _listen(admin_app, loaded, "admin", cfg.admin, how, observer)
        except ConfigError:
            await runner.cleanup()
            raise
        runners.append(admin)
    how.announce(port, admin_port)
    return runners


async def _listen(
    app: web.Application,
    loaded: Loaded,
    key: str,
    listen: Listen,
    how: Serving,
    observer: Observer,
) -> tuple[web.AppRunner, int]:
    try:
        return await start_runner(
            app, loaded.config, listen, reuse_port=how.reuse_port, name=key, observer=observer
        )
    except TLSFileError as exc:  # replaced since the config was checked
        raise ConfigError(loaded.path, f"{key}.tls.{exc.key}", str(exc)) from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        problem = f"cannot listen on {listen.host}:{listen.port}: {why}"
        raise ConfigError(loaded.path, key, problem) from None


def on_signals(
    on_hangup: Callable[[], None], on_stop: Callable[[], None] | None = None
) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event (``on_stop`` runs first, in the handler itself,
    before any other task sees the signal); SIGHUP calls ``on_hangup``."""
    stop = asyncio.Event()

    def stopping() -> None:
        if on_stop is not None:
            on_stop()
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping)
    loop.add_signal_handler(signal.SIGINT, stopping)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    return stop


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


async def _sighup(app: web.Application) -> None:
    """Logged and counted by ``reload_and_report``; nobody waits for the answer."""
    with contextlib.suppress(ConfigInvalid):
        await reload_and_report(app[RUNTIME])
