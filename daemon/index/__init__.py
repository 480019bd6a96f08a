"""Vector index backends behind one interface (base.VectorIndex)."""

from __future__ import annotations

from pathlib import Path

from .base import IndexPoint, Neighbor, VectorIndex

__all__ = ["IndexPoint", "Neighbor", "VectorIndex", "open_index"]


def open_index(backend: str, data_dir: Path, *, url: str = "", api_key: str = "", prefer_grpc: bool = True,
               path: str = "", shards: int = 1, replication_factor: int = 1, write_consistency: int = 1
               ) -> VectorIndex:
    """The embedded Qdrant Edge shard by default; a Qdrant server (or qdrant-client local mode)."""
    if backend == "edge":
        from .edge import EdgeIndex

        return EdgeIndex(data_dir / "index")
    if backend == "qdrant":
        from .remote import QdrantIndex

        return QdrantIndex(url=url, api_key=api_key, prefer_grpc=prefer_grpc, path=path, shards=shards,
                           replication_factor=replication_factor, write_consistency=write_consistency)
    raise ValueError(f"unknown index backend {backend!r}")
