"""Put, lookup and fetch through a real daemon: dtypes, granted steps, namespaces, admin calls."""

from __future__ import annotations

import dataclasses
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flexcache.client import CacheClient
from tests.conftest import NS, connect
from tests.vectors import at_similarity, unit

LATENT_SHAPE = (16, 3, 12, 20)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_numpy_round_trip(client: CacheClient, dtype) -> None:
    latent = np.random.default_rng(1).standard_normal(LATENT_SHAPE).astype(dtype)
    entry_id = client.put("a corgi running on a beach", latent, unit(1), attrs={"seed": "7"})
    assert entry_id and len(entry_id) == 64
    hit = client.get(unit(1))
    assert hit is not None and hit.kind == "full"
    array, (candidate,) = hit.latent, hit.sources
    assert candidate.entry_id == entry_id and candidate.granted_steps == 25 and candidate.role == "full"
    assert candidate.blob.attrs["seed"] == "7"
    assert array.dtype == dtype and array.shape == LATENT_SHAPE
    np.testing.assert_array_equal(array, latent)


def test_bf16_round_trip(client: CacheClient) -> None:
    latent = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    client.put("a red square drifting left", latent, unit(2))
    tensor = client.get(unit(2), as_torch=True).latent
    assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, latent)
    widened = client.get(unit(2)).latent  # numpy has no bf16: it widens exactly to float32
    assert widened.dtype == np.float32 and np.array_equal(widened, latent.float().numpy())


def test_large_blob_streams_in_chunks(client: CacheClient) -> None:
    latent = np.random.default_rng(3).standard_normal((16, 21, 60, 104)).astype(np.float16)  # Wan 480p, 4.2 MB
    entry_id = client.put("a wide shot of a city at night", latent, unit(3))
    fetched = client.fetch(entry_id)
    assert fetched is not None and fetched.blob.size > 3 << 20  # several 1 MiB chunks
    np.testing.assert_array_equal(fetched.latent(), latent)


def test_fetch_chunks_parse_with_plain_protobuf(daemon, client: CacheClient) -> None:
    """The daemon pre-encodes chunk messages; any gRPC client (here the generated stub) must parse them."""
    from flexcache.v1 import cache_pb2 as pb
    from flexcache.v1 import cache_pb2_grpc as pb_grpc
    from flexcache.v1.wire import encode_chunk as encoded_chunk

    for size in (1, 127, 128, 300, 1 << 20):
        chunk = np.random.default_rng(size).bytes(size)
        assert encoded_chunk(chunk) == pb.FetchResponse(chunk=chunk).SerializeToString()
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)
    entry_id = client.put_blob("wire format", data, pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)]),
                               unit(70))
    with grpc.insecure_channel(daemon.target, options=[("grpc.max_receive_message_length", 2 << 20)]) as channel:
        stream = pb_grpc.CacheServiceStub(channel).Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry_id))
        messages = list(stream)
    assert messages[0].header.entry_id == entry_id
    assert b"".join(m.chunk for m in messages[1:]) == data and len(messages) == 5


def test_granted_steps_follow_nirvana_table(client: CacheClient) -> None:
    base = unit(10)
    client.put("base prompt", np.zeros((4, 4), np.float16), base)
    expected = {0.99: 25, 0.93: 20, 0.87: 15, 0.80: 10, 0.70: 5}
    for similarity, steps in expected.items():
        result = client.lookup(at_similarity(base, similarity, seed=int(similarity * 100)))
        assert result.best is not None, similarity
        assert result.best.granted_steps == steps
        assert result.best.similarity == pytest.approx(similarity, abs=1e-4)
    miss = client.lookup(at_similarity(base, 0.5, seed=5))
    assert miss.best is None and miss.miss_reason == "below_threshold"


def test_steps_scale_with_total_steps(daemon) -> None:
    ns30 = dataclasses.replace(NS, total_steps=30)
    with connect(daemon.target, ns30) as c:
        c.put("p", np.zeros(8, np.float32), unit(4))
        assert c.lookup(unit(4)).best.granted_steps == 15
        assert c.lookup(at_similarity(unit(4), 0.80, seed=1)).best.granted_steps == 6


def test_top_k_returns_best_first(client: CacheClient) -> None:
    base = unit(20)
    for i, similarity in enumerate([0.97, 0.91, 0.99]):
        client.put(f"prompt {i}", np.full(4, i, np.float32), at_similarity(base, similarity, seed=i))
    result = client.lookup(base, top_k=3)
    sims = [c.similarity for c in result.candidates]
    assert sims == sorted(sims, reverse=True) and len(sims) == 3
    assert [c.prompt for c in result.candidates] == ["prompt 2", "prompt 0", "prompt 1"]


def test_intermediate_latent_serves_only_its_own_step(client: CacheClient) -> None:
    base = unit(30)
    client.put("nirvana row", np.zeros(4, np.float16), base, step=20)
    assert client.lookup(base).best.granted_steps == 20  # similarity 1 allows 25, the row holds 20
    assert client.lookup(at_similarity(base, 0.87, seed=3)).best is None  # allows 15 < 20


