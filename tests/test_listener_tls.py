"""TLS on the listener: HTTPS clients, mutual TLS and client certificates as identities,
certificate rotation, plain HTTP on the TLS port, on both server paths.

The lean server serves a GET; a chunked POST is handed over to aiohttp's, so each request
below is sent both ways (``PATHS``).
"""

from __future__ import annotations

import asyncio
import io
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from proxy.app import create_app, start_runner
from proxy.config import parse_config
from proxy.guard import GuardedSite
from proxy.listener_tls import ServerTLS
from proxy.observability import Observer
from tests.helpers import Echo
from tests.pki import CA, Leaf

TOKEN = "tok-tls-listener-5be1"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@dataclass
class TLSProxy:
    url: URL
    runner: web.AppRunner
    app: web.Application
    logs: io.StringIO
    dir: Path
    ca: CA

    @property
    def tls(self) -> ServerTLS:
        site = next(s for s in self.runner.sites if isinstance(s, GuardedSite))
        assert site.tls is not None
        return site.tls

    def context(self, leaf: Leaf | None = None) -> ssl.SSLContext:
        return self.ca.client_context(leaf, self.dir)


StartTLSProxy = Callable[..., Awaitable[TLSProxy]]


@pytest.fixture
async def tls_proxy(ca: CA, tmp_path: Path, echo: tuple[Echo, URL]) -> AsyncIterator[StartTLSProxy]:
    """A proxy whose listener serves ``CN=localhost`` from ``server.crt``/``server.key``;
    ``tls`` adds keys under listen.tls, ``top`` top-level ones (clients, limits)."""
    runners: list[web.AppRunner] = []
    _, up = echo

    async def start(tls: str = "", top: str = "", host: str = "127.0.0.1") -> TLSProxy:
        cert, key = ca.issue().write(tmp_path, "server")
        ca.write(tmp_path / "ca.crt")
        text = (
            f"listen:\n  host: {host}\n  port: 0\n  tls:\n"
            f"    cert_file: {cert}\n    key_file: {key}\n{tls}"
            f"providers:\n  v: {{grant: static, token: {TOKEN}}}\n"
            f"routes:\n  - {{prefix: /a/, upstream: '{up}/base/', provider: v}}\n"
            f"  - {{prefix: /b/, upstream: '{up}/base/', provider: v}}\n{top}"
        )
        loaded = parse_config(text, "t.yaml", {}, tmp_path)
        logs = io.StringIO()
        app = create_app(loaded, Observer("json", stream=logs))
        runner, port = await start_runner(app, loaded.config, loaded.config.listen)
        runners.append(runner)
        return TLSProxy(URL(f"https://localhost:{port}"), runner, app, logs, tmp_path, ca)

    yield start
    for r in reversed(runners):
        await r.cleanup()


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body


PATHS = pytest.mark.parametrize("path", ["lean", "aiohttp"])


async def call(
    session: aiohttp.ClientSession, url: URL, path: str, **kwargs: Any
) -> tuple[int, Any]:
    """A GET (the lean server) or a chunked POST (handed over to aiohttp's)."""
    if path == "lean":
        resp = await session.get(url, **kwargs)
    else:
        resp = await session.post(url, data=_chunks(b"x"), **kwargs)
    async with resp:
        return resp.status, orjson.loads(await resp.read())


def header(seen: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in seen["headers"] if k.lower() == name.lower()), None)


@PATHS
async def test_https_request_is_proxied_with_the_token_and_forwarded_proto_https(
    tls_proxy: StartTLSProxy, path: str
) -> None:
    proxy = await tls_proxy()
    async with aiohttp.ClientSession() as s:
        status, seen = await call(s, proxy.url / "a/x", path, ssl=proxy.context())
    assert status == 200
    assert header(seen, "Authorization") == f"Bearer {TOKEN}"
    assert header(seen, "X-Forwarded-Proto") == "https"


async def test_handshake_offers_http11_and_tls12_at_least(tls_proxy: StartTLSProxy) -> None:
    proxy = await tls_proxy()
    ctx = proxy.context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.url.port, ssl=ctx, server_hostname="localhost"
    )
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.selected_alpn_protocol() == "http/1.1"
    assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    writer.close()
    assert proxy.tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert "RC4" not in str(proxy.tls.context.get_ciphers())


async def test_min_version_13_refuses_a_tls12_client(tls_proxy: StartTLSProxy) -> None:
    proxy = await tls_proxy(tls='    min_version: "1.3"\n')
    ctx = proxy.context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(OSError):  # an SSLError, or a reset once the server gave up
        await asyncio.open_connection(
            "127.0.0.1", proxy.url.port, ssl=ctx, server_hostname="localhost"
        )


