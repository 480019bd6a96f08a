"""How the store keeps an entry's vectors: unit-length float16 beside the record, counted in the budget."""

from __future__ import annotations

import numpy as np
import pytest

from flexcache.daemon.entries import Usage, record_size, split_record, unpack_vectors
from flexcache.v1 import cache_pb2 as pb
from tests.conftest import NS


def header(dims: tuple[int, int, int]) -> pb.PutHeader:
    rng = np.random.default_rng(0)
    full, obj, bg = (3.0 * rng.standard_normal(d) for d in dims)
    return pb.PutHeader(namespace=NS.to_proto(), prompt="a dog on a beach", blob=pb.BlobInfo(size=1000),
                        vectors=pb.Vectors(full=full.tolist(), object=obj.tolist(), background=bg.tolist()))


@pytest.mark.parametrize("dims", [(384, 384, 384), (384, 0, 0), (64, 64, 0)])
def test_vectors_round_trip_at_float16_and_unit_length(dims: tuple[int, int, int]) -> None:
    h = header(dims)
    record, packed = split_record(h)
    assert not record.HasField("vectors") and record.prompt == h.prompt
    back = unpack_vectors(packed)
    for name, size in zip(("full", "object", "background"), dims, strict=True):
        want, got = np.asarray(getattr(h.vectors, name)), np.asarray(getattr(back, name))
        assert got.size == size
        if size:
            assert abs(np.linalg.norm(got) - 1) < 1e-3
            assert want @ got / np.linalg.norm(want) / np.linalg.norm(got) > 1 - 1e-5  # the same direction


def test_budget_counts_the_stored_form() -> None:
    h = header((384, 384, 384))
    record, packed = split_record(h)
    assert record_size(h) == 1000 + record.ByteSize() + len(packed)
    assert record_size(h) - 1000 < (h.ByteSize() - record.ByteSize()) * 0.55 + record.ByteSize()  # ~half fp32


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        unpack_vectors(b"\x02" + bytes(12))


def test_usage_round_trips() -> None:
    usage = Usage(size=100, blob_size=60, created=1.0, last_access=2.0, total_steps=50)
    assert Usage.from_bytes(usage.to_bytes()) == usage  # no credit yet: log2_credit is -inf
    usage.record_hit("full", 10)
    usage.add_credit(10, clock=3.5, half_life=2.0)
    assert Usage.from_bytes(usage.to_bytes()) == usage
