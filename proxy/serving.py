"""The serving sequence shared by the single process and each ``--workers`` worker:
loading a config to run, binding the listeners, signals, reload, drain.

``proxy.cli`` (the commands) and ``proxy.workers`` (the process group) both build on it;
neither imports the other's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from proxy.app import (
    RUNTIME,
    RegistryFactory,
    create_admin_app,
    create_app,
    reload_and_report,
    reload_on_file_change,
    start_runner,
)
from proxy.config import Listen, Loaded, load_config
from proxy.filewatch import watch as watch_files
from proxy.guard import GuardedSite
from proxy.observability import Observer
from proxy.problems import ConfigError, ConfigInvalid
from proxy.startonly import check_exposure
from proxy.tls import TLSFileError

EXIT_CONFIG = 2


log = structlog.get_logger("tokenrelay")


_background: set[asyncio.Task[Any]] = set()


def config_failed(err: ConfigError, who: str = "tokenrelay") -> int:
    """A config error ends the command the same way wherever it is found: said, exit 2."""
    print(f"{who}: config error: {err}", file=sys.stderr)
    return EXIT_CONFIG


def load_for_run(path: str, host: str | None, port: int | None) -> Loaded:
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


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


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


async def _sighup(app: web.Application) -> None:
    """Logged and counted by ``reload_and_report``; nobody waits for the answer."""
    with contextlib.suppress(ConfigInvalid):
        await reload_and_report(app[RUNTIME])
