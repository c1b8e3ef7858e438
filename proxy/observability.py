"""Request ids, the access log, token-event logs and Prometheus metrics.

The access line is rendered directly (one dict, one orjson call, one write) instead of going
through a processor chain: it is the one line written per request. Everything else goes
through structlog with a redaction processor as a safety net for secrets.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import random
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import lru_cache
from itertools import accumulate
from typing import Any, TextIO

import orjson
import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy import __version__
from proxy.config import ADMIN_PREFIX
from proxy.forward.exchange import Exchange
from proxy.forward.spool import Budget
from proxy.forward.upstream_rules import ErrorKind
from proxy.recent import RecentRequests, RecentTokens

EventDict = MutableMapping[str, Any]
TokenStates = Callable[[], Mapping[str, Mapping[str, object]]]

# ---------------------------------------------------------------------------
# request ids

_SANE_ID = re.compile(r"[!#-&(-\[\]-~]{1,128}")  # visible ASCII without " ' \


def request_id_from(header_value: str | None) -> str:
    """Keep the client's X-Request-Id when it is safe to echo and log, else make one."""
    if header_value is not None and _SANE_ID.fullmatch(header_value):
        return header_value
    return f"{_random_bits(128):032x}"  # an id, not a secret: no system call for it


_random_bits = random.getrandbits


# ---------------------------------------------------------------------------
# rendering and redaction

MASK = "***"
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "password",
        "passwd",
        "client_secret",
        "secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "key",
        "api_key",
    }
)
_SECRET_SUFFIXES = ("_token", "_secret", "_password", "_key", "authorization")
_BEARER = re.compile(r"(?i)\b(bearer)\s+\S+")
_MASKED_BEARER = r"\1 " + MASK


@lru_cache(maxsize=2048)
def _is_secret_key(key: str) -> bool:
    k = key.lower().replace("-", "_")
    return k in _SECRET_KEYS or k.endswith(_SECRET_SUFFIXES)


def _scrub(value: object) -> object:
    """Anything a renderer would turn into text (exceptions, URLs...) is scrubbed as text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: MASK if _is_secret_key(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    return _BEARER.sub(_MASKED_BEARER, value if isinstance(value, str) else str(value))


def redact(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    """Mask values under secret-looking keys and Bearer credentials inside any string."""
    for k, v in event_dict.items():
        event_dict[k] = MASK if _is_secret_key(k) else _scrub(v)
    return event_dict


_last_ms = -1
_last_second = -1
_second_prefix = ""
_now_text = ""


def utc_now_iso() -> str:
    """ISO 8601 UTC with milliseconds; formatted at most once per millisecond, and the date
    part once per second (it is called on every request)."""
    global _last_ms, _last_second, _second_prefix, _now_text
    ms = int(time.time() * 1000)
    if ms != _last_ms:
        sec, frac = divmod(ms, 1000)
        if sec != _last_second:
            _second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            _last_second = sec
        _now_text = f"{_second_prefix}.{frac:03d}Z"
        _last_ms = ms
    return _now_text


def _add_time(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    event_dict["time"] = utc_now_iso()
    return event_dict


_LEADING = ("time", "level", "event")


def _render_json(_logger: object, _method: str, event_dict: EventDict) -> str:
    """time, level and event first, as in the access line, so lines read alike."""
    head = {k: event_dict.pop(k) for k in _LEADING if k in event_dict}
    head.update(event_dict)
    return orjson.dumps(head, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


Renderer = Callable[[object, str, EventDict], str]


def _renderer(fmt: str, stream: TextIO) -> Renderer:
    if fmt == "json":
        return _render_json
    if fmt == "console":
        colors = bool(getattr(stream, "isatty", lambda: False)())
        return structlog.dev.ConsoleRenderer(colors=colors, timestamp_key="time", sort_keys=False)
    raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")


def _processors(renderer: Renderer) -> list[Any]:
    return [
        structlog.processors.add_log_level,
        _add_time,
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]


class LineLogger:
    """Writes each rendered line to a text stream; a broken stream loses lines, not requests."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def msg(self, message: str) -> None:
        with suppress(OSError, ValueError):
            self.stream.write(message + "\n")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class LineLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, *args: object) -> LineLogger:
        return LineLogger(self.stream)


