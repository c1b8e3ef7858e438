"""The lock files the image installs from: every file hash-pinned, every dependency of
pyproject.toml pinned within its range, and nothing a locked package needs left out."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy_files import BUILD_LOCK, LOCK, ROOT


def locked(path: Path) -> dict[str, tuple[Requirement, list[str]]]:
    """What a ``pip-compile --generate-hashes`` file pins: name -> (requirement, hashes)."""
    out: dict[str, tuple[Requirement, list[str]]] = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            spec, *hashes = re.split(r"\s+--hash=", line)
            req = Requirement(spec)
            out[canonicalize_name(req.name)] = (req, hashes)
    return out


@pytest.mark.parametrize("lock", [LOCK, BUILD_LOCK], ids=lambda p: p.name)
def test_every_locked_package_is_pinned_with_sha256_hashes(lock: Path) -> None:
    pins = locked(lock)
    assert pins
    for name, (req, hashes) in pins.items():
        assert [s.operator for s in req.specifier] == ["=="], name
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


@pytest.mark.parametrize(
    ("lock", "key"),
    [(LOCK, ("project", "dependencies")), (BUILD_LOCK, ("build-system", "requires"))],
    ids=["runtime", "build"],
)
def test_lock_pins_every_dependency_of_pyproject_within_its_range(
    lock: Path, key: tuple[str, str]
) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = locked(lock)
    for dep in pyproject[key[0]][key[1]]:
        want = Requirement(dep)
        assert canonicalize_name(want.name) in pins, f"{want.name} is not in {lock.name}"
        pin, _ = pins[canonicalize_name(want.name)]
        (version,) = (s.version for s in pin.specifier)
        assert want.specifier.contains(version), f"{pin} is outside {want}: regenerate the lock"
        assert str(pin.marker) == str(want.marker), want.name


def test_runtime_lock_is_closed_under_the_dependencies_of_what_it_pins() -> None:
    """``pip install --require-hashes`` fails on a missing transitive dependency; checked here
    from the metadata of the installed distributions of the same versions."""
    pins = locked(LOCK)
    env = {"sys_platform": "linux", "python_version": "3.11", "extra": ""}
    checked = 0
    for name, (req, _) in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not req.specifier.contains(dist.version):
            continue
        checked += 1
        for raw in dist.requires or []:
            need = Requirement(raw)
            if need.marker is None or need.marker.evaluate(env):
                assert canonicalize_name(need.name) in pins, f"{name} needs {need.name}"
    assert checked >= len(pins) // 2, "too few locked versions installed to check"
