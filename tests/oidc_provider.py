"""A real OpenID provider (panva/oidc-provider on Node.js) for the client-auth tests.

``tests/oidc`` pins it in package.json and package-lock.json; ``ensure_installed`` runs
``npm ci`` there once (and installs Node.js from Debian's packages where it is missing), so
``make test`` on a fresh machine needs nothing installed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "oidc"


def ensure_installed() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nodejs", "npm"], check=True)
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=HERE, check=True, timeout=300
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class OpenIDProvider:
    issuer: str
    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    async def next_event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(20):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"oidc-provider ended: {self.events}")
                with contextlib.suppress(ValueError):
                    event: dict[str, Any] = json.loads(raw)
                    self.events.append(event)
                    return event


@contextlib.asynccontextmanager
async def oidc_provider(
    tmp: Path, clients: list[dict[str, Any]], tls: dict[str, str] | None = None
) -> AsyncIterator[OpenIDProvider]:
    """Run oidc-provider with ``clients`` (its client metadata, as registered) until the
    block ends; ``tls`` = {key, cert, ca} serves HTTPS and asks for client certificates."""
    ensure_installed()
    conf = tmp / "oidc.json"
    conf.write_text(json.dumps({"port": free_port(), "clients": clients, "tls": tls}))
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(HERE / "server.mjs"),
        str(conf),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    op = OpenIDProvider("", proc)
    try:
        first = await op.next_event()
        assert first["event"] == "listening", first
        op.issuer = first["issuer"]
        yield op
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