def configure_logging(
    fmt: str = "json", stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """Set up structlog for the whole process; stdlib records (aiohttp's) get the same format."""
    out = sys.stderr if stream is None else stream
    renderer = _renderer(fmt, out)
    structlog.configure(
        processors=_processors(renderer),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=LineLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_processors(renderer)[:-1]],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def stream_logger(fmt: str, stream: TextIO, level: int = logging.INFO) -> Any:
    """A structlog logger of its own, independent of the process-wide configuration."""
    return structlog.wrap_logger(
        LineLogger(stream),
        processors=_processors(_renderer(fmt, stream)),
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )


_WARNING_EVENTS = frozenset(
    {"refresh_refused_login", "cooldown_entered", "discovery_failed", "client_auth_not_listed"}
)


def log_token_event(event: str, fields: Mapping[str, object], logger: Any = None) -> None:
    """One line per token lifecycle event; failures are warnings."""
    log = structlog.get_logger("tokenrelay.tokens") if logger is None else logger
    kw = {k: v for k, v in fields.items() if k != "event"}
    failed = event in _WARNING_EVENTS or kw.get("outcome") not in (None, "success", "ok")
    (log.warning if failed else log.info)(event, **kw)


# ---------------------------------------------------------------------------
# access log


_EMPTY = ("", None)


class AccessLog:
    """One line per request, rendered without the processor chain: it runs on every request.

    The Exchange carries no credentials, so there is nothing to redact here.
    """

    def __init__(
        self,
        fmt: str = "json",
        stream: TextIO | None = None,
        perf: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self._json = fmt == "json"
        self._render = _renderer(fmt, self.stream)
        self._out = LineLogger(self.stream)
        self._perf = perf
        self._pending: list[str] = []

    def log(self, ex: Exchange, duration: float | None = None) -> None:
        """Lines logged in one event-loop pass go out in one write, at the start of the next
        pass (before the I/O it polls); outside a loop each line is written at once."""
        if duration is None:
            duration = self._perf() - ex.started
        line = self._fields(ex, duration)
        if self._json:
            text = orjson.dumps(line, default=str).decode()
        else:  # for people: fields in the line's own order, and none that say nothing
            text = self._render(None, "info", {k: v for k, v in line.items() if v not in _EMPTY})
        pending = self._pending
        pending.append(text)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Write the lines held so far (also called at shutdown)."""
        if self._pending:
            lines, self._pending = self._pending, []
            self._out.msg("\n".join(lines))

    @staticmethod
    def _fields(ex: Exchange, duration: float) -> dict[str, object]:
        return {
            "time": utc_now_iso(),
            "level": "info",
            "event": "access",
            "request_id": ex.request_id,
            "client": ex.client,
            "method": ex.method,
            "route": ex.route,
            "path": ex.path,
            "status": ex.status,
            "upstream_status": ex.upstream_status,
            "duration_ms": round(duration * 1000, 3),
            "ttfb_ms": None if ex.ttfb is None else round(ex.ttfb * 1000, 3),
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "replayed": ex.replayed,
            "replay_outcome": ex.replay_outcome,
            "provider": ex.provider,
            "client_id": ex.client_id,
            "error": ex.error,
            "upstream_error": ex.upstream_error,
        }


# ---------------------------------------------------------------------------
# metrics

METHODS = {
    m: m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}
REPLAY_OUTCOMES = frozenset(
    {"succeeded", "unauthorized_again", "body_too_large", "budget", "response_too_large"}
)
UPSTREAM_ERRORS = frozenset(k.value for k in ErrorKind)  # protocol too: every kind is counted
UNPROXIED = frozenset({ADMIN_PREFIX, "none"})  # admin answers; requests that matched no route
MAX_LABEL_VALUES = 256  # per label set family: a bug upstream of here cannot explode the series
OVERFLOW = "other"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


_BUCKET_LABELS = (*(repr(float(b)) for b in BUCKETS), "+Inf")


class _Histogram:
    """Counts per bucket; the event loop is the only writer, so plain ints need no lock."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKET_LABELS)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        return list(zip(_BUCKET_LABELS, accumulate(self.counts), strict=True))


class _RouteStats:
    """Everything counted per route, found with one dict lookup per request."""

    __slots__ = ("duration", "errors", "label", "proxied", "received", "replays", "sent", "ttfb")

    def __init__(self, label: str) -> None:
        self.label = label
        self.proxied = label not in UNPROXIED  # no upstream: no upstream series either
        self.duration = _Histogram()
        self.ttfb = _Histogram()
        self.received = 0
        self.sent = 0
        self.replays = dict.fromkeys(sorted(REPLAY_OUTCOMES), 0)
        self.errors = dict.fromkeys(sorted(UPSTREAM_ERRORS), 0)


class Metrics:
    """tokenrelay's metrics: plain counters on the request path, turned into Prometheus
    families only when scraped (a ``.labels()`` lookup or a locked prometheus-client child per
    request costs several times more). Registered on a registry of its own."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        perf: Callable[[], float] = time.perf_counter,
        max_label_values: int = MAX_LABEL_VALUES,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._perf = perf
        self._max_values = max_label_values
        self._routes: dict[str, _RouteStats] = {}
        self._overflow_route: _RouteStats | None = None
        self._requests: dict[tuple[str, str, int], int] = {}
        self._token_requests: dict[tuple[str, str, str], int] = {}
        self._reloads = {"success": 0, "error": 0}
        self._file_changes = 0
        self._token_states: TokenStates | None = None
        self._budgets: tuple[Budget, Budget] | None = None
        self.in_flight_now = 0
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, RSS, open fds

    def observe(self, ex: Exchange, duration: float | None = None) -> None:
        """Every request-side metric from one finished Exchange; unknown outcomes and
        error kinds are not counted rather than given a label of their own."""
        if duration is None:
            duration = self._perf() - ex.started
        rs = self._routes.get(ex.route) or self._route(ex.route)
        key = (rs.label, METHODS.get(ex.method, "OTHER"), ex.status if 0 <= ex.status < 1000 else 0)
        self._requests[key] = self._requests.get(key, 0) + 1
        rs.duration.observe(duration)
        if ex.ttfb is not None:
            rs.ttfb.observe(ex.ttfb)
        rs.received += ex.bytes_in
        rs.sent += ex.bytes_out
        if ex.replay_outcome in rs.replays:
            rs.replays[ex.replay_outcome] += 1
        if ex.upstream_error in rs.errors:
            rs.errors[ex.upstream_error] += 1

    def _route(self, route: str) -> _RouteStats:
        if len(self._routes) < self._max_values:
            rs = self._routes[route] = _RouteStats(route or "none")
            return rs
        if self._overflow_route is None:
            self._overflow_route = _RouteStats(OVERFLOW)
        return self._overflow_route

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        self.in_flight_now += 1
        try:
            yield
        finally:
            self.in_flight_now -= 1

    def token_event(self, event: str, fields: Mapping[str, object]) -> None:
        """Count token endpoint calls; expiry and cool-down come from ``set_token_states``."""
        if event != "token_request":
            return
        key = (
            str(fields.get("provider") or ""),
            str(fields.get("step") or ""),
            str(fields.get("outcome") or ""),
        )
        if key not in self._token_requests and len(self._token_requests) >= self._max_values:
            key = (OVERFLOW, OVERFLOW, OVERFLOW)
        self._token_requests[key] = self._token_requests.get(key, 0) + 1

    def set_token_states(self, states: TokenStates) -> None:
        """``states()`` maps provider to a dict with ``seconds_left`` and ``state``; it is
        called at each scrape."""
        self._token_states = states

    def set_replay_budgets(self, memory: Budget, disk: Budget) -> None:
        """The forwarder's budgets, whose use is read at each scrape."""
        self._budgets = (memory, disk)

    def config_reloaded(self, ok: bool) -> None:
        self._reloads["success" if ok else "error"] += 1

    def file_changed(self) -> None:
        """A watched secret or key file changed on disk (each one starts a reload)."""
        self._file_changes += 1

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- the collector side: called by the registry at scrape time

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "tokenrelay_build_info", "Always 1; the version running", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        yield from self._request_families()
        yield from self._route_families()
        yield from self._token_families()
        reloads = CounterMetricFamily(
            "tokenrelay_config_reload", "Config reloads by outcome", labels=["outcome"]
        )
        for outcome, n in self._reloads.items():
            reloads.add_metric([outcome], n)
        yield reloads
        yield CounterMetricFamily(
            "tokenrelay_secret_file_changes",
            "Secret, key and certificate files of providers seen changed on disk",
            value=self._file_changes,
        )

    def _request_families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tokenrelay_requests", "Requests answered", labels=["route", "method", "status"]
        )
        for (route, method, status), n in self._requests.items():
            requests.add_metric([route, method, str(status)], n)
        yield requests
        yield GaugeMetricFamily(
            "tokenrelay_requests_in_flight", "Requests being handled", value=self.in_flight_now
        )
        if self._budgets is not None:
            memory, disk = self._budgets
            yield GaugeMetricFamily(
                "tokenrelay_replay_memory_bytes",
                "Request body bytes held in memory for a replay (limits.replay_memory)",
                value=memory.used,
            )
            yield GaugeMetricFamily(
                "tokenrelay_replay_disk_bytes",
                "Request body bytes held in spool files for a replay (limits.replay_disk)",
                value=disk.used,
            )

    def _route_families(self) -> Iterator[Metric]:
        stats = list(self._routes.values())
        if self._overflow_route is not None:
            stats.append(self._overflow_route)
        yield _histograms(
            "tokenrelay_request_duration_seconds",
            "Time from arrival to the last byte sent",
            [(rs.label, rs.duration) for rs in stats],
        )
        proxied = [rs for rs in stats if rs.proxied]
        yield _histograms(
            "tokenrelay_upstream_ttfb_seconds",
            "Time from arrival to the first upstream response byte",
            [(rs.label, rs.ttfb) for rs in proxied],
        )
        received = CounterMetricFamily(
            "tokenrelay_received_bytes", "Request body bytes from clients", labels=["route"]
        )
        sent = CounterMetricFamily(
            "tokenrelay_sent_bytes", "Response body bytes to clients", labels=["route"]
        )
        replays = CounterMetricFamily(
            "tokenrelay_replays", "Replays after an upstream 401", labels=["route", "outcome"]
        )
        errors = CounterMetricFamily(
            "tokenrelay_upstream_errors", "Upstream failures by kind", labels=["route", "kind"]
        )
        for rs in stats:
            received.add_metric([rs.label], rs.received)
            sent.add_metric([rs.label], rs.sent)
        for rs in proxied:
            for outcome, n in rs.replays.items():
                replays.add_metric([rs.label, outcome], n)
            for kind, n in rs.errors.items():
                errors.add_metric([rs.label, kind], n)
        yield from (received, sent, replays, errors)

    def _token_families(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "tokenrelay_token_requests",
            "Calls to token endpoints",
            labels=["provider", "step", "outcome"],
        )
        for labels, n in self._token_requests.items():
            calls.add_metric(list(labels), n)
        yield calls
        expiry = GaugeMetricFamily(
            "tokenrelay_token_expiry_seconds",
            "Seconds until the provider's current token expires",
            labels=["provider"],
        )
        cooldown = GaugeMetricFamily(
            "tokenrelay_token_cooldown",
            "1 while the provider is cooling down after a failure",
            labels=["provider"],
        )
        for provider, state in self._read_token_states().items():
            left = state.get("seconds_left")
            if isinstance(left, int | float):
                expiry.add_metric([provider], float(left))
            cooling = state.get("state") == "cooldown" or state.get("cooldown_seconds_left")
            cooldown.add_metric([provider], 1.0 if cooling else 0.0)
        yield from (expiry, cooldown)

    def _read_token_states(self) -> Mapping[str, Mapping[str, object]]:
        if self._token_states is None:
            return {}
        try:
            return self._token_states()
        except Exception:  # a scrape must not fail because the token registry misbehaves
            return {}


def _histograms(name: str, doc: str, rows: list[tuple[str, _Histogram]]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["route"])
    for label, hist in rows:
        family.add_metric([label], hist.cumulative(), sum_value=hist.total)
    return family


# ---------------------------------------------------------------------------
# the one object the rest of the proxy talks to


class Observer:
    """Access log, token-event log and metrics behind the few calls the proxy makes."""

    def __init__(
        self,
        log_format: str = "json",
        *,
        stream: TextIO | None = None,
        perf: Callable[[], float] = time.perf_counter,
        metrics: Metrics | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        out = sys.stderr if stream is None else stream
        self.access = AccessLog(log_format, out, perf)
        self.metrics = Metrics(perf=perf) if metrics is None else metrics
        self.recent = RecentRequests(wall)
        self.recent_tokens = RecentTokens(wall)
        self.started_at = wall()
        self.last_reload: dict[str, object] | None = None
        self.wall = wall
        self._log = stream_logger(log_format, out)
        self._perf = perf

    def request_done(self, ex: Exchange) -> None:
        duration = self._perf() - ex.started
        self.access.log(ex, duration)
        self.metrics.observe(ex, duration)
        self.recent.observe(ex, duration)

    def flush(self) -> None:
        """Write access lines still held (see ``AccessLog.log``)."""
        self.access.flush()

    def token_event(self, event: str, fields: Mapping[str, object]) -> None:
        log_token_event(event, fields, self._log)
        self.metrics.token_event(event, fields)
        self.recent_tokens.event(event, fields)

    def in_flight(self) -> AbstractContextManager[None]:
        """Wrap a request's handling: the in-flight gauge cannot drift on errors."""
        return self.metrics.in_flight()

    def set_token_states(self, states: TokenStates) -> None:
        self.metrics.set_token_states(states)

    def reload_done(self, ok: bool) -> None:
        self.metrics.config_reloaded(ok)
        self.last_reload = {"time": self.wall(), "outcome": "success" if ok else "error"}

    def set_replay_budgets(self, memory: Budget, disk: Budget) -> None:
        self.metrics.set_replay_budgets(memory, disk)

    def warning(self, event: str, **fields: object) -> None:
        """An operational warning on the proxy's own log stream (start-up, reload)."""
        self._log.warning(event, **fields)

    def render(self) -> tuple[bytes, str]:
        return self.metrics.render()
