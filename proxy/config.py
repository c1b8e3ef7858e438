"""routes.yaml → typed, validated objects.

Loading runs in three steps, each reporting problems by file and key path:
YAML parse, ``${VAR}``/``*_file`` resolution on the raw tree, then pydantic
validation (presets are merged in by ``proxy.presets`` before validation).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import typing
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
from proxy.listener_tls import ListenTLS, canonical_subject, check_listener_tls
from proxy.problems import ConfigError
from proxy.signing_keys import KeyFileError, load_signing_key
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
    tls: ListenTLS | None = None

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

    @model_validator(mode="after")
    def _tls_files(self) -> Listen:
        """Loaded as start-up would (proxy.listener_tls), so check and reload refuse it too."""
        if self.tls is not None:
            try:
                check_listener_tls(self.tls)
            except TLSFileError as exc:
                raise _KeyedError(("tls", exc.key), str(exc)) from None
        return self

    @property
    def mtls(self) -> bool:
        """Clients must present a certificate signed by ``tls.client_ca_file``."""
        return self.tls is not None and self.tls.client_ca_file is not None


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


class WebSocket(Model):
    """``websocket: true|false`` or the mapping; a bool is ``enabled`` alone."""

    enabled: bool = True
    max_message: ByteSize = Field(default=ByteSize(4 * 1024 * 1024), gt=0)


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


ClientAuth = Literal[
    "basic", "basic_raw", "body", "private_key_jwt", "client_secret_jwt", "tls_client_auth"
]
NO_SECRET_AUTH = frozenset({"private_key_jwt", "tls_client_auth"})  # no client_secret at all
ASYMMETRIC_ALGS = ("RS256", "PS256", "ES256", "ES384")


class Provider(Model):
    """How to obtain one vendor's token. Presets fill keys the user left out."""

    name: str = ""
    preset: Literal["simacan", "simplifi", "simpledocs", "sipsim"] | None = None
    environment: Literal["production", "staging"] | None = None
    optional: bool = False
    grant: Grant
    token_url: str | None = None
    issuer: str | None = None
    refresh_url: str | None = None
    allow_plain_http: bool = False
    client_id: str | None = None
    client_secret: Secret | None = None
    client_auth: ClientAuth = "basic"
    private_key_file: Path | None = None
    key_id: str | None = None
    signing_alg: str | None = None
    assertion_audience: str | None = None
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

    @field_validator("token_url", "refresh_url", "issuer")
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
        needed = need[self.grant]
        if self.issuer is not None and self.grant in ("client_credentials", "password"):
            needed = tuple(k for k in needed if k != "token_url")  # discovery gives it
        if self.client_auth in NO_SECRET_AUTH:
            needed = tuple(k for k in needed if k != "client_secret")
        missing = [k for k in needed if getattr(self, k) is None]
        if missing:
            raise ValueError(f"grant {self.grant} needs {', '.join(missing)}")
        if self.client_auth == "basic_raw" and ":" in (self.client_id or ""):
            raise ValueError("client_auth basic_raw cannot send a client_id holding ':'")
        self._client_auth_fields()
        if self.issuer is not None and self.token_url is not None:
            raise _KeyedError(("issuer",), "give token_url or issuer (discovery), not both")
        self._no_plain_http()
        return self

    def _no_plain_http(self) -> None:
        """Token, refresh and discovery requests carry passwords, secrets and assertions:
        the upstream rule (loopback, or an explicit allow_plain_http) holds for them too."""
        if self.allow_plain_http:
            return
        for key in ("token_url", "refresh_url", "issuer"):
            url = getattr(self, key)
            if url is not None and plain_remote(url):
                via = " (from auth_base)" if self.preset == "simacan" and key != "issuer" else ""
                raise _KeyedError(
                    (key,),
                    f"plain http to {URL(url).host}{via} would send the credentials in clear; "
                    "use https or set allow_plain_http: true",
                )

    def _client_auth_fields(self) -> None:
        """What each OIDC Core §9 / RFC 8705 method needs, refused at its key."""
        method = self.client_auth
        if method == "private_key_jwt":
            if self.private_key_file is None:
                raise _KeyedError(("private_key_file",), "client_auth private_key_jwt needs it")
            try:
                load_signing_key(self.private_key_file, self.signing_alg, self.key_id)
            except KeyFileError as exc:
                raise _KeyedError(("private_key_file",), str(exc)) from None
        elif self.private_key_file is not None:
            raise _KeyedError(("private_key_file",), "applies only to private_key_jwt")
        if method == "client_secret_jwt" and self.signing_alg not in (None, "HS256"):
            raise _KeyedError(("signing_alg",), "client_secret_jwt signs with HS256")
        if method == "tls_client_auth" and self.tls.client_cert_file is None:
            raise _KeyedError(
                ("tls", "client_cert_file"),
                "client_auth tls_client_auth needs a client certificate",
            )

    @field_validator("signing_alg")
    @classmethod
    def _alg(cls, v: str | None) -> str | None:
        if v is None or v in (*ASYMMETRIC_ALGS, "HS256"):
            return v
        if v.lower() == "none":
            raise ValueError("none is refused: an unsigned assertion proves nothing")
        if v.upper().startswith("HS"):
            raise ValueError(f"{v} is refused: client_secret_jwt signs with HS256")
        raise ValueError(f"{v} is not one of {', '.join(ASYMMETRIC_ALGS)}, HS256")

    def settings_key(self) -> str:
        """Everything that defines this provider, secrets included: equal keys share a token."""
        dumped = self.model_dump(mode="python")
        for k in ("client_secret", "password", "token"):
            v = getattr(self, k)
            dumped[k] = v.get_secret_value() if v is not None else None
        if self.private_key_file is not None:  # a key rotated in place is another identity
            with contextlib.suppress(OSError):
                dumped["private_key"] = hashlib.sha256(self.private_key_file.read_bytes()).digest()
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
    websocket: WebSocket = WebSocket()
    key_header: str = "X-Api-Key"

    @field_validator("websocket", mode="before")
    @classmethod
    def _websocket(cls, v: object) -> object:
        if isinstance(v, bool):
            return {"enabled": v}
        if not isinstance(v, dict | WebSocket):
            raise ValueError("websocket must be true, false or a mapping {enabled, max_message}")
        return v

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
    cert_subject: str | None = None
    cert_san: str | None = None

    @field_validator("cert_subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        return None if v is None else canonical_subject(v)

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
        if self.key_sha256 is not None and self.key is not None:
            raise ValueError("give one of key_sha256, key or key_file, not several")
        if self.key_sha256 is None and self.key is None and not self.by_cert:
            raise ValueError(
                "give one of key_sha256, key or key_file, or cert_subject / cert_san "
                "(with listen.tls.client_ca_file)"
            )
        return self

    @property
    def by_cert(self) -> bool:
        return self.cert_subject is not None or self.cert_san is not None


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
            if r.provider is not None and not r.allow_plain_http and plain_remote(r.upstream):
                raise _KeyedError(
                    ("routes", i, "upstream"),
                    f"route {r.prefix} would send the {r.provider} token over plain HTTP to "
                    f"{URL(r.upstream).host}; use https or set allow_plain_http: true",
                )
        _check_clients(self.clients, seen)
        for i, c in enumerate(self.clients):
            if c.by_cert and not self.listen.mtls:
                which = "cert_subject" if c.cert_subject is not None else "cert_san"
                raise _KeyedError(
                    ("clients", i, which),
                    "identifies the client by its certificate, but no certificate is asked "
                    "for: set listen.tls.client_ca_file",
                )
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


def plain_remote(url: str) -> bool:
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
    restart_needed: list[str] = field(default_factory=list)
    secret_files: dict[str, Path] = field(default_factory=dict)
    """Files a secret or a provider's key was read from, by key path: watched for rotation."""
    """Start-only keys this load changes that the running process kept (see startonly)."""

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
    node: Any,
    loc: tuple[str | int, ...],
    env: Mapping[str, str],
    base: Path,
    file: str,
    read: dict[str, Path],
) -> Any:
    """Interpolate variables and read ``*_file`` keys, depth first; ``read`` collects the
    files read, by key path, for the watch that picks up a rotated secret."""
    if isinstance(node, str):
        return _interpolate(node, loc, env)
    if isinstance(node, list):
        return [_resolve(v, (*loc, i), env, base, file, read) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if not isinstance(k, str):
            raise ConfigError(file, format_path(loc), f"key {k!r} must be a string")
        val = _resolve(v, (*loc, k), env, base, file, read)
        tls_key_path = k == "key_file" and loc[-1:] == ("tls",)  # listen.tls: a path, kept
        if k.endswith("_file") and k[: -len("_file")] in SECRET_KEYS and not tls_key_path:
            target = k[: -len("_file")]
            if target in node:
                raise ConfigError(file, format_path((*loc, k)), f"give {target} or {k}, not both")
            out[target] = _read_secret_file(val, base, file, (*loc, k), read)
        else:
            out[k] = val
    return out


def _read_secret_file(
    val: Any, base: Path, file: str, loc: tuple[str | int, ...], read: dict[str, Path]
) -> str:
    if not isinstance(val, str):
        raise ConfigError(file, format_path(loc), "must be a file path")
    p = Path(val)
    p = p if p.is_absolute() else base / p
    read[format_path(loc)] = p
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(file, format_path(loc), f"cannot read {p}: {exc.strerror}") from None


def _resolve_providers(
    raw: dict[str, Any], env: Mapping[str, str], base: Path, file: str, read: dict[str, Path]
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
            data = _resolve(body, loc, env, base, file, read)
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
        raise ConfigError(file, "", f"invalid YAML: {_yaml_problem(exc)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "top level must be a mapping")
    read: dict[str, Path] = {}
    providers, inactive = _resolve_providers(raw, env, base, file, read)
    rest = {k: v for k, v in raw.items() if k != "providers"}
    try:
        data = _resolve(rest, (), env, base, file, read)
    except _Unset as exc:
        raise ConfigError(
            file, format_path(exc.loc), f"environment variable {exc.var} is not set"
        ) from None
    data["providers"] = providers
    try:
        config = _validate(data, inactive)
    except ValidationError as exc:
        (where, msg), *others = [_described(err) for err in exc.errors()]
        also = "".join(f"\n  and {p or 'top level'}: {m}" for p, m in others)
        raise ConfigError(file, where, msg + also) from None
    read.update(_provider_files(config))
    return Loaded(config=config, path=file, inactive_providers=inactive, secret_files=read)


def _provider_files(config: Config) -> dict[str, Path]:
    """Key files and TLS files of providers: what determines their tokens, by key path."""
    out: dict[str, Path] = {}
    for name, p in config.providers.items():
        tls = {f"tls.{k}": getattr(p.tls, k) for k in _TLS_FILES}
        for key, path in {"private_key_file": p.private_key_file, **tls}.items():
            if path is not None:
                out[format_path(("providers", name, *key.split(".")))] = Path(path)
    return out


_TLS_FILES = ("ca_file", "client_cert_file", "client_key_file")


def _described(err: Any) -> tuple[str, str]:
    """One validation error as (key path, problem); every one of them is reported."""
    loc = tuple(err["loc"])
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _KeyedError):
        return format_path((*loc, *ctx_err.loc)), str(ctx_err)
    msg = _message(err)
    if err["type"] == "extra_forbidden":
        valid = _keys_at(loc[:-1])
        msg += f" (valid keys here: {', '.join(valid)})" if valid else ""
    return format_path(loc), msg


def _keys_at(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at ``loc`` takes, found by walking the field types from Config."""
    kind: Any = Config
    for part in loc:
        fields = getattr(kind, "model_fields", None)
        if fields is not None and isinstance(part, str) and part in fields:
            kind = fields[part].annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        while args and getattr(kind, "model_fields", None) is None:
            kind = args[-1]  # Optional[X] → X, list[X] → X, dict[str, X] → X
            args = [a for a in typing.get_args(kind) if a is not type(None)]
    fields = getattr(kind, "model_fields", None)
    internal = {"name"} if kind is Provider else set()  # set by the loader, from the map key
    return sorted(set(fields) - internal) if fields is not None else []


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where the parser noticed, and where the broken construct began (often the real
    mistake: an unclosed quote or bracket lines above)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    text = f"{where}{getattr(exc, 'problem', None) or exc}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        text += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    return text


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
