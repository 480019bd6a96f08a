"""The cache core's façade: put, lookup, fetch, delete, verify and stats over the store, the index and
a policy, plus startup reconciliation and eviction.

It speaks in protobuf messages and domain errors (errors.py), never in gRPC terms, so it can be
driven by the server, the data port's caller or directly by a benchmark. The work is split by job,
and data flows one way, from this module down:

    validate.py   request checks -> domain errors (no state)
    ranking.py    index neighbours -> ranked candidates (reads the index and the store)
    ledger.py     what is stored: usage, per-namespace totals, the turnover clock, their metrics
    pins.py       entries being read out, which eviction skips
    limits.py     the numbers all of them check against

This module keeps what spans the store and the index, under one lock. Invariants it keeps:

- RocksDB is written first, the index second; an index failure rolls the store write back, and at
  startup `open()` repairs whatever a crash left between the two (points with no entry are removed,
  entries with no point are re-indexed from their stored vectors).
- A lookup or fetch never crosses namespaces: every index search is confined to one namespace and
  every fetch checks the entry's recorded namespace.
- Stored bytes stay within the budget: crossing the high watermark evicts, in the policy's order, down
  to the low watermark.
- A pinned entry (being streamed out, or waiting on the data port) is never evicted.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time

import crc32c

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from . import validate
from .entries import NamespaceKey, Usage, entry_id
from .errors import Corrupt, InvalidRequest, NotFound, Unavailable
from .eviction import EvictionPolicy
from .index import IndexPoint, VectorIndex
from .ledger import Ledger
from .limits import Limits
from .metrics import Metrics
from .pins import PinnedChunks, Pins
from .ranking import Ranker, Ranking
from .steps import StepTable
from .store import NamespaceInfo, PendingPut, Store

log = logging.getLogger(__name__)

REINDEX_BATCH = 512  # points per index upsert when open() re-indexes entries


class PutSession:
    """One Put stream: validated header first, then chunks, then `finish`. Nothing is stored before."""

    def __init__(self, cache: Cache, header: pb.PutHeader, ns: NamespaceKey, eid: str, existing: bool):
        self._cache = cache
        self.header = header
        self.ns = ns
        self.entry_id = eid
        self.existing = existing  # already stored: the caller may skip the upload
        self.received = 0
        self._digest = hashlib.sha256()
        self._crc = 0  # CRC-32C so far, checked when the header declares one
        self._pending = cache.store.begin_put(eid)

    def add_chunk(self, data: bytes) -> None:
        if len(data) > wire.CHUNK_BYTES:
            raise InvalidRequest(f"chunk of {len(data)} bytes exceeds the 1 MiB chunk limit")
        if not data:
            raise InvalidRequest("empty chunk")
        self.received += len(data)
        if self.received > self.header.blob.size:
            raise InvalidRequest(f"stream carries more than the declared {self.header.blob.size} bytes")
        self._digest.update(data)
        if self.header.blob.HasField("crc32c"):
            self._crc = crc32c.crc32c(data, value=self._crc)
        self._pending.add_chunk(data)

    def finish(self) -> pb.PutResponse:
        size = self.header.blob.size
        if self.received != size:
            raise InvalidRequest(f"stream ended after {self.received} of {size} declared bytes")
        if self._digest.digest() != self.header.blob.sha256:
            raise Corrupt(f"blob checksum mismatch: declared sha256 {self.header.blob.sha256.hex()}, "
                          f"received {self._digest.hexdigest()}")
        if self.header.blob.HasField("crc32c") and self._crc != self.header.blob.crc32c:
            raise Corrupt(f"blob checksum mismatch: declared crc32c {self.header.blob.crc32c:08x}, "
                          f"received {self._crc:08x}")
        return self._cache._commit(self, self._pending)


class Cache:
    def __init__(self, store: Store, index: VectorIndex, policy: EvictionPolicy, steps: StepTable,
                 metrics: Metrics, limits: Limits):
        self.store = store
        self.index = index
        self.policy = policy
        self.metrics = metrics
        self.limits = limits
        self.evictions = 0  # entries evicted since this daemon started
        # Guards the ledger and keeps each compound step (check, store, index, ledger) whole.
        self._lock = threading.RLock()
        self._ledger = Ledger(policy, metrics, limits)
        self._pins = Pins()
        self._ranker = Ranker(index, store, steps)

    @property
    def clock(self) -> float:
        """The utility policy's clock, in cache turnovers (ledger.py)."""
        return self._ledger.clock

    # ---- startup ----
    def open(self) -> None:
        """Load entries into the ledger and the policy, then reconcile the index with the store."""
        ledger = self._ledger
        ledger.restore_namespaces(self.store.namespaces())
        to_index: list[IndexPoint] = []
        indexed = set(self.index.entry_ids())
        for eid, header, usage in self.store.entries():
            ns_key = NamespaceKey.of(header.namespace).key
            if usage is None or eid not in indexed:  # the rare paths that need the vectors
                header.vectors.CopyFrom(self.store.vectors(eid))
            ledger.restore(eid, ns_key, usage or ledger.new_usage(header, time.time()))
            if eid not in indexed:
                # Checked when put; no limit here, so that a lowered max_vector_dim drops no stored entry.
                to_index.append(IndexPoint(eid, ns_key, validate.vectors(header.vectors, None, sys.maxsize)))
            indexed.discard(eid)
        if indexed:  # points whose entry is gone: written to the index, then the store write was lost
            self.index.delete(sorted(indexed))
            self.metrics.reconciled.labels("orphan_point").inc(len(indexed))
            log.warning("reconcile: removed %d index points with no stored entry", len(indexed))
        for start in range(0, len(to_index), REINDEX_BATCH):
            self.index.upsert(to_index[start:start + REINDEX_BATCH])
        if to_index:
            self.metrics.reconciled.labels("reindexed").inc(len(to_index))
            log.warning("reconcile: re-indexed %d stored entries missing from the index", len(to_index))
        self._evict_if_needed()
        log.info("cache open: %d entries, %d bytes, %d namespaces", len(ledger), ledger.total_bytes,
                 ledger.namespace_count)

    # ---- put ----
    def begin_put(self, header: pb.PutHeader) -> PutSession:
        ns = validate.namespace_of(header)
        known = self._ledger.namespace(ns.key)
        validate.put_header(header, known.dim if known else None, self.limits)
        eid = entry_id(ns, header.prompt, header.blob)
        with self._lock:
            existing = eid in self._ledger
        return PutSession(self, header, ns, eid, existing)

    def _commit(self, session: PutSession, pending: PendingPut) -> pb.PutResponse:
        """Store the received entry, then index it; count it only once both hold it."""
        header, ns, eid = session.header, session.ns, session.entry_id
        vectors = validate.vectors(header.vectors, None, self.limits.max_vector_dim)
        with self._lock:
            if eid in self._ledger:
                return pb.PutResponse(entry_id=eid, created=False, stored_bytes=self._ledger.size_of(eid))
            known = self._ledger.namespace(ns.key)
            if known is not None and known.dim != vectors["full"].size:  # a concurrent first Put won
                raise InvalidRequest(f"vectors.full has dimension {vectors['full'].size}, "
                                     f"this namespace uses {known.dim}")
            new_ns = None if known else NamespaceInfo(ns.key, ns.name, int(vectors["full"].size))
            usage = self._ledger.new_usage(header, time.time())
            self.store.commit(pending, header, usage, new_ns)
            try:
                self.index.upsert([IndexPoint(eid, ns.key, vectors)])
            except Exception as exc:
                self.store.delete(eid)  # never leave an entry that lookups cannot find
                log.exception("index upsert failed; put of %s rolled back", eid)
                raise Unavailable(f"vector index unavailable: {exc}") from exc
            self._ledger.admit(eid, ns.key, usage, new_ns)
            self._evict_if_needed()
        self.metrics.payload.labels("Put").observe(header.blob.size)
        return pb.PutResponse(entry_id=eid, created=True, stored_bytes=usage.size)

    # ---- lookup ----
    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        ns = validate.namespace_of(request)
        known = self._ledger.namespace(ns.key)
        query = validate.lookup_query(request, ns, known.dim if known else None, self.limits.max_vector_dim)
        ranking = self._ranker.rank(query) if known is not None else Ranking.miss("unknown_namespace")
        self.metrics.lookups.labels(ns.name, ranking.result).inc()
        if ranking.result == "miss":
            self.metrics.misses.labels(ns.name, ranking.miss_reason).inc()
            return pb.LookupResponse(miss_reason=ranking.miss_reason)
        return pb.LookupResponse(candidates=ranking.candidates)

    # ---- fetch ----
    def fetch(self, request: pb.FetchRequest) -> tuple[pb.FetchHeader, PinnedChunks]:
        """The entry's header and its chunks, the fetch credited to the entry. The entry stays pinned
        until the chunks are exhausted or closed."""
        ns, eid, role = validate.fetch_request(request)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
            self._pins.pin(eid)
            usage = self._ledger.record_fetch(eid, ns.name, role, request.granted_steps, time.time())
        try:
            header = self.store.record(eid)
            if header is None:
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
            self.store.put_usage(eid, usage)
        except BaseException:
            self._pins.unpin(eid)
            raise
        self.metrics.payload.labels("Fetch").observe(header.blob.size)
        return (pb.FetchHeader(entry_id=eid, prompt=header.prompt, blob=header.blob),
                PinnedChunks(self.store.read_blob(eid), lambda: self._pins.unpin(eid)))

    # ---- delete and evict ----
    def delete(self, request: pb.DeleteRequest) -> bool:
        ns, eid = validate.addressed(request)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):
                return False
            self._delete_entries([eid])
        return True

    def verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse:
        """Re-read an entry with every check on; delete it if its bytes are not what was stored."""
        ns, eid = validate.addressed(request)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
        header = self.store.record(eid)
        if header is None:
            raise NotFound(f"no entry {eid} in namespace {ns.name}")
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in self.store.read_blob(eid, checked=True):
                digest.update(chunk)
                size += len(chunk)
            intact = size == header.blob.size and digest.digest() == header.blob.sha256
        except Exception as exc:  # RocksDB's own checksum failed
            log.error("entry %s: reading it back failed: %s", eid, exc)
            intact = False
        if intact:
            return pb.VerifyResponse(intact=True)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):  # deleted meanwhile
                return pb.VerifyResponse(intact=False)
            self._delete_entries([eid])
        self.metrics.corrupt.inc()
        log.error("entry %s in namespace %s is corrupt on disk: deleted", eid, ns.name)
        return pb.VerifyResponse(intact=False, deleted=True)

    def _delete_entries(self, eids: list[str]) -> int:
        """Store first, then the index; a crash in between leaves orphan points that open() removes.
        Returns the bytes freed."""
        freed = 0
        for eid in eids:
            self.store.delete(eid)
            freed += self._ledger.remove(eid).size
        try:
            self.index.delete(eids)
        except Exception:  # the entries are gone from the store; stale points are skipped by lookups
            log.exception("index delete failed for %d entries; they will be reconciled", len(eids))
        return freed

    def _evict_if_needed(self) -> None:
        limits = self.limits
        total = self._ledger.total_bytes
        if total <= limits.max_bytes * limits.high_watermark:
            return
        target = limits.max_bytes * limits.low_watermark
        victims, projected = [], total
        for eid in self.policy.victims():
            if projected <= target:
                break
            if eid in self._pins:  # being read out
                continue
            victims.append(eid)
            projected -= self._ledger.size_of(eid)
        freed = self._delete_entries(victims)
        self.evictions += len(victims)
        self.metrics.evictions.labels(self.policy.name).inc(len(victims))
        self.metrics.evicted_bytes.labels(self.policy.name).inc(freed)
        log.info("evicted %d entries (%d bytes) by %s", len(victims), freed, self.policy.name)

    # ---- stats ----
    def stats(self) -> pb.StatsResponse:
        with self._lock:
            ledger = self._ledger
            return pb.StatsResponse(entries=len(ledger), bytes=ledger.total_bytes, blob_bytes=ledger.blob_bytes,
                                    max_bytes=self.limits.max_bytes, eviction_policy=self.policy.name,
                                    index_backend=self.index.name, evictions=self.evictions,
                                    namespaces=ledger.namespace_stats())

    def close(self) -> None:
        """Close the index, then the store (the index is derived from it)."""
        self.index.close()
        self.store.close()

    def usage_of(self, eid: str) -> Usage | None:
        with self._lock:
            return self._ledger.usage(eid)
