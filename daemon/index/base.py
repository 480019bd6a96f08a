"""The vector index interface: prompt embeddings -> entry ids, kept apart by namespace.

Every point carries up to three named vectors ("full", "object", "background") and the payload
{"ns": namespace key, "entry_id": ...}. A search names its namespace and never sees another's
points: the embedded backend keeps one shard per namespace, the remote one filters on "ns". The
index is derived data: RocksDB is the source of truth, and the cache reconciles each namespace with
it (removes points with no entry, re-indexes entries with no point) before the namespace's first use
after a start, so the calls below that take a namespace are the ones a daemon makes: none of them
needs to read every namespace, which is what keeps a restart with thousands of namespaces fast.
"""

from __future__ import annotations

import base64
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from flexcache.v1 import wire

VECTOR_NAMES = wire.ROLES  # an index vector per role


@dataclass(frozen=True)
class Neighbor:
    """One search result: an indexed entry near the query, and how near (cosine similarity, as the
    backend scores it; ranking clamps it to [-1, 1]). Not yet a cache hit: whether it grants steps
    is ranking's decision (daemon/ranking.py)."""

    entry_id: str
    similarity: float
    record: bytes = b""  # the point's record (IndexPoint.record), where the backend keeps it


@dataclass(frozen=True)
class IndexPoint:
    """What the index stores of an entry: its id, its namespace and its vectors by role; and, for an
    index that several daemons share (a cluster over one Qdrant), the entry's record (a serialized
    PutHeader without vectors), so that a daemon can rank entries it does not hold itself."""

    entry_id: str
    namespace_key: str
    vectors: Mapping[str, Sequence[float]]  # a subset of VECTOR_NAMES; "full" always present
    record: bytes = b""

    @property
    def dim(self) -> int:
        return len(self.vectors["full"])

    def named_vectors(self) -> dict[str, list[float]]:
        return {name: list(vec) for name, vec in self.vectors.items() if len(vec)}

    def payload(self) -> dict[str, str]:
        payload = {"ns": self.namespace_key, "entry_id": self.entry_id}
        if self.record:
            payload["record"] = base64.b64encode(self.record).decode()
        return payload


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True)
class IndexEvents:
    """What an index tells its owner as it happens (`VectorIndex.listen`); no-ops by default.

    `namespace_lost(namespace_key)`: the index lost points of that namespace it had acknowledged (a
    shard that could not be loaded was set aside), so the owner must reconcile the namespace again.
    `shard_loaded()`: a shard was loaded from disk (the embedded backend: at first use after a start,
    and again after an idle shard was closed). Both may be called from any thread, with index locks
    held: they must be quick and must not call back into the index."""

    namespace_lost: Callable[[str], None] = _ignore
    shard_loaded: Callable[[], None] = _ignore


def point_id(entry_id: str) -> str:
    """Qdrant ids are integers or UUIDs: the first 128 bits of the (sha256) entry id."""
    return str(uuid.UUID(hex=entry_id[:32]))


class VectorIndex(ABC):
    name: str
    _events: IndexEvents = IndexEvents()

    def listen(self, events: IndexEvents) -> None:
        """Where to report IndexEvents (one listener; a later call replaces it)."""
        self._events = events

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Add or replace the points (one per entry id). Raises if the backend cannot write them: the
        cache then rolls back the entry it stored first."""

    @abstractmethod
    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        """Up to `limit` entries of one namespace nearest `vector` by cosine similarity over their
        `vector_name` vectors, most similar first; none if the namespace has no such vectors."""

    @abstractmethod
    def delete(self, entry_ids: Sequence[str], namespace_key: str | None = None) -> None:
        """Remove every point of these entries, which belong to `namespace_key` (None: to any namespace,
        which may cost the embedded backend a load of every shard)."""

    @abstractmethod
    def entry_ids(self, namespace_key: str | None = None) -> Iterator[str]:
        """The entry ids with a "full" point in one namespace (every namespace: None, for maintenance and
        tests), for reconciliation with the store."""

    def namespaces(self) -> set[str]:
        """Keys of the namespaces the index may hold points of, found without reading a point (a
        superset is fine). The default, for stand-ins that store nothing, is none."""
        return set()

    def open_shards(self) -> int:
        """Shards (embedded backend) open now; 0 for a backend without any."""
        return 0

    @abstractmethod
    def close(self) -> None: ...