async def _until_closed(port: int, send: bytes) -> bytes:
    """Everything the proxy sends before it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send:
            writer.write(send)
        return await reader.read()
    finally:
        writer.close()


async def test_plain_http_on_the_tls_port_is_closed_at_once(tls_proxy: StartTLSProxy) -> None:
    """Closed by the proxy itself: with a head deadline of an hour, a pass is no timeout."""
    proxy = await tls_proxy(top="limits: {header_timeout: 3600}\n")
    assert proxy.url.port is not None
    request = b"GET /a/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    async with asyncio.timeout(10):
        answer = await _until_closed(proxy.url.port, request)
    assert b"Bearer" not in answer and not answer.startswith(b"HTTP/1.1 200")


async def test_a_stalled_handshake_is_cut_by_the_head_deadline(tls_proxy: StartTLSProxy) -> None:
    proxy = await tls_proxy(top="limits: {header_timeout: 0.3}\n")
    assert proxy.url.port is not None
    async with asyncio.timeout(10):  # the 0.3 s deadline ends it; the timeout only guards
        assert await _until_closed(proxy.url.port, b"\x16\x03\x01") == b""


# --- mutual TLS


MTLS = "    client_ca_file: {dir}/ca.crt\n"


async def _mtls(tls_proxy: StartTLSProxy, tmp_path: Path, top: str = "") -> TLSProxy:
    return await tls_proxy(tls=MTLS.format(dir=tmp_path), top=top)


@PATHS
async def test_mtls_refuses_a_client_without_a_certificate(
    tls_proxy: StartTLSProxy, tmp_path: Path, ca: CA, path: str
) -> None:
    proxy = await _mtls(tls_proxy, tmp_path)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await call(s, proxy.url / "a/x", path, ssl=proxy.context())
        stranger = CA().issue("CN=bi-tool", (), client=True)  # signed by another CA
        with pytest.raises(aiohttp.ClientError):
            await call(s, proxy.url / "a/x", path, ssl=CA().client_context(stranger, tmp_path))
        leaf = ca.issue("CN=bi-tool", (), client=True)
        status, seen = await call(s, proxy.url / "a/x", path, ssl=proxy.context(leaf))
    assert status == 200 and header(seen, "Authorization") == f"Bearer {TOKEN}"


CLIENTS = """clients:
  - {id: bi, cert_subject: "CN=bi-tool,O=Acme", routes: [/a/]}
  - {id: ci, cert_san: "ci.example", routes: [/b/]}
  - {id: both, cert_san: "both.example", key: both-key-77, routes: [/]}
"""


@PATHS
async def test_a_client_named_by_its_certificate_gets_its_routes_only(
    tls_proxy: StartTLSProxy, tmp_path: Path, ca: CA, path: str
) -> None:
    proxy = await _mtls(tls_proxy, tmp_path, top=CLIENTS)
    bi = proxy.context(ca.issue("O=Acme,CN=bi-tool", (), client=True))
    ci = proxy.context(ca.issue("CN=runner-17", ("ci.example",), client=True))
    other = proxy.context(ca.issue("CN=bi-tool", (), client=True))  # not the whole subject
    async with aiohttp.ClientSession() as s:
        assert (await call(s, proxy.url / "a/x", path, ssl=bi))[0] == 200
        status, problem = await call(s, proxy.url / "b/x", path, ssl=bi)
        assert status == 403 and "client bi may not use route /b/" in problem["detail"]
        assert (await call(s, proxy.url / "b/x", path, ssl=ci))[0] == 200
        assert (await call(s, proxy.url / "a/x", path, ssl=ci))[0] == 403
        status, problem = await call(s, proxy.url / "a/x", path, ssl=other)
        assert status == 401 and "no client is identified by this certificate" in problem["detail"]


@PATHS
async def test_a_client_with_key_and_certificate_needs_both(
    tls_proxy: StartTLSProxy, tmp_path: Path, ca: CA, path: str
) -> None:
    proxy = await _mtls(tls_proxy, tmp_path, top=CLIENTS)
    both = proxy.context(ca.issue("CN=both", ("both.example",), client=True))
    bi = proxy.context(ca.issue("CN=bi-tool,O=Acme", (), client=True))
    key = {"X-Api-Key": "both-key-77"}
    async with aiohttp.ClientSession() as s:
        status, seen = await call(s, proxy.url / "b/x", path, ssl=both, headers=key)
        assert status == 200 and header(seen, "X-Api-Key") is None  # the key stays here
        assert (await call(s, proxy.url / "b/x", path, ssl=both))[0] == 401
        status, problem = await call(s, proxy.url / "b/x", path, ssl=bi, headers=key)
        assert status == 401 and "must also present its client certificate" in problem["detail"]
        wrong = {"X-Api-Key": "nope"}
        assert (await call(s, proxy.url / "a/x", path, ssl=bi, headers=wrong))[0] == 401


async def test_mtls_counts_as_authenticated_on_an_open_listener(
    tls_proxy: StartTLSProxy, tmp_path: Path
) -> None:
    proxy = await tls_proxy(tls=MTLS.format(dir=tmp_path), host="0.0.0.0")
    assert proxy.url.port


# --- rotation


async def _served_serial(proxy: TLSProxy) -> int:
    """The serial of the certificate a new connection is served."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.url.port, ssl=proxy.context(), server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


