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

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from common import (
    BENCH,
    FULL,
    QUICK,
    RAW_DIR,
    Procs,
    ensure_tools,
    log,
    machine_info,
)
from measure import (
    Bench,
    Results,
)
from report import (
    render,
)
from stack import (
    Stack,
)

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
