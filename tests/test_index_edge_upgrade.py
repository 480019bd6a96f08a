"""An index in the old embedded layout (one Edge shard per dimension, shared by every namespace and
filtered on "ns") is dropped at startup and rebuilt from the store, namespace by namespace."""

from __future__ import annotations

import shutil

import qdrant_edge as qe

from flexcache.daemon.entries import NamespaceKey
from flexcache.daemon.index.base import VECTOR_NAMES, point_id
from tests.conftest import NS, connect
from tests.test_durability import latent_for
from tests.vectors import unit


def test_old_per_dimension_index_is_rebuilt_per_namespace(daemon) -> None:
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent_for(i), unit(i)) for i in range(5)]
    daemon.terminate()
    index_dir = daemon.data_dir / "index"
    ns_key = NamespaceKey.of(NS.to_proto()).key
    [new_shard] = index_dir.iterdir()
    assert new_shard.name.startswith(f"{ns_key}.d")
    dim = int(new_shard.name.rsplit(".d", 1)[1])

    # Replace it with what earlier versions wrote: index/d<dim>/, an "ns" keyword index, Qdrant's defaults.
    shutil.rmtree(new_shard)
    old = qe.EdgeShard.create(
        str(index_dir / f"d{dim}"),
        qe.EdgeConfig(vectors={n: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine) for n in VECTOR_NAMES}),
    )
    old.update(qe.UpdateOperation.create_field_index("ns", qe.PayloadSchemaType.Keyword))
    old.update(qe.UpdateOperation.upsert_points(
        [qe.Point(point_id(e), {"full": unit(i).tolist()}, {"ns": ns_key, "entry_id": e}) for i, e in enumerate(ids)]))
    old.flush()
    old.close()

    daemon.start()
    with connect(daemon.target) as c:
        assert [c.lookup(unit(i)).best.entry_id for i in range(5)] == ids
    assert sorted(p.name for p in index_dir.iterdir()) == [new_shard.name]
