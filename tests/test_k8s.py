"""Offline checks of the deployment files: k8s/ manifests, Dockerfile, .dockerignore.

- every YAML file passes yamllint;
- every Kubernetes object validates against the official JSON schemas (kubernetes-validate, strict
  mode, so a misspelt field fails) for 1.29 (the oldest version with native sidecars) and 1.30;
- every daemon container's settings (the ConfigMap YAML it gets through --config, its FLEXCACHE_*
  env vars, its flags) resolve through the daemon's own config code, and the manifests agree with
  the resolved settings: container ports and probe ports with the listen addresses, the data mount
  with data_dir, volume sizes with max_bytes, the termination grace period with drain_seconds;
- the Dockerfile builds the image the manifests name (no Docker engine here: checked as text).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml

from flexcache.daemon import config as cfg

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
YAML_FILES = sorted(K8S.rglob("*.yaml"))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"ghcr.io/flexcache/flexcache:{PROJECT['version']}"
# Oldest version the sidecar variant supports (native sidecars), and a current one.
K8S_VERSIONS = ("1.29", "1.30")
# Objects with no schema in kubernetes-validate, checked by their own tests below.
NOT_CORE_KINDS = {"Kustomization", "ServiceMonitor"}

YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
"""


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def folder_objects(folder: Path) -> list[dict[str, Any]]:
    return [doc for path in sorted(folder.glob("*.yaml")) for doc in docs(path)]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity ('64Gi', '500M', '2') as a number."""
    units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?|Ki)?", str(text))
    assert match, f"cannot parse quantity {text!r}"
    return float(match.group(1)) * units[match.group(2) or ""]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- generic: lint and schema -------------------------------------------------------------------


def test_manifests_exist() -> None:
    names = {rel(p) for p in YAML_FILES}
    for needed in ("k8s/shared/statefulset.yaml", "k8s/shared/service.yaml", "k8s/shared/configmap.yaml",
                   "k8s/sidecar/deployment.yaml", "k8s/sidecar/configmap.yaml"):
        assert needed in names
    assert (K8S / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yamllint(path: Path) -> None:
    linter = pytest.importorskip("yamllint.linter", reason="yamllint is not installed (pip install yamllint)")
    from yamllint.config import YamlLintConfig

    problems = list(linter.run(path.read_text(), YamlLintConfig(YAMLLINT_CONFIG), str(path)))
    assert not problems, "\n".join(f"{rel(path)}:{p.line}:{p.column}: {p.desc} ({p.rule})" for p in problems)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_schema(path: Path, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is not installed (pip install kubernetes-validate)")
    objects = docs(path)
    assert objects, f"{rel(path)} holds no object"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), f"{rel(path)}: an object lacks apiVersion or kind"
        if obj["kind"] in NOT_CORE_KINDS:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{rel(path)}: {obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")


# --- kustomize and the Prometheus Operator ------------------------------------------------------


@pytest.mark.parametrize("folder", sorted(p.parent for p in K8S.rglob("kustomization.yaml")), ids=rel)
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    (kustomization,) = docs(folder / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    for name in listed:
        assert (folder / name).is_file(), f"{rel(folder)}/kustomization.yaml lists missing {name}"
    # Everything else must be applied by hand for a reason: only the CRD-dependent ServiceMonitor is.
    unlisted = {p.name for p in folder.glob("*.yaml")} - set(listed) - {"kustomization.yaml"}
    for name in unlisted:
        assert {o["kind"] for o in docs(folder / name)} <= {"ServiceMonitor"}, f"{name} is not in kustomization.yaml"


def test_servicemonitor_scrapes_the_metrics_port() -> None:
    objects = folder_objects(K8S / "shared")
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for s in by_kind(objects, "Service")
                if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in selected] == ["flexcache"]
    port_names = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    (daemon,) = daemons_in(K8S / "shared")
    for endpoint in monitor["spec"]["endpoints"]:
        target = port_names[endpoint["port"]]["targetPort"]
        assert daemon.container_port(target) == daemon.metrics_port


# --- the daemon containers and their settings ---------------------------------------------------


@dataclass
class Daemon:
    """One container running the FlexCache image, with its pod and the settings it will run with."""

    folder: Path
    workload: dict[str, Any]
    pod: dict[str, Any]
    container: dict[str, Any]

    @property
    def where(self) -> str:
        workload = f"{self.workload['kind']}/{self.workload['metadata']['name']}"
        return f"{rel(self.folder)}: {workload}/{self.container['name']}"

    @cached_property
    def args(self) -> argparse.Namespace:
        assert "command" not in self.container, f"{self.where}: keep the image's ENTRYPOINT (flexcache serve)"
        return parse_serve_flags(self.container.get("args", []), self.where)

    @cached_property
    def config_yaml(self) -> dict[str, Any]:
        return config_file(self.folder, self.pod, self.container, self.args.config) if self.args.config else {}

    @cached_property
    def config(self) -> cfg.Config:
        """Resolved as `flexcache serve` would: ConfigMap YAML < FLEXCACHE_* env < flags."""
        env = {e["name"]: e.get("value", "") for e in self.container.get("env", [])}
        flags = {o.name: getattr(self.args, o.name) for o in cfg.OPTIONS}
        try:
            return cfg.resolve(self.config_yaml, env, flags)
        except cfg.ConfigError as exc:
            raise AssertionError(f"{self.where}: the daemon would refuse its settings: {exc}") from None

    @property
    def grpc_port(self) -> int:
        return host_port(self.config.listen)[1]

    @property
    def metrics_port(self) -> int:
        return host_port(self.config.metrics_listen)[1]

    def container_port(self, ref: int | str) -> int:
        for port in self.container.get("ports", []):
            if ref in (port["containerPort"], port.get("name")):
                return port["containerPort"]
        raise AssertionError(f"{self.where}: no container port {ref!r}")

    def volume(self, name: str) -> dict[str, Any]:
        for volume in self.pod.get("volumes", []):
            if volume["name"] == name:
                return volume
        for claim in self.workload["spec"].get("volumeClaimTemplates", []):
            if claim["metadata"]["name"] == name:
                return {"name": name, "claimTemplate": claim}
        raise AssertionError(f"{self.where}: no volume {name!r}")


def parse_serve_flags(argv: list[str], where: str) -> argparse.Namespace:
    """`flexcache serve`'s flags, from the same table the CLI builds them from."""
    parser = argparse.ArgumentParser(prog="flexcache serve", exit_on_error=False)
    cfg.add_flags(parser)
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"{where}: flexcache serve does not know {unknown}"
    return args


