"""Client authentication methods of OIDC Core §9 and RFC 8705, against a real OpenID provider
(panva/oidc-provider), which checks every claim, the signature, the audience and that no
``jti`` is used twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from yarl import URL

from proxy.config import parse_config
from proxy.problems import ConfigError
from tests.conftest import StartProxy, StartUpstream
from tests.helpers import Echo
from tests.oidc_provider import oidc_provider

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
SECRET_JWT_SECRET = "cs-" + "S3CR3T-for-client-secret-jwt-" * 3


def write_key(tmp: Path, key: Key, name: str, password: bytes | None = None) -> Path:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    path = tmp / name
    path.write_bytes(pem)
    return path


def public_jwk(key: Key, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        text = RSAAlgorithm.to_jwk(key.public_key())
    else:
        text = ECAlgorithm.to_jwk(key.public_key())
    jwk: dict[str, Any] = json.loads(text)
    return jwk | {"kid": kid, "use": "sig"}


def cc_client(client_id: str, method: str, **extra: Any) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": method,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        **extra,
    }


def route_config(up: URL, provider: dict[str, Any]) -> str:
    return (
        f"providers:\n  idp: {json.dumps(provider)}\n"
        f"routes:\n  - {{prefix: /api/, upstream: '{up}/', provider: idp}}\n"
    )


async def bearer_through(client: aiohttp.ClientSession, url: URL, echo: Echo) -> str:
    async with client.get(url / "api" / "x") as resp:
        assert resp.status == 200, await resp.text()
    auth = echo.seen[-1].header("Authorization")
    assert auth is not None and auth.startswith("Bearer ")
    return auth


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (rsa.generate_private_key(65537, 2048), None),
        (rsa.generate_private_key(65537, 2048), "PS256"),
        (ec.generate_private_key(ec.SECP256R1()), None),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
    ],
    ids=["RS256-default", "PS256", "ES256-default", "ES384"],
)
async def test_private_key_jwt_is_accepted_by_a_real_openid_provider(
    key: Key,
    alg: str | None,
    tmp_path: Path,
    start_proxy: StartProxy,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
) -> None:
    e, up = echo
    registered = cc_client("pkjwt", "private_key_jwt", jwks={"keys": [public_jwk(key, "k1")]})
    async with oidc_provider(tmp_path, [registered]) as op:
        provider = {
            "grant": "client_credentials",
            "token_url": op.token_url,
            "client_id": "pkjwt",
            "client_auth": "private_key_jwt",
            "private_key_file": str(write_key(tmp_path, key, "client.pem")),
            "key_id": "k1",
        }
        if alg is not None:
            provider["signing_alg"] = alg
        proxy = await start_proxy(route_config(up, provider))
        first = await bearer_through(client, proxy.url, e)
        assert (await op.next_event())["event"] == "grant.success"
        async with client.post(proxy.url / "-" / "tokens" / "idp" / "renew") as resp:
            assert resp.status == 200  # a second assertion: oidc-provider refuses a reused jti
        assert await op.next_event() == {
            "event": "grant.success",
            "client_id": "pkjwt",
            "method": "private_key_jwt",
        }
        assert await bearer_through(client, proxy.url, e) != first
        pem = (tmp_path / "client.pem").read_text()
        assert pem.splitlines()[1] not in proxy.log_text()


async def test_client_secret_jwt_is_accepted_by_a_real_openid_provider(
    tmp_path: Path, start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    e, up = echo
    registered = cc_client("csjwt", "client_secret_jwt", client_secret=SECRET_JWT_SECRET)
    async with oidc_provider(tmp_path, [registered]) as op:
        provider = {
            "grant": "client_credentials",
            "token_url": op.token_url,
            "client_id": "csjwt",
            "client_secret": SECRET_JWT_SECRET,
            "client_auth": "client_secret_jwt",
        }
        proxy = await start_proxy(route_config(up, provider))
        await bearer_through(client, proxy.url, e)
        assert (await op.next_event())["method"] == "client_secret_jwt"
        assert SECRET_JWT_SECRET not in proxy.log_text()


async def test_tls_client_auth_presents_the_certificate_and_sends_only_the_id(
    tmp_path: Path, start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    e, up = echo
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    mine = ca.issue_cert("tokenrelay.client.example")
    files = {
        "ca": tmp_path / "ca.pem",
        "key": tmp_path / "server.key",
        "cert": tmp_path / "server.pem",
        "ccert": tmp_path / "client.pem",
        "ckey": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    mine.cert_chain_pems[0].write_to_path(str(files["ccert"]))
    mine.private_key_pem.write_to_path(str(files["ckey"]))
    registered = cc_client(
        "mtls", "tls_client_auth", tls_client_auth_san_dns="tokenrelay.client.example"
    )
    tls = {k: str(files[k]) for k in ("key", "cert", "ca")}
    async with oidc_provider(tmp_path, [registered], tls=tls) as op:
        provider: dict[str, Any] = {
            "grant": "client_credentials",
            "token_url": op.token_url,
            "client_id": "mtls",
            "client_auth": "tls_client_auth",
            "tls": {
                "ca_file": str(files["ca"]),
                "client_cert_file": str(files["ccert"]),
                "client_key_file": str(files["ckey"]),
            },
        }
        proxy = await start_proxy(route_config(up, provider))
        await bearer_through(client, proxy.url, e)
        assert (await op.next_event())["method"] == "tls_client_auth"
        without = provider | {"tls": {"ca_file": str(files["ca"])}, "client_auth": "body"}
        without["client_secret"] = "nope"
        proxy2 = await start_proxy(route_config(up, without))
        async with client.get(proxy2.url / "api" / "x") as resp:
            assert resp.status in (502, 503)  # invalid_client: the certificate was the proof
        assert (await op.next_event())["event"] == "grant.error"


def provider_cfg(tmp_path: Path, **keys: Any) -> str:
    base = {
        "grant": "client_credentials",
        "token_url": "https://idp.example/token",
        "client_id": "c",
    }
    return f"providers:\n  p: {json.dumps(base | keys)}\n"


def refused(tmp_path: Path, **keys: Any) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(provider_cfg(tmp_path, **keys), "routes.yaml", {}, tmp_path)
    return err.value


def test_a_key_that_cannot_sign_is_refused_at_its_key_path(tmp_path: Path) -> None:
    rsa_key = write_key(tmp_path, rsa.generate_private_key(65537, 2048), "rsa.pem")
    ec_key = write_key(tmp_path, ec.generate_private_key(ec.SECP256R1()), "ec.pem")
    locked = write_key(tmp_path, rsa.generate_private_key(65537, 2048), "enc.pem", b"pw")
    cases = [
        ({"private_key_file": str(locked)}, "providers.p.private_key_file", "encrypted"),
        ({}, "providers.p.private_key_file", "needs it"),
        (
            {"private_key_file": str(ec_key), "signing_alg": "RS256"},
            "providers.p.private_key_file",
            "does not sign",
        ),
        (
            {"private_key_file": str(rsa_key), "signing_alg": "none"},
            "providers.p.signing_alg",
            "unsigned",
        ),
        (
            {"private_key_file": str(rsa_key), "signing_alg": "HS512"},
            "providers.p.signing_alg",
            "client_secret_jwt",
        ),
    ]
    for keys, path, problem in cases:
        err = refused(tmp_path, client_auth="private_key_jwt", **keys)
        assert err.path == path and problem in err.problem, (keys, err)
        assert "PRIVATE KEY" not in str(err)


def test_tls_client_auth_needs_a_client_certificate(tmp_path: Path) -> None:
    err = refused(tmp_path, client_auth="tls_client_auth")
    assert err.path == "providers.p.tls.client_cert_file"


def test_a_secret_is_still_needed_where_the_method_signs_with_it(tmp_path: Path) -> None:
    err = refused(tmp_path, client_auth="client_secret_jwt")
    assert "client_secret" in err.problem


async def test_an_assertion_echoed_by_the_idp_never_reaches_logs_problems_or_tokens_page(
    tmp_path: Path,
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
) -> None:
    """An IdP that quotes the assertion back in its error text (some do, in debug modes)."""
    sent: list[str] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        assertion = str(form["client_assertion"])
        sent.append(assertion)
        said = f"assertion {assertion} rejected"
        body = {"error": "invalid_client", "error_description": said}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/token", token)
    idp = await start_upstream(app)
    _, up = echo
    key = write_key(tmp_path, rsa.generate_private_key(65537, 2048), "k.pem")
    provider = {
        "grant": "client_credentials",
        "token_url": f"{idp}/token",
        "client_id": "c",
        "client_auth": "private_key_jwt",
        "private_key_file": str(key),
    }
    proxy = await start_proxy(route_config(up, provider))
    async with client.get(proxy.url / "api" / "x") as resp:
        problem = await resp.text()
    async with client.get(proxy.url / "-" / "tokens") as resp:
        page = await resp.text()
    assert sent and "invalid_client" in problem
    for assertion in sent:
        for part in assertion.split("."):
            for text in (problem, page, proxy.log_text()):
                assert part not in text


# -- OpenID discovery --------------------------------------------------------------------------


async def test_issuer_discovery_finds_the_token_endpoint_of_a_real_openid_provider(
    tmp_path: Path, start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    e, up = echo
    registered = cc_client("disc", "client_secret_post", client_secret=SECRET_JWT_SECRET)
    async with oidc_provider(tmp_path, [registered]) as op:
        provider = {
            "grant": "client_credentials",
            "issuer": op.issuer,
            "allow_plain_http": False,  # loopback: allowed without it
            "client_id": "disc",
            "client_secret": SECRET_JWT_SECRET,
            "client_auth": "body",
        }
        proxy = await start_proxy(route_config(up, provider))
        await bearer_through(client, proxy.url, e)
        assert (await op.next_event())["method"] == "client_secret_post"
        assert "client_auth_not_listed" not in proxy.log_text()


class FakeIdP:
    """A discovery document and a token endpoint that a test can break and mend."""

    def __init__(self, methods: list[str]) -> None:
        self.methods = methods
        self.broken = False
        self.reads = 0
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.document)
        app.router.add_post("/oauth/token", self.token)
        return app

    async def document(self, request: web.Request) -> web.Response:
        self.reads += 1
        if self.broken:
            return web.Response(status=500)
        doc = {
            "issuer": self.base,
            "token_endpoint": f"{self.base}/oauth/token",
            "token_endpoint_auth_methods_supported": self.methods,
        }
        return web.json_response(doc)

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "at-1", "token_type": "Bearer", "expires_in": 60})


async def test_a_client_auth_the_idp_does_not_list_is_a_warning_and_the_last_good_document_is_kept(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
) -> None:
    idp = FakeIdP(["private_key_jwt"])
    idp.base = str(await start_upstream(idp.app()))
    e, up = echo
    provider = {"grant": "client_credentials", "issuer": idp.base, "client_id": "c"}
    config = route_config(up, provider | {"client_secret": "s"})
    proxy = await start_proxy(config)
    await bearer_through(client, proxy.url, e)
    assert '"event":"client_auth_not_listed"' in proxy.log_text()
    assert "lists private_key_jwt and not client_secret_basic" in proxy.log_text()
    idp.broken = True
    rt = proxy.runtime
    loaded = rt.loaded

    async def same() -> Any:
        return loaded

    rt.reloader = same
    await rt.reload()
    assert rt.generation is not None
    await rt.generation.registry.refresh_discovery()
    assert '"kept_last_good":true' in proxy.log_text()
    async with client.post(proxy.url / "-" / "tokens" / "idp" / "renew") as resp:
        assert resp.status == 200  # the last good document still names the endpoint


async def test_an_unreachable_discovery_document_fails_only_that_providers_routes(
    start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    from tests.oidc_provider import free_port

    _, up = echo
    port = free_port()
    provider = {
        "grant": "client_credentials",
        "issuer": f"http://127.0.0.1:{port}",
        "client_id": "c",
        "client_secret": "s",
    }
    config = route_config(up, provider) + f"  - {{prefix: /open/, upstream: '{up}/'}}\n"
    proxy = await start_proxy(config)
    async with client.get(proxy.url / "api" / "x") as resp:
        body = await resp.json()
        assert resp.status == 503
    assert body["provider"] == "idp", body
    assert f"connect to 127.0.0.1:{port}: connection refused" in body["detail"]
    assert "/.well-known/openid-configuration" in body["detail"]
    async with client.get(proxy.url / "open" / "x") as resp:
        assert resp.status == 200


def test_issuer_and_token_url_together_are_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, issuer="https://idp.example", client_secret="s")
    assert err.path == "providers.p.issuer" and "not both" in err.problem
    text = (
        "providers:\n  p: {grant: client_credentials, issuer: 'http://idp.example', "
        "client_id: c, client_secret: s}\n"
    )
    with pytest.raises(ConfigError) as e2:
        parse_config(text, "routes.yaml", {}, tmp_path)
    assert e2.value.path == "providers.p.issuer" and "in clear" in e2.value.problem


async def test_a_wrong_key_is_a_502_naming_the_provider_and_invalid_client_then_cools_down(
    tmp_path: Path, start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    _, up = echo
    registered_key = rsa.generate_private_key(65537, 2048)
    other = write_key(tmp_path, rsa.generate_private_key(65537, 2048), "other.pem")
    registered = cc_client("w", "private_key_jwt", jwks={"keys": [public_jwk(registered_key, "k")]})
    async with oidc_provider(tmp_path, [registered]) as op:
        provider = {
            "grant": "client_credentials",
            "token_url": op.token_url,
            "client_id": "w",
            "client_auth": "private_key_jwt",
            "private_key_file": str(other),
        }
        proxy = await start_proxy(route_config(up, provider))
        async with client.get(proxy.url / "api" / "x") as resp:
            body = await resp.json()
            assert resp.status == 502
        assert body["provider"] == "idp" and body["provider_error"] == "invalid_client"
        for _ in range(2):  # cooling down: answered at once, the IdP is left alone
            async with client.get(proxy.url / "api" / "x") as resp:
                assert resp.status == 503 and "Retry-After" in resp.headers
                assert (await resp.json())["provider"] == "idp"
        assert (await op.next_event())["event"] == "grant.error"
        assert [e["event"] for e in op.events].count("grant.error") == 1  # the cool-down


async def test_a_rotated_key_file_is_used_on_the_next_token_request(
    tmp_path: Path, start_proxy: StartProxy, echo: tuple[Echo, URL], client: aiohttp.ClientSession
) -> None:
    from proxy.app import reload_on_file_change

    e, up = echo
    old, new = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    jwks = {"keys": [public_jwk(old, "old"), public_jwk(new, "new")]}
    async with oidc_provider(tmp_path, [cc_client("rot", "private_key_jwt", jwks=jwks)]) as op:
        key = write_key(tmp_path, old, "client.pem")
        provider = {
            "grant": "client_credentials",
            "token_url": op.token_url,
            "client_id": "rot",
            "client_auth": "private_key_jwt",
            "private_key_file": str(key),
        }
        text = route_config(up, provider)
        cfg = tmp_path / "routes.yaml"
        cfg.write_text(text)
        proxy = await start_proxy(text)
        rt = proxy.runtime
        from proxy.serving import load_for_run

        rt.reloader = lambda: asyncio.to_thread(load_for_run, str(cfg), None, None)
        first = await bearer_through(client, proxy.url, e)
        await op.next_event()
        write_key(tmp_path, new, "client.pem")
        await reload_on_file_change(rt, ["providers.idp.private_key_file"])
        assert await bearer_through(client, proxy.url, e) != first  # a new key: a new token
        assert (await op.next_event())["event"] == "grant.success"


async def test_token_command_says_which_method_it_used(tmp_path: Path) -> None:
    import sys

    key = rsa.generate_private_key(65537, 2048)
    registered = cc_client("cli", "private_key_jwt", jwks={"keys": [public_jwk(key, "k")]})
    async with oidc_provider(tmp_path, [registered]) as op:
        provider = {
            "grant": "client_credentials",
            "issuer": op.issuer,
            "client_id": "cli",
            "client_auth": "private_key_jwt",
            "private_key_file": str(write_key(tmp_path, key, "k.pem")),
        }
        cfg = tmp_path / "routes.yaml"
        cfg.write_text(f"providers:\n  idp: {json.dumps(provider)}\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "token", "idp", "--config", str(cfg),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode() + err.decode()
    assert proc.returncode == 0, text
    assert f"client_auth: private_key_jwt (issuer {op.issuer})" in text
    assert "BEGIN" not in text and "eyJ" not in text


def test_check_refuses_a_key_it_cannot_sign_with(tmp_path: Path) -> None:
    import subprocess
    import sys

    key = write_key(tmp_path, ec.generate_private_key(ec.SECP256R1()), "ec.pem")
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(provider_cfg(tmp_path, client_auth="private_key_jwt", private_key_file=str(key),
                                signing_alg="PS256"))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "providers.p.private_key_file: signing_alg PS256 does not sign" in out.stderr
    assert "PRIVATE KEY" not in out.stderr + out.stdout
