"""Configs that used to pass ``check`` and then crash at start or on reload (review 3, #2/#3/#10).

Validation cases call ``parse_config``; start-up and reload run the real proxy, as a
process (exit status, stderr, signals) or in-process on real sockets (admin answers).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from yarl import URL

from proxy.app import RUNTIME, create_app, start_runner
from proxy.config import Loaded, parse_config
from proxy.observability import Observer
from proxy.problems import ConfigError
from proxy.serving import load_for_run
from tests.conftest import StartProxy
from tests.helpers import Echo

PY = sys.executable
ROUTE = "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1:9/'}\n"


def refused(text: str, base: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.yaml", env={}, base=base)
    assert err.value.file == "f.yaml"
    return err.value


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, env=os.environ
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a client pair, a key of another pair, an encrypted key, and a non-PEM file."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf, other = ca.issue_cert("client.test"), ca.issue_cert("other.test")
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    other.private_key_pem.write_to_path(str(d / "other_key.pem"))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    (d / "encrypted_key.pem").write_bytes(encrypted)
    (d / "not_pem.txt").write_text("just a host name\n")
    return {p.stem: p for p in d.iterdir()}


# -- #2: validation refuses what start-up could not use ---------------------------------------


@pytest.mark.parametrize(
    ("value", "index"), [(["10.0.0.0/33"], 0), (["127.0.0.0/8", "not-a-net"], 1), (["::1/129"], 0)]
)
def test_bad_trusted_proxy_is_refused_with_its_index(value: list[str], index: int) -> None:
    err = refused(f"trusted_proxies: {json.dumps(value)}\n{ROUTE}")
    assert err.path == f"trusted_proxies[{index}]"
    assert repr(value[index]) in err.problem and "not an IP address or network" in err.problem


def test_trusted_proxies_accept_addresses_and_networks() -> None:
    text = 'trusted_proxies: ["10.0.0.0/8", "192.0.2.7", "fd00::/8", "10.1.2.3/8"]\n' + ROUTE
    assert len(parse_config(text, env={}).config.trusted_proxies) == 4


def tls_route(tls: str) -> str:
    return f"routes:\n  - {{prefix: /a/, upstream: 'https://127.0.0.1:9/', tls: {{{tls}}}}}\n"


def test_ca_file_that_is_not_pem_is_refused(pki: dict[str, Path]) -> None:
    err = refused(tls_route(f"ca_file: {pki['not_pem']}"))
    assert err.path == "routes[0].tls.ca_file"
    assert str(pki["not_pem"]) in err.problem and "PEM CA certificates" in err.problem


def test_provider_tls_files_are_loaded_too(pki: dict[str, Path]) -> None:
    err = refused(
        "providers:\n  p: {grant: client_credentials, token_url: 'https://127.0.0.1:9/t', "
        f"client_id: i, client_secret: s, tls: {{ca_file: {pki['not_pem']}}}}}\n"
    )
    assert err.path == "providers.p.tls.ca_file"


@pytest.mark.parametrize(
    ("cert", "key", "path", "problem"),
    [
        ("cert", "other_key", "client_cert_file", "key values mismatch"),
        ("not_pem", "key", "client_cert_file", "not PEM"),
        ("cert", "not_pem", "client_cert_file", "not PEM"),
        ("cert", "encrypted_key", "client_key_file", "encrypted key"),
    ],
)
def test_unusable_client_pair_is_refused(
    pki: dict[str, Path], cert: str, key: str, path: str, problem: str
) -> None:
    err = refused(tls_route(f"client_cert_file: {pki[cert]}, client_key_file: {pki[key]}"))
    assert err.path == f"routes[0].tls.{path}"
    assert problem in err.problem


def test_missing_tls_file_names_its_key(tmp_path: Path) -> None:
    err = refused(tls_route(f"ca_file: {tmp_path / 'absent.pem'}"))
    assert err.path == "routes[0].tls.ca_file" and "file not found" in err.problem


def test_usable_tls_files_are_accepted(pki: dict[str, Path]) -> None:
    tls = f"ca_file: {pki['ca']}, client_cert_file: {pki['cert']}, client_key_file: {pki['key']}"
    route = parse_config(tls_route(tls), env={}).config.routes[0]
    assert route.tls.ca_file == pki["ca"]


def test_spool_dir_that_is_a_file_or_under_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    err = refused(f"spool_dir: {tmp_path / 'f'}\n{ROUTE}")
    assert err.path == "spool_dir" and "is not a directory" in err.problem
    err = refused(f"spool_dir: {tmp_path / 'f' / 'sub'}\n{ROUTE}")
    assert err.path == "spool_dir" and f"{tmp_path / 'f'} is not a directory" in err.problem


def test_shared_spool_dir_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    err = refused(f"spool_dir: {shared}\n{ROUTE}")
    assert err.path == "spool_dir" and "group or world writable" in err.problem


def test_missing_spool_dir_is_accepted_and_not_created_by_validation(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    loaded = parse_config(f"spool_dir: {target}\n{ROUTE}", env={})
    assert loaded.config.spool_dir == target
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("host", ["not a host", "", "host:8080", "-bad.example", "a..b", "x/y"])
@pytest.mark.parametrize("key", ["listen", "admin"])
def test_listen_host_that_is_no_host_is_refused(key: str, host: str) -> None:
    err = refused(f"{key}: {{host: {json.dumps(host)}}}\n{ROUTE}")
    assert err.path == f"{key}.host" and "neither an IP address nor a host name" in err.problem


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "0.0.0.0", "::", "localhost", "relay-1.lan"])
def test_listen_host_accepts_addresses_and_names(host: str) -> None:
    assert (
        parse_config(f"listen: {{host: {json.dumps(host)}}}\n", env={}).config.listen.host == host
    )


def test_bad_host_on_the_command_line_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(ROUTE)
    with pytest.raises(ConfigError) as err:
        load_for_run(str(cfg), "not a host", None)
    assert (err.value.file, err.value.path) == ("command line", "listen.host")


# -- #2: the real process: check refuses, start exits 2 with no traceback ----------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('trusted_proxies: ["10.0.0.0/33"]\n' + ROUTE, "trusted_proxies[0]"),
        (f"spool_dir: {Path('/etc/hostname')}\n{ROUTE}", "spool_dir"),
        ('listen: {host: "not a host"}\n' + ROUTE, "listen.host"),
        (
            "providers:\n  p: {grant: static, token: T-SECRET-1}\nlisten: {host: 0.0.0.0}\n"
            "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1:9/', provider: p}\n",
            "listen.host",
        ),
    ],
)
def test_check_refuses_what_start_refuses(tmp_path: Path, body: str, where: str) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(body)
    out = run_cli("check", "--config", str(cfg))
    assert out.returncode == 2, out.stdout
    assert f"{cfg}: {where}: " in out.stderr and "config OK" not in out.stdout
    assert "T-SECRET-1" not in out.stderr + out.stdout


def test_check_refuses_a_ca_file_that_is_not_pem(tmp_path: Path, pki: dict[str, Path]) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(tls_route(f"ca_file: {pki['not_pem']}"))
    out = run_cli("check", "--config", str(cfg))
    assert out.returncode == 2
    assert f"{cfg}: routes[0].tls.ca_file: cannot load" in out.stderr


def test_start_with_a_bad_network_starts_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text('trusted_proxies: ["10.0.0.0/33"]\n' + ROUTE)
    out = run_cli("--config", str(cfg), "--port", "0")
    assert out.returncode == 2
    assert f"{cfg}: trusted_proxies[0]:" in out.stderr
    assert "listening" not in out.stderr and "Traceback" not in out.stderr


def test_port_taken_at_start_exits_2_naming_the_listener(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "routes.yaml"
        cfg.write_text(f"admin: {{port: {port}}}\n{ROUTE}")
        out = run_cli("--config", str(cfg), "--port", "0")
    assert out.returncode == 2, out.stderr
    assert f"{cfg}: admin: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr and "Unclosed" not in out.stderr


async def test_what_start_up_still_refuses_is_a_config_error(tmp_path: Path) -> None:
    """Files can change between validation and start: those failures name file and key too,
    and leave nothing open (a model copy skips validation, as such a change would)."""
    (tmp_path / "f").write_text("x")
    loaded = parse_config(ROUTE, "f.yaml", env={})
    spool = loaded.config.model_copy(update={"spool_dir": tmp_path / "f"})
    networks = loaded.config.model_copy(update={"trusted_proxies": ["10.0.0.0/33"]})
    for config, path in ((spool, "spool_dir"), (networks, "")):
        app = create_app(Loaded(config, "f.yaml"), Observer(stream=io.StringIO()))
        with pytest.raises(ConfigError) as err:
            await start_runner(app, config, config.listen.model_copy(update={"port": 0}))
        assert (err.value.file, err.value.path) == ("f.yaml", path)
        rt = app[RUNTIME]
        assert rt.session is None or rt.session.closed


# -- #2/#3: one reload for SIGHUP and POST /-/reload: refused, logged, counted ---------------


def reload_counts(metrics: str) -> dict[str, float]:
    prefix = "tokenrelay_config_reload_total{outcome="
    return {
        line[len(prefix) + 1 : line.index('"}')]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(prefix)
    }


async def test_admin_reload_refusals_are_problems_and_counted(
    start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, up = echo
    good = f"admin: {{port: 0}}\nroutes:\n  - {{prefix: /a/, upstream: '{up}/'}}\n"
    proxy = await start_proxy(good)
    assert proxy.admin_url is not None
    rt, cfg = proxy.runtime, tmp_path / "routes.yaml"
    loaded = rt.loaded
    reloaders = [
        lambda: asyncio.to_thread(load_for_run, str(cfg), None, None),
        lambda: _fail(RuntimeError("broker gone")),
        lambda: _ready(Loaded(loaded.config.model_copy(update={"trusted_proxies": ["x"]}), "m")),
    ]
    cfg.write_text('trusted_proxies: ["10.0.0.0/33"]\n' + good)
    expected = [
        (str(cfg), "trusted_proxies[0]", "not an IP address or network"),
        ("test.yaml", "", "cannot read the config: RuntimeError: broker gone"),
        ("m", "", "cannot apply the config: ValueError"),
    ]
    for reloader, (file, key_path, detail) in zip(reloaders, expected, strict=True):
        rt.reloader = reloader
        async with client.post(proxy.admin_url / "-" / "reload") as r:
            body = orjson.loads(await r.read())
            assert r.status == 422
            assert r.headers["Content-Type"] == "application/problem+json"
            assert body["request_id"] == r.headers["X-Request-Id"]
        assert body["type"].endswith("/config-invalid") and body["status"] == 422
        assert (body["file"], body["key_path"]) == (file, key_path)
        assert detail in body["detail"]
        assert rt.generation is not None and rt.generation.loaded is loaded
    async with client.get(proxy.url / "a" / "x") as r:
        assert r.status == 200  # the old routes still serve
    cfg.write_text(good.replace("/a/", "/b/"))
    rt.reloader = reloaders[0]
    async with client.post(proxy.admin_url / "-" / "reload") as r:
        answer = await r.json()
        assert (r.status, answer) == (
            200,
            {"status": "reloaded", "routes": 1, "restart_needed": []},
        )
    async with client.get(proxy.url / "b" / "x") as r:
        assert r.status == 200
    async with client.get(proxy.admin_url / "-" / "metrics") as r:
        assert reload_counts(await r.text()) == {"success": 1.0, "error": 3.0}


async def _fail(exc: Exception) -> Loaded:
    raise exc


async def _ready(loaded: Loaded) -> Loaded:
    return loaded


async def read_event(stderr: asyncio.StreamReader, event: str) -> dict[str, object]:
    async with asyncio.timeout(20):
        while raw := await stderr.readline():
            try:
                line: dict[str, object] = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == event:
                return line
    raise AssertionError(f"process ended before {event!r}")


@pytest.fixture
async def proxy_process(tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(f"admin: {{port: 0}}\n{ROUTE}")
    proc = await asyncio.create_subprocess_exec(
        *(PY, "-m", "proxy", "--config", str(cfg), "--port", "0"),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    yield proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sighup_and_admin_reload_are_logged_and_counted_alike(
    proxy_process: asyncio.subprocess.Process, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proc, cfg = proxy_process, tmp_path / "routes.yaml"
    assert proc.stderr is not None
    admin = URL(str((await read_event(proc.stderr, "listening"))["admin"]))
    cfg.write_text('admin: {port: 0}\ntrusted_proxies: ["10.0.0.0/33"]\n' + ROUTE)
    async with client.post(admin / "-" / "reload") as r:
        assert r.status == 422
    proc.send_signal(signal.SIGHUP)
    for _ in range(2):
        line = await read_event(proc.stderr, "reload failed, config unchanged")
        assert (line["file"], line["key_path"]) == (str(cfg), "trusted_proxies[0]")
    cfg.write_text(f"admin: {{port: 0}}\n{ROUTE}")
    async with client.post(admin / "-" / "reload") as r:
        assert r.status == 200
    assert (await read_event(proc.stderr, "reloaded"))["config"] == str(cfg)
    async with client.get(admin / "-" / "metrics") as r:
        assert reload_counts(await r.text()) == {"success": 1.0, "error": 2.0}
    proc.send_signal(signal.SIGTERM)
    rest = (await proc.stderr.read()).decode()
    assert await proc.wait() == 0
    assert "Traceback" not in rest and "never retrieved" not in rest


# -- #10: values that can never work are refused, each at its key path -----------------------


def test_credentials_in_an_upstream_are_refused_and_never_printed(tmp_path: Path) -> None:
    text = "routes:\n  - {prefix: /a/, upstream: 'http://user:pa55word@127.0.0.1:9/base'}\n"
    err = refused(text)
    assert err.path == "routes[0].upstream" and "must not carry credentials" in err.problem
    assert "pa55word" not in str(err)
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(text.replace("http:", "ftp:"))  # a second problem must not print it either
    out = run_cli("check", "--config", str(cfg))
    assert out.returncode == 2 and "pa55word" not in out.stderr + out.stdout


def test_credentials_in_a_token_url_are_refused() -> None:
    err = refused(
        "providers:\n  p: {grant: client_credentials, client_id: i, client_secret: s, "
        "token_url: 'https://id:s3cret@idp.example/token'}\n"
    )
    assert err.path == "providers.p.token_url" and "s3cret" not in str(err)


def route_with(field: str, value: str) -> str:
    return (
        "providers:\n  st: {grant: static, token: T}\n"
        f"routes:\n  - {{prefix: /a/, upstream: 'http://127.0.0.1:9/', provider: st, "
        f"{field}: {json.dumps(value)}}}\n"
    )


@pytest.mark.parametrize("prefix", ["/a b/", "/é/", '/a"b/', "/a<b>/", "/a^/", "/a\\b/", "/a|b/"])
def test_prefix_outside_rfc3986_path_characters_is_refused(prefix: str) -> None:
    err = refused(
        f"routes:\n  - {{prefix: {json.dumps(prefix)}, upstream: 'http://127.0.0.1:9/'}}\n"
    )
    assert err.path == "routes[0].prefix" and "can never match" in err.problem


def test_prefix_with_every_path_character_is_accepted() -> None:
    prefix = "/Az09-._~!$&'()*+,;=:@/"
    text = f"routes:\n  - {{prefix: {json.dumps(prefix)}, upstream: 'http://127.0.0.1:9/'}}\n"
    assert parse_config(text, env={}).config.routes[0].prefix == prefix


@pytest.mark.parametrize("name", ["bad header:", "X Api", "", "X-Key\u00e9", "X(Key)"])
def test_key_header_that_is_not_a_token_is_refused(name: str) -> None:
    err = refused(route_with("key_header", name))
    assert err.path == "routes[0].key_header" and "cannot be a header name" in err.problem


@pytest.mark.parametrize("name", ["X-Api-Key", "x_key", "Key!#$%&'*+.^`|~"])
def test_key_header_tokens_are_accepted(name: str) -> None:
    assert parse_config(route_with("key_header", name), env={}).config.routes[0].key_header == name


@pytest.mark.parametrize("rate", ["0/s", "0.0/m", "00/h"])
def test_zero_rate_is_refused(rate: str) -> None:
    err = refused(f"clients:\n  - {{id: x, key: k, rate: {rate}}}\n{ROUTE}")
    assert err.path == "clients[0].rate" and "above 0" in err.problem


def test_small_rates_are_accepted() -> None:
    text = f"clients:\n  - {{id: x, key: k, rate: 0.5/s}}\n{ROUTE}"
    assert parse_config(text, env={}).config.clients[0].rate == "0.5/s"


@pytest.mark.parametrize("entry", ["/nonexistent/", "/a/b", "/", "/a"])
def test_client_routes_must_name_a_route(entry: str) -> None:
    text = f"clients:\n  - {{id: x, key: k, routes: [/a/, {entry}]}}\n{ROUTE}"
    if entry in ("/", "/a"):  # every route; the route /a/ itself
        assert parse_config(text, env={}).config.clients[0].routes[1] == entry
        return
    err = refused(text)
    assert err.path == "clients[0].routes[1]" and "no route has prefix" in err.problem


def test_duplicate_client_id_is_refused() -> None:
    err = refused(
        f"clients:\n  - {{id: x, key: k1}}\n  - {{id: y, key: k2}}\n  - {{id: x, key: k3}}\n{ROUTE}"
    )
    assert err.path == "clients[2].id" and "duplicate client id 'x'" in err.problem
    assert "k3" not in str(err)


@pytest.mark.parametrize(
    ("provider", "key"),
    [
        (
            "{preset: simpledocs, auth_base: 'http://127.0.0.1:1/x', client_id: a, "
            "client_secret: b}",
            "auth_base",
        ),
        ("{preset: simplifi, environment: staging, client_id: a, client_secret: b}", "environment"),
        ("{grant: static, token: t, environment: production}", "environment"),
    ],
)
def test_simacan_keys_elsewhere_are_refused(provider: str, key: str) -> None:
    err = refused(f"providers:\n  sd: {provider}\n")
    assert err.path == f"providers.sd.{key}" and "only with preset: simacan" in err.problem


def test_basic_raw_cannot_send_a_client_id_with_a_colon() -> None:
    err = refused("providers:\n  s: {preset: simplifi, client_id: 'a:b', client_secret: c}\n")
    assert err.path.startswith("providers.s") and "basic_raw" in err.problem


def test_simacan_keeps_its_keys() -> None:
    p = parse_config(
        "providers:\n  s: {preset: simacan, environment: staging, "
        "auth_base: 'http://127.0.0.1:1/api', username: u, password: p}\n",
        env={},
    ).config.providers["s"]
    assert p.token_url == "http://127.0.0.1:1/api/auth/password"


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        (
            "providers:\n  a: {grant: static, token: T1}\n  a: {grant: static, token: T2}\n",
            "providers.a",
            3,
        ),
        (f"{ROUTE}{ROUTE}", "routes", 3),
        (
            "routes:\n  - prefix: /a/\n    upstream: 'http://127.0.0.1:9/'\n    prefix: /b/\n",
            "routes[0].prefix",
            4,
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused(text: str, path: str, line: int) -> None:
    err = refused(text)
    assert err.path == path and f"duplicate key (again on line {line})" in err.problem
    assert "T2" not in str(err)


def test_yaml_merge_keys_still_work() -> None:
    text = (
        "routes:\n  - &r {prefix: /a/, upstream: 'http://127.0.0.1:9/'}\n"
        "  - {<<: *r, prefix: /b/}\n"
    )
    routes = parse_config(text, env={}).config.routes
    assert [(r.prefix, r.upstream) for r in routes] == [
        ("/a/", "http://127.0.0.1:9/"),
        ("/b/", "http://127.0.0.1:9/"),
    ]
