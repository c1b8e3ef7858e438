"""Secrets and keys that rotate on disk, picked up without SIGHUP.

Kubernetes updates a mounted Secret by swapping a symlink; cert-manager and Vault agents
rewrite files in place. Either way the path stays and its content changes, so the watch
compares a digest of each file's content (they are small) on a timer. A change reloads the
config through the same step as SIGHUP: providers whose settings did not change keep their
token, a changed one is rebuilt, and a file that disappeared or cannot be read makes that
reload fail, which keeps the running config (the last good value) and says so.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

Sleep = Callable[[float], Awaitable[None]]
INTERVAL = 5.0  # seconds between looks; a rotation is picked up within this


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None  # gone or unreadable: a change, which the reload then reports


class FileWatch:
    """What changed among a config's secret files since the last look."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._seen: dict[str, tuple[Path, bytes | None]] = {}
        self.follow(files)

    def follow(self, files: Mapping[str, Path]) -> None:
        """Watch these files from now on (a reload may name others); their content now is
        the baseline."""
        self._seen = {key: (path, _digest(path)) for key, path in files.items()}

    def changed(self) -> list[str]:
        """Key paths whose file content differs from the last look (and remember it)."""
        out: list[str] = []
        for key, (path, before) in self._seen.items():
            now = _digest(path)
            if now != before:
                self._seen[key] = (path, now)
                out.append(key)
        return out


async def watch(
    current: Callable[[], Mapping[str, Path]],
    on_change: Callable[[list[str]], Awaitable[None]],
    *,
    interval: float = INTERVAL,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Until cancelled: look every ``interval`` seconds; call ``on_change`` with the key
    paths that changed, then follow the files of the config running after it."""
    files = current()
    seen = FileWatch(files)
    while True:
        await sleep(interval)
        if current() is not files:  # a reload (SIGHUP, /-/reload) in between: new baseline
            files = current()
            seen.follow(files)
            continue
        changed = seen.changed()
        if changed:
            await on_change(changed)
            files = current()
            seen.follow(files)
