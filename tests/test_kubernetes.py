"""The Kubernetes manifests: parsed and cross-checked always, rendered by the real kustomize
when kubectl is installed, validated against the API schema when ``kubernetes-validate`` is,
and the shared service's routes.yaml run by the real proxy."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from yarl import URL

from proxy.config import parse_config
from tests.deploy_files import K8S, Doc, dockerfile, final_stage, only, readme_section
from tests.helpers import read_event
from tests.k8s_manifests import (
    BUILT_IN,
    DEPLOYMENTS,
    DOCS,
    KUSTOMIZATION,
    OBJECTS,
    all_containers,
    by_kind_name,
    config_text,
    file_keys,
    loaded,
    mount_for,
    pod,
    port_named,
    relay,
    volume,
    with_local_files,
)


def test_manifests_exist() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Kustomization"} <= kinds
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"} <= kinds
    assert len(DEPLOYMENTS) == 2  # the shared service and the sidecar example


@pytest.mark.parametrize(("file", "doc"), OBJECTS, ids=[f for f, _ in OBJECTS])
def test_every_document_is_a_named_object(file: str, doc: Doc) -> None:
    assert doc["apiVersion"] and doc["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def kubernetes_validate_missing() -> str:
    if importlib.util.find_spec("kubernetes_validate") is None:
        return "kubernetes-validate not installed (pip install kubernetes-validate)"
    return ""


def kubectl_missing() -> str:
    return "" if shutil.which("kubectl") else "kubectl not installed"


def kustomize(directory: Path) -> list[Doc]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def validate_strictly(docs: list[tuple[str, Doc]], version: str) -> None:
    import kubernetes_validate.utils as kv  # type: ignore[import-untyped]

    for file, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{file} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


@pytest.mark.skipif(
    bool(kubernetes_validate_missing()), reason=kubernetes_validate_missing() or "-"
)
@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_manifests_match_the_kubernetes_schema(version: str) -> None:
    """Strict: a misspelt or misplaced field fails. 1.29 is the oldest with native sidecars.
    Every object of a built-in API; the ServiceMonitor is checked below."""
    assert {d["kind"] for _, d in OBJECTS} - {d["kind"] for _, d in BUILT_IN} == {"ServiceMonitor"}
    validate_strictly(BUILT_IN, version)


@pytest.mark.skipif(
    bool(kubernetes_validate_missing() or kubectl_missing()),
    reason=kubernetes_validate_missing() or kubectl_missing() or "-",
)
def test_what_kustomize_renders_matches_the_kubernetes_schema() -> None:
    """The generated ConfigMap and the rewritten Deployment too."""
    validate_strictly([("kustomize", d) for d in kustomize(K8S)], "1.29.0")


def test_kustomization_lists_real_files_but_not_the_examples() -> None:
    resources = KUSTOMIZATION["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert not [r for r in resources if "example" in r]  # see kustomization.yaml
    assert "secret.example.yaml" not in resources  # would overwrite the real credentials


@pytest.mark.skipif(bool(kubectl_missing()), reason=kubectl_missing() or "-")
def test_kustomize_build_renders_the_service_stack() -> None:
    kinds = sorted(d["kind"] for d in kustomize(K8S))
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]
    )


def rendered_config_volume(docs: list[Doc]) -> tuple[str, Doc]:
    """(the ConfigMap name the rendered Deployment mounts, that rendered ConfigMap)."""
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (vol,) = [v for v in pod(dep)["volumes"] if v["name"] == "config"]
    name = vol["configMap"]["name"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    return name, cm


@pytest.mark.skipif(bool(kubectl_missing()), reason=kubectl_missing() or "-")
def test_a_changed_routes_yaml_changes_the_pod_template_so_pods_roll(tmp_path: Path) -> None:
    """The real kustomize: the ConfigMap's name carries a hash of routes.yaml and the
    Deployment mounts that name, so editing the file is a new revision."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    before, cm = rendered_config_volume(kustomize(copy))
    assert re.fullmatch(r"tokenrelay-config-[a-z0-9]{10}", before)
    assert cm["data"]["routes.yaml"] == (K8S / "config" / "routes.yaml").read_text()
    routes = copy / "config" / "routes.yaml"
    routes.write_text(routes.read_text().replace("shutdown_grace: 20", "shutdown_grace: 19"))
    after, _ = rendered_config_volume(kustomize(copy))
    assert after != before


