"""Remote index: a Qdrant server or cluster through qdrant-client, for fleets that outgrow one machine.

`path` selects qdrant-client's local mode instead of a URL; it runs the same client code against an
in-process engine, which is how the tests exercise this backend (no Qdrant server runs here).
One collection per vector dimension ("flexcache_d<dim>"), with a keyword payload index on "ns": a
namespace's calls (search, reconciliation's scroll) filter on it, and `namespaces()` facets on it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from qdrant_client import QdrantClient, models

from .base import VECTOR_NAMES, IndexPoint, Neighbor, VectorIndex, point_id

FACET_LIMIT = 1 << 20  # namespaces `namespaces()` can list: far past max_namespaces


def group_by_dim(points: Sequence[IndexPoint]) -> dict[int, list[IndexPoint]]:
    groups: dict[int, list[IndexPoint]] = {}
    for p in points:
        groups.setdefault(p.dim, []).append(p)
    return groups


def collection_name(dim: int) -> str:
    return f"flexcache_d{dim}"


class QdrantIndex(VectorIndex):
    name = "qdrant"

    def __init__(self, url: str = "", api_key: str = "", prefer_grpc: bool = True, path: str = ""):
        self._local = bool(path)
        if path:
            self._client = QdrantClient(path=path)
        else:
            self._client = QdrantClient(url=url, api_key=api_key or None, prefer_grpc=prefer_grpc, timeout=10)
        self._lock = threading.Lock()
        self._dims = {
            int(c.name.removeprefix("flexcache_d"))
            for c in self._client.get_collections().collections
            if c.name.startswith("flexcache_d") and c.name.removeprefix("flexcache_d").isdigit()
        }

    def _ensure_collection(self, dim: int) -> None:
        with self._lock:
            if dim in self._dims:
                return
            name = collection_name(dim)
            if not self._client.collection_exists(name):
                params = models.VectorParams(size=dim, distance=models.Distance.COSINE)
                self._client.create_collection(name, vectors_config=dict.fromkeys(VECTOR_NAMES, params))
                if not self._local:  # local mode scans exhaustively and ignores payload indexes
                    self._client.create_payload_index(name, "ns", models.PayloadSchemaType.KEYWORD)
            self._dims.add(dim)

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        for dim, group in group_by_dim(points).items():
            batch = [models.PointStruct(id=point_id(p.entry_id), vector=p.named_vectors(), payload=p.payload())
                     for p in group]
            self._ensure_collection(dim)
            self._client.upsert(collection_name(dim), batch, wait=True)

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        if len(vector) not in self._dims:
            return []
        result = self._client.query_points(
            collection_name(len(vector)),
            query=list(vector),
            using=vector_name,
            query_filter=models.Filter(
                must=[models.FieldCondition(key="ns", match=models.MatchValue(value=namespace_key))]
            ),
            limit=limit,
            with_payload=["entry_id"],
        )
        return [Neighbor(p.payload["entry_id"], p.score) for p in result.points]

    def delete(self, entry_ids: Sequence[str], namespace_key: str | None = None) -> None:
        """Point ids are unique across namespaces, so the namespace is not needed to find them."""
        selector = models.PointIdsList(points=[point_id(e) for e in entry_ids])
        for dim in sorted(self._dims):
            self._client.delete(collection_name(dim), points_selector=selector, wait=True)

    def entry_ids(self, namespace_key: str | None = None) -> Iterator[str]:
        only = None if namespace_key is None else models.Filter(
            must=[models.FieldCondition(key="ns", match=models.MatchValue(value=namespace_key))])
        for dim in sorted(self._dims):
            offset = None
            while True:
                records, offset = self._client.scroll(collection_name(dim), scroll_filter=only, limit=1024,
                                                      offset=offset, with_payload=["entry_id"])
                for record in records:
                    yield record.payload["entry_id"]
                if offset is None:
                    break

    def namespaces(self) -> set[str]:
        found: set[str] = set()
        for dim in sorted(self._dims):
            facets = self._client.facet(collection_name(dim), "ns", limit=FACET_LIMIT, exact=True)
            found.update(str(hit.value) for hit in facets.hits)
        return found

    def close(self) -> None:
        self._client.close()
