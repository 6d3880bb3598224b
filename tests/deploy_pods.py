"""The pods of a kustomization of deploy/k8s run as real local processes, each with exactly its
container's arguments after what the kubelet and the cluster's DNS would do to them:

- `$(POD_NAME)`, `$(POD_NAMESPACE)` expanded from the pod's downward-API env;
- each pod gets its own loopback address, 127.B.C.n with B.C chosen per run (Linux routes all
  of 127.0.0.0/8 to loopback), and its DNS name `pod.service.ns.svc.cluster.local` in the
  arguments is replaced by that address, `0.0.0.0` too (gRPC resolves those names itself);
- the Service names the base's routers seed with stay names, resolved through
  SHARDSTATE_HOSTS_FILE to every pod behind them, as a headless Service resolves
  (router/seeds.py);
- a claim's volume is a temporary directory per pod; a Secret's volume is a directory the test
  filled with the Secret's keys, one file each (`kubectl create secret generic --from-file`);
- an exec probe runs `shardstate health` here with the same replacements, and `localhost` is
  the pod's own address; the pod's variables are expanded as `sh -c` would expand them.
Ports are the manifests' own (7401, 7400): the addresses are new each run. Used by
tests/test_deploy_cluster.py (the base) and tests/test_deploy_cluster_secure.py (the overlay).
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardstate.common import tls
from shardstate.router.seeds import HOSTS_FILE_ENV
from shardstate.server import launch
from tests.deploy_support import PENDING_FLAGS, container, health_args, of_kind

NAMESPACE = "store"
DOMAIN = "svc.cluster.local"
ADDRESSES = re.compile(r"[\w.-]+:\d+(,[\w.-]+:\d+)*")


@dataclass
class Pod:
    name: str
    workload: dict[str, Any]
    host: str
    dns: str = ""  # its stable name, for StatefulSet pods
    node: launch.Node | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return str(container(self.workload)["args"][0])


class PodProcess(launch.Node):
    """A node started with the pod's arguments as they are, on the pod's own address (and
    health-checked with `tls_files`, its certificate, when it serves TLS)."""

    def __init__(self, pod: Pod, args: list[str], tmp: Path, hosts_file: Path,
                 tls_files: tls.TlsFiles | None = None) -> None:
        super().__init__(pod.kind, args, port_file=tmp / f"{pod.name}.port", log_path=tmp / f"{pod.name}.log",
                         name=pod.name, env={HOSTS_FILE_ENV: str(hosts_file)}, tls_files=tls_files)
        self.host = pod.host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, listen: str, extra: Any = ()) -> list[str]:
        return launch.shardstate_cmd(*self.args, "--port-file", str(self.port_file))


def loopback_base() -> str:
    """127.B.C, unused by anything listening on the manifests' ports."""
    for _ in range(50):
        base = f"127.{random.randrange(16, 250)}.{random.randrange(256)}"
        try:
            for port in (7400, 7401):
                with socket.socket() as s:
                    s.bind((f"{base}.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free loopback range")


def pods_of(docs: list[dict[str, Any]]) -> list[Pod]:
    base, pods = loopback_base(), []
    for w in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment"):
        for i in range(w["spec"]["replicas"]):
            name = f"{w['metadata']['name']}-{i}"
            dns = f"{name}.{w['spec']['serviceName']}.{NAMESPACE}.{DOMAIN}" if w["kind"] == "StatefulSet" else ""
            pods.append(Pod(name, w, f"{base}.{len(pods) + 1}", dns))
    return pods


def hosts_text(pods: list[Pod]) -> str:
    """Each pod's name, and each headless Service's name on a line per pod behind it."""
    lines = []
    for p in pods:
        if p.dns:
            service = p.dns.split(".", 1)[1]
            lines.append(f"{p.host} {p.dns} {service}")
    return "\n".join(lines) + "\n"


class Kubelet:
    """What the pods' containers become on this machine; `secrets` maps a Secret's name to the
    directory holding its keys."""

    def __init__(self, pods: list[Pod], tmp: Path, secrets: Mapping[str, Path] | None = None) -> None:
        self.pods, self.tmp, self.secrets = pods, tmp, dict(secrets or {})
        self.by_dns = {p.dns: p.host for p in pods if p.dns}

    def env(self, pod: Pod) -> dict[str, str]:
        fields = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE}
        return {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in container(pod.workload)["env"]}

    def mounts(self, pod: Pod) -> dict[str, Path]:
        """mountPath → the directory standing for its volume."""
        volumes = {v["name"]: v for v in pod.workload["spec"]["template"]["spec"].get("volumes", [])}
        out = {}
        for m in container(pod.workload).get("volumeMounts", []):
            secret = volumes.get(m["name"], {}).get("secret")
            if secret is not None:
                out[m["mountPath"]] = self.secrets[secret["secretName"]]  # a pod waits for its Secrets
            else:  # the claim's volume, mounted
                out[m["mountPath"]] = self.tmp / pod.name
                out[m["mountPath"]].mkdir(exist_ok=True)
        return out

    def local(self, pod: Pod, words: list[str]) -> list[str]:
        """`words` (variables expanded) with the pod's addresses and paths as on this machine."""
        mounts = self.mounts(pod)

        def address(addr: str) -> str:
            host, _, port = addr.rpartition(":")
            return f"{pod.host if host in ('0.0.0.0', 'localhost') else self.by_dns.get(host, host)}:{port}"

        out: list[str] = []
        for a in words:
            if a == "0.0.0.0":
                a = pod.host  # every address of the pod: here, its one
            if ADDRESSES.fullmatch(a):
                a = ",".join(address(x) for x in a.split(","))
            for path, directory in mounts.items():
                if a.startswith(path + "/"):
                    a = str(directory) + a[len(path):]
            out.append(a)
        return out

    def args(self, pod: Pod) -> list[str]:
        """The container's args as the process would get them in the pod, on this machine."""
        values = self.env(pod)
        out = self.local(pod, [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a)
                               for a in container(pod.workload)["args"]])
        for flag in PENDING_FLAGS:  # not in this build yet (tests/deploy_support.py)
            if flag in out:
                i = out.index(flag)
                del out[i : i + 2]
        if "--metrics-port" in out:
            out[out.index("--metrics-port") + 1] = "0"  # 9100 on every pod would collide on one machine
        return out

    def probe(self, pod: Pod, probe: str) -> list[str]:
        """The command of the container's exec probe `probe`, as it would run in the pod."""
        values = self.env(pod)
        words = [re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], a)
                 for a in health_args(container(pod.workload)[probe])]
        return launch.shardstate_cmd("health", *self.local(pod, words))

    def tls_files(self, pod: Pod) -> tls.TlsFiles | None:
        """The pod's own certificate files, as its flags name them (None: plaintext)."""
        args = self.args(pod)
        if "--tls-ca" not in args:
            return None
        ca, cert, key = (args[args.index(f) + 1] for f in ("--tls-ca", "--tls-cert", "--tls-key"))
        return tls.TlsFiles(ca=ca, cert=cert, key=key)


@contextlib.contextmanager
def running(pods: list[Pod], tmp: Path, secrets: Mapping[str, Path] | None = None) -> Iterator[Kubelet]:
    """Every pod started as its workload starts them, serving until the block ends."""
    kubelet = Kubelet(pods, tmp, secrets)
    hosts = tmp / "hosts"
    hosts.write_text(hosts_text(pods))
    for p in pods:
        p.node = PodProcess(p, kubelet.args(p), tmp, hosts, kubelet.tls_files(p))
    try:
        # as the StatefulSets start them (OrderedReady): pod 0 of each group, then the next
        ordinals = sorted({int(p.name.rsplit("-", 1)[1]) for p in pods if p.dns})
        for n in ordinals:
            wave = [p.node for p in pods if p.dns and p.name.endswith(f"-{n}") and p.node]
            launch.wait_all([w.start(wait=False) for w in wave])
        launch.wait_all([p.node.start(wait=False) for p in pods if not p.dns and p.node])
        yield kubelet
    finally:
        for p in pods:
            if p.node is not None:
                p.node.stop(grace=10)
