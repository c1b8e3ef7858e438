"""The demo vendor over real sockets, and the ``make run`` launcher around it."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import demo_run
from proxy.demo import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_PASSWORD,
    DEMO_USERNAME,
    VENDOR,
    DemoCredentials,
    demo_app,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def vendor(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], clock: FakeClock
) -> Client:
    return await aiohttp_client(demo_app(60, clock=clock, refresh_lifetime=600))


async def login(client: Client, password: str = DEMO_PASSWORD) -> tuple[int, dict[str, Any]]:
    form = {"username": DEMO_USERNAME, "password": password}
    async with client.post("/auth/password", data=form) as resp:
        return resp.status, await resp.json()


async def refresh(client: Client, refresh_token: str) -> tuple[int, dict[str, Any]]:
    async with client.post("/auth/refresh", data={"refresh_token": refresh_token}) as resp:
        return resp.status, await resp.json()


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


async def client_credentials(
    client: Client, headers: dict[str, str], form: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with client.post("/oauth/token", headers=headers, data=form) as resp:
        return resp.status, await resp.json()


async def call(
    client: Client, token: str | None, path: str = "/api/hello", method: str = "GET", **kw: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.request(method, path, headers=headers, **kw) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


# ---------------------------------------------------------------------------
# Simacan dialect


async def test_password_login_answers_simacan_shape(vendor: Client) -> None:
    status, body = await login(vendor)
    assert status == 200
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == "60"  # a string, as Simacan sends it
    assert body["access_token"] and body["refresh_token"]
    assert body["access_token"] != body["refresh_token"]


async def test_wrong_password_is_401_and_does_not_echo_it(vendor: Client) -> None:
    status, body = await login(vendor, password="not-the-password")
    assert status == 401
    assert body["error"] == "invalid_grant"
    assert "not-the-password" not in json.dumps(body)


async def test_login_without_fields_is_400(vendor: Client) -> None:
    async with vendor.post("/auth/password", data={"username": DEMO_USERNAME}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_refresh_rotates_and_kills_the_old_refresh_token(vendor: Client) -> None:
    _, first = await login(vendor)
    status, second = await refresh(vendor, first["refresh_token"])
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    status, again = await refresh(vendor, first["refresh_token"])
    assert status == 401
    assert again["error"] == "invalid_grant"
    status, third = await refresh(vendor, second["refresh_token"])
    assert status == 200
    _, echo, _ = await call(vendor, third["access_token"])
    assert echo["token"]["number"] == 3
    assert echo["token"]["grant"] == "refresh"
    assert echo["vendor"]["logins"] == 1
    assert echo["vendor"]["refreshes"] == 2


async def test_refresh_token_expires(vendor: Client, clock: FakeClock) -> None:
    _, pair = await login(vendor)
    clock.now += 600
    status, _ = await refresh(vendor, pair["refresh_token"])
    assert status == 401


async def test_refresh_without_field_is_400(vendor: Client) -> None:
    async with vendor.post("/auth/refresh", data={}) as resp:
        assert resp.status == 400


# ---------------------------------------------------------------------------
# client credentials


async def test_client_credentials_by_basic_auth(vendor: Client) -> None:
    headers = {"Authorization": basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)}
    form = {"grant_type": "client_credentials", "scope": "read write"}
    status, body = await client_credentials(vendor, headers, form)
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 60
    assert body["scope"] == "read write"
    assert "refresh_token" not in body
    _, echo, _ = await call(vendor, body["access_token"])
    assert echo["token"]["grant"] == "client_credentials"
    assert echo["vendor"]["client_credentials"] == 1


async def test_client_credentials_in_body(vendor: Client) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
    }
    status, _ = await client_credentials(vendor, {}, form)
    assert status == 200


@pytest.mark.parametrize(
    ("headers", "form", "status", "error"),
    [
        pytest.param(
            {"Authorization": basic(DEMO_CLIENT_ID, "wrong")},
            {"grant_type": "client_credentials"},
            401,
            "invalid_client",
            id="wrong-secret",
        ),
        pytest.param({}, {"grant_type": "client_credentials"}, 401, "invalid_client", id="none"),
        pytest.param(
            {"Authorization": "Basic !!not-base64"},
            {"grant_type": "client_credentials"},
            401,
            "invalid_client",
            id="garbled-basic",
        ),
        pytest.param(
            {"Authorization": basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)},
            {"grant_type": "password"},
            400,
            "unsupported_grant_type",
            id="wrong-grant",
        ),
        pytest.param(
            {"Authorization": basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)},
            {"grant_type": "client_credentials", "client_id": DEMO_CLIENT_ID},
            400,
            "invalid_request",
            id="two-ways",
        ),
    ],
)
async def test_client_credentials_refusals(
    vendor: Client, headers: dict[str, str], form: dict[str, str], status: int, error: str
) -> None:
    got, body = await client_credentials(vendor, headers, form)
    assert (got, body["error"]) == (status, error)
    assert "access_token" not in body


# ---------------------------------------------------------------------------
# the protected API


async def test_missing_token_is_401_with_json_and_challenge(vendor: Client) -> None:
    status, body, headers = await call(vendor, None)
    assert status == 401
    assert body["error"] == "invalid_request"
    assert headers["WWW-Authenticate"].startswith("Bearer ")


async def test_unknown_token_is_401(vendor: Client) -> None:
    status, body, headers = await call(vendor, "made-up")
    assert status == 401
    assert body == {"error": "invalid_token", "error_description": "unknown token"}
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_token_expires_with_the_clock(vendor: Client, clock: FakeClock) -> None:
    _, pair = await login(vendor)
    clock.now += 59.9
    status, _, _ = await call(vendor, pair["access_token"])
    assert status == 200
    clock.now += 0.1
    status, body, _ = await call(vendor, pair["access_token"])
    assert status == 401
    assert body["error_description"] == "token expired"


async def test_echo_reports_request_and_token_generation(vendor: Client, clock: FakeClock) -> None:
    _, pair = await login(vendor)
    clock.now += 12
    payload = os.urandom(3 * 1024 * 1024)  # above aiohttp's 1 MiB client_max_size: streamed
    status, echo, _ = await call(
        vendor, pair["access_token"], "/api/things/a%2Fb?x=1&x=2&y=%20", "PUT", data=payload
    )
    assert status == 200
    assert echo["method"] == "PUT"
    assert echo["raw_path"] == "/api/things/a%2Fb"
    assert echo["path"] == "/api/things/a/b"
    assert echo["query"] == "x=1&x=2&y=%20"
    assert echo["body"] == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert echo["token"]["number"] == 1
    assert echo["token"]["summary"] == (
        "token #1 (password grant), issued 12 s ago, expires in 48 s"
    )


@pytest.mark.parametrize("framing", ["Content-Length: 1000000", "Transfer-Encoding: chunked"])
def test_upload_cut_short_is_counted_without_a_traceback(
    framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What a proxy refusing an over-limit upload does to the vendor (as ``make run`` serves
    it): the sender resets the connection mid-body. The console must not show what looks
    like a crash."""
    app = demo_app(60)
    vendor = demo_run.DemoVendor(app)
    port = vendor.start()
    try:
        form = urllib.parse.urlencode({"username": DEMO_USERNAME, "password": DEMO_PASSWORD})
        login = urllib.request.Request(f"http://127.0.0.1:{port}/auth/password", form.encode())
        with urllib.request.urlopen(login, timeout=10) as resp:
            token = json.load(resp)["access_token"]
        head = f"POST /api/up HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n"
        chunk = b"1000\r\n" if "chunked" in framing else b""
        with caplog.at_level(logging.DEBUG):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"{head}{framing}\r\n\r\n".encode() + chunk + b"a" * 4096)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            counters = app[VENDOR].counters
            deadline = time.monotonic() + 10  # a bound on the wait, not a timing assertion
            while counters.uploads_cut == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert counters.uploads_cut == 1
        assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
    finally:
        vendor.stop()


