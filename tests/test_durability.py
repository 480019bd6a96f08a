"""Restarts, crashes and drains: acknowledged entries survive, nothing corrupt is ever served."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import urllib.request

import grpc
import numpy as np

from flexcache.daemon.entries import NamespaceKey
from flexcache.daemon.index.base import IndexPoint
from flexcache.daemon.index.edge import EdgeIndex
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect
from tests.vectors import unit


def latent_for(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((4, 8, 64, 64)).astype(np.float16)  # 256 KiB


def test_restart_keeps_every_entry(daemon) -> None:
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent_for(i), unit(i)) for i in range(20)]
        before = c.stats()
    assert daemon.terminate() == 0
    daemon.start()
    with connect(daemon.target) as c:
        after = c.stats()
        assert after.entries == 20
        assert (after.bytes, after.blob_bytes) == (before.bytes, before.blob_bytes)
        for i, entry_id in enumerate(ids):
            best = c.lookup(unit(i)).best
            assert best.entry_id == entry_id
            np.testing.assert_array_equal(c.fetch(entry_id).latent(), latent_for(i))


def test_sigkill_during_puts_loses_no_acknowledged_entry(daemon) -> None:
    acknowledged: dict[int, str] = {}
    stop = threading.Event()

    def writer() -> None:
        with connect(daemon.target, warn_every_s=1e9) as c:
            i = 0
            while not stop.is_set() and i < 10_000:
                entry_id = c.put(f"prompt {i}", latent_for(i), unit(i))
                if entry_id is None:  # the daemon died: this put was never acknowledged
                    return
                acknowledged[i] = entry_id
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.kill()  # SIGKILL, mid-stream
    stop.set()
    thread.join(30)
    assert len(acknowledged) >= 15
    daemon.start()
    with connect(daemon.target) as c:
        stored = c.stats().entries
        assert len(acknowledged) <= stored <= len(acknowledged) + 1  # at most the in-flight one, whole
        for i, entry_id in acknowledged.items():
            fetched = c.fetch(entry_id)  # verifies size and sha256
            assert fetched is not None, f"acknowledged entry {i} lost"
            np.testing.assert_array_equal(fetched.latent(), latent_for(i))
            assert c.lookup(unit(i)).best.entry_id == entry_id
        # The put in flight at the kill is either absent or whole, never torn.
        n = len(acknowledged)
        result = c.lookup(unit(n))
        if result.best is not None and result.best.similarity > 0.999:
            np.testing.assert_array_equal(c.fetch(result.best.entry_id).latent(), latent_for(n))


def test_startup_reindexes_entries_missing_from_the_index(daemon) -> None:
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent_for(i), unit(i)) for i in range(5)]
    daemon.terminate()
    shutil.rmtree(daemon.data_dir / "index")  # as if the index writes had been lost
    daemon.start()
    with connect(daemon.target) as c:
        assert [c.lookup(unit(i)).best.entry_id for i in range(5)] == ids
    metrics = _metrics(daemon)
    assert 'flexcache_reconciled_total{action="reindexed"} 5.0' in metrics


def test_startup_removes_index_points_without_entries(daemon) -> None:
    with connect(daemon.target) as c:
        kept = c.put("kept", latent_for(1), unit(1))
    daemon.terminate()
    # An index point whose store write was lost (written to the index, then the process died).
    index = EdgeIndex(daemon.data_dir / "index")
    orphan = "f" * 64
    index.upsert([IndexPoint(orphan, NamespaceKey.of(NS.to_proto()).key, {"full": unit(2).tolist()})])
    assert set(index.entry_ids()) == {kept, orphan}
    index.close()
    daemon.start()
    with connect(daemon.target) as c:
        assert c.lookup(unit(2)).miss_reason == "below_threshold"
        assert c.lookup(unit(1)).best.entry_id == kept
    assert 'flexcache_reconciled_total{action="orphan_point"} 1.0' in _metrics(daemon)
    daemon.terminate()
    index = EdgeIndex(daemon.data_dir / "index")
    assert set(index.entry_ids()) == {kept}
    index.close()


def test_sigterm_drains_in_flight_put(daemon) -> None:
    """A Put still streaming when SIGTERM arrives completes; then the daemon exits 0."""
    blob = latent_for(9).tobytes()
    header = pb.PutHeader(namespace=NS.to_proto(), prompt="slow", vectors=pb.Vectors(full=unit(9).tolist()),
                          blob=pb.BlobInfo(size=len(blob), sha256=hashlib.sha256(blob).digest(), codec="raw"))
    started = threading.Event()

    def slow_messages():
        yield pb.PutRequest(header=header)
        for i in range(0, len(blob), 64 << 10):
            started.set()
            time.sleep(0.1)
            yield pb.PutRequest(chunk=blob[i:i + (64 << 10)])

    result = {}
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        thread = threading.Thread(target=lambda: result.update(r=stub.Put(slow_messages(), timeout=30)))
        thread.start()
        started.wait(10)
        time.sleep(0.2)
        assert daemon.terminate() == 0
        thread.join(30)
    assert result["r"].created
    daemon.start()
    with connect(daemon.target) as c:
        assert c.lookup(unit(9)).best.prompt == "slow"


def _metrics(daemon) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()


def test_fsync_mode_round_trip(start_daemon) -> None:
    daemon = start_daemon(fsync="true")
    with connect(daemon.target) as c:
        entry_id = c.put("synced", latent_for(1), unit(1))
    daemon.kill()
    daemon.start()
    with connect(daemon.target) as c:
        np.testing.assert_array_equal(c.fetch(entry_id).latent(), latent_for(1))

