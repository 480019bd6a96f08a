"""The cache core: put, lookup, fetch, delete and evict over the store, the index and a policy.

It speaks in protobuf messages and domain errors (errors.py), never in gRPC terms, so it can be
driven by the server or directly by a benchmark. Invariants it keeps:

- RocksDB is written first, the index second; an index failure rolls the store write back, and at
  startup `open()` repairs whatever a crash left between the two (points with no entry are removed,
  entries with no point are re-indexed from their stored vectors).
- A lookup or fetch never crosses namespaces: every index search is filtered by namespace and every
  fetch checks the entry's recorded namespace.
- Stored bytes stay within the budget: crossing the high watermark evicts, in the policy's order, down
  to the low watermark, skipping entries that are being streamed out.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass

import crc32c
import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from .entries import NamespaceKey, Usage, entry_id, record_size
from .errors import Corrupt, InvalidRequest, NotFound, TooLarge, Unavailable
from .eviction import EvictionPolicy
from .index import IndexPoint, VectorIndex
from .metrics import Metrics
from .steps import StepTable
from .store import NamespaceInfo, Store

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 16_384
MAX_MASK_CELLS = 1 << 24  # a latent-grid mask; 16 M cells is far past any video latent
_ENTRY_ID = re.compile(r"[0-9a-f]{64}")
# How much of a composed latent each donor supplies, for crediting its utility.
ROLE_WEIGHTS = {"full": 1.0, "object": 0.5, "background": 0.5}


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    high_watermark: float
    low_watermark: float
    max_blob_bytes: int
    max_vector_dim: int
    utility_half_life: float
    utility_prior_steps: float


def _vector(values, name: str, dim: int | None, max_dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if dim is not None and v.size != dim:
        raise InvalidRequest(f"vectors.{name} has dimension {v.size}, this namespace uses {dim}")
    if v.size > max_dim:
        raise InvalidRequest(f"vectors.{name} has dimension {v.size}, above the limit of {max_dim}")
    if not np.isfinite(v).all():
        raise InvalidRequest(f"vectors.{name} contains NaN or infinite values")
    if not np.any(v):
        raise InvalidRequest(f"vectors.{name} is all zeros, which has no direction to compare")
    return v


def _vectors(msg: pb.Vectors, dim: int | None, max_dim: int) -> dict[str, np.ndarray]:
    """Validated vectors by name; "full" is required, the other two optional."""
    if not msg.full:
        raise InvalidRequest("vectors.full is required")
    full = _vector(msg.full, "full", dim, max_dim)
    out = {"full": full}
    for name in ("object", "background"):
        values = getattr(msg, name)
        if values:
            out[name] = _vector(values, name, full.size, max_dim)
    return out


class PutSession:
    """One Put stream: validated header first, then chunks, then `finish`. Nothing is stored before."""

    def __init__(self, cache: Cache, header: pb.PutHeader, ns: NamespaceKey, entry: str, existing: bool):
        self._cache = cache
        self.header = header
        self.ns = ns
        self.entry_id = entry
        self.existing = existing
        self.received = 0
        self._digest = hashlib.sha256()
        self._crc = 0  # CRC-32C so far, checked when the header declares one
        self._pending = cache.store.begin_put(entry)

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


class PinnedChunks:
    """A fetched entry's chunks. The entry stays pinned (never evicted) until this is exhausted or
    closed, whichever comes first; unlike a generator's `finally`, close() releases the pin even if
    no chunk was ever read (a client that went away after the header, a ticket never redeemed)."""

    def __init__(self, chunks: Generator[bytes, None, None], release: Callable[[], None]):
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> PinnedChunks:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:  # the end, or a read error: either way this fetch is over
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            try:
                self._chunks.close()
            finally:
                release()


class Cache:
    def __init__(self, store: Store, index: VectorIndex, policy: EvictionPolicy, steps: StepTable,
                 metrics: Metrics, limits: Limits):
        self.store = store
        self.index = index
        self.policy = policy
        self.steps = steps
        self.metrics = metrics
        self.limits = limits
        self._lock = threading.RLock()
        self._namespaces: dict[str, NamespaceInfo] = {}
        self._usage: dict[str, Usage] = {}
        self._entry_ns: dict[str, str] = {}  # entry id -> namespace key
        self._ns_entries: Counter[str] = Counter()
        self._ns_bytes: Counter[str] = Counter()
        self._ns_blob_bytes: Counter[str] = Counter()
        self._pins: Counter[str] = Counter()
        self.total_bytes = 0
        self.evictions = 0
        # The utility policy's clock, in cache turnovers: bytes of new entries / max_bytes. Credit
        # decays as the cache fills with new work, not as seconds pass, so the policy behaves alike
        # at any request rate (a replay at 50 requests/s and a fleet at 1/min), and an idle or
        # all-hits cache, whose contents are not being replaced, keeps what its entries earned.
        self.clock = 0.0
        metrics.max_bytes.set(limits.max_bytes)

    # ---- startup ----
    def open(self) -> None:
        """Load entries into memory and the policy, then reconcile the index with the store."""
        self._namespaces = self.store.namespaces()
        to_index: list[IndexPoint] = []
        indexed = set(self.index.entry_ids())
        for eid, header, usage in self.store.entries():
            ns_key = NamespaceKey.of(header.namespace).key
            if usage is None or eid not in indexed:  # the rare paths that need the vectors
                header.vectors.CopyFrom(self.store.vectors(eid, header))
            usage = usage or self._new_usage(header, time.time())
            usage.blob_size = header.blob.size
            self.clock = max(self.clock, usage.credit_clock)
            self._track(eid, ns_key, usage)
            if eid not in indexed:
                to_index.append(IndexPoint(eid, ns_key, _vectors(header.vectors, None, 1 << 30)))
            indexed.discard(eid)
        if indexed:  # points whose entry is gone: written to the index, then the store write was lost
            self.index.delete(sorted(indexed))
            self.metrics.reconciled.labels("orphan_point").inc(len(indexed))
            log.warning("reconcile: removed %d index points with no stored entry", len(indexed))
        for start in range(0, len(to_index), 512):
            self.index.upsert(to_index[start:start + 512])
        if to_index:
            self.metrics.reconciled.labels("reindexed").inc(len(to_index))
            log.warning("reconcile: re-indexed %d stored entries missing from the index", len(to_index))
        self._evict_if_needed()
        log.info("cache open: %d entries, %d bytes, %d namespaces", len(self._usage), self.total_bytes,
                 len(self._namespaces))

    def _new_usage(self, header: pb.PutHeader, now: float) -> Usage:
        usage = Usage(size=record_size(header), blob_size=header.blob.size, created=now, last_access=now,
                      step=header.blob.step, total_steps=header.namespace.total_steps,
                      step_cost=header.step_seconds or 1.0)
        usage.add_credit(self.limits.utility_prior_steps * usage.step_cost, self.clock, self.limits.utility_half_life)
        return usage

    def _track(self, eid: str, ns_key: str, usage: Usage) -> None:
        self._usage[eid] = usage
        self._entry_ns[eid] = ns_key
        self.policy.add(eid, usage)
        self._ns_entries[ns_key] += 1
        self._ns_bytes[ns_key] += usage.size
        self._ns_blob_bytes[ns_key] += usage.blob_size
        self.total_bytes += usage.size
        self._publish(ns_key)

    def _untrack(self, eid: str) -> Usage:
        usage = self._usage.pop(eid)
        ns_key = self._entry_ns.pop(eid)
        self.policy.remove(eid)
        self._ns_entries[ns_key] -= 1
        self._ns_bytes[ns_key] -= usage.size
        self._ns_blob_bytes[ns_key] -= usage.blob_size
        self.total_bytes -= usage.size
        self._publish(ns_key)
        return usage

    def _publish(self, ns_key: str) -> None:
        name = self._namespaces[ns_key].name if ns_key in self._namespaces else ns_key
        self.metrics.entries.labels(name).set(self._ns_entries[ns_key])
        self.metrics.bytes.labels(name).set(self._ns_bytes[ns_key])
        self.metrics.blob_bytes.labels(name).set(self._ns_blob_bytes[ns_key])

    # ---- put ----
    def begin_put(self, header: pb.PutHeader) -> PutSession:
        if not header.HasField("namespace"):
            raise InvalidRequest("namespace is required")
        ns = NamespaceKey.of(header.namespace)
        if not header.prompt.strip():
            raise InvalidRequest("prompt is empty")
        if len(header.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"prompt has {len(header.prompt)} characters, above {MAX_PROMPT_CHARS}")
        known = self._namespaces.get(ns.key)
        _vectors(header.vectors, known.dim if known else None, self.limits.max_vector_dim)
        blob = header.blob
        if blob.size < 1:
            raise InvalidRequest("blob.size must be at least 1 byte")
        if len(blob.sha256) != 32:
            raise InvalidRequest(f"blob.sha256 must be 32 bytes, got {len(blob.sha256)}")
        if blob.size > self.limits.max_blob_bytes:
            raise TooLarge(f"blob of {blob.size} bytes exceeds max_blob_bytes ({self.limits.max_blob_bytes})")
        if record_size(header) > self.limits.max_bytes * self.limits.low_watermark:
            raise TooLarge(f"entry of {record_size(header)} bytes cannot fit the cache budget")
        if blob.step >= header.namespace.total_steps:
            raise InvalidRequest(f"blob.step {blob.step} must be below total_steps {header.namespace.total_steps}")
        if header.step_seconds < 0 or header.step_seconds != header.step_seconds:
            raise InvalidRequest("step_seconds must be a non-negative number")
        if header.HasField("object_mask"):
            _check_mask(header.object_mask)
        eid = entry_id(ns, header.prompt, blob)
        with self._lock:
            existing = eid in self._usage
        return PutSession(self, header, ns, eid, existing)

    def _commit(self, session: PutSession, pending) -> pb.PutResponse:
        header, ns, eid = session.header, session.ns, session.entry_id
        vectors = _vectors(header.vectors, None, self.limits.max_vector_dim)
        with self._lock:
            if eid in self._usage:
                return pb.PutResponse(entry_id=eid, created=False, stored_bytes=self._usage[eid].size)
            known = self._namespaces.get(ns.key)
            if known is not None and known.dim != vectors["full"].size:  # a concurrent first Put won
                raise InvalidRequest(f"vectors.full has dimension {vectors['full'].size}, "
                                     f"this namespace uses {known.dim}")
            new_ns = None if known else NamespaceInfo(ns.key, ns.name, int(vectors["full"].size))
            usage = self._new_usage(header, time.time())
            self.store.commit(pending, header, usage, new_ns)
            try:
                self.index.upsert([IndexPoint(eid, ns.key, vectors)])
            except Exception as exc:
                self.store.delete(eid)  # never leave an entry that lookups cannot find
                log.exception("index upsert failed; put of %s rolled back", eid)
                raise Unavailable(f"vector index unavailable: {exc}") from exc
            if new_ns:
                self._namespaces[ns.key] = new_ns
            self._track(eid, ns.key, usage)
            self.clock += usage.size / self.limits.max_bytes
            self._evict_if_needed()
        self.metrics.payload.labels("Put").observe(header.blob.size)
        return pb.PutResponse(entry_id=eid, created=True, stored_bytes=usage.size)

    # ---- lookup ----
    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        if not request.HasField("namespace"):
            raise InvalidRequest("namespace is required")
        ns = NamespaceKey.of(request.namespace)
        known = self._namespaces.get(ns.key)
        vectors = _vectors(request.vectors, known.dim if known else None, self.limits.max_vector_dim)
        top_k = max(1, min(request.top_k or 1, 64))
        partial = {wire.ROLE_BY_ENUM.get(r) for r in request.partial_roles}
        if not partial <= {"object", "background"}:
            raise InvalidRequest("partial_roles may name ROLE_OBJECT and ROLE_BACKGROUND only")
        if known is None:
            return self._miss(ns, "unknown_namespace")
        total_steps = request.namespace.total_steps
        # Intermediate-latent entries may be unusable at a given similarity: look a little deeper.
        hits = self.index.search(ns.key, "full", vectors["full"], limit=top_k * 5)
        full = self._usable(ns, hits, total_steps, top_k, pb.ROLE_FULL)
        if full:
            self.metrics.lookups.labels(ns.name, "hit").inc()
            return pb.LookupResponse(candidates=full)
        parts = [role for role in ("object", "background") if role in vectors]
        if len(parts) == 2 or partial & set(parts):
            donors = self._donors(ns, vectors, total_steps, top_k, partial)
            if donors:
                roles = {c.role for c in donors}
                self.metrics.lookups.labels(ns.name, "composed" if len(roles) == 2 else "partial").inc()
                return pb.LookupResponse(candidates=donors)
        return self._miss(ns, "below_threshold" if hits else "empty_namespace")

    def _usable(self, ns: NamespaceKey, hits: list, total_steps: int, limit: int, role: int) -> list[pb.Candidate]:
        """Hits that grant steps, as candidates, best first: most granted steps, then most similar.

        An intermediate latent (blob.step = K) serves only requests granted at least K and grants
        exactly K; so the NIRVANA-style checkpoints of one prompt (equal vectors) come back largest
        usable K first, as NIRVANA picks them. Donors of a composite must be clean latents (step 0):
        the worker rebuilds both parts at the composite's step, which only a clean latent allows.
        """
        candidates: list[pb.Candidate] = []
        for hit in hits:  # most similar first
            similarity = min(1.0, max(-1.0, hit.similarity))
            granted = self.steps.granted_steps(similarity, total_steps, ns.name)
            # No later hit can grant more than this one's table value (the table is monotone) nor be
            # more similar: once `limit` candidates grant at least that much, the rest cannot rank.
            if not granted or (len(candidates) >= limit
                               and sorted(c.granted_steps for c in candidates)[-limit] >= granted):
                break
            header = self.store.record(hit.entry_id)
            if header is None:  # deleted since it was indexed; the next startup reconciles it
                continue
            if header.blob.step:
                if role != pb.ROLE_FULL:
                    continue
                granted = header.blob.step if granted >= header.blob.step else 0
            if granted:
                candidate = pb.Candidate(entry_id=hit.entry_id, similarity=similarity, granted_steps=granted,
                                         role=role, blob=header.blob, prompt=header.prompt)
                if header.HasField("object_mask"):
                    candidate.object_mask.CopyFrom(header.object_mask)
                candidates.append(candidate)
        candidates.sort(key=lambda c: (c.granted_steps, c.similarity), reverse=True)  # stable for ties
        return candidates[:limit]

    def _donors(self, ns: NamespaceKey, vectors: dict[str, np.ndarray], total_steps: int,
                top_k: int, partial: set[str]) -> list[pb.Candidate]:
        """Up to top_k object donors and top_k background donors, granted the composite's steps; when
        only one part matches and its role is in `partial`, that part's donors, granted as a composite
        of the part with itself (the same cap: the client starts from them at the same K)."""
        def part(role: str, enum: int) -> list[pb.Candidate]:
            if role not in vectors:
                return []
            hits = self.index.search(ns.key, role, vectors[role], limit=top_k * 5)
            return self._usable(ns, hits, total_steps, top_k, enum)

        objects, backgrounds = part("object", pb.ROLE_OBJECT), part("background", pb.ROLE_BACKGROUND)
        if objects and backgrounds:
            steps = self.steps.composed_steps(objects[0].granted_steps, backgrounds[0].granted_steps, total_steps)
        elif (objects and "object" in partial) or (backgrounds and "background" in partial):
            k = (objects or backgrounds)[0].granted_steps
            steps = self.steps.composed_steps(k, k, total_steps)
        else:
            return []
        if not steps:
            return []
        for candidate in objects + backgrounds:
            candidate.granted_steps = min(candidate.granted_steps, steps)
        return objects + backgrounds

    def _miss(self, ns: NamespaceKey, reason: str) -> pb.LookupResponse:
        self.metrics.lookups.labels(ns.name, "miss").inc()
        self.metrics.misses.labels(ns.name, reason).inc()
        return pb.LookupResponse(miss_reason=reason)

    # ---- fetch ----
    def fetch(self, request: pb.FetchRequest) -> tuple[pb.FetchHeader, PinnedChunks]:
        """The entry's header and its chunks. The entry stays pinned until the iterator is closed."""
        ns, eid = _addressed(request)
        if request.granted_steps >= request.namespace.total_steps:
            raise InvalidRequest("granted_steps must be below total_steps")
        role = wire.ROLE_BY_ENUM.get(request.role)
        with self._lock:
            if self._entry_ns.get(eid) != ns.key:
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
            self._pins[eid] += 1
            usage = self._usage[eid]
            now = time.time()
            usage.last_access = now
            if role and request.granted_steps:
                usage.record_hit(role, request.granted_steps)
                credit = request.granted_steps * ROLE_WEIGHTS[role] * usage.step_cost
                usage.add_credit(credit, self.clock, self.limits.utility_half_life)
                self.metrics.hits.labels(ns.name, role).inc()
                self.metrics.steps.labels(ns.name, role).inc(request.granted_steps)
        try:
            header = self.store.record(eid)
            if header is None:
                raise NotFound(f"no entry {eid} in namespace {ns.name}")
            self.store.put_usage(eid, usage)
        except BaseException:
            self._unpin(eid)
            raise
        self.metrics.payload.labels("Fetch").observe(header.blob.size)
        return (pb.FetchHeader(entry_id=eid, prompt=header.prompt, blob=header.blob),
                PinnedChunks(self.store.read_blob(eid), lambda: self._unpin(eid)))

    def _unpin(self, eid: str) -> None:
        with self._lock:
            self._pins[eid] -= 1
            if self._pins[eid] <= 0:
                del self._pins[eid]

    # ---- delete and evict ----
    def delete(self, request: pb.DeleteRequest) -> bool:
        ns, eid = _addressed(request)
        with self._lock:
            if self._entry_ns.get(eid) != ns.key:
                return False
            self._remove([eid])
        return True

    def verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse:
        """Re-read an entry with every check on; delete it if its bytes are not what was stored."""
        ns, eid = _addressed(request)
        with self._lock:
            if self._entry_ns.get(eid) != ns.key:
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
            if self._entry_ns.get(eid) != ns.key:  # deleted meanwhile
                return pb.VerifyResponse(intact=False)
            self._remove([eid])
        self.metrics.corrupt.inc()
        log.error("entry %s in namespace %s is corrupt on disk: deleted", eid, ns.name)
        return pb.VerifyResponse(intact=False, deleted=True)

    def _remove(self, eids: list[str]) -> int:
        """Store first, then the index; a crash in between leaves orphan points that open() removes."""
        freed = 0
        for eid in eids:
            self.store.delete(eid)
            freed += self._untrack(eid).size
        try:
            self.index.delete(eids)
        except Exception:  # the entries are gone from the store; stale points are skipped by lookups
            log.exception("index delete failed for %d entries; they will be reconciled", len(eids))
        return freed

    def _evict_if_needed(self) -> None:
        limits = self.limits
        if self.total_bytes <= limits.max_bytes * limits.high_watermark:
            return
        target = limits.max_bytes * limits.low_watermark
        victims, projected = [], self.total_bytes
        for eid in self.policy.victims():
            if projected <= target:
                break
            if self._pins[eid]:  # being streamed out
                continue
            victims.append(eid)
            projected -= self._usage[eid].size
        freed = self._remove(victims)
        self.evictions += len(victims)
        self.metrics.evictions.labels(self.policy.name).inc(len(victims))
        self.metrics.evicted_bytes.labels(self.policy.name).inc(freed)
        log.info("evicted %d entries (%d bytes) by %s", len(victims), freed, self.policy.name)

    # ---- stats ----
    def stats(self) -> pb.StatsResponse:
        with self._lock:
            namespaces = [
                pb.NamespaceStats(name=info.name, dimension=info.dim, entries=self._ns_entries[key],
                                  bytes=self._ns_bytes[key], blob_bytes=self._ns_blob_bytes[key])
                for key, info in sorted(self._namespaces.items(), key=lambda kv: kv[1].name)
            ]
            return pb.StatsResponse(entries=len(self._usage), bytes=self.total_bytes,
                                    blob_bytes=sum(self._ns_blob_bytes.values()),
                                    max_bytes=self.limits.max_bytes, eviction_policy=self.policy.name,
                                    index_backend=self.index.name, evictions=self.evictions,
                                    namespaces=namespaces)

    def close(self) -> None:
        """Close the index, then the store (the index is derived from it)."""
        self.index.close()
        self.store.close()

    def usage_of(self, eid: str) -> Usage | None:
        with self._lock:
            return self._usage.get(eid)


