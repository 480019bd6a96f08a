"""The embedded index on disk: bounded while puts keep arriving, rebuilt when damaged or foreign, and
with more namespaces than stay open: a bounded number of open shards (and threads), none losing a point
when it is closed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np

from flexcache.daemon.index.base import IndexEvents, IndexPoint
from flexcache.daemon.index.edge import EdgeIndex
from tests.conftest import connect
from tests.test_durability import latent_for
from tests.vectors import unit

DIM = 128


def disk_bytes(folder: Path) -> int:
    """Allocated bytes under `folder` (files may vanish while the optimizer replaces segments)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_blocks * 512
    return total


def test_index_folder_stays_bounded_while_puts_arrive(daemon) -> None:
    """12,000 whole-prompt entries, sampled every 50 ms during the puts: the index folder stays within
    4x the raw float32 vectors (plus a few MiB), never only after a clean close. Before the fix every
    optimizer pass left its input segments on disk and each point paid for three named vectors."""
    n, writers = 12_000, 4
    stop = threading.Event()
    peak = [0, 0]  # disk bytes, points stored when seen

    def sample() -> None:
        while not stop.wait(0.05):
            peak[:] = max(peak, [disk_bytes(daemon.data_dir / "index"), done[0]])

    done = [0]

    def write(w: int) -> None:
        with connect(daemon.target, max_rel_error=None) as c:
            for i in range(w, n, writers):
                assert c.put(f"prompt {i}", np.full(4, i, np.float32), unit(i, DIM)) is not None
                done[0] += 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    raw = n * DIM * 4
    assert peak[0] <= 4 * raw + (8 << 20), f"index folder reached {peak[0]} bytes for {raw} bytes of vectors"
    with connect(daemon.target) as c:
        for i in (0, n // 2, n - 1):
            assert c.lookup(unit(i, DIM)).best.prompt == f"prompt {i}"


def _entries(daemon, n: int = 5) -> list[str]:
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent_for(i), unit(i)) for i in range(n)]
    assert daemon.terminate() == 0
    return ids


def _lookups_find(daemon, ids: list[str]) -> None:
    with connect(daemon.target) as c:
        assert [c.lookup(unit(i)).best.entry_id for i in range(len(ids))] == ids


def test_damaged_shard_is_set_aside_and_rebuilt(daemon) -> None:
    ids = _entries(daemon)
    [shard] = (daemon.data_dir / "index").iterdir()
    for path in shard.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\xff" * 7)  # scribbled and truncated
    daemon.start()
    _lookups_find(daemon, ids)
    assert (daemon.data_dir / "index.damaged" / shard.name).is_dir()
    assert "cannot be loaded" in daemon.log.read_text()


def test_folder_of_another_layout_is_removed_and_rebuilt(daemon) -> None:
    """What earlier versions wrote (one shard per namespace holding all three vectors, or one per
    dimension) is not loaded: the store is the source of truth and re-indexes every entry."""
    ids = _entries(daemon)
    index_dir = daemon.data_dir / "index"
    [shard] = index_dir.iterdir()
    shard.rename(index_dir / shard.name.removesuffix(".full"))
    (index_dir / "d384").mkdir()
    daemon.start()
    _lookups_find(daemon, ids)
    assert sorted(p.name for p in index_dir.iterdir()) == [shard.name]


def _eid(ns: int, i: int) -> str:
    return hashlib.sha256(f"{ns}/{i}".encode()).hexdigest()


