#!/usr/bin/env python3
"""Writes, under this directory, the Kustomize base base/: per shard group a headless Service, a
StatefulSet (pod 0 the primary, the others its replicas) and a PodDisruptionBudget; the routers'
Deployment, Service and PodDisruptionBudget; its kustomization.yaml listing them. The overlay
secure/ on it: TLS and tokens, from the Secrets shardstate-tls and shardstate-auth. And
kustomization.yaml here, the base again (kustomize refuses an overlay inside its base's
directory, so the base has a directory of its own).

    python deploy/k8s/render.py --shards 3 --replicas 1     # every checked-in file
    kubectl apply -k deploy/k8s                             # the base: plaintext, no tokens
    kubectl apply -k deploy/k8s/secure                      # TLS and tokens (README: the Secrets)

Every pod of a group runs the same arguments: `--replica-of` names the group's pod 0 by its
stable DNS name, and a node given its own address there is the primary (docs/design.md §12).
Needs PyYAML (in the `[dev]` extra).
"""

from __future__ import annotations

import argparse
import re
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

# The overlay secure/: two Secrets, mounted read-only, readable by the pods' group (fsGroup)
# only. shardstate-tls has cert-manager's keys (a Certificate's secret: ca.crt, tls.crt,
# tls.key), shardstate-auth the files `shardstate dev --auth` writes (tokens.toml holding only
# sha256s, cluster-token).
BASE, SECURE = "base", "secure"
TLS_SECRET, TLS_DIR = f"{NAME}-tls", "/etc/shardstate/tls"
AUTH_SECRET, AUTH_DIR = f"{NAME}-auth", "/etc/shardstate/auth"
CA, CERT, KEY = "ca.crt", "tls.crt", "tls.key"
TOKENS, CLUSTER_TOKEN = "tokens.toml", "cluster-token"
SECRET_MODE = 0o440


# How long a pod may take to report SERVING: a replica's first catch-up may take up to an hour;
# a router bootstrapping a new cluster waits for every seed.
STARTUP_S = {"shard": 3600, "router": 600}


def labels(component: str, **more: str) -> dict[str, str]:
    return {**LABELS, "app.kubernetes.io/component": component, **more}


def fqdn(name: str, domain: str) -> str:
    """A Service (or `pod.service`) name as every pod resolves it, in the pod's namespace."""
    return f"{name}.$(POD_NAMESPACE).svc.{domain}"


def pod_env(*fields: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in fields]


def probes(check: dict[str, Any], startup_s: int, every_s: int = 5, timeout_s: int = 0) -> dict[str, Any]:
    """grpc.health.v1 probes, `check` their handler. A node reports SERVING only once ready (a
    replica after its first catch-up, a router once it holds the map), so the startup probe
    allows `startup_s` for that before liveness starts counting; liveness fails after a
    minute, whatever `every_s`."""
    t = {"timeoutSeconds": timeout_s} if timeout_s else {}
    return {
        "startupProbe": {**check, "periodSeconds": every_s, **t, "failureThreshold": startup_s // every_s},
        "readinessProbe": {**check, "periodSeconds": every_s, **t, "failureThreshold": 2},
        "livenessProbe": {**check, "periodSeconds": 2 * every_s, "timeoutSeconds": 5,
                          "failureThreshold": 60 // (2 * every_s)},
    }


def pod_spec(container: dict[str, Any], grace_s: int) -> dict[str, Any]:
    return {
        "terminationGracePeriodSeconds": grace_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID},
        "containers": [container],
    }


def container(kind: str, image: str, args: list[str], port: int, resources: dict[str, Any],
              startup_s: int) -> dict[str, Any]:
    return {
        "name": kind,
        "image": image,
        # the endpoint binds loopback unless told: Prometheus scrapes from another pod
        "args": [kind, *args, "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"],
        "env": pod_env(("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")),
        "ports": [{"name": "grpc", "containerPort": port}, {"name": "metrics", "containerPort": METRICS_PORT}],
        **probes({"grpc": {"port": port}}, startup_s),  # kubelet's grpc probe: plaintext only
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
                  startup_s=STARTUP_S["shard"])
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
                  startup_s=STARTUP_S["router"])
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


# ---- the overlay secure/: patches (RFC 6902) of every workload of the base ----


def tls_flags(with_cert: bool = True) -> list[str]:
    ca = ["--tls-ca", f"{TLS_DIR}/{CA}"]
    return [*ca, "--tls-cert", f"{TLS_DIR}/{CERT}", "--tls-key", f"{TLS_DIR}/{KEY}"] if with_cert else ca


# Every shard and router: its node certificate, the token file and the cluster token.
SECURE_FLAGS = [*tls_flags(), "--auth-file", f"{AUTH_DIR}/{TOKENS}",
                "--cluster-token-file", f"{AUTH_DIR}/{CLUSTER_TOKEN}"]


