"""Remote index: a Qdrant server or cluster through qdrant-client, for fleets that outgrow one machine.

`path` selects qdrant-client's local mode instead of a URL; it runs the same client code against an
in-process engine, which is how the tests exercise this backend (no Qdrant server runs here).
One collection per vector dimension ("flexcache_d<dim>"), with a keyword payload index on "ns": a
namespace's calls (search, reconciliation's scroll) filter on it, and `namespaces()` facets on it.
Collections are created with Qdrant's own distribution settings (`shards`, `replication_factor`,
`write_consistency`: qdrant_shards, qdrant_replication_factor, qdrant_write_consistency), which a
Qdrant cluster applies and local mode ignores. Several daemons may share the collections (a FlexCache
cluster over one Qdrant, docs/cluster.md): a collection another daemon created is found at first use.
"""

from __future__ import annotations

import base64
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

    def __init__(self, url: str = "", api_key: str = "", prefer_grpc: bool = True, path: str = "", *,
                 shards: int = 1, replication_factor: int = 1, write_consistency: int = 1):
        self._local = bool(path)
        self.distribution = {"shard_number": shards, "replication_factor": replication_factor,
                             "write_consistency_factor": write_consistency}
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
                self._client.create_collection(name, vectors_config=dict.fromkeys(VECTOR_NAMES, params),
                                               **self.distribution)
                if not self._local:  # local mode scans exhaustively and ignores payload indexes
                    self._client.create_payload_index(name, "ns", models.PayloadSchemaType.KEYWORD)
            self._dims.add(dim)

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        for dim, group in group_by_dim(points).items():
            batch = [models.PointStruct(id=point_id(p.entry_id), vector=p.named_vectors(), payload=p.payload())
                     for p in group]
            self._ensure_collection(dim)
            self._client.upsert(collection_name(dim), batch, wait=True)

    def _known(self, dim: int) -> bool:
        """Whether a collection of `dim` exists: this process made or saw it, or another daemon sharing
        the server made it since (asked of the server)."""
        if dim in self._dims:
            return True
        if self._client.collection_exists(collection_name(dim)):
            with self._lock:
                self._dims.add(dim)
            return True
        return False

    def search(self, namespace_key: str, vector_name: str, vector: Sequence[float], limit: int) -> list[Neighbor]:
        if not self._known(len(vector)):
            return []
        result = self._client.query_points(
            collection_name(len(vector)),
            query=list(vector),
            using=vector_name,
            query_filter=models.Filter(
                must=[models.FieldCondition(key="ns", match=models.MatchValue(value=namespace_key))]
            ),
            limit=limit,
            with_payload=["entry_id", "record"],
        )
        return [Neighbor(p.payload["entry_id"], p.score, base64.b64decode(p.payload.get("record", "")))
                for p in result.points]

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
