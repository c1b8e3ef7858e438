"""routes.yaml → typed, validated objects.

Loading runs in three steps, each reporting problems by file and key path:
YAML parse, ``${VAR}``/``*_file`` resolution on the raw tree, then pydantic
validation (presets are merged in by ``proxy.presets`` before validation).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from proxy.forward.spool import unsafe_dir
from proxy.problems import ConfigError
from proxy.tls import TLSFileError, check_files

ADMIN_PREFIX = "/-/"
SECRET_KEYS = frozenset({"password", "client_secret", "token", "key", "client_key_password"})


class Secret(SecretStr):
    """A secret that prints as ``***`` everywhere: repr, str, JSON, validation errors."""

    def _display(self) -> str:
        return "***"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _check_url(value: str, *, what: str) -> str:
    url = URL(value)
    if url.user is not None or url.password is not None:  # yarl drops them: never sent
        raise ValueError(
            f"{what} must not carry credentials (user:password@); "
            "tokenrelay supplies the credentials itself"
        )
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} must be an absolute http(s) URL, got {value!r}")
    if url.fragment:
        raise ValueError(f"{what} must not have a fragment")
    return value


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: traffic to it never leaves the machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


class Listen(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        """Bind fails late and obscurely (a resolver error) on a string that is no host."""
        try:
            ipaddress.ip_address(v)
        except ValueError:
            if len(v) > 253 or not _HOSTNAME.fullmatch(v):
                raise ValueError(
                    f"{v!r} is neither an IP address nor a host name (e.g. 127.0.0.1, ::1, "
                    "0.0.0.0, localhost)"
                ) from None
        return v

    def is_loopback(self) -> bool:
        return is_loopback(self.host)


class Timeout(Model):
    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=60.0, gt=0)


class TLS(Model):
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _pair(self) -> TLS:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        for name in ("ca_file", "client_cert_file", "client_key_file"):
            p = getattr(self, name)
            if p is not None and not p.is_file():
                raise _KeyedError((name,), f"file not found: {p}")
        try:  # loaded here as at start-up, so check and reload refuse what start would
            check_files(self)
        except TLSFileError as exc:
            raise _KeyedError((exc.key,), str(exc)) from None
        return self


class Replay(Model):
    enabled: bool = True
    memory: ByteSize = ByteSize(1024 * 1024)
    max_body: ByteSize = ByteSize(100 * 1024 * 1024)


class ResponseFields(Model):
    """Field names of a non-standard token endpoint's JSON answer."""

    access_token: str = "access_token"
    expires_in: str = "expires_in"
    token_type: str = "token_type"
    refresh_token: str = "refresh_token"
    scope: str = "scope"


class Retry(Model):
    attempts: int = Field(default=3, ge=1, le=20)
    max_time: float = Field(default=10.0, gt=0)
    initial_backoff: float = Field(default=0.2, ge=0)
    max_backoff: float = Field(default=5.0, ge=0)


class RefreshAhead(Model):
    """Renew when ``max(fraction * lifetime, min_seconds)`` (capped below lifetime) remains."""

    fraction: float = Field(default=0.1, ge=0, lt=1)
    min_seconds: float = Field(default=30.0, ge=0)


Grant = Literal["client_credentials", "password", "simacan", "static"]


