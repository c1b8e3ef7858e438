"""The Dockerfile and the Kubernetes manifests: static checks always, a real container run
when a Docker daemon answers, schema validation when ``kubernetes-validate`` is installed."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.config import Config, parse_config
from proxy.demo import demo_app
from proxy.demo_run import DemoVendor

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
Doc = dict[str, Any]

# ---------------------------------------------------------------------------
# Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, args = (pending + stripped).partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instrs) if word == "FROM")
    return instrs[last_from:]


def only(instrs: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in instrs if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def test_image_runs_as_a_numeric_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    user = only(final_stage(dockerfile), "USER").split(":")[0]
    assert user.isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(user) != 0


def test_entrypoint_and_cmd_are_exec_form(dockerfile: list[tuple[str, str]]) -> None:
    stage = final_stage(dockerfile)
    assert json.loads(only(stage, "ENTRYPOINT")) == ["tokenrelay"]
    cmd = json.loads(only(stage, "CMD"))
    assert cmd == ["--config", "/etc/tokenrelay/routes.yaml", "--host", "0.0.0.0"]


def test_healthcheck_asks_health_with_python(dockerfile: list[tuple[str, str]]) -> None:
    stage = final_stage(dockerfile)
    check = only(stage, "HEALTHCHECK")
    assert "curl" not in check and "wget" not in check  # neither is in the slim image
    exec_form = json.loads(check[check.index("CMD") + 3 :])
    assert exec_form[0] == "python"
    env = " ".join(args for word, args in stage if word == "ENV")
    assert "TOKENRELAY_HEALTH_URL=http://127.0.0.1:8080/-/health" in env
    assert "TOKENRELAY_HEALTH_URL" in exec_form[-1]
    assert only(stage, "EXPOSE") == "8080"


def test_two_stages_from_python_slim_with_venv_copied(dockerfile: list[tuple[str, str]]) -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    froms = [args for word, args in dockerfile if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    copies = [args for word, args in final_stage(dockerfile) if word == "COPY"]
    assert copies == ["--from=build /opt/tokenrelay /opt/tokenrelay"]
    assert any("pip install ." in args for word, args in dockerfile if word == "RUN")


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch(path, p) or fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore()
    for path in (".venv", ".git", ".pytest_cache", ".mypy_cache", ".env", "tests/x.py"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "proxy"):
        assert not ignored(path, patterns), path


def build_context_sources(instrs: list[tuple[str, str]]) -> list[str]:
    return [
        src
        for word, args in instrs
        if word == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]


def test_build_context_is_enough_to_install_the_package(
    dockerfile: list[tuple[str, str]], tmp_path: Path
) -> None:
    """What `docker build` does, without Docker: install from only the files it copies."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for src in build_context_sources(dockerfile):
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
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
    assert {"proxy/demo.py", "proxy/config.py"} <= set(names)


# ---------------------------------------------------------------------------
# a real container, when Docker is there


def docker_unavailable() -> str:
    """Why no container can be run here, or "" when one can."""
    if shutil.which("docker") is None:
        return "no docker client"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    return "" if probe.returncode == 0 else "docker daemon not reachable (`docker info` failed)"


def docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
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


# ---------------------------------------------------------------------------
# Kubernetes manifests


