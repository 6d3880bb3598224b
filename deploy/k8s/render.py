#!/usr/bin/env python3
"""Writes the Kustomize base in this directory: per shard group a headless Service, a
StatefulSet (pod 0 the primary, the others its replicas) and a PodDisruptionBudget; the routers'
Deployment, Service and PodDisruptionBudget; kustomization.yaml listing them.

    python deploy/k8s/render.py --shards 3 --replicas 1     # the checked-in files
    kubectl apply -k deploy/k8s

Every pod of a group runs the same arguments: `--replica-of` names the group's pod 0 by its
stable DNS name, and a node given its own address there is the primary (docs/design.md §12).
Needs PyYAML (in the `[dev]` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
NAME = "shardstate"
SHARD_PORT = 7401
ROUTER_PORT = 7400
METRICS_PORT = 9100
DATA = "/data"  # the image's VOLUME and USER (deploy/Dockerfile)
UID = 10001
LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}


def labels(component: str, **more: str) -> dict[str, str]:
    return {**LABELS, "app.kubernetes.io/component": component, **more}


def fqdn(name: str, domain: str) -> str:
    """A Service (or `pod.service`) name as every pod resolves it, in the pod's namespace."""
    return f"{name}.$(POD_NAMESPACE).svc.{domain}"


def pod_env(*fields: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in fields]


def probes(port: int, startup_failures: int) -> dict[str, Any]:
    """grpc.health.v1 probes (kubelet's `grpc:`). A node reports SERVING only once ready (a
    replica after its first catch-up, a router once it holds the map), so the startup probe
    allows that long before liveness starts counting."""
    grpc = {"port": port}
    return {
        "startupProbe": {"grpc": grpc, "periodSeconds": 5, "failureThreshold": startup_failures},
        "readinessProbe": {"grpc": grpc, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"grpc": grpc, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }


def pod_spec(container: dict[str, Any], grace_s: int) -> dict[str, Any]:
    return {
        "terminationGracePeriodSeconds": grace_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID},
        "containers": [container],
    }


def container(kind: str, image: str, args: list[str], port: int, resources: dict[str, Any],
              startup_failures: int) -> dict[str, Any]:
    return {
        "name": kind,
        "image": image,
        # the endpoint binds loopback unless told: Prometheus scrapes from another pod
        "args": [kind, *args, "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"],
        "env": pod_env(("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")),
        "ports": [{"name": "grpc", "containerPort": port}, {"name": "metrics", "containerPort": METRICS_PORT}],
        **probes(port, startup_failures),
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }


def scraped(lbls: dict[str, str]) -> dict[str, Any]:
    return {"labels": lbls, "annotations": {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}}


def pdb(name: str, selector: dict[str, str]) -> dict[str, Any]:
    """At most one pod of the group (or of the routers) evicted at a time."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "labels": selector},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}


def shard_group(sid: str, replicas: int, image: str, storage: str, domain: str) -> list[dict[str, Any]]:
    name = f"{NAME}-{sid}"
    sel = labels("shard", **{"shardstate.io/shard": sid})
    args = [
        "--id", sid,
        "--listen", f"{fqdn(f'$(POD_NAME).{name}', domain)}:{SHARD_PORT}",
        "--replica-of", f"{fqdn(f'{name}-0.{name}', domain)}:{SHARD_PORT}",
        "--data-dir", f"{DATA}/shard",
    ]
    c = container("shard", image, args, SHARD_PORT,
                  {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
                  startup_failures=720)  # a replica's first catch-up may take up to an hour
    c["volumeMounts"] = [{"name": "data", "mountPath": DATA}]
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": sel},
        "spec": {
            "clusterIP": "None",  # headless: one DNS name per pod, and the group's name for all
            "publishNotReadyAddresses": True,  # a replica reaches its primary before either is ready
            "selector": sel,
            "ports": [{"name": "grpc", "port": SHARD_PORT, "targetPort": "grpc"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
        },
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "labels": sel},
        "spec": {
            "serviceName": name,
            "replicas": 1 + replicas,
            "podManagementPolicy": "OrderedReady",  # pod 0, the primary, first
            "selector": {"matchLabels": sel},
            "template": {"metadata": scraped(sel), "spec": pod_spec(c, grace_s=30)},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}},
            }],
        },
    }
    return [service, statefulset, pdb(name, sel)]


def routers(shard_ids: list[str], count: int, image: str, domain: str) -> list[dict[str, Any]]:
    name = f"{NAME}-router"
    sel = labels("router")
    seeds = ",".join(f"{fqdn(f'{NAME}-{sid}', domain)}:{SHARD_PORT}" for sid in shard_ids)
    c = container("router", image, ["--listen", f"0.0.0.0:{ROUTER_PORT}", "--seeds", seeds], ROUTER_PORT,
                  {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                  startup_failures=120)  # waits for every seed when it bootstraps a new cluster
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": sel},
        "spec": {"replicas": count, "selector": {"matchLabels": sel},
                 "template": {"metadata": scraped(sel), "spec": pod_spec(c, grace_s=30)}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": sel},
        "spec": {"selector": sel, "ports": [{"name": "grpc", "port": ROUTER_PORT, "targetPort": "grpc"},
                                            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]},
    }
    return [deployment, service, pdb(name, sel)]


def render(shards: int = 3, replicas: int = 1, routers_n: int = 2, image: str = f"{NAME}:0.1.0",
           storage: str = "10Gi", domain: str = "cluster.local") -> dict[str, list[dict[str, Any]]]:
    """file name → its documents, kustomization.yaml included."""
    if shards < 1 or replicas < 0 or routers_n < 1:
        raise ValueError("need --shards >= 1, --replicas >= 0, --routers >= 1")
    ids = [f"s{i}" for i in range(1, shards + 1)]
    files = {f"shard-{sid}.yaml": shard_group(sid, replicas, image, storage, domain) for sid in ids}
    files["router.yaml"] = routers(ids, routers_n, image, domain)
    files["kustomization.yaml"] = [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "resources": sorted(files)}]
    return files


class _Plain(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # no &anchors: each manifest reads on its own


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Plain, sort_keys=False, width=1000)


def write(out: Path, files: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Writes the files; removes shard files of groups no longer rendered."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.yaml"):
        if old.name not in files:
            old.unlink()
    written = []
    for fname, docs in files.items():
        path = out / fname
        path.write_text("# Written by deploy/k8s/render.py; edit that, or patch in an overlay.\n" + dump(docs))
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="render.py", description="Write the Kubernetes manifests.")
    p.add_argument("--shards", type=int, default=3, help="shard groups (StatefulSets) [3]")
    p.add_argument("--replicas", type=int, default=1, help="replicas per shard, besides the primary [1]")
    p.add_argument("--routers", type=int, default=2, help="router pods [2]")
    p.add_argument("--image", default=f"{NAME}:0.1.0", help="container image [%(default)s]")
    p.add_argument("--storage", default="10Gi", help="volume size per shard pod [%(default)s]")
    p.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain [%(default)s]")
    p.add_argument("--out", type=Path, default=HERE, help="directory to write [this one]")
    a = p.parse_args(argv)
    try:
        files = render(a.shards, a.replicas, a.routers, a.image, a.storage, a.cluster_domain)
    except ValueError as e:
        p.error(str(e))
    for path in write(a.out, files):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
