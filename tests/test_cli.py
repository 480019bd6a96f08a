"""`flexcache` as an operator meets it: the real command in a child process, its exit code and its words.

- `--version` names the installed distribution;
- a daemon that cannot start because an address or the data folder is taken says so in one sentence
  and exits 1, without a traceback or gRPC's C-core log line;
- server reflection answers as grpc.reflection.v1 and v1alpha;
- FLEXCACHE_CONFIG names the YAML file like `--config`;
- the env vars Kubernetes injects for a Service named flexcache do not stop the daemon.
"""

from __future__ import annotations

import importlib.metadata
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache_model.reference.world import _articles
from tests.conftest import CLI, clean_env, run_cli

SERVICES = {"flexcache.v1.CacheService", "grpc.health.v1.Health"}






def assert_one_sentence(result: subprocess.CompletedProcess, sentence: str) -> None:
    """Exit 1, and stderr is that sentence alone: no traceback, no gRPC log line, no other line."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == sentence, result.stderr


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Factory: serve(*flags, env=...) runs `flexcache serve` with exactly that environment (DaemonProcess
    strips FLEXCACHE_*), waits for its port file and returns (process, ports, log path)."""
    started: list[subprocess.Popen] = []

    def start(*flags: str, env: dict[str, str], name: str = "env") -> tuple[subprocess.Popen, dict, Path]:
        port_file, log = tmp_path / f"{name}.ports.json", tmp_path / f"{name}.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen([*CLI, "serve", "--data-dir", str(tmp_path / name), "--listen", "127.0.0.1:0",
                                     "--metrics-listen", "", "--port-file", str(port_file), *flags],
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        started.append(proc)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, f"daemon exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no port file:\n{log.read_text()}"
            time.sleep(0.05)
        return proc, json.loads(port_file.read_text()), log

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def stats(port: int) -> pb.StatsResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.CacheServiceStub(channel).Stats(pb.StatsRequest(), timeout=30, wait_for_ready=True)


# ----------------------------------------------------------------------------- --version
def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flexcache {importlib.metadata.version('flexcache')}"


# ----------------------------------------------------------------------------- taken addresses and folder
def test_grpc_port_in_use(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path / "second"), "--listen", daemon.target,
                     "--metrics-listen", "", "--data-listen", "")
    assert_one_sentence(result, f"flexcache serve: cannot listen on {daemon.target}: the address is in use "
                                "(is another daemon running?)")


def test_data_port_in_use(daemon: DaemonProcess, tmp_path: Path) -> None:
    taken = f"127.0.0.1:{daemon.data_port}"
    result = run_cli("serve", "--data-dir", str(tmp_path / "second"), "--listen", "127.0.0.1:0",
                     "--metrics-listen", "", "--data-listen", taken)
    assert_one_sentence(result, f"flexcache serve: cannot listen on {taken} (data port): the address is in use "
                                "(is another daemon running?)")


def test_metrics_port_in_use(daemon: DaemonProcess, tmp_path: Path) -> None:
    taken = f"127.0.0.1:{daemon.metrics_port}"
    result = run_cli("serve", "--data-dir", str(tmp_path / "second"), "--listen", "127.0.0.1:0",
                     "--metrics-listen", taken)
    assert_one_sentence(result, f"flexcache serve: cannot listen on {taken} (metrics): the address is in use "
                                "(is another daemon running?)")


def test_port_held_by_another_program(tmp_path: Path) -> None:
    with socket.socket() as holder:  # not a daemon: any listener on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        result = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--listen", taken, "--metrics-listen", "")
    assert_one_sentence(result, f"flexcache serve: cannot listen on {taken}: the address is in use "
                                "(is another daemon running?)")


def test_data_folder_in_use(daemon: DaemonProcess) -> None:
    result = run_cli("serve", "--data-dir", str(daemon.data_dir), "--listen", "127.0.0.1:0",
                     "--metrics-listen", "")
    assert_one_sentence(result, f"flexcache serve: the data folder {daemon.data_dir} is in use by another daemon "
                                f"(RocksDB lock held: {daemon.data_dir / 'store' / 'LOCK'})")
    assert daemon.stats().entries == 0  # the first daemon is unharmed


# ----------------------------------------------------------------------------- reflection
def reflect(channel: grpc.Channel, version: str, requests: list,
            request_type: type = reflection_pb2.ServerReflectionRequest,
            response_type: type = reflection_pb2.ServerReflectionResponse) -> list:
    """One ServerReflectionInfo stream to grpc.reflection.<version>: the answers to `requests`."""
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=request_type.SerializeToString,
                                 response_deserializer=response_type.FromString)
    return list(call(iter(requests), timeout=10))


