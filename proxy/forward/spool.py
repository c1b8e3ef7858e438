"""Replayable request bodies: the body is teed here while it streams upstream, so that a 401
can be answered by sending it once more.

Small bodies stay in memory; larger ones spill to a private temporary file (mode 0600, in a
per-process directory of mode 0700). Every kept byte is held against a process-wide
``Budget`` (one for memory, one for disk): a chunk the memory budget refuses sends the body
to disk, one the disk budget refuses ends keeping. Past ``max_body`` or a budget the spool
gives up keeping data: the request still streams upstream, it just cannot be replayed.
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


class Budget:
    """Bytes that every request of the process draws on, with what is held against them now
    and at most so far. The event loop is the only writer (spools are written and closed on
    it), so plain ints need no lock."""

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def __repr__(self) -> str:
        return f"<Budget {self.used}/{self.limit} peak={self.peak}>"

    def reserve(self, n: int) -> bool:
        """Hold ``n`` more bytes if they fit; False (and nothing held) if they do not."""
        used = self.used + n
        if used > self.limit:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, n: int) -> None:
        self.used -= n


def unlimited() -> Budget:
    """A budget nothing is refused by: a spool used on its own."""
    return Budget(1 << 62)


class _Kept:
    """Where a spool's bytes are and what they hold against which budget. The spool's
    finalizer refers to this, never to the spool, so ``let_go`` runs exactly once, from
    ``close()`` or when a forgotten spool is collected: no file and no budget is leaked."""

    __slots__ = ("budget", "fd", "held", "path")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0
        self.fd = -1
        self.path = ""

    def let_go(self) -> None:
        self.budget.release(self.held)
        self.held = 0
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


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

    ``size`` counts every byte written, kept or not (while replayable, every byte is kept).
    Not safe to write while ``chunks()`` runs: the forwarder replays only once the body is
    complete. ``memory`` and ``disk`` are the process's budgets (the forwarder's, shared by
    every route); without them nothing is refused but ``memory_limit`` and ``max_body``.
    With ``length`` (a Content-Length) the whole body is reserved up front, in memory or on
    disk, or not kept at all: no body is half kept and then given up, its share wasted.
    """

    def __init__(
        self,
        memory_limit: int,
        max_body: int,
        directory: Path | None = None,
        *,
        memory: Budget | None = None,
        disk: Budget | None = None,
        length: int | None = None,
    ) -> None:
        self.memory_limit = memory_limit
        self.max_body = max_body
        self.directory = directory
        self.size = 0
        self.overflowed = False
        self.over_budget = False
        self.failed: OSError | None = None
        self.closed = False
        self._memory: list[bytes] = []
        self._disk = disk if disk is not None else unlimited()
        self._kept = _Kept(memory if memory is not None else unlimited())
        self._finalizer = weakref.finalize(self, self._kept.let_go)
        if length is not None and 0 < length <= max_body:
            self._reserve_up_front(length)

    def __repr__(self) -> str:
        where = "file" if self.on_disk else "memory"
        return f"<Spool size={self.size} in {where} replayable={self.replayable}>"

    @property
    def replayable(self) -> bool:
        return not (self.overflowed or self.over_budget or self.closed or self.failed is not None)

    @property
    def on_disk(self) -> bool:
        return self._kept.fd >= 0

    @property
    def path(self) -> Path | None:
        """The spill file while one exists; for inspection, never for reading the body."""
        return Path(self._kept.path) if self.on_disk else None

    def _reserve_up_front(self, length: int) -> None:
        if length <= self.memory_limit and self._cover(length):
            return
        if self._disk.reserve(length):
            self._kept.budget, self._kept.held = self._disk, length
        else:
            self.over_budget = True

    def _cover(self, total: int) -> bool:
        """Hold ``total`` bytes against the current budget (what is held already counts)."""
        kept = self._kept
        if total > kept.held:
            if not kept.budget.reserve(total - kept.held):
                return False
            kept.held = total
        return True

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
            if self._kept.budget is self._disk:
                self._to_file(chunk)
            elif self.size <= self.memory_limit and self._cover(self.size):
                self._memory.append(chunk)
            else:
                self._spill(chunk)
        except OSError as exc:
            self.failed = exc
            self._drop()

    def _to_file(self, chunk: bytes) -> None:
        if not self._cover(self.size):
            self._refused()
            return
        if self._kept.fd < 0:
            self._open()
        self._write_file(chunk)

    def _spill(self, chunk: bytes) -> None:
        """Move what memory holds, and ``chunk``, to a file, if the disk budget has room."""
        kept = self._kept
        if not self._disk.reserve(self.size):
            self._refused()
            return
        kept.budget.release(kept.held)
        kept.budget, kept.held = self._disk, self.size
        self._open()
        for held in self._memory:
            self._write_file(held)
        self._memory.clear()
        self._write_file(chunk)

    def _open(self) -> None:
        directory = self.directory or spool_root(None)
        self._kept.fd, self._kept.path = tempfile.mkstemp(prefix="body-", dir=directory)

    def _refused(self) -> None:
        """No budget for the next chunk: keep nothing, the body streams on unreplayable."""
        self.over_budget = True
        self._drop()

    def _write_file(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._kept.fd, view) :]

    def _drop(self) -> None:
        self._memory.clear()
        self._kept.let_go()

    async def chunks(self, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The whole body again; memory chunks as written, file contents in ``chunk_size``."""
        if not self.replayable:
            raise RuntimeError("the request body was not kept and cannot be replayed")
        kept = self._kept
        if kept.fd < 0:
            for chunk in list(self._memory):
                yield chunk
            return
        end = self.size
        offset = 0
        while offset < end:
            if kept.fd < 0:
                raise RuntimeError("spool closed during replay")
            data = await asyncio.wrap_future(
                _read_at(kept.fd, min(chunk_size, end - offset), offset)
            )
            if not data:
                raise RuntimeError("spool file ended early")
            offset += len(data)
            yield data

    def close(self) -> None:
        """Forget the body and remove its file; safe to call any number of times."""
        self.closed = True
        self._finalizer()
        self._memory.clear()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
