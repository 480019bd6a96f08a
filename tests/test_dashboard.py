"""The Grafana dashboard (deploy/grafana/flexcache.json, issue 19): checked as JSON, and every panel's
queries run against a real Prometheus scraping a real daemon.

- structural: every panel has a query, every query and panel uses the templated datasource, nothing
  names an instance (the $instance variable does), every metric a query names is one the daemon
  exports (daemon/metrics.py, process_* included) or a recording rule of deploy/prometheus; the
  ConfigMap in k8s/monitoring is generated from the JSON;
- live: a daemon with a small byte budget, a Prometheus 2.42 (the Debian package) scraping it every
  second with the recording rules loaded, traffic whose every lookup result the client counts
  itself, then each panel's PromQL (the variables filled in as Grafana would) must return data of the
  expected sign and size, the shares matching the client's own count. Skipped when
  /usr/bin/prometheus is missing, except under CI (the CI environment variable), where that fails.
- live, cluster: the Cluster row's panels (cluster mode only: a single daemon has none of their
  series but an under-replicated count of 0, and none of the cluster alerts' expressions answer for
  it) run against a Prometheus scraping
  a real 3-node cluster through two rounds of puts, lookups and remote fetches through every node, each
  with one member frozen (SIGSTOP) for the Gathers it misses; the cluster's recording rules answer too.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bench.dashboard_snapshot import (
    DAEMON_SETTINGS,
    DASHBOARD,
    PROMETHEUS,
    RECORDING_RULES,
    Prometheus,
    Traffic,
    drive,
    panels,
    substitute,
)
from flexcache.daemon.metrics import Metrics
from flexcache.daemon.process import DaemonCluster
from tests.conftest import connect, metric

ROOT = Path(__file__).resolve().parent.parent
CONFIGMAP = ROOT / "k8s" / "monitoring" / "grafana-dashboard.yaml"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.rules.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANELS = panels()
CLUSTER_ROW = "Cluster"
CLUSTER_GROUP = "flexcache.cluster"  # the recording rules of cluster mode


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels of the row titled `title`: those after it up to the next row (or, collapsed, its own)."""
    found: list[dict[str, Any]] = []
    inside = False
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            inside = panel["title"] == title
            found.extend(panel.get("panels", []) if inside else [])
        elif inside:
            found.append(panel)
    return found


CLUSTER_PANELS = row_panels(CLUSTER_ROW)
SINGLE_PANELS = [p for p in PANELS if p["id"] not in {c["id"] for c in CLUSTER_PANELS}]
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def recording_rules(cluster: bool | None = None) -> list[dict[str, Any]]:
    """The recording rules: all of them, or only cluster mode's (True), or only the others (False)."""
    if not RECORDING_RULES.is_file():
        return []
    groups = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    return [rule for group in groups if cluster is None or (group["name"] == CLUSTER_GROUP) == cluster
            for rule in group["rules"] if "record" in rule]


def cluster_alerts() -> dict[str, str]:
    """The alerts on cluster mode's series, name -> expression."""
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]
            if "alert" in rule and re.search(r"flexcache[_:]cluster_", rule["expr"])}


def known_metrics() -> set[str]:
    names = set()
    for name, kind, _, _ in Metrics().described:
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names | {rule["record"] for rule in recording_rules()}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges,
    grouping clauses, function names, keywords and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end():].lstrip()[:1]
        if following == "(" or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in PANELS:
        for target in panel.get("targets", []):
            yield panel, target


# --- structural ----------------------------------------------------------------------------------


