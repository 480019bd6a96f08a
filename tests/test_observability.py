"""Issue 19's daemon metrics, read from a real daemon's /metrics endpoint: GPU seconds saved, the age
of evicted entries, build info and the standard process series."""

from __future__ import annotations

import platform
import urllib.request

import numpy as np
import pytest

from flexcache.daemon.metrics import Metrics
from flexcache.daemon.version import version
from tests.conftest import connect, metric
from tests.vectors import unit

KIB = 1024
NS = "acme/wan2.1-t2v-1.3b/832x480x81/flow/50"


def test_gpu_seconds_saved_counts_measured_entries_only(daemon) -> None:
    with connect(daemon.target) as c:
        measured = c.put("measured", np.ones(64, np.float32), unit(1), step_seconds=0.5)
        unknown = c.put("unknown", np.ones(64, np.float32), unit(2))  # step_seconds 0: not measured
        assert c.fetch(measured, role="full", granted_steps=20) is not None
        assert c.fetch(measured, role="object", granted_steps=10) is not None  # half the credit: 0.5 x 10 x 0.5
        assert c.fetch(unknown, role="full", granted_steps=30) is not None
    assert metric(daemon, "flexcache_gpu_seconds_saved_total", namespace=NS, role="full") == pytest.approx(10.0)
    assert metric(daemon, "flexcache_gpu_seconds_saved_total", namespace=NS, role="object") == pytest.approx(2.5)
    assert metric(daemon, "flexcache_steps_granted_total", namespace=NS, role="full") == 50  # both entries


def test_evicted_entry_age_is_observed(start_daemon) -> None:
    daemon = start_daemon(max_bytes="3MiB", eviction_policy="lru")
    with connect(daemon.target) as c:
        for i in range(20):
            assert c.put(f"p{i}", np.random.default_rng(i).integers(0, 255, 256 * KIB, dtype=np.uint8), unit(i))
        evictions = c.stats().evictions
    assert evictions > 0
    assert metric(daemon, "flexcache_evicted_entry_age_seconds_count", policy="lru") == evictions
    # All were stored seconds ago: every one is in the 5-minute bucket the thrash alert reads.
    assert metric(daemon, "flexcache_evicted_entry_age_seconds_bucket", policy="lru", le="300.0") == evictions


def test_build_info_and_process_metrics(daemon) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    assert f'flexcache_build_info{{python="{platform.python_version()}",version="{version()}"}} 1.0' in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info"):
        assert metric(daemon, name) > 0, name
    # Every family the endpoint serves is described (the README table), and every described one is served.
    served = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    described = {name for name, kind, _, _ in Metrics().described}
    counters = {name.removesuffix("_total") for name, kind, _, _ in Metrics().described if kind == "counter"}
    assert served <= described | counters
    assert {n.removesuffix("_total") for n in described} <= {n.removesuffix("_total") for n in served}
