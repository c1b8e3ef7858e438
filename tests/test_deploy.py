"""The Dockerfile (installs only from the locks) and the container quick start: static checks, the
quick start's command run as a real process, a real container when a Docker daemon answers.
The Kubernetes manifests are in test_kubernetes.py, the lock files in test_lock.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from fnmatch import fnmatch
from pathlib import Path
from secrets import token_hex

import aiohttp
import pytest
import yaml
from yarl import URL

from proxy.demo import demo_app
from proxy.demo_run import DemoVendor
from tests.deploy_files import (
    BUILD_LOCK,
    LOCK,
    ROOT,
    Instructions,
    dockerfile,
    final_stage,
    only,
    readme_section,
    shell_commands,
)
from tests.helpers import read_event

PY = sys.executable
DEMO = ROOT / "deploy" / "docker" / "demo.yaml"

# ---------------------------------------------------------------------------
# Dockerfile


@pytest.fixture(scope="module", name="dockerfile")
def dockerfile_fixture() -> Instructions:
    return dockerfile()


def test_image_runs_as_a_numeric_non_root_user(dockerfile: Instructions) -> None:
    user = only(final_stage(dockerfile), "USER").split(":")[0]
    assert user.isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(user) != 0


def test_entrypoint_and_cmd_are_exec_form(dockerfile: Instructions) -> None:
    stage = final_stage(dockerfile)
    assert json.loads(only(stage, "ENTRYPOINT")) == ["tokenrelay"]
    cmd = json.loads(only(stage, "CMD"))
    assert cmd == ["--config", "/etc/tokenrelay/routes.yaml", "--host", "0.0.0.0"]


def test_healthcheck_asks_health_with_python(dockerfile: Instructions) -> None:
    stage = final_stage(dockerfile)
    check = only(stage, "HEALTHCHECK")
    assert "curl" not in check and "wget" not in check  # neither is in the slim image
    exec_form = json.loads(check[check.index("CMD") + 3 :])
    assert exec_form[0] == "python"
    env = " ".join(args for word, args in stage if word == "ENV")
    assert "TOKENRELAY_HEALTH_URL=http://127.0.0.1:8080/-/health" in env
    assert "TOKENRELAY_HEALTH_URL" in exec_form[-1]
    assert only(stage, "EXPOSE") == "8080"


def global_args(instrs: Instructions) -> dict[str, str]:
    """The ARGs before the first FROM (the only ones FROM can use), name -> default."""
    first_from = next(i for i, (word, _) in enumerate(instrs) if word == "FROM")
    pairs = (args.partition("=") for word, args in instrs[:first_from] if word == "ARG")
    return {name: default for name, _, default in pairs}


def test_base_image_is_one_arg_pinned_by_a_digest_set_in_one_place(
    dockerfile: Instructions,
) -> None:
    """Both stages come from ${PYTHON_IMAGE}, which is python:3.11-slim@PYTHON_DIGEST once
    the digest is filled in; the comment says how to get it."""
    args = global_args(dockerfile)
    assert list(args) == ["PYTHON_DIGEST", "PYTHON_IMAGE"]
    assert args["PYTHON_IMAGE"] == "python:3.11-slim${PYTHON_DIGEST:+@${PYTHON_DIGEST}}"
    assert re.fullmatch(r"(sha256:[0-9a-f]{64})?", args["PYTHON_DIGEST"])
    froms = [args for word, args in dockerfile if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    text = (ROOT / "Dockerfile").read_text()
    assert "docker buildx imagetools inspect python:3.11-slim" in text
    assert "crane digest python:3.11-slim" in text
    assert text.count("python:3.11-slim${") == 1  # the tag is written once


def test_final_stage_copies_the_venv_and_the_demo_config(dockerfile: Instructions) -> None:
    copies = [args for word, args in final_stage(dockerfile) if word == "COPY"]
    assert copies == [
        "--from=build /opt/tokenrelay /opt/tokenrelay",
        f"{DEMO.relative_to(ROOT)} /usr/share/tokenrelay/demo.yaml",
    ]


def pip_commands(instrs: Instructions) -> list[list[str]]:
    """Every pip call of every RUN, as words."""
    return [
        part.split()
        for word, args in instrs
        if word == "RUN"
        for part in args.split("&&")
        if re.search(r"/pip (install|wheel)\b", part)
    ]


def test_pip_installs_only_hash_checked_locked_files(dockerfile: Instructions) -> None:
    """Dependencies and build backend from the locks with --require-hashes; the package
    itself built without fetching anything and installed without dependencies."""
    locks_installed = []
    for words in pip_commands(dockerfile):
        if "-r" in words:
            assert "--require-hashes" in words, words
            locks_installed.append(words[words.index("-r") + 1])
        elif "wheel" in words:
            assert {"--no-deps", "--no-build-isolation"} <= set(words), words
        else:
            assert "--no-deps" in words and words[-1].endswith(".whl"), words
    assert sorted(locks_installed) == sorted([BUILD_LOCK.name, LOCK.name])
    copied_at = dockerfile.index(("COPY", f"{LOCK.name} {BUILD_LOCK.name} ./"))
    first_pip = next(i for i, (w, a) in enumerate(dockerfile) if w == "RUN" and "pip " in a)
    assert copied_at < first_pip


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        exclude = not pattern.startswith("!")
        if any(fnmatch(p, pattern.removeprefix("!")) for p in prefixes):
            verdict = exclude
    return verdict


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore()
    for path in (".venv", ".git", ".pytest_cache", ".mypy_cache", ".env", "tests/x.py"):
        assert ignored(path, patterns), path
    assert ignored("deploy/kubernetes/deployment.yaml", patterns)
    for path in ("pyproject.toml", "README.md", "proxy", "requirements.lock"):
        assert not ignored(path, patterns), path


def build_context_sources(instrs: Instructions) -> list[str]:
    return [
        src
        for word, args in instrs
        if word == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]


def test_build_context_is_enough_to_install_the_package(
    dockerfile: Instructions, tmp_path: Path
) -> None:
    """What `docker build` does, without Docker: every file it copies is in the context
    (.dockerignore included), and those files alone make the package."""
    ctx = tmp_path / "ctx"
    for src in build_context_sources(dockerfile):
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not ignored(src, dockerignore()), f".dockerignore leaves {src} out"
        (ctx / src).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, ctx / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / src, ctx / src)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "wheel"), str(ctx)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("tokenrelay-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "tokenrelay = proxy.cli:main" in zf.read(entry_points).decode()
    assert {"proxy/demo.py", "proxy/demo_run.py", "proxy/config.py"} <= set(names)


# ---------------------------------------------------------------------------
# the README's container quick start, run without Docker


def quick_start() -> list[str]:
    """The README's `docker run` of the demo image."""
    runs = [c for c in shell_commands(readme_section("Container and Kubernetes"))
            if c[:2] == ["docker", "run"] and "proxy.demo_run" in c]  # fmt: skip
    assert len(runs) == 1, runs
    return runs[0]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def in_image(path: str) -> Path:
    """The repository file the Dockerfile copies to ``path`` in the image."""
    for word, args in dockerfile():
        src, _, dest = args.rpartition(" ")
        if word == "COPY" and dest == path:
            return ROOT / src
    raise AssertionError(f"the Dockerfile puts nothing at {path}")


