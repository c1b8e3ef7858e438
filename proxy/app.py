"""Wiring and lifecycle: one client session, one token registry, routes swapped atomically.

A request takes the current ``Generation`` once, at arrival, and finishes on it
even if a reload swaps in a new one meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import aiohttp
import structlog
from aiohttp import web
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from proxy import status
from proxy.access import ClientAccess
from proxy.config import Config, Listen, Loaded, Provider, Route, is_loopback
from proxy.forward.downstream import AiohttpDownstream, relayed_headers
from proxy.forward.exchange import Exchange
from proxy.forward.forwarder import Forwarder, RouteRuntime, UpstreamFailed
from proxy.forward.framing import FramingError, close_after, validate_request
from proxy.forward.headers import parse_networks
from proxy.forward.methods import TUNNEL, refuse_method
from proxy.forward.routing import RouteTable, Target
from proxy.forward.spool import spool_root
from proxy.forward.transport import Client
from proxy.forward.websocket import (
    is_websocket_upgrade,
    no_handshake_redirects,
    proxy_websocket,
)
from proxy.guard import GuardedSite
from proxy.listener_tls import ServerTLS, expose_expiry, peer_identity
from proxy.observability import Observer, request_id_from
from proxy.problems import (
    BadRequest,
    ConfigError,
    ConfigInvalid,
    ExpectationFailed,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    ServiceUnavailable,
    UpstreamError,
    problem_response,
)
from proxy.server import Dispatch, FastDownstream, Head, Serve
from proxy.startonly import check_exposure, keep_running, restart_needed
from proxy.tls import client_ssl, server_hostname
from proxy.tokens.registry import TokenRegistry
from proxy.tokens.source import Clock, system_clock

log = structlog.get_logger("tokenrelay")

ADMIN = "/-/"


@dataclass(frozen=True, slots=True)
class Generation:
    """One loaded config, turned into what the hot path needs."""

    loaded: Loaded
    table: RouteTable[RouteRuntime]
    registry: TokenRegistry
    access: ClientAccess

    @property
    def config(self) -> Config:
        return self.loaded.config


RegistryFactory = Callable[[Mapping[str, Provider], aiohttp.ClientSession], TokenRegistry]
"""Builds the token registry at start-up; ``--workers`` swaps in one backed by a broker."""


@dataclass
class Runtime:
    """The process's shared state; ``generation`` is replaced whole on reload."""

    loaded: Loaded
    clock: Clock
    observer: Observer
    session: aiohttp.ClientSession | None = None
    token_session: aiohttp.ClientSession | None = None
    forwarder: Forwarder | None = None
    generation: Generation | None = None
    spool_dir: Path | None = None
    draining: bool = False
    reloader: Callable[[], Awaitable[Loaded]] | None = None
    registry_factory: RegistryFactory | None = None
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _background: set[asyncio.Future[None]] = field(default_factory=set)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    """The status page's POSTs carry it (see proxy.status); new every process start."""
    worker: str | None = None  # which --workers worker this is, for the status page

    def discover(self) -> None:
        """Read the issuers' discovery documents in the background (start, reload): a slow
        IdP must not hold up either, and a request that needs one waits for the same read."""
        assert self.generation is not None
        task = asyncio.ensure_future(self.generation.registry.refresh_discovery())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def build(self, loaded: Loaded, previous: TokenRegistry | None) -> Generation:
        """The generation for ``loaded``; any failure is a ConfigError naming the file, so
        start-up exits 2 and a reload is refused, whatever went wrong (a CA file replaced
        since validation, a registry that cannot be made)."""
        with _config_failure(loaded.path, "apply"):
            return self._build(loaded, previous)

    def _build(self, loaded: Loaded, previous: TokenRegistry | None) -> Generation:
        assert self.token_session is not None
        providers = loaded.config.providers
        if previous is None and self.registry_factory is not None:
            registry = self.registry_factory(providers, self.token_session)
        elif previous is None:
            registry = TokenRegistry(
                providers,
                self.token_session,
                clock=self.clock,
                on_event=self.observer.token_event,
            )
        else:
            registry = previous.rebuild(providers)
        routes = [(r.prefix, _route_runtime(r, loaded, registry)) for r in loaded.config.routes]
        current = self.generation  # still the running one while a reload builds
        access = ClientAccess(
            loaded.config.clients,
            clock=self.clock,
            previous=current.access if current is not None else None,
        )
        return Generation(loaded, RouteTable(routes), registry, access)

    async def reload(self) -> Generation:
        """Swap in a new config; the caller gets ConfigError, and nothing changes, whatever
        made the new one fail. ``reload_and_report`` is what SIGHUP and /-/reload call."""
        assert self.reloader is not None and self.generation is not None
        async with self._reload_lock:
            with _config_failure(self.loaded.path, "read"):
                loaded = await self.reloader()
            running = self.loaded.config
            pending = restart_needed(running, loaded.config)
            loaded.restart_needed = list(dict.fromkeys(pending + loaded.restart_needed))
            loaded.config = keep_running(running, loaded.config)
            check_exposure(loaded)  # the listener that stays up must stay protected
            gen = self.build(loaded, self.generation.registry)
            self.generation = gen
            self.loaded = loaded
            self.discover()
            if self.forwarder is not None:
                self.forwarder.apply(loaded.config.limits)
            return gen