def test_config_map_comes_from_a_hashed_generator_the_deployment_mounts() -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    (gen,) = KUSTOMIZATION["configMapGenerator"]
    assert gen["name"] == volume(dep, "config")["configMap"]["name"]
    assert all((K8S / f.rpartition("=")[2]).is_file() for f in gen["files"])
    assert not gen.get("options", {}).get("disableNameSuffixHash", False)
    assert not KUSTOMIZATION.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must not drop below replicas"


def dockerfile_uid() -> int:
    user = only(final_stage(dockerfile()), "USER")
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
            port = port_named(container, port)
        return probe["httpGet"]["path"], int(port)
    command = " ".join(probe["exec"]["command"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/-/\w+)", command)
    assert m, command
    return m.group(2), int(m.group(1))


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["metadata"]["name"] for d in DEPLOYMENTS])
def test_config_parses_with_the_pods_env_and_secret_files(dep: Doc, tmp_path: Path) -> None:
    config = loaded(dep, tmp_path)
    assert config.routes and all(r.provider for r in config.routes)
    assert config.spool_dir is not None, "read-only root: the spool must be on a volume"
    vol, _ = mount_for(dep, str(config.spool_dir))
    assert "emptyDir" in vol


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["metadata"]["name"] for d in DEPLOYMENTS])
def test_probes_ask_health_and_ready_where_admin_paths_are_served(dep: Doc, tmp_path: Path) -> None:
    """On the admin listener when there is one: the main port then answers them 404."""
    config, c = loaded(dep, tmp_path), relay(dep)
    port = (config.admin or config.listen).port
    assert probe_target(c["readinessProbe"], c) == ("/-/ready", port)
    assert probe_target(c["livenessProbe"], c) == ("/-/health", port)
    if "startupProbe" in c:
        assert probe_target(c["startupProbe"], c) == ("/-/ready", port)


