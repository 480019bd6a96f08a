"""Decoupled lookup: when the whole prompt misses, the best object and background donors answer."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from flexcache.client import CacheClient
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect
from tests.vectors import at_similarity, unit

MASK = np.zeros((3, 12, 20), bool)
MASK[:, 4:8, 5:11] = True


@pytest.fixture
def uncapped(start_daemon) -> CacheClient:
    """A client of a daemon that lets composed hits skip what the steps table grants (no 10 % cap)."""
    with connect(start_daemon(composed_max_fraction=1.0).target) as c:
        yield c


def test_object_and_background_from_different_entries(uncapped: CacheClient) -> None:
    client = uncapped
    dog, beach, cat, forest = unit(1), unit(2), unit(3), unit(4)
    a = client.put("a dog in a forest", np.ones(8, np.float32), unit(10), object_vector=dog,
                   background_vector=forest, object_mask=MASK)
    b = client.put("a cat on a beach", np.zeros(8, np.float32), unit(11), object_vector=cat,
                   background_vector=beach)
    # "a dog on a beach": the whole prompt matches nothing, its parts match two different entries.
    result = client.lookup(unit(12), object_vector=at_similarity(dog, 0.93, 101),
                           background_vector=at_similarity(beach, 0.97, 102))
    assert result.best is None and result.miss_reason == ""
    (obj,), (bg,) = result.donors("object"), result.donors("background")
    assert (obj.entry_id, bg.entry_id) == (a, b)
    assert obj.similarity == pytest.approx(0.93, abs=1e-4) and bg.similarity == pytest.approx(0.97, abs=1e-4)
    assert obj.granted_steps == bg.granted_steps == 20  # the composite gets what the weaker part allows
    np.testing.assert_array_equal(obj.object_mask, MASK)
    assert bg.object_mask is None


@pytest.mark.parametrize(("fraction", "steps"), [(0.1, 5), (0.0, 0)])
def test_composed_steps_are_capped(start_daemon, fraction: float, steps: int) -> None:
    """composed_max_fraction caps a composite's K (0 turns composed hits off); whole matches keep theirs."""
    daemon = start_daemon(composed_max_fraction=fraction)
    with connect(daemon.target) as client:
        client.put("a dog in a forest", np.ones(8, np.float32), unit(10), object_vector=unit(1),
                   background_vector=unit(4))
        client.put("a cat on a beach", np.zeros(8, np.float32), unit(11), object_vector=unit(3),
                   background_vector=unit(2))
        result = client.lookup(unit(12), object_vector=unit(1), background_vector=unit(2))
        assert [c.granted_steps for c in result.candidates] == ([steps, steps] if steps else [])
        assert client.lookup(unit(10)).best.granted_steps == 25


def test_whole_prompt_match_comes_first(client: CacheClient) -> None:
    full = unit(20)
    client.put("a dog on a beach", np.ones(8, np.float32), full, object_vector=unit(21), background_vector=unit(22))
    result = client.lookup(at_similarity(full, 0.9, 101), object_vector=unit(21), background_vector=unit(22))
    assert result.best is not None and result.best.granted_steps == 20
    assert result.donors("object") == []


def test_no_composite_when_a_part_misses(client: CacheClient) -> None:
    client.put("a dog in a forest", np.ones(8, np.float32), unit(30), object_vector=unit(31),
               background_vector=unit(32))
    result = client.lookup(unit(33), object_vector=unit(31), background_vector=unit(34))
    assert result.candidates == [] and result.miss_reason == "below_threshold"
    without_parts = client.lookup(unit(33), object_vector=unit(31))
    assert without_parts.candidates == []


def test_partial_hit_only_for_the_roles_asked(client: CacheClient) -> None:
    """A part named in partial_roles answers alone; other parts do not; whole and composite come first."""
    entry = client.put("a dog in a forest", np.ones(8, np.float32), unit(30), object_vector=unit(31),
                       background_vector=unit(32))
    forest = dict(object_vector=unit(35), background_vector=at_similarity(unit(32), 0.8, 1))
    result = client.lookup(unit(33), **forest, partial_roles=("background",))
    assert [(c.entry_id, c.role, c.granted_steps) for c in result.candidates] == [(entry, "background", 5)]
    assert client.lookup(unit(33), **forest, partial_roles=("object",)).candidates == []
    assert client.lookup(unit(33), **forest).candidates == []
    # Only the object vector sent: the object donor answers alone.
    result = client.lookup(unit(33), object_vector=unit(31), partial_roles=("object", "background"))
    assert [c.role for c in result.candidates] == ["object"]
    # Nothing matches: still a miss; the whole prompt matches: a whole hit, as before.
    nothing = client.lookup(unit(33), object_vector=unit(35), background_vector=unit(36), partial_roles=("object",))
    assert nothing.candidates == [] and nothing.miss_reason == "below_threshold"
    assert client.lookup(unit(30), object_vector=unit(31), partial_roles=("object",)).best.entry_id == entry


def test_partial_roles_name_parts_only(daemon) -> None:
    request = pb.LookupRequest(namespace=NS.to_proto(), vectors=pb.Vectors(full=unit(1).tolist()),
                               partial_roles=[pb.ROLE_FULL])
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.CacheServiceStub(channel).Lookup(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "partial_roles" in err.value.details()


def test_intermediate_latents_are_not_donors(client: CacheClient) -> None:
    client.put("nirvana row", np.ones(8, np.float16), unit(40), object_vector=unit(41), background_vector=unit(42),
               step=10)
    result = client.lookup(unit(43), object_vector=unit(41), background_vector=unit(42))
    assert result.candidates == []


def test_fetch_credits_donor_roles(daemon, client: CacheClient) -> None:
    entry = client.put("p", np.ones(8, np.float32), unit(50), object_vector=unit(51), background_vector=unit(52))
    assert client.fetch(entry, role="object", granted_steps=15) is not None
    assert client.fetch(entry, role="background", granted_steps=15) is not None
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    assert 'role="object"} 15.0' in text and 'role="background"} 15.0' in text


@pytest.mark.parametrize(("mask", "message"), [
    (pb.Mask(shape=[], bits=b""), "1 to 4 positive sizes"),
    (pb.Mask(shape=[4, 0], bits=b""), "1 to 4 positive sizes"),
    (pb.Mask(shape=[4, 4], bits=b"\x00"), "needs 2"),
    (pb.Mask(shape=[1 << 13, 1 << 13], bits=b""), "cells, above"),
])
def test_bad_masks(daemon, mask: pb.Mask, message: str) -> None:
    header = pb.PutHeader(namespace=NS.to_proto(), prompt="p", vectors=pb.Vectors(full=unit(1).tolist()),
                          blob=pb.BlobInfo(size=1, sha256=b"x" * 32), object_mask=mask)
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CacheServiceStub(channel).Put(iter([pb.PutRequest(header=header)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
