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
class Hit:
    entry_id: str
    similarity: float


@dataclass(frozen=True)
class IndexPoint:
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
    def upsert(self, points: Sequence[IndexPoint]) -> None: ...

    @abstractmethod
    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Hit]:
        """Nearest entries of one namespace by cosine similarity, best first."""

    @abstractmethod
    def delete(self, entry_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def entry_ids(self) -> Iterator[str]:
        """Every indexed entry id (for reconciliation with the store)."""

    @abstractmethod
    def close(self) -> None: ...
