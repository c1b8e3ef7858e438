"""``make bench``: direct, tokenrelay and nginx side by side, in one bounded run.

Why one run: the machine is shared and noisy, so only figures taken minutes apart on the same
machine are comparable; every figure is also given as a ratio to direct and to nginx.

What runs, all on 127.0.0.1 on free ports, all started and stopped here (also on Ctrl-C):

* upstream: nginx (1 worker) serving a 100-byte file and a sparse 1 GiB file;
* backends (bench/backends.py): a token endpoint that counts calls, and an upload sink that
  reads every byte before answering (nginx's ``return 204`` answers before the body is read);
* tokenrelay (``python -m proxy``) with every feature on: token injection, access log;
* nginx (1 worker) as the equivalent proxy: keep-alive upstream pool, HTTP/1.1, a static
  ``Authorization: Bearer`` header, access log on, streaming both ways.

wrk drives small responses at 1 and 64 connections, curl streams 1 GiB down and up. CPU time
comes from /proc/PID/stat of the proxy's process tree, RSS from /proc/PID/status.

The TLS row: tokenrelay and nginx again, each terminating TLS on its listener with one
certificate made here (``openssl req``, ECDSA P-256), measured with small responses and a
1 GiB download in front of the same plain upstream.

``--quick`` is a smoke run for development (2 s per wrk run, 64 MiB bodies); it writes to
bench/results/raw/ so it never overwrites bench/RESULTS.md. ``--profile PATH`` adds one more
64-connection run on tokenrelay under py-spy (not counted in the figures) and summarises it.
"""

# The bench exists to run fixed local tools (nginx, wrk, curl, apt-get, py-spy):
# ruff: noqa: S603, S607

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RAW_DIR = BENCH / "results" / "raw"
MIB = 1 << 20
GIB = 1 << 30
SMALL_BODY = (b"tokenrelay bench small response; " * 4)[:99] + b"\n"
STATIC_TOKEN = "bench-static-token"
PROVIDER = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNS = (1, 64)

TARGET_CPU_US = 60.0
TARGET_ADDED_P50_MS = 0.10
TARGET_GBPS = 1.0
TARGET_CPU_S_PER_GIB = 0.8
TARGET_RSS_MB = 60.0

DIRECT, TOKENRELAY, NGINX = "direct", "tokenrelay", "nginx"
NAMES = (DIRECT, TOKENRELAY, NGINX)
FLOOR = "floor"  # bench/floor.py: small responses only, a calibration, not a competitor
TOKENRELAY_TLS, NGINX_TLS = "tokenrelay-tls", "nginx-tls"  # the TLS row: HTTPS listeners
TLS_NAMES = (TOKENRELAY_TLS, NGINX_TLS)
# what tokenrelay's listener allows (proxy/listener_tls.py): nginx is held to the same
TLS_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%.1f,\\"p99_us\\":%.1f,"
    .. "\\"socket_errors\\":%d,\\"status_errors\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True)
class Mode:
    name: str
    duration: float
    warmup: float
    body: int
    transfers: int


FULL = Mode("full", duration=10.0, warmup=3.0, body=GIB, transfers=2)
QUICK = Mode("quick", duration=2.0, warmup=1.0, body=64 * MIB, transfers=1)


class BenchError(Exception):
    """A step that failed; the run goes on with what can still be measured."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# tools


def child_env() -> dict[str, str]:
    """No proxy variables: every request here must go straight to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def apt_candidate(package: str) -> bool:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    match = re.search(r"Candidate:\s*(\S+)", out)
    return match is not None and match.group(1) != "(none)"


def ensure_tools(notes: list[str]) -> None:
    """Install nginx, wrk and curl from Debian's packages when missing and we may."""
    wanted = {"nginx": "nginx-light", "wrk": "wrk", "curl": "curl"}
    missing = [tool for tool in wanted if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        notes.append(f"not installed and cannot install (need root and apt-get): {missing}")
        return
    log(f"installing {missing} with apt-get")
    env = child_env() | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=240, check=True)
        packages = [wanted[tool] for tool in missing]
        if "nginx-light" in packages and not apt_candidate("nginx-light"):
            packages[packages.index("nginx-light")] = "nginx"
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *packages], env=env, timeout=400, check=True
        )
    except (subprocess.SubprocessError, OSError) as exc:
        notes.append(f"apt-get could not install {missing}: {exc}")
    still = [tool for tool in missing if shutil.which(tool) is None]
    if still:
        notes.append(f"missing after install attempt, measured without them: {still}")


