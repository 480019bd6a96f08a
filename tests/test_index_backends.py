"""The embedded Qdrant Edge backend and the qdrant-client backend give the same answers on the same data.

No Qdrant server can run here, so the remote backend's code runs against qdrant-client's local mode
(the same client calls, an in-process engine); that substitution is the only stand-in in the suite.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from flexcache.daemon.index.base import IndexPoint, VectorIndex
from flexcache.daemon.index.edge import EdgeIndex
from flexcache.daemon.index.remote import QdrantIndex
from tests.conftest import connect
from tests.vectors import unit


def entry(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture
def backends(tmp_path: Path):
    opened: list[VectorIndex] = [EdgeIndex(tmp_path / "edge"), QdrantIndex(path=str(tmp_path / "qdrant"))]
    yield opened
    for index in opened:
        index.close()


def test_backends_agree(backends: list[VectorIndex]) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 64)).astype(np.float32)
    points = []
    for i in range(400):  # clusters, so near neighbours are meaningful; two namespaces, two dimensions
        v = centers[i % 20] + 0.3 * rng.standard_normal(64).astype(np.float32)
        vectors = {"full": v.tolist()}
        if i % 2:
            vectors["object"] = (-v).tolist()
        points.append(IndexPoint(entry(i), "ns-a" if i % 3 else "ns-b", vectors))
    points.append(IndexPoint(entry(1000), "ns-a", {"full": unit(1, 32).tolist()}))
    for index in backends:
        index.upsert(points)
        index.delete([entry(5), entry(6)])
    edge, remote = backends
    edge.optimize()  # the HNSW build the background thread would run; answers must not change
    # One shard per namespace, dimension and vector name: ns-a 64-d full and object, 32-d full; ns-b 64-d both.
    assert len(edge.info()) == 5
    assert set(edge.entry_ids()) == set(remote.entry_ids()) == {p.entry_id for p in points} - {entry(5), entry(6)}
    for q in range(30):
        query = (centers[q % 20] + 0.3 * rng.standard_normal(64)).astype(np.float32)
        for ns in ("ns-a", "ns-b"):
            for name in ("full", "object"):
                a = edge.search(ns, name, query, limit=5)
                b = remote.search(ns, name, query, limit=5)
                assert [h.entry_id for h in a] == [h.entry_id for h in b]
                np.testing.assert_allclose([h.similarity for h in a], [h.similarity for h in b], atol=1e-4)
                owners = {p.entry_id: p.namespace_key for p in points}
                assert all(owners[h.entry_id] == ns for h in a)
    assert edge.search("ns-a", "full", unit(1, 32), 3)[0].entry_id == entry(1000)
    assert remote.search("ns-a", "full", unit(1, 32), 3)[0].entry_id == entry(1000)
    assert edge.search("ns-a", "full", unit(1, 48), 3) == remote.search("ns-a", "full", unit(1, 48), 3) == []


def test_daemon_on_the_qdrant_backend(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(index_backend="qdrant", qdrant_path=str(tmp_path / "qdrant-local"))
    with connect(daemon.target) as c:
        ids = [c.put(f"p{i}", np.full(16, i, np.float32), unit(i)) for i in range(10)]
        assert [c.lookup(unit(i)).best.entry_id for i in range(10)] == ids
        assert c.stats().index_backend == "qdrant"
    daemon.terminate()
    daemon.start()
    with connect(daemon.target) as c:
        assert c.lookup(unit(3)).best.entry_id == ids[3]
