"""`flexcache serve` as a child process: the one launcher the tests, the benchmarks and the demo use.

It learns the ports the daemon got from the daemon's port file (`port_file`, written once it
serves) and waits for the health service to say SERVING; it never parses log lines. Every process
it starts is stopped by `close()` (or the context manager), whatever happened to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import node_pb2_grpc as npb_grpc

HAS_BATCH = 5000  # ids per NodeService.Has call (the daemon takes at most 10,000)


class DaemonProcess:
    """A daemon on loopback over `data_dir`; `settings` are `flexcache serve` settings by name.

    Restartable: `start()` after `terminate()` or `kill()` reuses the data folder and the gRPC port
    (the metrics and data ports may change). The daemon's stderr is appended to `log`. `python` is
    the interpreter whose installed flexcache runs (another virtualenv's, say); by default this one's.
    For a daemon with TLS (the tls_* settings), the launcher's own health checks and Stats trust
    `trust_ca` and present `client_cert`/`client_key` (mTLS); with auth on they send `token`."""

    def __init__(self, data_dir: Path, *, log: Path | None = None, python: str | Path = sys.executable,
                 trust_ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None,
                 token: str | None = None, port: int = 0, **settings: object):
        self.data_dir = Path(data_dir)
        self.trust_ca, self.client_cert, self.client_key, self.token = trust_ca, client_cert, client_key, token
        self.python = str(python)
        self.settings = {"metrics_listen": "127.0.0.1:0", **settings}
        self.log = log or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.port = port  # 0: the daemon picks one at its first start
        self.metrics_port: int | None = None
        self.data_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._port_file = self.data_dir.parent / f"{self.data_dir.name}.ports.json"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "flexcache.daemon.cli", "serve", "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{self.port}", "--port-file", str(self._port_file)]
        for key, value in self.settings.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        return cmd

    def start(self, timeout: float = 120.0) -> DaemonProcess:
        self.close()
        self._port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXCACHE_")}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while not self._port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; log:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"daemon wrote no port file within {timeout} s; log:\n{self.log.read_text()}")
            time.sleep(0.02)
        ports = json.loads(self._port_file.read_text())
        self.port, self.metrics_port, self.data_port = ports["grpc"], ports["metrics"], ports["data"]
        self.wait_serving(max(1.0, deadline - time.monotonic()))
        return self

    def channel(self) -> grpc.Channel:
        """A channel to the daemon as this launcher reaches it: TLS when it trusts a CA."""
        if self.trust_ca is None:
            return grpc.insecure_channel(self.target)
        key, chain = ((Path(self.client_key).read_bytes(), Path(self.client_cert).read_bytes())
                      if self.client_cert and self.client_key else (None, None))
        credentials = grpc.ssl_channel_credentials(Path(self.trust_ca).read_bytes(), key, chain)
        return grpc.secure_channel(self.target, credentials)

    def wait_serving(self, timeout: float) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError("daemon did not become SERVING")

    def stats(self, timeout: float = 10.0) -> pb.StatsResponse:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        with self.channel() as channel:
            return pb_grpc.CacheServiceStub(channel).Stats(pb.StatsRequest(), timeout=timeout, metadata=metadata)

    def held(self, ids: Sequence[str]) -> set[str]:
        """The ids of `ids` this daemon holds (NodeService.Has, served by clustered and plain daemons alike;
        in batches below its limit per call)."""
        ids = list(ids)
        found: set[str] = set()
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        with self.channel() as channel:
            stub = npb_grpc.NodeServiceStub(channel)
            for start in range(0, len(ids), HAS_BATCH):
                part = ids[start:start + HAS_BATCH]
                answer = stub.Has(npb.HasRequest(entry_ids=part), timeout=10, metadata=metadata)
                found.update(eid for eid, has in zip(part, answer.held, strict=True) if has)
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: the daemon drains and exits; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop the daemon if it runs: SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if not self.running:
            return
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> DaemonProcess:
        return self.start() if not self.running else self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def metric(metrics_port: int | None, name: str, **labels: str) -> float:
    """Sum of a series' samples on a daemon's metrics endpoint (on loopback) whose labels include `labels`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_members(nodes: Sequence[DaemonProcess], count: int, timeout: float = 10.0) -> float:
    """Seconds until every node counts `count` serving members (flexcache_cluster_members); TimeoutError
    after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(metric(n.metrics_port, "flexcache_cluster_members", state="serving") == count for n in nodes):
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(f"the nodes did not all see {count} serving members within {timeout} s")


def copies(nodes: Sequence[DaemonProcess], ids: Sequence[str]) -> dict[str, int]:
    """How many of `nodes` hold each of `ids`."""
    count = dict.fromkeys(ids, 0)
    for node in nodes:
        for eid in node.held(ids):
            count[eid] += 1
    return count


LOWEST_PORT = 10_000  # free_ports picks from here up to the kernel's ephemeral range


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for port-0 binds and outgoing connections (Linux), else 0."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free now: a cluster's members must know each other's ports before
    any of them starts, so each is bound and released here and bound again by its daemon. They are
    taken below the kernel's ephemeral range where it says what that is (Linux), so that no port-0 bind
    (another daemon's metrics or data port) and no outgoing connection can take one in between; else
    the kernel's own choice."""
    floor = _ephemeral_floor()
    pool = range(LOWEST_PORT, floor) if floor - LOWEST_PORT >= 100 * count else None
    pick = random.SystemRandom()  # not the module's generator: a seeded test must not repeat the ports
    ports: list[int] = []
    tries = 0
    while len(ports) < count:
        tries += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", pick.choice(pool) if pool is not None and tries < 1000 else 0))
            except OSError:  # in use (or lingering in TIME_WAIT): another one
                continue
            port = sock.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def free_port() -> int:
    """One loopback port free now, as `free_ports` picks them."""
    return free_ports(1)[0]


class DaemonCluster:
    """`size` daemons on loopback that form one cluster (static `peers`, node ids n0, n1, ...), each a
    DaemonProcess over root/n<i>, all with `settings`. `add()` starts one more member (the others learn
    of it at their next resolution of `peers`: a static list they were started with cannot grow, so
    `add` restarts none and instead the members are started with room: `spare` extra addresses in
    their peers list, which answer nothing until added). Every process is stopped by close()."""

    def __init__(self, root: Path, size: int, *, spare: int = 0, **settings: object):
        self.root = Path(root)
        ports = free_ports(size + spare)
        self.peers = ",".join(f"127.0.0.1:{p}" for p in ports)
        self.nodes = [self._node(i, port, settings) for i, port in enumerate(ports)]
        self.size = size

    def _node(self, i: int, port: int, settings: dict[str, object]) -> DaemonProcess:
        return DaemonProcess(self.root / f"n{i}", port=port, node_id=f"n{i}", peers=self.peers, **settings)

    @property
    def members(self) -> list[DaemonProcess]:
        return self.nodes[:self.size]

    @property
    def targets(self) -> list[str]:
        return [n.target for n in self.members]

    def start(self) -> DaemonCluster:
        for node in self.members:
            node.start()
        return self

    def add(self) -> DaemonProcess:
        """Start the next spare member."""
        if self.size == len(self.nodes):
            raise RuntimeError("no spare address left: make the cluster with spare=")
        self.size += 1
        return self.nodes[self.size - 1].start()

    def pause(self, i: int) -> None:
        """SIGSTOP: the node freezes (its sockets accept, nothing answers)."""
        os.kill(self.nodes[i].pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        os.kill(self.nodes[i].pid, signal.SIGCONT)

    def replace(self, i: int) -> DaemonProcess:
        """Kill node i and start it again on an empty data folder (a replaced disk)."""
        node = self.nodes[i]
        if node.running:
            node.kill()
        shutil.rmtree(node.data_dir, ignore_errors=True)
        return node.start()

    def close(self) -> None:
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)  # a paused node cannot drain
                node.close()

    def __enter__(self) -> DaemonCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
