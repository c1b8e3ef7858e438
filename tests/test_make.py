"""``make docker-test``: a real recipe, a clear SKIPPED where Docker is missing, and the
steps it takes where Docker is there (played here by a stand-in ``docker`` on PATH that
records its calls and points the script at a real proxy)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import StartProxy

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="no make on PATH")


def make(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [MAKE, "-s", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def fake_docker(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "docker"
    script.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_docker_test_has_a_recipe() -> None:
    done = make("-n", "docker-test", path=os.environ["PATH"])
    assert done.returncode == 0, done.stderr
    assert "deploy/docker-test.sh" in done.stdout
    assert "Nothing to be done" not in done.stdout + done.stderr


def test_docker_test_without_a_docker_client_says_skipped(tmp_path: Path) -> None:
    done = make("docker-test", path=str(tmp_path))  # an empty PATH: no docker, no dirname
    assert done.returncode == 0, done.stderr
    assert "docker-test: SKIPPED: no docker client on PATH" in done.stdout


def test_docker_test_without_a_daemon_says_skipped(tmp_path: Path) -> None:
    fake_docker(tmp_path / "bin", "sys.exit(1 if sys.argv[1] == 'info' else 99)")
    done = make("docker-test", path=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert "docker-test: SKIPPED: docker daemon not reachable" in done.stdout


DOCKER = """
import json, os
calls = os.environ["FAKE_DOCKER_CALLS"]
with open(calls, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
answers = {"port": "127.0.0.1:" + os.environ["FAKE_DOCKER_PORT"], "inspect": "0",
           "exec": os.environ.get("FAKE_DOCKER_UID", "10001"), "run": "c0ffee"}
print(answers.get(sys.argv[1], ""))
"""


async def run_with_fake_docker(
    tmp_path: Path, port: int, uid: str = "10001"
) -> tuple[int, str, list[list[str]]]:
    import json

    fake_docker(tmp_path / "bin", DOCKER)
    calls = tmp_path / "calls.jsonl"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "FAKE_DOCKER_CALLS": str(calls),
        "FAKE_DOCKER_PORT": str(port),
        "FAKE_DOCKER_UID": uid,
        "PYTHON": sys.executable,
    }
    assert MAKE is not None
    proc = await asyncio.create_subprocess_exec(
        MAKE, "-s", "docker-test", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, out.decode(), [json.loads(line) for line in lines]


async def test_docker_test_builds_runs_asks_and_stops_the_image(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy("routes: []\n")  # what the container would serve
    code, out, calls = await run_with_fake_docker(tmp_path, proxy.port)
    assert code == 0, out
    assert "docker-test: OK" in out
    verbs = [c[0] for c in calls]
    assert verbs[:3] == ["info", "build", "run"], calls
    assert verbs.index("stop") < verbs.index("inspect") < verbs.index("rm")
    run = calls[2]
    assert "--read-only" in run and "-p" in run and run[-1] == "tokenrelay:docker-test"


async def test_docker_test_fails_when_the_container_runs_as_root(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy("routes: []\n")
    code, out, calls = await run_with_fake_docker(tmp_path, proxy.port, uid="0")
    assert code != 0
    assert "docker-test: FAILED: the container does not run as uid 10001" in out
    assert calls[-1][:2] == ["rm", "-f"]  # cleaned up on failure too
