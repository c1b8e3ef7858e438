"""``make run``: the demo vendor and the proxy in one command.

``python -m proxy.demo_run [--demo-port N] [--demo-lifetime S] [proxy options...]`` starts
``proxy.demo`` on 127.0.0.1 in a background thread, exports ``DEMO_PORT`` so routes.yaml can
say ``http://127.0.0.1:${DEMO_PORT:-8099}``, then runs the proxy in the main thread (which
keeps the signals, so Ctrl-C and SIGTERM reach it) and stops the vendor when the proxy exits.
Every option not listed here goes to the proxy unchanged.

Environment: ``DEMO_PORT`` (default 8099), ``DEMO_LIFETIME`` (seconds, default 60),
``DEMO_USERNAME``/``DEMO_PASSWORD`` and ``DEMO_CLIENT_ID``/``DEMO_CLIENT_SECRET`` (defaults
in ``proxy.demo``): set them once and both the vendor and routes.yaml see the same values.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence

from aiohttp import web
from yarl import URL

from proxy.config import Config, Route, load_config
from proxy.demo import DemoCredentials, demo_app
from proxy.problems import ConfigError

DEFAULT_PORT = 8099
DEFAULT_LIFETIME = 60.0
ProxyMain = Callable[[list[str]], int | None]


class DemoVendor:
    """The demo vendor on its own event loop in a thread, leaving the main thread to the proxy."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._thread = threading.Thread(target=self._run, name="demo-vendor", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None

    def start(self) -> int:
        """Listen, and return the bound port; raises ``OSError`` when the port is taken."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to start(), which re-raises it in the caller
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy.demo_run",
        description="Run the demo vendor and tokenrelay together; other options go to tokenrelay.",
    )
    env_port = os.environ.get("DEMO_PORT", str(DEFAULT_PORT))
    env_lifetime = os.environ.get("DEMO_LIFETIME", str(DEFAULT_LIFETIME))
    p.add_argument("--demo-port", type=int, default=env_port, help="0 picks a free port")
    p.add_argument("--demo-lifetime", type=float, default=env_lifetime, metavar="SECONDS")
    return p


def _proxy_argv_peek(argv: list[str]) -> argparse.Namespace:
    """The proxy options the hint needs; the proxy's own CLI does the real parsing."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default="routes.yaml")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    return p.parse_known_args(argv)[0]


def hint(proxy_argv: list[str], demo_port: int, lifetime: float) -> str:
    """One line telling the user what to curl, from the routes that point at the demo vendor."""
    opts = _proxy_argv_peek(proxy_argv)
    host, port, bases = "127.0.0.1", 8080, ["/demo/api/"]
    config = _try_load(opts.config)
    if config is not None:
        host, port = config.listen.host, config.listen.port
        found = (_api_base(r) for r in config.routes if _is_demo(r.upstream, demo_port))
        bases = [b for b in found if b is not None]
    origin = f"http://{_curl_host(opts.host or host)}:{opts.port or port}"
    if not bases:
        return f"demo vendor on http://127.0.0.1:{demo_port}; no route in {opts.config} uses it"
    tries = " ; ".join(f"curl -s {origin}{b}hello" for b in bases)
    return (
        f"demo vendor on http://127.0.0.1:{demo_port} (tokens live {lifetime:g} s). Try: {tries}"
        f" ; then force a 401 and watch the replay: curl -s -X POST {origin}{bases[0]}-/expire-now"
    )


def _try_load(path: str) -> Config | None:
    """The config, or None: the proxy reports a broken config itself, properly."""
    try:
        return load_config(path).config
    except ConfigError:
        return None


def _is_demo(upstream: str, demo_port: int) -> bool:
    url = URL(upstream)
    return url.host in ("127.0.0.1", "localhost", "::1") and url.port == demo_port


def _api_base(route: Route) -> str | None:
    """The client path that reaches the vendor's ``/api/``, or None when the route cannot."""
    up = URL(route.upstream).path.rstrip("/")
    if not "/api/".startswith(up + "/"):
        return None
    return route.match_prefix.rstrip("/") + "/api/"[len(up) :]


def _curl_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def _default_proxy_main() -> ProxyMain:
    """Imported late: the demo vendor must not depend on the whole proxy being importable."""
    proxy_main: ProxyMain = importlib.import_module("proxy.cli").main
    return proxy_main


def main(argv: Sequence[str] | None = None, proxy_main: ProxyMain | None = None) -> int:
    """Run vendor and proxy; the proxy's exit code is ours."""
    args, proxy_argv = _parser().parse_known_args(argv)
    app = demo_app(args.demo_lifetime, credentials=DemoCredentials.from_env(os.environ))
    vendor = DemoVendor(app, port=args.demo_port)
    try:
        port = vendor.start()
    except OSError as exc:
        print(f"demo vendor: cannot listen on 127.0.0.1:{args.demo_port}: {exc}", file=sys.stderr)
        return 2
    os.environ["DEMO_PORT"] = str(port)
    try:
        print(hint(proxy_argv, port, args.demo_lifetime), flush=True)
        return (proxy_main or _default_proxy_main())(proxy_argv) or 0
    finally:
        vendor.stop()


if __name__ == "__main__":
    raise SystemExit(main())
