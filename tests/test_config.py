"""routes.yaml → typed objects: variables, secret files, presets, sizes, optional providers."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Secret, load_config, parse_config
from proxy.problems import ConfigError


def test_variables_defaults_and_dollar_escape() -> None:
    loaded = parse_config(
        "providers:\n  p: {grant: static, token: '${TOK}'}\n"
        "routes:\n  - {prefix: /a/, upstream: 'http://${HOST:-127.0.0.1}:${PORT}/$$x', "
        "provider: p}\n",
        env={"TOK": "t-1", "PORT": "81"},
    )
    route = loaded.config.routes[0]
    assert route.upstream == "http://127.0.0.1:81/$x"
    token = loaded.config.providers["p"].token
    assert token is not None and token.get_secret_value() == "t-1"


def test_secret_files_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = tmp_path / "routes.yaml"
    cfg.write_text("providers:\n  s: {preset: simacan, username: u, password_file: pw}\n")
    provider = load_config(cfg, env={}).config.providers["s"]
    assert provider.password is not None
    assert provider.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(provider) and "***" in repr(provider)


def test_secret_file_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "routes.yaml"
    cfg.write_text("providers:\n  s: {grant: static, token_file: /nonexistent/x}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env={})
    assert err.value.path == "providers.s.token_file"
    cfg.write_text("providers:\n  s: {grant: static, token: a, token_file: b}\n")
    with pytest.raises(ConfigError, match="not both"):
        load_config(cfg, env={})


def test_presets_fill_and_explicit_keys_win() -> None:
    cfg = parse_config(
        "providers:\n"
        "  prod: {preset: simacan, username: u, password: p}\n"
        "  stg: {preset: simacan, environment: staging, username: u, password: p}\n"
        "  docs: {preset: simpledocs, client_id: i, client_secret: s, scope: read}\n"
        "  simplifi: {preset: simplifi, client_id: i, client_secret: s,"
        " token_url: 'https://sandbox.example/oauth/token'}\n",
        env={},
    ).config.providers
    assert cfg["prod"].token_url == "https://auth-service.services.simacan.com/api/v1/auth/password"
    assert cfg["stg"].refresh_url == (
        "https://auth-service-stg.services.simacan.com/api/v1/auth/refresh"
    )
    assert cfg["prod"].grant == "simacan"
    assert (cfg["docs"].client_auth, cfg["docs"].scope) == ("body", "read")
    assert cfg["simplifi"].client_auth == "basic_raw"
    assert cfg["simplifi"].token_url == "https://sandbox.example/oauth/token"


def test_optional_provider_waits_for_its_variables() -> None:
    loaded = parse_config(
        "providers:\n  v: {grant: static, token: '${V_TOKEN}', optional: true}\n"
        "routes:\n  - {prefix: /v/, upstream: 'https://x.example/', provider: v}\n",
        env={},
    )
    assert loaded.inactive_providers == {"v": ["V_TOKEN"]}
    assert loaded.route_waits_for(loaded.config.routes[0]) == ["V_TOKEN"]


def test_sizes_take_units() -> None:
    route = parse_config(
        "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1/', "
        "replay: {memory: 64KiB, max_body: 10MB}, max_body: 1GiB}\n",
        env={},
    ).config.routes[0]
    assert (route.replay.memory, route.replay.max_body) == (65536, 10_000_000)
    assert route.max_body == 1024**3


def test_replay_budgets_take_units_and_default_to_64mib_and_1gib() -> None:
    limits = parse_config("limits: {replay_memory: 8MiB, replay_disk: 2GB}\n", env={}).config.limits
    assert (limits.replay_memory, limits.replay_disk) == (8 * 1024**2, 2 * 10**9)
    defaults = parse_config("{}\n", env={}).config.limits
    assert (defaults.replay_memory, defaults.replay_disk) == (64 * 1024**2, 1024**3)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (
            "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1/', replay: {memory: lots}}\n",
            "routes[0].replay.memory",
        ),
        ("limits: {replay_memory: lots}\n", "limits.replay_memory"),
        ("limits: {replay_disk: -1}\n", "limits.replay_disk"),
        ("providers:\n  p: {grant: client_credentials, client_id: x}\n", "providers.p"),
        ("providers:\n  p: {preset: acme}\n", "providers.p.preset"),
        ("clients:\n  - {id: a}\n", "clients[0]"),
        (
            "routes:\n  - {prefix: /a/, upstream: 'http://10.0.0.1/', provider: p}\n"
            "providers:\n  p: {grant: static, token: t}\n",
            "routes[0].upstream",
        ),
    ],
)
def test_errors_carry_the_key_path(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.yaml", env={})
    assert err.value.path == path
    assert err.value.file == "f.yaml"


def test_secret_type_redacts_everywhere() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in f"{s} {s!r}"
    assert str(s) == "***"


def test_every_validation_error_is_reported_with_the_valid_keys() -> None:
    text = (
        "listen: {hots: 127.0.0.1}\n"
        "routes:\n  - {prefix: /a/, upstream: 'http://127.0.0.1:1/', colour: red}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, "routes.yaml", {})
    assert err.value.path == "listen.hots"
    message = str(err.value)
    assert "unknown key (valid keys here: host, port, tls)" in message
    assert "and routes[0].colour: unknown key (valid keys here: allow_plain_http," in message
    assert "more)" not in message


def test_an_unknown_provider_key_lists_the_provider_keys_a_user_can_give() -> None:
    text = "providers:\n  p: {grant: static, token: t, colour: 1}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "routes.yaml", {})
    valid = str(err.value).split("valid keys here: ")[1]
    assert "token_url" in valid and "client_auth" in valid
    assert "name," not in valid  # set from the map key, never written by the user


def test_a_yaml_error_names_where_the_broken_construct_starts() -> None:
    text = "routes:\n  - prefix: '/a/\n    upstream: x\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "routes.yaml", {})
    assert "quoted scalar that starts at line 2, column 13" in err.value.problem


@pytest.mark.parametrize(
    ("keys", "where"),
    [
        ({"grant": "client_credentials", "token_url": "http://idp.example/t"}, "token_url"),
        (
            {"grant": "password", "token_url": "https://idp.example/t", "username": "u",
             "password": "PW-MARKER-9", "refresh_url": "http://idp.example/r"},
            "refresh_url",
        ),
        ({"grant": "client_credentials", "issuer": "http://idp.example"}, "issuer"),
        ({"preset": "simacan", "auth_base": "http://auth.example", "username": "u",
          "password": "PW-MARKER-9"}, "token_url"),
    ],
)  # fmt: skip
def test_plain_http_to_a_remote_token_endpoint_is_refused(keys: dict[str, str], where: str) -> None:
    import json

    base = {"client_id": "c", "client_secret": "CS-MARKER-9"} if "grant" in keys else {}
    text = f"providers:\n  p: {json.dumps(base | keys)}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "routes.yaml", {})
    assert err.value.path == f"providers.p.{where}"
    assert "in clear" in err.value.problem and "allow_plain_http" in err.value.problem
    assert "MARKER" not in str(err.value)
    parse_config(text.replace("p: {", 'p: {"allow_plain_http": true, '), "routes.yaml", {})
    loopback = text.replace("idp.example", "127.0.0.1").replace("auth.example", "localhost")
    parse_config(loopback, "routes.yaml", {})
