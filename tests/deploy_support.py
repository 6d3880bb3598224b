"""The deployment files as tests read them: deploy/k8s's kustomizations built in Python (their
resources loaded in order, then their RFC 6902 patches applied: all that render.py writes uses;
tests/test_deploy_manifests.py checks this against `kubectl kustomize` where kubectl is
installed), deploy/k8s/render.py imported, the containers of each workload, and the flags each
process (and the probes' `shardstate health`) accepts."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from shardstate.router.config import RouterConfig
from shardstate.server.cli import health
from shardstate.server.config import ShardConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SECURE = K8S / "secure"
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


def build(root: Path = K8S) -> list[dict[str, Any]]:
    """`kustomize build` of a kustomization of resources (files, or directories of another
    kustomization) and patches (RFC 6902 ops, a target kind and name each): every document."""
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "resources", "patches"}, "only resources and patches"
    docs: list[dict[str, Any]] = []
    for res in kust["resources"]:
        path = root / res
        docs += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        target = patch["target"]
        assert set(target) <= {"group", "version", "kind", "name"}, target
        (doc,) = [d for d in docs if (d["kind"], d["metadata"]["name"]) == (target["kind"], target["name"])]
        for op in yaml.safe_load((root / patch["path"]).read_text()):
            json_patch(doc, op)
    return docs


def json_patch(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (test, add, replace, remove) applied to `doc` in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key: Any = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
    kind, value = op["op"], copy.deepcopy(op.get("value"))
    if kind == "test":
        assert node[key] == value, f"test {op['path']}: {node[key]!r} != {value!r}"
    elif kind == "remove":
        del node[key]
    elif kind == "add" and isinstance(node, list):
        node.insert(key, value)
    elif kind in ("add", "replace"):
        if kind == "replace":
            assert node[key] is not None  # replace needs the member there (IndexError, KeyError)
        node[key] = value
    else:
        raise AssertionError(f"no op {kind} ({op['path']})")


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


def flags(config_cls: type) -> set[str]:
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(config_cls)} | PENDING_FLAGS


FLAGS = {"shard": flags(ShardConfig), "router": flags(RouterConfig)}


def health_args(probe: dict[str, Any]) -> list[str]:
    """The arguments of `shardstate health` in an exec probe, run directly or by `sh -c 'exec
    shardstate health ...'` (variables left as written)."""
    command = probe["exec"]["command"]
    if command[:2] == ["sh", "-c"]:
        command = shlex.split(command[2])
        assert command[0] == "exec", command  # sh replaced by the check: its exit status is the probe's
        command = command[1:]
    assert command[:2] == ["shardstate", "health"], command
    return list(command[2:])


def health_flags(args: list[str]) -> argparse.Namespace:
    """What `shardstate health` makes of `args` (AssertionError when it would refuse them)."""
    try:
        return health.parser().parse_args(args)
    except SystemExit:
        raise AssertionError(f"shardstate health refuses {args}") from None