def test_nirvana_checkpoints_serve_the_largest_usable_step(client: CacheClient) -> None:
    base = unit(31)
    for k in (25, 5, 20, 10, 15):  # one generation's five checkpoints share its vector
        client.put("nirvana prompt", np.full(4, k, np.float16), base, step=k)
    assert [c.granted_steps for c in client.lookup(base, top_k=5).candidates] == [25, 20, 15, 10, 5]
    assert client.lookup(at_similarity(base, 0.87, seed=4)).best.granted_steps == 15  # allows 15


def test_put_is_content_addressed(client: CacheClient) -> None:
    latent = np.ones((2, 2), np.float32)
    first = client.put("same", latent, unit(40))
    assert client.put("same", latent, unit(40)) == first
    assert client.put("other prompt", latent, unit(40)) != first
    assert client.stats().entries == 2


@pytest.mark.parametrize("data_port", [True, False], ids=["PutDirect", "Put stream"])
def test_a_put_carries_its_sha256_only_when_asked(daemon, data_port: bool) -> None:
    """By default a blob's CRC-32C is its check end to end; with put_sha256 the daemon checks the
    sha256 too and keeps it. The two are different entries (the checksums are part of the identity)."""
    latent = np.random.default_rng(3).standard_normal((64, 64, 64)).astype(np.float32)  # 1 MiB: PutDirect
    with connect(daemon.target, data_port=data_port) as crc_only, \
            connect(daemon.target, data_port=data_port, put_sha256=True) as both:
        plain, strong = crc_only.put("a corgi", latent, unit(60)), both.put("a corgi", latent, unit(60))
        assert plain and strong and plain != strong
        assert crc_only.put("a corgi", latent, unit(60)) == plain  # still content-addressed
        fetched = {e: crc_only.fetch(e) for e in (plain, strong)}
    assert fetched[plain].blob.sha256 == b"" and fetched[plain].blob.HasField("crc32c")
    assert len(fetched[strong].blob.sha256) == 32 and fetched[strong].blob.crc32c == fetched[plain].blob.crc32c
    assert bytes(fetched[plain].data) == bytes(fetched[strong].data)


def test_namespaces_are_isolated(daemon, client: CacheClient) -> None:
    entry_id = client.put("tenant a's prompt", np.ones(8, np.float32), unit(50))
    other_tenant = dataclasses.replace(NS, tenant="globex")
    other_steps = dataclasses.replace(NS, total_steps=30)
    for ns in (other_tenant, other_steps):
        with connect(daemon.target, ns) as other:
            result = other.lookup(unit(50))
            assert result.best is None and result.miss_reason == "unknown_namespace"
            assert other.fetch(entry_id) is None
            assert other.last_error.code() == grpc.StatusCode.NOT_FOUND
            assert other.delete(entry_id) is False
            other.put("globex prompt", np.ones(8, np.float32), unit(50))
            assert other.lookup(unit(50)).best.prompt == "globex prompt"
    assert client.lookup(unit(50)).best.entry_id == entry_id


def test_delete_and_stats(client: CacheClient) -> None:
    entry_id = client.put("to delete", np.random.default_rng(0).standard_normal(1000).astype(np.float32), unit(60))
    stats = client.stats()
    assert stats.entries == 1 and stats.namespaces[0].dimension == 384
    blob = client.fetch(entry_id).blob.size  # lossless codec: about the 4,000 raw bytes
    assert stats.blob_bytes == stats.namespaces[0].blob_bytes == blob > 3000
    assert stats.bytes == stats.namespaces[0].bytes > blob + 384 * 2  # the record and the float16 vector
    assert stats.namespaces[0].name == "acme/wan2.1-t2v-1.3b/832x480x81/flow/50"
    assert client.delete(entry_id) is True
    assert client.delete(entry_id) is False
    assert client.lookup(unit(60)).miss_reason == "empty_namespace"
    assert client.stats().entries == 0 and client.stats().bytes == client.stats().blob_bytes == 0


def test_health_and_reflection(daemon) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "flexcache.v1.CacheService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"flexcache.v1.CacheService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(daemon, client: CacheClient) -> None:
    base = unit(70)
    client.put("metric prompt", np.ones(64, np.float32), base)
    client.get(base)
    client.lookup(at_similarity(base, 0.3, seed=1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    ns = 'namespace="acme/wan2.1-t2v-1.3b/832x480x81/flow/50"'
    assert f'flexcache_lookups_total{{{ns},result="hit"}} 1.0' in text
    assert f'flexcache_lookup_misses_total{{{ns},reason="below_threshold"}} 1.0' in text
    assert f'flexcache_steps_granted_total{{{ns},role="full"}} 25.0' in text
    assert f"flexcache_entries{{{ns}}} 1.0" in text
    assert 'flexcache_requests_total{code="OK",method="Put"} 1.0' in text
    assert 'flexcache_request_duration_seconds_count{method="Lookup"} 2.0' in text
    assert "flexcache_max_bytes 1.073741824e+10" in text