def test_shared_service_is_reachable_only_with_client_keys(tmp_path: Path) -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    config = loaded(dep, tmp_path)
    assert config.listen.host == "0.0.0.0"
    assert config.clients and not config.allow_unauthenticated
    routes = {r.prefix for r in config.routes}
    assert all(set(c.routes) <= routes for c in config.clients)
    assert config.admin is not None, "so that the main port serves no admin path"
    assert port_named(relay(dep), "http") == config.listen.port
    assert port_named(relay(dep), "admin") == config.admin.port
    grace = pod(dep)["terminationGracePeriodSeconds"]
    pause = int(relay(dep)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert config.shutdown_grace + pause < grace, "SIGKILL would cut the drain short"


def ingress_rules_for(port: int) -> list[Doc]:
    netpol = by_kind_name("NetworkPolicy", "tokenrelay")
    return [r for r in netpol["spec"]["ingress"] if port in [p["port"] for p in r["ports"]]]


def test_service_and_network_policy_target_the_pods(tmp_path: Path) -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = by_kind_name("Service", "tokenrelay")
    assert svc["spec"]["selector"].items() <= labels.items()
    (sport,) = svc["spec"]["ports"]
    assert sport["targetPort"] in ("http", port_named(relay(dep), "http"))
    netpol = by_kind_name("NetworkPolicy", "tokenrelay")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (clients,) = ingress_rules_for(port_named(relay(dep), "http"))
    assert clients["from"] == [{"podSelector": {"matchLabels": {"tokenrelay-client": "true"}}}]


def test_network_policy_admits_prometheus_of_the_monitoring_namespace_to_the_admin_port(
    tmp_path: Path,
) -> None:
    """One peer with both selectors (two peers would admit any pod of the namespace and
    any Prometheus anywhere), on the admin port only: it serves renew and reload too."""
    admin = loaded(by_kind_name("Deployment", "tokenrelay"), tmp_path).admin
    assert admin is not None
    (rule,) = ingress_rules_for(admin.port)
    assert [p["port"] for p in rule["ports"]] == [admin.port]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def test_scrape_annotations_and_service_monitor_ask_metrics_on_the_admin_port(
    tmp_path: Path,
) -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    admin = loaded(dep, tmp_path).admin
    assert admin is not None
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert (notes["prometheus.io/port"], notes["prometheus.io/path"]) == (
        str(admin.port), "/-/metrics"
    )  # fmt: skip
    monitor = by_kind_name("ServiceMonitor", "tokenrelay")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["path"] == "/-/metrics"
    want = monitor["spec"]["selector"]["matchLabels"].items()
    services = [d for _, d in OBJECTS if d["kind"] == "Service"
                and want <= d["metadata"]["labels"].items()]  # fmt: skip
    (svc,) = services
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "admin" and port_named(relay(dep), "admin") == admin.port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_replicas_spread_over_nodes_and_the_autoscaler_keeps_two() -> None:
    dep = by_kind_name("Deployment", "tokenrelay")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2
    spread = {c["topologyKey"]: c for c in pod(dep)["topologySpreadConstraints"]}
    node = spread["kubernetes.io/hostname"]
    assert (node["maxSkew"], node["whenUnsatisfiable"]) == (1, "DoNotSchedule")
    assert node["labelSelector"]["matchLabels"].items() <= labels.items()
    assert node["matchLabelKeys"] == ["pod-template-hash"], "or a rollout's surge pod waits"
    assert node["nodeTaintsPolicy"] == "Honor", "or a tainted node counts as an empty domain"
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    hpa = by_kind_name("HorizontalPodAutoscaler", "tokenrelay")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "tokenrelay"
    }  # fmt: skip
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (cpu,) = hpa["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert "cpu" in relay(dep)["resources"]["requests"], "utilisation is of the request"


def test_readme_says_how_to_reach_tokens_on_the_admin_port(tmp_path: Path) -> None:
    admin = loaded(by_kind_name("Deployment", "tokenrelay"), tmp_path).admin
    assert admin is not None
    section = readme_section("Container and Kubernetes")
    assert f"kubectl port-forward pod/NAME {admin.port}" in section
    assert f"curl -s localhost:{admin.port}/-/tokens" in section


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


def test_the_shared_service_config_passes_the_open_listener_rule(tmp_path: Path) -> None:
    from proxy.startonly import check_exposure

    text, env = with_local_files(by_kind_name("Deployment", "tokenrelay"), tmp_path)
    check_exposure(parse_config(text, "routes.yaml", env=env))


# ---------------------------------------------------------------------------
# the shared service's routes.yaml, run by the real proxy


@pytest.fixture
async def shared_service(tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """tokenrelay on the Deployment's config, both listeners moved to free loopback ports."""
    dep = by_kind_name("Deployment", "tokenrelay")
    text, env = with_local_files(dep, tmp_path)
    admin = re.compile(r"^admin: \{host: 0\.0\.0\.0, port: \d+\}$", re.MULTILINE)
    assert admin.search(text)
    text = admin.sub("admin: {host: 127.0.0.1, port: 0}", text)
    text = re.sub(r"^spool_dir: .*$", f"spool_dir: {tmp_path / 'bodies'}", text, flags=re.M)
    config = tmp_path / "routes.yaml"
    config.write_text(text)
    argv = ["-m", "proxy", "--config", str(config), "--host", "127.0.0.1", "--port", "0"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    yield proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_shared_service_serves_metrics_and_tokens_on_the_admin_port_only(
    shared_service: asyncio.subprocess.Process, client: aiohttp.ClientSession
) -> None:
    """What Prometheus and `kubectl port-forward` reach on 9090, and what 8080 does not serve."""
    proc = shared_service
    assert proc.stderr is not None
    line = await read_event(proc.stderr, "listening")
    main, admin = URL(str(line["address"])), URL(str(line["admin"]))
    async with client.get(admin / "-" / "metrics") as r:
        assert r.status == 200 and "tokenrelay_requests_total" in await r.text()
    async with client.get(admin / "-" / "tokens") as r:
        assert r.status == 200 and set(await r.json()) == {"simacan", "simplifi"}
    async with client.get(admin / "-" / "ready") as r:
        assert r.status == 200
    for path in ("metrics", "tokens", "health"):
        async with client.get(main / "-" / path) as r:
            assert r.status == 404, path
    async with client.get(main / "simacan" / "v1" / "x") as r:
        assert r.status == 401  # no client key: refused before any vendor is asked
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait() == 0
