"""The cache core's façade: put, lookup, fetch, delete, verify and stats over the store, the index and
a policy, plus reconciliation of the index with the store, and eviction.

It speaks in protobuf messages and domain errors (errors.py), never in gRPC terms, so it can be
driven by the server, the data port's caller or directly by a benchmark. The work is split by job,
and data flows one way, from this module down:

    validate.py   request checks -> domain errors (no state)
    ranking.py    index neighbours -> ranked candidates (reads the index and the store)
    steps.py      each namespace's step tables: its own (set, or changed by the guard) or the flags'
    quality.py    the online quality guard: reported losses -> the namespace's tables
    ledger.py     what is stored: usage, per-namespace totals, the turnover clock, their metrics
    pins.py       entries being read out, which eviction skips
    limits.py     the numbers all of them check against
    tenants.py    per-tenant limits: request and Verify rates, namespaces, byte quotas, fair shares
    scrub.py      the blob check Verify shares with the background scrubber (which calls back `check_entry`)

This module keeps what spans the store and the index, under one lock. Invariants it keeps:

- RocksDB is written first, the index second; an index failure rolls the store write back, and each
  namespace is reconciled before its first use after a start (`_reconcile`: points with no entry are
  removed, entries with no point are re-indexed from their stored vectors), so whatever a crash left
  between the two is repaired before any call reads or writes that namespace's index. Per namespace
  and on demand, not all at startup, because listing the index's ids means loading every shard: with
  a shard per namespace that made a restart grow with the namespace count (docs/namespaces.md). A
  namespace whose index points were lost while the daemon runs (IndexEvents.namespace_lost) is
  reconciled again before its next use.
- A lookup or fetch never crosses namespaces: every index search is confined to one namespace and
  every fetch checks the entry's recorded namespace.
- Stored bytes stay within the budget: crossing the high watermark evicts, in the policy's order, down
  to the low watermark. With tenant_max_bytes set, each tenant's bytes stay within its quota the same
  way, by evicting only its own entries, and the global pass takes from tenants over their fair share
  first (`_evict_if_needed` has the rule).
- Every Put, Lookup, Fetch, Delete, Verify and ReportQuality of a tenant takes a token of its request
  bucket before any work, and a Verify its blob's bytes of its Verify budget (tenants.py): past either
  it is refused (RESOURCE_EXHAUSTED).
- A pinned entry (being streamed out, or waiting on the data port) is never evicted.
- A full disk refuses writes, never reads: a Put the store refuses (store.DiskFull) is TooLarge
  (RESOURCE_EXHAUSTED) and makes room, oldest entries first, a share at a time, until the disk would
  have the store's reserve and two memtables free again (the disk, not the budget, is then the limit;
  the same at startup, and when the store's folder stays over its target); a Delete it refuses is
  TooLarge too; a fetch's usage write is skipped, the fetch served (`_make_room`, docs/hardening.md).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from . import scrub, steps, validate
from .entries import NamespaceKey, Usage, entry_id, record_size, split_record
from .errors import Corrupt, InvalidRequest, NotFound, TooLarge, Unavailable
from .eviction import EvictionPolicy
from .index import IndexPoint, VectorIndex
from .index.base import IndexEvents
from .ledger import Ledger
from .limits import Limits
from .metrics import Metrics
from .pins import PinnedChunks, Pins
from .quality import GuardSettings, QualityGuard, checked_samples
from .ranking import Gathered, Ranker, Ranking, decide
from .steps import Entry, StepTable, TableRegistry, Tables
from .store import DiskFull, NamespaceInfo, PendingPut, Store, folder_bytes
from .tenants import TenantLimits, fair_share
from .validate import LookupQuery

log = logging.getLogger(__name__)

REINDEX_BATCH = 512  # points per index upsert when open() re-indexes entries
MAKE_ROOM_EVERY_S = 2.0  # a full disk evicts at most this often (what it frees shows only after compaction)
DISK_SAMPLE_S = 1.0  # how stale Stats' and the metric's disk_bytes may be (a walk of every file in the folder)
MAKE_ROOM_SHARE = 0.1  # of the stored bytes, the most one pass of _make_room evicts (at least one entry)


def _ignore(*_: object) -> None:
    return None


@dataclass
class CacheEvents:
    """What the cache tells its owner (a cluster node, daemon/cluster/), from the thread that did it and
    with the cache's lock held: the callbacks must only queue."""

    fetched: Callable[[str, str | None, int], None] = _ignore  # entry id, role, granted steps: a fetch served
    evicted: Callable[[list[str]], None] = _ignore  # entry ids evicted (by the budget or a full disk)


