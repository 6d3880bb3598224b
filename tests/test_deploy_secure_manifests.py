"""The overlay deploy/k8s/secure, checked without a cluster: it changes only what TLS and tokens
need (the Secrets' volumes, the flags, the probes) in every shard and router of the base, holds
no secret material, seeds the routers with names a certificate can carry, and probes with
`shardstate health` at the address the certificate names. Schemas and flags: the base's tests
(tests/test_deploy_manifests.py) run on the overlay too; the processes themselves:
tests/test_deploy_cluster_secure.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from tests.deploy_support import (
    K8S,
    SECURE,
    build,
    container,
    health_args,
    health_flags,
    of_kind,
    render_module,
)

render = render_module()
PATCHED = ("args", "volumeMounts", "startupProbe", "readinessProbe", "livenessProbe")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment")}


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def without_patched(workload: dict[str, Any]) -> dict[str, Any]:
    w = copy.deepcopy(workload)
    spec = w["spec"]["template"]["spec"]
    spec.pop("volumes", None)
    for c in spec["containers"]:
        for key in PATCHED:
            c.pop(key, None)
    return w


def test_the_overlay_changes_only_volumes_flags_and_probes_of_every_workload() -> None:
    base, secure = build(), build(SECURE)
    key = [(d["kind"], d["metadata"]["name"]) for d in base]
    assert key == [(d["kind"], d["metadata"]["name"]) for d in secure]
    others = [d for d in base if d["kind"] not in ("StatefulSet", "Deployment")]
    assert others == [d for d in secure if d["kind"] not in ("StatefulSet", "Deployment")]
    b, s = workloads(base), workloads(secure)
    assert set(b) == set(s) == {"shardstate-router", "shardstate-s1", "shardstate-s2", "shardstate-s3"}
    for name in b:
        assert without_patched(b[name]) == without_patched(s[name]), name
        old, new = container(b[name])["args"], container(s[name])["args"]
        assert new[len(old):] == render.SECURE_FLAGS
        if new[0] == "shard":
            assert new[:len(old)] == old
        # the data volume stays mounted where it was
        assert container(s[name]).get("volumeMounts", [])[:-2] == container(b[name]).get("volumeMounts", [])


def test_every_container_mounts_both_secrets_read_only_and_reads_its_files_there() -> None:
    wanted = {"--tls-ca": (render.TLS_SECRET, "ca.crt"), "--tls-cert": (render.TLS_SECRET, "tls.crt"),
              "--tls-key": (render.TLS_SECRET, "tls.key"), "--auth-file": (render.AUTH_SECRET, "tokens.toml"),
              "--cluster-token-file": (render.AUTH_SECRET, "cluster-token")}
    for w in workloads(build(SECURE)).values():
        pod = w["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"] for v in pod["volumes"]}
        # the whole Secret (no items), readable by the pod's group only: fsGroup owns the files
        assert all(s == {"secretName": s["secretName"], "defaultMode": 0o440} for s in secrets.values())
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        c = container(w)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"] in secrets}
        assert len(mounts) == 2 and all(m["readOnly"] is True for m in mounts.values())
        for flag, (secret, key) in wanted.items():
            directory, _, file = arg(c["args"], flag).rpartition("/")
            assert secrets[mounts[directory]["name"]]["secretName"] == secret and file == key, (flag, w["metadata"]["name"])


def test_the_overlay_holds_no_secret_material() -> None:
    docs = build(SECURE)
    assert not of_kind(docs, "Secret") and not of_kind(docs, "ConfigMap")
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        for material in ("PRIVATE KEY", "BEGIN CERTIFICATE", "sst_", "sha256"):
            assert material not in text, (path, material)


def test_routers_seed_with_every_shard_pod_by_the_name_it_listens_on() -> None:
    secure = workloads(build(SECURE))
    listening = []
    for w in of_kind(list(secure.values()), "StatefulSet"):
        listen = arg(container(w)["args"], "--listen")
        listening += [listen.replace("$(POD_NAME)", f"{w['metadata']['name']}-{i}") for i in range(w["spec"]["replicas"])]
    seeds = arg(container(secure["shardstate-router"])["args"], "--seeds").split(",")
    assert seeds == listening and len(seeds) == 6
    # not the base's Service names, which stand for pod IP addresses no certificate carries
    base = arg(container(workloads(build())["shardstate-router"])["args"], "--seeds").split(",")
    assert not set(base) & set(seeds) and all(s.startswith("shardstate-s") for s in base)


def test_probes_run_shardstate_health_over_tls_where_the_certificate_names_the_node() -> None:
    base = workloads(build())
    for name, w in workloads(build(SECURE)).items():
        c = container(w)
        tls = {f: arg(c["args"], f) for f in ("--tls-ca", "--tls-cert", "--tls-key")}
        port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        for probe in PROBES:
            flags = health_flags(health_args(c[probe]))
            assert flags.tls_ca == tls["--tls-ca"]
            if c["args"][0] == "shard":  # its own stable name, its certificate (shards require one)
                listen = re.sub(r"\$\((\w+)\)", r"${\1}", arg(c["args"], "--listen"))
                assert flags.address == listen and (flags.tls_cert, flags.tls_key) == (tls["--tls-cert"], tls["--tls-key"])
            else:  # listening on every address: localhost, which the certificate names too
                assert flags.address == f"localhost:{port}" and arg(c["args"], "--listen") == f"0.0.0.0:{port}"
            # the kubelet's deadline leaves the check its own, and Python's start
            assert c[probe]["timeoutSeconds"] > flags.timeout_s
        # as long to start, and to be declared dead, as the base allows
        old = container(base[name])
        for probe in ("startupProbe", "livenessProbe"):
            assert (c[probe]["periodSeconds"] * c[probe]["failureThreshold"]
                    == old[probe]["periodSeconds"] * old[probe]["failureThreshold"]), (name, probe)
        assert c["readinessProbe"]["periodSeconds"] <= 10


def test_render_writes_the_overlay_for_the_groups_it_renders(tmp_path: Path) -> None:
    assert render.main(["--out", str(tmp_path), "--shards", "1", "--replicas", "0", "--routers", "1"]) == 0
    secure = workloads(build(tmp_path / "secure"))
    assert sorted(secure) == ["shardstate-router", "shardstate-s1"]
    assert arg(container(secure["shardstate-router"])["args"], "--seeds") == (
        "shardstate-s1-0.shardstate-s1.$(POD_NAMESPACE).svc.cluster.local:7401")