def version_of(argv: Sequence[str], pattern: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    match = re.search(pattern, proc.stdout + proc.stderr)
    return match.group(1) if match else "unknown"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = version_of(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"(\w+)")
    dirty = version_of(["git", "-C", str(ROOT), "status", "--porcelain", "proxy"], r"(\S+)")
    if dirty not in ("unknown", "not installed"):
        commit += " + uncommitted changes in proxy/"
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "nginx": version_of(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": version_of(["wrk", "-v"], r"wrk (?:debian/)?(\S+)"),
        "curl": version_of(["curl", "--version"], r"curl (\S+)"),
        "tokenrelay commit": commit,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# ---------------------------------------------------------------------------
# processes


class Procs:
    """Every child the bench starts; all are stopped on the way out, whatever happened."""

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Output goes to a file per child: it is read back when a child fails to start."""
        out = (self._logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=ROOT, env=child_env(), start_new_session=True,
        )  # fmt: skip
        self._procs.append((name, proc, out))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self._logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for _name, proc, _out in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc, out in reversed(self._procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            out.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0, ca: Path | None = None) -> tuple[int, bytes]:
    """``ca``: the certificate an https URL is verified against."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    procs: Procs, name: str, proc: subprocess.Popen[bytes], url: str, ca: Path | None = None
) -> None:
    """Poll until ``url`` answers 200, for at most 15 s; a child that died says why."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(OSError):
            if http_get(url, timeout=1, ca=ca)[0] == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"{name} not ready after 15 s:\n{procs.log_tail(name)}")


# ---------------------------------------------------------------------------
# /proc


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """The root and all its descendants: nginx's workers, any worker tokenrelay forks."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def status_kb(pids: Sequence[int], key: str) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


class RssSampler:
    """Peak of the summed VmRSS of a process tree, sampled every 10 ms in a thread."""

    def __init__(self, root: int | None) -> None:
        self._pids = process_tree(root) if root is not None else []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_kb = 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_kb = max(self.peak_kb, status_kb(self._pids, "VmRSS"))

    def __enter__(self) -> RssSampler:
        if self._pids:
            self.peak_kb = status_kb(self._pids, "VmRSS")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


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


# ---------------------------------------------------------------------------
# measurements


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us: float | None


@dataclass
class Transfer:
    gbps: float
    cpu_s_per_gib: float | None
    ok: bool
    detail: str = ""


@dataclass
class Results:
    mode: Mode
    machine: dict[str, str]
    started: dt.datetime
    loads: dict[tuple[str, int], Load] = field(default_factory=dict)
    downloads: dict[str, Transfer] = field(default_factory=dict)
    uploads: dict[str, Transfer] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    hwm_mb: dict[str, float] = field(default_factory=dict)
    token_calls: dict[str, int] | None = None
    metrics_calls: float | None = None
    access_log_lines: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)
    profile: str = ""


def run_wrk(url: str, conns: int, seconds: float, script: Path) -> dict[str, Any]:
    """One wrk thread: on two cores a second one would only steal from what it measures."""
    argv = [
        "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
        "--latency", "-s", str(script), url,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[len("BENCH ") :])
            return result
    raise BenchError(f"wrk gave no result (exit {proc.returncode}): {proc.stderr.strip()[:300]}")