def test_dashboard_is_grafana_json_with_its_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] == "flexcache"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "namespace"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["definition"].startswith("label_values(") and variable["definition"].endswith(f"{name})")
        assert variable["query"]["query"] == variable["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_every_panel_queries_through_the_templated_datasource(panel: dict[str, Any]) -> None:
    assert panel["datasource"] == DATASOURCE
    assert panel.get("targets"), f"{panel['title']} has no query"
    for target in panel["targets"]:
        assert target["datasource"] == DATASOURCE
        assert target["expr"].strip(), f"{panel['title']} {target['refId']}: an empty query"
        assert '"$instance"' in target["expr"], f"{panel['title']}: not filtered by the $instance variable"
    assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_no_literal_instance_or_datasource() -> None:
    text = DASHBOARD.read_text()
    for needle in ("127.0.0.1", "localhost", ":9464", ":50051"):
        assert needle not in text
    for panel, target in targets():
        for op, value in re.findall(r'\binstance\s*(=~|=|!=|!~)\s*"([^"]*)"', target["expr"]):
            assert (op, value) == ("=~", "$instance"), f"{panel['title']}: instance{op}{value!r}"
    uids = {m for m in re.findall(r'"uid":\s*"([^"]*)"', text)} - {"flexcache", "-- Grafana --"}
    assert uids == {"${datasource}"}


def test_every_metric_a_query_reads_is_exported() -> None:
    known = known_metrics()
    assert "process_resident_memory_bytes" in known and "flexcache_lookups_total" in known
    unknown = {(panel["title"], name) for panel, target in targets() for name in metric_names(target["expr"])
               if name not in known}
    assert not unknown, f"queries read metrics the daemon does not export: {sorted(unknown)}"
    # The parser itself finds what a query reads.
    assert metric_names('sum by (le, method) (rate(flexcache_request_duration_seconds_bucket{method=~"Put|x"}'
                        '[$__rate_interval])) / ignoring (result) group_left sum(flexcache:lookups:rate5m)') == {
        "flexcache_request_duration_seconds_bucket", "flexcache:lookups:rate5m"}


def test_configmap_carries_the_dashboard_json() -> None:
    (configmap,) = [d for d in yaml.safe_load_all(CONFIGMAP.read_text()) if d]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["flexcache.json"] == DASHBOARD.read_text()
    import runpy

    generator = runpy.run_path(str(ROOT / "deploy" / "grafana" / "configmap.py"))
    assert generator["main"](["--check"]) == 0, "rerun python deploy/grafana/configmap.py"


# --- live: a real daemon, a real Prometheus ------------------------------------------------------


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    binary = shutil.which("prometheus") or PROMETHEUS
    if not os.access(binary, os.X_OK):
        reason = f"{PROMETHEUS} is missing (apt-get install prometheus, the Debian package)"
        if os.environ.get("CI"):
            pytest.fail(reason + ": CI must install it")
        print(f"skipped: {reason}")
        pytest.skip(reason)
    started: list[Prometheus] = []

    def start(scrape: list[str]) -> Prometheus:
        prometheus = Prometheus(scrape, tmp_path / f"prometheus{len(started)}", binary=binary)
        started.append(prometheus)
        return prometheus.start()

    yield start
    for prometheus in started:
        prometheus.stop()


WINDOW = 300.0  # seconds: $__rate_interval and $__range as substituted, and the recording rules' 5m


def near(value: float, expected: float, rel: float = 0.5) -> bool:
    """Within `rel` of the client's count: rate() and increase() extrapolate a series only seconds old
    by up to half a scrape interval at each end, so a few seconds of traffic are counted a few tens of
    percent high (the shares, ratios of series scraped together, are exact to a few percent)."""
    return expected * (1 - rel) <= value <= expected * (1 + rel)


def test_every_panel_answers_from_a_real_prometheus(start_daemon, start_prometheus) -> None:
    daemon = start_daemon(**DAEMON_SETTINGS)
    prometheus = start_prometheus([f"127.0.0.1:{daemon.metrics_port}"])
    prometheus.wait_for('up{job="flexcache"}', lambda s: s and s[0][1] == 1)

    def scraped() -> None:  # Prometheus has the daemon's current counters
        lookups, calls = metric(daemon, "flexcache_lookups_total"), metric(daemon, "flexcache_requests_total")
        prometheus.wait_for(f"sum(flexcache_lookups_total) == {lookups} and sum(flexcache_requests_total) == "
                            f"{calls}", bool)

    with connect(daemon.target) as client:
        traffic = Traffic(client, daemon)
        # Warm-up: one lookup of each result, an eviction and the errors, so that every series exists (a
        # counter's first sample is where rate() starts counting) before the counted traffic.
        for _ in range(20):
            traffic.put()
            if daemon.stats().evictions:
                break
        assert [traffic.hit(), traffic.composed(), traffic.partial(), traffic.miss()] == [
            "hit", "composed", "partial", "miss"]
        traffic.errors()
        scraped()
        warm, warm_steps, warm_gpu = Counter(traffic.lookups), traffic.steps, traffic.gpu_seconds
        evicted = daemon.stats().evictions
        assert evicted > 0, "the budget was meant to evict"
        drive(traffic, rounds=4, pause=0.75)  # a few scrapes long
        scraped()
        assert daemon.stats().evictions > evicted, "the counted traffic was meant to evict too"
    time.sleep(2.5)  # the recording rules' evaluation after the last scrape (every second)
    counted = traffic.lookups - warm
    lookups = sum(counted.values())
    steps, gpu_seconds = traffic.steps - warm_steps, traffic.gpu_seconds - warm_gpu

    results: dict[str, list[list[tuple[dict[str, str], float]]]] = {}
    for panel in SINGLE_PANELS:
        answers = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], window=f"{WINDOW:.0f}s", instance=f"127.0.0.1:{daemon.metrics_port}")
            samples = prometheus.query(expr)
            assert samples, f"{panel['title']}: no data from {expr}"
            assert all(math.isfinite(v) and v >= 0 for _, v in samples), f"{panel['title']}: {expr} -> {samples}"
            answers.append(samples)
        results[panel["title"]] = answers

    def one(title: str, target: int = 0) -> float:
        (sample,) = results[title][target]
        return sample[1]

    def by(title: str, label: str, target: int = 0) -> dict[str, float]:
        return {labels.get(label, ""): value for labels, value in results[title][target]}

    def share(kind: str) -> float:
        return counted[kind] / lookups

    def hit_ratio() -> None:
        assert abs(one("Hit ratio") - (1 - share("miss"))) < 0.05

    def by_result() -> None:
        shares = by("Lookups by result", "result")
        assert set(shares) == {"hit", "composed", "partial", "miss"}
        assert sum(shares.values()) == pytest.approx(1.0)
        for kind, value in shares.items():
            assert abs(value - share(kind)) < 0.05, (kind, value, counted)

    def latency(title: str) -> Callable[[], None]:
        def check() -> None:
            for answer in results[title]:
                assert all(0 < v < 10 for _, v in answer), (title, answer)
        return check

    def errors() -> None:
        codes = {(labels["method"], labels["code"]) for labels, _ in results["Errors by method and code"][0]}
        assert {("Lookup", "INVALID_ARGUMENT"), ("Verify", "RESOURCE_EXHAUSTED")} <= codes, codes
        assert "OK" not in {code for _, code in codes}

    stored, budget, disk = (one("Stored vs budget", i) for i in range(3))
    checks: dict[str, Callable[[], None]] = {
        "Hit ratio": hit_ratio,
        "GPU hours saved today": lambda: near(one("GPU hours saved today") * 3600, gpu_seconds) or pytest.fail(
            f"{one('GPU hours saved today') * 3600} GPU s, the client counted {gpu_seconds}"),
        "Steps saved today": lambda: near(one("Steps saved today"), steps) or pytest.fail(
            f"{one('Steps saved today')} steps, the client counted {steps}"),
        "Lookups by result": by_result,
        "Steps saved per second": lambda: near(sum(by("Steps saved per second", "role").values()) * WINDOW,
                                               steps) or pytest.fail(f"{results['Steps saved per second']}"),
        "GPU seconds saved per second": lambda: near(one("GPU seconds saved per second") * WINDOW, gpu_seconds)
        or pytest.fail(f"{results['GPU seconds saved per second']}, the client counted {gpu_seconds}"),
        "Misses by reason": lambda: near(sum(by("Misses by reason", "reason").values()) * WINDOW,
                                         counted["miss"]) or pytest.fail(f"{results['Misses by reason']}"),
        "Lookup latency": latency("Lookup latency"),
        "Put latency": latency("Put latency"),
        "Fetch latency": latency("Fetch latency"),
        "Stored vs budget": lambda: (0 < stored <= budget == 4 << 20 and disk > 0) or pytest.fail(
            f"stored {stored}, budget {budget}, disk {disk}"),
        "Budget used": lambda: 0 < one("Budget used") <= 1 or pytest.fail(f"{one('Budget used')}"),
        "Entries by namespace": lambda: 0 < one("Entries by namespace") < traffic.puts or pytest.fail(
            f"{one('Entries by namespace')} entries of {traffic.puts} puts"),
        "Evictions by policy": lambda: by("Evictions by policy", "policy")["lru"] > 0,
        "Evicted bytes by policy": lambda: by("Evicted bytes by policy", "policy")["lru"] * WINDOW > 512 << 10
        or pytest.fail(f"{results['Evicted bytes by policy']}"),
        "Errors by method and code": errors,
        "Daemon failure ratio by method": lambda: (
            "Lookup" in by("Daemon failure ratio by method", "method")
            and set(by("Daemon failure ratio by method", "method").values()) == {0.0}
        ) or pytest.fail(f"{results['Daemon failure ratio by method']}"),
        "Bad requests by reason": lambda: by("Bad requests by reason", "reason")["invalid"] > 0,
        "Data-port transfers by outcome": lambda: (
            by("Data-port transfers by outcome", "outcome")["sent"] > 0
            and by("Data-port transfers by outcome", "outcome")["received"] > 0
        ) or pytest.fail(f"{results['Data-port transfers by outcome']}"),
        "Refused calls by reason": lambda: by("Refused calls by reason", "reason")["verify_bytes"] > 0,
        "Resident memory": lambda: 10e6 < one("Resident memory") < 8e9 or pytest.fail(f"{one('Resident memory')}"),
        "CPU": lambda: 0 < one("CPU") < 16 or pytest.fail(f"{one('CPU')} cores"),
        "Open file descriptors": lambda: 3 < one("Open file descriptors") < 10_000 or pytest.fail("fds"),
        "Version": lambda: (one("Version") == 1 and results["Version"][0][0][0]["version"]) or pytest.fail(
            f"{results['Version']}"),
    }
    assert set(checks) == set(results), f"panels without an expectation here: {set(results) ^ set(checks)}"
    for title, check in checks.items():
        try:
            assert check() is not False, "out of range"
        except (AssertionError, KeyError) as exc:
            pytest.fail(f"panel {title!r}: {exc!r}; answers {results[title]}")

    # The recording rules the dashboard reads, and the others, answer too: ratios within [0, 1].
    check_recording_rules(prometheus, recording_rules(cluster=False))
    # A single daemon is not a cluster: no cluster alert's expression answers (its panels are tested below).
    assert len(cluster_alerts()) >= 3
    for name, expr in cluster_alerts().items():
        assert prometheus.query(expr) == [], f"{name} would fire on a single daemon"


