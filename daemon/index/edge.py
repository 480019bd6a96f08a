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
- No write-ahead log. The index is derived data: RocksDB is the source of truth, and the cache
  reconciles each namespace with the store before its first use after a start (cache.py). A WAL
  would only duplicate that, at the price of a preallocated log segment per shard on disk. Points
  written since a shard's last flush are lost in a crash and re-indexed then; the background thread
  flushes changed shards every `FLUSH_EVERY_S` seconds to keep that tail short.
- A shard that cannot be loaded (damaged or truncated files) is moved aside to
  `<data_dir>/index.damaged/`, an empty one takes its place, and the owner hears of it
  (`IndexEvents.namespace_lost`) so that it re-indexes the namespace from the store.

Many namespaces. A namespace costs nothing while its shards are closed: opening the index only lists
the folder (no shard is loaded, so a restart does not grow with the namespace count), and a shard is
loaded when a call first needs it. At most `max_open_shards` (MAX_OPEN_SHARDS) stay open: each open
shard holds a search thread pool (SEARCH_THREADS threads; Qdrant's default is one per CPU, which put
eight threads per shard here and thousands in a daemon with a few hundred namespaces) and its
vectors in memory. Past that, the least recently used idle shard is flushed (if it changed) and
closed; the next call reopens it. A shard in use is never closed under a call, so more may be open
for a moment when more calls run at once. docs/namespaces.md measures threads, restart time and
lookup latency with 10 to 1,000 namespaces.

Disk use: the background thread runs a shard's optimizer (HNSW build, merging appended points into
indexed segments) once enough points have arrived, and flushes right after it. Qdrant deletes the
segments an optimization replaced only at a flush: without one, every optimizer pass left its
inputs on disk and the folder grew with the square of the point count while puts kept arriving.

Search configuration (`shard_config`, `SEARCH_PARAMS`): HNSW m=32, ef_construct=128, scalar int8
quantization of the indexed segments kept in RAM (the graph walk scores int8 codes; the final
candidates are rescored with the float vectors, so returned similarities are exact), hnsw_ef=128 at
search time (64 kept recall@1 at 0.999 at 100k entries but let it fall to 0.953 at 1M; 128 gave 0.993
there: docs/bench_scale.md), and an optimizer indexing threshold of 1,000 KB, so that few points
stay in the plain segment every query scans in float32. Against Qdrant's defaults this is faster at a higher recall
for more optimizer CPU in the background thread (docs/bench_daemon.md has the A/B). A search pool of
one thread per shard leaves a single query's latency as it was (a shard has few segments to search
in parallel; docs/namespaces.md compares the two on the same 100k-entry shard).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import qdrant_edge as qe

from .base import VECTOR_NAMES, IndexPoint, Neighbor, VectorIndex, point_id

log = logging.getLogger(__name__)

# Appended points after which the optimizer runs; below this an exhaustive scan is cheap anyway.
OPTIMIZE_AFTER_POINTS = 2000
# How often the background thread flushes shards changed since their last flush.
FLUSH_EVERY_S = 5.0
# Shards kept open at once; the least recently used idle one is closed past this.
MAX_OPEN_SHARDS = 32
# Threads in each open shard's search pool (None: Qdrant's default, one per CPU).
SEARCH_THREADS: int | None = 1

HNSW_M = 32  # Qdrant's default is 16
HNSW_EF_CONSTRUCT = 128  # default 100
SEARCH_HNSW_EF = 128  # candidates kept per search; Qdrant's default is ef_construct
INDEXING_THRESHOLD_KB = 1000  # appendable segments larger than this get indexed; Qdrant's default 10,000

# Parts first, "full" last: an entry with a "full" point has all of its points.
_WRITE_ORDER = ("object", "background", "full")
_SHARD_DIR = re.compile(rf"^(?P<ns>[A-Za-z0-9_-]+)\.d(?P<dim>[0-9]+)\.(?P<vector>{'|'.join(VECTOR_NAMES)})$")

ShardKey = tuple[str, int, str]  # (namespace key, dimension, vector name)


