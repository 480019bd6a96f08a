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
- the cluster (k8s/shared): 3 StatefulSet replicas, started in parallel and updated one at a time;
  each node's id is its pod name and its members come from a headless Service that lists unready pods;
  a PodDisruptionBudget lets one node down at a time; required anti-affinity on the host name; the
  readiness probe runs `flexcache health` (joined and not draining) and a preStop hook `flexcache
  drain` within the grace period; the NetworkPolicy admits the nodes to each other's gRPC port; the
  certificate names the headless Service; the peer token comes from a Secret the README creates;
- the Dockerfile builds the image the manifests name (no Docker engine here: checked as text).
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
# The namespace k8s/README.md deploys the shared daemon into, and its certificate names.
NAMESPACE = "flexcache"

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


def container_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet sets it, for the workload's first pod (name-0) in
    NAMESPACE: fieldRef values, a placeholder for a Secret's or ConfigMap's key, and $(VAR) expanded
    from the variables defined before it (a later or unknown one is left as written, as Kubernetes does)."""
    fields = {"metadata.name": f"{workload['metadata']['name']}-0", "metadata.namespace": NAMESPACE,
              "status.podIP": "10.0.0.10"}
    env: dict[str, str] = {}
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path in fields, f"{e['name']}: fieldRef {path} not simulated here"
            env[e["name"]] = fields[path]
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source["configMapKeyRef"]
            env[e["name"]] = f"<{ref['name']}/{ref['key']}>"
        else:
            env[e["name"]] = ""
    return env


def exec_argv(handler: dict[str, Any]) -> list[str]:
    """The words of an exec probe's or hook's command; a `sh -c` script split as the shell would (one
    command, its leading `exec` dropped)."""
    command = handler["exec"]["command"]
    if command[:2] != ["sh", "-c"]:
        return command
    assert len(command) == 3, f"sh -c takes one script: {command}"
    words = shlex.split(command[2])
    assert not {";", "|", "||", "&&", "&"} & set(words), f"one command, not a pipeline: {command[2]}"
    return words[1:] if words[0] == "exec" else words


def cli_options(words: list[str]) -> dict[str, str]:
    """`--flag value` pairs (a flag without a value maps to '') of a command line."""
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            options[word] = value
    return options


def cli_flags(verb: str) -> set[str] | None:
    """The flags `flexcache <verb> --help` lists; None when the CLI has no such verb."""
    from flexcache.daemon import cli

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            cli.main([verb, "--help"])
    except SystemExit as exc:
        if exc.code:
            return None
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue()))


# --- generic: lint and schema -------------------------------------------------------------------


def test_manifests_exist() -> None:
    names = {rel(p) for p in YAML_FILES}
    for needed in ("k8s/shared/statefulset.yaml", "k8s/shared/service.yaml", "k8s/shared/configmap.yaml",
                   "k8s/shared/networkpolicy.yaml", "k8s/shared/certificate.yaml",
                   "k8s/shared/poddisruptionbudget.yaml",
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
    def env(self) -> dict[str, str]:
        return container_env(self.workload, self.container)

    @cached_property
    def config(self) -> cfg.Config:
        """Resolved as `flexcache serve` would: ConfigMap YAML < FLEXCACHE_* env < flags."""
        flags = {o.name: getattr(self.args, o.name) for o in cfg.OPTIONS}
        try:
            return cfg.resolve(self.config_yaml, self.env, flags)
        except cfg.ConfigError as exc:
            raise AssertionError(f"{self.where}: the daemon would refuse its settings: {exc}") from None

    @property
    def grpc_port(self) -> int:
        return host_port(self.config.listen)[1]

    @property
    def clustered(self) -> bool:
        return bool(self.config.peers or self.config.peers_dns)

    def hook(self, phase: str) -> list[str]:
        """The words of the container's preStop/postStart exec hook ([] without one)."""
        handler = self.container.get("lifecycle", {}).get(phase)
        if not handler:
            return []
        assert "exec" in handler, f"{self.where}: {phase}: an exec hook"
        return exec_argv(handler)

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
        certificate for mTLS), so every handshake would fail and the pod be restarted. A cluster node
        is Ready only when grpc.health.v1 says SERVING (joined, not draining): its readiness probe runs
        `flexcache health` (test_cluster_readiness_is_flexcache_health); its startup and liveness
        probes are TCP whatever the port speaks, since a node that has not joined yet must not be
        restarted."""
        tls = bool(daemon.config.tls_cert_file)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = daemon.container.get(kind)
            assert probe, f"{daemon.where}: no {kind}"
            if daemon.clustered and kind == "readinessProbe":
                assert "exec" in probe, f"{daemon.where}: a cluster node's readiness is `flexcache health`"
                continue
            if tls or daemon.clustered:
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
        for setting in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "peer_ca_file", "auth_tokens_file"):
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
        """The grace period runs from the preStop hook (a cluster node's `flexcache drain --wait W`)
        through SIGTERM's drain_seconds to closing the storage."""
        grace = daemon.pod.get("terminationGracePeriodSeconds", 30)
        hook = cli_options(daemon.hook("preStop"))
        wait = float(hook["--wait"]) if "--wait" in hook else 0.0
        assert grace > wait + daemon.config.drain_seconds + 5, \
            f"{daemon.where}: grace {grace}s for a {wait}s preStop and drain_seconds {daemon.config.drain_seconds}"

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


def the_cluster() -> tuple[Daemon, dict[str, Any]]:
    """The shared daemon's container and its StatefulSet."""
    (daemon,) = daemons_in(K8S / "shared")
    assert daemon.workload["kind"] == "StatefulSet"
    return daemon, daemon.workload


def the_peers_service() -> dict[str, Any]:
    """The StatefulSet's governing Service, which the nodes resolve for their members."""
    _, sts = the_cluster()
    services = [s for s in by_kind(folder_objects(K8S / "shared"), "Service")
                if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert services, f"no Service {sts['spec']['serviceName']} (the StatefulSet's serviceName)"
    return services[0]


def test_shared_is_a_three_node_statefulset_with_a_claim_template_each() -> None:
    objects = folder_objects(K8S / "shared")
    daemon, sts = the_cluster()
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert daemon.clustered, "3 replicas that are not a cluster would be 3 caches that each see a third"
    # Each node's copies on other nodes, and one node down (the PDB) still leaves replication_factor.
    assert 2 <= daemon.config.replication_factor < spec["replicas"]
    # The nodes find each other by DNS in any order; OrderedReady would only slow a cold start.
    assert spec["podManagementPolicy"] == "Parallel"
    # One pod at a time (maxUnavailable is 1 when unset; `partition` would hold pods back).
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    rolling = spec["updateStrategy"].get("rollingUpdate", {})
    assert rolling.get("maxUnavailable", 1) == 1 and not rolling.get("partition", 0)
    # One process per data dir: a claim per pod, from the template.
    assert by_kind(objects, "PersistentVolumeClaim") == [], "use volumeClaimTemplates"
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"][0] in ("ReadWriteOnce", "ReadWriteOncePod")
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_shared_peers_service_is_headless_and_lists_unready_pods() -> None:
    daemon, sts = the_cluster()
    service = the_peers_service()
    assert service["metadata"]["name"] == "flexcache-peers"
    assert service["spec"]["clusterIP"] == "None", "a headless Service: its name resolves to every pod's IP"
    # A node is Ready only once it has probed its peers: unready pods must resolve, or none would join.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert labels_match(service["spec"]["selector"], daemon.pod_labels)
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == daemon.grpc_port and daemon.container_port(grpc["targetPort"]) == daemon.grpc_port
    # The client Service is another one: clients never depend on the membership Service.
    clients = [s for s in by_kind(folder_objects(K8S / "shared"), "Service") if s["metadata"]["name"] == "flexcache"]
    assert clients and clients[0]["spec"].get("clusterIP") != "None"
    assert not clients[0]["spec"].get("publishNotReadyAddresses", False), "clients reach joined nodes only"


def test_shared_node_id_and_members_come_from_the_pod_and_the_peers_service() -> None:
    daemon, sts = the_cluster()
    raw = {e["name"]: e for e in daemon.container["env"]}
    names = [e["name"] for e in daemon.container["env"]]
    # The node's id: its pod name, stable across restarts (entries are placed by it).
    assert raw["FLEXCACHE_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert daemon.config.node_id == f"{sts['metadata']['name']}-0"
    # Membership by DNS: the headless Service's full name in the pod's namespace, on the gRPC port.
    assert raw["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert names.index("POD_NAMESPACE") < names.index("FLEXCACHE_PEERS_DNS"), "$(VAR) needs VAR defined before it"
    assert "$(POD_NAMESPACE)" in raw["FLEXCACHE_PEERS_DNS"]["value"], "the namespace from the pod, not written in"
    assert daemon.config.peers == "", "static peers and peers_dns exclude each other"
    host, port = host_port(daemon.config.peers_dns)
    assert host == f"{the_peers_service()['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert port == daemon.grpc_port
    # The per-pod settings are env vars; the ConfigMap holds none of them.
    assert not {"node_id", "peers", "peers_dns", "peer_token", "advertise_host"} & set(daemon.config_yaml)
    # Tickets name the pod's own IP: a data-port connection through the Service could reach another pod.
    assert raw["FLEXCACHE_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_shared_peer_credentials() -> None:
    """With auth on, nodes call each other with an admin token from a Secret; with TLS on, they trust
    the CA of the certificate they all serve."""
    daemon, _ = the_cluster()
    token = {e["name"]: e for e in daemon.container["env"]}.get("FLEXCACHE_PEER_TOKEN")
    if daemon.config.auth_tokens_file:
        assert token, "auth is on: the nodes need a peer_token"
        assert "value" not in token, "the peer token from a Secret, never a literal in the manifest"
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "flexcache-peer-token" and ref["key"] == "token"
        assert not ref.get("optional", False)
    if daemon.config.tls_cert_file:
        ca = daemon.config.peer_ca_file or daemon.config.tls_client_ca_file
        assert ca, "TLS is on: the nodes need a CA to check each other's certificate"
        _, volume = daemon.mounted_file(ca)
        _, cert_volume = daemon.mounted_file(daemon.config.tls_cert_file)
        assert volume == cert_volume and ca.endswith("/ca.crt"), "the CA that signed the nodes' certificate"


def test_shared_capacity_comment_matches_the_manifests() -> None:
    """configmap.yaml says what the cluster holds: replicas x max_bytes / replication_factor."""
    daemon, sts = the_cluster()
    found = re.search(r"replicas x max_bytes / replication_factor = (\d+) x (\w+) / (\d+) = (\w+)",
                      re.sub(r"\s*\n\s*#\s*", " ", daemon.config_text))
    assert found, "configmap.yaml: say what the cluster holds"
    replicas, max_bytes, factor, total = found.groups()
    assert int(replicas) == sts["spec"]["replicas"]
    assert cfg.parse_size(max_bytes) == daemon.config.max_bytes
    assert int(factor) == daemon.config.replication_factor
    held = sts["spec"]["replicas"] * daemon.config.max_bytes // daemon.config.replication_factor
    assert cfg.parse_size(total) == held


def test_shared_disruption_budget_lets_one_node_down() -> None:
    daemon, sts = the_cluster()
    (pdb,) = by_kind(folder_objects(K8S / "shared"), "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    spec = pdb["spec"]
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
    # With R copies, at most R - 1 nodes down keeps a copy of every entry.
    assert spec["maxUnavailable"] <= daemon.config.replication_factor - 1
    assert spec["selector"] == sts["spec"]["selector"], "the PDB covers exactly the StatefulSet's pods"
    assert labels_match(spec["selector"]["matchLabels"], daemon.pod_labels)


def test_shared_nodes_never_share_a_kubernetes_node() -> None:
    """Two copies of an entry on one machine die together: required anti-affinity on the host name."""
    daemon, _ = the_cluster()
    anti = daemon.pod["affinity"]["podAntiAffinity"]
    terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    by_host = [t for t in terms if t["topologyKey"] == "kubernetes.io/hostname"]
    assert by_host, "required anti-affinity across kubernetes.io/hostname"
    for term in by_host:
        assert term["labelSelector"]["matchLabels"] == daemon.workload["spec"]["selector"]["matchLabels"]
        assert labels_match(term["labelSelector"]["matchLabels"], daemon.pod_labels)
        assert "namespaces" not in term and "namespaceSelector" not in term, "the cluster's own pods"


def test_cluster_readiness_is_flexcache_health() -> None:
    """Ready means SERVING on grpc.health.v1: storage open and joined, not draining. Asked from inside
    the container by `flexcache health`, with the TLS flags the port needs."""
    daemon, _ = the_cluster()
    probe = daemon.container["readinessProbe"]
    argv = exec_argv(probe)
    assert argv[:2] == ["flexcache", "health"], argv
    check_cli_connection(daemon, cli_options(argv[2:]), "readinessProbe")
    assert probe["timeoutSeconds"] < probe["periodSeconds"], "one check at a time"
    assert probe.get("failureThreshold", 3) <= 3
    assert "exec" not in daemon.container["livenessProbe"], "liveness must not restart a node that has not joined"


def test_shared_nodes_drain_before_they_stop() -> None:
    """preStop: `flexcache drain` hands the node's entries to their other owners (scale-down)."""
    daemon, _ = the_cluster()
    argv = daemon.hook("preStop")
    assert argv[:2] == ["flexcache", "drain"], argv
    options = cli_options(argv[2:])
    check_cli_connection(daemon, options, "preStop")
    assert float(options["--wait"]) >= 60, "time to hand off a node's entries"
    if daemon.config.auth_tokens_file:  # an admin call: the peer token
        assert options.get("--token") == "$FLEXCACHE_PEER_TOKEN"
        assert daemon.container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["sh", "-c"], \
            "exec hooks do not expand variables: a shell does"
    else:
        assert "--token" not in options


def check_cli_connection(daemon: Daemon, options: dict[str, str], where: str) -> None:
    """A flexcache CLI command run inside the daemon's container reaches its gRPC port, under a name of
    its certificate, with the CA (and client certificate, with mTLS) the port needs."""
    host, port = host_port(options["--target"])
    assert port == daemon.grpc_port, f"{where}: {options['--target']}"
    assert host in LOOPBACK, f"{where}: the container's own daemon"
    expected = set()
    if daemon.config.tls_cert_file:
        assert host in the_certificate()["spec"]["dnsNames"], f"{where}: {host} is not a name of the certificate"
        expected.add("--tls-ca-file")
        _, volume = daemon.mounted_file(options["--tls-ca-file"])
        assert "secret" in volume, f"{where}: the CA from the TLS Secret"
    if daemon.config.tls_client_ca_file:
        expected |= {"--tls-cert-file", "--tls-key-file"}
    assert {o for o in options if o.startswith("--tls-")} == expected, f"{where}: {sorted(options)}"


@pytest.mark.parametrize("verb", ["health", "drain"])
def test_cluster_commands_use_real_flags(verb: str) -> None:
    daemon, _ = the_cluster()
    argv = {"health": exec_argv(daemon.container["readinessProbe"]), "drain": daemon.hook("preStop")}[verb]
    flags = cli_flags(verb)
    if flags is None:
        pytest.skip(f"the CLI has no `flexcache {verb}` yet")
    assert set(cli_options(argv)) <= flags, f"flexcache {verb} does not know {sorted(set(cli_options(argv)) - flags)}"


def test_shared_kustomization_applies_the_cluster() -> None:
    (kustomization,) = docs(K8S / "shared" / "kustomization.yaml")
    listed = {(o["kind"], o["metadata"]["name"]) for name in kustomization["resources"]
              for o in docs(K8S / "shared" / name)}
    assert {("StatefulSet", "flexcache"), ("Service", "flexcache"), ("Service", "flexcache-peers"),
            ("PodDisruptionBudget", "flexcache"), ("NetworkPolicy", "flexcache"),
            ("ConfigMap", "flexcache-config")} <= listed


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
    for setting, key in (("tls_cert_file", "tls.crt"), ("tls_key_file", "tls.key"), ("tls_client_ca_file", "ca.crt"),
                         ("peer_ca_file", "ca.crt")):
        path = getattr(daemon.config, setting)
        assert not path or path.endswith("/" + key), f"{setting}: cert-manager's Secret holds it as {key}"
    # Clients verify the name they dial, on the data port too: each name of the flexcache Service.
    names = set(spec["dnsNames"])
    namespaces = {n.split(".")[1] for n in names if n.startswith("flexcache.") and n.count(".") >= 1}
    assert len(namespaces) == 1, f"the Service's names in one namespace, not {namespaces}"
    (ns,) = namespaces
    assert {"flexcache", f"flexcache.{ns}", f"flexcache.{ns}.svc", f"flexcache.{ns}.svc.cluster.local"} <= names
    assert spec.get("commonName", "flexcache") in names


def test_certificate_covers_the_peers_names() -> None:
    """Nodes dial each other by peers_dns's host name (the TLS target name for every address it resolves
    to), and may name a pod (flexcache-0.flexcache-peers...); they present the same certificate to
    each other, as clients when mTLS is on."""
    daemon, _ = the_cluster()
    spec = the_certificate()["spec"]
    host, _ = host_port(daemon.config.peers_dns)
    assert host.split(".")[1] == NAMESPACE
    assert {host, f"*.{host}"} <= set(spec["dnsNames"])
    assert {"server auth", "client auth"} <= set(spec["usages"])


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


def test_shared_network_policy_admits_the_peers_to_the_grpc_port() -> None:
    daemon, _ = the_cluster()
    (policy,) = policies_for(folder_objects(K8S / "shared"), daemon.pod_labels)
    peer_rules = [rule for rule in policy["spec"]["ingress"]
                  if any(labels_match(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), daemon.pod_labels)
                         for peer in rule["from"])]
    assert peer_rules, "no rule admits the FlexCache pods: the nodes could not reach each other"
    for rule in peer_rules:
        assert {pod_port(daemon.pod, p["port"]) for p in rule["ports"]} == {daemon.grpc_port}, "peers: gRPC only"
        for peer in rule["from"]:
            assert "namespaceSelector" not in peer, "the cluster's own pods, in its namespace only"
            assert peer["podSelector"]["matchLabels"] == daemon.workload["spec"]["selector"]["matchLabels"]


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
    # The peer token: an admin token added to the tokens file before its Secret is created.
    ref = {e["name"]: e for e in daemon.container["env"]}["FLEXCACHE_PEER_TOKEN"]["valueFrom"]["secretKeyRef"]
    admin = re.search(rf"flexcache tokens add --file {re.escape(key)} --admin \| tr -d '\\n' > (\S+)", readme)
    assert admin, "k8s/README.md: add the peer token with --admin"
    assert admin.start() < readme.index(f"create secret generic {secret} "), "add it before creating the Secret"
    assert re.search(rf"create secret generic {ref['name']} --from-file={ref['key']}={re.escape(admin.group(1))}\b",
                     readme)
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