class PutSession:
    """One Put stream: validated header first, then chunks, then `finish`, or `close` to give it up
    (a stream cut short, refused or cancelled); nothing is an entry before `finish`. The chunks go to
    the store as they come, except with `keep` (a cluster's coordinator, which forwards the blob and
    may not be one of its owners): they are kept, in `chunks`, and written here only by `finish`."""

    def __init__(self, cache: Cache, header: pb.PutHeader, ns: NamespaceKey, eid: str, existing: bool,
                 keep: bool = False):
        self._cache = cache
        self.header = header
        self.ns = ns
        self.entry_id = eid
        self.existing = existing  # already stored: the caller may skip the upload
        self.received = 0
        self._digest = hashlib.sha256() if header.blob.sha256 else None  # checked when declared, as the CRC
        self._crc = 0  # CRC-32C so far, checked when the header declares one
        self._pending = cache.store.begin_put(eid, header.blob.size)
        self.chunks: list[bytes] | None = [] if keep else None

    def add_chunk(self, data: bytes) -> None:
        if len(data) > wire.CHUNK_BYTES:
            raise InvalidRequest(f"chunk of {len(data)} bytes exceeds the 1 MiB chunk limit")
        if not data:
            raise InvalidRequest("empty chunk")
        self.received += len(data)
        if self.received > self.header.blob.size:
            raise InvalidRequest(f"stream carries more than the declared {self.header.blob.size} bytes")
        if self._digest is not None:
            self._digest.update(data)
        if self.header.blob.HasField("crc32c"):
            self._crc = crc32c.crc32c(data, value=self._crc)
        if self.chunks is not None:
            self.chunks.append(data)
        else:
            self._pending.add_chunk(data)

    def finish(self) -> pb.PutResponse:
        """Check the blob (`check`) and store the entry here."""
        try:
            self.check()
            for chunk in self.chunks or ():
                self._pending.add_chunk(chunk)
            return self._cache._commit(self, self._pending)
        finally:
            self._pending.close()

    def close(self) -> None:
        """Give up what was written of the blob, unless `finish` stored it (then a no-op). Not while
        `finish` runs in another thread."""
        self._pending.close()

    def check(self) -> None:
        """InvalidRequest or Corrupt unless exactly the declared bytes, with the declared checksums, came."""
        size = self.header.blob.size
        if self.received != size:
            raise InvalidRequest(f"stream ended after {self.received} of {size} declared bytes")
        if self._digest is not None and self._digest.digest() != self.header.blob.sha256:
            raise Corrupt(f"blob checksum mismatch: declared sha256 {self.header.blob.sha256.hex()}, "
                          f"received {self._digest.hexdigest()}")
        if self.header.blob.HasField("crc32c") and self._crc != self.header.blob.crc32c:
            raise Corrupt(f"blob checksum mismatch: declared crc32c {self.header.blob.crc32c:08x}, "
                          f"received {self._crc:08x}")