def measure_load(target: Target, conns: int, mode: Mode, script: Path) -> Load:
    run_wrk(target.small, conns, mode.warmup, script)
    pids = target.tree()
    cpu0 = cpu_seconds(pids)
    res = run_wrk(target.small, conns, mode.duration, script)
    cpu = cpu_seconds(pids) - cpu0
    requests = int(res["requests"])
    return Load(
        rps=requests / (res["duration_us"] / 1e6),
        p50_ms=res["p50_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        requests=requests,
        errors=int(res["socket_errors"]) + int(res["status_errors"]),
        cpu_us=cpu / requests * 1e6 if pids and requests else None,
    )


def curl(argv: Sequence[str], timeout: float) -> tuple[int, int, float]:
    """``(status, bytes, seconds)`` of one curl transfer; a failed transfer raises."""
    fmt = "%{http_code} %{size_download} %{size_upload} %{time_total}"
    full = ["curl", "--noproxy", "*", "-sS", "--max-time", str(int(timeout)), "-w", fmt, *argv]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout + 10, check=False)
    if proc.returncode != 0:
        raise BenchError(f"curl exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    status, down, up, secs = proc.stdout.split()[-4:]
    return int(status), max(int(down), int(up)), float(secs)


def warm_page_cache(path: Path) -> None:
    """Read the body file once so the first target timed does not pay for a cold cache."""
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def transfer_timeout(size: int) -> float:
    """Slow enough to notice a stall, never so long that the run blows its time budget."""
    return 20 + size / (50 * MIB)


def download(target: Target, size: int) -> Transfer:
    pids = target.tree()
    cpu0 = cpu_seconds(pids)
    argv = [*target.curl_args, "-o", "/dev/null", target.big]
    status, got, secs = curl(argv, transfer_timeout(size))
    cpu = cpu_seconds(pids) - cpu0
    ok = status == 200 and got == size
    return Transfer(
        gbps=got / secs / 1e9,
        cpu_s_per_gib=cpu / (got / GIB) if pids and got else None,
        ok=ok,
        detail="" if ok else f"status {status}, {got} of {size} bytes",
    )


def upload(target: Target, source: Path, work: Path) -> Transfer:
    size = source.stat().st_size
    answer = work / f"{target.name}-upload.json"
    pids = target.tree()
    cpu0 = cpu_seconds(pids)
    argv = ["-T", str(source), "-H", "Expect:", "-o", str(answer), target.sink]
    status, sent, secs = curl(argv, transfer_timeout(size))
    cpu = cpu_seconds(pids) - cpu0
    body = json.loads(answer.read_text() or "{}") if status == 200 else {}
    received = int(body.get("received", -1))
    want_auth = "none" if target.name == DIRECT else "bearer"
    ok = status == 200 and received == size and body.get("auth") == want_auth
    return Transfer(
        gbps=sent / secs / 1e9,
        cpu_s_per_gib=cpu / (sent / GIB) if pids and sent else None,
        ok=ok,
        detail="" if ok else f"status {status}, sink got {received} of {size}, {body}",
    )


def token_counts(stack: Stack, results: Results) -> None:
    """Token calls from the endpoint's own counter, cross-checked with the proxy's metrics."""
    with contextlib.suppress(OSError, ValueError):
        results.token_calls = json.loads(http_get(f"http://{stack.backends}/calls")[1])
    target = stack.targets.get(TOKENRELAY)
    if target is None:
        return
    with contextlib.suppress(OSError, ValueError):
        text = http_get(f"{target.base}/-/metrics")[1].decode()
        pattern = re.compile(
            r'^tokenrelay_token_requests_total\{[^}]*provider="' + PROVIDER + r'"[^}]*\}\s+(\S+)',
            re.MULTILINE,
        )
        values = [float(v) for v in pattern.findall(text)]
        results.metrics_calls = sum(values) if values else None


class Bench:
    """The measurement plan; every step is bounded by wrk's and curl's own time limits."""

    def __init__(self, stack: Stack, results: Results, profile: Path | None) -> None:
        self.stack, self.results, self.profile = stack, results, profile
        self.mode = stack.mode
        self.script = stack.work / "report.lua"
        self.script.write_text(WRK_SCRIPT)

    def targets(self) -> list[Target]:
        return [self.stack.targets[n] for n in NAMES if n in self.stack.targets]

    def run(self) -> None:
        for target in self.targets():
            try:
                self.stack.check(target)
            except (BenchError, OSError) as exc:
                self.skip(target.name, f"check failed: {exc}")
        self.results.measured = [t.name for t in self.targets()]
        if shutil.which("wrk") is not None:
            self.small_responses()
        else:
            self.results.notes.append("wrk missing: small-response figures not measured")
        if shutil.which("curl") is not None:
            self.transfers()
        else:
            self.results.notes.append("curl missing: transfer figures not measured")
        self.tls_listeners()
        self.finish()

    def skip(self, name: str, why: str) -> None:
        self.stack.targets.pop(name, None)
        self.results.notes.append(f"{name} not measured: {why}")
        log(f"{name} not measured: {why}")

    def small_responses(self) -> None:
        """Targets interleaved per connection count, so drift in the machine's load spreads."""
        floor = [self.stack.targets[FLOOR]] if FLOOR in self.stack.targets else []
        for conns in CONNS:
            for target in [*self.targets(), *floor]:
                log(f"small responses, {conns} conn: {target.name}")
                try:
                    load = measure_load(target, conns, self.mode, self.script)
                except (BenchError, subprocess.SubprocessError) as exc:
                    self.results.notes.append(f"{target.name} at {conns} conn: {exc}")
                    continue
                self.results.loads[(target.name, conns)] = load
                if load.errors:
                    self.results.notes.append(
                        f"{target.name} at {conns} conn: {load.errors} errors in {load.requests}"
                    )

    def transfers(self) -> None:
        size = self.mode.body
        warm_page_cache(self.stack.docroot / "big")
        for target in self.targets():
            log(f"{size // MIB} MiB down and up: {target.name}")
            with RssSampler(target.pid) as rss:
                down = functools.partial(download, target, size)
                self.one_transfer(target, "download", down)
                up = functools.partial(upload, target, self.stack.docroot / "big", self.stack.work)
                self.one_transfer(target, "upload", up)
            if target.pid is not None:
                self.results.peak_rss_mb[target.name] = rss.peak_kb * 1024 / 1e6

    def tls_listeners(self) -> None:
        """The TLS row: small responses, then the download, through each HTTPS listener."""
        tls = [self.stack.targets[n] for n in TLS_NAMES if n in self.stack.targets]
        for target in list(tls):
            try:
                self.stack.check(target)
            except (BenchError, OSError) as exc:
                self.skip(target.name, f"check failed: {exc}")
                tls.remove(target)
        if shutil.which("wrk") is not None:
            for conns in CONNS:
                for target in tls:
                    log(f"small responses over TLS, {conns} conn: {target.name}")
                    try:
                        load = measure_load(target, conns, self.mode, self.script)
                    except (BenchError, subprocess.SubprocessError) as exc:
                        self.results.notes.append(f"{target.name} at {conns} conn: {exc}")
                        continue
                    self.results.loads[(target.name, conns)] = load
        if shutil.which("curl") is not None:
            for target in tls:
                log(f"{self.mode.body // MIB} MiB down over TLS: {target.name}")
                down = functools.partial(download, target, self.mode.body)
                self.one_transfer(target, "download", down)

    def one_transfer(self, target: Target, kind: str, fn: Callable[[], Transfer]) -> None:
        """Best of ``mode.transfers``: one slow transfer on a shared machine says little."""
        store = self.results.downloads if kind == "download" else self.results.uploads
        for _ in range(self.mode.transfers):
            try:
                result = fn()
            except (BenchError, subprocess.SubprocessError, ValueError, OSError) as exc:
                self.results.notes.append(f"{target.name} {kind} failed: {exc}")
                return
            if not result.ok:
                self.results.notes.append(f"{target.name} {kind} incomplete: {result.detail}")
                return
            best = store.get(target.name)
            if best is None or result.gbps > best.gbps:
                store[target.name] = result

    def finish(self) -> None:
        for target in self.targets():
            if target.pid is not None:
                hwm = status_kb(target.tree(), "VmHWM")
                self.results.hwm_mb[target.name] = hwm * 1024 / 1e6
        token_counts(self.stack, self.results)
        self.count_access_logs()
        if self.profile is not None and TOKENRELAY in self.stack.targets:
            self.results.profile = profile_tokenrelay(
                self.stack.targets[TOKENRELAY], self.mode, self.script, self.profile
            )

    def count_access_logs(self) -> None:
        """Proof that logging stayed on: a line count per proxy."""
        files = {TOKENRELAY: self.stack.work / f"{TOKENRELAY}.log"}
        files[NGINX] = self.stack.work / "nginx-access.log"
        for name, path in files.items():
            if name in self.stack.targets and path.exists():
                with path.open("rb") as f:
                    self.results.access_log_lines[name] = sum(1 for _ in f)


# ---------------------------------------------------------------------------
# profile


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread: the exact split that py-spy's sampling only estimates."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/task/{entry.name}/stat").read_text()
                rest = fields.rsplit(")", 1)[1].split()
                out[int(entry.name)] = (int(rest[11]) + int(rest[12])) / CLK_TCK
    return out


def profile_tokenrelay(target: Target, mode: Mode, script: Path, out: Path) -> str:
    """A 64-connection run under py-spy, after the measured runs so it skews none of them.

    Blocking samples (the default): ``--nonblocking`` loses the outer frames of coroutines.
    """
    py_spy = find_py_spy()
    if py_spy is None or target.pid is None:
        return "py-spy not found: `.venv/bin/pip install py-spy`"
    raw = out.with_suffix(".raw.txt")
    secs = max(2, round(mode.duration))
    argv = [
        py_spy, "record", "--pid", str(target.pid), "--duration", str(secs), "--rate", "200",
        "--format", "raw", "--nolineno", "--output", str(raw),
    ]  # fmt: skip
    log(f"profiling tokenrelay for {secs} s at 64 conn")
    before = thread_cpu(target.pid)
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        load = run_wrk(target.small, 64, secs, script)
        _, err = spy.communicate(timeout=secs + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait(timeout=5)
    if not raw.exists():
        return f"py-spy produced nothing: {err.decode(errors='replace').strip()[:300]}"
    split = cpu_split(target.pid, before, thread_cpu(target.pid), int(load["requests"]))
    summary = split + "\n\n" + summarise_profile(raw.read_text())
    out.write_text(summary + "\n")
    return summary


def cpu_split(pid: int, before: dict[int, float], after: dict[int, float], requests: int) -> str:
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sum(v - before.get(tid, 0.0) for tid, v in after.items() if tid != pid)
    per = (main + others) / requests * 1e6 if requests else 0.0
    return (
        f"CPU while profiled ({requests} requests, 64 conn, small responses; /proc per thread): "
        f"event-loop thread {main:.2f} s, {len(after) - 1} other threads {others:.2f} s, "
        f"{per:.0f} µs per request."
    )


WAITING = "_worker (concurrent/futures/thread.py)"


def summarise_profile(raw: str, top: int = 20) -> str:
    """Self, inclusive and per-package shares, for the event-loop thread and the others.

    Threads are told apart by their root frame; a pool thread whose innermost Python frame
    is ``_worker`` is waiting for work in C, so those samples are left out.
    """
    main, other = Samples(), Samples()
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames or not count_s.isdigit():
            continue
        if not frames[0].startswith("Thread._bootstrap "):
            main.add(frames, int(count_s))
        elif frames[-1] != WAITING:
            other.add(frames, int(count_s))
    if not main.total:
        return "py-spy recorded no samples of the event-loop thread"
    parts = [f"Event-loop thread: {main.total} samples at 200 Hz.", *main.tables(top)]
    if other.total:
        parts += [
            f"Other threads (thread pool), while not waiting for work: {other.total} samples.",
            *other.tables(10),
        ]
    return "\n\n".join(parts)


@dataclass
class Samples:
    total: int = 0
    self_t: Counter[str] = field(default_factory=Counter)
    incl: Counter[str] = field(default_factory=Counter)
    pkg: Counter[str] = field(default_factory=Counter)

    def add(self, frames: list[str], count: int) -> None:
        self.total += count
        self.self_t[frames[-1]] += count
        self.pkg[package_of(frames[-1])] += count
        for frame in set(frames):
            self.incl[frame] += count

    def below_root(self) -> Counter[str]:
        return Counter({k: c for k, c in self.incl.items() if c < self.total})

    def tables(self, top: int) -> list[str]:
        def table(title: str, counts: Counter[str], n: int) -> str:
            rows = [f"| {100 * c / self.total:5.1f} % | `{k}` |" for k, c in counts.most_common(n)]
            return f"| {title} | function |\n|---:|---|\n" + "\n".join(rows)

        return [
            table("self", self.self_t, top),
            table("inclusive (below the frames in every sample)", self.below_root(), top),
            table("self, by package", self.pkg, 10),
        ]


def package_of(frame: str) -> str:
    """``func (aiohttp/web_protocol.py)`` → ``aiohttp``; stdlib modules by file name."""
    match = re.search(r"\(([^)]*)\)\s*$", frame)
    path = match.group(1) if match else frame
    parts = path.split("/")
    return parts[0] if len(parts) > 1 else (parts[0].removesuffix(".py") or "?")


# ---------------------------------------------------------------------------
# report


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    """Blank when either side is missing or not positive (a negative added latency is noise)."""
    return "" if a is None or b is None or a < 0 or b <= 0 else f"{a / b:.2f}x"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


Row = tuple[str, dict[str, float | None], str, str]


def load_rows(r: Results, conns: int) -> list[Row]:
    loads = {n: r.loads.get((n, conns)) for n in NAMES}
    direct = loads[DIRECT]

    def col(get: Callable[[Load], float | None]) -> dict[str, float | None]:
        return {n: (get(v) if v is not None else None) for n, v in loads.items()}

    def added(get: Callable[[Load], float]) -> dict[str, float | None]:
        return {
            n: (get(v) - get(direct) if v is not None and direct is not None else None)
            for n, v in loads.items()
            if n != DIRECT
        }

    added_p50 = added(lambda x: x.p50_ms)
    c = f"{conns} conn"
    return [
        (f"small, {c}: requests/s", col(lambda x: x.rps), ".0f", ""),
        (f"small, {c}: p50 latency (ms)", col(lambda x: x.p50_ms), ".3f", ""),
        (f"small, {c}: p99 latency (ms)", col(lambda x: x.p99_ms), ".3f", ""),
        (
            f"small, {c}: added p50 over direct (ms)", added_p50, ".3f",
            "≤ 0.10" if conns == 1 else "",
        ),
        (f"small, {c}: added p99 over direct (ms)", added(lambda x: x.p99_ms), ".3f", ""),
        (f"small, {c}: proxy CPU per request (µs)", col(lambda x: x.cpu_us), ".1f", "≤ 60"),
    ]  # fmt: skip


def met(r: Results, row: Row) -> str:
    value = row[1].get(TOKENRELAY)
    if value is None or not row[3]:
        return ""
    checks: dict[str, Callable[[float], bool]] = {
        "≤ 0.10": lambda v: v <= TARGET_ADDED_P50_MS,
        "≤ 60": lambda v: v <= TARGET_CPU_US,
        "≥ 1.0": lambda v: v >= TARGET_GBPS,
        "≤ 0.8": lambda v: v <= TARGET_CPU_S_PER_GIB,
        "< 60": lambda v: v < TARGET_RSS_MB,
    }
    return verdict(checks[row[3]](value))


def transfer_rows(r: Results) -> list[Row]:
    size = f"{r.mode.body // MIB} MiB" if r.mode.body < GIB else f"{r.mode.body // GIB} GiB"

    def col(
        store: dict[str, Transfer], get: Callable[[Transfer], float | None]
    ) -> dict[str, float | None]:
        return {n: (get(store[n]) if n in store else None) for n in NAMES}

    return [
        (f"download {size}: GB/s", col(r.downloads, lambda t: t.gbps), ".2f", "≥ 1.0"),
        (
            f"download {size}: proxy CPU-s per GiB",
            col(r.downloads, lambda t: t.cpu_s_per_gib), ".3f", "≤ 0.8",
        ),
        (f"upload {size}: GB/s", col(r.uploads, lambda t: t.gbps), ".2f", "≥ 1.0"),
        (
            f"upload {size}: proxy CPU-s per GiB",
            col(r.uploads, lambda t: t.cpu_s_per_gib), ".3f", "≤ 0.8",
        ),
        (
            "peak RSS during transfers (MB)",
            {n: r.peak_rss_mb.get(n) for n in NAMES}, ".1f", "< 60",
        ),
        ("VmHWM at end of run (MB)", {n: r.hwm_mb.get(n) for n in NAMES}, ".1f", ""),
    ]  # fmt: skip


def render_row(r: Results, row: Row) -> str:
    name, values, spec, target = row
    cells = [fmt(values.get(n), spec) if n in values else "—" for n in NAMES]
    tr = values.get(TOKENRELAY)
    return (
        f"| {name} | {' | '.join(cells)} | {ratio(tr, values.get(DIRECT))} "
        f"| {ratio(tr, values.get(NGINX))} | {target} | {met(r, row)} |"
    )


def token_row(r: Results) -> str:
    calls = r.token_calls or {}
    got = calls.get(PROVIDER)
    metrics = "n/a" if r.metrics_calls is None else f"{r.metrics_calls:.0f}"
    others = {k: v for k, v in calls.items() if k != PROVIDER}
    ok = got == 1 and r.metrics_calls == 1 and not others
    cell = f"{got if got is not None else 'n/a'} (metrics: {metrics})"
    extra = f" others: {others}" if others else ""
    verdict_cell = verdict(ok) if TOKENRELAY in r.measured else ""
    return (
        f"| token calls, provider `{PROVIDER}` | — | {cell}{extra} | — | | | = 1 | {verdict_cell} |"
    )


def render(r: Results) -> str:
    when = r.started.strftime("%Y-%m-%d %H:%M UTC")
    m = r.mode
    body = f"{m.body // GIB} GiB" if m.body >= GIB else f"{m.body // MIB} MiB"
    head = [
        "# Benchmark results",
        "",
        f"`make bench` ({m.name} mode: {m.duration:.0f} s per wrk run after a {m.warmup:.0f} s "
        f"warm-up, {body} bodies, best of {m.transfers} per transfer), {when}.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in r.machine.items()],
        "",
        "| measure | direct | tokenrelay | nginx | tokenrelay / direct | tokenrelay / nginx "
        "| target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    rows = [*load_rows(r, 1), *load_rows(r, 64), *transfer_rows(r)]
    lines = [*head, *(render_row(r, row) for row in rows), token_row(r), "", *floor_rows(r)]
    lines += tls_rows(r)
    return "\n".join(lines + method_notes(r)) + "\n"


def floor_rows(r: Results) -> list[str]:
    """What a featureless callback-only Python proxy costs in the same run (bench/floor.py)."""
    out = [
        "Calibration, same run: `bench/floor.py`, a callback-only httptools proxy on uvloop with "
        "no features at all (no checks, token, logs, metrics or streaming): the floor for "
        "CPython on this machine.",
        "",
        "| small responses | floor | tokenrelay | nginx | tokenrelay / floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for conns in CONNS:
        loads = {n: r.loads.get((n, conns)) for n in (FLOOR, TOKENRELAY, NGINX, DIRECT)}
        direct = loads[DIRECT]
        cpu = {n: (v.cpu_us if v is not None else None) for n, v in loads.items()}
        added = {
            n: (v.p50_ms - direct.p50_ms if v is not None and direct is not None else None)
            for n, v in loads.items()
        }
        for label, vals, spec in (("proxy CPU per request (µs)", cpu, ".1f"),
                                  ("added p50 over direct (ms)", added, ".3f")):  # fmt: skip
            cells = " | ".join(fmt(vals.get(n), spec) for n in (FLOOR, TOKENRELAY, NGINX))
            out.append(
                f"| {conns} conn: {label} | {cells} | {ratio(vals[TOKENRELAY], vals[FLOOR])} |"
            )
    return [*out, ""]


def tls_rows(r: Results) -> list[str]:
    """The TLS row: each proxy with and without TLS on its listener, same run."""
    names = (TOKENRELAY, TOKENRELAY_TLS, NGINX, NGINX_TLS)
    size = f"{r.mode.body // MIB} MiB" if r.mode.body < GIB else f"{r.mode.body // GIB} GiB"
    out = [
        "TLS listener, same run: tokenrelay and nginx terminating TLS with the same "
        "certificate (self-signed ECDSA P-256, what wrk and curl negotiate: TLS 1.3), in front "
        "of the same plain upstream; the plain figures repeated beside them.",
        "",
        "| TLS listener | tokenrelay | tokenrelay TLS | nginx | nginx TLS "
        "| tokenrelay TLS / nginx TLS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows: list[tuple[str, dict[str, float | None], str]] = []
    for conns in CONNS:
        loads = {n: r.loads.get((n, conns)) for n in names}
        measures: tuple[tuple[str, Callable[[Load], float | None], str], ...] = (
            ("requests/s", lambda x: x.rps, ".0f"),
            ("p50 latency (ms)", lambda x: x.p50_ms, ".3f"),
            ("proxy CPU per request (µs)", lambda x: x.cpu_us, ".1f"),
        )
        for label, get, spec in measures:
            vals = {n: (get(v) if v is not None else None) for n, v in loads.items()}
            rows.append((f"small, {conns} conn: {label}", vals, spec))
    downs = {n: r.downloads.get(n) for n in names}
    rows.append((f"download {size}: GB/s", {n: t.gbps if t else None for n, t in downs.items()},
                 ".2f"))  # fmt: skip
    cpu = {n: t.cpu_s_per_gib if t else None for n, t in downs.items()}
    rows.append((f"download {size}: proxy CPU-s per GiB", cpu, ".3f"))
    for label, vals, spec in rows:
        cells = " | ".join(fmt(vals.get(n), spec) for n in names)
        out.append(f"| {label} | {cells} | {ratio(vals[TOKENRELAY_TLS], vals[NGINX_TLS])} |")
    return [*out, ""]


METHOD = """How it was measured:

- Everything on 127.0.0.1, started and stopped by `bench/run.py`, in one run.
- Upstream: nginx, 1 worker, sendfile, serving a 100-byte file and a sparse body file.
  Uploads go to an aiohttp sink (`bench/backends.py`) that reads every byte before answering.
- tokenrelay: a client-credentials provider against the bench's token endpoint, default
  settings otherwise, JSON access log on (stderr to a file).
- nginx as proxy: 1 worker, `upstream {keepalive 64;}`, HTTP/1.1, `Connection ""`, static
  `Authorization: Bearer`, X-Forwarded-For/Proto, streaming both ways
  (`proxy_request_buffering off`, no temp files) with 256 KiB buffers, access log on.
- Small responses: wrk, 1 thread, `--latency`, a warm-up run first; latency in ms.
- Transfers: curl to /dev/null and `curl -T`, best of the runs; GB = 10^9 bytes.
- CPU: utime+stime of the proxy's process tree (/proc/PID/stat) over the measured run.
  RSS: summed VmRSS of that tree, sampled every 10 ms; MB = 10^6 bytes.
- Ratios: tokenrelay's figure divided by the other's, same run. A negative added latency
  means the difference is within the machine's noise."""


def method_notes(r: Results) -> list[str]:
    logs = ", ".join(f"{k}: {v}" for k, v in r.access_log_lines.items()) or "n/a"
    notes = [METHOD, "", f"Access-log lines written: {logs}."]
    if r.notes:
        notes += ["", "Notes from this run:", "", *[f"- {n}" for n in r.notes]]
    return notes


# ---------------------------------------------------------------------------
# main


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Unwind like Ctrl-C does, so every child is stopped on the way out."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-") as tmp:
        path = Path(tmp)
        path.chmod(0o755)
        yield path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="direct vs tokenrelay vs nginx, side by side")
    parser.add_argument("--quick", action="store_true", help="2 s per wrk run, 64 MiB bodies")
    parser.add_argument("--out", type=Path, default=None, help="where to write the Markdown")
    parser.add_argument(
        "--profile", type=Path, default=None, help="also profile tokenrelay with py-spy, to PATH"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    out: Path = args.out or (RAW_DIR / "quick.md" if args.quick else BENCH / "RESULTS.md")
    signal.signal(signal.SIGTERM, on_sigterm)
    notes: list[str] = []
    ensure_tools(notes)
    started = dt.datetime.now(dt.UTC)
    results = Results(mode=mode, machine=machine_info(), started=started, notes=notes)
    t0 = time.monotonic()
    with workdir() as work, Procs(work) as procs:
        stack = Stack(procs, work, mode, notes)
        stack.start_all()
        Bench(stack, results, args.profile).run()
    report = render(results)
    print(report)
    if results.profile:
        print("## py-spy profile of tokenrelay\n\n" + results.profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    log(f"wrote {out} in {time.monotonic() - t0:.0f} s")
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
