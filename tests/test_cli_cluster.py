"""The operator's cluster verbs as a probe or a script meets them: `flexcache health`, `drain` and
`backup`, the real command in a child process, its exit code and its words.

- health: exit 0 and one line when SERVING (the daemon, or a named service); exit 1 and one line when
  not, when the service is unknown, or when nothing listens (a Kubernetes exec readiness probe);
- drain: asks again once a second until the node holds no entry (exit 0), or exit 1 once --wait has
  passed; against a node this test serves itself (NodeService.Drain's answers scripted);
- drain of a daemon outside a cluster, drain and backup against a dead target: one sentence, exit 1;
  bad flags: exit 2.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme

from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import node_pb2, node_pb2_grpc
from tests.conftest import assert_one_line, run_cli
from tests.test_security import write_server_cert


@pytest.fixture
def dead_target() -> str:
    """A loopback address nobody listens on (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ----------------------------------------------------------------------------- health
def test_health_of_a_serving_daemon(daemon: DaemonProcess) -> None:
    result = run_cli("health", "--target", daemon.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{daemon.target}: SERVING" and result.stderr == ""
    result = run_cli("health", "--target", daemon.target, "--service", "flexcache.v1.CacheService")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{daemon.target} flexcache.v1.CacheService: SERVING"
    unknown = run_cli("health", "--target", daemon.target, "--service", "no.such.Service")
    assert_one_line(unknown, 1, f"flexcache health: {daemon.target}: NOT_FOUND")


def test_health_with_nothing_listening(dead_target: str) -> None:
    start = time.monotonic()
    result = run_cli("health", "--target", dead_target)
    assert_one_line(result, 1, f"flexcache health: {dead_target}: UNAVAILABLE")
    assert result.stdout == ""
    assert time.monotonic() - start < 30  # a probe answers within its deadline, it does not hang

    result = run_cli("health", "--target", dead_target, "--timeout", "0")
    assert_one_line(result, 2, "flexcache health: --timeout must be a positive number of seconds")


def test_health_over_tls(start_daemon, tmp_path: Path) -> None:
    """On a TLS port (where the kubelet's own gRPC probe cannot go) the exec probe trusts the CA it names."""
    tls_dir = tmp_path / "tls"
    write_server_cert(tls_dir, trustme.CA())
    daemon = start_daemon(trust_ca=tls_dir / "ca.pem", tls_cert_file=tls_dir / "server.pem",
                          tls_key_file=tls_dir / "server.key")
    result = run_cli("health", "--target", daemon.target, "--tls-ca-file", str(tls_dir / "ca.pem"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{daemon.target}: SERVING"
    plain = run_cli("health", "--target", daemon.target)  # plain text to a TLS port: no answer
    assert_one_line(plain, 1, f"flexcache health: {daemon.target}: UNAVAILABLE")


def test_health_reports_not_serving() -> None:
    """A health service that says NOT_SERVING (a daemon still opening its store, or draining): exit 1."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run_cli("health", "--target", f"127.0.0.1:{port}")
        assert result.returncode == 1, result.stderr
        assert result.stdout.strip() == f"127.0.0.1:{port}: NOT_SERVING"
    finally:
        server.stop(None)


# ----------------------------------------------------------------------------- drain
class ScriptedNode(node_pb2_grpc.NodeServiceServicer):
    """Drain answers `counts` in turn, then the last one again and again; records the token it got."""

    def __init__(self, counts: list[int]):
        self.counts = counts
        self.calls = 0
        self.tokens: list[str] = []
        self._lock = threading.Lock()

    def Drain(self, request: node_pb2.DrainRequest, context: grpc.ServicerContext) -> node_pb2.DrainResponse:
        with self._lock:
            entries = self.counts[min(self.calls, len(self.counts) - 1)]
            self.calls += 1
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        return node_pb2.DrainResponse(state=node_pb2.NODE_DRAINING, entries=entries)


@pytest.fixture
def scripted_node() -> Iterator:
    servers = []

    def start(counts: list[int]) -> tuple[str, ScriptedNode]:
        node = ScriptedNode(counts)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        node_pb2_grpc.add_NodeServiceServicer_to_server(node, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", node

    yield start
    for server in servers:
        server.stop(None)


def test_drain_waits_until_the_node_holds_nothing(scripted_node) -> None:
    target, node = scripted_node([30, 12, 0])
    result = run_cli("drain", "--target", target, "--wait", "30", "--token", "s3cret")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [f"{target}: NODE_DRAINING: 30 entries left",
                                                  f"{target}: NODE_DRAINING: 12 entries left",
                                                  f"{target}: NODE_DRAINING: drained, no entries left"]
    assert node.calls == 3 and set(node.tokens) == {"Bearer s3cret"}


def test_drain_that_runs_out_of_time(scripted_node) -> None:
    target, node = scripted_node([5])
    start = time.monotonic()
    result = run_cli("drain", "--target", target, "--wait", "2")
    took = time.monotonic() - start
    line = assert_one_line(result, 1, f"flexcache drain: {target}: not drained after 2 s")
    assert line.endswith("5 entries still on the node")
    assert 2 <= node.calls <= 4 and took < 20  # once a second, for two seconds
    assert result.stdout.strip().splitlines()[-1] == f"{target}: NODE_DRAINING: 5 entries left"

    once = run_cli("drain", "--target", target)  # --wait 0: ask once, say where it stands
    assert_one_line(once, 1, f"flexcache drain: {target}: not drained: 5 entries still on the node")
    assert once.stdout.strip() == f"{target}: NODE_DRAINING: 5 entries left"


def test_drain_and_backup_against_a_dead_target(dead_target: str) -> None:
    assert_one_line(run_cli("drain", "--target", dead_target), 1, f"flexcache drain: {dead_target}: UNAVAILABLE")
    assert_one_line(run_cli("drain", "--target", dead_target, "--wait", "5"), 1,
                    f"flexcache drain: {dead_target}: UNAVAILABLE")
    assert_one_line(run_cli("backup", "--target", dead_target, "--path", "/tmp/never-written"), 1,
                    f"flexcache backup: {dead_target}: UNAVAILABLE")
    assert not os.path.exists("/tmp/never-written")


def test_drain_of_a_daemon_outside_a_cluster(daemon: DaemonProcess) -> None:
    """A daemon with no peers has nowhere to drain to: it says so, in one line, exit 1."""
    result = run_cli("drain", "--target", daemon.target, "--wait", "5")
    line = assert_one_line(result, 1, f"flexcache drain: {daemon.target}: ")
    assert "UNIMPLEMENTED" not in line, "NodeService.Drain is not served"
    assert "FAILED_PRECONDITION" in line and "not in a cluster" in line


def test_bad_usage_exits_2() -> None:
    assert_one_line(run_cli("drain", "--wait", "-1"), 2, "flexcache drain: --wait must be 0 or a positive number")
    result = run_cli("backup", "--target", "127.0.0.1:1")  # --path is required
    assert result.returncode == 2 and "--path" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("restore", "--data-dir", "/tmp/x")  # --from is required
    assert result.returncode == 2 and "--from" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("health", "--tls-cert-file", "/no/such/cert.pem")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("flexcache health: ")
