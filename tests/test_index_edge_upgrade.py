"""An Edge shard written with the old (default) configuration still opens, answers, and is upgraded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from flexcache.daemon.index.base import VECTOR_NAMES, point_id
from flexcache.daemon.index.edge import HNSW_M, EdgeIndex


def entry(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_old_shard_reopens_and_gets_the_new_config(tmp_path: Path) -> None:
    dim, rng = 16, np.random.default_rng(1)
    vectors = rng.standard_normal((50, dim)).astype(np.float32)
    old = qe.EdgeShard.create(  # what EdgeIndex wrote before the search configuration existed
        str(tmp_path / f"d{dim}"),
        qe.EdgeConfig(vectors={n: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine) for n in VECTOR_NAMES}),
    )
    old.update(qe.UpdateOperation.create_field_index("ns", qe.PayloadSchemaType.Keyword))
    old.update(
        qe.UpdateOperation.upsert_points(
            [
                qe.Point(point_id(entry(i)), {"full": v.tolist()}, {"ns": "ns-a", "entry_id": entry(i)})
                for i, v in enumerate(vectors)
            ]
        )
    )
    old.flush()
    old.close()

    index = EdgeIndex(tmp_path)
    try:
        assert set(index.entry_ids()) == {entry(i) for i in range(50)}
        for i in (0, 17, 49):
            hits = index.search("ns-a", "full", vectors[i].tolist(), limit=3)
            assert hits[0].entry_id == entry(i)
            assert abs(hits[0].similarity - 1.0) < 1e-4
    finally:
        index.close()
    persisted = json.loads((tmp_path / f"d{dim}" / "edge_config.json").read_text())
    assert persisted["hnsw_config"]["m"] == HNSW_M
    assert persisted["quantization_config"]["scalar"]["type"] == "int8"

    index = EdgeIndex(tmp_path)  # and the upgraded shard opens again
    try:
        assert index.search("ns-a", "full", vectors[5].tolist(), limit=1)[0].entry_id == entry(5)
    finally:
        index.close()
