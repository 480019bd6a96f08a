"""How the store keeps an entry's vectors: unit-length float16 beside the record, counted in the budget."""

from __future__ import annotations

import json
import math

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


def test_usage_round_trips_and_old_wall_clock_credit_restarts() -> None:
    usage = Usage(size=100, created=1.0, last_access=2.0, total_steps=50)
    usage.record_hit("full", 10)
    usage.add_credit(10, clock=3.5, half_life=2.0)
    assert Usage.from_bytes(usage.to_bytes()) == usage
    # A record from before the turnover clock: its credit was measured against seconds since 1970,
    # which would outrank every new entry forever. It restarts from the steps it saved, at turnover 0.
    old = json.loads(usage.to_bytes())
    del old["credit_clock"]
    old["log2_credit"] = 489_000.0
    restored = Usage.from_bytes(json.dumps(old).encode())
    assert restored.log2_credit == pytest.approx(math.log2(10)) and restored.credit_clock == 0.0
