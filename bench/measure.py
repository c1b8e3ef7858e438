"""The measurements (wrk, curl transfers, token counts) and the optional py-spy profile."""

# ruff: noqa: S603

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    CLK_TCK,
    CONNS,
    DIRECT,
    FLOOR,
    GIB,
    MIB,
    NAMES,
    NGINX,
    PROVIDER,
    TLS_NAMES,
    TOKENRELAY,
    WRK_SCRIPT,
    BenchError,
    Mode,
    RssSampler,
    cpu_seconds,
    http_get,
    log,
    status_kb,
)
from stack import (
    Stack,
    Target,
)

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
