"""Request ids, access lines, redaction, token events and metrics, checked from the outside:
parsed log lines and parsed Prometheus exposition text."""

from __future__ import annotations

import io
import json
import logging
import re
import string
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from aiohttp import ClientSession, web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.forward.exchange import Exchange
from proxy.observability import (
    AccessLog,
    Metrics,
    Observer,
    configure_logging,
    log_token_event,
    redact,
    request_id_from,
    stream_logger,
)

SANE = re.compile(r"[\x21-\x7e]{1,128}")
ACCESS_FIELDS = {
    "time", "level", "event", "request_id", "client", "method", "route", "path", "status",
    "upstream_status", "duration_ms", "ttfb_ms", "bytes_in", "bytes_out", "replayed",
    "replay_outcome", "provider", "client_id", "error", "upstream_error",
}  # fmt: skip
SECRET_KEYS = [
    "authorization", "cookie", "set-cookie", "password", "client_secret", "secret", "token",
    "access_token", "refresh_token", "key", "api_key",
]  # fmt: skip


class FakePerf:
    """perf_counter stand-in: tests set the time instead of sleeping."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exchange(**kw: Any) -> Exchange:
    base: dict[str, Any] = {
        "request_id": "rid-1",
        "method": "GET",
        "path": "/api/v1/items",
        "client": "127.0.0.1",
        "started": 99.75,
        "route": "/api",
        "provider": "simacan",
        "status": 200,
        "upstream_status": 200,
    }
    return Exchange(**(base | kw))


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics | Observer) -> Samples:
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


# -- request ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [None, "", "a b", 'a"b', "a'b", "a\\b", "x" * 129, "é", "a\tb", "a\r\nX-Evil: 1", "\x7f"],
)
def test_unusable_request_ids_replaced(bad: str | None) -> None:
    rid = request_id_from(bad)
    assert rid != bad and re.fullmatch(r"[0-9a-f]{32}", rid)


@pytest.mark.parametrize("good", ["a", "x" * 128, "req-42_abc.DEF:9/+=", "0f8fad5b-d9cb-469f"])
def test_sane_request_ids_kept(good: str) -> None:
    assert request_id_from(good) == good


def test_generated_request_ids_differ() -> None:
    assert len({request_id_from(None) for _ in range(100)}) == 100


@given(st.text(max_size=200))
def test_any_returned_request_id_is_sane(header: str) -> None:
    rid = request_id_from(header)
    assert SANE.fullmatch(rid) and not set(rid) & set("\"'\\")


@given(st.text(alphabet=sorted(set(map(chr, range(0x21, 0x7F))) - set("\"'\\")), min_size=1,
               max_size=128))  # fmt: skip
def test_every_sane_request_id_preserved(header: str) -> None:
    assert request_id_from(header) == header


# -- access log ----------------------------------------------------------------


def test_access_line_json_fields() -> None:
    buf = io.StringIO()
    log = AccessLog("json", buf, perf=FakePerf(100.0))
    log.log(exchange(ttfb=0.125, bytes_in=10, bytes_out=2048, client_id="legacy-erp"))
    (line,) = lines(buf)
    assert set(line) == ACCESS_FIELDS
    assert line["event"] == "access" and line["level"] == "info"
    assert line["request_id"] == "rid-1" and line["method"] == "GET"
    assert line["route"] == "/api" and line["path"] == "/api/v1/items"
    assert line["status"] == 200 and line["upstream_status"] == 200
    assert line["duration_ms"] == 250.0 and line["ttfb_ms"] == 125.0
    assert line["bytes_in"] == 10 and line["bytes_out"] == 2048
    assert line["replayed"] is False and line["client_id"] == "legacy-erp"
    when = datetime.fromisoformat(line["time"])
    assert when.utcoffset() is not None and when.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_access_line_for_failed_replayed_request() -> None:
    buf = io.StringIO()
    AccessLog("json", buf, perf=FakePerf()).log(
        exchange(
            status=502, upstream_status=0, error="connect", upstream_error="connect",
            replayed=True, replay_outcome="unauthorized_again",
        )
    )  # fmt: skip
    (line,) = lines(buf)
    assert line["ttfb_ms"] is None
    assert (line["status"], line["error"], line["upstream_error"]) == (502, "connect", "connect")
    assert line["replayed"] is True and line["replay_outcome"] == "unauthorized_again"


def test_access_duration_given_by_caller_wins() -> None:
    buf = io.StringIO()
    AccessLog("json", buf, perf=FakePerf(1e9)).log(exchange(), duration=0.0015)
    assert lines(buf)[0]["duration_ms"] == 1.5


def test_access_line_console_format() -> None:
    buf = io.StringIO()
    AccessLog("console", buf, perf=FakePerf()).log(exchange(status=404, route=""))
    text = buf.getvalue()
    assert text.count("\n") == 1 and not text.startswith("{")
    assert "access" in text and "status=404" in text and "path=/api/v1/items" in text
    assert "\x1b[" not in text, "no colour codes when not writing to a terminal"
    assert "route=" not in text and "client_id=" not in text, "empty fields say nothing"
    assert text.index("method=") < text.index("status=404") < text.index("duration_ms=")


def test_unknown_log_format_refused() -> None:
    with pytest.raises(ValueError, match="json"):
        AccessLog("xml", io.StringIO())


def test_closed_stream_does_not_break_requests() -> None:
    buf = io.StringIO()
    obs = Observer("json", stream=buf, perf=FakePerf())
    buf.close()
    obs.request_done(exchange())
    obs.token_event("token_obtained", {"provider": "p"})
    assert value(scrape(obs), "tokenrelay_requests_total", route="/api", method="GET",
                 status="200") == 1  # fmt: skip


# -- redaction -----------------------------------------------------------------


def key_variants(key: str) -> st.SearchStrategy[str]:
    return st.sampled_from([key, key.upper(), key.title(), key.replace("_", "-")])


SECRETS = st.text(alphabet=string.ascii_letters + string.digits + "-._~+/=", min_size=6,
                  max_size=40).map(lambda s: "S3CR3T" + s)  # fmt: skip


@pytest.mark.parametrize("key", [*SECRET_KEYS, "Authorization", "X-Api-Key", "Set-Cookie"])
def test_redact_masks_listed_keys(key: str) -> None:
    out = redact(None, "info", {"event": "x", key: "hunter2", "provider": "p"})
    assert out[key] == "***" and out["provider"] == "p"


def test_redact_keeps_harmless_fields() -> None:
    fields = {"event": "token_obtained", "expires_at": 1.0, "token_type": "Bearer", "step": "x"}
    assert redact(None, "info", dict(fields)) == fields


@settings(max_examples=200)
@given(secret=SECRETS, key=st.sampled_from(SECRET_KEYS).flatmap(key_variants))
def test_redacted_lines_never_contain_the_secret(secret: str, key: str) -> None:
    buf = io.StringIO()
    logger = stream_logger("json", buf)
    log_token_event(
        "token_request",
        {
            "provider": "p",
            key: secret,
            "error": f"upstream said: Bearer {secret}, try later",
            "detail": f"authorization=bearer\t{secret}",
            "headers": {key: secret, "Accept": "application/json"},
            "history": [{key: secret}, f"Bearer {secret}"],
            "cause": RuntimeError(f"401 for Bearer {secret}"),
        },
        logger,
    )
    text = buf.getvalue()
    assert secret not in text
    (line,) = lines(buf)
    assert line[key] == "***" and line["headers"][key] == "***"
    assert line["error"] == "upstream said: Bearer *** try later"
    assert line["headers"]["Accept"] == "application/json"
    assert line["cause"] == "401 for Bearer ***"


def test_configured_logging_redacts_structlog_and_stdlib(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("json", buf)
    structlog.get_logger("t").info("login", password="pw-S3CR3T", note="Bearer tok-S3CR3T")
    logging.getLogger("aiohttp.server").error("bad header Bearer tok2-S3CR3T")
    logging.getLogger("aiohttp.server").debug("below the level")
    text = buf.getvalue()
    assert "S3CR3T" not in text
    first, second = lines(buf)
    assert first["password"] == "***" and first["level"] == "info" and "time" in first
    assert second["event"] == "bad header Bearer ***" and second["level"] == "error"
    assert second["logger"] == "aiohttp.server"


def test_configured_console_logging(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("console", buf)
    structlog.get_logger().warning("reload failed", client_secret="cs-S3CR3T")
    text = buf.getvalue()
    assert "reload failed" in text and "client_secret=***" in text and "S3CR3T" not in text


def test_exception_tracebacks_are_redacted(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("json", buf)
    try:
        raise RuntimeError("sent Bearer tb-S3CR3T")
    except RuntimeError:
        structlog.get_logger().exception("failed")
    (line,) = lines(buf)
    assert "RuntimeError" in line["exception"] and "S3CR3T" not in buf.getvalue()


# -- token events --------------------------------------------------------------


def test_token_events_logged_with_fields_and_levels() -> None:
    buf = io.StringIO()
    obs = Observer("json", stream=buf)
    obs.token_event("token_obtained", {"provider": "simacan", "step": "login",
                                       "expires_at": 1700000000.0})  # fmt: skip
    obs.token_event("token_request", {"provider": "simacan", "step": "refresh",
                                      "outcome": "error", "duration": 0.2,
                                      "error": "invalid_grant"})  # fmt: skip
    obs.token_event("cooldown_entered", {"provider": "simacan", "event": "spoofed"})
    ok, failed, cooling = lines(buf)
    assert (ok["event"], ok["level"], ok["expires_at"]) == ("token_obtained", "info", 1.7e9)
    assert (failed["level"], failed["outcome"], failed["error"]) == (
        "warning",
        "error",
        "invalid_grant",
    )
    assert (cooling["event"], cooling["level"]) == ("cooldown_entered", "warning")


# -- metrics -------------------------------------------------------------------


def test_observe_counts_requests_by_route_method_status() -> None:
    m = Metrics(perf=FakePerf(100.0))
    m.observe(exchange())
    m.observe(exchange(method="POST", status=201, bytes_in=300, bytes_out=20))
    m.observe(exchange(method="POST", status=201, bytes_in=200, bytes_out=5))
    m.observe(exchange(method="BREW", status=400, route="/other"))
    m.observe(exchange(method="get", status=404, route=""))
    s = scrape(m)
    req = "tokenrelay_requests_total"
    assert value(s, req, route="/api", method="GET", status="200") == 1
    assert value(s, req, route="/api", method="POST", status="201") == 2
    assert value(s, req, route="/other", method="OTHER", status="400") == 1
    assert value(s, req, route="none", method="OTHER", status="404") == 1
    assert value(s, "tokenrelay_received_bytes_total", route="/api") == 500
    assert value(s, "tokenrelay_sent_bytes_total", route="/api") == 25
    assert value(s, "tokenrelay_request_duration_seconds_count", route="/api") == 3
    assert value(s, "tokenrelay_request_duration_seconds_sum", route="/api") == 0.75
    assert value(s, "tokenrelay_request_duration_seconds_bucket", route="/api", le="0.25") == 3
    assert value(s, "tokenrelay_request_duration_seconds_bucket", route="/api", le="0.1") == 0


def test_observe_ttfb_replays_and_upstream_errors() -> None:
    m = Metrics(perf=FakePerf())
    m.observe(exchange(ttfb=0.02, replayed=True, replay_outcome="succeeded"))
    m.observe(exchange(ttfb=0.2, replayed=True, replay_outcome="unauthorized_again"))
    m.observe(exchange(status=401, replay_outcome="body_too_large"))
    m.observe(exchange(status=502, upstream_error="connect", error="connect"))
    m.observe(exchange(status=504, upstream_error="timeout", error="timeout"))
    m.observe(exchange(status=502, upstream_error="tls"))
    m.observe(exchange(status=502, upstream_error="mystery", replay_outcome="mystery"))
    s = scrape(m)
    assert value(s, "tokenrelay_upstream_ttfb_seconds_count", route="/api") == 2
    assert value(s, "tokenrelay_upstream_ttfb_seconds_bucket", route="/api", le="0.025") == 1
    for outcome in ("succeeded", "unauthorized_again", "body_too_large"):
        assert value(s, "tokenrelay_replays_total", route="/api", outcome=outcome) == 1
    errors = "tokenrelay_upstream_errors_total"
    assert value(s, errors, route="/api", kind="connect") == 1
    assert value(s, errors, route="/api", kind="timeout") == 1
    assert value(s, errors, route="/api", kind="tls") == 1
    assert value(s, errors, route="/api", kind="reset") == 0
    labels = {v for (_, ls) in s for (_, v) in ls}
    assert "mystery" not in labels


def test_raw_paths_never_become_labels() -> None:
    m = Metrics(perf=FakePerf())
    for i in range(1000):
        m.observe(exchange(path=f"/api/users/{i}/secret-{i}", status=200 + i % 3))
    s = scrape(m)
    label_names = {k for (_, ls) in s for (k, _) in ls}
    assert label_names <= {"route", "method", "status", "le", "provider", "step", "outcome",
                           "kind", "version", "python"}  # fmt: skip
    assert not any("/users/" in v for (_, ls) in s for (_, v) in ls)
    requests = [k for k in s if k[0] == "tokenrelay_requests_total"]
    assert len(requests) == 3


def test_runaway_label_values_are_capped() -> None:
    m = Metrics(perf=FakePerf(), max_label_values=20)
    for i in range(70):
        m.observe(exchange(route=f"/r{i}"))
        m.token_event("token_request", {"provider": f"p{i}", "step": "login", "outcome": "ok"})
    s = scrape(m)
    routes = {dict(ls)["route"] for (name, ls) in s if name == "tokenrelay_requests_total"}
    assert len(routes) == 21 and "other" in routes
    assert value(s, "tokenrelay_requests_total", route="other", method="GET", status="200") == 50
    providers = {dict(ls)["provider"] for (n, ls) in s if n == "tokenrelay_token_requests_total"}
    assert len(providers) == 21
    other = {"provider": "other", "step": "other", "outcome": "other"}
    assert value(s, "tokenrelay_token_requests_total", **other) == 50


def test_in_flight_gauge_returns_to_zero_on_error() -> None:
    obs = Observer("json", stream=io.StringIO())
    with obs.in_flight(), obs.in_flight():
        assert value(scrape(obs), "tokenrelay_requests_in_flight") == 2
    with pytest.raises(ConnectionResetError), obs.in_flight():
        raise ConnectionResetError
    assert value(scrape(obs), "tokenrelay_requests_in_flight") == 0


def test_token_request_counter() -> None:
    m = Metrics()
    for outcome in ("success", "success", "error"):
        m.token_event("token_request", {"provider": "simacan", "step": "login",
                                        "outcome": outcome})  # fmt: skip
    m.token_event("token_request", {"provider": "sipsim", "step": "refresh",
                                    "outcome": "transient"})  # fmt: skip
    m.token_event("token_obtained", {"provider": "simacan", "step": "login"})
    s = scrape(m)
    name = "tokenrelay_token_requests_total"
    assert value(s, name, provider="simacan", step="login", outcome="success") == 2
    assert value(s, name, provider="simacan", step="login", outcome="error") == 1
    assert value(s, name, provider="sipsim", step="refresh", outcome="transient") == 1
    assert len([k for k in s if k[0] == name]) == 3


def test_token_gauges_read_at_scrape_time() -> None:
    m = Metrics()
    states: dict[str, Mapping[str, object]] = {
        "simacan": {"seconds_left": 1234.5, "state": "valid"},
        "sipsim": {"seconds_left": None, "state": "cooldown", "cooldown_seconds_left": 20.0},
    }
    m.set_token_states(lambda: states)
    s = scrape(m)
    assert value(s, "tokenrelay_token_expiry_seconds", provider="simacan") == 1234.5
    assert value(s, "tokenrelay_token_expiry_seconds", provider="sipsim") is None
    assert value(s, "tokenrelay_token_cooldown", provider="simacan") == 0
    assert value(s, "tokenrelay_token_cooldown", provider="sipsim") == 1
    states["simacan"] = {"seconds_left": 30.0, "state": "refreshing"}
    states["sipsim"] = {"seconds_left": 3600.0, "state": "valid", "cooldown_seconds_left": None}
    s = scrape(m)
    assert value(s, "tokenrelay_token_expiry_seconds", provider="simacan") == 30.0
    assert value(s, "tokenrelay_token_cooldown", provider="sipsim") == 0


def test_failing_state_callback_does_not_break_scrape() -> None:
    m = Metrics()

    def broken() -> dict[str, Mapping[str, object]]:
        raise RuntimeError("registry closed")

    m.set_token_states(broken)
    m.config_reloaded(True)
    s = scrape(m)
    assert not [k for k in s if k[0] == "tokenrelay_token_expiry_seconds"]
    assert value(s, "tokenrelay_config_reload_total", outcome="success") == 1


def test_reload_outcomes_counted() -> None:
    obs = Observer("json", stream=io.StringIO())
    obs.reload_done(ok=True)
    obs.reload_done(ok=False)
    obs.reload_done(ok=False)
    s = scrape(obs)
    assert value(s, "tokenrelay_config_reload_total", outcome="success") == 1
    assert value(s, "tokenrelay_config_reload_total", outcome="error") == 2


def test_observer_logs_and_counts_each_request_once() -> None:
    buf = io.StringIO()
    obs = Observer("json", stream=buf, perf=FakePerf(100.0))
    obs.request_done(exchange())
    obs.request_done(exchange(request_id="rid-2", status=503, error="token"))
    assert [line["request_id"] for line in lines(buf)] == ["rid-1", "rid-2"]
    s = scrape(obs)
    assert value(s, "tokenrelay_requests_total", route="/api", method="GET", status="503") == 1
    assert value(s, "tokenrelay_request_duration_seconds_sum", route="/api") == 0.5


def test_observers_have_separate_registries() -> None:
    a, b = Observer("json", stream=io.StringIO()), Observer("json", stream=io.StringIO())
    a.request_done(exchange())
    assert value(scrape(b), "tokenrelay_requests_total", route="/api", method="GET",
                 status="200") is None  # fmt: skip


async def test_metrics_scraped_over_http() -> None:
    obs = Observer("json", stream=io.StringIO(), perf=FakePerf())
    obs.request_done(exchange())

    async def metrics(_: web.Request) -> web.Response:
        body, ctype = obs.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    app = web.Application()
    app.router.add_get("/-/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/-/metrics") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    finally:
        await runner.cleanup()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"tokenrelay_requests", "tokenrelay_request_duration_seconds"} <= families


def test_admin_and_unrouted_series_carry_no_upstream_families() -> None:
    m = Metrics(perf=FakePerf())
    m.observe(exchange(route="/-/", status=200))
    m.observe(exchange(route="", status=404))
    m.observe(exchange(route="/api", status=200))
    s = scrape(m)
    for family in ("tokenrelay_upstream_ttfb_seconds_count", "tokenrelay_upstream_errors_total"):
        routes = {dict(ls).get("route") for (name, ls) in s if name == family}
        assert routes == {"/api"}, family
    assert value(s, "tokenrelay_requests_total", route="none", method="GET", status="404") == 1


def test_build_info_and_process_metrics_are_exported() -> None:
    from proxy import __version__

    s = scrape(Metrics(perf=FakePerf()))
    info = [dict(ls) for (name, ls) in s if name == "tokenrelay_build_info"]
    assert info and info[0]["version"] == __version__
    assert any(name == "process_resident_memory_bytes" for (name, _) in s)
