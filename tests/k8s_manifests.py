"""The Kubernetes manifests as the tests read them: every document under deploy/kubernetes,
the kustomization's generated ConfigMap, and each pod's routes.yaml loaded with its env and
(dummy) secret files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from proxy.config import Config, parse_config
from tests.deploy_files import K8S, Doc


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


def built_in(doc: Doc) -> bool:
    """Of Kubernetes' own APIs (the schema knows them), not of a CRD such as ServiceMonitor."""
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


BUILT_IN = [(f, d) for f, d in OBJECTS if built_in(d)]
(KUSTOMIZATION,) = [d for _, d in DOCS if d["kind"] == "Kustomization"]


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


def port_named(container: Doc, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


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


def config_map_data(name: str) -> dict[str, str]:
    """A ConfigMap's data, written out or made by the kustomization's generator."""
    for gen in KUSTOMIZATION.get("configMapGenerator", []):
        if gen["name"] == name:
            pairs = (f.rpartition("=") for f in gen["files"])
            return {
                key or PurePosixPath(src).name: (K8S / src).read_text() for key, _, src in pairs
            }
    data: dict[str, str] = by_kind_name("ConfigMap", name)["data"]
    return data


def config_text(dep: Doc) -> tuple[str, str]:
    args = relay(dep)["args"]
    path = args[args.index("--config") + 1]
    vol, key = mount_for(dep, path)
    return path, config_map_data(vol["configMap"]["name"])[key]


def with_local_files(dep: Doc, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The pod's routes.yaml pointing at dummy secret files here, and the pod's env (dummy)."""
    _, text = config_text(dep)
    for path in file_keys(yaml.safe_load(text)):
        vol, key = mount_for(dep, path)
        assert "secret" in vol, f"{path} must come from a Secret volume"
        local = tmp_path / vol["secret"]["secretName"] / key
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(f"dummy-{key}\n")
        text = text.replace(path, str(local))
    return text, {e["name"]: f"dummy-{e['name']}" for e in relay(dep).get("env", [])}


def loaded(dep: Doc, tmp_path: Path) -> Config:
    text, env = with_local_files(dep, tmp_path)
    return parse_config(text, "routes.yaml", env=env).config
