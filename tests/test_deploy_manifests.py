"""The Kubernetes manifests and the image definition, checked without a cluster or a docker
daemon: deploy/k8s (the base, the secure overlay) is what render.py writes, every document of
both validates against the Kubernetes schemas kubernetes-validate ships (strict: no unknown
field), and the pieces agree with each other and with the processes' flags. What is the
overlay's own: tests/test_deploy_secure_manifests.py."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy_support import (
    DOCKERFILE,
    FLAGS,
    K8S,
    ROOT,
    SECURE,
    build,
    container,
    health_args,
    health_flags,
    of_kind,
    render_module,
)

render = render_module()
# The oldest Kubernetes this targets (grpc probes are GA since 1.27) and the newest shipped.
VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def rendered(tmp: Path, *argv: str) -> list[dict[str, Any]]:
    assert render.main(["--out", str(tmp), *argv]) == 0
    return build(tmp)


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def yaml_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def by_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_checked_in_files_are_what_render_writes(tmp_path: Path) -> None:
    render.main(["--out", str(tmp_path)])
    names = yaml_files(K8S)
    assert names == yaml_files(tmp_path)
    assert {"kustomization.yaml", "base/kustomization.yaml", "secure/kustomization.yaml"} <= set(names)
    for name in names:
        assert (K8S / name).read_text() == (tmp_path / name).read_text(), f"run deploy/k8s/render.py ({name})"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here to build the kustomizations with")
@pytest.mark.parametrize("where", ["", "base", "secure"])
def test_kubectl_kustomize_builds_what_the_tests_read(where: str) -> None:
    # tests/deploy_support.build stands for `kustomize build` in every other test
    out = subprocess.run(["kubectl", "kustomize", str(K8S / where)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = by_name([d for d in yaml.safe_load_all(out.stdout) if d])  # in kustomize's own order
    assert theirs == by_name(build(K8S / where)) and len(theirs) == 12


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_validates_against_the_kubernetes_schemas(version: str, tmp_path: Path) -> None:
    docs = build() + build(SECURE) + rendered(tmp_path, "--shards", "5", "--replicas", "0", "--routers", "1")
    docs += build(tmp_path / "secure")
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Service", "StatefulSet", "Deployment", "PodDisruptionBudget"}
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)  # raises ValidationError


def test_a_broken_document_fails_validation() -> None:
    bad = copy.deepcopy(of_kind(build(), "StatefulSet")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"  # a number only
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(of_kind(build(), "Service")[0])
    bad["spec"]["headless"] = True  # no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_shard_count_and_replicas_are_values(tmp_path: Path) -> None:
    docs = rendered(tmp_path, "--shards", "4", "--replicas", "2", "--routers", "3")
    sets = of_kind(docs, "StatefulSet")
    assert [s["metadata"]["name"] for s in sets] == [f"shardstate-s{i}" for i in range(1, 5)]
    assert [s["spec"]["replicas"] for s in sets] == [3] * 4  # a primary and 2 replicas each
    (router,) = of_kind(docs, "Deployment")
    assert router["spec"]["replicas"] == 3
    seeds = arg(container(router)["args"], "--seeds").split(",")
    assert seeds == [f"shardstate-s{i}.$(POD_NAMESPACE).svc.cluster.local:7401" for i in range(1, 5)]
    secure = of_kind(build(tmp_path / "secure"), "Deployment")[0]
    assert len(arg(container(secure)["args"], "--seeds").split(",")) == 4 * 3  # every pod's own name
    # fewer groups later: the files of the groups gone are removed
    docs = rendered(tmp_path, "--shards", "2")
    assert len(of_kind(docs, "StatefulSet")) == 2
    assert len(of_kind(build(tmp_path / "secure"), "StatefulSet")) == 2
    assert not (tmp_path / "base" / "shard-s3.yaml").exists() and not (tmp_path / "secure" / "shard-s3.yaml").exists()


def test_each_group_is_a_statefulset_behind_a_headless_service_and_follows_pod_0() -> None:
    docs = build()
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for sts in of_kind(docs, "StatefulSet"):
        name, spec = sts["metadata"]["name"], sts["spec"]
        svc = services[spec["serviceName"]]["spec"]
        assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
        assert svc["selector"] == spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
        args = container(sts)["args"]
        assert args[0] == "shard" and arg(args, "--id") == name.removeprefix("shardstate-")
        # pod N listens on its own stable name; every pod names pod 0 as the primary
        assert arg(args, "--listen") == f"$(POD_NAME).{name}.$(POD_NAMESPACE).svc.cluster.local:7401"
        assert arg(args, "--replica-of") == f"{name}-0.{name}.$(POD_NAMESPACE).svc.cluster.local:7401"
        mount = container(sts)["volumeMounts"][0]
        assert arg(args, "--data-dir").startswith(mount["mountPath"] + "/")
        assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == mount["name"]


@pytest.mark.parametrize("where", [K8S, SECURE], ids=["base", "secure"])
def test_containers_use_only_flags_the_processes_have_and_the_variables_they_define(where: Path) -> None:
    docs = build(where)
    for d in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment"):
        c = container(d)
        kind, *rest = c["args"]
        assert kind in FLAGS
        given = [a for a in rest if a.startswith("--")]
        assert set(given) <= FLAGS[kind], set(given) - FLAGS[kind]
        assert len(given) * 2 == len(rest)  # every flag has its value
        defined = {e["name"] for e in c["env"]}
        for a in rest:
            assert set(re.findall(r"\$\((\w+)\)", a)) <= defined, a
        # exec probes run `shardstate health` with flags it has; sh expands the pod's variables
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ("exec" in c[probe]) == (where == SECURE)  # the kubelet's grpc probe speaks no TLS
            if "exec" in c[probe]:
                args = health_args(c[probe])
                assert health_flags(args).address
                for a in args:
                    assert set(re.findall(r"\$\{?(\w+)", a)) <= defined, a


def test_probes_are_grpc_health_on_the_serving_port_and_metrics_are_annotated() -> None:
    for d in of_kind(build(), "StatefulSet") + of_kind(build(), "Deployment"):
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        listen = arg(c["args"], "--listen")
        assert int(listen.rsplit(":", 1)[1]) == ports["grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": ports["grpc"]}
        notes = d["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == ports["metrics"] == int(arg(c["args"], "--metrics-port")) == 9100
        assert arg(c["args"], "--metrics-host") == "0.0.0.0"  # a scraper is on another pod
        assert set(c["resources"]["requests"]) == {"cpu", "memory"}


def test_every_workload_has_a_disruption_budget_selecting_its_pods() -> None:
    docs = build()
    budgets = [p["spec"]["selector"]["matchLabels"] for p in of_kind(docs, "PodDisruptionBudget")]
    workloads = of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment")
    assert len(budgets) == len(workloads)
    for w in workloads:
        pod = w["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if b.items() <= pod.items()]
        assert len(matching) == 1, w["metadata"]["name"]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_the_image_installs_the_wheel_and_runs_the_console_script_as_a_user() -> None:
    ins = dockerfile()
    last = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    final = ins[last:]
    runs = [rest for k, rest in ins if k == "RUN"]
    assert any("pip wheel" in r and shlex.split(r)[-1] == "." for r in runs), "builds the wheel of the repo"
    assert any(re.search(r"pip install .*shardstate-\*\.whl\)?\[server\]", r) for k, r in final if k == "RUN")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = [rest for k, rest in final if k == "ENTRYPOINT"]
    assert entry == ['["shardstate"]'] and "shardstate" in scripts
    (user,) = [rest for k, rest in final if k == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (volume,) = [rest for k, rest in final if k == "VOLUME"]
    assert volume == f'["{render.DATA}"]'
    # the manifests run as that user and mount the volume there
    for d in of_kind(build(), "StatefulSet") + of_kind(build(), "Deployment"):
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])
    for sts in of_kind(build(), "StatefulSet"):
        assert container(sts)["volumeMounts"][0]["mountPath"] == render.DATA
    exposed = {int(p) for k, rest in final if k == "EXPOSE" for p in rest.split()}
    assert exposed == {render.ROUTER_PORT, render.SHARD_PORT, render.METRICS_PORT}