def quick_start_argv() -> tuple[list[str], list[str]]:
    """(what the container runs, as a local command line; the -e variables it needs)."""
    run = quick_start()
    image = next(w for w in run if w.startswith("tokenrelay:"))
    command = [option(run, "--entrypoint"), *run[run.index(image) + 1 :]]
    assert command[0] == "python"
    command[0] = PY
    i = command.index("--config") + 1
    command[i] = str(in_image(command[i]))
    env = [run[i + 1] for i, w in enumerate(run) if w == "-e"]
    return command, env


def test_quick_start_publishes_the_demo_port_on_loopback_only() -> None:
    run = quick_start()
    config = yaml.safe_load(in_image(option(run, "--config")).read_text())
    host, port = option(run, "-p").rsplit(":", 2)[0], option(run, "-p").rsplit(":", 1)[1]
    assert host == "127.0.0.1", "the host side of -p: nothing outside this machine"
    assert config["listen"] == {"host": "0.0.0.0", "port": int(port)}
    assert "--rm" in run


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    return {**env, **extra}


def tokenrelay_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_demo_config_passes_check_only_with_the_key_the_quick_start_sets(
    tmp_path: Path,
) -> None:
    """The real CLI, with its open-listener rule: the demo config listens on 0.0.0.0 and
    passes because it has a client key, from the variable `docker run -e` passes."""
    _, env_names = quick_start_argv()
    assert env_names == ["TOKENRELAY_DEMO_KEY"]
    ok = tokenrelay_check(DEMO, demo_env(TOKENRELAY_DEMO_KEY=token_hex(16)))
    assert ok.returncode == 0, ok.stderr
    assert "config OK" in ok.stdout and "route /demo/ " in ok.stdout
    missing = tokenrelay_check(DEMO, demo_env())
    assert missing.returncode == 2
    assert "clients[0].key: environment variable TOKENRELAY_DEMO_KEY is not set" in missing.stderr
    doc = yaml.safe_load(DEMO.read_text())
    del doc["clients"]
    open_port = tmp_path / "demo.yaml"
    open_port.write_text(yaml.safe_dump(doc))
    refused = tokenrelay_check(open_port, demo_env())
    assert refused.returncode == 2
    assert "listen.host: listening on 0.0.0.0 would let anyone" in refused.stderr


