"""Fixtures that run the real daemon as a subprocess on loopback, with real RocksDB and Qdrant Edge.

Every process a test starts is stopped at teardown, whatever the test did to it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flexcache.client import CacheClient, Namespace

NS = Namespace(tenant="acme", model="wan2.1-t2v-1.3b", width=832, height=480, frames=81, scheduler="flow",
               total_steps=50)


class DaemonProcess:
    """`flexcache serve` in a subprocess. Restartable on the same port and data folder."""

    def __init__(self, data_dir: Path, **settings: object):
        self.data_dir = data_dir
        self.settings = {"metrics_listen": "127.0.0.1:0", **settings}
        self.port = 0
        self.metrics_port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "flexcache.daemon.cli", "serve", "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{self.port}"]
        for key, value in self.settings.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        return cmd

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXCACHE_")}
        self.metrics_port = None  # a restart picks a new metrics port; the gRPC port is kept
        listening = False
        log = self.log.open("a")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"daemon exited with {self.proc.wait()}; log:\n{self.log.read_text()}")
            if m := re.match(r"flexcache listening on port (\d+)", line):
                self.port, listening = int(m.group(1)), True
            if m := re.match(r"flexcache metrics on port (\d+)", line):
                self.metrics_port = int(m.group(1))
            if listening and (self.metrics_port or not self.settings.get("metrics_listen")):
                break
        self.wait_serving(deadline - time.monotonic())
        return self

    def wait_serving(self, timeout: float) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError("daemon did not become SERVING")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: the daemon drains and exits; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc.stdout.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.running:
            self.kill()


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
        daemon.close()


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