class Cache:
    def __init__(self, store: Store, index: VectorIndex, policy: EvictionPolicy, steps: StepTable,
                 metrics: Metrics, limits: Limits, shared_index: bool = False, guard: GuardSettings | None = None):
        self.store = store
        # The index is a cluster's, shared with the other daemons (a Qdrant server): its points carry
        # their records; this daemon's reconciliation adds its own entries' points and never removes one
        # for an entry it does not hold (another daemon does); dropping a copy that is not the entry's
        # last (a hand-off, a corrupt copy) keeps the point. docs/cluster.md, "One Qdrant for the cluster".
        self.shared_index = shared_index
        self.index = index
        self.policy = policy
        self.metrics = metrics
        self.limits = limits
        self.evictions = 0  # entries evicted since this daemon started
        self.tenants = TenantLimits(limits)
        metrics.namespace_labels.set_limit(limits.metrics_max_namespaces)
        # Guards the ledger and keeps each compound step (check, store, index, ledger) whole.
        self._lock = threading.RLock()
        self._ledger = Ledger(policy, metrics, limits)
        self._pins = Pins()
        self.steps = steps
        self.registry = TableRegistry(steps, self._persist_tables)
        self.quality = QualityGuard(self.registry, guard or GuardSettings(), metrics, self._persist_guard)
        self._ranker = Ranker(index, store, self.registry)
        self.events = CacheEvents()
        self.data_dir = Path(store.path).parent  # build.open_cache keeps the store in <data_dir>/store
        self._made_room_at = -MAKE_ROOM_EVERY_S
        self._reclaimer: threading.Thread | None = None
        self.scrubber: scrub.Scrubber | None = None
        metrics.disk_full.set_function(lambda: 1 if store.full else 0)
        self._disk_sample = (-DISK_SAMPLE_S, 0)  # (monotonic time, the data folder's bytes)
        metrics.disk_bytes.set_function(self.disk_bytes)
        metrics.segment_bytes.labels("live").set_function(lambda: store.segments.bytes()[1])
        metrics.segment_bytes.labels("dead").set_function(lambda: store.segments.dead_bytes())
        store.on_collected = metrics.collected_bytes.inc
        # Namespaces not reconciled with the index since this start: namespace key -> ids of its stored
        # entries, kept current by deletes (under the lock). open() fills it; a namespace leaves it at its
        # first use (_ensure_reconciled).
        self._unreconciled: dict[str, set[str]] = {}
        self._indexed_namespaces: set[str] = set()  # index.namespaces() at open(): the others have no points
        self._lost: set[str] = set()  # namespaces whose points the index lost since they were reconciled
        self._losses = 0  # namespace_lost events so far: a reconciliation that saw this change reads again
        self._lost_lock = threading.Lock()  # the index reports losses from any thread, holding its own locks
        index.listen(IndexEvents(namespace_lost=self._index_lost, shard_loaded=metrics.shard_loads.inc))
        metrics.open_shards.set_function(index.open_shards)

    @property
    def clock(self) -> float:
        """The utility policy's clock, in cache turnovers (ledger.py)."""
        return self._ledger.clock

    # ---- startup ----
    def open(self) -> None:
        """Load entries into the ledger and the policy, then reconcile the index with the store; say
        what the store's log recovery lost; evict if over the budget or if the disk is nearly full."""
        ledger = self._ledger
        if self.store.lost_puts:
            self.metrics.lost.inc(self.store.lost_puts)
            log.error("startup: %d acknowledged puts are missing: RocksDB's write-ahead log was damaged or cut "
                      "short after they were acknowledged, and its recovery dropped them", self.store.lost_puts)
        namespaces = self.store.namespaces()
        ledger.restore_namespaces(namespaces)
        self.registry.load(self.store.step_tables())
        self.quality.load(self.store.guard_figures())
        self._indexed_namespaces = self.index.namespaces()
        stored: dict[str, set[str]] = {ns_key: set() for ns_key in self._indexed_namespaces}
        keys: dict[bytes, str] = {}  # a namespace's encoding -> its key: one sha256 per namespace, not per entry
        for eid, header, usage in self.store.entries():
            encoded = header.namespace.SerializeToString(deterministic=True)
            ns_key = keys.get(encoded) or keys.setdefault(encoded, NamespaceKey.of(header.namespace).key)
            if usage is None:  # the rare path that needs the vectors (a new usage counts their bytes)
                header.vectors.CopyFrom(self.store.vectors(eid))
            ledger.restore(eid, ns_key, usage or ledger.new_usage(header, time.time()), header.namespace.tenant)
            stored.setdefault(ns_key, set()).add(eid)
        ledger.finish_restore()
        with self._lock:
            self._unreconciled = stored
            # Index points of a namespace the store never recorded are all orphans, and no call would ever
            # use that namespace to reconcile it: now (rare: the store was replaced under the index). In a
            # shared index they are other daemons' points.
            for ns_key in sorted(set() if self.shared_index else self._indexed_namespaces - namespaces.keys()):
                self._reconcile(ns_key)
        self.metrics.namespaces.set(ledger.namespace_count)
        with self._lock:
            for tenant in sorted(ledger.tenant_holdings()):  # tenant_max_bytes may have been lowered
                self._evict_tenant(tenant)
        self._evict_if_needed()
        with self._lock:
            self._make_room(0)
        log.info("cache open: %d entries, %d bytes, %d namespaces (each reconciled with the index at its first "
                 "use)", len(ledger), ledger.total_bytes, ledger.namespace_count)

    # ---- reconciliation ----
    def _index_lost(self, ns_key: str) -> None:
        """IndexEvents.namespace_lost: reconcile the namespace again before its next use. Called by the
        index from any thread with its locks held, so it takes no cache lock."""
        with self._lost_lock:
            self._lost.add(ns_key)
            self._losses += 1

    def _needs_reconciling(self, ns_key: str) -> bool:
        return ns_key in self._unreconciled or ns_key in self._lost

    def _ensure_reconciled(self, ns_key: str) -> None:
        """Before a call reads or writes a namespace's index points: reconcile the namespace if it has not
        been since this start (or since the index lost its points). The index is read first outside the
        lock when the caller does not hold it (loading a large shard and listing its ids takes a while,
        and every other namespace's puts and fetches need the lock); the lock then settles what changed
        meanwhile. Unavailable if the index fails; the namespace stays unreconciled, to try again."""
        if not self._needs_reconciling(ns_key):
            return
        losses = self._losses
        try:
            indexed = self._indexed_ids(ns_key)
            with self._lock:
                self._reconcile(ns_key, indexed if losses == self._losses else None)
        except Exception as exc:
            log.exception("reconciling namespace %s with the index failed", self._name_of(ns_key))
            raise Unavailable(f"vector index unavailable: {exc}") from exc

    def _indexed_ids(self, ns_key: str) -> set[str]:
        if ns_key in self._indexed_namespaces or ns_key in self._lost:
            return set(self.index.entry_ids(ns_key))
        return set()  # the index had nothing of it at open(), and only a reconciliation writes it before

    def _reconcile(self, ns_key: str, indexed: set[str] | None = None) -> None:
        """Make the namespace's index points those of its stored entries: remove points with no entry (the
        store write was lost, or the entry deleted before the index delete was flushed) and re-index
        entries with no point (the index write was lost: a crash before the shard's flush). `indexed`:
        the ids the index held, read by the caller since the last loss; None reads them here. Under the
        lock; a no-op for a namespace that needs none."""
        while self._needs_reconciling(ns_key):
            losses = self._losses
            if indexed is None:
                indexed = self._indexed_ids(ns_key)
            expected = self._unreconciled.get(ns_key)
            if expected is None:  # lost since its reconciliation: the store says what it holds now
                expected = {eid for eid, _, _ in self.store.entries() if self._ledger.namespace_of(eid) == ns_key}
            orphans = [] if self.shared_index else sorted(indexed - expected)
            missing = sorted(expected - indexed)
            if orphans:
                self.index.delete(orphans, namespace_key=ns_key)
                self.metrics.reconciled.labels("orphan_point").inc(len(orphans))
                log.warning("reconcile %s: removed %d index points with no stored entry", self._name_of(ns_key),
                            len(orphans))
            for start in range(0, len(missing), REINDEX_BATCH):
                # Checked when put; no limit here, so that a lowered max_vector_dim drops no stored entry.
                self.index.upsert([self._point(eid, ns_key, validate.vectors(self.store.vectors(eid), None,
                                                                              sys.maxsize))
                                   for eid in missing[start:start + REINDEX_BATCH]])
            if missing:
                self.metrics.reconciled.labels("reindexed").inc(len(missing))
                log.warning("reconcile %s: re-indexed %d stored entries missing from the index",
                            self._name_of(ns_key), len(missing))
            with self._lost_lock:
                if losses == self._losses:  # else the index lost points meanwhile: once more
                    self._unreconciled.pop(ns_key, None)
                    self._lost.discard(ns_key)
            indexed = None

    def _point(self, eid: str, ns_key: str, vectors: Mapping[str, Sequence[float]],
               header: pb.PutHeader | None = None) -> IndexPoint:
        """The entry's index point; in a shared index with its record (the stored header, no vectors)."""
        if not self.shared_index:
            return IndexPoint(eid, ns_key, vectors)
        record = split_record(header)[0] if header is not None else self.store.record(eid)
        return IndexPoint(eid, ns_key, vectors, record.SerializeToString() if record is not None else b"")

    def _name_of(self, ns_key: str) -> str:
        known = self._ledger.namespace(ns_key)
        return known.name if known else ns_key

    # ---- put ----
    def begin_put(self, header: pb.PutHeader, *, charge: bool = True, keep: bool = False) -> PutSession:
        """A Put of `header`, checked. `charge`: take a token of the tenant's request bucket (a cluster's
        copies are charged once, where the client's Put came in); `keep`: see PutSession."""
        ns = validate.namespace_of(header)
        tenant = header.namespace.tenant
        if charge:
            self.tenants.request(tenant)
        known = self._ledger.namespace(ns.key)
        validate.put_header(header, known.dim if known else None, self.limits)
        self.tenants.entry_fits(record_size(header), tenant)
        if known is None:
            validate.new_namespace(ns, self._ledger.namespace_count, self.limits)
            self.tenants.new_namespace(ns, tenant, self._ledger.tenant_namespace_count(tenant))
        eid = entry_id(ns, header.prompt, header.blob, header.writer)
        with self._lock:
            existing = eid in self._ledger
        return PutSession(self, header, ns, eid, existing, keep)

    def _commit(self, session: PutSession, pending: PendingPut) -> pb.PutResponse:
        """Store the received entry, then index it; count it only once both hold it."""
        header, ns, eid = session.header, session.ns, session.entry_id
        tenant = header.namespace.tenant
        vectors = validate.vectors(header.vectors, None, self.limits.max_vector_dim)
        with self._lock:
            if eid in self._ledger:
                return pb.PutResponse(entry_id=eid, created=False, stored_bytes=self._ledger.size_of(eid))
            known = self._ledger.namespace(ns.key)
            if known is not None and known.dim != vectors["full"].size:  # a concurrent first Put won
                raise InvalidRequest(f"vectors.full has dimension {vectors['full'].size}, "
                                     f"this namespace uses {known.dim}")
            if known is None:  # checked by begin_put too, but other first Puts may have come in since
                validate.new_namespace(ns, self._ledger.namespace_count, self.limits)
                self.tenants.new_namespace(ns, tenant, self._ledger.tenant_namespace_count(tenant))
            self._ensure_reconciled(ns.key)
            new_ns = None if known else NamespaceInfo(ns.key, ns.name, int(vectors["full"].size))
            usage = self._ledger.new_usage(header, time.time())
            try:
                self.store.commit(pending, header, usage, new_ns)
            except DiskFull as exc:
                self.metrics.refused_writes.labels("put").inc()
                self._make_room(0)
                raise TooLarge(f"{exc}; the daemon evicts entries to make room, try again later") from exc
            try:
                self.index.upsert([self._point(eid, ns.key, vectors, header)])
            except Exception as exc:
                self.store.delete(eid)  # never leave an entry that lookups cannot find
                log.exception("index upsert failed; put of %s rolled back", eid)
                raise Unavailable(f"vector index unavailable: {exc}") from exc
            self._ledger.admit(eid, ns.key, usage, new_ns, tenant)
            if new_ns is not None:
                self.metrics.namespaces.set(self._ledger.namespace_count)
            self._evict_tenant(tenant)
            self._evict_if_needed(tenant)
            if over := self.store.over_target():  # collection and compaction did not catch up within the put's wait
                self._make_room(over)
        self.metrics.payload.labels("Put").observe(header.blob.size)
        return pb.PutResponse(entry_id=eid, created=True, stored_bytes=usage.size)

    # ---- lookup ----
    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        self.tenants.request(request.namespace.tenant)
        query = self.lookup_query(request)
        return self.publish(query, decide(query, self.gather(query), self.tables_for(query)))

    def tables_for(self, query: LookupQuery) -> Tables:
        """The step tables the query's namespace ranks by (its own, or the flags')."""
        return self.registry.tables(query.ns.key, query.ns.name)

    def lookup_query(self, request: pb.LookupRequest) -> LookupQuery:
        """The request checked (validate.lookup_query), against this node's dimension of its namespace."""
        ns = validate.namespace_of(request)
        known = self._ledger.namespace(ns.key)
        return validate.lookup_query(request, ns, known.dim if known else None, self.limits.max_vector_dim)

    def gather(self, query: LookupQuery) -> Gathered:
        """This node's candidates for `query` (ranking.Gathered), its namespace reconciled first."""
        if self._ledger.namespace(query.ns.key) is None and not self.shared_index:
            return Gathered(known=False)
        self._ensure_reconciled(query.ns.key)
        gathered = self._ranker.gather(query)
        if query.ns.key in self._lost:  # the search found the namespace's shard damaged: repair, then search again
            self._ensure_reconciled(query.ns.key)
            gathered = self._ranker.gather(query)
        return gathered

    def publish(self, query: LookupQuery, ranking: Ranking) -> pb.LookupResponse:
        """A ranking as the Lookup's answer, counted (lookups, misses)."""
        label = self._ledger.metric_label(query.ns.key)  # "_other" for a namespace the daemon does not hold
        self.metrics.lookups.labels(label, ranking.result).inc()
        if ranking.result == "miss":
            self.metrics.misses.labels(label, ranking.miss_reason).inc()
            return pb.LookupResponse(miss_reason=ranking.miss_reason)
        return pb.LookupResponse(candidates=ranking.candidates)

    # ---- step tables and the quality guard (docs/step_tables.md) ----
    def set_step_tables(self, request: pb.SetStepTablesRequest) -> pb.StepTablesResponse:
        """Set the namespace's own tables (checked: steps.checked), or with `reset` drop them (back to the
        flags); the guard's figures of the namespace restart. Persisted before they apply; the answer is
        the effective tables. The caller is an admin (the server checks). The namespace need hold no
        entry: tables may be calibrated before it serves."""
        ns = validate.namespace_of(request)
        tables = None if request.reset else steps.checked(request.tables, self.steps.composed_max_fraction)
        with self.registry.lock:
            self.registry.put(ns.key, ns.name, None if tables is None else Entry(ns.name, tables, tables))
            self.quality.forget(ns.key)
        log.info("step tables of namespace %s %s", ns.name, "reset to the flags'" if tables is None else "set")
        return self.quality.describe(ns, request.namespace.total_steps)

    def step_tables(self, request: pb.StepTablesRequest) -> pb.StepTablesResponse:
        ns = validate.namespace_of(request)
        return self.quality.describe(ns, request.namespace.total_steps)

    def copy_step_tables(self, namespace: pb.Namespace, admin: pb.StepTables | None,
                         current: pb.StepTables | None, version: int = 0) -> pb.StepTablesResponse:
        """Another cluster member's tables for the namespace (NodeService.CopyStepTables): `admin` those
        set (None: the flags'), `current` those in use (None: back to the flags), checked and kept as
        they are if `version` is newer than this node's (TableRegistry.offer); the answer is this
        node's tables after it."""
        ns = validate.namespace_of(pb.StepTablesRequest(namespace=namespace))
        self.offer_step_tables(ns.key, ns.name, admin, current, version)
        return self.quality.describe(ns, namespace.total_steps)

    def offer_step_tables(self, ns_key: str, name: str, admin: pb.StepTables | None, current: pb.StepTables | None,
                          version: int) -> bool:
        """A member's version of a namespace's tables, kept if newer (then this node's guard figures of
        the namespace restart); whether it was kept. InvalidRequest for tables that do not check out."""
        cap, most = self.steps.composed_max_fraction, steps.MAX_TIERS ** 2  # derived composed lists are longer
        entry = None
        if current is not None:
            entry = Entry(name, steps.checked(admin, cap, most) if admin is not None else None,
                          steps.checked(current, cap, most))
        with self.registry.lock:
            kept = self.registry.offer(ns_key, name, entry, version)
            if kept:
                self.quality.forget(ns_key)
        return kept

    def report_quality(self, request: pb.ReportQualityRequest, *, charge: bool = True) -> pb.ReportQualityResponse:
        """A worker's paired quality losses for the guard (quality.py). `charge`: a request token of the
        tenant, like any call (a cluster's deciding member is not charged again). Only namespaces the
        daemon holds, or that have tables of their own, keep figures (any client can make up names, and
        figures cost memory): other samples are stale."""
        ns = validate.namespace_of(request)
        if charge:
            self.tenants.request(request.namespace.tenant)
        samples = checked_samples(request)
        if self._ledger.namespace(ns.key) is None and self.registry.entry(ns.key) is None:
            return self.quality.unused(samples)
        return self.quality.report(ns, request.namespace.total_steps, samples)

    def _persist_guard(self, ns_key: str, value: bytes | None) -> None:
        try:
            self.store.put_guard_figures(ns_key, value)
        except DiskFull as exc:
            self.metrics.refused_writes.labels("guard_figures").inc()
            raise TooLarge(str(exc)) from exc

    def _persist_tables(self, ns_key: str, value: bytes) -> None:
        try:
            self.store.put_step_tables(ns_key, value)
        except DiskFull as exc:
            self.metrics.refused_writes.labels("step_tables").inc()
            raise TooLarge(f"{exc}; the step tables are unchanged, try again later") from exc

    # ---- fetch ----
    def fetch(self, request: pb.FetchRequest, *, charge: bool = True) -> tuple[pb.FetchHeader, PinnedChunks]:
        """The entry's header and its chunks, the fetch credited to the entry. The entry stays pinned
        until the chunks are exhausted or closed. `charge`: as begin_put's."""
        ns, eid, role = validate.fetch_request(request)
        if charge:
            self.tenants.request(request.namespace.tenant)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
            self._pins.pin(eid)
            usage = self._ledger.record_fetch(eid, role, request.granted_steps, time.time())
            self.events.fetched(eid, role, request.granted_steps)
        try:
            header = self.store.record(eid)
            if header is None:
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
            chunks = self.store.read_blob(eid)
        except BaseException:
            self._pins.unpin(eid)
            raise
        self._persist_usage(eid, usage)
        self.metrics.payload.labels("Fetch").observe(header.blob.size)
        return (pb.FetchHeader(entry_id=eid, prompt=header.prompt, blob=header.blob),
                PinnedChunks(chunks, lambda: self._pins.unpin(eid)))

    def _persist_usage(self, eid: str, usage: Usage) -> None:
        """Best effort: the ledger holds the fetch's credit either way, and a read never fails for its
        bookkeeping (a full disk, a store error); the next fetch of the entry writes it again."""
        try:
            written = self.store.put_usage(eid, usage)
        except Exception:
            log.warning("usage of %s not persisted", eid, exc_info=True)
            written = False
        if not written:
            self.metrics.refused_writes.labels("usage").inc()

    # ---- delete and evict ----
    def delete(self, request: pb.DeleteRequest) -> bool:
        ns, eid = validate.addressed(request)
        self.tenants.request(request.namespace.tenant)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):
                return False
            try:
                self._delete_entries([eid])
            except DiskFull as exc:
                raise TooLarge(f"{exc}; the entry is kept, try again later") from exc
        return True

    # ---- what a cluster's node asks of its own copy ----
    def held(self, eids: Iterable[str]) -> list[bool]:
        with self._lock:
            return [eid in self._ledger for eid in eids]

    def entry_count(self) -> int:
        with self._lock:
            return len(self._ledger)

    def entry_ids(self) -> list[str]:
        """Every entry held here, in no particular order (a snapshot)."""
        with self._lock:
            return self._ledger.entry_ids()

    def forget(self, eids: Iterable[str], namespace: pb.Namespace | None = None, *, last_copy: bool = True) -> int:
        """Delete entries held here (those not held, or not of `namespace` when given, are skipped); how
        many were deleted. Pinned ones are deleted too: their readers hold a snapshot of the blob
        (store.read_blob). Not `last_copy` (a hand-off: the owners hold it): a shared index keeps the
        points."""
        ns_key = NamespaceKey.of(namespace).key if namespace is not None else None
        with self._lock:
            present = [eid for eid in dict.fromkeys(eids) if eid in self._ledger
                       and (ns_key is None or self._ledger.holds(eid, ns_key))]
            before = len(self._ledger)
            self._delete_entries(present, unindex=last_copy or not self.shared_index)
            return before - len(self._ledger)

    def touch(self, eid: str, role: str | None, granted_steps: int) -> None:
        """Credit a fetch that another copy of the entry served, as `fetch` credits its own (not counted
        in the hit metrics: the node that served it counted it). Unknown entries are skipped."""
        with self._lock:
            if eid in self._ledger:
                usage = self._ledger.record_fetch(eid, role, granted_steps, time.time(), counted=False)
            else:
                return
        self._persist_usage(eid, usage)

    def blob_chunks(self, eid: str) -> list[bytes]:
        """The entry's blob as stored (one snapshot), in chunks of at most wire.CHUNK_BYTES."""
        return list(self.store.read_blob(eid))

    def record_of(self, eid: str) -> pb.PutHeader | None:
        """The entry's stored header, vectors included (what a copy elsewhere is put with)."""
        header = self.store.record(eid)
        if header is not None:
            header.vectors.CopyFrom(self.store.vectors(eid))
        return header

    def verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse:
        """Re-read an entry with every check on; delete it if its bytes are not what was stored. The
        tenant pays a request token, then the blob's bytes of its Verify budget (verify_bytes_per_second)
        before anything is read: past either, Refused."""
        ns, eid = validate.addressed(request)
        tenant = request.namespace.tenant
        self.tenants.request(tenant)
        with self._lock:
            usage = self._ledger.usage(eid) if self._ledger.holds(eid, ns.key) else None
        if usage is None:
            raise NotFound(f"no entry {eid} in namespace {ns.name}")
        self.tenants.verify_bytes(tenant, usage.blob_size)
        answer = self.check_entry(eid, ns, found_by="client")
        if answer is None:
            raise NotFound(f"no entry {eid} in namespace {ns.name}")
        return answer

    def check_entry(self, eid: str, ns: NamespaceKey, found_by: str) -> pb.VerifyResponse | None:
        """The one verify-and-delete path (Verify, the scrubber): re-read the entry's blob as committed
        and compare size and checksum with its record; a corrupt entry is deleted
        whole (store, index, ledger, under the lock), counted by `found_by`. None: no such entry."""
        with self._lock:
            if not self._ledger.holds(eid, ns.key):
                return None
        header = self.store.record(eid)
        if header is None:
            return None
        problem = scrub.blob_problem(self.store.read_blob(eid), header.blob)
        if problem is None:
            return pb.VerifyResponse(intact=True)
        with self._lock:
            if not self._ledger.holds(eid, ns.key):  # deleted meanwhile
                return pb.VerifyResponse(intact=False)
            self._delete_entries([eid], unindex=not self.shared_index)  # other copies are likely intact
        self.metrics.corrupt.labels(found_by).inc()
        log.error("entry %s in namespace %s is corrupt on disk (%s; found by the %s): deleted", eid, ns.name,
                  problem, found_by)
        return pb.VerifyResponse(intact=False, deleted=True)

    def _delete_entries(self, eids: list[str], unindex: bool = True) -> int:
        """Store first, then the index, a namespace at a time (the index then touches only that
        namespace's shards); a crash in between leaves orphan points that the namespace's reconciliation
        removes. An entry of a namespace not reconciled yet leaves the index alone: that reconciliation
        finds its point an orphan. Not `unindex`: the points stay (a shared index, where other copies
        remain). Returns the bytes freed."""
        freed = 0
        by_namespace: dict[str, list[str]] = {}
        try:
            for eid in eids:
                ns_key = self._ledger.namespace_of(eid)
                self.store.delete(eid)  # DiskFull or another error: this entry and the rest stay whole
                freed += self._ledger.remove(eid).size
                pending = self._unreconciled.get(ns_key) if ns_key is not None else None
                if pending is not None:
                    pending.discard(eid)
                elif ns_key is not None and unindex:
                    by_namespace.setdefault(ns_key, []).append(eid)
        finally:
            for ns_key, group in by_namespace.items():
                try:
                    self.index.delete(group, namespace_key=ns_key)
                except Exception:  # the entries are gone from the store; stale points are skipped by lookups
                    log.exception("index delete failed for %d entries; they will be reconciled", len(group))
        return freed

    def _evict_tenant(self, tenant: str) -> None:
        """Per-tenant quota (tenant_max_bytes; off at 0): a tenant holding more than high_watermark of it
        evicts its own entries, in the policy's order among them, down to low_watermark of it, so one
        tenant filling the cache evicts only its own entries. Called under the lock, after a Put of the
        tenant (and at startup for every tenant, in case the quota was lowered)."""
        held = self._ledger.tenant_bytes(tenant)
        if not self.tenants.over_quota(held):
            return
        victims = self._take(self.policy.victims(among=self._ledger.tenant_entries(tenant)), held,
                             self.tenants.quota_target())
        if victims:
            done = len(victims)
            self._evict(victims, f"tenant {tenant!r} over tenant_max_bytes ({self.limits.tenant_max_bytes})")
            self.metrics.tenant_evictions.inc(done - sum(1 for eid in victims if eid in self._ledger))

    def _take(self, ranked: list[str], held: int, target: float) -> list[str]:
        """The first of `ranked` (skipping pinned entries) whose bytes take `held` down to `target`."""
        victims = []
        for eid in ranked:
            if held <= target:
                break
            if eid in self._pins:  # being read out
                continue
            victims.append(eid)
            held -= self._ledger.size_of(eid)
        return victims

    def _evict_if_needed(self, tenant: str | None = None) -> None:
        """The global budget: crossing high_watermark x max_bytes evicts down to low_watermark x max_bytes.

        Without tenant quotas (tenant_max_bytes = 0), in the policy's order over every entry. With them,
        victims are taken in tiers, each in the policy's order among its entries, until the target holds:

        1. the entries of `tenant`, whose Put crossed the budget, while it holds more than its fair share;
        2. the entries of every tenant holding more than its fair share, each while it still does;
        3. any entry (reached only when pinned entries kept the tiers above from reaching the target).

        A tenant's fair share is the max-min fair share of the target among the tenants holding entries
        (tenants.fair_share: a tenant holding less leaves the rest of its share to the others). So a
        tenant holding no more than its fair share never loses an entry to a global pass while any
        tenant over its share has an entry to evict, and the tenant filling the cache pays first.
        Sizing quotas so that their sum over the tenants is at most low_watermark x max_bytes means no
        global pass ever runs: then no tenant within its quota loses an entry because of another
        (docs/security.md, "Per-tenant limits"). Called under the lock."""
        limits = self.limits
        total = self._ledger.total_bytes
        if total <= limits.max_bytes * limits.high_watermark:
            return
        target = limits.max_bytes * limits.low_watermark
        if not limits.tenant_max_bytes:
            self._evict(self._take(self.policy.victims(), total, target), "over the budget")
            return
        ledger = self._ledger
        held = ledger.tenant_holdings()
        share = fair_share(held, target)
        tiers: list[list[str]] = []
        if tenant is not None and held.get(tenant, 0) > share:
            tiers.append(self.policy.victims(among=ledger.tenant_entries(tenant)))
        over = [t for t, size in held.items() if size > share and t != tenant]
        if over:
            tiers.append(self.policy.victims(among=[eid for t in over for eid in ledger.tenant_entries(t)]))
        victims: list[str] = []
        chosen: set[str] = set()
        projected = total
        for ranked in tiers:
            for eid in ranked:
                if projected <= target:
                    break
                owner = ledger.entry_tenant(eid)
                if eid in self._pins or held[owner] <= share:
                    continue
                size = ledger.size_of(eid)
                victims.append(eid)
                chosen.add(eid)
                held[owner] -= size
                projected -= size
        if projected > target:
            rest = [eid for eid in self.policy.victims() if eid not in chosen]
            victims += self._take(rest, projected, target)
        self._evict(victims, "over the budget (tenants over their fair share first)")

    def _evict(self, victims: list[str], why: str) -> int:
        """Delete the victims as evictions; the bytes freed. A store that fails a delete (its disk full
        beyond the reserve) ends the pass: what was deleted stays counted, the rest stays whole."""
        before = self._ledger.total_bytes
        created = {eid: usage.created for eid in victims if (usage := self._ledger.usage(eid)) is not None}
        try:
            self._delete_entries(victims)
        except DiskFull as exc:
            log.warning("eviction (%s) stopped: %s", why, exc)
        except Exception:
            log.exception("eviction (%s) stopped: the store failed a delete", why)
        freed = before - self._ledger.total_bytes
        gone = [eid for eid in victims if eid not in self._ledger]
        done = len(gone)
        if gone:
            self.events.evicted(gone)
        self.evictions += done
        self.metrics.evictions.labels(self.policy.name).inc(done)
        self.metrics.evicted_bytes.labels(self.policy.name).inc(freed)
        now, ages = time.time(), self.metrics.evicted_age.labels(self.policy.name)
        for eid, at in created.items():
            if eid not in self._ledger:
                ages.observe(max(0.0, now - at))
        log.info("evicted %d entries (%d bytes) by %s: %s", done, freed, self.policy.name, why)
        return freed

    def _make_room(self, over: int) -> None:
        """The disk is the limit, not the budget: the file system is nearly full (the store refused a
        put, or the daemon starts on such a disk), or the store's folder stayed `over` its target while
        a put waited. Evict towards free space of the store's reserve plus two memtables and a folder
        within its target, but at most MAKE_ROOM_SHARE of the stored bytes a pass and a pass every
        MAKE_ROOM_EVERY_S (what it frees shows only once compaction has run, which the pass starts in
        the background), so that a disk another process filled does not empty the cache at once.
        Oldest entries first, not the policy's order: they share the oldest segment files, so evicting
        them frees whole files at once (nothing to collect), while the policy's victims are spread over
        all of them and free little until most of the cache is gone (docs/hardening.md). Called under
        the lock."""
        now = time.monotonic()
        if now - self._made_room_at < MAKE_ROOM_EVERY_S:
            return
        free, reserve = self.store.free_bytes(), self.store.tuning.reserve
        wanted = max(reserve + 2 * self.store.tuning.write_buffer - free, over)
        if wanted <= 0:
            return
        self._made_room_at = now
        wanted = min(wanted, int(MAKE_ROOM_SHARE * self._ledger.total_bytes))
        victims, freed = [], 0
        for eid in self._ledger.oldest_first():
            if victims and freed >= wanted:
                break
            if eid in self._pins:
                continue
            victims.append(eid)
            freed += self._ledger.size_of(eid)
        if victims:
            why = (f"the disk is nearly full ({free} bytes free, the store keeps {reserve})" if over == 0 else
                   f"the store's folder is {over} bytes over its target of {self.store.tuning.disk_target}")
            self._evict(victims, why)
        if self._reclaimer is None or not self._reclaimer.is_alive():
            self._reclaimer = threading.Thread(target=self._reclaim, name="reclaim", daemon=True)
            self._reclaimer.start()

    def _reclaim(self) -> None:
        try:
            self.store.reclaim()
        except Exception as exc:  # out of space itself, most likely: RocksDB retries once there is some
            log.warning("reclaiming disk space failed (%s); the next flushes and compactions will", exc)

    # ---- stats ----
    def stats(self) -> pb.StatsResponse:
        with self._lock:
            ledger = self._ledger
            stats = pb.StatsResponse(entries=len(ledger), bytes=ledger.total_bytes, blob_bytes=ledger.blob_bytes,
                                     max_bytes=self.limits.max_bytes, eviction_policy=self.policy.name,
                                     index_backend=self.index.name, evictions=self.evictions,
                                     namespaces=ledger.namespace_stats())
        stats.disk_bytes = self.disk_bytes()  # outside the lock: it walks the folder
        stats.disk_free_bytes = self.store.free_bytes()
        stats.disk_full = self.store.full
        return stats

    def disk_bytes(self) -> int:
        """The data folder's allocated bytes (store and index), measured at most every DISK_SAMPLE_S."""
        at, size = self._disk_sample
        now = time.monotonic()
        if now - at >= DISK_SAMPLE_S:
            size = folder_bytes(self.data_dir)
            self._disk_sample = (now, size)
        return size

    def start_scrubber(self, bytes_per_second: int, pause_s: float) -> None:
        """Verify stored blobs in the background at `bytes_per_second` (0: never), pausing `pause_s`
        before the first pass and between passes (scrub.py)."""
        if bytes_per_second > 0:
            self.scrubber = scrub.Scrubber(self, bytes_per_second, pause_s)
            self.scrubber.start()

    def close(self) -> None:
        """Stop the scrubber and wait for a reclaim under way, then close the index, then the store (the
        index is derived from it)."""
        if self.scrubber is not None:
            self.scrubber.stop()
        if self._reclaimer is not None:
            self._reclaimer.join()
        self.index.close()
        self.store.close()

    def usage_of(self, eid: str) -> Usage | None:
        with self._lock:
            return self._ledger.usage(eid)
