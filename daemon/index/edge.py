"""Embedded index: Qdrant Edge shards (Qdrant's own engine, in-process) on local disk.

One shard per vector dimension under `<data_dir>/index/d<dim>/`, each with a keyword payload index
on "ns". New points land in an appendable segment that is searched exhaustively; a background
thread runs the shard's optimizer (HNSW build) once enough points have arrived, so lookups stay
fast as the cache grows without putting index builds on the request path.

Search configuration (`shard_config`, `SEARCH_PARAMS`): HNSW m=32, ef_construct=128, scalar int8
quantization of the indexed segments kept in RAM (the graph walk scores int8 codes; the final
candidates are rescored with the float vectors, so returned similarities are exact), hnsw_ef=64 at
search time, and an optimizer indexing threshold of 1,000 KB (Qdrant's 10,000 KB leaves the newest
~6.5k 384-d points in a plain segment that every query scans in float32). Qdrant's defaults (m=16,
ef_construct=100, float32 scoring) were most of our lookup time: in an A/B on a 100k x 384-d shard
they took 2.18 / 3.30 ms median / p99 at recall@1 0.965, this configuration 0.65 / 1.19 ms at 0.9995
(2026-11-25; the runs and what was tried and not kept are in docs/bench_daemon.md). The price is
optimizer CPU in the background thread: indexing 100k points takes about twice as long.

Shards written before this configuration are upgraded when loaded: `EdgeShard.load` is given the
configuration (it persists it) and one optimizer pass is queued, which rebuilds the old segments in
the background while lookups keep using them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import qdrant_edge as qe

from .base import VECTOR_NAMES, Hit, IndexPoint, VectorIndex, group_by_dim, point_id

log = logging.getLogger(__name__)

# Appended points after which the optimizer runs; below this an exhaustive scan is cheap anyway.
OPTIMIZE_AFTER_POINTS = 2000

# Search-side configuration (see the module docstring for the measurements behind it).
HNSW_M = 32  # Qdrant's default is 16
HNSW_EF_CONSTRUCT = 128  # default 100
SEARCH_HNSW_EF = 64  # candidates kept per search; Qdrant's default is ef_construct
INDEXING_THRESHOLD_KB = 1000  # appendable segments larger than this get indexed; Qdrant's default 10,000


def shard_config(dim: int) -> qe.EdgeConfig:
    """The configuration every shard is created with, and re-applied when an existing shard is loaded
    (`EdgeShard.load` persists it; the next `optimize()` rebuilds segments that do not match)."""
    return qe.EdgeConfig(
        vectors={n: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine) for n in VECTOR_NAMES},
        hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=10_000),
        quantization_config=qe.ScalarQuantizationConfig(
            type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned
        ),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=INDEXING_THRESHOLD_KB),
    )


SEARCH_PARAMS = qe.SearchParams(hnsw_ef=SEARCH_HNSW_EF, quantization=qe.QuantizationSearchParams(rescore=True))


class EdgeIndex(VectorIndex):
    name = "edge"

    def __init__(self, root: Path):
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._shards: dict[int, qe.EdgeShard] = {}
        self._lock = threading.Lock()  # guards self._shards and the pending-optimize counters
        self._pending: dict[int, int] = {}
        self._optimize_wanted = threading.Event()
        self._closed = False
        for folder in sorted(self._root.glob("d*")):
            if folder.name[1:].isdigit():
                dim = int(folder.name[1:])
                # Re-applying the config upgrades shards written before it (no quantization): the
                # optimizer pass queued here rebuilds them in the background; lookups keep working
                # on the old segments meanwhile. On an up-to-date shard that pass finds nothing to do.
                self._shards[dim] = qe.EdgeShard.load(str(folder), shard_config(dim))
                self._pending[dim] = OPTIMIZE_AFTER_POINTS
                self._optimize_wanted.set()
        self._optimizer = threading.Thread(target=self._optimize_loop, name="edge-optimizer", daemon=True)
        self._optimizer.start()

    def _shard(self, dim: int, create: bool) -> qe.EdgeShard | None:
        with self._lock:
            shard = self._shards.get(dim)
            if shard is None and create:
                shard = qe.EdgeShard.create(str(self._root / f"d{dim}"), shard_config(dim))
                shard.update(qe.UpdateOperation.create_field_index("ns", qe.PayloadSchemaType.Keyword))
                self._shards[dim] = shard
            return shard

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        for dim, group in group_by_dim(points).items():
            batch = [qe.Point(point_id(p.entry_id), p.named_vectors(), p.payload()) for p in group]
            self._shard(dim, create=True).update(qe.UpdateOperation.upsert_points(batch))
            with self._lock:
                self._pending[dim] = self._pending.get(dim, 0) + len(batch)
                if self._pending[dim] >= OPTIMIZE_AFTER_POINTS:
                    self._optimize_wanted.set()

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Hit]:
        shard = self._shard(len(vector), create=False)
        if shard is None:
            return []
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(list(vector), using=vector_name),
            filter=qe.Filter(must=[qe.FieldCondition(key="ns", match=qe.MatchValue(namespace_key))]),
            with_payload=["entry_id"],
            params=SEARCH_PARAMS,
        )
        return [Hit(p.payload["entry_id"], p.score) for p in shard.query(request)]

    def delete(self, entry_ids: Sequence[str]) -> None:
        ids = [point_id(e) for e in entry_ids]
        with self._lock:
            shards = list(self._shards.values())
        for shard in shards:
            shard.update(qe.UpdateOperation.delete_points(ids))

    def entry_ids(self) -> Iterator[str]:
        with self._lock:
            shards = list(self._shards.values())
        for shard in shards:
            offset = None
            while True:
                records, offset = shard.scroll(qe.ScrollRequest(offset=offset, limit=1024, with_payload=["entry_id"]))
                for record in records:
                    yield record.payload["entry_id"]
                if offset is None:
                    break

    def _optimize_loop(self) -> None:
        while True:
            self._optimize_wanted.wait()
            if self._closed:
                return
            self._optimize_wanted.clear()
            with self._lock:
                due = [(dim, self._shards[dim]) for dim, n in self._pending.items() if n >= OPTIMIZE_AFTER_POINTS]
                for dim, _ in due:
                    self._pending[dim] = 0
            for dim, shard in due:
                try:
                    shard.optimize()
                except Exception:  # an optimizer failure must not take lookups down; log and go on
                    log.exception("optimizing the d%d shard failed", dim)

    def close(self) -> None:
        self._closed = True
        self._optimize_wanted.set()
        self._optimizer.join(timeout=30)
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