def shard_config(dim: int, vector_name: str, search_threads: int | None = SEARCH_THREADS) -> qe.EdgeConfig:
    """The configuration every shard is created with, and re-applied when an existing shard is loaded
    (`EdgeShard.load` persists it; the next `optimize()` rebuilds segments that do not match)."""
    return qe.EdgeConfig(
        vectors={vector_name: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)},
        hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=10_000),
        quantization_config=qe.ScalarQuantizationConfig(
            type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned
        ),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=INDEXING_THRESHOLD_KB),
        max_search_threads=search_threads,
        wal_enabled=False,
    )


SEARCH_PARAMS = qe.SearchParams(hnsw_ef=SEARCH_HNSW_EF, quantization=qe.QuantizationSearchParams(rescore=True))


def _folder_name(key: ShardKey) -> str:
    namespace_key, dim, vector_name = key
    return f"{namespace_key}.d{dim}.{vector_name}"


class _Slot:
    """A shard the index knows (its folder exists, or a call is creating it): its EdgeShard while open,
    and how many calls hold it. `lock` serialises loading and closing this one shard, so that a slow
    load never blocks calls on other shards and a shard is never open twice."""

    __slots__ = ("key", "loaded", "lock", "shard", "users")

    def __init__(self, key: ShardKey):
        self.key = key
        self.shard: qe.EdgeShard | None = None
        self.users = 0
        self.lock = threading.Lock()
        self.loaded = False  # loaded (or created) at least once by this process


