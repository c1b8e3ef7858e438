"""The status page in a real headless browser (Chromium through selenium): it shows what the
proxy did, its buttons work and honour the cool-down, and no secret reaches it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import Proxy, StartProxy, StartUpstream
from tests.helpers import Echo

ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "INBOUND-KEY-MARKER-5"
SECRET = "CS-SECRET-MARKER-6"
TOKEN_PREFIX = "AT-TOKEN-MARKER-"
T = TypeVar("T")


def ensure_chromium() -> None:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True
        )


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    service = Service(executable_path=shutil.which("chromedriver"))
    driver = await asyncio.to_thread(webdriver.Chrome, options=options, service=service)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def off_loop(fn: Callable[[], T]) -> T:
    """Selenium blocks: the proxy under test shares this event loop, so it runs in a thread."""
    return await asyncio.to_thread(fn)


class IdP:
    """Client credentials: the good client gets tokens, the bad one invalid_client."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        who = str(form.get("client_id"))
        self.calls[who] = self.calls.get(who, 0) + 1
        if who != "good":
            return web.json_response({"error": "invalid_client"}, status=401)
        n = self.calls[who]
        return web.json_response({"access_token": f"{TOKEN_PREFIX}{n}", "expires_in": 3600})


async def traffic(proxy: Proxy, client: aiohttp.ClientSession, echo: Echo) -> None:
    headers = {"X-Api-Key": KEY}
    for _ in range(3):
        async with client.get(proxy.url / "good" / "x", headers=headers) as r:
            assert r.status == 200
    echo.statuses = [401]  # the vendor refuses the token once: renewal, replay, 200
    async with client.get(proxy.url / "good" / "x", headers=headers) as r:
        assert r.status == 200
    async with client.get(proxy.url / "bad" / "x", headers=headers) as r:
        assert r.status == 502  # the failed login
    async with client.get(proxy.url / "nowhere", headers=headers) as r:
        assert r.status == 404


async def test_the_status_page_shows_state_acts_and_keeps_secrets(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    idp = IdP()
    idp_url = await start_upstream(idp.app())
    e, up = echo

    def provider(who: str) -> str:
        return json.dumps(
            {"grant": "client_credentials", "token_url": f"{idp_url}/token",
             "client_id": who, "client_secret": SECRET, "client_auth": "body"}
        )  # fmt: skip

    proxy = await start_proxy(
        f"clients:\n  - {{id: bi, key: {KEY}}}\n"
        f"providers:\n  good: {provider('good')}\n  bad: {provider('bad')}\n"
        f"routes:\n  - {{prefix: /good/, upstream: '{up}/', provider: good}}\n"
        f"  - {{prefix: /bad/, upstream: '{up}/', provider: bad}}\n"
    )
    await traffic(proxy, client, e)
    wait = WebDriverWait(browser, 20)
    await off_loop(lambda: browser.get(str(proxy.url / "-" / "")))

    def loaded(d: Any) -> bool:
        return bool(d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "yes")

    await off_loop(lambda: wait.until(loaded))

    def row(table: str, key: str, value: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, f'#{table} tr[data-{key}="{value}"]').text)

    good = await off_loop(lambda: row("providers", "provider", "good"))
    bad = await off_loop(lambda: row("providers", "provider", "bad"))
    assert "valid" in good and "client_credentials / body" in good and "after 401" in good
    assert "cooldown" in bad and "invalid_client" in bad
    route = await off_loop(lambda: row("routes", "route", "/good/"))
    assert "1 / 0 / 0" in route  # one replay that succeeded
    errors = await off_loop(lambda: browser.find_element(By.ID, "errors").text)
    assert "token-unavailable" in errors and "no-route" in errors
    ARTIFACTS.mkdir(exist_ok=True)
    await off_loop(lambda: browser.save_screenshot(str(ARTIFACTS / "status.png")))

    calls = idp.calls["good"]

    def click(provider_name: str, action: str) -> str:
        sel = f'button[data-provider="{provider_name}"][data-action="{action}"]'
        browser.find_element(By.CSS_SELECTOR, sel).click()
        wait.until(ec.alert_is_present())
        browser.switch_to.alert.accept()
        wait.until(lambda d: provider_name in d.find_element(By.ID, "message").text)
        return str(browser.find_element(By.ID, "message").text)

    assert (await off_loop(lambda: click("good", "renew"))).endswith("done")
    assert idp.calls["good"] == calls + 1
    bad_calls = idp.calls["bad"]
    refused = await off_loop(lambda: click("bad", "renew"))
    assert "refused" in refused and idp.calls["bad"] == bad_calls  # the cool-down holds
    assert (await off_loop(lambda: click("good", "test"))).endswith("done")
    source = await off_loop(lambda: browser.page_source)
    dom = await off_loop(
        lambda: browser.find_element(By.TAG_NAME, "html").get_attribute("outerHTML")
    )
    for text in (source, dom):
        assert KEY not in text and SECRET not in text and TOKEN_PREFIX not in text


async def test_status_answers_carry_the_page_security_headers(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy("routes: []\n")
    for path in ("", "status", "status.js", "status.css"):
        async with client.get(proxy.url / "-" / path) as r:
            assert r.status == 200, path
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"


async def test_a_browser_post_without_the_page_token_is_refused(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy("providers:\n  p: {grant: static, token: t0k}\n")
    renew = proxy.url / "-" / "tokens" / "p" / "renew"
    async with client.post(renew, headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
    async with client.post(renew, headers={"Sec-Fetch-Site": "cross-site"}) as r:
        assert r.status == 403
    async with client.get(proxy.url / "-" / "") as r:
        page = await r.text()
    token = page.split('name="tokenrelay-csrf" content="')[1].split('"')[0]
    same = {"Origin": str(proxy.url), "Sec-Fetch-Site": "same-origin", "X-CSRF-Token": token}
    async with client.post(renew, headers=same) as r:
        assert r.status == 200
    async with client.post(renew) as r:  # curl: no browser, no CSRF to defend against
        assert r.status == 200