def load_docs() -> list[tuple[str, Doc]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


DOCS = load_docs()
OBJECTS = [(f, d) for f, d in DOCS if d["kind"] != "Kustomization"]
DEPLOYMENTS = [d for _, d in OBJECTS if d["kind"] == "Deployment"]


def by_kind_name(kind: str, name: str) -> Doc:
    (doc,) = [d for _, d in OBJECTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod(dep: Doc) -> Doc:
    spec: Doc = dep["spec"]["template"]["spec"]
    return spec


def all_containers(dep: Doc) -> list[Doc]:
    return [*pod(dep).get("initContainers", []), *pod(dep)["containers"]]


def relay(dep: Doc) -> Doc:
    (c,) = [c for c in all_containers(dep) if c["name"] == "tokenrelay"]
    return c


def test_manifests_exist() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Kustomization"} <= kinds
    assert len(DEPLOYMENTS) == 2  # the shared service and the sidecar example


@pytest.mark.parametrize(("file", "doc"), OBJECTS, ids=[f for f, _ in OBJECTS])
def test_every_document_is_a_named_object(file: str, doc: Doc) -> None:
    assert doc["apiVersion"] and doc["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def kubernetes_validate_missing() -> str:
    if importlib.util.find_spec("kubernetes_validate") is None:
        return "kubernetes-validate not installed (pip install kubernetes-validate)"
    return ""


@pytest.mark.skipif(
    bool(kubernetes_validate_missing()), reason=kubernetes_validate_missing() or "-"
)
@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_manifests_match_the_kubernetes_schema(version: str) -> None:
    """Strict: a misspelt or misplaced field fails. 1.29 is the oldest with native sidecars."""
    import kubernetes_validate.utils as kv  # type: ignore[import-untyped]

    for file, doc in OBJECTS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{file} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_kustomization_lists_real_files_but_not_the_example_secret() -> None:
    (kust,) = [d for _, d in DOCS if d["kind"] == "Kustomization"]
    resources = kust["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert "secret.example.yaml" not in resources  # would overwrite the real credentials
    assert "sidecar-example.yaml" not in resources


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build_renders_the_service_stack() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = list(yaml.safe_load_all(out.stdout))
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]
    )


def dockerfile_uid() -> int:
    user = only(final_stage(instructions((ROOT / "Dockerfile").read_text())), "USER")
    return int(user.split(":")[0])


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["metadata"]["name"] for d in DEPLOYMENTS])
def test_pods_are_locked_down(dep: Doc) -> None:
    sec = pod(dep)["securityContext"]
    assert sec["runAsNonRoot"] is True
    assert sec["runAsUser"] == dockerfile_uid()
    assert pod(dep)["automountServiceAccountToken"] is False
    for c in all_containers(dep):
        assert c["image"], c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]
        csec = c["securityContext"]
        assert csec["readOnlyRootFilesystem"] is True, c["name"]
        assert csec["allowPrivilegeEscalation"] is False, c["name"]
        assert csec["capabilities"]["drop"] == ["ALL"], c["name"]