class EdgeIndex(VectorIndex):
    name = "edge"

    def __init__(self, root: Path, *, max_open_shards: int = MAX_OPEN_SHARDS,
                 search_threads: int | None = SEARCH_THREADS):
        """Lists `root` (creating it if needed) without loading any shard; folders that are not shards
        of this layout are removed (their entries are re-indexed from the store)."""
        if max_open_shards < 1:
            raise ValueError("max_open_shards must be at least 1")
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._max_open = max_open_shards
        self._search_threads = search_threads
        # self._lock guards the four collections below and every slot's `shard` and `users`.
        self._lock = threading.Lock()
        self._slots: dict[ShardKey, _Slot] = {}
        self._by_namespace: dict[str, set[ShardKey]] = {}
        self._open: OrderedDict[ShardKey, None] = OrderedDict()  # open shards, least recently used first
        self._appended: dict[ShardKey, int] = {}  # points appended since the shard's last optimization
        self._dirty: set[ShardKey] = set()  # open shards changed since their last flush
        self.loads = 0  # shards loaded from disk by this process (first use, or reopened after a close)
        self._wake = threading.Event()
        self._closed = False
        for folder in sorted(self._root.iterdir()):
            match = _SHARD_DIR.match(folder.name)
            if match is None:
                log.warning("index: %s is not a shard of this version; removing it (entries are re-indexed "
                            "from the store)", folder)
                _remove(folder)
                continue
            self._slot((match["ns"], int(match["dim"]), match["vector"]))
        self._worker = threading.Thread(target=self._background, name="edge-optimizer", daemon=True)
        self._worker.start()

    # ---- shards: known, open, in use ----
    def _slot(self, key: ShardKey) -> _Slot:
        """The slot of `key`, made if new; call under self._lock or before the index is shared."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key)
            self._by_namespace.setdefault(key[0], set()).add(key)
        return slot

    @contextmanager
    def _use(self, key: ShardKey, *, create: bool = False, load: bool = True) -> Iterator[qe.EdgeShard | None]:
        """The open shard of `key` for the block, loaded from disk if closed (`load`), created if the
        index has none (`create`); None where there is none to use. It is not closed while in use."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None and create:
                if not _SHARD_DIR.match(_folder_name(key)):
                    raise ValueError(f"namespace key {key[0]!r} cannot name a shard folder")
                slot = self._slot(key)
            if slot is None or (slot.shard is None and not load):
                slot = None
            else:
                slot.users += 1
        if slot is None:
            yield None
            return
        try:
            with slot.lock:
                if slot.shard is None:
                    shard = self._load(slot)
                    with self._lock:
                        slot.shard = shard
                with self._lock:
                    self._open[key] = None
                    self._open.move_to_end(key)
            yield slot.shard
        finally:
            with self._lock:
                slot.users -= 1
            self._close_idle()

    def _load(self, slot: _Slot) -> qe.EdgeShard:
        """Load the slot's shard (or create it); one that cannot be loaded is set aside and replaced by an
        empty one, and the owner told. Called holding slot.lock."""
        key, folder = slot.key, self._root / _folder_name(slot.key)
        config = shard_config(key[1], key[2], self._search_threads)
        first = not slot.loaded
        slot.loaded = True
        if folder.is_dir():
            try:
                shard = qe.EdgeShard.load(str(folder), config)
            except Exception as exc:
                self._set_aside(folder, exc)
                self._events.namespace_lost(key[0])
            else:
                # A first load after a start gets one optimizer pass, which rebuilds segments that do not
                # match the configuration or were never indexed (a no-op on an up-to-date shard); a small
                # shard has nothing to index.
                optimize = first and shard.info().points_count >= OPTIMIZE_AFTER_POINTS
                with self._lock:
                    self.loads += 1
                    if optimize:
                        self._appended[key] = max(self._appended.get(key, 0), OPTIMIZE_AFTER_POINTS)
                        self._wake.set()
                self._events.shard_loaded()
                return shard
        return qe.EdgeShard.create(str(folder), config)

    def _close_idle(self) -> None:
        """Close the least recently used idle shards until at most max_open_shards are open. A shard a
        call took meanwhile stays open. `EdgeShard.close` flushes (Qdrant's documentation: it "cleanly
        destroys the shard instance, ensuring the data is flushed"), so a closed shard lost nothing."""
        while True:
            with self._lock:
                if len(self._open) <= self._max_open:
                    return
                victim = next((self._slots[k] for k in self._open if self._slots[k].users == 0), None)
                if victim is None:  # every open shard is in use: close later
                    return
                del self._open[victim.key]
            with victim.lock:
                with self._lock:
                    if victim.users or victim.shard is None:  # taken meanwhile (it re-listed itself), or closed
                        continue
                    shard, victim.shard = victim.shard, None
                    self._dirty.discard(victim.key)
                try:
                    shard.close()
                except Exception:  # its unflushed points are re-indexed at the next start
                    log.exception("closing the index shard %s failed", _folder_name(victim.key))

    def _set_aside(self, folder: Path, exc: Exception) -> None:
        aside = self._root.parent / "index.damaged" / folder.name
        log.error("index: shard %s cannot be loaded (%s); moved to %s, its entries are re-indexed from the store",
                  folder, exc, aside)
        _remove(aside)
        aside.parent.mkdir(exist_ok=True)
        folder.rename(aside)

    def _keys(self, namespace_key: str | None, vector_names: Sequence[str]) -> list[ShardKey]:
        """Known shards of one namespace (every namespace: None) with these vector names, in that order."""
        with self._lock:
            keys = self._by_namespace.get(namespace_key, set()) if namespace_key is not None else self._slots
            return sorted((k for k in keys if k[2] in vector_names), key=lambda k: (vector_names.index(k[2]), k))

    def _changed(self, key: ShardKey, appended: int) -> None:
        with self._lock:
            self._dirty.add(key)
            if appended:
                self._appended[key] = self._appended.get(key, 0) + appended
                if self._appended[key] >= OPTIMIZE_AFTER_POINTS:
                    self._wake.set()

    # ---- the interface ----
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        groups: dict[ShardKey, list[qe.Point]] = {}
        for name in _WRITE_ORDER:
            for p in points:
                vector = p.named_vectors().get(name)
                if vector is not None:
                    groups.setdefault((p.namespace_key, p.dim, name), []).append(
                        qe.Point(point_id(p.entry_id), {name: vector}, p.payload()))
        for key, batch in groups.items():
            with self._use(key, create=True) as shard:
                assert shard is not None
                shard.update(qe.UpdateOperation.upsert_points(batch))
                self._changed(key, len(batch))

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(list(vector), using=vector_name),
                                  with_payload=["entry_id"], params=SEARCH_PARAMS)
        with self._use((namespace_key, len(vector), vector_name)) as shard:
            if shard is None:
                return []
            found = shard.query(request)
        return [Neighbor(p.payload["entry_id"], p.score) for p in found]

    def delete(self, entry_ids: Sequence[str], namespace_key: str | None = None) -> None:
        """As the interface says; without `namespace_key` it loads every shard the index has."""
        operation = qe.UpdateOperation.delete_points([point_id(e) for e in entry_ids])
        for key in self._keys(namespace_key, _WRITE_ORDER):
            with self._use(key) as shard:
                if shard is not None:
                    shard.update(operation)
                    self._changed(key, 0)

    def entry_ids(self, namespace_key: str | None = None) -> Iterator[str]:
        for key in self._keys(namespace_key, ("full",)):
            ids: list[str] = []
            with self._use(key) as shard:
                offset = None
                while shard is not None:
                    records, offset = shard.scroll(qe.ScrollRequest(offset=offset, limit=1024,
                                                                    with_payload=["entry_id"]))
                    ids.extend(record.payload["entry_id"] for record in records)
                    if offset is None:
                        break
            yield from ids

    def namespaces(self) -> set[str]:
        with self._lock:
            return set(self._by_namespace)

    def open_shards(self) -> int:
        with self._lock:
            return len(self._open)

    def optimize(self) -> None:
        """Run every shard's optimizer now and wait for it (maintenance, benchmarks); the background
        thread does the same on its own once enough points have arrived. Loads every shard in turn."""
        for key in self._keys(None, VECTOR_NAMES):
            with self._use(key) as shard:
                if shard is not None:
                    shard.optimize()
                    self._flush(key, shard)

    def info(self) -> list[str]:
        """Each shard's segment and point counts, as Qdrant reports them (loads every shard in turn)."""
        out = []
        for key in self._keys(None, VECTOR_NAMES):
            with self._use(key) as shard:
                if shard is not None:
                    out.append(f"{_folder_name(key)}: {shard.info()}")
        return out

    def _flush(self, key: ShardKey, shard: qe.EdgeShard) -> None:
        with self._lock:
            self._dirty.discard(key)
        shard.flush()

    def _background(self) -> None:
        """Optimize shards that received enough points (loading them if they were closed), flush right
        after (which deletes the segments the optimizer replaced), and flush every changed open shard
        every FLUSH_EVERY_S."""
        next_flush = time.monotonic() + FLUSH_EVERY_S
        while True:
            self._wake.wait(timeout=max(0.0, next_flush - time.monotonic()))
            if self._closed:
                return
            self._wake.clear()
            with self._lock:
                due = [key for key, n in self._appended.items() if n >= OPTIMIZE_AFTER_POINTS]
                for key in due:
                    self._appended[key] = 0
            for key in due:
                try:
                    with self._use(key) as shard:
                        if shard is not None:
                            shard.optimize()
                            self._flush(key, shard)
                except Exception:  # a failed pass must not take lookups down; log and go on
                    log.exception("optimizing the index shard %s failed", _folder_name(key))
                if self._closed:
                    return
            if time.monotonic() >= next_flush:
                with self._lock:
                    dirty = list(self._dirty)
                for key in dirty:
                    try:
                        with self._use(key, load=False) as shard:  # a closed shard was flushed at its close
                            if shard is not None:
                                self._flush(key, shard)
                    except Exception:
                        log.exception("flushing the index shard %s failed", _folder_name(key))
                next_flush = time.monotonic() + FLUSH_EVERY_S

    def close(self) -> None:
        """Stop the background thread, then close (which flushes) every open shard."""
        self._closed = True
        self._wake.set()
        self._worker.join(timeout=30)
        with self._lock:
            slots = [self._slots[key] for key in self._open]
            self._open.clear()
        for slot in slots:
            with slot.lock:
                with self._lock:
                    shard, slot.shard = slot.shard, None
                if shard is not None:
                    shard.close()
        with self._lock:
            self._dirty.clear()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
