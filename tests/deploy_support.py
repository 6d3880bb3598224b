"""The deployment files as tests read them: the Kustomize base of deploy/k8s rendered in
Python (kustomization.yaml's resources, loaded in order), deploy/k8s/render.py imported, the
containers of each workload, and the flags each process accepts."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from shardstate.router.config import RouterConfig
from shardstate.server.config import ShardConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Flags the manifests give that issue 18's metrics work adds to both configs
# (shardstate.common.obsconfig); until that is on this branch a process is started without them
# (tests/test_deploy_cluster.py).
METRICS_FLAGS = {"--metrics-port", "--metrics-host"}
PENDING_FLAGS = METRICS_FLAGS - {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ShardConfig)}


def render_module(path: Path = K8S / "render.py") -> ModuleType:
    """A deploy/ script loaded as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"shardstate_{path.parent.name}_render", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(base: Path = K8S) -> list[dict[str, Any]]:
    """`kustomize build` of a base that only lists resources: every document, in order."""
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "resources"}, "the base uses only resources"
    docs: list[dict[str, Any]] = []
    for res in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((base / res).read_text()) if d]
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


def flags(config_cls: type) -> set[str]:
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(config_cls)} | PENDING_FLAGS


FLAGS = {"shard": flags(ShardConfig), "router": flags(RouterConfig)}
