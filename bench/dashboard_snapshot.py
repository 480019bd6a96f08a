"""A stand-in picture of the Grafana dashboard (deploy/grafana/flexcache.json), plotted with matplotlib
from a real Prometheus: no Grafana is installed here.

    .venv/bin/python -m bench.dashboard_snapshot            # writes docs/img/dashboard.png (about a minute)
    .venv/bin/python -m bench.dashboard_snapshot --seconds 30 --out /tmp/dashboard.png

It starts a daemon (a small byte budget, so that it evicts) and a Prometheus (the Debian package's
/usr/bin/prometheus, scraping every second, with deploy/prometheus/recording.rules.yml when it
exists), drives a few rounds of traffic (puts, whole-prompt, composed and partial hits, misses, a bad
request, a refused Verify), then asks Prometheus for every dashboard panel's queries over the run
(query_range, with the dashboard's variables filled in: every instance, every namespace) and draws one
subplot per panel, in the dashboard's order. Both processes are stopped at the end.

The pieces the test of the dashboard also uses (tests/test_dashboard.py) live here: `Prometheus`,
`panels`, `substitute` and `Traffic`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from flexcache.client import CacheClient, Namespace
from flexcache.daemon.process import DaemonProcess, free_port
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "flexcache.json"
RECORDING_RULES = ROOT / "deploy" / "prometheus" / "recording.rules.yml"
PROMETHEUS = "/usr/bin/prometheus"
DIM = 384
GRID = (3, 12, 16)  # the latent grid of the entries Traffic stores: T, H, W
NAMESPACE = Namespace(tenant="acme", model="wan2.1-t2v-1.3b", width=832, height=480, frames=81, scheduler="flow",
                      total_steps=50)


# --- the dashboard -----------------------------------------------------------------------------


def panels(path: Path = DASHBOARD) -> list[dict[str, Any]]:
    """Every panel that draws something (rows left out, the panels of collapsed rows included), in order."""
    found = []
    for panel in json.loads(path.read_text())["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def substitute(expr: str, *, window: str, instance: str = ".*", namespace: str = ".*") -> str:
    """A panel's PromQL as Grafana would send it, the variables filled in: `window` for $__rate_interval,
    $__interval and $__range (the panel's whole range), regexes for $instance and $namespace."""
    for name in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(name, window)
    return expr.replace("$instance", instance).replace("$namespace", namespace)


# --- a real Prometheus -------------------------------------------------------------------------


class Prometheus:
    """/usr/bin/prometheus on a loopback port with its own config and temporary storage, scraping
    `targets` every second (and evaluating the recording rules, when deploy/prometheus has them, every
    second). A context manager: the process is stopped and its folder removed at exit, whatever happened."""

    def __init__(self, targets: list[str], folder: Path | None = None, binary: str = PROMETHEUS):
        self.targets, self.binary = targets, binary
        self._own_folder = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="flexcache-prometheus-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        rules = f"rule_files: [{json.dumps(str(RECORDING_RULES))}]\n" if RECORDING_RULES.is_file() else ""
        return ("global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n" + rules +
                "scrape_configs:\n  - job_name: flexcache\n"
                f"    static_configs: [{{targets: {json.dumps(self.targets)}}}]\n")

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "prometheus.yml").write_text(self.config())
        self.port = free_port()
        log = (self.folder / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready within {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        path = self.folder / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, **params: object) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise ValueError(f"prometheus refused {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's samples now: (labels, value) each."""
        data = self.api("query", query=expr, time=f"{time.time():.3f}")
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[tuple[dict[str, str],
                                                                                        np.ndarray, np.ndarray]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return [(r["metric"], np.array([float(t) for t, _ in r["values"]]),
                 np.array([float(v) for _, v in r["values"]])) for r in data["result"]]

    def wait_for(self, expr: str, until: Any, timeout: float = 15.0) -> list[tuple[dict[str, str], float]]:
        """Poll an instant query until `until(samples)` is true."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if until(samples):
                return samples
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr}: still {samples} after {timeout} s")
            time.sleep(0.2)


# --- traffic with the client's own count -------------------------------------------------------


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(base: np.ndarray, similarity: float, seed: int) -> np.ndarray:
    """A unit vector at cosine `similarity` to `base`."""
    other = unit(seed)
    other -= other.dot(base) * base
    other /= np.linalg.norm(other)
    return (similarity * base + math.sqrt(1 - similarity**2) * other).astype(np.float32)


@dataclass
class Traffic:
    """Drives one daemon through a CacheClient and counts, as the client sees them, each lookup's result
    (hit, composed, partial, miss: from the candidates it was answered), the steps granted and the GPU
    seconds saved by what it fetched (granted steps x the step_seconds the entry was stored with)."""

    client: CacheClient
    daemon: DaemonProcess
    step_seconds: float = 0.5
    latent_kib: int = 640
    lookups: Counter = field(default_factory=Counter)
    steps: int = 0
    gpu_seconds: float = 0.0
    puts: int = 0
    _seed: int = 1000
    _entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def _next(self) -> int:
        self._seed += 1
        return self._seed

    def put(self) -> None:
        """One entry with object and background vectors and an object mask (a donor for composed and
        partial hits); its latent is random (incompressible), latent_kib KiB."""
        vector, obj, bg = unit(self._next()), unit(self._next()), unit(self._next())
        channels = max(1, self.latent_kib * 1024 // (4 * math.prod(GRID)))
        latent = np.random.default_rng(self._seed).standard_normal((channels, *GRID)).astype(np.float32)
        mask = np.zeros(GRID, bool)
        mask[:, 3:8, 4:10] = True
        entry = self.client.put(f"prompt {self._seed}", latent, vector, object_vector=obj, background_vector=bg,
                                object_mask=mask, seed=self._seed, step_seconds=self.step_seconds)
        assert entry is not None, "the daemon refused a put"
        self.puts += 1
        self._entries.append((vector, obj, bg))

    def _lookup(self, vector: np.ndarray, obj: np.ndarray | None = None, bg: np.ndarray | None = None,
                partial: tuple[str, ...] = ()) -> str:
        result = self.client.lookup(vector, object_vector=obj, background_vector=bg, top_k=1, partial_roles=partial)
        assert result is not None, "a lookup failed"
        roles = {c.role for c in result.candidates}
        kind = ("hit" if "full" in roles else "composed" if roles == {"object", "background"} else
                "partial" if roles else "miss")
        self.lookups[kind] += 1
        for candidate in result.candidates[:1] if kind in ("hit", "partial") else result.candidates:
            fetched = self.client.fetch(candidate.entry_id, role=candidate.role,
                                        granted_steps=candidate.granted_steps)
            if fetched is not None:
                self.steps += candidate.granted_steps
                self.gpu_seconds += candidate.granted_steps * self.step_seconds
        return kind

    def hit(self) -> str:
        vector, _, _ = self._entries[-1]
        return self._lookup(near(vector, 0.99, self._next()))

    def composed(self) -> str:
        (_, obj, _), (_, _, bg) = self._entries[-1], self._entries[-2]
        return self._lookup(unit(self._next()), near(obj, 0.97, self._next()), near(bg, 0.95, self._next()))

    def partial(self) -> str:
        _, obj, _ = self._entries[-1]
        return self._lookup(unit(self._next()), near(obj, 0.97, self._next()), unit(self._next()),
                            partial=("object",))

    def miss(self) -> str:
        return self._lookup(unit(self._next()))

    def errors(self) -> None:
        """A bad request (a lookup vector of the wrong dimension: INVALID_ARGUMENT), a fetch of an entry the
        daemon does not hold (NOT_FOUND), and two Verify calls of the newest entry, the second of which
        is past verify_bytes_per_second when the daemon runs with a budget below two entries' bytes
        (RESOURCE_EXHAUSTED, a refused call)."""
        ns = self.client.namespace.to_proto()
        with grpc.insecure_channel(self.daemon.target) as channel:
            stub = pb_grpc.CacheServiceStub(channel)
            calls = [lambda: stub.Lookup(pb.LookupRequest(namespace=ns, vectors=pb.Vectors(full=[1.0, 0.0, 0.0]),
                                                          top_k=1), timeout=5),
                     lambda: stub.FetchDirect(pb.FetchRequest(namespace=ns, entry_id="0" * 64), timeout=5)]
            newest = self.client.lookup(self._entries[-1][0], top_k=1)
            if newest is not None and newest.best is not None:
                verify = pb.VerifyRequest(namespace=ns, entry_id=newest.best.entry_id)
                calls += [lambda: stub.Verify(verify, timeout=5)] * 2
            for call in calls:
                with contextlib.suppress(grpc.RpcError):
                    call()


def drive(traffic: Traffic, rounds: int, pause: float = 0.0) -> None:
    """Rounds of: two puts, three hits, a composed hit, a partial hit, two misses; errors every third round."""
    for i in range(rounds):
        traffic.put()
        traffic.put()
        for _ in range(3):
            traffic.hit()
        traffic.composed()
        traffic.partial()
        traffic.miss()
        traffic.miss()
        if i % 3 == 2:
            traffic.errors()
        time.sleep(pause)


DAEMON_SETTINGS = {"max_bytes": "4MiB", "verify_bytes_per_second": "1MiB", "eviction_policy": "lru"}


# --- the picture -------------------------------------------------------------------------------


def plot(prometheus: Prometheus, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels()
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, shown, strict=False):
        unit_name = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        scale, suffix = {"bytes": (2**20, " MiB"), "percentunit": (0.01, " %"), "s": (1e-3, " ms")}.get(
            unit_name, (1, ""))
        for target in panel["targets"]:
            window = "15s" if panel["type"] != "stat" or "$__range" not in target["expr"] else f"{end - start:.0f}s"
            expr = substitute(target["expr"], window=window)
            for labels, t, v in prometheus.query_range(expr, start, end, step):
                legend = target.get("legendFormat", "")
                for key, value in labels.items():
                    legend = legend.replace("{{" + key + "}}", value)
                ax.plot(t - start, v / scale, label=legend[:40] or None, linewidth=1.2)
        ax.set_title(panel["title"] + ("  (stat)" if panel["type"] == "stat" else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        if suffix:
            ax.set_ylabel(suffix.strip(), fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("FlexCache dashboard queries from a real Prometheus 2.42 (a stand-in for Grafana; x: seconds)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to drive traffic")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    if not os.access(PROMETHEUS, os.X_OK):
        raise SystemExit(f"{PROMETHEUS} is missing: apt-get install prometheus")
    folder = Path(tempfile.mkdtemp(prefix="flexcache-snapshot-"))
    try:
        with (DaemonProcess(folder / "data", **DAEMON_SETTINGS) as daemon,
              Prometheus([f"127.0.0.1:{daemon.metrics_port}"], folder / "prometheus") as prometheus):
            prometheus.wait_for("up", lambda s: s and s[0][1] == 1)
            start = time.time()
            with CacheClient(daemon.target, NAMESPACE, timeout_s=5.0, max_rel_error=0.0) as client:
                traffic = Traffic(client, daemon)
                rounds = 0
                while time.time() - start < args.seconds:
                    drive(traffic, 1, pause=0.3 + 0.7 * (rounds % 5 == 0))
                    if rounds % 3 == 2:
                        traffic.errors()
                    rounds += 1
            time.sleep(3)  # the last scrapes
            plot(prometheus, start, time.time(), args.out)
            print(f"{rounds} rounds; the client counted {dict(traffic.lookups)} lookups, {traffic.steps} steps")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
