"""Request ids, the access log, token-event logs and Prometheus metrics.

The access line is rendered directly (one dict, one orjson call, one write) instead of going
through a processor chain: it is the one line written per request. Everything else goes
through structlog with a redaction processor as a safety net for secrets.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import lru_cache
from typing import Any, Literal, TextIO

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from proxy.forward.exchange import Exchange

LogFormat = Literal["json", "console"]
EventDict = MutableMapping[str, Any]
TokenStates = Callable[[], Mapping[str, Mapping[str, object]]]

# ---------------------------------------------------------------------------
# request ids

_SANE_ID = re.compile(r"[!#-&(-\[\]-~]{1,128}")  # visible ASCII without " ' \


def request_id_from(header_value: str | None) -> str:
    """Keep the client's X-Request-Id when it is safe to echo and log, else make one."""
    if header_value is not None and _SANE_ID.fullmatch(header_value):
        return header_value
    return os.urandom(16).hex()


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
    if isinstance(value, str):
        return _BEARER.sub(_MASKED_BEARER, value)
    if isinstance(value, Mapping):
        return {k: MASK if _is_secret_key(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    """Mask values under secret-looking keys and Bearer credentials inside any string."""
    for k, v in event_dict.items():
        event_dict[k] = MASK if _is_secret_key(k) else _scrub(v)
    return event_dict


_last_second = -1
_second_prefix = ""


def utc_now_iso() -> str:
    """ISO 8601 UTC with milliseconds; the date part is formatted once per second."""
    global _last_second, _second_prefix
    now = time.time()
    sec = int(now)
    if sec != _last_second:
        _second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _last_second = sec
    return f"{_second_prefix}.{int((now - sec) * 1000):03d}Z"


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
        return structlog.dev.ConsoleRenderer(colors=colors, timestamp_key="time")
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


_WARNING_EVENTS = frozenset({"refresh_refused_login", "cooldown_entered"})


def log_token_event(event: str, fields: Mapping[str, object], logger: Any = None) -> None:
    """One line per token lifecycle event; failures are warnings."""
    log = structlog.get_logger("tokenrelay.tokens") if logger is None else logger
    kw = {k: v for k, v in fields.items() if k != "event"}
    failed = event in _WARNING_EVENTS or kw.get("outcome") not in (None, "success", "ok")
    (log.warning if failed else log.info)(event, **kw)


# ---------------------------------------------------------------------------
# access log


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

    def log(self, ex: Exchange, duration: float | None = None) -> None:
        if duration is None:
            duration = self._perf() - ex.started
        line = self._fields(ex, duration)
        if self._json:
            text = orjson.dumps(line, default=str).decode()
        else:
            text = self._render(None, "info", line)
        self._out.msg(text)

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
REPLAY_OUTCOMES = frozenset({"succeeded", "unauthorized_again", "body_too_large"})
UPSTREAM_ERRORS = frozenset({"connect", "timeout", "reset", "tls"})
MAX_LABEL_VALUES = 256  # per label set family: a bug upstream of here cannot explode the series
OVERFLOW = "other"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def method_label(method: str) -> str:
    return METHODS.get(method, "OTHER")


class _RouteMetrics:
    """The per-route children, looked up once per request by route prefix."""

    __slots__ = ("duration", "errors", "label", "received", "replays", "sent", "ttfb")

    def __init__(self, m: Metrics, label: str) -> None:
        self.label = label
        self.duration = m.duration.labels(label)
        self.ttfb = m.ttfb.labels(label)
        self.received = m.received.labels(label)
        self.sent = m.sent.labels(label)
        self.replays = {o: m.replays.labels(label, o) for o in REPLAY_OUTCOMES}
        self.errors = {k: m.upstream_errors.labels(label, k) for k in UPSTREAM_ERRORS}


class _TokenStateCollector:
    """Token expiry and cool-down, read from the token cache when Prometheus scrapes."""

    def __init__(self) -> None:
        self.source: TokenStates | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        expiry = GaugeMetricFamily(
            "tokenrelay_token_expiry_seconds",
            "Seconds until the provider's current token expires",
            labels=["provider"],
        )
        cooldown = GaugeMetricFamily(
            "tokenrelay_token_cooldown",
            "1 while the provider is cooling down after a credential failure",
            labels=["provider"],
        )
        return expiry, cooldown

    def collect(self) -> Iterable[Metric]:
        expiry, cooldown = self._families()
        try:
            states = self.source() if self.source is not None else {}
        except Exception:  # a scrape must not fail because one source misbehaves
            states = {}
        for provider, state in states.items():
            left = state.get("seconds_left")
            if isinstance(left, int | float):
                expiry.add_metric([provider], float(left))
            cooling = state.get("state") == "cooldown" or state.get("cooldown_seconds_left")
            cooldown.add_metric([provider], 1.0 if cooling else 0.0)
        return [expiry, cooldown]


class Metrics:
    """All of tokenrelay's metrics on a registry of their own; children cached per label set."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        perf: Callable[[], float] = time.perf_counter,
        max_label_values: int = MAX_LABEL_VALUES,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._perf = perf
        self._max_values = max_label_values
        r = self.registry
        self.requests = Counter(
            "tokenrelay_requests", "Requests answered", ["route", "method", "status"], registry=r
        )
        self.duration = Histogram(
            "tokenrelay_request_duration_seconds",
            "Time from arrival to the last byte sent",
            ["route"],
            buckets=BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "tokenrelay_upstream_ttfb_seconds",
            "Time from arrival to the first upstream response byte",
            ["route"],
            buckets=BUCKETS,
            registry=r,
        )
        self.received = Counter(
            "tokenrelay_received_bytes", "Request body bytes from clients", ["route"], registry=r
        )
        self.sent = Counter(
            "tokenrelay_sent_bytes", "Response body bytes to clients", ["route"], registry=r
        )
        self.in_flight_gauge = Gauge(
            "tokenrelay_requests_in_flight", "Requests being handled", registry=r
        )
        self.token_requests = Counter(
            "tokenrelay_token_requests",
            "Calls to token endpoints",
            ["provider", "step", "outcome"],
            registry=r,
        )
        self.replays = Counter(
            "tokenrelay_replays", "Replays after an upstream 401", ["route", "outcome"], registry=r
        )
        self.upstream_errors = Counter(
            "tokenrelay_upstream_errors",
            "Upstream failures by kind",
            ["route", "kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            "tokenrelay_config_reload", "Config reloads", ["outcome"], registry=r
        )
        self._token_states = _TokenStateCollector()
        r.register(self._token_states)
        self._routes: dict[str, _RouteMetrics] = {}
        self._overflow_route: _RouteMetrics | None = None
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._token_children: dict[tuple[str, str, str], Any] = {}

    def observe(self, ex: Exchange, duration: float | None = None) -> None:
        """Every request-side metric from one finished Exchange; unknown outcomes and
        error kinds are not counted rather than given a label of their own."""
        if duration is None:
            duration = self._perf() - ex.started
        rm = self._routes.get(ex.route) or self._route(ex.route)
        status = ex.status if 0 <= ex.status < 1000 else 0
        key = (rm.label, METHODS.get(ex.method, "OTHER"), status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(key[0], key[1], status)
        child.inc()
        rm.duration.observe(duration)
        if ex.ttfb is not None:
            rm.ttfb.observe(ex.ttfb)
        if ex.bytes_in:
            rm.received.inc(ex.bytes_in)
        if ex.bytes_out:
            rm.sent.inc(ex.bytes_out)
        if ex.replay_outcome in rm.replays:
            rm.replays[ex.replay_outcome].inc()
        if ex.upstream_error in rm.errors:
            rm.errors[ex.upstream_error].inc()

    def _route(self, route: str) -> _RouteMetrics:
        if len(self._routes) < self._max_values:
            rm = self._routes[route] = _RouteMetrics(self, route or "none")
            return rm
        if self._overflow_route is None:
            self._overflow_route = _RouteMetrics(self, OVERFLOW)
        return self._overflow_route

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        self.in_flight_gauge.inc()
        try:
            yield
        finally:
            self.in_flight_gauge.dec()

    def token_event(self, event: str, fields: Mapping[str, object]) -> None:
        """Count token endpoint calls; expiry and cool-down come from ``set_token_states``."""
        if event != "token_request":
            return
        key = (
            str(fields.get("provider") or ""),
            str(fields.get("step") or ""),
            str(fields.get("outcome") or ""),
        )
        child = self._token_children.get(key)
        if child is None:
            if len(self._token_children) >= self._max_values:
                key = (OVERFLOW, OVERFLOW, OVERFLOW)
            child = self._token_children.setdefault(key, self.token_requests.labels(*key))
        child.inc()

    def set_token_states(self, states: TokenStates) -> None:
        """``states()`` maps provider to a dict with ``seconds_left`` and ``state``."""
        self._token_states.source = states

    def config_reloaded(self, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "error").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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
    ) -> None:
        out = sys.stderr if stream is None else stream
        self.access = AccessLog(log_format, out, perf)
        self.metrics = Metrics(perf=perf) if metrics is None else metrics
        self._log = stream_logger(log_format, out)
        self._perf = perf

    def request_done(self, ex: Exchange) -> None:
        duration = self._perf() - ex.started
        self.access.log(ex, duration)
        self.metrics.observe(ex, duration)

    def token_event(self, event: str, fields: Mapping[str, object]) -> None:
        log_token_event(event, fields, self._log)
        self.metrics.token_event(event, fields)

    def in_flight(self) -> AbstractContextManager[None]:
        """Wrap a request's handling: the in-flight gauge cannot drift on errors."""
        return self.metrics.in_flight()

    def set_token_states(self, states: TokenStates) -> None:
        self.metrics.set_token_states(states)

    def reload_done(self, ok: bool) -> None:
        self.metrics.config_reloaded(ok)

    def render(self) -> tuple[bytes, str]:
        return self.metrics.render()