def config_file(folder: Path, pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The YAML that `--config path` reads inside the container: a key of a mounted ConfigMap."""
    configmaps = {c["metadata"]["name"]: c for c in by_kind(folder_objects(folder), "ConfigMap")}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in volumes.get(mount["name"], {}):
            name = volumes[mount["name"]]["configMap"]["name"]
            assert name in configmaps, f"ConfigMap {name} is not in {rel(folder)}"
            key = path.removeprefix(prefix)
            assert key in configmaps[name]["data"], f"ConfigMap {name} has no key {key}"
            values = yaml.safe_load(configmaps[name]["data"][key])
            assert isinstance(values, dict), f"ConfigMap {name}/{key} is not a mapping"
            return values
    raise AssertionError(f"--config {path} is not inside a mounted ConfigMap")


def daemons_in(folder: Path) -> list[Daemon]:
    found = []
    for workload in [o for o in folder_objects(folder) if o["kind"] in ("StatefulSet", "Deployment")]:
        pod = workload["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            if container["image"].startswith("ghcr.io/flexcache/flexcache:"):
                found.append(Daemon(folder, workload, pod, container))
    return found


def all_daemons() -> list[Daemon]:
    try:
        return [d for folder in (K8S / "shared", K8S / "sidecar") for d in daemons_in(folder)]
    except yaml.YAMLError:  # reported by test_yamllint and test_schema; keep the module collectable
        return []


DAEMONS = all_daemons()


def test_both_variants_run_the_daemon() -> None:
    assert [(d.workload["kind"], d.container["name"]) for d in all_daemons()] == [
        ("StatefulSet", "flexcache"), ("Deployment", "flexcache")]


@pytest.mark.parametrize("daemon", DAEMONS, ids=lambda d: d.where)
class TestDaemonContainer:
    def test_settings_are_real(self, daemon: Daemon) -> None:
        # resolve() raises ConfigError on unknown keys, env vars or bad values, as the daemon would.
        assert isinstance(daemon.config, cfg.Config)
        # The settings live in the ConfigMap, and env vars must not silently override it (env wins).
        assert daemon.config_yaml, f"{daemon.where}: pass the settings through the ConfigMap and --config"
        overridden = [e["name"] for e in daemon.container.get("env", [])
                      if e["name"].removeprefix("FLEXCACHE_").lower() in daemon.config_yaml]
        assert not overridden, f"{daemon.where}: env {overridden} override the ConfigMap"

    def test_image(self, daemon: Daemon) -> None:
        assert daemon.container["image"] == IMAGE

    def test_listens_on_the_pod_ip(self, daemon: Daemon) -> None:
        for address in (daemon.config.listen, daemon.config.metrics_listen):
            host, port = host_port(address)
            assert host in ("0.0.0.0", "[::]", ""), f"{daemon.where}: {address}: probes and peers use the pod IP"
            assert port > 0, f"{daemon.where}: {address}: a fixed port is needed"

    def test_container_ports_match_the_config(self, daemon: Daemon) -> None:
        """Every port the daemon opens on the pod's address is declared; a loopback one is not."""
        declared = sorted(p["containerPort"] for p in daemon.container["ports"])
        data_host, data_port = host_port(daemon.config.data_listen)
        data = [] if data_host in ("127.0.0.1", "localhost", "::1") else [data_port]
        assert declared == sorted([daemon.grpc_port, daemon.metrics_port, *data])

    def test_probes_use_grpc_health_on_the_grpc_port(self, daemon: Daemon) -> None:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = daemon.container.get(kind)
            assert probe, f"{daemon.where}: no {kind}"
            assert "grpc" in probe, f"{daemon.where}: {kind} should be the native grpc probe"
            assert probe["grpc"]["port"] == daemon.grpc_port
            # "" (overall) or the cache service: the daemon sets both.
            assert probe["grpc"].get("service", "") in ("", "flexcache.v1.CacheService")

    def test_grace_period_covers_the_drain(self, daemon: Daemon) -> None:
        grace = daemon.pod.get("terminationGracePeriodSeconds", 30)
        assert grace > daemon.config.drain_seconds + 5, f"{daemon.where}: grace {grace}s"

    def test_data_dir_is_a_writable_volume_big_enough(self, daemon: Daemon) -> None:
        (mount,) = [m for m in daemon.container["volumeMounts"] if m["mountPath"] == daemon.config.data_dir]
        assert not mount.get("readOnly", False)
        volume = daemon.volume(mount["name"])
        if "claimTemplate" in volume:
            size = volume["claimTemplate"]["spec"]["resources"]["requests"]["storage"]
        else:
            assert "emptyDir" in volume, f"{daemon.where}: data volume should be a PVC or an emptyDir"
            size = volume["emptyDir"]["sizeLimit"]
        # RocksDB needs room beyond the entry budget for compaction, plus the index.
        assert quantity(size) >= 1.2 * daemon.config.max_bytes, f"{daemon.where}: {size} for {daemon.config.max_bytes}"

    def test_security_context(self, daemon: Daemon) -> None:
        pod_sc = daemon.pod.get("securityContext", {})
        sc = {**pod_sc, **daemon.container.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True
        assert sc.get("runAsUser") == dockerfile_uid()
        assert sc.get("readOnlyRootFilesystem") is True
        assert sc.get("allowPrivilegeEscalation") is False
        assert sc.get("capabilities", {}).get("drop") == ["ALL"]
        assert pod_sc.get("fsGroup") == dockerfile_uid(), "the data volume must be writable by the daemon's user"
        mounted = {m["mountPath"] for m in daemon.container["volumeMounts"]}
        assert "/tmp" in mounted, "a read-only root needs a writable /tmp"

    def test_no_service_links(self, daemon: Daemon) -> None:
        # A Service named flexcache* makes Kubernetes inject FLEXCACHE_SERVICE_HOST, FLEXCACHE_PORT...
        # into the pod. The daemon ignores those exact names, but they sit in its settings' env
        # namespace and leak the Service topology into the pod: keep them out.
        assert daemon.pod.get("enableServiceLinks") is False

    def test_resources(self, daemon: Daemon) -> None:
        resources = daemon.container["resources"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[part]), f"{daemon.where}: {part}"
        assert quantity(resources["limits"]["memory"]) >= quantity(resources["requests"]["memory"])

    def test_prometheus_annotations(self, daemon: Daemon) -> None:
        annotations = daemon.workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(daemon.metrics_port)
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


# --- the shared variant -------------------------------------------------------------------------


def test_shared_is_one_statefulset_replica_with_a_claim_template() -> None:
    objects = folder_objects(K8S / "shared")
    (sts,) = by_kind(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 1, "RocksDB is single-writer: one process per data dir"
    assert by_kind(objects, "PersistentVolumeClaim") == [], "use volumeClaimTemplates"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"][0] in ("ReadWriteOnce", "ReadWriteOncePod")
    governing = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert governing and governing[0]["spec"].get("clusterIP") == "None", "serviceName must be a headless Service"


def test_shared_services_reach_the_daemon_ports() -> None:
    (daemon,) = daemons_in(K8S / "shared")
    pod_labels = daemon.workload["spec"]["template"]["metadata"]["labels"]
    services = by_kind(folder_objects(K8S / "shared"), "Service")
    assert "flexcache" in {s["metadata"]["name"] for s in services}, 'workers use "flexcache:50051"'
    for service in services:
        assert labels_match(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert daemon.container_port(ports["grpc"]["targetPort"]) == daemon.grpc_port
        assert ports["grpc"]["port"] == daemon.grpc_port
        if "metrics" in ports:
            assert daemon.container_port(ports["metrics"]["targetPort"]) == daemon.metrics_port


# --- the sidecar variant ------------------------------------------------------------------------


def test_sidecar_is_a_native_sidecar_next_to_the_worker() -> None:
    (daemon,) = daemons_in(K8S / "sidecar")
    pod = daemon.pod
    assert daemon.container in pod.get("initContainers", []), "a native sidecar is an initContainer"
    assert daemon.container.get("restartPolicy") == "Always"
    volume = daemon.volume(next(m["name"] for m in daemon.container["volumeMounts"]
                                if m["mountPath"] == daemon.config.data_dir))
    assert "emptyDir" in volume or "hostPath" in volume or "persistentVolumeClaim" in volume
    workers = pod["containers"]
    assert workers, "the pod needs a worker container"
    for worker in workers:
        env = {e["name"]: e.get("value") for e in worker.get("env", [])}
        assert not [name for name in env if name.startswith("FLEXCACHE_")], "FLEXCACHE_* is the daemon's"
        host, port = host_port(env["CACHE_TARGET"])
        assert host in ("127.0.0.1", "localhost") and port == daemon.grpc_port


def test_data_ports_are_reachable_by_the_clients_only() -> None:
    """The sidecar's data port is on loopback (its worker dials 127.0.0.1); the shared daemon's is a
    fixed port that its Service exposes under the same number, since clients dial the number the
    daemon reports at the Service's address."""
    (sidecar,) = daemons_in(K8S / "sidecar")
    assert host_port(sidecar.config.data_listen)[0] == "127.0.0.1"
    (shared,) = daemons_in(K8S / "shared")
    host, port = host_port(shared.config.data_listen)
    assert host == "0.0.0.0" and port != 0
    assert shared.container_port("data") == port
    (service,) = [s for s in by_kind(folder_objects(K8S / "shared"), "Service") if s["metadata"]["name"] == "flexcache"]
    (data,) = [p for p in service["spec"]["ports"] if p["name"] == "data"]
    assert data["port"] == port and shared.container_port(data["targetPort"]) == port


def test_sidecar_grpc_port_is_not_open_to_other_pods() -> None:
    objects = folder_objects(K8S / "sidecar")
    (daemon,) = daemons_in(K8S / "sidecar")
    pod_labels = daemon.workload["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in by_kind(objects, "NetworkPolicy")
                if labels_match(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels)]
    assert policies, "the sidecar listens on 0.0.0.0: a NetworkPolicy must fence its gRPC port"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            ports = [p.get("port") for p in rule.get("ports", [])]
            assert ports, "an ingress rule without ports opens every port"
            assert daemon.grpc_port not in ports and "cache-grpc" not in ports


# --- Dockerfile and .dockerignore (no Docker engine here: checked as text) ----------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_uid() -> int:
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert users, "the image must not run as root"
    return int(users[-1].split(":")[0])


def test_dockerfile_runs_the_daemon_as_non_root() -> None:
    instructions = dockerfile_instructions()
    assert all(rest.split()[0] == "python:3.11-slim" for kw, rest in instructions if kw == "FROM")
    (entrypoint,) = [json.loads(rest) for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoint == ["flexcache", "serve"]
    assert dockerfile_uid() > 0
    # CMD holds default flags for `docker run`: they must be real ones.
    (cmd,) = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    args = parse_serve_flags(cmd, "Dockerfile CMD")
    config = cfg.resolve({}, {}, {o.name: getattr(args, o.name) for o in cfg.OPTIONS})
    exposed = {int(p.split("/")[0]) for kw, rest in instructions if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {host_port(config.listen)[1], host_port(config.data_listen)[1],
                       host_port(config.metrics_listen)[1]}


def test_dockerfile_installs_without_the_model_extra() -> None:
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN" and "pip" in rest:
            assert "[model]" not in rest and "[dev]" not in rest and "torch" not in rest, rest
        # env vars override --config: an image default would beat the Kubernetes ConfigMap.
        if keyword == "ENV":
            assert "FLEXCACHE_" not in rest, rest


def copied_sources() -> list[str]:
    sources = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in rest:
            sources += shlex.split(rest)[:-1]
    return sources


def test_dockerfile_copies_every_package() -> None:
    copied = {s.rstrip("/") for s in copied_sources()}
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {path.split("/")[0] for path in tool["package-dir"].values()}
    roots |= {pkg.split(".")[0] for pkg in tool["packages"] if pkg.split(".")[0] not in tool["package-dir"]
              and not pkg.startswith("flexcache.")}
    build_files = {"pyproject.toml", "setup.py", PROJECT["readme"]}
    assert roots | build_files <= copied, f"not copied: {sorted(roots | build_files - copied)}"
    for source in copied:
        assert (ROOT / source).exists(), source


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list keeps .venv, .git and data/ out of the build context"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    for source in copied_sources():
        assert source.rstrip("/") in allowed, f"{source} is copied but excluded by .dockerignore"


def test_one_image_name_everywhere() -> None:
    files: Iterator[Path] = iter([*YAML_FILES, K8S / "README.md", DOCKERFILE])
    for path in files:
        for ref in re.findall(r"ghcr\.io/flexcache/flexcache:[\w.-]+", path.read_text()):
            assert ref == IMAGE, f"{rel(path)}: {ref}, expected {IMAGE}"
