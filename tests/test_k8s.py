"""Offline checks of the deployment files: k8s/ manifests, Dockerfile, .dockerignore.

- every YAML file passes yamllint;
- every Kubernetes object validates against the official JSON schemas (kubernetes-validate, strict
  mode, so a misspelt field fails) for 1.29 (the oldest version with native sidecars) and 1.30;
- every daemon container's settings (the ConfigMap YAML it gets through --config, its FLEXCACHE_*
  env vars, its flags) resolve through the daemon's own config code, and the manifests agree with
  the resolved settings: container ports and probe ports with the listen addresses, the data mount
  with data_dir, volume sizes with max_bytes, the termination grace period with drain_seconds;
- security (issue 17): a daemon port other pods can reach has TLS and tokens on; the TLS files and
  the tokens file come from whole Secret volumes (no subPath, so renewals and edits reach the pod);
  the cert-manager Certificate covers the Service's names; the shared NetworkPolicy admits only
  client pods to the gRPC and data ports; the workers' FLEXCACHE_CLIENT_* env vars agree with their
  daemon; no key, certificate or token is shipped;
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
# Custom resources: no schema in kubernetes-validate, checked by their own tests below, and left out
# of kustomization.yaml (applying them fails without their CRDs). The PrometheusRule
# (k8s/monitoring, generated from deploy/prometheus) is checked by tests/test_rules.py.
CRD_KINDS = {"ServiceMonitor", "Certificate", "PrometheusRule"}
NOT_CORE_KINDS = {"Kustomization", *CRD_KINDS}
# What flexcache.client.CacheClient reads from the environment when its arguments are not given.
CLIENT_ENV = {"FLEXCACHE_CLIENT_TOKEN", "FLEXCACHE_CLIENT_TLS_CA_FILE", "FLEXCACHE_CLIENT_TLS_CERT_FILE",
              "FLEXCACHE_CLIENT_TLS_KEY_FILE"}
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")

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
                   "k8s/shared/networkpolicy.yaml", "k8s/shared/certificate.yaml",
                   "k8s/shared-worker/deployment.yaml", "k8s/sidecar/deployment.yaml", "k8s/sidecar/configmap.yaml"):
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
    # Everything else must be applied by hand for a reason: only what needs a CRD (ServiceMonitor,
    # cert-manager's Certificate) is.
    unlisted = {p.name for p in folder.glob("*.yaml")} - set(listed) - {"kustomization.yaml"}
    for name in unlisted:
        assert {o["kind"] for o in docs(folder / name)} <= CRD_KINDS, f"{name} is not in kustomization.yaml"
    for name in listed:
        kinds = {o["kind"] for o in docs(folder / name)} & CRD_KINDS
        assert not kinds, f"{name}: {kinds} fails to apply without its CRD: leave it out and say how to apply it"


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
    def config_text(self) -> str:
        return config_file_text(self.folder, self.pod, self.container, self.args.config) if self.args.config else ""

    @cached_property
    def config_yaml(self) -> dict[str, Any]:
        if not self.config_text:
            return {}
        values = yaml.safe_load(self.config_text)
        assert isinstance(values, dict), f"{self.where}: --config {self.args.config} is not a mapping"
        return values

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

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.workload["spec"]["template"]["metadata"]["labels"]

    def mounted_file(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The volume mount that holds `path` inside the container, and its volume."""
        return mounted_file(self.pod, self.container, path, self.where)

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


def mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str,
                 where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount (the deepest one) whose mountPath holds `path` in `container`, and its volume."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    holding = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert holding, f"{where}: {path} is in no mounted volume"
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    assert mount["name"] in volumes, f"{where}: the mount of {path} names no volume of the pod"
    return mount, volumes[mount["name"]]


