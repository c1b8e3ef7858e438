"""Inbound client keys: 401 without a valid key, 403 off its routes, 429 over its rate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import orjson
import pytest
from yarl import URL

from proxy.access import ClientAccess, TokenBucket, parse_rate
from proxy.config import Client, parse_config
from proxy.problems import Forbidden, TooManyRequests, Unauthorized
from tests.conftest import StartProxy
from tests.helpers import Echo

KEY_A = "key-A-3f9c2d7e1b"
KEY_B = "key-B-8a6e4c0f2d"
KEY_C = "key-C-from-a-file-55"
HDR = "X-Api-Key"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def clients_yaml(key_file: Path, up: str = "http://127.0.0.1:9") -> str:
    digest = hashlib.sha256(KEY_A.encode()).hexdigest()
    return f"""
clients:
  - id: alpha
    key_sha256: {digest}
    routes: [/svc/]
    rate: 2/s
    burst: 2
  - id: beta
    key: "{KEY_B}"
  - id: gamma
    key_file: {key_file}
    routes: [/svc/reports]
routes:
  - prefix: /svc/
    upstream: {up}/base/
  - prefix: /svc/reports/
    upstream: {up}/reports/
  - prefix: /other/
    upstream: {up}/o/
"""


def access_for(tmp_path: Path, clock: FakeClock) -> ClientAccess:
    key_file = tmp_path / "gamma.key"
    key_file.write_text(KEY_C + "\n")
    loaded = parse_config(clients_yaml(key_file), "t.yaml", {}, tmp_path)
    return ClientAccess(loaded.config.clients, clock=clock)


def test_open_when_no_clients() -> None:
    access = ClientAccess([])
    assert access.open
    assert access.check({}, "/svc/", HDR) == ""


def test_keys_in_all_three_forms(tmp_path: Path) -> None:
    access = access_for(tmp_path, FakeClock())
    assert access.check({HDR: KEY_A}, "/svc/", HDR) == "alpha"
    assert access.check({HDR: KEY_B}, "/other/", HDR) == "beta"
    assert access.check({HDR: KEY_C}, "/svc/reports/", HDR) == "gamma"


@pytest.mark.parametrize("headers", [{}, {HDR: ""}, {HDR: KEY_A + "x"}, {"X-Other": KEY_A}])
def test_missing_or_wrong_key_is_401(tmp_path: Path, headers: dict[str, str]) -> None:
    access = access_for(tmp_path, FakeClock())
    with pytest.raises(Unauthorized) as info:
        access.check(headers, "/svc/", HDR)
    assert info.value.status == 401
    assert KEY_A not in str(info.value.detail)


def test_route_permissions_at_segment_boundaries(tmp_path: Path) -> None:
    access = access_for(tmp_path, FakeClock())
    for prefix in ("/other/", "/svcx/"):
        with pytest.raises(Forbidden):
            access.check({HDR: KEY_A}, prefix, HDR)
    assert access.check({HDR: KEY_A}, "/svc/inner/", HDR) == "alpha"
    with pytest.raises(Forbidden) as info:
        access.check({HDR: KEY_C}, "/svc/", HDR)
    assert info.value.status == 403


def test_rate_limit_token_bucket(tmp_path: Path) -> None:
    clock = FakeClock()
    access = access_for(tmp_path, clock)
    ok = {HDR: KEY_A}
    assert access.check(ok, "/svc/", HDR) == "alpha"
    assert access.check(ok, "/svc/", HDR) == "alpha"
    with pytest.raises(TooManyRequests) as info:
        access.check(ok, "/svc/", HDR)
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "1"
    assert access.check({HDR: KEY_B}, "/svc/", HDR) == "beta"  # buckets are per client
    clock.now += 0.5
    assert access.check(ok, "/svc/", HDR) == "alpha"
    with pytest.raises(TooManyRequests):
        access.check(ok, "/svc/", HDR)
    clock.now += 60
    assert [access.check(ok, "/svc/", HDR) for _ in range(2)] == ["alpha", "alpha"]
    with pytest.raises(TooManyRequests):  # burst caps what an idle minute saves up
        access.check(ok, "/svc/", HDR)


def test_a_reload_keeps_the_buckets_of_unchanged_clients(tmp_path: Path) -> None:
    clock = FakeClock()
    key_file = tmp_path / "gamma.key"
    key_file.write_text(KEY_C + "\n")
    before = ClientAccess(
        parse_config(clients_yaml(key_file), "t.yaml", {}, tmp_path).config.clients, clock=clock
    )
    ok = {HDR: KEY_A}
    assert [before.check(ok, "/svc/", HDR) for _ in range(2)] == ["alpha", "alpha"]
    same = parse_config(clients_yaml(key_file), "t.yaml", {}, tmp_path).config.clients
    after = ClientAccess(same, clock=clock, previous=before)
    with pytest.raises(TooManyRequests):  # the burst was spent before the reload
        after.check(ok, "/svc/", HDR)
    faster = clients_yaml(key_file).replace("burst: 2", "burst: 3")
    changed = parse_config(faster, "t.yaml", {}, tmp_path).config.clients
    rebuilt = ClientAccess(changed, clock=clock, previous=after)
    assert [rebuilt.check(ok, "/svc/", HDR) for _ in range(3)] == ["alpha"] * 3  # new limits


def test_bucket_and_rates() -> None:
    assert parse_rate("50/s") == 50.0
    assert parse_rate("600/m") == 10.0
    assert parse_rate("1800/h") == 0.5
    with pytest.raises(ValueError):
        parse_rate("fast")
    clock = FakeClock()
    bucket = TokenBucket(0.5, 1, clock)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(2.0)
    clock.now -= 100  # a clock stepping back never mints tokens
    assert bucket.take() == pytest.approx(2.0)


def test_no_key_in_repr(tmp_path: Path) -> None:
    access = access_for(tmp_path, FakeClock())
    text = repr(access.__dict__) + repr(Client(id="x", key=KEY_B))
    digest = hashlib.sha256(KEY_A.encode()).digest()
    for secret in (KEY_A, KEY_B, KEY_C, repr(digest)):
        assert secret not in text


async def test_end_to_end(echo: tuple[Echo, URL], start_proxy: StartProxy, tmp_path: Path) -> None:
    e, up = echo
    key_file = tmp_path / "gamma.key"
    key_file.write_text(KEY_C)
    clock = FakeClock()
    proxy = await start_proxy(clients_yaml(key_file, str(up)), clock=clock)
    async with aiohttp.ClientSession() as client:

        async def call(path: str, key: str | None) -> tuple[int, dict[str, object], str]:
            headers = {HDR: key} if key is not None else {}
            async with client.get(proxy.url.with_path(path), headers=headers) as resp:
                body = orjson.loads(await resp.read())
                return resp.status, body, resp.headers.get("Retry-After", "")

        status, body, _ = await call("/svc/a", None)
        assert (status, body["type"]) == (401, "https://tokenrelay.dev/problems/unauthorized")
        assert (await call("/svc/a", "nope"))[0] == 401
        assert (await call("/other/a", KEY_A))[0] == 403
        assert (await call("/svc/a", KEY_A))[0] == 200
        assert (await call("/svc/b", KEY_A))[0] == 200
        status, body, retry = await call("/svc/c", KEY_A)
        assert (status, retry) == (429, "1")
        clock.now += 1  # two more at 2/s: both spent
        assert [(await call(p, KEY_A))[0] for p in ("/svc/d", "/svc/e")] == [200, 200]

        async def same_config() -> object:
            return parse_config(clients_yaml(key_file, str(up)), "t.yaml", {}, tmp_path)

        proxy.runtime.reloader = same_config  # type: ignore[assignment]
        await proxy.runtime.reload()
        assert (await call("/svc/f", KEY_A))[0] == 429  # a reload hands out no fresh burst
        assert (await call("/other/x", KEY_B))[0] == 200
    assert [s.raw_path for s in e.seen] == ["/base/a", "/base/b", "/base/d", "/base/e", "/o/x"]
    assert all(s.header(HDR) is None for s in e.seen)  # the key stays at the proxy
    logs = proxy.log_text()
    assert '"client_id":"alpha"' in logs and '"client_id":"beta"' in logs
    for secret in (KEY_A, KEY_B, KEY_C):
        assert secret not in logs