async def test_echo_never_shows_credentials(vendor: Client) -> None:
    _, pair = await login(vendor)
    headers = {"Authorization": f"Bearer {pair['access_token']}", "X-Api-Key": "client-key"}
    async with vendor.get("/api/x", headers={**headers, "X-Trace": "t1"}) as resp:
        text = await resp.text()
    assert pair["access_token"] not in text
    assert "client-key" not in text
    assert json.loads(text)["headers"]["X-Trace"] == "t1"


async def test_expire_now_revokes_access_tokens_but_refresh_still_works(vendor: Client) -> None:
    _, pair = await login(vendor)
    async with vendor.post("/api/-/expire-now") as resp:
        assert await resp.json() == {"revoked_access_tokens": 1, "revoked_refresh_tokens": 0}
    status, body, _ = await call(vendor, pair["access_token"])
    assert (status, body["error_description"]) == (401, "token revoked")
    status, renewed = await refresh(vendor, pair["refresh_token"])
    assert status == 200
    status, _, _ = await call(vendor, renewed["access_token"])
    assert status == 200


async def test_expire_now_with_refresh_forces_a_new_login(vendor: Client) -> None:
    _, pair = await login(vendor)
    async with vendor.post("/api/-/expire-now?refresh=true") as resp:
        assert await resp.json() == {"revoked_access_tokens": 1, "revoked_refresh_tokens": 1}
    status, _ = await refresh(vendor, pair["refresh_token"])
    assert status == 401
    status, _ = await login(vendor)
    assert status == 200


async def test_custom_credentials(aiohttp_client: MakeClient) -> None:
    creds = DemoCredentials.from_env({"DEMO_USERNAME": "demo", "DEMO_PASSWORD": "other"})
    client = await aiohttp_client(demo_app(credentials=creds))
    assert (await login(client))[0] == 401
    assert (await login(client, password="other"))[0] == 200
    assert "other" not in repr(creds)


def test_lifetime_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        demo_app(0)


# ---------------------------------------------------------------------------
# the make-run launcher

