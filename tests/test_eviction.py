"""Eviction keeps the byte budget and follows each policy; policy state survives restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flexcache.client import CacheClient
from flexcache.daemon.cache import Cache
from flexcache.daemon.config import NIRVANA_THRESHOLDS, parse_thresholds
from flexcache.daemon.eviction import make_policy
from flexcache.daemon.index.edge import EdgeIndex
from flexcache.daemon.limits import Limits
from flexcache.daemon.metrics import Metrics
from flexcache.daemon.steps import StepTable
from flexcache.daemon.store import Store
from tests.conftest import NS, connect
from tests.vectors import unit

KIB = 1024


def latent(i: int, kib: int = 256) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, kib * KIB, dtype=np.uint8)


def present(c: CacheClient, ids: list[str]) -> list[bool]:
    return [c.fetch(e) is not None for e in ids]


@pytest.mark.parametrize("policy", ["lru", "lcbfu", "utility"])
def test_stays_within_the_budget(start_daemon, policy: str) -> None:
    daemon = start_daemon(max_bytes="3MiB", eviction_policy=policy)
    with connect(daemon.target) as c:
        for i in range(40):
            assert c.put(f"p{i}", latent(i), unit(i))
            stats = c.stats()
            assert stats.bytes <= 0.95 * stats.max_bytes
        assert 9 <= stats.entries <= 11 and stats.evictions == 40 - stats.entries
        assert c.lookup(unit(39)).best is not None  # the newest entry is kept


def test_lru_evicts_least_recently_used(start_daemon) -> None:
    daemon = start_daemon(max_bytes="3MiB", eviction_policy="lru")
    with connect(daemon.target) as c:
        ids = [c.put(f"p{i}", latent(i), unit(i)) for i in range(10)]
        c.fetch(ids[0])  # a read refreshes recency
        c.put("p10", latent(10), unit(10))
        c.put("p11", latent(11), unit(11))
        assert present(c, ids[:4]) == [True, False, False, True]


def test_lcbfu_evicts_lowest_hits_times_k(start_daemon) -> None:
    daemon = start_daemon(max_bytes="3MiB", eviction_policy="lcbfu")
    with connect(daemon.target) as c:
        ids = [c.put(f"p{i}", latent(i), unit(i)) for i in range(10)]
        for e in ids[:5]:
            c.fetch(e, role="full", granted_steps=20)  # hits, long ago
        for e in ids[5:]:
            c.fetch(e)  # recent reads without a hit: LRU would keep these
        daemon.terminate()  # policy state must be rebuilt from stored usage
        daemon.start()
    with connect(daemon.target) as c:
        c.put("p10", latent(10), unit(10))
        c.put("p11", latent(11), unit(11))
        assert present(c, ids[:5]) == [True] * 5
        assert present(c, ids[5:7]) == [False, False]


def test_utility_evicts_least_value_per_byte(start_daemon) -> None:
    daemon = start_daemon(max_bytes="4MiB", eviction_policy="utility", low_watermark=0.8)
    with connect(daemon.target) as c:
        small = [c.put(f"small {i}", latent(i, 128), unit(i)) for i in range(8)]
        large = [c.put(f"large {i}", latent(100 + i, 512), unit(100 + i)) for i in range(4)]
        for e in small + large:
            c.fetch(e, role="full", granted_steps=10)  # the same steps saved each
        for _ in range(6):
            c.fetch(large[0], role="full", granted_steps=25)  # saved enough to be worth its size
        # 3 MiB stored; the 7th extra crosses the high watermark (3.8 MiB) and evicts down to 3.2 MiB.
        # Per byte, the large entries with one hit are worth least, even below brand-new small ones.
        extra = [c.put(f"extra {i}", latent(200 + i, 128), unit(200 + i)) for i in range(8)]
        assert present(c, large) == [True, False, False, True]
        assert all(present(c, small)) and all(present(c, extra))


def test_utility_ages_by_turnover(start_daemon) -> None:
    """Among entries with equal credit, the oldest goes first: credit earned one put later counts more
    than the few bytes a longer prompt adds (on a wall clock, milliseconds apart, it would not)."""
    daemon = start_daemon(max_bytes="3MiB", eviction_policy="utility")
    with connect(daemon.target) as c:
        ids = [c.put("p" + "x" * (40 * i), latent(i), unit(i)) for i in range(10)]  # newer = larger
        c.put("p10", latent(10), unit(10))
        c.put("p11", latent(11), unit(11))
        assert present(c, ids[:3]) == [False, False, True]


def test_turnover_clock_resumes_after_restart(tmp_path: Path) -> None:
    """In-process, to read the clock: it advances by each new entry's share of max_bytes, a credit one
    half-life of turnover later is worth twice as much, and a reopened cache resumes the clock."""
    import hashlib

    from flexcache.v1 import cache_pb2 as pb

    limits = Limits(max_bytes=8 << 20, high_watermark=0.95, low_watermark=0.85, max_blob_bytes=1 << 30,
                    max_vector_dim=4096, utility_half_life=0.25, utility_prior_steps=0)

    def open_cache() -> Cache:
        cache = Cache(Store(tmp_path / "store"), EdgeIndex(tmp_path / "index"), make_policy("utility"),
                      StepTable(parse_thresholds(NIRVANA_THRESHOLDS)), Metrics(), limits)
        cache.open()
        return cache

    def put(cache: Cache, i: int) -> str:
        data = latent(i, 1024).tobytes()
        header = pb.PutHeader(namespace=NS.to_proto(), prompt=f"p{i}", vectors=pb.Vectors(full=unit(i).tolist()),
                              blob=pb.BlobInfo(size=len(data), sha256=hashlib.sha256(data).digest()))
        session = cache.begin_put(header)
        session.add_chunk(data)
        return session.finish().entry_id

    def hit(cache: Cache, eid: str) -> None:
        _, chunks = cache.fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=eid, role=pb.ROLE_FULL,
                                                granted_steps=10))
        chunks.close()

    cache = open_cache()
    try:
        first, second = put(cache, 0), put(cache, 1)
        size = cache.usage_of(first).size
        assert cache.clock == pytest.approx(2 * size / limits.max_bytes)
        hit(cache, first)
        for i in range(2, 6):  # half a turnover (two half-lives) of new entries, no eviction yet
            put(cache, i)
        assert cache.clock == pytest.approx(6 * size / limits.max_bytes)
        hit(cache, second)
        a, b = cache.usage_of(first), cache.usage_of(second)
        # The same steps, but b's were saved 4 entries = 0.5 turnover = 2 half-lives later.
        assert b.log2_credit - a.log2_credit == pytest.approx(4 * size / limits.max_bytes / 0.25)
    finally:
        cache.index.close()
        cache.store.close()
    cache = open_cache()
    try:
        assert cache.clock == pytest.approx(6 * size / limits.max_bytes)  # from the newest credit
        put(cache, 1000)
        assert cache.clock == pytest.approx(7 * size / limits.max_bytes, rel=1e-4)
    finally:
        cache.index.close()
        cache.store.close()


def test_entry_being_streamed_is_not_evicted(tmp_path: Path) -> None:
    """In-process (real RocksDB and Qdrant Edge, no gRPC) to hold a fetch open at a chosen moment."""
    import hashlib

    from flexcache.v1 import cache_pb2 as pb

    store, index = Store(tmp_path / "store"), EdgeIndex(tmp_path / "index")
    limits = Limits(max_bytes=3 << 20, high_watermark=0.95, low_watermark=0.85, max_blob_bytes=1 << 30,
                    max_vector_dim=4096, utility_half_life=1.0, utility_prior_steps=5)
    cache = Cache(store, index, make_policy("lru"), StepTable(parse_thresholds(NIRVANA_THRESHOLDS)), Metrics(),
                  limits)
    cache.open()

    def put(i: int) -> str:
        data = latent(i).tobytes()
        header = pb.PutHeader(namespace=NS.to_proto(), prompt=f"p{i}", vectors=pb.Vectors(full=unit(i).tolist()),
                              blob=pb.BlobInfo(size=len(data), sha256=hashlib.sha256(data).digest()))
        session = cache.begin_put(header)
        for start in range(0, len(data), 1 << 18):
            session.add_chunk(data[start:start + (1 << 18)])
        return session.finish().entry_id

    try:
        ids = [put(i) for i in range(10)]
        header, chunks = cache.fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=ids[0]))
        first = next(chunks)  # the stream is open: ids[0] is the LRU victim, but pinned
        for i in range(10, 14):
            put(i)
        assert cache.usage_of(ids[0]) is not None and cache.usage_of(ids[1]) is None
        data = first + b"".join(chunks)
        assert hashlib.sha256(data).digest() == header.blob.sha256
        for i in range(14, 30):  # once the stream is closed (pin released) it ages out like any other
            put(i)
        assert cache.usage_of(ids[0]) is None

        # A fetch closed before its first chunk (the client left after the header; a data-port ticket
        # never redeemed) releases its pin too.
        fresh = [put(i) for i in range(30, 40)]
        victim = fresh[0]  # the least recently used of these
        _, chunks = cache.fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=victim))
        chunks.close()
        for i in range(40, 50):
            put(i)
        assert cache.usage_of(victim) is None
    finally:
        index.close()
        store.close()


def test_abandoned_fetch_releases_its_entry(start_daemon) -> None:
    import time
    import urllib.request

    import grpc

    from flexcache.v1 import cache_pb2 as pb
    from flexcache.v1 import cache_pb2_grpc as pb_grpc

    daemon = start_daemon(max_bytes="64MiB", eviction_policy="lru")
    with connect(daemon.target) as c:
        big = c.put("big", latent(0, 32 * 1024), unit(0))  # large enough not to fit in flow-control windows
        with grpc.insecure_channel(daemon.target) as channel:
            stream = pb_grpc.CacheServiceStub(channel).Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=big))
            next(stream), next(stream)  # header and the first chunk, then walk away
            stream.cancel()
        url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while 'code="CANCELLED",method="Fetch"' not in urllib.request.urlopen(url, timeout=5).read().decode():
            assert time.monotonic() < deadline, "the abandoned stream was never closed"
            time.sleep(0.05)
        for i in range(1, 9):  # the pin is gone: as the least recently used entry it is evicted
            c.put(f"p{i}", latent(i, 4 * 1024), unit(i))
        assert c.fetch(big) is None