def check_recording_rules(prometheus: Prometheus, rules: list[dict[str, Any]]) -> None:
    assert rules
    for rule in rules:
        samples = prometheus.query(rule["record"])
        assert samples, f"recording rule {rule['record']}: no data"
        for _, value in samples:
            assert math.isfinite(value) and value >= 0, (rule["record"], samples)
            if "ratio" in rule["record"]:
                assert value <= 1, (rule["record"], samples)


# --- live: a real 3-node cluster -----------------------------------------------------------------

CLUSTER_SETTINGS = {"peer_probe_seconds": 0.2, "peer_timeout_seconds": 0.3, "repair_interval_seconds": 0.5,
                    "scrub_bytes_per_second": 0}
CLUSTER_DIM = 16
FROZEN = 2  # the member frozen in each round: peer "n2"


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)




class ClusterTraffic:
    """Puts, lookups and fetches through every member of a cluster, each node's remote fetches (of entries
    it does not hold) counted, and rounds of Gathers missed by a frozen member."""

    def __init__(self, cluster: DaemonCluster) -> None:
        self.cluster = cluster
        self.clients = [connect(t) for t in cluster.targets]
        self.rng = np.random.default_rng(11)
        self.entries: list[tuple[str, np.ndarray]] = []
        self.blob_bytes = 0  # the latents' bytes, as the client sends them uncompressed

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def put(self, through: int) -> None:
        v = self.rng.standard_normal(CLUSTER_DIM).astype(np.float32)
        v /= np.linalg.norm(v)
        latent = self.rng.standard_normal((4, 2, 8, 8)).astype(np.float32)
        eid = self.clients[through].put(f"cluster prompt {len(self.entries)}", latent, v, seed=len(self.entries))
        assert eid is not None, "a put failed"
        self.entries.append((eid, v))
        self.blob_bytes += latent.nbytes

    def remote(self, node: int) -> list[str]:
        """The entries `node` does not hold: its fetches of them wait on a peer."""
        ids = [eid for eid, _ in self.entries]
        return [eid for eid in ids if eid not in self.cluster.members[node].held(ids)]

    def round(self) -> None:
        """Puts through every node (until each lacks an entry), then each entry looked up through every
        node, and fetched through every node that does not hold it."""
        for i in range(30):
            self.put(i % 3)
            if i >= 2 and all(self.remote(n) for n in range(3)):
                break
        for n, client in enumerate(self.clients):
            for eid, v in self.entries:
                found = client.lookup(v)
                assert found is not None and found.best is not None and found.best.entry_id == eid
            remote = self.remote(n)
            assert remote, f"n{n} holds every entry: no fetch of it waits on a peer"
            for eid in remote:
                assert self.clients[n].fetch(eid) is not None

    def freeze(self) -> None:
        """SIGSTOP one member and look up through the others until each has counted a Gather it missed
        (it is down, and no longer asked, after two missed probes), then SIGCONT it and wait until every
        node sees it serving again."""
        nodes = self.cluster.members
        others = [n for n in range(3) if n != FROZEN]

        def missed(n: int) -> float:
            return metric(nodes[n], "flexcache_cluster_peer_errors_total", peer=f"n{FROZEN}", method="Gather")

        before = {n: missed(n) for n in others}
        self.cluster.pause(FROZEN)
        try:
            deadline = time.monotonic() + 10
            while not all(missed(n) > before[n] for n in others):
                assert time.monotonic() < deadline, "no Gather to the frozen member was missed"
                for n in others:
                    assert self.clients[n].lookup(self.entries[0][1]) is not None
        finally:
            self.cluster.resume(FROZEN)
        poll(lambda: all(metric(n, "flexcache_cluster_members", state="serving") == 3 for n in nodes), 10,
             "every node sees 3 serving members again")


