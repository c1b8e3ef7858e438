"""bench/RESULTS.md: every figure with its ratio to direct, to nginx and to the floor."""

from __future__ import annotations

from collections.abc import Callable

from common import (
    CONNS,
    DIRECT,
    FLOOR,
    GIB,
    MIB,
    NAMES,
    NGINX,
    NGINX_TLS,
    PROVIDER,
    TARGET_RSS_MB,
    TOKENRELAY,
    TOKENRELAY_TLS,
)
from measure import (
    Load,
    Results,
    Transfer,
)

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
    loads = {n: r.loads.get((n, conns)) for n in (*NAMES, FLOOR)}  # the floor: a reference
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
            "≤ 2x floor" if conns == 1 else "",
        ),
        (f"small, {c}: added p99 over direct (ms)", added(lambda x: x.p99_ms), ".3f", ""),
        (f"small, {c}: proxy CPU per request (µs)", col(lambda x: x.cpu_us), ".1f", "≤ 2x floor"),
    ]  # fmt: skip


TARGETS: dict[str, tuple[str, float, Callable[[float, float], bool]]] = {
    "≤ 2x floor": (FLOOR, 2.0, lambda v, limit: v <= limit),
    "≥ 0.9x nginx": (NGINX, 0.9, lambda v, limit: v >= limit),
    "≤ 1.35x nginx": (NGINX, 1.35, lambda v, limit: v <= limit),
}
"""Targets as ratios to what the same run measured (the machines are shared and noisy: an
absolute time from one run is no verdict on another); memory is the one absolute target."""


def met(r: Results, row: Row) -> str:
    value = row[1].get(TOKENRELAY)
    if value is None or not row[3]:
        return ""
    if row[3] == "< 60 MB":
        return verdict(value < TARGET_RSS_MB)
    ref_name, factor, ok = TARGETS[row[3]]
    ref = row[1].get(ref_name)
    return "" if ref is None or ref <= 0 else verdict(ok(value, factor * ref))


def transfer_rows(r: Results) -> list[Row]:
    size = f"{r.mode.body // MIB} MiB" if r.mode.body < GIB else f"{r.mode.body // GIB} GiB"

    def col(
        store: dict[str, Transfer], get: Callable[[Transfer], float | None]
    ) -> dict[str, float | None]:
        return {n: (get(store[n]) if n in store else None) for n in NAMES}

    return [
        (f"download {size}: GB/s", col(r.downloads, lambda t: t.gbps), ".2f", "≥ 0.9x nginx"),
        (
            f"download {size}: proxy CPU-s per GiB",
            col(r.downloads, lambda t: t.cpu_s_per_gib), ".3f", "≤ 1.35x nginx",
        ),
        (f"upload {size}: GB/s", col(r.uploads, lambda t: t.gbps), ".2f", "≥ 0.9x nginx"),
        (
            f"upload {size}: proxy CPU-s per GiB",
            col(r.uploads, lambda t: t.cpu_s_per_gib), ".3f", "≤ 1.35x nginx",
        ),
        (
            "peak RSS during transfers (MB)",
            {n: r.peak_rss_mb.get(n) for n in NAMES}, ".1f", "< 60 MB",
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
    tls = any(name == TOKENRELAY_TLS for name, _ in r.loads)  # the TLS row's own process
    processes = (TOKENRELAY in r.measured) + tls
    ok = got == processes and r.metrics_calls == 1 and not others  # one login per process
    cell = f"{got if got is not None else 'n/a'} (metrics: {metrics})"
    extra = f" others: {others}" if others else ""
    verdict_cell = verdict(ok) if TOKENRELAY in r.measured else ""
    return (
        f"| token calls, provider `{PROVIDER}` | — | {cell}{extra} | — | | | 1 per process "
        f"| {verdict_cell} |"
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