ROUTES = """
listen: {host: 127.0.0.1, port: 18080}
providers:
  demo:
    preset: simacan
    auth_base: http://127.0.0.1:${DEMO_PORT:-8099}
    username: ${DEMO_USERNAME:-demo}
    password: ${DEMO_PASSWORD:-demo-password}
  demo-cc:
    grant: client_credentials
    token_url: http://127.0.0.1:${DEMO_PORT:-8099}/oauth/token
    client_id: ${DEMO_CLIENT_ID:-demo-client}
    client_secret: ${DEMO_CLIENT_SECRET:-demo-secret}
routes:
  - {prefix: /demo/, upstream: "http://127.0.0.1:${DEMO_PORT:-8099}", provider: demo}
  - {prefix: /demo-cc/, upstream: "http://127.0.0.1:${DEMO_PORT:-8099}/api", provider: demo-cc}
  - {prefix: /elsewhere/, upstream: "http://127.0.0.1:9/api", provider: demo}
"""


@pytest.fixture
def routes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("DEMO_USERNAME", "DEMO_PASSWORD", "DEMO_CLIENT_ID", "DEMO_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DEMO_PORT", "0")  # restored after the test; main() overwrites it
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    return path


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_launcher_runs_vendor_around_the_proxy(
    routes_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_proxy(argv: list[str]) -> int:
        port = int(os.environ["DEMO_PORT"])
        form = urllib.parse.urlencode({"username": "demo", "password": "demo-password"})
        url = f"http://127.0.0.1:{port}/auth/password"
        with urllib.request.urlopen(url, data=form.encode(), timeout=10) as resp:
            seen.update(argv=argv, port=port, login=json.load(resp))
        return 7

    argv = ["--demo-port", "0", "--config", str(routes_file), "--log-format", "console"]
    assert demo_run.main(argv, proxy_main=fake_proxy) == 7
    assert seen["argv"] == ["--config", str(routes_file), "--log-format", "console"]
    assert seen["login"]["token_type"] == "bearer"
    assert "curl -s http://127.0.0.1:18080/demo/api/hello" in capsys.readouterr().out
    assert refused(seen["port"])


def test_launcher_stops_vendor_when_the_proxy_crashes(routes_file: Path) -> None:
    ports: list[int] = []

    def crashing_proxy(argv: list[str]) -> int:
        ports.append(int(os.environ["DEMO_PORT"]))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        demo_run.main(["--config", str(routes_file)], proxy_main=crashing_proxy)
    assert refused(ports[0])


def test_launcher_reports_a_taken_port(
    routes_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = demo_run.main(["--demo-port", str(port)], proxy_main=lambda argv: 0)
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_hint_names_each_route_to_the_vendor(
    routes_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEMO_PORT", "8099")
    line = demo_run.hint(["--config", str(routes_file), "--host", "0.0.0.0"], 8099, 60)
    assert "\n" not in line
    assert "tokens live 60 s" in line
    assert "curl -s http://localhost:18080/demo/api/hello" in line
    assert "curl -s http://localhost:18080/demo-cc/hello" in line
    assert "curl -s -X POST http://localhost:18080/demo/api/-/expire-now" in line
    assert "elsewhere" not in line


def test_hint_without_a_readable_config_falls_back(tmp_path: Path) -> None:
    line = demo_run.hint(["--config", str(tmp_path / "missing.yaml"), "--port", "9000"], 8099, 5)
    assert "curl -s http://127.0.0.1:9000/demo/api/hello" in line


# ---------------------------------------------------------------------------
# end to end: make run, with the real proxy (once proxy.cli exists)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_ready(url: str, proc: subprocess.Popen[str], deadline: float = 20.0) -> None:
    """Poll readiness: start-up time is not asserted, only bounded."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {deadline} s")


@pytest.fixture
def demo_stack(routes_file: Path) -> Iterator[str]:
    port, env = free_port(), {**os.environ, "DEMO_PORT": str(free_port())}
    argv = ["--config", str(routes_file), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo_run", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/-/ready", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise


def proxy_missing() -> str:
    """Why the real proxy cannot run yet (it is written alongside), or "" when it can."""
    try:
        importlib.import_module("proxy.cli")
    except ImportError as exc:
        return f"proxy.cli is not importable yet: {exc}"
    return ""


@pytest.mark.skipif(bool(proxy_missing()), reason=proxy_missing() or "-")
def test_make_run_shows_injection_refresh_and_replay(demo_stack: str) -> None:
    status, echo = get_json(f"{demo_stack}/demo/api/hello")
    assert status == 200, echo
    assert echo["token"]["grant"] == "password"
    status, revoked = get_json(f"{demo_stack}/demo/api/-/expire-now", "POST")
    assert revoked["revoked_access_tokens"] == 1
    status, echo = get_json(f"{demo_stack}/demo/api/hello")
    assert status == 200, echo  # the proxy saw 401, refreshed and replayed
    assert echo["token"]["grant"] == "refresh"
    assert echo["vendor"]["logins"] == 1, "refreshed, not logged in again"
    status, echo = get_json(f"{demo_stack}/demo-cc/hello")
    assert status == 200, echo
    assert echo["token"]["grant"] == "client_credentials"