def test_cluster_panels_answer_from_a_real_prometheus(tmp_path: Path, start_prometheus) -> None:
    assert [p["title"] for p in CLUSTER_PANELS] == [
        "Cluster members by state", "Under-replicated entries", "Replication bytes by reason",
        "Lookup and Fetch fan-out", "Peer errors by peer"]
    with DaemonCluster(tmp_path / "cluster", 3, **CLUSTER_SETTINGS) as cluster:
        nodes = cluster.members
        poll(lambda: all(metric(n, "flexcache_cluster_members", state="serving") == 3 for n in nodes), 10,
             "every node sees 3 serving members")
        instances = {f"127.0.0.1:{n.metrics_port}" for n in nodes}
        prometheus = start_prometheus(sorted(instances))
        traffic = ClusterTraffic(cluster)
        try:
            # Round 1 makes every series (a counter's first sample is where rate() starts counting), while
            # Prometheus gets to its first scrapes (about 5 s after it starts); round 2, once Prometheus has
            # them all, is what the rates see.
            traffic.round()
            traffic.freeze()
            prometheus.wait_for(
                'count(flexcache_cluster_fanout_seconds_count{method="Lookup"}) == 3'
                ' and count(flexcache_cluster_fanout_seconds_count{method="Fetch"}) == 3'
                ' and count(flexcache_cluster_replication_bytes_total{reason="put"}) == 3'
                f' and count(flexcache_cluster_peer_errors_total{{peer="n{FROZEN}", method="Gather"}}) == 2', bool)
            first = len(traffic.entries)
            traffic.round()
            traffic.freeze()
        finally:
            traffic.close()
        round_two = traffic.blob_bytes * (len(traffic.entries) - first) / len(traffic.entries)
        # Prometheus has scraped every node back to 3 serving members, and the rules have seen round 2.
        prometheus.wait_for(
            'count(flexcache_cluster_members{state="serving"} == 3) == 3'
            ' and count(flexcache:cluster_fanout_seconds:p99_rate5m{method="Lookup"} > 0) == 3'
            ' and count(flexcache:cluster_fanout_seconds:p99_rate5m{method="Fetch"} > 0) == 3'
            ' and count(flexcache:cluster_replication_bytes:rate5m{reason="put"} > 0) == 3'
            f' and count(flexcache:cluster_peer_errors:rate5m{{peer="n{FROZEN}", method="Gather"}} > 0) == 2', bool)

        results: dict[str, list[list[tuple[dict[str, str], float]]]] = {}
        for panel in CLUSTER_PANELS:
            answers = []
            for target in panel["targets"]:
                expr = substitute(target["expr"], window=f"{WINDOW:.0f}s")
                samples = prometheus.query(expr)
                assert samples, f"{panel['title']}: no data from {expr}"
                assert all(math.isfinite(v) and v >= 0 for _, v in samples), f"{panel['title']}: {expr} -> {samples}"
                answers.append(samples)
            results[panel["title"]] = answers

        def by(title: str, *labels: str, target: int = 0) -> dict[tuple[str, ...], float]:
            return {tuple(s.get(label, "") for label in labels): v for s, v in results[title][target]}

        members = by("Cluster members by state", "instance", "state")
        assert set(members) == {(i, s) for i in instances for s in ("serving", "draining", "joining", "down")}
        for instance in instances:
            assert members[instance, "serving"] == 3 and sum(v for (i, _), v in members.items() if i == instance) == 3
        under = by("Under-replicated entries", "instance")
        assert set(under) == {(i,) for i in instances} and all(v == int(v) for v in under.values()), under
        sent = by("Replication bytes by reason", "reason")
        # Each put sends one or two copies (R = 2 of 3 nodes: two when it reached a non-owner).
        assert round_two / 2 <= sent["put",] * WINDOW <= 3 * traffic.blob_bytes, (sent, round_two)
        assert set(sent) <= {("put",), ("repair",), ("handoff",)}, sent
        for target in range(3):  # Lookup p50, Lookup p99, Fetch p99: every node's, under a second
            waits = by("Lookup and Fetch fan-out", "instance", target=target)
            assert set(waits) == {(i,) for i in instances} and all(0 < v < 1 for v in waits.values()), waits
        errors = by("Peer errors by peer", "peer", "method")
        assert errors[f"n{FROZEN}", "Gather"] > 0, errors

        check_recording_rules(prometheus, recording_rules(cluster=True))
        # A healthy cluster again: no member down, every node counting the same serving members.
        for name in ("FlexCacheClusterMemberDown", "FlexCacheClusterSplitView"):
            assert prometheus.query(cluster_alerts()[name]) == [], name
