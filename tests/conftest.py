"""Fixtures that run the real daemon as a subprocess on loopback, with real RocksDB and Qdrant Edge
(through the launcher the benchmarks use, flexcache.daemon.process).

Every process a test starts is stopped at teardown, whatever the test did to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flexcache.client import CacheClient, Namespace
from flexcache.daemon.process import DaemonProcess
from flexcache.daemon.process import metric as scrape

NS = Namespace(tenant="acme", model="wan2.1-t2v-1.3b", width=832, height=480, frames=81, scheduler="flow",
               total_steps=50)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The free disk where the tests' daemons write. A store refuses puts below its reserve, so a
    nearly full CI disk reads here as one line rather than only as RESOURCE_EXHAUSTED failures."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    terminalreporter.write_line(f"disk: {free / 2**30:.1f} GiB free in {tempfile.gettempdir()} at the end")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    """Factory: start_daemon(**settings) -> a running DaemonProcess; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(name: str = "data", **settings: object) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / name, **settings)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.running:
            daemon.kill()


@pytest.fixture
def daemon(start_daemon) -> DaemonProcess:
    return start_daemon()


def connect(target: str, namespace: Namespace = NS, **options: object) -> CacheClient:
    """A client for tests: patient, and lossless (max_rel_error=0) so round trips compare exactly.
    Fetches go over the daemon's data port unless a test passes data_port=False."""
    return CacheClient(target, namespace, **{"timeout_s": 5.0, "max_rel_error": 0.0, **options})


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[CacheClient]:
    with connect(daemon.target) as c:
        yield c


def metric(daemon: DaemonProcess | Any, name: str, **labels: str) -> float:
    """Sum of a series' samples on the daemon's metrics endpoint whose labels include `labels` (any object
    with a metrics_port: a DaemonProcess, or an in-process Daemon)."""
    return scrape(daemon.metrics_port, name, **labels)


CLI = [sys.executable, "-m", "flexcache.daemon.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without FLEXCACHE_* (the developer's own must not leak in), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FLEXCACHE_")}, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`flexcache ARGS...` in a child process, its output captured; `env`: clean_env() by default."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env() if env is None else env)


def assert_one_line(result: subprocess.CompletedProcess, code: int, starts: str) -> str:
    """Exit `code`, stderr one line (no traceback, no gRPC log line) that starts with `starts`; the line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), result.stderr
    return lines[0]