class Provider(Model):
    """How to obtain one vendor's token. Presets fill keys the user left out."""

    name: str = ""
    preset: Literal["simacan", "simplifi", "simpledocs", "sipsim"] | None = None
    environment: Literal["production", "staging"] | None = None
    optional: bool = False
    grant: Grant
    token_url: str | None = None
    refresh_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    client_auth: Literal["basic", "basic_raw", "body"] = "basic"
    username: str | None = None
    password: Secret | None = None
    scope: str | None = None
    audience: str | None = None
    token: Secret | None = None
    token_params: dict[str, str] = Field(default_factory=dict)
    token_headers: dict[str, str] = Field(default_factory=dict)
    response: ResponseFields = ResponseFields()
    default_lifetime: float = Field(default=3600.0, gt=0)
    refresh_ahead: RefreshAhead = RefreshAhead()
    retry: Retry = Retry()
    cooldown: float = Field(default=30.0, ge=0)
    timeout: Timeout = Timeout(connect=5.0, read=15.0)
    tls: TLS = TLS()

    @field_validator("token_url", "refresh_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, what="token endpoint")

    @model_validator(mode="after")
    def _grant_fields(self) -> Provider:
        need: dict[str, tuple[str, ...]] = {
            "client_credentials": ("token_url", "client_id", "client_secret"),
            "password": ("token_url", "username", "password"),
            "simacan": ("token_url", "refresh_url", "username", "password"),
            "static": ("token",),
        }
        missing = [k for k in need[self.grant] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"grant {self.grant} needs {', '.join(missing)}")
        if self.client_auth == "basic_raw" and ":" in (self.client_id or ""):
            raise ValueError("client_auth basic_raw cannot send a client_id holding ':'")
        return self

    def settings_key(self) -> str:
        """Everything that defines this provider, secrets included: equal keys share a token."""
        dumped = self.model_dump(mode="python")
        for k in ("client_secret", "password", "token"):
            v = getattr(self, k)
            dumped[k] = v.get_secret_value() if v is not None else None
        return repr(sorted(dumped.items()))


_PCHAR = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/"
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Route(Model):
    prefix: str
    upstream: str
    provider: str | None = None
    timeout: Timeout = Timeout()
    replay: Replay = Replay()
    tls: TLS = TLS()
    allow_plain_http: bool = False
    max_body: ByteSize | None = None
    websocket: bool = True
    key_header: str = "X-Api-Key"

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("prefix must start with '/'")
        odd = sorted({c for c in v if c not in _PCHAR and c not in "?#%"})
        if odd:  # the request parser refuses them raw and matching does not decode them
            raise ValueError(
                f"prefix can never match: {', '.join(map(repr, odd))} not allowed; use "
                "letters, digits, '/' and -._~!$&'()*+,;=:@ (RFC 3986 path characters)"
            )
        if v.startswith(ADMIN_PREFIX) or v.rstrip("/") == "/-":
            raise ValueError(f"prefix must not be under the reserved admin prefix {ADMIN_PREFIX}")
        if any(c in v for c in "?#%\\") or "//" in v or "/../" in f"{v}/" or "/./" in f"{v}/":
            raise ValueError(
                "prefix must be a plain path without '?', '#', '%', '\\\\' or dot segments"
            )
        return v

    @field_validator("key_header")
    @classmethod
    def _key_header(cls, v: str) -> str:
        if not _TOKEN.fullmatch(v):
            raise ValueError(
                f"{v!r} cannot be a header name (RFC 9110 token: letters, digits and "
                "!#$%&'*+-.^_`|~, no spaces or ':')"
            )
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        _check_url(v, what="upstream")
        if URL(v).query_string:
            raise ValueError("upstream must not have a query string")
        return v

    @property
    def match_prefix(self) -> str:
        """The prefix without its trailing slash; matching happens at segment boundaries."""
        return self.prefix.rstrip("/") or "/"


class Client(Model):
    id: str
    key_sha256: str | None = None
    key: Secret | None = None
    routes: list[str] = Field(default_factory=lambda: ["/"])
    rate: str | None = None
    burst: int | None = Field(default=None, ge=1)

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("key_sha256 must be 64 hex digits")
        return None if v is None else v.lower()

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+(\.\d+)?/(s|m|h)", v):
            raise ValueError("rate must look like 50/s, 600/m or 1000/h")
        if v is not None and float(v.split("/")[0]) == 0:
            raise ValueError("rate must be above 0 (0 would refuse every request); omit it")
        return v

    @model_validator(mode="after")
    def _one_key(self) -> Client:
        if (self.key_sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of key_sha256, key or key_file")
        return self


class Limits(Model):
    max_line_size: int = Field(default=8190, ge=256)
    max_field_size: int = Field(default=8190, ge=256)
    max_headers: int = Field(default=100, ge=1)
    max_body: ByteSize | None = None
    keepalive_timeout: float = Field(default=75.0, gt=0)
    header_timeout: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=10000, ge=1)
    # process-wide: what all replayable request bodies together may hold, in memory and in
    # spool files; a body past them streams without the replay option
    replay_memory: ByteSize = ByteSize(64 * 1024 * 1024)
    replay_disk: ByteSize = ByteSize(1024 * 1024 * 1024)


def _network(v: str) -> str:
    """Parsed again at build time; a bad entry must fail here, with its index."""
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(
            f"{v!r} is not an IP address or network (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8)"
        ) from None
    return v


def _spool_dir(v: Path | None) -> Path | None:
    """What ``spool_root`` would refuse, found without creating anything: start-up makes
    the directory (0700) and refuses it again if it changed meanwhile."""
    if v is None:
        return v
    existing = next((p for p in (v, *v.parents) if os.path.lexists(p)), None)
    if existing is not None and existing != v and not existing.is_dir():
        raise ValueError(f"cannot create {v}: {existing} is not a directory")
    if existing != v:
        return v
    try:
        problem = unsafe_dir(v.stat())
    except OSError as exc:
        raise ValueError(f"{v} is unusable: {exc.strerror}") from None
    if problem is not None:
        raise ValueError(f"{v} {problem}")
    return v


class Config(Model):
    listen: Listen = Listen()
    admin: Listen | None = None
    providers: dict[str, Provider] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    clients: list[Client] = Field(default_factory=list)
    limits: Limits = Limits()
    spool_dir: Annotated[Path | None, AfterValidator(_spool_dir)] = None
    shutdown_grace: float = Field(default=30.0, ge=0)
    trusted_proxies: list[Annotated[str, AfterValidator(_network)]] = Field(default_factory=list)
    allow_unauthenticated: bool = False
    trust_env: bool = True

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Config:
        inactive = (info.context or {}).get("inactive", set())
        seen: set[str] = set()
        for i, r in enumerate(self.routes):
            if r.match_prefix in seen:
                raise _KeyedError(("routes", i, "prefix"), f"duplicate prefix {r.prefix!r}")
            seen.add(r.match_prefix)
            known = r.provider in self.providers or r.provider in inactive
            if r.provider is not None and not known:
                raise _KeyedError(
                    ("routes", i, "provider"), f"provider {r.provider!r} is not defined"
                )
            if r.provider is not None and not r.allow_plain_http and _plain_remote(r.upstream):
                raise _KeyedError(
                    ("routes", i, "upstream"),
                    f"route {r.prefix} would send the {r.provider} token over plain HTTP to "
                    f"{URL(r.upstream).host}; use https or set allow_plain_http: true",
                )
        _check_clients(self.clients, seen)
        return self


def _check_clients(clients: list[Client], prefixes: set[str]) -> None:
    """Ids name clients in logs and metrics: two alike could not be told apart. A route
    entry that matches no route grants nothing (``ClientAccess``'s rule: at a segment
    boundary, and ``/`` is every route)."""
    ids: set[str] = set()
    for i, c in enumerate(clients):
        if c.id in ids:
            raise _KeyedError(("clients", i, "id"), f"duplicate client id {c.id!r}")
        ids.add(c.id)
        for j, p in enumerate(c.routes):
            want = p.rstrip("/") or "/"
            if want != "/" and not any(r == want or r.startswith(want + "/") for r in prefixes):
                raise _KeyedError(
                    ("clients", i, "routes", j), f"no route has prefix {p!r} or one under it"
                )


def _plain_remote(url: str) -> bool:
    """An http:// URL to a host that is not loopback: a token sent there crosses a network."""
    u = URL(url)
    return u.scheme == "http" and not is_loopback(u.host or "")


class _KeyedError(ValueError):
    """An error that knows its key path, relative to the model that raised it."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc


# ---------------------------------------------------------------------------
# loading


@dataclass
class Loaded:
    """A validated config plus what start-up should say about it."""

    config: Config
    path: str
    inactive_providers: dict[str, list[str]] = field(default_factory=dict)

    def route_waits_for(self, route: Route) -> list[str]:
        if route.provider is None:
            return []
        return self.inactive_providers.get(route.provider, [])


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")


def format_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class _Unset(Exception):
    def __init__(self, loc: tuple[str | int, ...], var: str) -> None:
        self.loc = loc
        self.var = var


def _interpolate(value: str, loc: tuple[str | int, ...], env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise _Unset(loc, name)

    return _VAR.sub(sub, value)


def _resolve(
    node: Any, loc: tuple[str | int, ...], env: Mapping[str, str], base: Path, file: str
) -> Any:
    """Interpolate variables and read ``*_file`` keys, depth first."""
    if isinstance(node, str):
        return _interpolate(node, loc, env)
    if isinstance(node, list):
        return [_resolve(v, (*loc, i), env, base, file) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if not isinstance(k, str):
            raise ConfigError(file, format_path(loc), f"key {k!r} must be a string")
        val = _resolve(v, (*loc, k), env, base, file)
        if k.endswith("_file") and k[: -len("_file")] in SECRET_KEYS:
            target = k[: -len("_file")]
            if target in node:
                raise ConfigError(file, format_path((*loc, k)), f"give {target} or {k}, not both")
            out[target] = _read_secret_file(val, base, file, (*loc, k))
        else:
            out[k] = val
    return out


def _read_secret_file(val: Any, base: Path, file: str, loc: tuple[str | int, ...]) -> str:
    if not isinstance(val, str):
        raise ConfigError(file, format_path(loc), "must be a file path")
    p = Path(val)
    p = p if p.is_absolute() else base / p
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(file, format_path(loc), f"cannot read {p}: {exc.strerror}") from None


def _resolve_providers(
    raw: dict[str, Any], env: Mapping[str, str], base: Path, file: str
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Providers marked ``optional`` whose variables are unset become inactive, not errors."""
    from proxy.presets import apply_preset

    providers = raw.get("providers") or {}
    if not isinstance(providers, dict):
        raise ConfigError(file, "providers", "must be a mapping of name to provider")
    resolved: dict[str, Any] = {}
    inactive: dict[str, list[str]] = {}
    for name, body in providers.items():
        loc: tuple[str | int, ...] = ("providers", str(name))
        if not isinstance(body, dict):
            raise ConfigError(file, format_path(loc), "must be a mapping")
        missing = _unset_vars(body, env)
        if missing and body.get("optional") is True:
            inactive[str(name)] = missing
            continue
        try:
            data = _resolve(body, loc, env, base, file)
        except _Unset as exc:
            raise ConfigError(
                file, format_path(exc.loc), f"environment variable {exc.var} is not set"
            ) from None
        _simacan_only(data, file, loc)
        resolved[str(name)] = apply_preset(data, file, loc) | {"name": str(name)}
    return resolved, inactive


def _simacan_only(data: dict[str, Any], file: str, loc: tuple[str | int, ...]) -> None:
    """Only the Simacan preset reads these; elsewhere they would be silently dropped."""
    if data.get("preset") == "simacan":
        return
    for key in ("auth_base", "environment"):
        if key in data:
            raise ConfigError(
                file,
                format_path((*loc, key)),
                f"{key} applies only with preset: simacan; set token_url instead",
            )


def _unset_vars(node: Any, env: Mapping[str, str]) -> list[str]:
    if isinstance(node, str):
        return [
            m.group(1)
            for m in _VAR.finditer(node)
            if m.group(1) and m.group(2) is None and m.group(1) not in env
        ]
    if isinstance(node, list):
        return [v for item in node for v in _unset_vars(item, env)]
    if isinstance(node, dict):
        return [v for item in node.values() for v in _unset_vars(item, env)]
    return []


def parse_config(
    text: str,
    file: str = "<config>",
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> Loaded:
    env = os.environ if env is None else env
    base = base or Path(".")
    try:
        raw = _load_yaml(text, file)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            file, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}"
        ) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "top level must be a mapping")
    providers, inactive = _resolve_providers(raw, env, base, file)
    rest = {k: v for k, v in raw.items() if k != "providers"}
    try:
        data = _resolve(rest, (), env, base, file)
    except _Unset as exc:
        raise ConfigError(
            file, format_path(exc.loc), f"environment variable {exc.var} is not set"
        ) from None
    data["providers"] = providers
    try:
        config = _validate(data, inactive)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _KeyedError):
            loc = (*loc, *ctx_err.loc)
            msg = str(ctx_err)
        else:
            msg = _message(err)
        extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(file, format_path(loc), msg + extra) from None
    return Loaded(config=config, path=file, inactive_providers=inactive)


def _load_yaml(text: str, file: str) -> Any:
    """``yaml.safe_load``, but a key given twice is an error, not a silent last-one-wins."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_duplicate_keys(node, (), file)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _no_duplicate_keys(node: yaml.Node, loc: tuple[str | int, ...], file: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(item, (*loc, i), file)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[tuple[str, str]] = set()
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            if (key.tag, key.value) in seen:
                line = key.start_mark.line + 1
                raise ConfigError(
                    file, format_path((*loc, key.value)), f"duplicate key (again on line {line})"
                )
            seen.add((key.tag, key.value))
        name = key.value if isinstance(key, yaml.ScalarNode) else "?"
        _no_duplicate_keys(value, (*loc, name), file)


def _validate(data: dict[str, Any], inactive: Mapping[str, list[str]]) -> Config:
    return Config.model_validate(data, context={"inactive": set(inactive)})


def _message(err: Any) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Loaded:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read config: {exc.strerror}") from None
    return parse_config(text, str(p), env, p.parent)
