"""Many namespaces on one real daemon: bounded threads, a fast restart, isolation, max_namespaces.

Any client can create a namespace with one Put, and before the fix each one cost the daemon a Qdrant
Edge shard with a search pool of eight threads, all loaded at startup: 300 namespaces made 2,427
threads and a 25 s restart here (bench/bench_namespaces.py, docs/namespaces.md). The test uses 300
namespaces, nine times the shards that stay open, because each namespace costs about 20-30 ms of disk
work to create and again to reload on this machine; the benchmark runs 1,000.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.bench_namespaces import (
    census,
    find_namespaces,
    lookup,
    namespace,
    peak_census,
    put,
    put_namespaces,
    timed_restart,
    vector,
)
from flexcache.daemon.entries import NamespaceKey
from flexcache.daemon.index import edge
from flexcache.daemon.index.base import IndexPoint
from flexcache.daemon.index.edge import EdgeIndex
from flexcache.daemon.index.remote import QdrantIndex
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

N = 300
MAX_THREADS = 100


def _metric(daemon, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_many_namespaces_bounded_threads_fast_restart_and_the_limit(start_daemon) -> None:
    daemon = start_daemon(max_namespaces=N)
    with peak_census(daemon.pid) as peak:
        ids = put_namespaces(daemon.target, N)
    assert peak[0] <= MAX_THREADS, f"{peak[0]} daemon threads while {N} namespaces were created"
    assert census(daemon.pid)[0] <= MAX_THREADS
    assert _metric(daemon, "flexcache_namespaces") == N
    assert _metric(daemon, "flexcache_index_open_shards") <= edge.MAX_OPEN_SHARDS

    restart_s = timed_restart(daemon)
    assert restart_s < 10, f"restart with {N} namespaces took {restart_s:.1f} s"  # ~1 s; the benchmark has it
    with peak_census(daemon.pid) as peak:
        found = find_namespaces(daemon.target, N)
    assert found == ids  # every namespace's entry, after the restart
    assert peak[0] <= MAX_THREADS, f"{peak[0]} daemon threads while {N} namespaces were looked up"
    assert _metric(daemon, "flexcache_index_shard_loads_total") >= N  # each shard loaded on demand

    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        # Isolation: another namespace's vector never finds that namespace's entry.
        for i in range(0, N - 1, 97):
            assert lookup(stub, namespace(i), vector(i + 1)) != ids[i + 1]
        with pytest.raises(grpc.RpcError) as refused:
            put(stub, namespace(N), "one namespace too many", vector(N))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"max_namespaces = {N}" in refused.value.details()
        assert put(stub, namespace(7), "an existing namespace still takes puts", vector(N + 1)).created
    assert len(daemon.stats().namespaces) == N


def test_a_shard_damaged_while_closed_is_rebuilt_at_its_next_lookup(start_daemon) -> None:
    """A shard closed as idle and damaged on disk before it is reopened: the index sets it aside and the
    cache re-indexes the namespace from the store before answering, so the lookup still finds it."""
    daemon = start_daemon()
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        first = put(stub, namespace(0), "prompt 0", vector(0)).entry_id
    put_namespaces(daemon.target, edge.MAX_OPEN_SHARDS + 8)  # namespace 0's shard is closed as idle
    key = NamespaceKey.of(namespace(0)).key
    [shard] = (daemon.data_dir / "index").glob(f"{key}.*")
    for path in shard.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\xff" * 7)
    with grpc.insecure_channel(daemon.target) as channel:
        assert lookup(pb_grpc.CacheServiceStub(channel), namespace(0), vector(0)) == first
    assert (daemon.data_dir / "index.damaged" / shard.name).is_dir()
    assert _metric(daemon, 'flexcache_reconciled_total{action="reindexed"}') == 1


def test_reconciliation_per_namespace_sees_deletes_made_before_it(start_daemon) -> None:
    """Entries deleted after a restart but before their namespace's first lookup leave the index alone
    (it is not reconciled yet); the reconciliation then removes their points as orphans."""
    daemon = start_daemon()
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        kept = put(stub, namespace(1), "kept", vector(1)).entry_id
        gone = put(stub, namespace(1), "gone", vector(2)).entry_id
    assert daemon.terminate() == 0
    daemon.start()
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        assert stub.Delete(pb.DeleteRequest(namespace=namespace(1), entry_id=gone), timeout=10).deleted
        assert lookup(stub, namespace(1), vector(2)) != gone
        assert lookup(stub, namespace(1), vector(1)) == kept
    assert _metric(daemon, 'flexcache_reconciled_total{action="orphan_point"}') == 1


def test_both_backends_answer_per_namespace_alike(tmp_path: Path) -> None:
    """What the cache's per-namespace reconciliation asks of an index: the namespaces it has points of,
    one namespace's ids, and a delete confined to one namespace, the same from either backend."""
    points = [IndexPoint(hashlib.sha256(f"{ns}/{i}".encode()).hexdigest(), f"ns-{ns}",
                         {"full": vector(ns * 100 + i).tolist()}) for ns in range(3) for i in range(4)]
    backends = [EdgeIndex(tmp_path / "edge", max_open_shards=1), QdrantIndex(path=str(tmp_path / "qdrant"))]
    try:
        for index in backends:
            assert index.namespaces() == set()
            index.upsert(points)
            index.delete([points[0].entry_id], namespace_key="ns-0")
        edge_index, remote = backends
        assert edge_index.namespaces() == remote.namespaces() == {"ns-0", "ns-1", "ns-2"}
        for ns in range(3):
            want = {p.entry_id for p in points if p.namespace_key == f"ns-{ns}"} - {points[0].entry_id}
            assert set(edge_index.entry_ids(f"ns-{ns}")) == set(remote.entry_ids(f"ns-{ns}")) == want
        assert edge_index.open_shards() == 1
    finally:
        for index in backends:
            index.close()