def secret_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the pod's volumes, the container's mounts) of the two Secrets."""
    pairs = (("tls", TLS_SECRET, TLS_DIR), ("auth", AUTH_SECRET, AUTH_DIR))
    return ([{"name": v, "secret": {"secretName": s, "defaultMode": SECRET_MODE}} for v, s, _ in pairs],
            [{"name": v, "mountPath": d, "readOnly": True} for v, _, d in pairs])


def health_check(kind: str, listen: str) -> dict[str, Any]:
    """`shardstate health` run in the container: kubelet's grpc probe cannot speak TLS. A shard
    is asked at the stable name it listens on, which its certificate carries, presenting that
    certificate (shards require one); sh expands the pod's variables, as the kubelet does not
    in a probe's command. A router listens on every address: asked at localhost, with the CA."""
    if kind == "router":
        return {"exec": {"command": ["shardstate", "health", *tls_flags(with_cert=False), f"localhost:{ROUTER_PORT}"]}}
    address = re.sub(r"\$\((\w+)\)", r"${\1}", listen)
    return {"exec": {"command": ["sh", "-c", f'exec shardstate health {" ".join(tls_flags())} "{address}"']}}


def pod_seeds(statefulsets: list[dict[str, Any]], domain: str) -> str:
    """Every shard pod by its stable name. With TLS a seed must be a name the certificate
    carries: a headless Service's name (the base's seeds) stands for its pods' IP addresses
    (router/seeds.py), which no certificate names."""
    names = [(s["metadata"]["name"], s["spec"]["serviceName"], s["spec"]["replicas"]) for s in statefulsets]
    return ",".join(f"{fqdn(f'{name}-{i}.{service}', domain)}:{SHARD_PORT}"
                    for name, service, pods in names for i in range(pods))


def secure_patch(workload: dict[str, Any], seeds: str) -> list[dict[str, Any]]:
    """The ops that make the base's `workload` run with TLS and tokens."""
    at = "/spec/template/spec/containers/0"
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    kind, args = c["args"][0], list(c["args"])
    if kind == "router":
        args[args.index("--seeds") + 1] = seeds
    volumes, mounts = secret_volumes()
    ops: list[dict[str, Any]] = [{"op": "test", "path": f"{at}/name", "value": c["name"]},  # the container meant
                                 {"op": "add", "path": "/spec/template/spec/volumes", "value": volumes}]
    if "volumeMounts" in c:
        ops += [{"op": "add", "path": f"{at}/volumeMounts/-", "value": m} for m in mounts]
    else:
        ops.append({"op": "add", "path": f"{at}/volumeMounts", "value": mounts})
    ops.append({"op": "replace", "path": f"{at}/args", "value": [*args, *SECURE_FLAGS]})
    # a probe starts a Python process: every 10 s (20 s liveness), not the base's 5, ~2% of a core
    check = health_check(kind, args[args.index("--listen") + 1])
    for name, probe in probes(check, STARTUP_S[kind], every_s=10, timeout_s=5).items():
        ops.append({"op": "replace", "path": f"{at}/{name}", "value": probe})
    return ops


def kustomization(**fields: Any) -> list[dict[str, Any]]:
    return [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}]


def secure(base: dict[str, list[dict[str, Any]]], domain: str) -> dict[str, list[Any]]:
    """The overlay's files: a patch per workload file of `base` (file name → documents), and
    its kustomization.yaml."""
    workloads = {f: d for f, docs in sorted(base.items()) for d in docs if d["kind"] in ("StatefulSet", "Deployment")}
    seeds = pod_seeds([d for d in workloads.values() if d["kind"] == "StatefulSet"], domain)
    files: dict[str, list[Any]] = {f"{SECURE}/{f}": [secure_patch(d, seeds)] for f, d in workloads.items()}
    patches = [{"path": f, "target": {"group": "apps", "version": "v1", "kind": d["kind"], "name": d["metadata"]["name"]}}
               for f, d in workloads.items()]
    files[f"{SECURE}/kustomization.yaml"] = kustomization(resources=[f"../{BASE}"], patches=patches)
    return files


def render(shards: int = 3, replicas: int = 1, routers_n: int = 2, image: str = f"{NAME}:0.1.0",
           storage: str = "10Gi", domain: str = "cluster.local") -> dict[str, list[Any]]:
    """file path (under deploy/k8s) → its documents: the base's under base/, the overlay's
    under secure/, kustomization.yaml."""
    if shards < 1 or replicas < 0 or routers_n < 1:
        raise ValueError("need --shards >= 1, --replicas >= 0, --routers >= 1")
    ids = [f"s{i}" for i in range(1, shards + 1)]
    base = {f"shard-{sid}.yaml": shard_group(sid, replicas, image, storage, domain) for sid in ids}
    base["router.yaml"] = routers(ids, routers_n, image, domain)
    base["kustomization.yaml"] = kustomization(resources=sorted(base))
    return {"kustomization.yaml": kustomization(resources=[BASE]),
            **{f"{BASE}/{f}": docs for f, docs in base.items()}, **secure(base, domain)}


class _Plain(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # no &anchors: each manifest reads on its own


def dump(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Plain, sort_keys=False, width=1000)


def write(out: Path, files: dict[str, list[Any]]) -> list[Path]:
    """Writes the files; removes the files of groups no longer rendered (and those of the
    layout before base/: router.yaml and shard files beside kustomization.yaml)."""
    for d in (BASE, SECURE):
        (out / d).mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("shard-*.yaml"), *out.glob("*/shard-*.yaml"), out / "router.yaml"]:
        if old.exists() and old.relative_to(out).as_posix() not in files:
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
