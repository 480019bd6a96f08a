"""Per-tenant limits on real daemons: byte quotas that evict only the filling tenant's entries, namespaces
per tenant, request rates and Verify bytes (RESOURCE_EXHAUSTED with a sentence), and metric labels that
stay bounded however many namespaces clients make up (docs/security.md, "Per-tenant limits")."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import urllib.request

import crc32c
import grpc
import numpy as np
import pytest

from flexcache.client import CacheClient, Namespace
from flexcache.daemon.tenants import RateLimiter, fair_share
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect, metric
from tests.vectors import unit

KIB = 1024


def tenant_ns(tenant: str, model: str = NS.model) -> Namespace:
    return dataclasses.replace(NS, tenant=tenant, model=model)


def latent(i: int, kib: int = 256) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, kib * KIB, dtype=np.uint8)


def small_put(stub: pb_grpc.CacheServiceStub, ns: pb.Namespace, prompt: str, seed: int,
              size: int = 64) -> pb.PutResponse:
    """One Put of a `size`-byte raw blob; raises grpc.RpcError as the daemon answers."""
    blob = np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8).tobytes()
    header = pb.PutHeader(namespace=ns, prompt=prompt, vectors=pb.Vectors(full=unit(seed).tolist()),
                          blob=pb.BlobInfo(size=len(blob), sha256=hashlib.sha256(blob).digest(),
                                           crc32c=crc32c.crc32c(blob), codec="raw", dtype="uint8", shape=[len(blob)]))
    chunks = [pb.PutRequest(chunk=blob[i:i + (1 << 20)]) for i in range(0, len(blob), 1 << 20)]
    return stub.Put(iter([pb.PutRequest(header=header), *chunks]), timeout=10)


def lookup(stub: pb_grpc.CacheServiceStub, ns: pb.Namespace, seed: int) -> pb.LookupResponse:
    return stub.Lookup(pb.LookupRequest(namespace=ns, vectors=pb.Vectors(full=unit(seed).tolist())), timeout=10)


def tenant_bytes(client: CacheClient, tenant: str) -> tuple[int, int]:
    """(entries, bytes) the daemon's Stats count for the tenant's namespaces."""
    found = [ns for ns in client.stats().namespaces if ns.name.split("/")[0] == tenant]
    return sum(ns.entries for ns in found), sum(ns.bytes for ns in found)


def present(client: CacheClient, ids: list[str]) -> list[bool]:
    return [client.fetch(e) is not None for e in ids]


def test_a_tenant_filling_its_quota_evicts_none_of_another_tenants_entries(start_daemon) -> None:
    quota = 2 << 20
    daemon = start_daemon(max_bytes="16MiB", tenant_max_bytes=quota, eviction_policy="lru")
    with connect(daemon.target, tenant_ns("bob")) as bob, connect(daemon.target, tenant_ns("alice")) as alice:
        kept = [bob.put(f"bob {i}", latent(i), unit(i)) for i in range(4)]
        ids = []
        for i in range(24):  # 6 MiB: three times alice's quota
            ids.append(alice.put(f"alice {i}", latent(100 + i), unit(100 + i)))
            assert tenant_bytes(alice, "alice")[1] <= quota
        assert all(ids)
        assert present(bob, kept) == [True] * 4
        assert tenant_bytes(bob, "bob")[0] == 4
        entries, held = tenant_bytes(alice, "alice")
        assert 0.8 * quota <= held + 300 * KIB and entries < 8  # its own entries went, oldest first (LRU)
        assert present(alice, ids[-2:]) == [True, True] and not any(present(alice, ids[:4]))
        assert metric(daemon, "flexcache_tenant_evictions_total") == 24 - entries
        # An entry that could never fit the tenant's quota is refused with a sentence.
        with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as refused:
            small_put(pb_grpc.CacheServiceStub(channel), tenant_ns("alice").to_proto(), "too big", 1,
                      size=quota - 64 * KIB)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant_max_bytes" in refused.value.details()


def test_global_eviction_takes_from_the_tenant_over_its_fair_share(start_daemon) -> None:
    """Quotas that overcommit the budget (two tenants of 3.5 MiB in 4 MiB): the tenant filling its quota
    crosses the global budget and pays for it; the other, within its fair share, loses nothing (plain
    LRU would evict its entries first: they are the oldest)."""
    daemon = start_daemon(max_bytes="4MiB", tenant_max_bytes="3.5MiB", eviction_policy="lru")
    with connect(daemon.target, tenant_ns("bob")) as bob, connect(daemon.target, tenant_ns("alice")) as alice:
        kept = [bob.put(f"bob {i}", latent(i), unit(i)) for i in range(4)]  # 1 MiB
        for i in range(20):
            assert alice.put(f"alice {i}", latent(100 + i), unit(100 + i))
            stats = alice.stats()
            assert stats.bytes <= 0.95 * stats.max_bytes
        assert stats.evictions > 0 and metric(daemon, "flexcache_tenant_evictions_total") < stats.evictions
        assert present(bob, kept) == [True] * 4


def test_tenant_max_namespaces_refuses_with_a_sentence(start_daemon) -> None:
    daemon = start_daemon(tenant_max_namespaces=2)
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        for model in ("m0", "m1"):
            assert small_put(stub, tenant_ns("alice", model).to_proto(), f"in {model}", 1).created
        with pytest.raises(grpc.RpcError) as refused:
            small_put(stub, tenant_ns("alice", "m2").to_proto(), "one namespace too many", 2)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'alice' already holds 2 namespaces (tenant_max_namespaces = 2)" in refused.value.details()
        assert small_put(stub, tenant_ns("alice", "m0").to_proto(), "an existing namespace still takes puts", 3).created
        assert small_put(stub, tenant_ns("bob", "m2").to_proto(), "another tenant has its own count", 4).created
    daemon.terminate()  # the count is rebuilt from the store
    daemon.start()
    with grpc.insecure_channel(daemon.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            small_put(pb_grpc.CacheServiceStub(channel), tenant_ns("alice", "m3").to_proto(), "still too many", 5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_request_rate_refuses_past_the_burst_and_recovers(start_daemon) -> None:
    rate, burst = 2.0, 6
    daemon = start_daemon(tenant_requests_per_second=rate, tenant_request_burst=burst)
    alice, bob = tenant_ns("alice").to_proto(), tenant_ns("bob").to_proto()
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        start, admitted, refusal = time.monotonic(), 0, None
        for i in range(30):
            try:
                lookup(stub, alice, i)
                admitted += 1
            except grpc.RpcError as exc:
                refusal = exc
                break
        elapsed = time.monotonic() - start
        assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'alice' is over its request rate (tenant_requests_per_second = 2" in refusal.details()
        assert burst <= admitted <= burst + rate * elapsed + 1
        for call in (lambda: small_put(stub, alice, "a put too", 1),
                     lambda: stub.Delete(pb.DeleteRequest(namespace=alice, entry_id="0" * 64), timeout=10),
                     lambda: stub.Verify(pb.VerifyRequest(namespace=alice, entry_id="0" * 64), timeout=10),
                     lambda: stub.FetchDirect(pb.FetchRequest(namespace=alice, entry_id="0" * 64), timeout=10)):
            codes = []
            for _ in range(3):  # a token may come back meanwhile (one each 1 / rate s): one call may pass
                try:
                    call()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2, codes
        assert lookup(stub, bob, 1) is not None  # another tenant has its own bucket
        time.sleep(2.5 / rate)  # two tokens back
        lookup(stub, alice, 99)
        lookup(stub, alice, 98)
    assert metric(daemon, "flexcache_calls_refused_total", reason="tenant_requests") >= 5


def test_verify_past_its_byte_budget_refuses(start_daemon) -> None:
    # 256 KiB/s, bursts of one second's: the first Verify's 768 KiB leave the bucket 512 KiB in debt, so
    # the second is refused unless it comes 3 s later (a slow machine's calls come well within that).
    daemon = start_daemon(verify_bytes_per_second="256KiB")
    alice, bob = tenant_ns("alice").to_proto(), tenant_ns("bob").to_proto()
    size = 768 * KIB
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        mine = small_put(stub, alice, "verified", 1, size=size).entry_id
        theirs = small_put(stub, bob, "verified too", 2, size=size).entry_id
        assert stub.Verify(pb.VerifyRequest(namespace=alice, entry_id=mine), timeout=10).intact
        with pytest.raises(grpc.RpcError) as refused:
            stub.Verify(pb.VerifyRequest(namespace=alice, entry_id=mine), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "verify_bytes_per_second" in refused.value.details()
        assert f"this entry's {size} bytes" in refused.value.details()
        assert stub.Verify(pb.VerifyRequest(namespace=bob, entry_id=theirs), timeout=10).intact
        time.sleep(3.5)  # 768 KiB back: the bucket full again
        assert stub.Verify(pb.VerifyRequest(namespace=alice, entry_id=mine), timeout=10).intact
    assert metric(daemon, "flexcache_calls_refused_total", method="Verify", reason="verify_bytes") == 1


def _namespace_series(daemon) -> dict[str, dict[str, float]]:
    """metric name -> {namespace label: value} for every series with a namespace label."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = re.match(r'(\w+)\{(?:.*,)?namespace="([^"]*)".*\} (\S+)$', line)
        if match:
            name, label, value = match.groups()
            by_label = found.setdefault(name, {})
            by_label[label] = by_label.get(label, 0.0) + float(value)
    return found


def test_metric_labels_stay_bounded_and_other_sums(start_daemon) -> None:
    limit, stored = 5, 12
    daemon = start_daemon(metrics_max_namespaces=limit)
    namespaces = [tenant_ns(f"tenant-{i:02d}").to_proto() for i in range(stored)]
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        ids = []
        for i, ns in enumerate(namespaces):  # namespace i holds 1 + i % 3 entries
            ids.append([small_put(stub, ns, f"prompt {i} {j}", 10 * i + j, size=64 + i).entry_id
                        for j in range(1 + i % 3)])
        for i in range(300):  # made up: namespaces no entry was ever stored in
            made_up = tenant_ns(f"made-up-{i}", model=f"model-{i}").to_proto()
            assert not lookup(stub, made_up, i).candidates
        for i, ns in enumerate(namespaces):
            lookup(stub, ns, 10 * i)
            list(stub.Fetch(pb.FetchRequest(namespace=ns, entry_id=ids[i][0], role=pb.ROLE_FULL, granted_steps=10),
                            timeout=10))

        def check(labelled: set[str]) -> None:
            series = _namespace_series(daemon)
            stats = {ns.name: ns for ns in daemon.stats().namespaces}
            for name in ("flexcache_entries", "flexcache_stored_bytes", "flexcache_lookups_total",
                         "flexcache_hits_total"):
                assert set(series.get(name, {})) <= labelled | {"_other"}, name
            others = [ns for name, ns in stats.items() if name not in labelled]
            assert len(others) == stored - limit
            assert series["flexcache_entries"]["_other"] == sum(ns.entries for ns in others)
            assert series["flexcache_stored_bytes"]["_other"] == sum(ns.bytes for ns in others)
            assert series["flexcache_stored_blob_bytes"]["_other"] == sum(ns.blob_bytes for ns in others)
            for name in labelled:
                assert series["flexcache_entries"][name] == stats[name].entries
            assert metric(daemon, "flexcache_aggregated_namespaces") == stored - limit

        first = {ns.name for ns in daemon.stats().namespaces if int(ns.name[7:9]) < limit}  # the first 5 stored
        check(first)
        series = _namespace_series(daemon)
        assert series["flexcache_lookups_total"]["_other"] >= 300 + stored - limit
        assert series["flexcache_hits_total"]["_other"] == stored - limit
        # Removing an entry of an aggregated namespace lowers the sum, not one namespace's value.
        assert stub.Delete(pb.DeleteRequest(namespace=namespaces[-1], entry_id=ids[-1][0]), timeout=10).deleted
        check(first)
    daemon.terminate()  # after a restart the largest namespaces keep their labels: here those of 3 entries
    daemon.start()
    by_size = sorted(daemon.stats().namespaces, key=lambda ns: (-ns.bytes, ns.name))
    check({ns.name for ns in by_size[:limit]})


def test_rate_limiter_memory_is_bounded() -> None:
    """Unit checks of the bucket table: refilled buckets are dropped, tenants past the bound share one."""
    now = [0.0]
    limiter = RateLimiter(rate=1.0, capacity=2.0, max_buckets=3, clock=lambda: now[0])
    assert [limiter.take(t) for t in ("a", "b", "c")] == [0.0, 0.0, 0.0] and len(limiter) == 3
    assert limiter.take("d") == 0.0 and limiter.take("e") == 0.0  # the shared overflow bucket: two tokens
    assert limiter.take("f") == pytest.approx(1.0)  # made-up names do not multiply the rate
    now[0] = 5.0  # every bucket refilled: they carry no state and are dropped as new tenants come
    for i in range(1000):
        limiter.take(f"made-up-{i}")
        now[0] += 2.0
    assert len(limiter) <= 3
    assert fair_share({"a": 8, "b": 5, "c": 0.1}, 8.5) == pytest.approx(4.2)
    assert fair_share({"a": 1, "b": 2}, 5) == float("inf")
