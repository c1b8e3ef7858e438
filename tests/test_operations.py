"""What an operator sees: request ids end to end, one access line per request, metrics."""

from __future__ import annotations

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from tests.conftest import Proxy, StartProxy
from tests.helpers import Echo, provider_json
from tests.vendors import Simacan, serve


def samples(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = proxy.runtime.observer.render()[0].decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(proxy: Proxy, name: str, **labels: str) -> float:
    return samples(proxy).get((name, tuple(sorted(labels.items()))), 0.0)


def access_lines(proxy: Proxy) -> list[dict[str, object]]:
    lines = [orjson.loads(line) for line in proxy.log_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "access"]


async def test_request_id_flows_through(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    e, up = echo
    proxy = await start_proxy(f"routes:\n  - {{prefix: /e/, upstream: '{up}/'}}\n")
    async with client.get(proxy.url / "e" / "x", headers={"X-Request-Id": "req-42"}) as resp:
        assert resp.headers["X-Request-Id"] == "req-42"
    assert e.seen[0].header("X-Request-Id") == "req-42"
    async with client.get(proxy.url / "nope", headers={"X-Request-Id": "bad id\u00e9"}) as resp:
        body = orjson.loads(await resp.read())
        fresh = resp.headers["X-Request-Id"]
    assert fresh != "bad id\u00e9" and body["request_id"] == fresh
    lines = access_lines(proxy)
    assert [line["request_id"] for line in lines] == ["req-42", fresh]
    assert lines[0]["status"] == 200 and lines[1]["status"] == 404


async def test_metrics_follow_traffic_replay_renewal_and_failed_login(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with serve(Simacan()) as vendor:
        proxy = await start_proxy(f"""
providers:
  s: {provider_json(vendor, cooldown=30)}
routes:
  - {{prefix: /s/, upstream: "{vendor.url}/", provider: s}}
  - {{prefix: /down/, upstream: "http://127.0.0.1:9/"}}
""")
        async with client.post(
            (proxy.url / "s" / "api" / "a").with_query(secret="1"), data=b"12345"
        ) as r:
            assert r.status == 200
            size = len(await r.read())
        route = {"route": "/s/"}
        assert value(proxy, "tokenrelay_requests_total", method="POST", status="200", **route) == 1
        assert value(proxy, "tokenrelay_received_bytes_total", **route) == 5
        assert value(proxy, "tokenrelay_sent_bytes_total", **route) == size
        assert (
            value(
                proxy,
                "tokenrelay_token_requests_total",
                provider="s",
                step="login",
                outcome="success",
            )
            == 1
        )
        assert value(proxy, "tokenrelay_token_expiry_seconds", provider="s") > 3000
        assert value(proxy, "tokenrelay_requests_in_flight") == 0

        vendor.revoke_all()
        async with client.get(proxy.url / "s" / "api" / "b") as r:
            assert r.status == 200
        assert value(proxy, "tokenrelay_replays_total", outcome="succeeded", **route) == 1
        assert (
            value(
                proxy,
                "tokenrelay_token_requests_total",
                provider="s",
                step="refresh",
                outcome="success",
            )
            == 1
        )

        vendor.revoke_all()
        vendor.refuse_refresh = True
        vendor.fail_next(401, {"error": "invalid_grant"}, endpoint="password")
        async with client.get(proxy.url / "s" / "api" / "c") as r:
            assert r.status == 502  # no new token could be had: the provider's error, named
            assert (await r.json())["provider_error"] == "invalid_grant"
        assert value(proxy, "tokenrelay_token_cooldown", provider="s") == 1
        assert (
            value(
                proxy,
                "tokenrelay_token_requests_total",
                provider="s",
                step="login",
                outcome="error",
            )
            == 1
        )

        async with client.get(proxy.url / "down" / "x") as r:
            assert r.status == 502
        assert value(proxy, "tokenrelay_upstream_errors_total", route="/down/", kind="connect") == 1
        lines = access_lines(proxy)
        assert len(lines) == 4
        assert all("secret=1" not in str(line["path"]) for line in lines)
        assert lines[1]["replayed"] is True and lines[1]["replay_outcome"] == "succeeded"


async def test_reload_keeps_unchanged_tokens_and_inflight_streams(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    from proxy.config import parse_config
    from tests.vendors import Simplifi

    e, up = echo
    async with serve(Simplifi()) as keep, serve(Simplifi()) as change:

        def text(change_scope: str, prefix: str) -> str:
            return f"""
providers:
  keep: {provider_json(keep)}
  change: {provider_json(change, scope=change_scope)}
routes:
  - {{prefix: {prefix}, upstream: "{up}/", provider: keep}}
  - {{prefix: /c/, upstream: "{up}/", provider: change}}
"""

        proxy = await start_proxy(text("read", "/old/"))
        rt = proxy.runtime
        async with client.get(proxy.url / "c" / "x") as r:
            assert r.status == 200
        stream = await client.get(proxy.url / "old" / "gate")
        await e.stream_gate.put(b"before;")
        assert await stream.content.readexactly(7) == b"before;"

        async def reloader() -> object:
            return parse_config(text("read write", "/new/"), "test.yaml", {})

        rt.reloader = reloader  # type: ignore[assignment]
        await rt.reload()
        await e.stream_gate.put(b"after;")
        await e.stream_gate.put(None)
        assert await stream.content.read() == b"after;"  # finished on the old routes
        stream.close()
        async with client.get(proxy.url / "new" / "x") as r:
            assert r.status == 200
        async with client.get(proxy.url / "old" / "x") as r:
            assert r.status == 404
        async with client.get(proxy.url / "c" / "x") as r:
            assert r.status == 200
        assert keep.calls["token"] == 1  # unchanged provider: no new login
        assert change.calls["token"] == 2  # changed settings: rebuilt


async def test_admin_tokens_renew_and_separate_listener(
    echo: tuple[Echo, URL], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    from tests.vendors import Simplifi

    _, up = echo
    async with serve(Simplifi()) as vendor:
        proxy = await start_proxy(f"""
admin: {{host: 127.0.0.1, port: 0}}
providers:
  v: {provider_json(vendor)}
routes:
  - {{prefix: /v/, upstream: "{up}/", provider: v}}
""")
        assert proxy.admin_url is not None
        async with client.get(proxy.url / "-" / "tokens") as r:
            assert r.status == 404  # admin paths live on the admin listener only
        async with client.get(proxy.url / "v" / "x") as r:
            assert r.status == 200
        async with client.get(proxy.admin_url / "-" / "tokens") as r:
            state = await r.json()
        assert state["v"]["state"] == "valid" and state["v"]["seconds_left"] > 0
        async with client.post(proxy.admin_url / "-" / "tokens" / "v" / "renew") as r:
            assert r.status == 200
        assert vendor.calls["token"] == 2
        async with client.get(proxy.admin_url / "-" / "metrics") as r:
            assert "tokenrelay_requests_total" in await r.text()
        issued = " ".join(t.value for t in vendor.issued)
        assert all(t.value not in str(state) for t in vendor.issued), issued[:0]
