"""The bench's tools, processes and /proc readings (CPU, RSS)."""

# ruff: noqa: S603, S607

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

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

TARGET_RSS_MB = 60.0  # the one absolute target: memory, not time

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
