"""The vector index interface: prompt embeddings -> entry ids, kept apart by namespace.

Every point carries up to three named vectors ("full", "object", "background") and the payload
{"ns": namespace key, "entry_id": ...}. A search names its namespace and never sees another's
points: the embedded backend keeps one shard per namespace, the remote one filters on "ns". The
index is derived data: RocksDB is the source of truth and the daemon rebuilds missing points from
it at startup.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
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


@dataclass(frozen=True)
class IndexPoint:
    """What the index stores of an entry: its id, its namespace and its vectors by role."""

    entry_id: str
    namespace_key: str
    vectors: Mapping[str, Sequence[float]]  # a subset of VECTOR_NAMES; "full" always present

    @property
    def dim(self) -> int:
        return len(self.vectors["full"])

    def named_vectors(self) -> dict[str, list[float]]:
        return {name: list(vec) for name, vec in self.vectors.items() if len(vec)}

    def payload(self) -> dict[str, str]:
        return {"ns": self.namespace_key, "entry_id": self.entry_id}


def point_id(entry_id: str) -> str:
    """Qdrant ids are integers or UUIDs: the first 128 bits of the (sha256) entry id."""
    return str(uuid.UUID(hex=entry_id[:32]))


class VectorIndex(ABC):
    name: str

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Add or replace the points (one per entry id). Raises if the backend cannot write them: the
        cache then rolls back the entry it stored first."""

    @abstractmethod
    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        """Up to `limit` entries of one namespace nearest `vector` by cosine similarity over their
        `vector_name` vectors, most similar first; none if the namespace has no such vectors."""

    @abstractmethod
    def delete(self, entry_ids: Sequence[str]) -> None:
        """Remove every point of these entries, whatever their namespace."""

    @abstractmethod
    def entry_ids(self) -> Iterator[str]:
        """Every indexed entry id (for reconciliation with the store)."""

    @abstractmethod
    def close(self) -> None: ...