async def _opened(opened: list[object]) -> None:
    opened.append(None)


def _rotate(proxy: TLSProxy, leaf: Leaf, name: str) -> None:
    """As Kubernetes does: new files in a new directory, a symlink swapped onto them."""
    new = proxy.dir / name
    new.mkdir()
    cert, key = leaf.write(new, "server")
    for target, live in ((cert, proxy.tls.settings.cert_file), (key, proxy.tls.settings.key_file)):
        tmp = live.with_suffix(".tmp")
        tmp.symlink_to(target)
        tmp.replace(live)


@PATHS
async def test_rotated_certificate_serves_new_connections_while_an_old_one_lives_on(
    tls_proxy: StartTLSProxy, ca: CA, path: str
) -> None:
    proxy = await tls_proxy()
    first = await _served_serial(proxy)
    opened: list[object] = []
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(lambda *args: _opened(opened))
    connector = aiohttp.TCPConnector(limit=1, ssl=proxy.context())
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as old:
        assert (await call(old, proxy.url / "a/1", path))[0] == 200
        leaf = ca.issue()
        _rotate(proxy, leaf, "v2")
        assert proxy.tls.poll() is True
        assert proxy.tls.poll() is False  # nothing changed since
        assert await _served_serial(proxy) == leaf.cert.serial_number != first
        assert (await call(old, proxy.url / "a/2", path))[0] == 200
        assert len(opened) == 1  # on the connection opened before the rotation
    async with aiohttp.ClientSession() as new:
        assert (await call(new, proxy.url / "a/3", path, ssl=proxy.context()))[0] == 200


async def test_a_bad_new_pair_keeps_the_old_one_and_says_so(
    tls_proxy: StartTLSProxy, ca: CA
) -> None:
    proxy = await tls_proxy()
    first = await _served_serial(proxy)
    settings = proxy.tls.settings
    settings.key_file.write_bytes(ca.issue().key_pem())  # another certificate's key
    with capture_logs() as logs:
        assert proxy.tls.poll() is False
        assert proxy.tls.poll() is False  # said once per change, not at every poll
    failed = [e for e in logs if e["event"].startswith("listener certificate reload failed")]
    assert len(failed) == 1
    assert failed[0]["key_path"] == "listen.tls.key_file"
    assert "is not the key of the certificate" in failed[0]["problem"]
    assert await _served_serial(proxy) == first
    leaf = ca.issue()
    settings.cert_file.write_bytes(leaf.cert_pem)
    settings.key_file.write_bytes(leaf.key_pem())
    assert proxy.tls.reload() is True  # what SIGHUP does
    assert await _served_serial(proxy) == leaf.cert.serial_number


async def test_the_watcher_picks_up_changed_files_on_its_own(ca: CA, tmp_path: Path) -> None:
    from proxy.listener_tls import ListenTLS

    cert, key = ca.issue().write(tmp_path, "s")
    tls = ServerTLS(ListenTLS(cert_file=cert, key_file=key), poll_seconds=0.01)
    tls.start()
    try:
        leaf = ca.issue()
        leaf.write(tmp_path, "s")
        async with asyncio.timeout(10):
            await tls.reloaded.wait()
    finally:
        await tls.stop()
    assert tls.expires == leaf.cert.not_valid_after_utc.replace(microsecond=0)


async def test_expiry_is_a_metric_and_a_near_one_a_warning(
    ca: CA, tmp_path: Path, tls_proxy: StartTLSProxy
) -> None:
    proxy = await tls_proxy()
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.url / "-/metrics", ssl=proxy.context()) as resp,
    ):
        text = await resp.text()
    line = next(ln for ln in text.splitlines() if ln.startswith("tokenrelay_listener_cert_expiry"))
    assert 'listener="listen"' in line and 88 * 86400 < float(line.split()[-1]) < 91 * 86400
    from proxy.listener_tls import ListenTLS

    cert, key = ca.issue(days=3).write(tmp_path, "soon")
    with capture_logs() as logs:
        ServerTLS(ListenTLS(cert_file=cert, key_file=key), "admin")
    assert [e["key_path"] for e in logs if "expires soon" in e["event"]] == ["admin.tls.cert_file"]


async def test_a_rotated_client_ca_decides_new_handshakes(
    tls_proxy: StartTLSProxy, tmp_path: Path, ca: CA
) -> None:
    proxy = await _mtls(tls_proxy, tmp_path)
    new_ca = CA("next client CA")
    old_client = proxy.context(ca.issue("CN=old", (), client=True))
    new_client = proxy.context(new_ca.issue("CN=new", (), client=True))
    new_ca.write(tmp_path / "ca.crt")  # client_ca_file
    assert proxy.tls.poll() is True
    async with aiohttp.ClientSession() as s:
        assert (await call(s, proxy.url / "a/x", "lean", ssl=new_client))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await call(s, proxy.url / "a/x", "lean", ssl=old_client)
