"""``--workers N``: N processes on one port (SO_REUSEPORT) that share one token per provider.

The parent keeps the only real ``TokenRegistry`` (single flight, refresh ahead, cool-down)
behind a broker on a Unix socket of mode 0600 in a 0700 directory: token values cross nothing
else. Each worker wraps the broker in a ``CachedTokenSource``, so it asks the broker only when
its copy nears expiry, and a 401 seen by any number of workers renews the shared token once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from proxy.app import make_token_session
from proxy.config import Listen, Loaded, Provider
from proxy.filewatch import watch as watch_files
from proxy.observability import Observer, configure_logging
from proxy.problems import ConfigError, TokenError
from proxy.serving import (
    Serving,
    config_failed,
    install_uvloop,
    load_for_run,
    on_signals,
    reload_in_background,
    serve_app,
    spawn,
)
from proxy.startonly import check_exposure, keep_running, restart_needed
from proxy.tokens.cache import CachedTokenSource
from proxy.tokens.grants import EventSink
from proxy.tokens.registry import TokenRegistry
from proxy.tokens.source import Clock, Token, system_clock

log = structlog.get_logger("tokenrelay")
WORKER_HEADER = "X-Tokenrelay-Worker"  # on admin answers: which worker the kernel picked
_TOKEN_FIELDS = ("value", "expires_at", "obtained_at", "token_type", "scope")
_ERROR_FIELDS = ("detail", "code", "status", "retry_after", "credential_failure", "vendor_detail")
_FROM_PARENT: ContextVar[bool] = ContextVar("reload_from_parent", default=False)


# -- the parent: broker and supervisor ---------------------------------------------------------


class Supervisor:
    """Holds the real token registry, serves it on the broker socket, keeps N workers alive."""

    def __init__(
        self,
        loaded: Loaded,
        argv: list[str],
        path: str,
        registry: TokenRegistry,
        cli_listen: tuple[str | None, int | None] = (None, None),
    ) -> None:
        self.loaded, self.argv, self.path, self.registry = loaded, argv, path, registry
        self.cli_listen = cli_listen  # --host/--port as given: the file decides the rest
        self.restart_needed: list[str] = []
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._reload_lock = asyncio.Lock()

    def broker_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token/{name}", self._token)
        app.router.add_post("/reload", self._reload_for)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        """``stale``: the value a worker saw rejected; only the current token is dropped."""
        name, body = request.match_info["name"], await request.json()
        try:
            source = self.registry.sources.get(name)
            if source is None:
                raise TokenError(name, f"provider {name} unknown to the broker: reload the parent")
            if isinstance(body.get("stale"), str):
                source.invalidate(Token(body["stale"], expires_at=0.0, obtained_at=0.0))
            token = await (source.renew() if body.get("renew") else source.token())
        except TokenError as err:
            return web.json_response({"error": {f: getattr(err, f) for f in _ERROR_FIELDS}})
        return web.json_response({"token": {f: getattr(token, f) for f in _TOKEN_FIELDS}})

    async def _reload_for(self, request: web.Request) -> web.Response:
        """A worker's admin /-/reload: everyone but that worker (it reloads itself) follows."""
        refused = await self.reload(exclude=int((await request.json())["pid"]))
        problem = None if refused is None else [refused.file, refused.path, refused.problem]
        return web.json_response({"problem": problem, "restart_needed": self.restart_needed})

    async def reload(self, exclude: int | None = None) -> ConfigError | None:
        """Rebuild the registry (unchanged providers keep their tokens), then SIGHUP workers."""
        async with self._reload_lock:
            try:
                loaded = await asyncio.to_thread(load_for_run, self.path, *self.cli_listen)
                running = self.loaded.config
                self.restart_needed = restart_needed(running, loaded.config)
                loaded.config = keep_running(running, loaded.config)
                check_exposure(loaded)
            except ConfigError as err:
                log.error("reload failed, config unchanged", file=err.file, key_path=err.path)
                return err
            for key in self.restart_needed:
                log.warning(f"restart needed for {key}", key_path=key, config=self.path)
            self.loaded, self.registry = loaded, self.registry.rebuild(loaded.config.providers)
            for proc in self.procs.values():
                if proc.returncode is None and proc.pid != exclude:
                    proc.send_signal(signal.SIGHUP)
            log.info("reloaded", providers=sorted(loaded.config.providers), workers=len(self.procs))
            return None

    async def files_changed(self, changed: list[str]) -> None:
        """A provider's secret or key file rotated: reload everyone, as SIGHUP does."""
        for key in changed:
            log.warning("secret file changed, reloading", key_path=key, config=self.path)
        await self.reload()

    async def keep_running(self, index: int) -> None:
        """Restart a worker that dies; quickly repeated deaths back off up to 30 s."""
        loop, crashes = asyncio.get_running_loop(), 0
        while not self.stopping:
            started = loop.time()
            argv = [*self.argv, "--index", str(index)]
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                start_new_session=True,  # no tty ^C: we forward
            )
            self.procs[index] = proc
            code = await proc.wait()
            if self.stopping:
                return
            crashes = 0 if loop.time() - started > 60 else crashes + 1
            delay = min(2.0**crashes - 1, 30.0)
            log.error("worker died", worker=index, pid=proc.pid, exit_code=code, restart_in=delay)
            await asyncio.sleep(delay)

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker; each drains within ``grace``, stragglers are killed after."""
        self.stopping = True
        live = [p for p in self.procs.values() if p.returncode is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        if not live:
            return
        waits = [asyncio.ensure_future(p.wait()) for p in live]
        _, late = await asyncio.wait(waits, timeout=grace + 5)
        for proc in live:
            if proc.returncode is None:
                proc.kill()
        if late:
            await asyncio.wait(late)


def _reserve(listen: Listen) -> socket.socket:
    """Bind (never listen on) the port, so port 0 becomes one port all workers share."""
    family, kind, _, _, addr = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


async def supervise(
    loaded: Loaded,
    workers: int,
    log_format: str,
    config_path: str,
    cli_listen: tuple[str | None, int | None] = (None, None),
) -> int:
    """The parent of ``--workers N``: runs until SIGTERM/SIGINT; SIGHUP reloads everyone."""
    cfg = loaded.config
    reserved = [_reserve(cfg.listen)] + ([_reserve(cfg.admin)] if cfg.admin else [])
    home = broker_home()
    sock_path = home / "broker.sock"
    ports = [str(s.getsockname()[1]) for s in reserved]
    argv = [sys.executable, "-m", "proxy.workers", "--config", config_path, "--log-format"]
    argv += [log_format, "--host", cfg.listen.host, "--port", ports[0], "--broker", str(sock_path)]
    argv += ["--admin-port", ports[1]] if cfg.admin else []
    token_session = make_token_session(cfg)
    observer = Observer(log_format)
    registry = TokenRegistry(cfg.providers, token_session, on_event=observer.token_event)
    sup = Supervisor(loaded, argv, config_path, registry, cli_listen)
    runner = web.AppRunner(sup.broker_app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(sock_path)).start()
        sock_path.chmod(0o600)
        tasks = [asyncio.ensure_future(sup.keep_running(i)) for i in range(workers)]
        admin = {"admin_port": int(ports[1])} if cfg.admin else {}
        log.info(
            "started workers", workers=workers, port=int(ports[0]), broker=str(sock_path), **admin
        )
        files = asyncio.ensure_future(
            watch_files(lambda: sup.loaded.secret_files, sup.files_changed)
        )
        await _until_stopped(sup)
        files.cancel()
        log.info("shutting down", grace_seconds=cfg.shutdown_grace, workers=workers)
        await sup.stop(sup.loaded.config.shutdown_grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await runner.cleanup()
        await sup.registry.aclose()
        await token_session.close()
        for s in reserved:
            s.close()
        shutil.rmtree(home, ignore_errors=True)
    log.info("stopped")
    return 0


BROKER_PREFIX = "tokenrelay-broker-"
_BROKER_DIR = re.compile(re.escape(BROKER_PREFIX) + r"(\d+)-")


def broker_home(root: Path | None = None) -> Path:
    """A new 0700 directory for the broker socket, named after this process, once the
    leftovers of parents that died without cleaning up (SIGKILL) are gone."""
    base = root if root is not None else Path(tempfile.gettempdir())
    for stale in remove_stale_brokers(base):
        log.info("removed stale broker directory", path=str(stale))
    return Path(tempfile.mkdtemp(prefix=f"{BROKER_PREFIX}{os.getpid()}-", dir=base))


def remove_stale_brokers(root: Path) -> list[Path]:
    """Remove broker directories under ``root`` that are ours (this uid, a real directory)
    and whose parent's pid is gone; a live parent's, another user's and any other name
    are left alone."""
    removed = []
    for path in root.glob(BROKER_PREFIX + "*"):
        named = _BROKER_DIR.match(path.name)
        try:
            info = path.lstat()
        except OSError:
            continue
        if named is None or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if _alive(int(named[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


async def _until_stopped(sup: Supervisor) -> None:
    def stopping() -> None:
        sup.stopping = True  # before any worker's exit is seen, so none is restarted

    await on_signals(lambda: spawn(sup.reload()), on_stop=stopping).wait()


# -- the worker: a registry of brokered sources -------------------------------------------------


class BrokerClient:
    """The worker's end of the broker socket."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._session: aiohttp.ClientSession | None = None

    async def call(self, route: str, body: Mapping[str, Any], provider: str = "") -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(self._path))
        try:
            async with self._session.post(
                f"http://broker{route}", json=body, allow_redirects=False
            ) as resp:
                resp.raise_for_status()
                return await resp.json()
        except (aiohttp.ClientError, ValueError):
            raise TokenError(provider, "the token broker is unreachable", status=503) from None

    async def token(self, provider: str, stale: str | None, renew: bool = False) -> Token:
        answer = await self.call(f"/token/{provider}", {"stale": stale, "renew": renew}, provider)
        if "error" in answer:
            err = answer["error"]
            raise TokenError(provider, err.pop("detail"), **err)
        return Token(**answer["token"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _BrokerGrant:
    """A ``Grant`` that asks the broker, telling it which token this worker saw rejected."""

    def __init__(self, name: str, client: BrokerClient, clock: Clock) -> None:
        self.name, self.client, self.clock = name, client, clock
        self.stale: str | None = None

    async def fetch(self, current: Token | None) -> tuple[Token, str]:
        stale, self.stale = self.stale, None
        token = await self.client.token(self.name, stale)
        if current is not None and token.value == current.value:
            # The broker is still refreshing ahead: counted from now, the refresh-ahead point
            # comes at half of what is left, so re-asking backs off instead of going per request.
            token = dataclasses.replace(token, obtained_at=self.clock())
        return token, "broker"


class BrokeredTokenSource(CachedTokenSource):
    """A worker's copy of the broker's token: local single flight and refresh ahead; no local
    cool-down or retries, since the broker already applies them."""

    def __init__(
        self,
        name: str,
        client: BrokerClient,
        provider: Provider,
        clock: Clock,
        on_event: EventSink | None = None,
    ) -> None:
        self._broker = _BrokerGrant(name, client, clock)
        retry = provider.retry.model_copy(update={"attempts": 1})
        super().__init__(
            name,
            self._broker,
            clock=clock,
            refresh_ahead=provider.refresh_ahead,
            retry=retry,
            cooldown=0.0,
            on_event=on_event,
        )

    def invalidate(self, stale: Token) -> None:
        super().invalidate(stale)
        self._broker.stale = stale.value

    async def renew(self, *, login: bool = False) -> Token:
        """The parent renews (a credentials test is a forced renewal there), then us."""
        await self._broker.client.token(self.name, None, renew=True)
        return await super().renew()


class BrokeredRegistry(TokenRegistry):
    """A ``TokenRegistry`` whose sources are brokered; ``rebuild`` keeps it that way."""

    def __init__(
        self,
        client: BrokerClient,
        providers: Mapping[str, Provider],
        session: aiohttp.ClientSession,
        *,
        clock: Clock = system_clock,
        on_event: EventSink | None = None,  # the parent logs the real token events
        _keep: Mapping[str, tuple[str, CachedTokenSource]] | None = None,
    ) -> None:
        self._client = client
        super().__init__(providers, session, clock=clock, on_event=on_event, _keep=_keep)

    def rebuild(self, new_providers: Mapping[str, Provider]) -> TokenRegistry:
        keep = {name: (self._fingerprints[name], s) for name, s in self.sources.items()}
        return BrokeredRegistry(
            self._client,
            new_providers,
            self._session,
            clock=self._clock,
            on_event=self._on_event,
            _keep=keep,
        )

    def _build(self, name: str, provider: Provider) -> CachedTokenSource:
        return BrokeredTokenSource(name, self._client, provider, self._clock, self._on_event)

    async def aclose(self) -> None:
        await super().aclose()
        await self._client.close()


# -- the worker process -------------------------------------------------------------------------


def _worker_load(args: argparse.Namespace) -> Loaded:
    loaded = load_for_run(args.config, args.host, args.port)
    admin = loaded.config.admin
    if admin is not None and args.admin_port is not None:
        listen = Listen(host=admin.host, port=args.admin_port, tls=admin.tls)
        loaded.config = loaded.config.model_copy(update={"admin": listen})
    return loaded


async def _worker(args: argparse.Namespace, loaded: Loaded) -> int:
    """The single process's sequence, with tokens from the broker and reloads via the parent."""
    client = BrokerClient(args.broker)
    how = Serving(
        announce=_announcer(args.index, loaded.config.listen),
        reloader=lambda: _reload_via_parent(args, client),
        on_hangup=_reload_from_parent,
        reuse_port=True,
        registry_factory=lambda providers, session: BrokeredRegistry(client, providers, session),
        on_response=_tag(str(args.index)),
        until=_parent_gone,
        fields={"worker": args.index},
        watch_files=False,  # the parent watches, reloads, and signals us
    )
    return await serve_app(loaded, args.log_format, how)


def _announcer(index: int, listen: Listen) -> Callable[[int, int | None], None]:
    """N workers announce at once: each says who it is, not the routes all of them share."""
    origin = f"{'https' if listen.tls else 'http'}://{listen.host}"

    def announce(port: int, _admin_port: int | None) -> None:
        log.info("listening", worker=index, pid=os.getpid(), address=f"{origin}:{port}")

    return announce


def _reload_from_parent(app: web.Application) -> None:
    token = _FROM_PARENT.set(True)
    reload_in_background(app)  # the task keeps the context it was created in
    _FROM_PARENT.reset(token)


async def _reload_via_parent(args: argparse.Namespace, client: BrokerClient) -> Loaded:
    """Admin /-/reload reaches one worker: the parent reloads the broker and the others."""
    if _FROM_PARENT.get():
        return await asyncio.to_thread(_worker_load, args)
    answer = await client.call("/reload", {"pid": os.getpid()})
    if answer["problem"] is not None:  # the parent's refusal, file and key path kept apart
        file, path, problem = answer["problem"]
        raise ConfigError(file, path, problem)
    loaded = await asyncio.to_thread(_worker_load, args)
    loaded.restart_needed = answer["restart_needed"]  # listen keys: pinned by our arguments
    return loaded


def _tag(index: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def tag(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/-/"):
            response.headers[WORKER_HEADER] = index

    return tag


async def _parent_gone() -> None:
    """Our stdin is a pipe the parent holds: EOF means it died, and we must not linger."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tokenrelay worker")
    for flag in ("--config", "--host", "--broker", "--log-format"):
        p.add_argument(flag, required=True)
    for flag in ("--port", "--index"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--admin-port", type=int)
    args = p.parse_args(argv)
    configure_logging(args.log_format)
    try:
        loaded = _worker_load(args)
    except ConfigError as err:
        return config_failed(err, "tokenrelay worker")
    install_uvloop()
    return asyncio.run(_worker(args, loaded))


if __name__ == "__main__":
    raise SystemExit(worker_main())