def _point(ns: int, i: int) -> IndexPoint:
    return IndexPoint(_eid(ns, i), f"ns{ns}", {"full": unit(ns * 1000 + i, 32).tolist()})


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_open_shards_stay_bounded_and_a_closed_shard_lost_nothing(tmp_path: Path) -> None:
    """12 namespaces through an index that keeps 3 shards open: never more open (nor their search
    threads), every search answers from its own namespace, and a copy of the folder taken while the
    index runs (as a crash would leave it) holds every point of the shards it closed."""
    before = _threads()
    index = EdgeIndex(tmp_path / "index", max_open_shards=3)
    try:
        for ns in range(12):
            index.upsert([_point(ns, i) for i in range(5)])
            assert index.open_shards() <= 3
        assert _threads() <= before + 1 + 3 + 2  # the background thread, a search thread per open shard, slack
        for ns in range(12):
            hits = index.search(f"ns{ns}", "full", unit(ns * 1000 + 2, 32).tolist(), limit=5)
            assert hits[0].entry_id == _eid(ns, 2)
            assert {h.entry_id for h in hits} <= {_eid(ns, i) for i in range(5)}
            assert index.open_shards() <= 3
        assert index.search("ns99", "full", unit(1, 32).tolist(), 5) == []
        assert index.loads >= 12 - 3
        shutil.copytree(tmp_path / "index", tmp_path / "crashed")
        assert index.open_shards() == 3  # the last three searched: ns9, ns10, ns11
    finally:
        index.close()
    copy = EdgeIndex(tmp_path / "crashed")
    try:
        for ns in range(9):  # closed before the copy: flushed whole
            assert set(copy.entry_ids(f"ns{ns}")) == {_eid(ns, i) for i in range(5)}
    finally:
        copy.close()
    reopened = EdgeIndex(tmp_path / "index")
    try:
        assert reopened.namespaces() == {f"ns{ns}" for ns in range(12)}
        assert reopened.open_shards() == 0  # listing the folder loads nothing
        assert set(reopened.entry_ids()) == {_eid(ns, i) for ns in range(12) for i in range(5)}
    finally:
        reopened.close()


def test_concurrent_calls_over_more_namespaces_than_stay_open(tmp_path: Path) -> None:
    """Six threads upsert, delete and search across 20 namespaces through 2 open shards: shards are
    closed and reopened under the calls, and every namespace ends holding exactly its live points."""
    index = EdgeIndex(tmp_path / "index", max_open_shards=2)
    owner = {_eid(ns, i): ns for ns in range(20) for i in range(100)}
    live: dict[int, set[str]] = {ns: set() for ns in range(20)}
    guard = threading.Lock()
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for step in range(60):
                ns, i = rng.randrange(20), rng.randrange(100)
                if step % 5 == 4:
                    with guard:
                        victims = sorted(live[ns])[:1]
                        index.delete(victims, namespace_key=f"ns{ns}")
                        live[ns].difference_update(victims)
                elif step % 2:
                    with guard:  # the bookkeeping and the write together, so `live` is what the index holds
                        index.upsert([_point(ns, i)])
                        live[ns].add(_eid(ns, i))
                else:
                    for hit in index.search(f"ns{ns}", "full", unit(ns * 1000 + i, 32).tolist(), 3):
                        assert owner[hit.entry_id] == ns
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert index.open_shards() <= 2
        for ns, ids in live.items():
            assert set(index.entry_ids(f"ns{ns}")) == ids
    finally:
        index.close()


def test_a_shard_that_cannot_be_reloaded_is_set_aside_and_reported(tmp_path: Path) -> None:
    lost: list[str] = []
    index = EdgeIndex(tmp_path / "index")
    index.upsert([_point(1, 0), _point(2, 0)])
    index.close()
    [shard] = (tmp_path / "index").glob("ns1.*")
    for path in shard.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\xff" * 7)
    index = EdgeIndex(tmp_path / "index")
    index.listen(IndexEvents(namespace_lost=lost.append))
    try:
        assert index.search("ns1", "full", unit(1000, 32).tolist(), 5) == []
        assert lost == ["ns1"]
        assert (tmp_path / "index.damaged" / shard.name).is_dir()
        assert index.search("ns2", "full", unit(2000, 32).tolist(), 5)[0].entry_id == _eid(2, 0)
        index.upsert([_point(1, 1)])  # the empty shard that took its place takes points again
        assert set(index.entry_ids("ns1")) == {_eid(1, 1)}
    finally:
        index.close()
