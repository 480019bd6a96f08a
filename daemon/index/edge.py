"""Embedded index: Qdrant Edge shards (Qdrant's own engine, in-process) on local disk.

One shard per namespace (and vector dimension, which the daemon fixes per namespace), under
`<data_dir>/index/<namespace key>.d<dim>/`. A shard of its own makes a namespace's isolation
physical: a search never sees another namespace's points, so it needs no payload filter. The
filter was half of our lookup time: on a 100k x 384-d shard holding one namespace, the search
filtered on a keyword payload index took 1.28 / 2.25 ms median / p99 and the same search
unfiltered 0.56 / 1.31 ms (2026-11-30, docs/bench_daemon.md): Qdrant checks the condition at every
graph node it visits. The price is one set of segment and WAL files per namespace, which suits a
daemon serving a handful of namespaces (models x generation settings); a fleet with thousands of
tenants should use the remote backend, which keeps one collection per dimension and filters on
the namespace, as Qdrant advises for many tenants.

New points land in an appendable segment that is searched exhaustively; a background thread runs
each shard's optimizer (HNSW build) once enough points have arrived, so lookups stay fast as the
cache grows without putting index builds on the request path.

Search configuration (`shard_config`, `SEARCH_PARAMS`): HNSW m=32, ef_construct=128, scalar int8
quantization of the indexed segments kept in RAM (the graph walk scores int8 codes; the final
candidates are rescored with the float vectors, so returned similarities are exact), hnsw_ef=64 at
search time, and an optimizer indexing threshold of 1,000 KB (Qdrant's 10,000 KB leaves the newest
~6.5k 384-d points in a plain segment that every query scans in float32). Qdrant's defaults (m=16,
ef_construct=100, float32 scoring) took 2.18 / 3.30 ms median / p99 at recall@1 0.965 in an A/B on
a 100k x 384-d shard, this configuration 0.65 / 1.19 ms at 0.9995 (2026-11-25). The price is
optimizer CPU in the background thread: indexing 100k points takes about twice as long.

Indexes written by earlier versions (one shard per dimension, `index/d<dim>/`, shared by all
namespaces) are deleted when the index opens; the store is the source of truth and the daemon's
startup reconciliation re-indexes every entry from its stored vectors.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import qdrant_edge as qe

from .base import VECTOR_NAMES, Hit, IndexPoint, VectorIndex, point_id

log = logging.getLogger(__name__)

# Appended points after which the optimizer runs; below this an exhaustive scan is cheap anyway.
OPTIMIZE_AFTER_POINTS = 2000

# Search-side configuration (see the module docstring for the measurements behind it).
HNSW_M = 32  # Qdrant's default is 16
HNSW_EF_CONSTRUCT = 128  # default 100
SEARCH_HNSW_EF = 64  # candidates kept per search; Qdrant's default is ef_construct
INDEXING_THRESHOLD_KB = 1000  # appendable segments larger than this get indexed; Qdrant's default 10,000

_SHARD_DIR = re.compile(r"^(?P<ns>[A-Za-z0-9_-]+)\.d(?P<dim>[0-9]+)$")
_OLD_SHARD_DIR = re.compile(r"^d[0-9]+$")  # before 2026-11-30: one shard per dimension, filtered by "ns"


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
        self._shards: dict[tuple[str, int], qe.EdgeShard] = {}  # (namespace key, dim) -> shard
        self._lock = threading.Lock()  # guards self._shards and the pending-optimize counters
        self._pending: dict[tuple[str, int], int] = {}
        self._optimize_wanted = threading.Event()
        self._closed = False
        for folder in sorted(self._root.iterdir()):
            if _OLD_SHARD_DIR.match(folder.name):
                log.warning("removing the old per-dimension index %s; entries are re-indexed from the store",
                            folder)
                shutil.rmtree(folder)
            elif match := _SHARD_DIR.match(folder.name):
                # Loading re-applies the configuration; one queued optimizer pass rebuilds segments
                # that do not match it or were never indexed (on an up-to-date shard: a no-op, ~0.1 ms).
                key = (match["ns"], int(match["dim"]))
                self._shards[key] = qe.EdgeShard.load(str(folder), shard_config(key[1]))
                self._pending[key] = OPTIMIZE_AFTER_POINTS
                self._optimize_wanted.set()
        self._optimizer = threading.Thread(target=self._optimize_loop, name="edge-optimizer", daemon=True)
        self._optimizer.start()

    def _shard(self, key: tuple[str, int]) -> qe.EdgeShard:
        with self._lock:
            shard = self._shards.get(key)
            if shard is None:
                namespace_key, dim = key
                if not _SHARD_DIR.match(f"{namespace_key}.d{dim}"):
                    raise ValueError(f"namespace key {namespace_key!r} cannot name a shard folder")
                shard = qe.EdgeShard.create(str(self._root / f"{namespace_key}.d{dim}"), shard_config(dim))
                self._shards[key] = shard
            return shard

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        groups: dict[tuple[str, int], list[IndexPoint]] = {}
        for p in points:
            groups.setdefault((p.namespace_key, p.dim), []).append(p)
        for key, group in groups.items():
            batch = [qe.Point(point_id(p.entry_id), p.named_vectors(), p.payload()) for p in group]
            self._shard(key).update(qe.UpdateOperation.upsert_points(batch))
            with self._lock:
                self._pending[key] = self._pending.get(key, 0) + len(batch)
                if self._pending[key] >= OPTIMIZE_AFTER_POINTS:
                    self._optimize_wanted.set()

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Hit]:
        with self._lock:
            shard = self._shards.get((namespace_key, len(vector)))
        if shard is None:
            return []
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(list(vector), using=vector_name),
                                  with_payload=["entry_id"], params=SEARCH_PARAMS)
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

    def optimize(self) -> None:
        """Run every shard's optimizer now and wait for it (maintenance, benchmarks); the background
        thread does the same on its own once enough points have arrived."""
        with self._lock:
            shards = list(self._shards.values())
        for shard in shards:
            shard.optimize()
            shard.flush()

    def info(self) -> list[str]:
        """Each shard's segment and point counts, as Qdrant reports them."""
        with self._lock:
            return [f"{ns}.d{dim}: {shard.info()}" for (ns, dim), shard in self._shards.items()]

    def _optimize_loop(self) -> None:
        while True:
            self._optimize_wanted.wait()
            if self._closed:
                return
            self._optimize_wanted.clear()
            with self._lock:
                due = [(key, self._shards[key]) for key, n in self._pending.items() if n >= OPTIMIZE_AFTER_POINTS]
                for key, _ in due:
                    self._pending[key] = 0
            for key, shard in due:
                try:
                    shard.optimize()
                except Exception:  # an optimizer failure must not take lookups down; log and go on
                    log.exception("optimizing the index shard %s.d%d failed", *key)

    def close(self) -> None:
        self._closed = True
        self._optimize_wanted.set()
        self._optimizer.join(timeout=30)
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
