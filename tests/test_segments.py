"""Blob segments (daemon/segments.py) under a real Store (RocksDB on disk): written once, deleted whole,
collected when mostly dead, consistent for readers under way, in checkpoints, after a crash, and the move
from an earlier release's layout. In-process: the daemon-level behaviour (disk full, churn within the
bound, SIGKILL) is in test_disk.py and test_durability.py."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rocksdict

from flexcache.daemon import scrub, segments
from flexcache.daemon.entries import Usage
from flexcache.daemon.store import OldLayout, Store
from flexcache.v1 import cache_pb2 as pb

MIB = 1 << 20


def blob(i: int, size: int = 300_000) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def eid(i: int) -> str:
    return f"{i:064x}"


def put(store: Store, i: int, size: int = 300_000) -> None:
    data = blob(i, size)
    pending = store.begin_put(eid(i), size)
    try:
        for start in range(0, size, MIB):
            pending.add_chunk(data[start:start + MIB])
        header = pb.PutHeader(prompt=f"p{i}")
        header.blob.size = size
        store.commit(pending, header, Usage(size=size, blob_size=size, created=0.0, last_access=0.0, step=0,
                                            total_steps=50, step_cost=1.0))
    finally:
        pending.close()


def segment_files(store_dir: Path) -> list[Path]:
    return sorted((store_dir / segments.FOLDER).glob(f"*{segments.SUFFIX}"))


def wait_for(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "store", max_bytes=50 * MIB)  # 2 MiB segments: six 300 kB blobs each
    yield s
    s.close()


def test_a_blob_is_read_back_and_its_segment_goes_with_its_last_entry(store: Store, tmp_path: Path) -> None:
    for i in range(7):  # the seventh rolls to a second segment
        put(store, i)
    assert [b"".join(store.read_blob(eid(i))) for i in range(7)] == [blob(i) for i in range(7)]
    assert store.read_chunk(eid(0), 0) == blob(0) and store.read_chunk(eid(0), 1) is None
    assert list(store.read_blob(eid(99))) == [] and store.read_chunk(eid(99), 0) is None
    first = segment_files(tmp_path / "store")[0]
    total, live = store.segments.bytes()
    assert live == 7 * 300_000 and total == live
    for i in range(6):
        store.delete(eid(i))
    assert store.segments.bytes() == (300_000, 300_000)
    assert not first.exists()  # sealed once full, deleted with its last blob: no collection needed


def test_a_reader_under_way_keeps_the_bytes_it_started_on(store: Store) -> None:
    put(store, 1, 3 * MIB)
    stream = store.read_blob(eid(1))
    assert next(stream) == blob(1, 3 * MIB)[:MIB]
    store.delete(eid(1))
    for i in range(2, 20):  # the deleted blob's segment is sealed and deleted meanwhile
        put(store, i)
    assert b"".join(stream) == blob(1, 3 * MIB)[MIB:]


def test_the_collector_moves_live_blobs_out_of_mostly_dead_segments(store: Store, tmp_path: Path) -> None:
    collected: list[int] = []
    store.on_collected = collected.append
    for i in range(60):  # ten segments of six blobs
        put(store, i)
    early = store.read_blob(eid(0))  # a reader of a blob that will be moved
    kept = [i for i in range(60) if i % 6 == 0]  # one blob of six left in each segment
    for i in range(60):
        if i not in kept:
            store.delete(eid(i))

    def compact() -> bool:
        total, live = store.segments.bytes()
        return total - live <= 0.2 * total

    wait_for(compact)
    total, live = store.segments.bytes()
    assert live == len(kept) * 300_000 and sum(collected) >= (len(kept) - 2) * 300_000
    on_disk = sum(f.stat().st_size for f in segment_files(tmp_path / "store"))
    assert on_disk <= total + store.tuning.write_buffer  # the deleted segments' files are gone
    assert [b"".join(store.read_blob(eid(i))) for i in kept] == [blob(i) for i in kept]
    assert b"".join(early) == blob(0)
    for i in kept[:3]:  # moved entries delete as any other
        store.delete(eid(i))
    assert store.segments.bytes()[1] == (len(kept) - 3) * 300_000


def test_bytes_of_a_put_never_committed_are_dead_and_writes_resume_in_a_new_segment(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", max_bytes=50 * MIB)
    pending = store.begin_put(eid(2), 300_000)
    pending.add_chunk(blob(2))  # written, never committed: a crash before its batch
    assert store.segments.bytes() == (300_000, 0)
    (dead,) = segment_files(tmp_path / "store")
    pending.close()
    store.close()
    store = Store(tmp_path / "store", max_bytes=50 * MIB)
    try:
        assert not store.exists(eid(2)) and not dead.exists()  # a segment with no live blob goes at open
        put(store, 1)
        pending = store.begin_put(eid(2), 300_000)
        pending.add_chunk(blob(2))
        pending.close()
    finally:
        store.close()
    store = Store(tmp_path / "store", max_bytes=50 * MIB)
    try:
        assert not store.exists(eid(2)) and b"".join(store.read_blob(eid(1))) == blob(1)
        assert store.segments.bytes() == (600_000, 300_000)  # dead bytes beside a live blob: the collector's
        put(store, 3)  # nothing is written after a segment's tail from before the open
        assert store._location(eid(3)).segment != store._location(eid(1)).segment
    finally:
        store.close()


def test_a_checkpoint_holds_the_segments_of_its_entries(store: Store, tmp_path: Path) -> None:
    for i in range(8):
        put(store, i)
    store.checkpoint(tmp_path / "copy")
    for i in range(8):  # deleted after the checkpoint: their segments go here, not in the copy
        store.delete(eid(i))
    put(store, 9)
    copy = Store(tmp_path / "copy", max_bytes=50 * MIB)
    try:
        assert [b"".join(copy.read_blob(eid(i))) for i in range(8)] == [blob(i) for i in range(8)]
        assert not copy.exists(eid(9))
    finally:
        copy.close()


def test_blobs_of_the_earlier_layout_are_moved_at_open(tmp_path: Path) -> None:
    """An earlier release kept a blob as RocksDB values b/<entry id>/<i> in RocksDB's blob files."""
    folder = tmp_path / "store"
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_enable_blob_files(True)
    options.set_min_blob_size(64 * 1024)
    db = rocksdict.Rdict(str(folder), options)
    sizes = {1: 3 * MIB + 5, 2: 100_000}
    for i, size in sizes.items():
        data = blob(i, size)
        for index, start in enumerate(range(0, size, MIB)):
            db[f"b/{eid(i)}/{index:08x}".encode()] = data[start:start + MIB]
        header = pb.PutHeader(prompt=f"p{i}")
        header.blob.size = size
        db[f"m/{eid(i)}".encode()] = header.SerializeToString()
    db.close()
    with pytest.raises(OldLayout, match="start the daemon on it once"):
        Store(folder, max_bytes=0, audit=True)
    verify = subprocess.run([sys.executable, "-m", "flexcache.daemon.cli", "verify", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 2 and verify.stderr.count("\n") == 1 and "earlier release's layout" in verify.stderr
    store = Store(folder, max_bytes=50 * MIB)
    try:
        assert {i: b"".join(store.read_blob(eid(i))) for i in sizes} == {i: blob(i, s) for i, s in sizes.items()}
        with store._gate.shared():
            assert [k for k in store._db.keys(from_key=b"b/") if k.startswith(b"b/") and len(k) > 66] == []
        assert store.segments.bytes()[1] == sum(sizes.values())
    finally:
        store.close()
    audit = Store(folder, max_bytes=0, audit=True)  # the new layout: an audit opens it
    audit.close()


def test_a_segment_file_cut_short_is_a_read_error_not_a_short_blob(store: Store, tmp_path: Path) -> None:
    put(store, 1, 2 * MIB)
    (segment,) = segment_files(tmp_path / "store")
    os.truncate(segment, MIB + 10)
    stream = store.read_blob(eid(1))
    assert len(next(stream)) == MIB
    with pytest.raises(EOFError):
        next(stream)


def test_a_place_with_no_entry_does_not_keep_its_segment(store: Store, tmp_path: Path) -> None:
    """No write leaves an `l/` key whose entry points elsewhere; if one were there (damage), the
    collector drops it rather than copying around it for ever."""
    for i in range(7):
        put(store, i)
    first = segment_files(tmp_path / "store")[0]
    loc = store._location(eid(0))
    with store._gate.shared():  # entry 0's location lost, its place kept: what no write does
        store._db.delete(f"b/{eid(0)}".encode())
    for i in range(1, 6):
        store.delete(eid(i))
    wait_for(lambda: not first.exists())
    assert store.segments.bytes()[1] == 300_000 and loc.segment == 1


def test_a_missing_segment_file_is_a_read_error_for_readers_and_verify(store: Store, tmp_path: Path) -> None:
    put(store, 1)
    put(store, 2)
    (segment,) = segment_files(tmp_path / "store")
    segment.unlink()  # damage: no write deletes a segment with a live blob
    stream = store.read_blob(eid(1))  # made without raising: the error is the stream's first chunk
    with pytest.raises(FileNotFoundError):
        next(stream)
    assert "reading it failed" in scrub.blob_problem(store.read_blob(eid(2)), pb.BlobInfo(size=300_000))
    assert sorted(d.entry_id for d in scrub.verify_store(store) if isinstance(d, scrub.Damage)) == [eid(1), eid(2)]
    assert store.segments.dead_bytes() >= 0


def test_a_writer_dropped_while_its_log_is_locked_is_released_once_the_lock_is_free(store: Store) -> None:
    """The garbage collector runs a dropped Writer's end in whatever thread allocates, one that holds
    the log's lock too: it must not wait for that lock (a deadlock), only queue the release."""
    writer = store.segments.reserve(1000)
    writer.write(b"x" * 10)
    number = writer.location.segment
    with store.segments._lock:
        del writer
        gc.collect()
    assert store.segments.unwritten() == 0  # the next use of the log applied the release
    assert store.segments._segments[number].writers == 0


def test_a_segment_without_dead_bytes_is_never_collected(store: Store) -> None:
    for i in range(7):  # a first segment sealed, all of it live
        put(store, i)
    assert store.segments.collectable(1.0) is None
    store.delete(eid(0))
    assert store.segments.collectable(1.0) == 1
    assert store.segments.collectable(1.0, skip={1}) is None
