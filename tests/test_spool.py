"""Replayable bodies: what is kept, where, with which permissions, and that it always goes away."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.forward.spool import Budget, Spool, spool_root
from proxy.problems import ConfigError

KIB = 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return spool_root(tmp_path / "spool")


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def replay(spool: Spool, chunk_size: int = 256 * KIB) -> bytes:
    return b"".join([c async for c in spool.chunks(chunk_size)])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_small_body_stays_in_memory(root: Path) -> None:
    parts = [b"alpha", b"", b"beta" * 100, b"gamma"]
    with Spool(memory_limit=1 * KIB, max_body=4 * KIB, directory=root) as spool:
        for p in parts:
            spool.write(p)
        assert spool.size == sum(map(len, parts))
        assert spool.replayable and not spool.on_disk and spool.path is None
        assert files_in(root) == []
        assert await replay(spool) == b"".join(parts)
        assert await replay(spool) == b"".join(parts), "a replay can be repeated"


async def test_body_at_memory_limit_stays_in_memory(root: Path) -> None:
    with Spool(memory_limit=100, max_body=1000, directory=root) as spool:
        spool.write(b"x" * 60)
        spool.write(b"y" * 40)
        assert not spool.on_disk
        spool.write(b"z")
        assert spool.on_disk
        assert await replay(spool) == b"x" * 60 + b"y" * 40 + b"z"


async def test_large_body_spills_to_private_file(root: Path) -> None:
    body = os.urandom(3000)
    spool = Spool(memory_limit=1 * KIB, max_body=10 * KIB, directory=root)
    for i in range(0, len(body), 700):
        spool.write(body[i : i + 700])
    path = spool.path
    assert path is not None and spool.on_disk
    assert path.parent == root and files_in(root) == [path]
    assert mode(path) == 0o600
    assert mode(root) == 0o700
    assert path.read_bytes() == body
    assert await replay(spool, chunk_size=1000) == body
    spool.close()
    assert not path.exists()
    assert files_in(root) == []


async def test_file_replay_uses_requested_chunk_size(root: Path) -> None:
    body = os.urandom(10 * KIB + 5)
    with Spool(memory_limit=0, max_body=len(body), directory=root) as spool:
        spool.write(body)
        sizes = [len(c) async for c in spool.chunks(chunk_size=KIB)]
    assert sizes == [KIB] * 10 + [5]


async def test_ten_megabytes_come_back_identical(root: Path) -> None:
    body = os.urandom(10 * KIB * KIB)
    with Spool(memory_limit=KIB * KIB, max_body=16 * KIB * KIB, directory=root) as spool:
        for i in range(0, len(body), 64 * KIB + 3):
            spool.write(body[i : i + 64 * KIB + 3])
        assert spool.size == len(body) and spool.on_disk
        digest = hashlib.sha256()
        async for chunk in spool.chunks():
            assert 0 < len(chunk) <= 256 * KIB
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
    assert files_in(root) == []


async def test_body_above_max_body_is_not_kept(root: Path) -> None:
    with Spool(memory_limit=1 * KIB, max_body=5 * KIB, directory=root) as spool:
        spool.write(b"a" * 3 * KIB)
        assert spool.on_disk
        spool.write(b"b" * 2 * KIB)
        assert spool.replayable, "exactly max_body is still replayable"
        spool.write(b"c")
        assert spool.overflowed and not spool.replayable
        assert not spool.on_disk and files_in(root) == []
        spool.write(b"d" * 10 * KIB)
        assert spool.size == 5 * KIB + 1 + 10 * KIB, "size keeps counting what streamed"
        assert files_in(root) == []
        with pytest.raises(RuntimeError, match="cannot be replayed"):
            await replay(spool)


async def test_overflow_while_still_in_memory(root: Path) -> None:
    with Spool(memory_limit=1 * KIB, max_body=100, directory=root) as spool:
        spool.write(b"a" * 60)
        spool.write(b"b" * 60)
        assert spool.overflowed and not spool.on_disk and files_in(root) == []


def test_close_is_idempotent_and_ends_replayability(root: Path) -> None:
    spool = Spool(memory_limit=10, max_body=1000, directory=root)
    spool.write(b"x" * 100)
    path = spool.path
    assert path is not None and path.exists()
    spool.close()
    spool.close()
    assert not path.exists() and not spool.replayable and spool.closed
    with spool:
        pass
    spool.write(b"more")
    assert files_in(root) == [], "writes after close keep nothing"


def test_file_removed_when_block_raises(root: Path) -> None:
    with pytest.raises(ValueError), Spool(memory_limit=0, max_body=1000, directory=root) as s:
        s.write(b"body")
        assert files_in(root) != []
        raise ValueError("upstream failed")
    assert files_in(root) == []


async def test_file_removed_when_the_client_goes_away(root: Path) -> None:
    with (
        pytest.raises(ConnectionResetError),
        Spool(memory_limit=0, max_body=1000, directory=root) as spool,
    ):
        spool.write(b"body")
        raise ConnectionResetError("client gone")
    assert files_in(root) == []


async def test_file_removed_when_request_task_is_cancelled(root: Path) -> None:
    spilled = asyncio.Event()

    async def handler() -> None:
        with Spool(memory_limit=0, max_body=1000, directory=root) as spool:
            spool.write(b"body")
            spilled.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(handler())
    await spilled.wait()
    assert files_in(root) != []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_in(root) == []


async def test_cancelled_replay_leaks_no_descriptor(root: Path) -> None:
    body = os.urandom(64 * KIB)
    before = open_fds()
    first_chunk = asyncio.Event()

    async def consume(spool: Spool) -> None:
        async for _ in spool.chunks(chunk_size=KIB):
            first_chunk.set()
            await asyncio.Event().wait()

    with Spool(memory_limit=0, max_body=len(body), directory=root) as spool:
        spool.write(body)
        task = asyncio.create_task(consume(spool))
        await first_chunk.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert files_in(root) == []
    assert open_fds() == before


async def test_replay_after_close_fails_cleanly(root: Path) -> None:
    body = os.urandom(8 * KIB)
    before = open_fds()
    spool = Spool(memory_limit=0, max_body=len(body), directory=root)
    spool.write(body)
    chunks = spool.chunks(chunk_size=KIB)
    assert await anext(chunks) == body[:KIB]
    spool.close()
    assert files_in(root) == []
    with pytest.raises(RuntimeError, match="closed during replay"):
        await anext(chunks)
    assert open_fds() == before


def test_forgotten_spool_removes_its_file(root: Path) -> None:
    spool = Spool(memory_limit=0, max_body=100, directory=root)
    spool.write(b"x")
    assert files_in(root) != []
    del spool
    gc.collect()
    assert files_in(root) == []


def test_disk_failure_makes_body_unreplayable_not_the_request(tmp_path: Path) -> None:
    spool = Spool(memory_limit=4, max_body=100, directory=tmp_path / "missing")
    spool.write(b"abc")
    spool.write(b"defgh")
    assert isinstance(spool.failed, FileNotFoundError)
    assert not spool.replayable and spool.size == 8


def test_repr_shows_no_content(root: Path) -> None:
    with Spool(memory_limit=100, max_body=1000, directory=root) as spool:
        spool.write(b"password=hunter2")
        assert "hunter2" not in repr(spool)


def test_spool_root_is_private_and_reused(tmp_path: Path) -> None:
    base = tmp_path / "configured"
    root = spool_root(base)
    assert root.parent == base.resolve() and mode(root) == 0o700
    assert str(os.getpid()) in root.name
    assert spool_root(base) == root
    root.rmdir()
    again = spool_root(base)
    assert again.is_dir() and mode(again) == 0o700, "recreated when removed behind our back"


def test_stale_roots_of_dead_processes_on_this_host_swept(tmp_path: Path) -> None:
    mine = spool_root(tmp_path)
    tag = mine.name.split("-")[2]
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(child.stdout)
    stale = tmp_path / f"tokenrelay-{dead}-{tag}-x1"
    stale.mkdir(mode=0o700)
    (stale / "body-1").write_bytes(b"left by a crash")
    live = tmp_path / f"tokenrelay-{os.getppid()}-{tag}-x2"
    other_host = tmp_path / f"tokenrelay-{dead}-00000000-x3"
    unrelated = tmp_path / "someone-else"
    for d in (live, other_host, unrelated):
        d.mkdir()
    mine.rmdir()  # forces a new root, which sweeps
    spool_root(tmp_path)
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_default_spool_root_under_system_tempdir() -> None:
    root = spool_root(None)
    assert root.parent == Path(tempfile.gettempdir())
    assert mode(root) == 0o700


def test_default_spool_root_used_when_no_directory() -> None:
    with Spool(memory_limit=0, max_body=10) as spool:
        spool.write(b"x")
        assert spool.path is not None
        assert spool.path.parent == spool_root(None)


@pytest.mark.parametrize("bad_mode", [0o777, 0o770, 0o722, 0o1777])
def test_shared_spool_dir_refused(tmp_path: Path, bad_mode: int) -> None:
    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(bad_mode)
    with pytest.raises(ConfigError, match="group or world writable"):
        spool_root(base)


def test_spool_dir_owned_by_someone_else_refused(tmp_path: Path) -> None:
    base = tmp_path / "theirs"
    base.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    os.chown(base, 4242, 4242)
    with pytest.raises(ConfigError, match="owned by"):
        spool_root(base)


def test_spool_dir_that_is_a_file_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ConfigError, match=str(target)):
        spool_root(target)


def test_missing_spool_dir_created_private(tmp_path: Path) -> None:
    base = tmp_path / "a" / "b"
    root = spool_root(base)
    assert mode(base) == 0o700 and root.parent == base


THRESHOLD_SIZES = st.one_of(
    st.integers(0, 3), st.integers(60, 68), st.integers(124, 132), st.integers(250, 260)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(THRESHOLD_SIZES, max_size=8))
def test_any_chunking_reproduces_body(sizes: list[int]) -> None:
    directory = spool_root(None)
    chunks = [bytes((i * 31 + j) % 251 for j in range(n)) for i, n in enumerate(sizes)]
    body = b"".join(chunks)
    spool = Spool(memory_limit=64, max_body=256, directory=directory)
    with spool:
        for c in chunks:
            spool.write(c)
        assert spool.size == len(body)
        if len(body) > 256:
            assert not spool.replayable and not spool.on_disk
        else:
            assert spool.replayable and spool.on_disk == (len(body) > 64)
            assert asyncio.run(replay(spool, chunk_size=50)) == body
        path = spool.path
    assert path is None or not path.exists()


# --- the process's budgets: what every spool together may hold


def test_chunk_the_memory_budget_refuses_sends_the_body_to_disk(root: Path) -> None:
    memory, disk = Budget(100), Budget(1000)
    with Spool(1000, 1000, root, memory=memory, disk=disk) as spool:
        spool.write(b"a" * 60)
        assert not spool.on_disk and (memory.used, disk.used) == (60, 0)
        spool.write(b"b" * 60)  # within the route's memory, not the process's
        assert spool.on_disk and (memory.used, disk.used) == (0, 120)
        assert spool.path is not None and spool.path.stat().st_size == 120
        assert spool.replayable
    assert (memory.used, disk.used) == (0, 0) and files_in(root) == []


async def test_chunk_no_budget_has_room_for_ends_keeping_not_the_stream(root: Path) -> None:
    memory, disk = Budget(100), Budget(150)
    with Spool(1000, 1000, root, memory=memory, disk=disk) as spool:
        spool.write(b"a" * 90)
        spool.write(b"b" * 50)
        assert spool.on_disk and disk.used == 140
        spool.write(b"c" * 20)
        assert spool.over_budget and not spool.replayable and not spool.overflowed
        assert (memory.used, disk.used) == (0, 0) and files_in(root) == []
        spool.write(b"d" * 10)
        assert spool.size == 170 and disk.used == 0, "what streams on is counted, not kept"
        with pytest.raises(RuntimeError, match="cannot be replayed"):
            await replay(spool)
    assert memory.peak == 90 and disk.peak == 140


async def test_known_length_reserved_whole_in_memory_else_on_disk_else_not_kept(
    root: Path,
) -> None:
    memory, disk = Budget(100), Budget(100)
    in_memory = Spool(100, 1000, root, memory=memory, disk=disk, length=80)
    on_disk = Spool(100, 1000, root, memory=memory, disk=disk, length=60)
    refused = Spool(100, 1000, root, memory=memory, disk=disk, length=50)
    assert (memory.used, disk.used) == (80, 60), "reserved before a byte arrived"
    assert refused.over_budget and not refused.replayable
    for spool, n in ((in_memory, 80), (on_disk, 60), (refused, 50)):
        for i in range(0, n, 7):
            spool.write(bytes([i]) * min(7, n - i))
    assert not in_memory.on_disk and on_disk.on_disk and refused.path is None
    assert (memory.used, disk.used) == (80, 60), "the body's writes reserve nothing more"
    assert len(await replay(in_memory)) == 80 and len(await replay(on_disk)) == 60
    for spool in (in_memory, on_disk, refused):
        spool.close()
    assert (memory.used, disk.used) == (0, 0) and files_in(root) == []


def test_forgotten_spool_gives_its_budget_back(root: Path) -> None:
    memory, disk = Budget(100), Budget(100)
    kept = Spool(50, 1000, root, memory=memory, disk=disk)
    kept.write(b"x" * 40)
    spilled = Spool(10, 1000, root, memory=memory, disk=disk)
    spilled.write(b"y" * 40)
    assert (memory.used, disk.used) == (40, 40)
    del kept, spilled
    gc.collect()
    assert (memory.used, disk.used) == (0, 0) and files_in(root) == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(st.lists(THRESHOLD_SIZES, max_size=6), min_size=1, max_size=5),
    known=st.booleans(),
)
def test_spools_together_never_hold_more_than_the_budgets(
    bodies: list[list[int]], known: bool
) -> None:
    directory = spool_root(None)
    memory, disk = Budget(200), Budget(300)
    blobs = [[bytes([i]) * n for n in sizes] for i, sizes in enumerate(bodies)]
    spools = [
        Spool(
            64, 256, directory, memory=memory, disk=disk, length=sum(map(len, b)) if known else None
        )
        for b in blobs
    ]
    for step in range(max(map(len, blobs))):  # interleaved, as concurrent uploads are
        for spool, chunks in zip(spools, blobs, strict=True):
            if step < len(chunks):
                spool.write(chunks[step])
                assert memory.used <= memory.limit and disk.used <= disk.limit
    on_disk = sum(s.path.stat().st_size for s in spools if s.path is not None)
    assert disk.used == on_disk, "the disk budget counts what the files hold"
    for spool, chunks in zip(spools, blobs, strict=True):
        if spool.replayable:
            assert asyncio.run(replay(spool, chunk_size=50)) == b"".join(chunks)
        spool.close()
    assert (memory.used, disk.used) == (0, 0)
