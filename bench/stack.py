"""The pieces under test: nginx configs, the tokenrelay config and the running stack."""

# ruff: noqa: S603

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (
    BENCH,
    DIRECT,
    FLOOR,
    NGINX,
    NGINX_TLS,
    PROVIDER,
    ROOT,
    SMALL_BODY,
    STATIC_TOKEN,
    TLS_CIPHERS,
    TOKENRELAY,
    TOKENRELAY_TLS,
    BenchError,
    Mode,
    Procs,
    free_port,
    http_get,
    log,
    process_tree,
    wait_ready,
)

# ---------------------------------------------------------------------------
# the pieces under test


@dataclass(frozen=True)
class Target:
    name: str
    base: str
    static_prefix: str
    sink_base: str
    pid: int | None
    ca: Path | None = None  # an https target's certificate, for curl and the check

    @property
    def curl_args(self) -> list[str]:
        return ["--cacert", str(self.ca)] if self.ca is not None else []

    @property
    def small(self) -> str:
        return f"{self.base}{self.static_prefix}small"

    @property
    def big(self) -> str:
        return f"{self.base}{self.static_prefix}big"

    @property
    def sink(self) -> str:
        return f"{self.sink_base}/sink/upload"

    def tree(self) -> list[int]:
        return process_tree(self.pid) if self.pid is not None else []