def probe_target(probe: Doc, container: Doc) -> tuple[str, int]:
    """(path, port) a probe asks, for HTTP probes and the in-container python ones."""
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
        return probe["httpGet"]["path"], int(port)
    command = " ".join(probe["exec"]["command"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/-/\w+)", command)
    assert m, command
    return m.group(2), int(m.group(1))


# ---------------------------------------------------------------------------
# the routes.yaml inside each ConfigMap, as the pod would load it


def volume(dep: Doc, name: str) -> Doc:
    found: list[Doc] = [v for v in pod(dep)["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def mount_for(dep: Doc, path: str) -> tuple[Doc, str]:
    """The volume holding ``path`` in the tokenrelay container, and the path inside it."""
    for m in relay(dep)["volumeMounts"]:
        mount = PurePosixPath(m["mountPath"])
        if PurePosixPath(path).is_relative_to(mount):
            return volume(dep, m["name"]), str(PurePosixPath(path).relative_to(mount))
    raise AssertionError(f"{path} is on no volume of the tokenrelay container")


def file_keys(node: Any) -> Iterator[str]:
    """Every ``*_file`` value in a raw config tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k.endswith("_file") and isinstance(v, str):
                yield v
            else:
                yield from file_keys(v)
    elif isinstance(node, list):
        for item in node:
            yield from file_keys(item)


def config_text(dep: Doc) -> tuple[str, str]:
    args = relay(dep)["args"]
    path = args[args.index("--config") + 1]
    vol, key = mount_for(dep, path)
    cm = by_kind_name("ConfigMap", vol["configMap"]["name"])
    return path, cm["data"][key]


def loaded(dep: Doc, tmp_path: Path) -> Config:
    """Parse the ConfigMap's routes.yaml with the pod's env and secret files (dummy values)."""
    _, text = config_text(dep)
    for path in file_keys(yaml.safe_load(text)):
        vol, key = mount_for(dep, path)
        assert "secret" in vol, f"{path} must come from a Secret volume"
        local = tmp_path / vol["secret"]["secretName"] / key
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(f"dummy-{key}\n")
        text = text.replace(path, str(local))
    env = {e["name"]: f"dummy-{e['name']}" for e in relay(dep).get("env", [])}
    return parse_config(text, "routes.yaml", env=env).config


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["metadata"]["name"] for d in DEPLOYMENTS])
def test_config_parses_with_the_pods_env_and_secret_files(dep: Doc, tmp_path: Path) -> None:
    config = loaded(dep, tmp_path)
    assert config.routes and all(r.provider for r in config.routes)
    assert config.spool_dir is not None, "read-only root: the spool must be on a volume"
    vol, _ = mount_for(dep, str(config.spool_dir))
    assert "emptyDir" in vol


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["metadata"]["name"] for d in DEPLOYMENTS])
def test_probes_ask_health_and_ready_on_the_configured_port(dep: Doc, tmp_path: Path) -> None:
    config, c = loaded(dep, tmp_path), relay(dep)
    assert probe_target(c["readinessProbe"], c) == ("/-/ready", config.listen.port)
    assert probe_target(c["livenessProbe"], c) == ("/-/health", config.listen.port)
    if "startupProbe" in c:
        assert probe_target(c["startupProbe"], c) == ("/-/ready", config.listen.port)


def test_shared_service_is_reachable_only_with_client_keys(tmp_path: Path) -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    config = loaded(dep, tmp_path)
    assert config.listen.host == "0.0.0.0"
    assert config.clients and not config.allow_unauthenticated
    routes = {r.prefix for r in config.routes}
    assert all(set(c.routes) <= routes for c in config.clients)
    (port,) = relay(dep)["ports"]
    assert port["containerPort"] == config.listen.port
    grace = pod(dep)["terminationGracePeriodSeconds"]
    pause = int(relay(dep)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert config.shutdown_grace + pause < grace, "SIGKILL would cut the drain short"


def test_service_and_network_policy_target_the_pods(tmp_path: Path) -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = by_kind_name("Service", "tokenrelay")
    assert svc["spec"]["selector"].items() <= labels.items()
    (sport,) = svc["spec"]["ports"]
    (cport,) = relay(dep)["ports"]
    assert sport["targetPort"] in (cport["name"], cport["containerPort"])
    netpol = by_kind_name("NetworkPolicy", "tokenrelay")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [p["port"] for p in netpol["spec"]["ingress"][0]["ports"]] == [cport["containerPort"]]


def test_secret_example_has_every_key_the_deployment_reads(tmp_path: Path) -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    secret = by_kind_name("Secret", "tokenrelay-credentials")
    keys = set(secret["stringData"])
    _, text = config_text(dep)
    for path in file_keys(yaml.safe_load(text)):
        vol, key = mount_for(dep, path)
        assert vol["secret"]["secretName"] == "tokenrelay-credentials"
        assert key in keys
    for e in relay(dep)["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "tokenrelay-credentials" and ref["key"] in keys


def test_sidecar_listens_on_loopback_and_the_app_calls_it(tmp_path: Path) -> None:
    dep = by_kind_name("Deployment", "billing-app")
    config = loaded(dep, tmp_path)
    assert config.listen.host == "127.0.0.1"
    sidecar = relay(dep)
    assert sidecar in pod(dep)["initContainers"] and sidecar["restartPolicy"] == "Always"
    (app,) = pod(dep)["containers"]
    urls = [e["value"] for e in app["env"] if str(e.get("value", "")).startswith("http")]
    prefixes = [r.prefix for r in config.routes]
    assert urls and all(
        any(u == f"http://127.0.0.1:{config.listen.port}{p}" for p in prefixes) for u in urls
    )
    assert "ports" not in sidecar  # nothing to expose outside the pod


def test_proxy_cli_accepts_the_shared_service_config(tmp_path: Path) -> None:
    """The exposure check of the real CLI, when it is importable (it is written alongside)."""
    try:
        cli = importlib.import_module("proxy.cli")
    except ImportError as exc:
        pytest.skip(f"proxy.cli is not importable yet: {exc}")
    dep = by_kind_name("Deployment", "tokenrelay")
    _, text = config_text(dep)
    for path in file_keys(yaml.safe_load(text)):
        local = tmp_path / PurePosixPath(path).name
        local.write_text("dummy\n")
        text = text.replace(path, str(local))
    env = {e["name"]: "dummy" for e in relay(dep)["env"]}
    cli.check_exposure(parse_config(text, "routes.yaml", env=env))