@pytest.fixture
async def quick_start_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """The container's command, here: the demo vendor and the proxy on free ports."""
    command, _ = quick_start_argv()
    key = token_hex(16)
    proc = await asyncio.create_subprocess_exec(
        *command, "--demo-port", "0", "--port", "0",
        env=demo_env(TOKENRELAY_DEMO_KEY=key),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    yield proc, key
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_quick_start_command_serves_the_demo_to_the_key_and_stops_on_sigterm(
    quick_start_process: tuple[asyncio.subprocess.Process, str], client: aiohttp.ClientSession
) -> None:
    proc, key = quick_start_process
    assert proc.stderr is not None
    address = URL(str((await read_event(proc.stderr, "listening"))["address"]))
    assert address.host == "0.0.0.0"
    base = URL.build(scheme="http", host="127.0.0.1", port=address.port)
    async with client.get(base / "demo" / "api" / "hello", headers={"X-Api-Key": key}) as r:
        assert r.status == 200
        assert (await r.json())["token"]["grant"] == "password"
    async with client.get(base / "demo-cc" / "api" / "hello", headers={"X-Api-Key": key}) as r:
        assert (r.status, (await r.json())["token"]["grant"]) == (200, "client_credentials")
    async with client.get(base / "demo" / "api" / "hello") as r:
        assert r.status == 401
        assert r.headers["Content-Type"] == "application/problem+json"
    proc.send_signal(signal.SIGTERM)
    rest = (await proc.stderr.read()).decode()
    assert await proc.wait() == 0
    assert "Traceback" not in rest


# ---------------------------------------------------------------------------
# a real container, when Docker is there


def docker_unavailable() -> str:
    """Why no container can be run here, or "" when one can."""
    if shutil.which("docker") is None:
        return "no docker client"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    return "" if probe.returncode == 0 else "docker daemon not reachable (`docker info` failed)"


def docker(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, deadline: float = 60.0) -> None:
    """Poll until ready: start-up time is bounded, never asserted."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {deadline} s")


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    tag = f"tokenrelay-test:{uuid.uuid4().hex[:12]}"
    docker("build", "-t", tag, str(ROOT), timeout=900)
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60)


def demo_config(tmp_path: Path, vendor_port: int, proxy_port: int) -> Path:
    conf, secrets = tmp_path / "conf", tmp_path / "secrets"
    for d in (conf, secrets):
        d.mkdir()
        d.chmod(0o755)  # the container's user is not the test's
    (secrets / "demo-password").write_text("demo-password\n")
    (conf / "routes.yaml").write_text(
        f"listen: {{host: 127.0.0.1, port: {proxy_port}}}\n"
        "providers:\n"
        "  demo:\n"
        "    preset: simacan\n"
        f"    auth_base: http://127.0.0.1:{vendor_port}\n"
        "    username: demo\n"
        "    password_file: /run/secrets/tokenrelay/demo-password\n"
        "routes:\n"
        f"  - {{prefix: /demo/, upstream: 'http://127.0.0.1:{vendor_port}', provider: demo}}\n"
    )
    return tmp_path


@pytest.mark.skipif(bool(docker_unavailable()), reason=docker_unavailable() or "-")
def test_container_proxies_runs_unprivileged_and_stops_cleanly_on_sigterm(
    image: str, tmp_path: Path
) -> None:
    vendor = DemoVendor(demo_app(60))
    vendor_port, proxy_port = vendor.start(), free_port()
    base = demo_config(tmp_path, vendor_port, proxy_port)
    name = f"tokenrelay-test-{uuid.uuid4().hex[:8]}"
    try:
        docker(
            "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
            "-v", f"{base / 'conf'}:/etc/tokenrelay:ro",
            "-v", f"{base / 'secrets'}:/run/secrets/tokenrelay:ro",
            image, "--config", "/etc/tokenrelay/routes.yaml", "--host", "127.0.0.1",
        )  # fmt: skip
        wait_ready(f"http://127.0.0.1:{proxy_port}/-/ready")
        url = f"http://127.0.0.1:{proxy_port}/demo/api/hello"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert json.load(resp)["token"]["grant"] == "password"
        assert docker("exec", name, "id", "-u") == "10001"
        docker("stop", "--time", "25", name, timeout=60)
        assert docker("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        vendor.stop()


@pytest.mark.skipif(bool(docker_unavailable()), reason=docker_unavailable() or "-")
def test_readme_quick_start_container_serves_the_demo_to_the_key(image: str) -> None:
    """The README's `docker run`, on a free host port and detached, as written otherwise."""
    run, port, key = quick_start(), free_port(), token_hex(16)
    name = f"tokenrelay-test-{uuid.uuid4().hex[:8]}"
    image_at = next(i for i, w in enumerate(run) if w.startswith("tokenrelay:"))
    options = [w for w in run[2:image_at] if w != "--rm"]
    options[options.index("--name") + 1] = name
    options[options.index("-p") + 1] = f"127.0.0.1:{port}:8080"
    try:
        docker("run", "-d", *options, image, *run[image_at + 1 :],
               env={**os.environ, "TOKENRELAY_DEMO_KEY": key})  # fmt: skip
        wait_ready(f"http://127.0.0.1:{port}/-/ready")
        hello = urllib.request.Request(
            f"http://127.0.0.1:{port}/demo/api/hello", headers={"X-Api-Key": key}
        )
        with urllib.request.urlopen(hello, timeout=10) as resp:
            assert json.load(resp)["token"]["grant"] == "password"
        docker("stop", "--time", "25", name, timeout=60)
        assert docker("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