def nginx_common(work: Path, name: str) -> str:
    """Settings both nginx instances share: own prefix, pid, temp paths; no system files."""
    user = "user root root;" if os.geteuid() == 0 else ""
    tmp = work / f"{name}-tmp"
    tmp.mkdir()
    temps = (
        "\n".join(
            f"  {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi")
        )
        + f"\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;"
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
{temps}
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
"""


def upstream_conf(work: Path, port: int, docroot: Path) -> str:
    return (
        nginx_common(work, "upstream")
        + f"""  access_log off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {docroot};
  }}
}}
"""
    )


def nginx_proxy_conf(
    work: Path, port: int, upstream: str, backends: str, tls: tuple[Path, Path] | None = None
) -> str:
    """The equivalent proxy: pooled keep-alive upstreams, static token, streaming both ways.

    256 KiB buffers: with nginx's defaults (16 KiB client body buffer) uploads cost it twice
    the CPU, and a baseline that is easy to beat would flatter tokenrelay. ``tls``: the
    listener terminates TLS with this certificate and key, with tokenrelay's profile.
    """
    name, ssl_opt, ssl_conf = NGINX, "", ""
    if tls is not None:
        name, ssl_opt = NGINX_TLS, " ssl"
        ssl_conf = (
            f"    ssl_certificate {tls[0]};\n    ssl_certificate_key {tls[1]};\n"
            f"    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_ciphers {TLS_CIPHERS};\n"
            "    ssl_session_tickets off;\n"
        )
    return (
        nginx_common(work, name)
        + f"""  access_log {work}/{name}-access.log;
  upstream static_pool {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}
  upstream sink_pool {{ server {backends}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port}{ssl_opt} backlog=4096;
{ssl_conf}    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $proxy_host;
    proxy_set_header Authorization "Bearer {STATIC_TOKEN}";
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_request_buffering off;
    proxy_buffering on;
    proxy_max_temp_file_size 0;
    client_body_buffer_size 256k;
    proxy_buffer_size 256k;
    proxy_buffers 4 256k;
    proxy_busy_buffers_size 512k;
    location /up/ {{ proxy_pass http://static_pool/; }}
    location /sink/ {{ proxy_pass http://sink_pool/sink/; }}
  }}
}}
"""
    )


def tokenrelay_conf(
    port: int, upstream: str, backends: str, tls: tuple[Path, Path] | None = None
) -> str:
    """The contract's config shape: one client-credentials provider, two routes."""
    listen_tls = f", tls: {{cert_file: {tls[0]}, key_file: {tls[1]}}}" if tls else ""
    return f"""listen: {{host: 127.0.0.1, port: {port}{listen_tls}}}
shutdown_grace: 2
providers:
  {PROVIDER}:
    grant: client_credentials
    token_url: "http://{backends}/oauth/token"
    client_id: {PROVIDER}
    client_secret: bench-secret
    client_auth: body
routes:
  - prefix: /up/
    upstream: "http://{upstream}/"
    provider: {PROVIDER}
    allow_plain_http: true
  - prefix: /sink/
    upstream: "http://{backends}/sink/"
    provider: {PROVIDER}
    allow_plain_http: true
"""


class Stack:
    """Starts the backends, the upstream and the two proxies; knows where everything is."""

    def __init__(self, procs: Procs, work: Path, mode: Mode, notes: list[str]) -> None:
        self.procs, self.work, self.mode, self.notes = procs, work, mode, notes
        self.docroot = work / "www"
        self.backends = f"127.0.0.1:{free_port()}"
        self.upstream = self.backends
        self.targets: dict[str, Target] = {}

    def make_files(self) -> None:
        self.docroot.mkdir()
        self.docroot.chmod(0o755)
        (self.docroot / "small").write_bytes(SMALL_BODY)
        with (self.docroot / "big").open("wb") as f:
            f.truncate(self.mode.body)

    def start_all(self) -> None:
        self.make_files()
        self.start_backends()
        self.start_upstream()
        self.targets[DIRECT] = Target(
            DIRECT, f"http://{self.upstream}", "/", f"http://{self.backends}", None
        )
        starts = ((TOKENRELAY, self.start_tokenrelay), (NGINX, self.start_nginx))
        tls = ((TOKENRELAY_TLS, self.start_tokenrelay_tls), (NGINX_TLS, self.start_nginx_tls))
        for name, start in (*starts, (FLOOR, self.start_floor), *tls):
            try:
                self.targets[name] = start()
            except BenchError as exc:
                self.notes.append(f"{name} not measured: {exc}")
                log(f"{name} not measured: {exc}")

    def certificate(self) -> tuple[Path, Path]:
        """One self-signed ECDSA P-256 certificate for 127.0.0.1, made once for both."""
        cert, key = self.work / "tls.crt", self.work / "tls.key"
        if cert.exists():
            return cert, key
        argv = [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
            "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1",
        ]  # fmt: skip
        try:
            subprocess.run(argv, capture_output=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"openssl could not make a certificate: {exc}") from None
        key.chmod(0o644)  # nginx's worker runs as another user when not root
        return cert, key

    def start_backends(self) -> None:
        port = self.backends.rsplit(":", 1)[1]
        argv = [sys.executable, str(BENCH / "backends.py"), "--port", port]
        if shutil.which("nginx") is None:
            argv += ["--docroot", str(self.docroot)]
            self.notes.append("nginx missing: the aiohttp backends serve the static files")
        proc = self.procs.start("backends", argv)
        wait_ready(self.procs, "backends", proc, f"http://{self.backends}/calls")

    def start_upstream(self) -> None:
        if shutil.which("nginx") is None:
            return
        self.upstream = f"127.0.0.1:{free_port()}"
        port = int(self.upstream.rsplit(":", 1)[1])
        self.run_nginx("upstream", upstream_conf(self.work, port, self.docroot), self.upstream)

    def run_nginx(
        self, name: str, conf: str, addr: str, ca: Path | None = None
    ) -> subprocess.Popen[bytes]:
        path = self.work / f"{name}.conf"
        path.write_text(conf)
        argv = ["nginx", "-p", str(self.work), "-c", str(path), "-e", f"{self.work}/{name}-e.log"]
        proc = self.procs.start(name, argv)
        scheme, under = ("https" if ca else "http"), ("" if name == "upstream" else "up/")
        wait_ready(self.procs, name, proc, f"{scheme}://{addr}/{under}small", ca)
        return proc

    def start_tokenrelay(self, tls: bool = False) -> Target:
        if not (ROOT / "proxy" / "cli.py").exists() or not (ROOT / "proxy" / "app.py").exists():
            raise BenchError("proxy/cli.py or proxy/app.py does not exist yet")
        port = free_port()
        name, pair = (TOKENRELAY_TLS, self.certificate()) if tls else (TOKENRELAY, None)
        conf = self.work / f"{name}.yaml"
        conf.write_text(tokenrelay_conf(port, self.upstream, self.backends, pair))
        argv = [sys.executable, "-m", "proxy", "--config", str(conf), "--log-format", "json"]
        proc = self.procs.start(name, argv)
        base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        ca = pair[0] if pair else None
        wait_ready(self.procs, name, proc, f"{base}/-/health", ca)
        return Target(name, base, "/up/", base, proc.pid, ca)

    def start_nginx(self, tls: bool = False) -> Target:
        if shutil.which("nginx") is None:
            raise BenchError("nginx is not installed")
        port = free_port()
        addr = f"127.0.0.1:{port}"
        name, pair = (NGINX_TLS, self.certificate()) if tls else (NGINX, None)
        conf = nginx_proxy_conf(self.work, port, self.upstream, self.backends, pair)
        ca = pair[0] if pair else None
        proc = self.run_nginx(name, conf, addr, ca)
        base = f"{'https' if tls else 'http'}://{addr}"
        return Target(name, base, "/up/", base, proc.pid, ca)

    def start_tokenrelay_tls(self) -> Target:
        return self.start_tokenrelay(tls=True)

    def start_nginx_tls(self) -> Target:
        return self.start_nginx(tls=True)

    def start_floor(self) -> Target:
        port = free_port()
        argv = [sys.executable, str(BENCH / "floor.py"), str(port), self.upstream]
        proc = self.procs.start(FLOOR, argv)
        base = f"http://127.0.0.1:{port}"
        wait_ready(self.procs, FLOOR, proc, f"{base}/up/small")
        return Target(FLOOR, base, "/up/", base, proc.pid)

    def check(self, target: Target) -> None:
        """Refuse to time a path that serves the wrong thing: fast 404s prove nothing."""
        status, body = http_get(target.small, ca=target.ca)
        if status != 200 or body != SMALL_BODY:
            raise BenchError(f"{target.small} answered {status} with {len(body)} bytes")
