"""A cluster over one Qdrant (index_backend=qdrant): lookups go to the shared index, not to the peers.

The stand-in: no Qdrant server runs here, and qdrant-client's local mode belongs to one process (it
locks its folder), so the three daemons run in this test's process, each a real `Daemon` with its own
gRPC port, RocksDB store and peers, sharing one local-mode index object in place of a Qdrant server's
collections. Everything between the daemons and from the client is real gRPC on loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from flexcache.daemon.config import resolve
from flexcache.daemon.index import IndexPoint, Neighbor
from flexcache.daemon.index.remote import QdrantIndex
from flexcache.daemon.process import free_ports
from flexcache.daemon.server import Daemon
from flexcache.v1 import node_pb2 as npb
from tests.conftest import connect, metric
from tests.test_cluster import FAST, eventually, latent, vector


class SharedIndex(QdrantIndex):
    """One index for every daemon of the test: its calls one at a time (local mode's SQLite file takes
    no concurrent writers; a server serializes them itself), and a daemon's close leaves it open for
    the others."""

    def __init__(self, path: str):
        super().__init__(path=path)
        self._serial = threading.Lock()

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        with self._serial:
            super().upsert(points)

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        with self._serial:
            return super().search(namespace_key, vector_name, vector, limit)

    def delete(self, entry_ids: Sequence[str], namespace_key: str | None = None) -> None:
        with self._serial:
            super().delete(entry_ids, namespace_key)

    def entry_ids(self, namespace_key: str | None = None) -> Iterator[str]:
        with self._serial:
            return iter(list(super().entry_ids(namespace_key)))

    def close(self) -> None:
        pass

    def close_for_good(self) -> None:
        super().close()


@pytest.fixture
def shared_cluster(tmp_path: Path) -> Iterator[list[Daemon]]:
    index = SharedIndex(path=str(tmp_path / "qdrant"))
    ports = free_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    daemons = []
    try:
        for i, port in enumerate(ports):
            config = resolve(env={}, flags={
                "data_dir": str(tmp_path / f"n{i}"), "listen": f"127.0.0.1:{port}", "metrics_listen": "127.0.0.1:0",
                "node_id": f"n{i}", "peers": peers, "index_backend": "qdrant",
                "qdrant_url": "http://qdrant.invalid:6333",  # never dialled: `index` replaces the backend
                **{k: str(v) for k, v in FAST.items()}})
            daemon = Daemon(config, index=index)
            daemons.append(daemon)
            daemon.start()
        eventually(lambda: all(metric(d, "flexcache_cluster_members", state="serving") == 3 for d in daemons), 10,
                   "every node sees 3 serving members")
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()
        index.close_for_good()


def target(daemon: Daemon) -> str:
    return f"127.0.0.1:{daemon.port}"


def test_lookups_search_the_shared_index_without_fanning_out(shared_cluster: list[Daemon]) -> None:
    rng = np.random.default_rng(0)
    entries = []
    clients = [connect(target(d)) for d in shared_cluster]
    try:
        for i in range(30):
            v = vector(rng)
            eid = clients[i % 3].put(f"shared {i}", latent(rng), v, seed=i)
            assert eid is not None
            entries.append((eid, v))
        for i, (eid, v) in enumerate(entries):
            found = clients[(i + 1) % 3].lookup(v)
            assert found is not None and found.best is not None and found.best.entry_id == eid
            assert clients[(i + 2) % 3].fetch(eid) is not None
    finally:
        for c in clients:
            c.close()
    for daemon in shared_cluster:
        assert metric(daemon, "flexcache_requests_total", method="Gather") == 0
        assert metric(daemon, "flexcache_cluster_fanout_seconds_count", method="Lookup") == 0
        assert metric(daemon, "flexcache_requests_total", method="Lookup", code="OK") == 10


def test_a_hand_off_keeps_the_shared_points_and_a_stopped_node_loses_nothing(shared_cluster: list[Daemon]) -> None:
    rng = np.random.default_rng(1)
    with connect(target(shared_cluster[0])) as c:
        vectors = [vector(rng) for _ in range(20)]
        entries = [(c.put(f"kept {i}", latent(rng), v, seed=i), v) for i, v in enumerate(vectors)]
    assert all(eid is not None for eid, _ in entries)
    drained = shared_cluster[2]
    assert drained.cluster is not None
    drained.cluster.drain()
    drained._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    eventually(lambda: drained.cluster is not None and drained.cluster.membership.state == npb.NODE_DRAINING
               and len(drained.cache.entry_ids()) == 0, 20, "the drained node hands every entry off")  # type: ignore[union-attr]
    drained.stop()
    for other in shared_cluster[:2]:
        with connect(target(other)) as c:
            for eid, v in entries:
                found = c.lookup(v)
                assert found is not None and found.best is not None and found.best.entry_id == eid
                assert c.fetch(eid) is not None
