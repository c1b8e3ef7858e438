"""Backends for ``bench/run.py``: a counting OAuth token endpoint and an upload sink.

One aiohttp process on 127.0.0.1, started and stopped by run.py, never by hand.

The sink reads every byte of the request body before it answers, and answers with the count,
so upload throughput is measured end to end and a short body is detected. nginx is no use
here: ``return 204`` answers at once and discards the body afterwards, so a client (or a proxy
in between) would see the answer before the upload finished.

With ``--docroot`` it also serves the static files itself, as the upstream of last resort
when nginx could not be installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from aiohttp import web

TOKEN_CALLS = web.AppKey("token_calls", dict[str, int])
TOKEN_LIFETIME = 3600


async def token(request: web.Request) -> web.Response:
    """Count calls per client_id, so run.py can check the proxy fetched one token only.

    The form is parsed whatever the Content-Type says: this counts calls, it checks nothing.
    """
    form = parse_qs((await request.read()).decode("utf-8", "replace"))
    client = form.get("client_id", [request.headers.get("Authorization", "?")])[0]
    calls = request.app[TOKEN_CALLS]
    calls[client] = calls.get(client, 0) + 1
    n = calls[client]
    return web.json_response(
        {"access_token": f"bench-token-{n}", "token_type": "Bearer", "expires_in": TOKEN_LIFETIME}
    )


async def token_calls(request: web.Request) -> web.Response:
    return web.json_response(request.app[TOKEN_CALLS])


async def sink(request: web.Request) -> web.Response:
    """Read and drop the whole body before answering, so the upload is timed to its last byte."""
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    auth = "bearer" if request.headers.get("Authorization", "").startswith("Bearer ") else "none"
    return web.json_response({"received": received, "auth": auth})


def make_app(docroot: Path | None) -> web.Application:
    app = web.Application()
    app[TOKEN_CALLS] = {}
    app.router.add_post("/oauth/token", token)
    app.router.add_get("/calls", token_calls)
    app.router.add_route("*", "/sink/{tail:.*}", sink)
    if docroot is not None:
        app.router.add_static("/", docroot)
    return app


async def serve(port: int, docroot: Path | None) -> None:
    runner = web.AppRunner(make_app(docroot), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": port}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when installed: the backends should be the last thing to limit a measurement."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--docroot", type=Path, default=None)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(args.port, args.docroot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