def test_reflection_v1_and_v1alpha(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        for version in ("v1", "v1alpha"):
            # v1alpha's messages are v1's on the wire (same fields, same numbers): a real v1 call.
            (listed,) = reflect(channel, version, [reflection_pb2.ServerReflectionRequest(list_services="")])
            names = {s.name for s in listed.list_services_response.service}
            assert names >= SERVICES | {"grpc.reflection.v1.ServerReflection",
                                        "grpc.reflection.v1alpha.ServerReflection"}, (version, names)
            (cache,) = reflect(channel, version, [reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="flexcache.v1.CacheService")])
            files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                     for raw in cache.file_descriptor_response.file_descriptor_proto]
            assert "CacheService" in {s.name for f in files for s in f.service}

        # v1 describes itself; messages built from that description alone make a v1 call too.
        (own,) = reflect(channel, "v1", [reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection")])
        (v1_file,) = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                      for raw in own.file_descriptor_response.file_descriptor_proto]
        assert (v1_file.name, v1_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(v1_file.SerializeToString())
        request, response = (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
                             for n in ("ServerReflectionRequest", "ServerReflectionResponse"))
        (listed,) = reflect(channel, "v1", [request(list_services="")], request, response)
        assert {s.name for s in listed.list_services_response.service} >= SERVICES


# ----------------------------------------------------------------------------- environment
def test_flexcache_config_names_the_yaml_file(serve, tmp_path: Path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text("eviction_policy: lru\nmax_bytes: 64MiB\n")
    _, ports, _ = serve(env=clean_env(FLEXCACHE_CONFIG=str(settings)))
    answer = stats(ports["grpc"])
    assert (answer.eviction_policy, answer.max_bytes) == ("lru", 64 << 20)

    bad = tmp_path / "bad.yaml"
    bad.write_text("evict_policy: lru\n")
    result = run_cli("serve", env=clean_env(FLEXCACHE_CONFIG=str(bad)))
    assert result.returncode == 2 and result.stderr.strip() == "flexcache serve: config file: unknown setting " \
                                                                "'evict_policy'"
    result = run_cli("serve", "--config", str(tmp_path / "missing.yaml"), env=clean_env(FLEXCACHE_CONFIG=str(bad)))
    assert result.returncode == 2 and "cannot read config file" in result.stderr  # the flag wins


def test_kubernetes_service_links_do_not_stop_the_daemon(serve) -> None:
    links = {  # what a pod gets for a Service named flexcache with ports grpc 50051 and data 50052
        "FLEXCACHE_SERVICE_HOST": "10.96.0.12", "FLEXCACHE_SERVICE_PORT": "50051",
        "FLEXCACHE_SERVICE_PORT_GRPC": "50051", "FLEXCACHE_SERVICE_PORT_DATA": "50052",
        "FLEXCACHE_PORT": "tcp://10.96.0.12:50051", "FLEXCACHE_PORT_50051_TCP": "tcp://10.96.0.12:50051",
        "FLEXCACHE_PORT_50051_TCP_PROTO": "tcp", "FLEXCACHE_PORT_50051_TCP_PORT": "50051",
        "FLEXCACHE_PORT_50051_TCP_ADDR": "10.96.0.12", "FLEXCACHE_PORT_50052_TCP": "tcp://10.96.0.12:50052",
    }
    proc, ports, log = serve("--log-level", "DEBUG", env=clean_env(**links, FLEXCACHE_WORKERS="3"))
    assert stats(ports["grpc"]).entries == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    text = log.read_text()
    assert f"ignoring Kubernetes service-link variables (not settings): {', '.join(sorted(links))}" in text
    assert "Traceback" not in text

    result = run_cli("serve", env=clean_env(**links, FLEXCACHE_METRICS_PORT="9464"))  # a typo is still one
    assert result.returncode == 2
    assert result.stderr.strip() == "flexcache serve: environment: unknown setting FLEXCACHE_METRICS_PORT"


# ----------------------------------------------------------------------------- captions
@pytest.mark.parametrize(("text", "expected"), [
    ("a uniform blue background", "a uniform blue background"),
    ("a unicorn and a university", "a unicorn and a university"),
    ("a user, a utility, a euro, a one-way street", "a user, a utility, a euro, a one-way street"),
    ("a orange backdrop", "an orange backdrop"),
    ("a unusual, a unimportant, a umbrella, a urban", "an unusual, an unimportant, an umbrella, an urban"),
    ("a red square and a orange circle", "a red square and an orange circle"),
])
def test_caption_articles_follow_the_sound(text: str, expected: str) -> None:
    assert _articles(text) == expected
