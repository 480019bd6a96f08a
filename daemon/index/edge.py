"""Embedded index: Qdrant Edge shards (Qdrant's own engine, in-process) on local disk.

One shard per namespace, vector dimension (which the daemon fixes per namespace) and vector name,
under `<data_dir>/index/<namespace key>.d<dim>.<vector name>/`:

- A shard per namespace makes a namespace's isolation physical: a search never sees another
  namespace's points, so it needs no payload filter (Qdrant checks a filter at every graph node it
  visits; docs/bench_daemon.md measures what that costs).
- A shard per vector name, because Qdrant stores every named vector of a shard densely for every
  point: a whole-prompt cache whose entries carry only "full" would pay for two more vectors of
  zeros in every segment. The "object" and "background" shards exist only in namespaces whose
  entries carry part vectors. Every indexed entry has a "full" point, written last and deleted
  last, so the "full" shards alone say which entries are indexed.
- No write-ahead log. The index is derived data: RocksDB is the source of truth, and at startup
  the daemon removes points with no entry and re-indexes entries with no point. A WAL would only
  duplicate that, at the price of a preallocated log segment per shard on disk. Points written
  since the last flush are lost in a crash and re-indexed at the next start; the background thread
  flushes changed shards every `FLUSH_EVERY_S` seconds to keep that tail short.
- A shard that cannot be loaded (damaged or truncated files) is moved aside to
  `<data_dir>/index.damaged/` and rebuilt from the store, as a missing one would be.

Disk use: the background thread runs a shard's optimizer (HNSW build, merging appended points into
indexed segments) once enough points have arrived, and flushes right after it. Qdrant deletes the
segments an optimization replaced only at a flush: without one, every optimizer pass left its
inputs on disk and the folder grew with the square of the point count while puts kept arriving.

Search configuration (`shard_config`, `SEARCH_PARAMS`): HNSW m=32, ef_construct=128, scalar int8
quantization of the indexed segments kept in RAM (the graph walk scores int8 codes; the final
candidates are rescored with the float vectors, so returned similarities are exact), hnsw_ef=64 at
search time, and an optimizer indexing threshold of 1,000 KB, so that few points stay in the plain
segment every query scans in float32. Against Qdrant's defaults this is faster at a higher recall
for more optimizer CPU in the background thread (docs/bench_daemon.md has the A/B).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import qdrant_edge as qe

from .base import VECTOR_NAMES, IndexPoint, Neighbor, VectorIndex, point_id

log = logging.getLogger(__name__)

# Appended points after which the optimizer runs; below this an exhaustive scan is cheap anyway.
OPTIMIZE_AFTER_POINTS = 2000
# How often the background thread flushes shards changed since their last flush.
FLUSH_EVERY_S = 5.0

HNSW_M = 32  # Qdrant's default is 16
HNSW_EF_CONSTRUCT = 128  # default 100
SEARCH_HNSW_EF = 64  # candidates kept per search; Qdrant's default is ef_construct
INDEXING_THRESHOLD_KB = 1000  # appendable segments larger than this get indexed; Qdrant's default 10,000

# Parts first, "full" last: an entry with a "full" point has all of its points.
_WRITE_ORDER = ("object", "background", "full")
_SHARD_DIR = re.compile(rf"^(?P<ns>[A-Za-z0-9_-]+)\.d(?P<dim>[0-9]+)\.(?P<vector>{'|'.join(VECTOR_NAMES)})$")

ShardKey = tuple[str, int, str]  # (namespace key, dimension, vector name)


def shard_config(dim: int, vector_name: str) -> qe.EdgeConfig:
    """The configuration every shard is created with, and re-applied when an existing shard is loaded
    (`EdgeShard.load` persists it; the next `optimize()` rebuilds segments that do not match)."""
    return qe.EdgeConfig(
        vectors={vector_name: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)},
        hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=10_000),
        quantization_config=qe.ScalarQuantizationConfig(
            type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned
        ),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=INDEXING_THRESHOLD_KB),
        wal_enabled=False,
    )


SEARCH_PARAMS = qe.SearchParams(hnsw_ef=SEARCH_HNSW_EF, quantization=qe.QuantizationSearchParams(rescore=True))


def _folder_name(key: ShardKey) -> str:
    namespace_key, dim, vector_name = key
    return f"{namespace_key}.d{dim}.{vector_name}"


class EdgeIndex(VectorIndex):
    name = "edge"

    def __init__(self, root: Path):
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._shards: dict[ShardKey, qe.EdgeShard] = {}
        self._lock = threading.Lock()  # guards self._shards and the two counters below
        self._appended: dict[ShardKey, int] = {}  # points appended since the shard's last optimization
        self._dirty: set[ShardKey] = set()  # shards changed since their last flush
        self._wake = threading.Event()
        self._closed = False
        for folder in sorted(self._root.iterdir()):
            match = _SHARD_DIR.match(folder.name)
            if match is None:
                log.warning("index: %s is not a shard of this version; removing it (entries are re-indexed "
                            "from the store)", folder)
                _remove(folder)
                continue
            key = (match["ns"], int(match["dim"]), match["vector"])
            try:
                self._shards[key] = qe.EdgeShard.load(str(folder), shard_config(key[1], key[2]))
            except Exception as exc:
                self._set_aside(folder, exc)
                continue
            # One optimizer pass rebuilds segments that do not match the configuration or were never
            # indexed; on an up-to-date shard it is a no-op.
            self._appended[key] = OPTIMIZE_AFTER_POINTS
            self._wake.set()
        self._worker = threading.Thread(target=self._background, name="edge-optimizer", daemon=True)
        self._worker.start()

    def _set_aside(self, folder: Path, exc: Exception) -> None:
        aside = self._root.parent / "index.damaged" / folder.name
        log.error("index: shard %s cannot be loaded (%s); moved to %s, its entries are re-indexed from the store",
                  folder, exc, aside)
        _remove(aside)
        aside.parent.mkdir(exist_ok=True)
        folder.rename(aside)

    def _shard(self, key: ShardKey) -> qe.EdgeShard:
        with self._lock:
            shard = self._shards.get(key)
            if shard is None:
                if not _SHARD_DIR.match(_folder_name(key)):
                    raise ValueError(f"namespace key {key[0]!r} cannot name a shard folder")
                shard = qe.EdgeShard.create(str(self._root / _folder_name(key)), shard_config(key[1], key[2]))
                self._shards[key] = shard
            return shard

    def _existing(self, vector_names: Sequence[str]) -> list[tuple[ShardKey, qe.EdgeShard]]:
        with self._lock:
            shards = list(self._shards.items())
        return [(key, shard) for name in vector_names for key, shard in shards if key[2] == name]

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        groups: dict[ShardKey, list[qe.Point]] = {}
        for name in _WRITE_ORDER:
            for p in points:
                vector = p.named_vectors().get(name)
                if vector is not None:
                    groups.setdefault((p.namespace_key, p.dim, name), []).append(
                        qe.Point(point_id(p.entry_id), {name: vector}, p.payload()))
        for key, batch in groups.items():
            self._shard(key).update(qe.UpdateOperation.upsert_points(batch))
            with self._lock:
                self._dirty.add(key)
                self._appended[key] = self._appended.get(key, 0) + len(batch)
                if self._appended[key] >= OPTIMIZE_AFTER_POINTS:
                    self._wake.set()

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        with self._lock:
            shard = self._shards.get((namespace_key, len(vector), vector_name))
        if shard is None:
            return []
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(list(vector), using=vector_name),
                                  with_payload=["entry_id"], params=SEARCH_PARAMS)
        return [Neighbor(p.payload["entry_id"], p.score) for p in shard.query(request)]

    def delete(self, entry_ids: Sequence[str]) -> None:
        operation = qe.UpdateOperation.delete_points([point_id(e) for e in entry_ids])
        for key, shard in self._existing(_WRITE_ORDER):
            shard.update(operation)
            with self._lock:
                self._dirty.add(key)

    def entry_ids(self) -> Iterator[str]:
        for _, shard in self._existing(["full"]):
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
        for key, shard in self._existing(VECTOR_NAMES):
            shard.optimize()
            self._flush(key, shard)

    def info(self) -> list[str]:
        """Each shard's segment and point counts, as Qdrant reports them."""
        with self._lock:
            return [f"{_folder_name(key)}: {shard.info()}" for key, shard in self._shards.items()]

    def _flush(self, key: ShardKey, shard: qe.EdgeShard) -> None:
        with self._lock:
            self._dirty.discard(key)
        shard.flush()

    def _background(self) -> None:
        """Optimize shards that received enough points, flush right after (which deletes the segments
        the optimizer replaced), and flush every changed shard every FLUSH_EVERY_S."""
        next_flush = time.monotonic() + FLUSH_EVERY_S
        while True:
            self._wake.wait(timeout=max(0.0, next_flush - time.monotonic()))
            if self._closed:
                return
            self._wake.clear()
            with self._lock:
                due = [(key, self._shards[key]) for key, n in self._appended.items() if n >= OPTIMIZE_AFTER_POINTS]
                for key, _ in due:
                    self._appended[key] = 0
            for key, shard in due:
                try:
                    shard.optimize()
                    self._flush(key, shard)
                except Exception:  # a failed pass must not take lookups down; log and go on
                    log.exception("optimizing the index shard %s failed", _folder_name(key))
            if time.monotonic() >= next_flush:
                with self._lock:
                    dirty = [(key, self._shards[key]) for key in self._dirty]
                for key, shard in dirty:
                    try:
                        self._flush(key, shard)
                    except Exception:
                        log.exception("flushing the index shard %s failed", _folder_name(key))
                next_flush = time.monotonic() + FLUSH_EVERY_S

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._worker.join(timeout=30)
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