def config_file_text(folder: Path, pod: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The YAML text that `--config path` reads inside the container: a key of a mounted ConfigMap."""
    configmaps = {c["metadata"]["name"]: c for c in by_kind(folder_objects(folder), "ConfigMap")}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in volumes.get(mount["name"], {}):
            name = volumes[mount["name"]]["configMap"]["name"]
            assert name in configmaps, f"ConfigMap {name} is not in {rel(folder)}"
            key = path.removeprefix(prefix)
            assert key in configmaps[name]["data"], f"ConfigMap {name} has no key {key}"
            return configmaps[name]["data"][key]
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

    def test_setting_names_are_in_the_options_table(self, daemon: Daemon) -> None:
        """Each ConfigMap key, including the ones left commented out as a suggestion (`# key: value`),
        and each FLEXCACHE_* env var names a setting of daemon/config.py's OPTIONS table."""
        names = {o.name: o for o in cfg.OPTIONS}
        commented = re.findall(r"^\s*#\s?([a-z][a-z0-9_]*): +\S+\s*$", daemon.config_text, re.MULTILINE)
        unknown = [key for key in [*daemon.config_yaml, *commented] if key not in names]
        assert not unknown, f"{daemon.where}: {unknown} are not settings (flexcache config-table)"
        env = [e["name"] for e in daemon.container.get("env", []) if e["name"].startswith("FLEXCACHE_")]
        assert not [n for n in env if n not in {o.env for o in cfg.OPTIONS}], f"{daemon.where}: env {env}"
        for key in commented:  # a suggestion must be usable as written
            line = re.search(rf"^\s*#\s?{key}: +(\S+)\s*$", daemon.config_text, re.MULTILINE)
            assert line, key
            cfg.resolve({**daemon.config_yaml, key: yaml.safe_load(line.group(1))}, {}, {})

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

    def test_probes_check_the_grpc_port(self, daemon: Daemon) -> None:
        """The native gRPC probe (grpc.health.v1) on a plain-text port. On a TLS port a TCP probe: the
        kubelet's gRPC probe speaks plain text (its `mode: TLS` is 1.37's and has no client
        certificate for mTLS), so every handshake would fail and the pod be restarted."""
        tls = bool(daemon.config.tls_cert_file)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = daemon.container.get(kind)
            assert probe, f"{daemon.where}: no {kind}"
            if tls:
                assert "tcpSocket" in probe, f"{daemon.where}: {kind}: the gRPC port speaks TLS, probe it over TCP"
                assert daemon.container_port(probe["tcpSocket"]["port"]) == daemon.grpc_port
                continue
            assert "grpc" in probe, f"{daemon.where}: {kind} should be the native grpc probe"
            assert probe["grpc"]["port"] == daemon.grpc_port
            # "" (overall) or the cache service: the daemon sets both.
            assert probe["grpc"].get("service", "") in ("", "flexcache.v1.CacheService")

    def test_ports_other_pods_reach_have_tls_and_tokens(self, daemon: Daemon) -> None:
        """A gRPC or data port on the pod's address that a NetworkPolicy (or the lack of one) opens to
        other pods must speak TLS and require tokens; loopback and fenced ports need neither."""
        listening = {host_port(daemon.config.listen)}
        if daemon.config.data_listen not in ("", "auto"):
            listening.add(host_port(daemon.config.data_listen))
        opened = opened_ports(daemon)
        exposed = sorted(port for host, port in listening
                         if host not in LOOPBACK and (opened is None or port in opened))
        if exposed:
            assert daemon.config.tls_cert_file and daemon.config.tls_key_file, \
                f"{daemon.where}: ports {exposed} are open to other pods without TLS"
            assert daemon.config.auth_tokens_file, f"{daemon.where}: ports {exposed} are open to others without tokens"

    def test_credential_files_come_from_whole_secret_volumes(self, daemon: Daemon) -> None:
        """TLS files and the tokens file sit in Secret volumes mounted whole: a subPath mount is a copy
        taken at start that never sees a renewed certificate or an edited tokens Secret."""
        for setting in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            path = getattr(daemon.config, setting)
            if not path:
                continue
            mount, volume = daemon.mounted_file(path)
            assert "subPath" not in mount and "subPathExpr" not in mount, \
                f"{daemon.where}: {setting}: a subPath mount is never updated"
            assert mount.get("readOnly") is True, f"{daemon.where}: {setting}: mount it read-only"
            assert "secret" in volume, f"{daemon.where}: {setting} should come from a Secret"
            secret = volume["secret"]
            assert not secret.get("optional", False), f"{daemon.where}: {setting}: a missing Secret must not start it"
            key = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
            items = {i["path"]: i["key"] for i in secret.get("items", [])}
            assert not items or key in items, f"{daemon.where}: {setting}: {key} is not among the volume's items"
            # Readable by the daemon through fsGroup, by nobody else.
            mode = secret.get("defaultMode", 0o644)
            assert mode & 0o040 and not mode & 0o007, f"{daemon.where}: {setting}: defaultMode {mode:o}"
            assert daemon.pod.get("securityContext", {}).get("fsGroup") == dockerfile_uid()

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


# --- security: NetworkPolicy, TLS and tokens (issue 17) ------------------------------------------


def policies_for(objects: list[dict[str, Any]], pod_labels: dict[str, str]) -> list[dict[str, Any]]:
    """The NetworkPolicies that select a pod with these labels for Ingress."""
    return [p for p in by_kind(objects, "NetworkPolicy")
            if labels_match(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]


def pod_port(pod: dict[str, Any], ref: int | str) -> int:
    """A NetworkPolicy port (a number, or the name of a container port of the pod) as a number."""
    if isinstance(ref, int):
        return ref
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == ref:
                return port["containerPort"]
    raise AssertionError(f"no container port named {ref!r} in the pod")


def opened_ports(daemon: Daemon) -> set[int] | None:
    """The ports of the daemon's pod that its NetworkPolicies open to other pods; None: all of them
    (no policy selects the pod, or a rule lists no ports)."""
    policies = policies_for(folder_objects(daemon.folder), daemon.pod_labels)
    if not policies:
        return None
    opened: set[int] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("ports"):
                return None
            opened |= {pod_port(daemon.pod, p["port"]) for p in rule["ports"]}
    return opened


def the_certificate() -> dict[str, Any]:
    (certificate,) = by_kind(folder_objects(K8S / "shared"), "Certificate")
    return certificate


def workers_of_the_shared_daemon() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of each worker in k8s/shared-worker."""
    found = []
    for workload in by_kind(folder_objects(K8S / "shared-worker"), "Deployment"):
        pod = workload["spec"]["template"]["spec"]
        found += [(workload, c) for c in pod["containers"]]
    return found


# cert-manager.io/v1 CertificateSpec's fields: with no schema to validate it against, a misspelt
# field would be ignored by nothing but cert-manager's own webhook.
CERTIFICATE_SPEC = {"subject", "literalSubject", "commonName", "duration", "renewBefore", "renewBeforePercentage",
                    "dnsNames", "ipAddresses", "uris", "otherNames", "emailAddresses", "secretName", "secretTemplate",
                    "keystores", "issuerRef", "isCA", "usages", "privateKey", "encodeUsagesInRequest",
                    "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints"}
PRIVATE_KEY_SPEC = {"rotationPolicy", "encoding", "algorithm", "size"}


def go_duration(text: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"not a duration: {text!r}"
    hours, minutes, seconds = (int(g or 0) for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_certificate_is_cert_managers_and_covers_the_service_names() -> None:
    certificate = the_certificate()
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert set(spec) <= CERTIFICATE_SPEC, f"unknown Certificate fields {set(spec) - CERTIFICATE_SPEC}"
    assert set(spec.get("privateKey", {})) <= PRIVATE_KEY_SPEC
    issuer = spec["issuerRef"]
    assert issuer["kind"] in ("ClusterIssuer", "Issuer") and issuer["name"], "an issuer the operator provides, by name"
    assert issuer.get("group", "cert-manager.io") == "cert-manager.io"
    assert not spec.get("isCA", False)
    if "usages" in spec:
        assert "server auth" in spec["usages"]
    if "duration" in spec and "renewBefore" in spec:
        assert go_duration(spec["renewBefore"]) < go_duration(spec["duration"])
    # The daemon mounts the Secret cert-manager writes.
    (daemon,) = daemons_in(K8S / "shared")
    _, volume = daemon.mounted_file(daemon.config.tls_cert_file)
    assert volume["secret"]["secretName"] == spec["secretName"]
    for setting, key in (("tls_cert_file", "tls.crt"), ("tls_key_file", "tls.key"), ("tls_client_ca_file", "ca.crt")):
        path = getattr(daemon.config, setting)
        assert not path or path.endswith("/" + key), f"{setting}: cert-manager's Secret holds it as {key}"
    # Clients verify the name they dial, on the data port too: each name of the flexcache Service.
    names = set(spec["dnsNames"])
    namespaces = {n.split(".")[1] for n in names if n.startswith("flexcache.") and n.count(".") >= 1}
    assert len(namespaces) == 1, f"the Service's names in one namespace, not {namespaces}"
    (ns,) = namespaces
    assert {"flexcache", f"flexcache.{ns}", f"flexcache.{ns}.svc", f"flexcache.{ns}.svc.cluster.local"} <= names
    assert spec.get("commonName", "flexcache") in names


def test_shared_network_policy_admits_clients_to_the_grpc_and_data_ports_only() -> None:
    objects = folder_objects(K8S / "shared")
    (daemon,) = daemons_in(K8S / "shared")
    policies = policies_for(objects, daemon.pod_labels)
    assert len(policies) == 1, "one NetworkPolicy selects the shared daemon's pod"
    (policy,) = policies
    assert "Ingress" in policy["spec"]["policyTypes"]
    data_port = host_port(daemon.config.data_listen)[1]
    every_port = {daemon.grpc_port, data_port, daemon.metrics_port}
    covered: dict[int, list[list[dict[str, Any]]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports"), "an ingress rule without ports opens every port"
        assert rule.get("from"), "an ingress rule without `from` admits every pod and address"
        for port in rule["ports"]:
            number = pod_port(daemon.pod, port["port"])
            assert number in every_port, f"the policy opens port {number}, which the daemon does not serve"
            assert port.get("protocol", "TCP") == "TCP"
            covered.setdefault(number, []).append(rule["from"])
    assert set(covered) == every_port, f"ports {every_port - set(covered)} are closed to everyone"
    for port in (daemon.grpc_port, data_port):
        for peers in covered[port]:
            for peer in peers:
                assert "ipBlock" not in peer, "gRPC and data ports: client pods only, not address ranges"
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                assert labels, f"port {port}: only pods with a client label, not whole namespaces"
    for peers in covered[daemon.metrics_port]:
        for peer in peers:
            assert peer.get("namespaceSelector", {}).get("matchLabels") or peer.get("podSelector", {}).get(
                "matchLabels"), "the metrics port: Prometheus's namespace or pods, not everyone"


def test_shared_workers_are_admitted_and_trust_the_daemon() -> None:
    """The worker template (k8s/shared-worker) carries the label the policy admits, dials a name the
    daemon's certificate holds, and sets the client's env vars as the daemon needs them."""
    (daemon,) = daemons_in(K8S / "shared")
    (policy,) = policies_for(folder_objects(K8S / "shared"), daemon.pod_labels)
    client_selectors = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"]
                        if daemon.grpc_port in {pod_port(daemon.pod, p["port"]) for p in rule["ports"]}
                        for peer in rule["from"]]
    workers = workers_of_the_shared_daemon()
    assert workers, "k8s/shared-worker holds a worker template"
    for workload, container in workers:
        pod = workload["spec"]["template"]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(labels_match(sel, labels) for sel in client_selectors), "the policy would drop its connections"
        assert pod.get("enableServiceLinks") is False
        env = {e["name"]: e for e in container.get("env", [])}
        host, port = host_port(env["CACHE_TARGET"]["value"])
        assert host in the_certificate()["spec"]["dnsNames"], f"{host}: not a name of the daemon's certificate"
        assert port == daemon.grpc_port
        # The token comes from a Secret, never a literal in the manifest.
        if daemon.config.auth_tokens_file:
            token = env["FLEXCACHE_CLIENT_TOKEN"]
            assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"], "the token from a Secret"
        check_client_env(daemon, pod, container)


def check_client_env(daemon: Daemon, pod: dict[str, Any], container: dict[str, Any]) -> None:
    """A worker's FLEXCACHE_CLIENT_* env agrees with its daemon: a CA file iff the daemon speaks TLS, a
    certificate iff it requires one (mTLS), a token iff it checks tokens; each file in a mounted
    volume (not subPath, so a new CA or certificate reaches the pod)."""
    where = container["name"]
    env = {e["name"]: e for e in container.get("env", []) if e["name"].startswith("FLEXCACHE_CLIENT_")}
    assert set(env) <= CLIENT_ENV, f"{where}: the client reads no {sorted(set(env) - CLIENT_ENV)}"
    expected = set()
    if daemon.config.tls_cert_file:
        expected.add("FLEXCACHE_CLIENT_TLS_CA_FILE")
    if daemon.config.tls_client_ca_file:
        expected |= {"FLEXCACHE_CLIENT_TLS_CERT_FILE", "FLEXCACHE_CLIENT_TLS_KEY_FILE"}
    if daemon.config.auth_tokens_file:
        expected.add("FLEXCACHE_CLIENT_TOKEN")
    assert set(env) == expected, f"{where}: sets {sorted(env)}, its daemon needs {sorted(expected)}"
    for name in expected - {"FLEXCACHE_CLIENT_TOKEN"}:
        mount, volume = mounted_file(pod, container, env[name]["value"], where)
        assert "subPath" not in mount and "subPathExpr" not in mount, f"{where}: {name}: a subPath is never updated"
        assert {"secret", "configMap", "projected"} & set(volume), f"{where}: {name}: a Secret or ConfigMap volume"


def test_sidecar_workers_need_no_client_credentials() -> None:
    (daemon,) = daemons_in(K8S / "sidecar")
    for container in daemon.pod["containers"]:
        check_client_env(daemon, daemon.pod, container)


def test_client_env_names_are_the_clients() -> None:
    """Every FLEXCACHE_CLIENT_* name in the manifests and k8s/README.md (comments included) is one the
    client reads, and none is a daemon setting's env var (the daemon refuses unknown FLEXCACHE_*)."""
    daemon_env = {o.env for o in cfg.OPTIONS}
    assert not CLIENT_ENV & daemon_env
    for path in [*YAML_FILES, K8S / "README.md"]:
        named = set(re.findall(r"FLEXCACHE_CLIENT_\w+", path.read_text()))
        assert named <= CLIENT_ENV, f"{rel(path)}: {sorted(named - CLIENT_ENV)}"
    sources = "".join(p.read_text() for p in (ROOT / "client").glob("*.py"))
    if "FLEXCACHE_CLIENT_" not in sources:
        pytest.skip("flexcache.client does not read FLEXCACHE_CLIENT_* env vars yet")
    assert not [n for n in CLIENT_ENV if n not in sources], "the manifests set env vars the client does not read"


def test_readme_creates_the_secrets_the_manifests_mount() -> None:
    """The Secrets are not shipped: k8s/README.md gives the commands that create them, with the names
    and keys the manifests mount."""
    readme = (K8S / "README.md").read_text()
    (daemon,) = daemons_in(K8S / "shared")
    mount, volume = daemon.mounted_file(daemon.config.auth_tokens_file)
    key = daemon.config.auth_tokens_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
    secret = volume["secret"]["secretName"]
    assert re.search(rf"kubectl (-n \S+ )?create secret generic {secret} --from-file={re.escape(key)}\b", readme)
    assert "flexcache tokens add --file" in readme
    for workload, container in workers_of_the_shared_daemon():
        pod = workload["spec"]["template"]["spec"]
        for e in container.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert re.search(rf"create secret generic {ref['name']}\b[^\n]*--from-\w+={ref['key']}\b", readme), ref
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert f"create configmap {volume['configMap']['name']}" in readme, volume["name"]


def test_no_secret_material_is_shipped() -> None:
    for path in YAML_FILES:
        text = path.read_text()
        assert "PRIVATE KEY-----" not in text and "BEGIN CERTIFICATE" not in text, rel(path)
        assert not re.search(r"\bfct_[\w-]{20,}", text), f"{rel(path)}: a token"
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{rel(path)}: a token hash"
        for obj in docs(path):
            assert obj["kind"] != "Secret", f"{rel(path)}: create Secrets with kubectl, do not ship them"


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
        assert not [name for name in env if name.startswith("FLEXCACHE_") and name not in CLIENT_ENV], \
            "FLEXCACHE_* is the daemon's (and the client's FLEXCACHE_CLIENT_*)"
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