RUNTIME = web.AppKey("runtime", Runtime)


@contextlib.contextmanager
def _config_failure(path: str, doing: str) -> Iterator[None]:
    """Whatever fails while reading or applying a config is a ConfigError naming its file."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        problem = f"cannot {doing} the config: {type(exc).__name__}: {exc}"
        raise ConfigError(path, "", problem) from exc


async def reload_and_report(rt: Runtime) -> Generation:
    """The one reload of SIGHUP and ``POST /-/reload``: swaps, logs, counts; a refused
    config raises ConfigInvalid after being logged and counted as an error."""
    try:
        gen = await rt.reload()
    except ConfigError as err:
        rt.observer.reload_done(ok=False)
        log.error(
            "reload failed, config unchanged", file=err.file, key_path=err.path, problem=err.problem
        )
        raise ConfigInvalid(err) from None
    rt.observer.reload_done(ok=True)
    log.info("reloaded", routes=[r.prefix for r in gen.config.routes], config=gen.loaded.path)
    for key in gen.loaded.restart_needed:
        log.warning(f"restart needed for {key}", key_path=key, config=gen.loaded.path)
    return gen


async def reload_on_file_change(rt: Runtime, changed: list[str]) -> None:
    """A secret or key file rotated on disk: reload as SIGHUP would; a file that is gone or
    unreadable fails the reload, which keeps the running config and says so."""
    for key in changed:
        log.warning("secret file changed, reloading", key_path=key, config=rt.loaded.path)
        rt.observer.metrics.file_changed()
    with contextlib.suppress(ConfigInvalid):
        await reload_and_report(rt)


def _route_runtime(route: Route, loaded: Loaded, registry: TokenRegistry) -> RouteRuntime:
    up = URL(route.upstream)
    drop = {route.key_header} if loaded.config.clients else set()
    if route.provider is not None:
        drop.add("Authorization")
    waits = loaded.route_waits_for(route)
    source = registry.sources.get(route.provider) if route.provider and not waits else None
    return RouteRuntime(
        config=route,
        prefix=route.prefix,
        origin=up.origin(),
        base_path=up.raw_path or "/",
        source=source,
        provider=route.provider or "",
        waits_for=tuple(waits),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=route.timeout.connect, sock_read=route.timeout.read
        ),
        ssl=client_ssl(route.tls),
        server_hostname=server_hostname(route.tls),
        drop_headers=frozenset(drop),
        max_body=_max_body(route, loaded.config),
        trusted=parse_networks(loaded.config.trusted_proxies),
        proxy=env_proxy(up) if loaded.config.trust_env else None,
    )


def _max_body(route: Route, config: Config) -> int | None:
    limit = route.max_body if route.max_body is not None else config.limits.max_body
    return None if limit is None else int(limit)


def env_proxy(url: URL) -> tuple[URL, aiohttp.BasicAuth | None] | None:
    """``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` for this upstream, looked up once."""
    try:
        proxy, auth = get_env_proxy_for_url(url)
    except LookupError:
        return None
    return proxy, auth


def make_session(config: Config) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,  # resolved once per route (env_proxy): per request it costs a thread hop
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        max_line_size=config.limits.max_line_size,
        max_field_size=config.limits.max_field_size,
        max_headers=config.limits.max_headers,
        middlewares=(no_handshake_redirects,),
    )


def make_token_session(config: Config) -> aiohttp.ClientSession:
    """Token endpoints get their own session: normal client defaults, no shared cookies."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=config.trust_env,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open the session and token registry at start-up, close them at shutdown."""
    rt = app[RUNTIME]
    config = rt.loaded.config
    try:
        rt.spool_dir = spool_root(config.spool_dir)
    except ConfigError as err:  # it names the directory; the user needs the config key too
        raise ConfigError(rt.loaded.path, "spool_dir", str(err)) from None
    rt.session = make_session(config)
    rt.token_session = make_token_session(config)
    rt.forwarder = Forwarder(rt.session, rt.spool_dir, Client(), config.limits)
    rt.observer.set_replay_budgets(rt.forwarder.memory, rt.forwarder.disk)
    try:
        rt.generation = rt.build(rt.loaded, None)
    except ConfigError:  # start-up fails: aiohttp runs no cleanup, so close what is open
        await _close(rt)
        raise
    rt.observer.set_token_states(lambda: _token_states(rt))
    rt.discover()
    for where in _insecure_tls(config):
        rt.observer.warning("TLS verification disabled (insecure_skip_verify)", **where)
    gc.freeze()  # what start-up made lives on: the collector need not walk it again and again
    try:
        yield
    finally:
        await _close(rt)


async def _close(rt: Runtime) -> None:
    rt.draining = True
    for task in list(rt._background):
        task.cancel()
    if rt.generation is not None:
        await rt.generation.registry.aclose()
    if rt.forwarder is not None:
        await rt.forwarder.aclose()
    if rt.session is not None:
        await rt.session.close()
    if rt.token_session is not None:
        await rt.token_session.close()
    rt.observer.flush()


def _insecure_tls(config: Config) -> list[dict[str, str]]:
    """Where certificate checks are off: worth a warning at every start."""
    out = [{"route": r.prefix} for r in config.routes if r.tls.insecure_skip_verify]
    out += [{"provider": n} for n, p in config.providers.items() if p.tls.insecure_skip_verify]
    return out


def _token_states(rt: Runtime) -> dict[str, dict[str, object]]:
    gen = rt.generation
    if gen is None:
        return {}
    return {name: src.state() for name, src in gen.registry.sources.items()}


def create_app(
    loaded: Loaded,
    observer: Observer,
    *,
    clock: Clock = system_clock,
    admin_on_main: bool = True,
    registry_factory: RegistryFactory | None = None,
) -> web.Application:
    app = web.Application(client_max_size=1024**2)
    rt = app[RUNTIME] = Runtime(
        loaded=loaded, clock=clock, observer=observer, registry_factory=registry_factory
    )
    app.cleanup_ctx.append(_lifecycle)
    app.on_response_prepare.append(relayed_headers)
    handler = _handler(admin_on_main, rt)
    app[HANDLER] = handler
    app[DISPATCH] = _fast_dispatch(rt)
    app.router.add_route("*", r"/{tail:[\s\S]*}", handler, expect_handler=_expect_in_handler)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BaseHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
HANDLER: web.AppKey[Handler] = web.AppKey("handler")
"""The main listener's handler: ``start_runner`` serves it without the router."""
DISPATCH: web.AppKey[Dispatch] = web.AppKey("dispatch")
"""What the main listener's lean server serves itself (``proxy.server``)."""


async def _expect_in_handler(request: web.Request) -> None:
    """The handler answers Expect itself, on the lean server and under the router alike."""


def _expect(request: web.BaseRequest, expect: str) -> bool:
    """Whether to answer 100 Continue, which the downstream does once the body is wanted:
    a request refused first (413 for a Content-Length above ``max_body``, 401, 404...) is
    answered without inviting its body. 417 for an expectation other than 100-continue;
    HTTP/1.0 ignores Expect."""
    if request.version != aiohttp.HttpVersion11:
        return False
    if expect.lower() != "100-continue":
        raise ExpectationFailed("the only expectation supported is 100-continue")
    return True


class _LeanRunner(web.AppRunner):
    """Serves the app's ``HANDLER`` on aiohttp's low-level server: no router, middleware
    or per-request app bookkeeping, yet the app's start-up/cleanup hooks and
    on_response_prepare signals (``--workers`` tags responses) still run."""

    async def _make_server(self) -> web.Server:
        app, loop = self.app, asyncio.get_running_loop()
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        match = _static_match(app)
        max_size = app._client_max_size

        def factory(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.Request:
            request = web.Request(
                message, payload, protocol, writer, task, loop, client_max_size=max_size
            )
            request._match_info = match
            return request

        handler = cast(_BaseHandler, app[HANDLER])  # the factory makes web.Requests
        return web.Server(handler, request_factory=factory, loop=loop, **self._kwargs)


def _static_match(app: web.Application) -> web.UrlMappingMatchInfo:
    """One frozen match for every request: the catch-all route, in this app."""
    route = next(iter(app.router.routes()))
    match = web.UrlMappingMatchInfo({}, route)
    match.add_app(app)
    match.freeze()
    return match


def create_admin_app(main: web.Application) -> web.Application:
    """The separate admin listener: only /-/, and reload is allowed here."""
    app = web.Application()
    rt = main[RUNTIME]

    async def handle(request: web.Request) -> web.StreamResponse:
        rid = request_id_from(request.headers.get("X-Request-Id"))
        try:
            return await _admin(request, rt, rid, on_admin_listener=True)
        except ProxyError as err:
            return problem_response(err, rid)

    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
    return app


def _handler(admin_on_main: bool, rt: Runtime) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        headers = request.headers
        rid = request_id_from(headers.get("X-Request-Id"))
        ex = Exchange(rid, request.method, "", _peer(request), time.perf_counter())
        rt.observer.metrics.in_flight_now += 1
        try:
            expect = headers.get("Expect")  # judged first, as aiohttp's router does
            invite = expect is not None and _expect(request, expect)
            validate_request(request.raw_headers, method=request.method, version=request.version)
            target = Target.parse(request.raw_path)
            ex.path = target.path
            if target.path.startswith(ADMIN) or target.path == "/-":
                ex.route = ADMIN
                if not admin_on_main:
                    raise NotFound("admin endpoints are on the admin listener")
                resp = await _admin(request, rt, rid, on_admin_listener=False)
                ex.status = resp.status
                return resp
            return await _proxy(request, rt, target, ex, invite=invite)
        except ProxyError as err:
            _failed(ex, err)
            resp = problem_response(err, rid)
            if isinstance(err, FramingError) or request.method == TUNNEL:  # after CONNECT
                return await close_after(request, resp)  # come tunnel bytes, not requests
            return resp
        except UpstreamFailed:
            if request.transport is not None:
                request.transport.close()
            raise
        except ConnectionError:
            ex.error = ex.error or "client_gone"
            if _client_gone(request):
                return _unsent()
            raise
        except asyncio.CancelledError:
            ex.error = ex.error or "client_gone"
            raise
        except Exception:
            log.exception("unhandled error", request_id=rid)
            if ex.status:  # the response head may be out: cut the connection instead
                ex.error = "internal"
                raise
            ex.status, ex.error = 500, "internal"
            return problem_response(ProxyError("the proxy failed on this request"), rid)
        finally:
            rt.observer.metrics.in_flight_now -= 1
            rt.observer.request_done(ex)

    return handle


def _admit(
    gen: Generation,
    route: RouteRuntime,
    headers: Mapping[str, str],
    ex: Exchange,
    transport: asyncio.BaseTransport | None,
) -> None:
    """Record the route and let the client's key (or certificate) through, or raise: both
    servers' step."""
    ex.route, ex.provider = route.prefix, route.provider
    refuse_method(ex.method, has_provider=bool(route.provider))
    peer = None if gen.access.open else peer_identity(transport)
    ex.client_id = gen.access.check(headers, route.prefix, route.config.key_header, peer)


def _failed(ex: Exchange, err: ProxyError) -> None:
    ex.status = err.status
    ex.error = ex.error or err.slug
    if isinstance(err, UpstreamError):
        ex.upstream_error = err.kind


_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}


def _fast_dispatch(rt: Runtime) -> Dispatch:
    """Which requests the lean server serves: proxied ones that pass every check made before
    a route is chosen. The rest (admin paths, no route, a route still waiting, anything
    refused) go to aiohttp, which answers them as it always has; nothing here has effects."""

    def dispatch(head: Head) -> Serve | None:
        gen, fwd = rt.generation, rt.forwarder
        version = _VERSIONS.get(head.version)
        if gen is None or fwd is None or version is None:
            return None
        try:
            validate_request(head.raw_headers, method=head.method, version=version)
            target = Target.parse(head.target)
        except ProxyError:
            return None
        hit = None if target.path.startswith("/-") else gen.table.lookup(target.path)
        if hit is None or hit[0].waits_for:
            return None
        route, remainder = hit
        return partial(_serve_fast, rt, gen, fwd, route, remainder, target)

    return dispatch


async def _serve_fast(
    rt: Runtime,
    gen: Generation,
    fwd: Forwarder,
    route: RouteRuntime,
    remainder: str,
    target: Target,
    down: FastDownstream,
) -> None:
    """``handle`` for a request the lean server took: the same steps, errors and records."""
    rid = request_id_from(down.headers.get("X-Request-Id"))
    ex = Exchange(rid, down.method, target.path, down.peer, time.perf_counter())
    metrics = rt.observer.metrics
    metrics.in_flight_now += 1
    try:
        _admit(gen, route, down.headers, ex, down.transport)
        await fwd.forward(down, route, remainder, target.query, ex)
    except ProxyError as err:
        _failed(ex, err)
        down.problem(err, rid)
    except UpstreamFailed:
        down.abort()
    except ConnectionError:
        ex.error = ex.error or "client_gone"
        down.abort()
    except asyncio.CancelledError:
        ex.error = ex.error or "client_gone"
        raise
    except Exception:
        log.exception("unhandled error", request_id=rid)
        if down.head_sent:
            ex.error = "internal"
        else:
            ex.status, ex.error = 500, "internal"
        down.problem(ProxyError("the proxy failed on this request"), rid)
    finally:
        metrics.in_flight_now -= 1
        rt.observer.request_done(ex)


async def _proxy(
    request: web.Request, rt: Runtime, target: Target, ex: Exchange, *, invite: bool
) -> web.StreamResponse:
    gen, fwd = rt.generation, rt.forwarder
    if gen is None or fwd is None:
        raise ServiceUnavailable("proxy is starting")
    hit = gen.table.lookup(target.path)
    if hit is None:
        raise NotFound(f"no route for {target.path[:200]}")
    route, remainder = hit
    _admit(gen, route, request.headers, ex, request.transport)
    if route.waits_for:
        raise ServiceUnavailable(
            f"route {route.prefix} waits for provider {route.provider}: "
            f"set {', '.join(route.waits_for)}"
        )
    if is_websocket_upgrade(request):
        if not route.config.websocket.enabled:
            raise BadRequest("WebSocket upgrades are off on this route")
        return await proxy_websocket(request, rt.session, route, remainder, target.query, ex)
    down = AiohttpDownstream(request, invite=invite)
    await fwd.forward(down, route, remainder, target.query, ex)
    assert down.response is not None
    return down.response


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _unsent() -> web.StreamResponse:
    """For a client that went away: aiohttp's write of it fails quietly on the closed
    transport, where a raised ConnectionError would cost a logged traceback per connection."""
    return web.Response()


def _peer(request: web.Request) -> str:
    return request.remote or ""


AdminHandler = Callable[[Runtime, web.Request, str], Awaitable[web.StreamResponse]]


class Reach(enum.Enum):
    """Who an admin endpoint answers."""

    ANYONE = "anyone"
    PRIVATE = "loopback or admin listener"
    ADMIN_LISTENER = "admin listener only"


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    """One row of ``ADMIN_ENDPOINTS``: who may call it, with which methods, and what runs."""

    reach: Reach
    methods: tuple[str, ...]
    handler: AdminHandler

    @property
    def allow(self) -> str:
        """The ``Allow`` header: HEAD goes wherever GET does."""
        methods = (*self.methods, "HEAD") if "GET" in self.methods else self.methods
        return ", ".join(methods)

    def takes(self, method: str) -> bool:
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)


async def _health(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def _ready(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    ready = rt.generation is not None and rt.session is not None and not rt.draining
    status = 200 if ready else 503
    return web.json_response({"status": "ready" if ready else "not ready"}, status=status)


async def _metrics(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    body, ctype = rt.observer.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def _tokens(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    return web.json_response(_token_states(rt))


async def _renew(rt: Runtime, request: web.Request, provider: str) -> web.StreamResponse:
    return await _renewed(rt, request, provider, login=False)


async def _test(rt: Runtime, request: web.Request, provider: str) -> web.StreamResponse:
    """Test the credentials themselves: a login, not a refresh; the cool-down holds."""
    return await _renewed(rt, request, provider, login=True)


async def _renewed(
    rt: Runtime, request: web.Request, provider: str, *, login: bool
) -> web.StreamResponse:
    status.check_csrf(request, rt.csrf)
    gen = rt.generation
    source = gen.registry.sources.get(provider) if gen is not None else None
    if source is None:
        raise NotFound(f"no provider {provider[:100]}")
    await source.renew(login=login)
    return web.json_response({provider: source.state()})


async def _status_page(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    return status.page(rt.csrf)


async def _status_asset(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    return status.asset(request.path.removeprefix("/-/"))


async def _status(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    gen = rt.generation
    routes: list[dict[str, object]] = []
    if gen is not None:
        for r in gen.config.routes:
            routes.append({"prefix": r.prefix, "upstream": r.upstream, "provider": r.provider})
    doc = status.document(rt.loaded, rt.observer, _token_states(rt), routes, rt.worker)
    return web.json_response(doc, headers=status.SECURITY_HEADERS)


async def _reload(rt: Runtime, request: web.Request, arg: str) -> web.StreamResponse:
    status.check_csrf(request, rt.csrf)
    gen = await reload_and_report(rt)
    pending = gen.loaded.restart_needed
    return web.json_response(
        {"status": "reloaded", "routes": len(gen.table), "restart_needed": pending}
    )


ADMIN_ENDPOINTS: dict[str, AdminEndpoint] = {
    "/-/health": AdminEndpoint(Reach.ANYONE, ("GET",), _health),
    "/-/ready": AdminEndpoint(Reach.ANYONE, ("GET",), _ready),
    "/-/metrics": AdminEndpoint(Reach.ANYONE, ("GET",), _metrics),
    "/-/tokens": AdminEndpoint(Reach.PRIVATE, ("GET",), _tokens),
    "/-/tokens/{provider}/renew": AdminEndpoint(Reach.PRIVATE, ("POST",), _renew),
    "/-/tokens/{provider}/test": AdminEndpoint(Reach.PRIVATE, ("POST",), _test),
    "/-/reload": AdminEndpoint(Reach.ADMIN_LISTENER, ("POST",), _reload),
    "/-/": AdminEndpoint(Reach.PRIVATE, ("GET",), _status_page),
    "/-/status": AdminEndpoint(Reach.PRIVATE, ("GET",), _status),
    "/-/status.js": AdminEndpoint(Reach.PRIVATE, ("GET",), _status_asset),
    "/-/status.css": AdminEndpoint(Reach.PRIVATE, ("GET",), _status_asset),
}
"""Every admin path, once: the README's admin table says the same."""
_RENEW = re.compile(r"/-/tokens/([^/]+)/(renew|test)")


def _admin_endpoint(path: str) -> tuple[AdminEndpoint, str] | None:
    """The endpoint for ``path`` and its argument (the provider of a renew)."""
    found = ADMIN_ENDPOINTS.get(path)
    if found is not None:
        return found, ""
    renew = _RENEW.fullmatch(path)
    if renew is None:
        return None
    return ADMIN_ENDPOINTS[f"/-/tokens/{{provider}}/{renew[2]}"], renew[1]


async def _admin(
    request: web.Request, rt: Runtime, rid: str, *, on_admin_listener: bool
) -> web.StreamResponse:
    """An admin request: 404 for a path this caller may not see, 405 for a wrong method."""
    path = request.path
    found = _admin_endpoint(path)
    if found is None:
        raise NotFound(f"no admin endpoint {path[:100]}")
    endpoint, arg = found
    if endpoint.reach is Reach.ADMIN_LISTENER and not on_admin_listener:
        raise NotFound(f"{path} is served on the admin listener only")
    private = on_admin_listener or is_loopback(_peer(request))
    if endpoint.reach is Reach.PRIVATE and not private:
        raise NotFound("admin endpoint is only served to loopback clients")
    if not endpoint.takes(request.method):
        raise MethodNotAllowed(
            f"{path[:100]} takes {endpoint.allow}", headers={"Allow": endpoint.allow}
        )
    return await endpoint.handler(rt, request, arg)


async def start_runner(
    app: web.Application,
    cfg: Config,
    listen: Listen,
    *,
    reuse_port: bool = False,
    name: str = "listen",
    observer: Observer | None = None,
) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner and the port actually bound. ``name`` is
    the listener's config key; ``observer`` (default: the app's) gets its certificate's
    expiry metric."""
    limits = cfg.limits
    handler_kwargs: dict[str, Any] = {
        "access_log": None,
        "max_line_size": limits.max_line_size,
        "max_field_size": limits.max_field_size,
        "max_headers": limits.max_headers,
        "keepalive_timeout": limits.keepalive_timeout,
    }
    runner_class = _LeanRunner if HANDLER in app else web.AppRunner
    runner = runner_class(
        app,
        handle_signals=False,
        shutdown_timeout=cfg.shutdown_grace,
        handler_cancellation=True,
        **handler_kwargs,
    )
    observer = observer or (app[RUNTIME].observer if RUNTIME in app else None)
    tls = None if listen.tls is None else ServerTLS(listen.tls, name)
    if tls is not None and observer is not None:
        expose_expiry(observer.metrics.registry, tls)
    await runner.setup()
    site = GuardedSite(
        runner,
        listen.host,
        listen.port,
        handler_kwargs=handler_kwargs,
        limits=limits,
        reuse_port=reuse_port,
        dispatch=app.get(DISPATCH),
        observer=app[RUNTIME].observer if RUNTIME in app else None,
        tls=tls,
    )
    try:
        await site.start()
    except OSError:  # the caller reports it; the app's start-up ran and must be undone
        await runner.cleanup()
        raise
    addresses = [a for a in runner.addresses if isinstance(a, tuple)]
    port = int(addresses[-1][1]) if addresses else listen.port
    return runner, port