def _check_mask(mask: pb.Mask) -> None:
    if not 1 <= len(mask.shape) <= 4 or min(mask.shape) < 1:
        raise InvalidRequest(f"object_mask.shape must have 1 to 4 positive sizes, got {list(mask.shape)}")
    cells = int(np.prod(np.asarray(mask.shape, dtype=np.int64)))
    if cells > MAX_MASK_CELLS:
        raise InvalidRequest(f"object_mask has {cells} cells, above {MAX_MASK_CELLS}")
    if len(mask.bits) != (cells + 7) // 8:
        raise InvalidRequest(f"object_mask.bits has {len(mask.bits)} bytes, shape {list(mask.shape)} needs "
                             f"{(cells + 7) // 8}")


def _addressed(request: pb.FetchRequest | pb.DeleteRequest | pb.VerifyRequest) -> tuple[NamespaceKey, str]:
    """The namespace and entry id a request names, validated."""
    if not request.HasField("namespace"):
        raise InvalidRequest("namespace is required")
    return NamespaceKey.of(request.namespace), _checked_id(request.entry_id)


def _checked_id(value: str) -> str:
    if not _ENTRY_ID.fullmatch(value):
        raise InvalidRequest(f"entry_id must be 64 lowercase hex characters, got {value[:80]!r}")
    return value

