"""Replayable request bodies: the body is teed here while it streams upstream, so that a 401
can be answered by sending it once more.

Small bodies stay in memory; larger ones spill to a private temporary file (mode 0600, in a
per-process directory of mode 0700). Past ``max_body`` the spool gives up keeping data: the
request still streams upstream, it just cannot be replayed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from proxy.problems import ConfigError

READ_CHUNK = 256 * 1024
# Hosts sharing a spool volume must not take each other's live directories for stale ones.
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_ROOT_NAME = re.compile(r"tokenrelay-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-")
_roots: dict[tuple[int, Path | None], Path] = {}
_reader: ThreadPoolExecutor | None = None


def spool_root(configured: Path | None) -> Path:
    """This process's private spool directory, created on first use under ``configured``
    (or the system temporary directory); refuses a base others could tamper with."""
    key = (os.getpid(), configured)
    root = _roots.get(key)
    if root is not None and root.is_dir():
        return root
    base = _check_base(configured)
    _sweep_stale(base)
    root = Path(tempfile.mkdtemp(prefix=f"tokenrelay-{os.getpid()}-{_HOST_TAG}-", dir=base))
    _roots[key] = root
    atexit.register(_remove_root, root, os.getpid())
    return root


def _check_base(configured: Path | None) -> Path:
    """A configured directory must be ours and writable only by us; the system temporary
    directory may be shared only when sticky (others cannot rename our directory away)."""
    if configured is None:
        base = Path(tempfile.gettempdir())
        st = base.stat()
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise ConfigError(str(base), "", "temporary directory is shared and not sticky")
        return base
    try:
        configured.mkdir(mode=0o700, parents=True, exist_ok=True)
        base = configured.resolve()
        st = base.stat()
    except OSError as exc:
        raise ConfigError(str(configured), "", f"spool_dir unusable: {exc.strerror}") from None
    problem = unsafe_dir(st)
    if problem is not None:
        raise ConfigError(str(configured), "", f"spool_dir {problem}")
    return base


def unsafe_dir(st: os.stat_result) -> str | None:
    """Why a spool directory with this stat is not ours alone, or None: the one rule that
    config validation and ``spool_root`` both apply."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"must be owned by the proxy's user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"must not be group or world writable (mode {oct(stat.S_IMODE(st.st_mode))})"
    return None


def _sweep_stale(base: Path) -> None:
    """Remove spool directories left by crashed proxies on this host: they may hold bodies."""
    for entry in base.iterdir():
        m = _ROOT_NAME.match(entry.name)
        if m is None or m["host"] != _HOST_TAG or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.lstat().st_uid == os.geteuid() and entry.is_dir():
                shutil.rmtree(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_root(root: Path, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(root, ignore_errors=True)


def _discard(fd: int, path: str) -> None:
    """Runs exactly once per spill file, from ``close()`` or when the spool is collected."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _read_at(fd: int, size: int, offset: int) -> Future[bytes]:
    """Read in a worker thread from a duplicate fd that the worker closes when done: the
    spool may be closed meanwhile (cancellation), and a generator abandoned between
    chunks holds nothing open."""
    own = os.dup(fd)
    try:
        future = _read_executor().submit(os.pread, own, size, offset)
    except BaseException:
        os.close(own)
        raise
    future.add_done_callback(lambda _: os.close(own))
    return future


def _read_executor() -> ThreadPoolExecutor:
    """Threads of our own: file reads must not queue behind slow work in the default pool."""
    global _reader
    if _reader is None:
        _reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spool-read")
    return _reader


class Spool:
    """One request body, kept for a possible replay.

    ``size`` counts every byte written, kept or not. Not safe to write while ``chunks()`` runs:
    the forwarder replays only once the body is complete.
    """

    def __init__(self, memory_limit: int, max_body: int, directory: Path | None = None) -> None:
        self.memory_limit = memory_limit
        self.max_body = max_body
        self.directory = directory
        self.size = 0
        self.overflowed = False
        self.failed: OSError | None = None
        self.closed = False
        self._memory: list[bytes] = []
        self._kept = 0
        self._fd = -1
        self._path = ""
        self._finalizer: weakref.finalize[[int, str], Spool] | None = None

    def __repr__(self) -> str:
        where = "file" if self._fd >= 0 else "memory"
        return f"<Spool size={self.size} in {where} replayable={self.replayable}>"

    @property
    def replayable(self) -> bool:
        return not (self.overflowed or self.closed or self.failed is not None)

    @property
    def on_disk(self) -> bool:
        return self._fd >= 0

    @property
    def path(self) -> Path | None:
        """The spill file while one exists; for inspection, never for reading the body."""
        return Path(self._path) if self._fd >= 0 else None

    def write(self, chunk: bytes) -> None:
        """Keep ``chunk`` for a replay (the caller streams it upstream regardless)."""
        self.size += len(chunk)
        if not chunk or not self.replayable:
            return
        if self.size > self.max_body:
            self.overflowed = True
            self._drop()
            return
        try:
            if self._fd >= 0:
                self._write_file(chunk)
            elif self._kept + len(chunk) > self.memory_limit:
                self._spill(chunk)
            else:
                self._memory.append(chunk)
                self._kept += len(chunk)
        except OSError as exc:
            self.failed = exc
            self._drop()

    def _spill(self, chunk: bytes) -> None:
        directory = self.directory or spool_root(None)
        fd, self._path = tempfile.mkstemp(prefix="body-", dir=directory)
        self._fd = fd
        self._finalizer = weakref.finalize(self, _discard, fd, self._path)
        self._kept = 0
        for held in self._memory:
            self._write_file(held)
        self._memory.clear()
        self._write_file(chunk)

    def _write_file(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]
        self._kept += len(chunk)

    def _drop(self) -> None:
        self._memory.clear()
        self._kept = 0
        if self._finalizer is not None:
            self._finalizer()
        self._fd = -1

    async def chunks(self, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The whole body again; memory chunks as written, file contents in ``chunk_size``."""
        if not self.replayable:
            raise RuntimeError("the request body was not kept and cannot be replayed")
        if self._fd < 0:
            for chunk in list(self._memory):
                yield chunk
            return
        end = self._kept
        offset = 0
        while offset < end:
            if self._fd < 0:
                raise RuntimeError("spool closed during replay")
            data = await asyncio.wrap_future(
                _read_at(self._fd, min(chunk_size, end - offset), offset)
            )
            if not data:
                raise RuntimeError("spool file ended early")
            offset += len(data)
            yield data

    def close(self) -> None:
        """Forget the body and remove its file; safe to call any number of times."""
        self.closed = True
        self._drop()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
