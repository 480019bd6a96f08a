"""The disk: a full one refuses puts and keeps serving, recovery needs no restart, a nearly full one
still starts, and the data folder stays within its bound of max_bytes under churn (docs/hardening.md).

The full-disk tests run the daemon on a small tmpfs of their own (root may mount one; they skip, saying
why, only where `mount` is refused). Every daemon is stopped before its tmpfs is unmounted.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from flexcache.daemon.process import DaemonProcess
from flexcache.daemon.store import folder_bytes
from tests.conftest import connect, metric
from tests.vectors import unit

MIB = 1 << 20


def latent(i: int, kib: int = 256) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, kib * 1024, dtype=np.uint8)




def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> int:
    """Write `path` until at most `leave` bytes are free on its file system; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for step in (MIB, 4096):
            block = b"\1" * step
            try:
                while free_bytes(path.parent) >= leave + step:
                    written += f.write(block)
            except OSError:  # ENOSPC: as full as it gets
                break
    return written


def wait_until(condition, timeout_s: float, every_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


class Disks:
    """Small tmpfs mounts and the daemons on them; teardown stops the daemons, then unmounts."""

    def __init__(self, root: Path):
        self.root = root
        self.mounts: list[Path] = []
        self.daemons: list[DaemonProcess] = []

    def mount(self, mib: int, path: Path | None = None) -> Path:
        path = path or self.root / f"disk{len(self.mounts)}"
        path.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                        "these tests need root, as CI has")
        self.mounts.append(path)
        return path

    def daemon(self, disk: Path, **settings: object) -> DaemonProcess:
        """A daemon whose store is on `disk`. Its embedded index gets a tmpfs of its own: the index
        writes memory-mapped files, and a write to one on a full file system is SIGBUS, which kills the
        daemon (the index's matter, not the store's, which these tests are about)."""
        self.mount(64, disk / "data" / "index")
        daemon = DaemonProcess(disk / "data", log=self.root / f"{disk.name}.log",
                               **{"scrub_bytes_per_second": 0, **settings})
        self.daemons.append(daemon)
        return daemon.start()

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.running:
                daemon.kill()
        for path in reversed(self.mounts):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Disks]:
    disks = Disks(tmp_path)
    try:
        yield disks
    finally:
        disks.close()


def put_code(c, i: int) -> tuple[str | None, grpc.StatusCode | None, str]:
    entry_id = c.put(f"prompt {i}", latent(i), unit(i))
    error = c.last_error if entry_id is None else None
    code = error.code() if isinstance(error, grpc.RpcError) else None
    return entry_id, code, (error.details() if isinstance(error, grpc.RpcError) else "")


def test_full_disk_refuses_puts_serves_reads_and_recovers_by_itself(disks: Disks) -> None:
    disk = disks.mount(128)
    daemon = disks.daemon(disk, max_bytes="1GiB")  # the disk, not the budget, is the limit
    with connect(daemon.target, warn_every_s=1e9) as c:
        ids = [c.put(f"prompt {i}", latent(i), unit(i)) for i in range(8)]
        assert all(ids)
        filler = disk / "filler"
        fill(filler)
        # Reads keep working on a full disk: their usage records are best effort.
        for i, entry_id in enumerate(ids):
            fetched = c.fetch(entry_id, role="full", granted_steps=10)
            assert fetched is not None, c.last_error
            np.testing.assert_array_equal(fetched.latent(), latent(i))
        assert c.lookup(unit(3)).best.entry_id == ids[3]
        # A put is refused with a sentence, not INTERNAL.
        entry_id, code, details = put_code(c, 100)
        assert entry_id is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "the disk is full" in details and "bytes free" in details
        stats = c.stats()
        assert stats.disk_full and stats.disk_free_bytes < 1 * MIB
        assert 0 < stats.evictions < 8  # made room, a little at a time: another process took the disk
        survivors = [(i, e) for i, e in enumerate(ids) if c.fetch(e) is not None]
        assert len(survivors) == 8 - stats.evictions
        i, entry_id = survivors[-1]
        np.testing.assert_array_equal(c.fetch(entry_id, role="full", granted_steps=10).latent(), latent(i))
        assert metric(daemon, "flexcache_disk_full") == 1
        assert metric(daemon, "flexcache_refused_writes_total", write="put") >= 1
        assert metric(daemon, "flexcache_requests_total", method="Put", code="INTERNAL") == 0
        assert metric(daemon, "flexcache_requests_total", method="FetchDirect", code="INTERNAL") == 0
        assert "the disk is full" in daemon.log.read_text()
        # Space comes back: puts and deletes work again, without a restart.
        filler.unlink()
        assert wait_until(lambda: put_code(c, 101)[0] is not None, 30), c.last_error
        assert c.delete(c.put("prompt 102", latent(102), unit(102))) is True
        assert not c.stats().disk_full and metric(daemon, "flexcache_disk_full") == 0
        assert "disk space is back" in daemon.log.read_text()


def test_out_of_space_inside_rocksdb_recovers_without_a_restart(disks: Disks) -> None:
    """The disk fills under RocksDB itself (another process takes the last bytes while it holds
    unflushed entries): its flush fails and it stops writing. Once space is back, writes resume."""
    disk = disks.mount(128)
    daemon = disks.daemon(disk, max_bytes="1GiB")
    with connect(daemon.target, warn_every_s=1e9) as c:
        ids = [c.put(f"prompt {i}", latent(i), unit(i)) for i in range(12)]  # in the memtable, not flushed
        assert all(ids)
        filler = disk / "filler"
        fill(filler)
        # A refused put makes room: the evictions' flush and compaction hit ENOSPC inside RocksDB.
        assert put_code(c, 100)[1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(1.0)
        statuses = {put_code(c, 200 + k)[1] for k in range(3)}
        assert statuses == {grpc.StatusCode.RESOURCE_EXHAUSTED}, statuses
        survivors = [e for e in ids if c.fetch(e, role="full", granted_steps=10) is not None]
        assert survivors  # reads are served while RocksDB refuses writes
        assert metric(daemon, "flexcache_requests_total", code="INTERNAL") == 0
        filler.unlink()
        # RocksDB resumes by itself, or the store reopens its database: either way, no restart.
        assert wait_until(lambda: put_code(c, 300)[0] is not None, 30), c.last_error
        assert c.delete(survivors[0]) is True
        assert c.put("prompt 301", latent(301), unit(301)) is not None
    assert daemon.running


def test_starts_on_a_nearly_full_disk_and_evicts_to_make_room(disks: Disks) -> None:
    disk = disks.mount(128)
    daemon = disks.daemon(disk, max_bytes="1GiB")
    with connect(daemon.target, warn_every_s=1e9) as c:
        stored = 0
        for i in range(600):  # until the disk refuses
            entry_id, code, details = put_code(c, i)
            if entry_id is None:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                break
            stored += 1
        assert stored > 50
    daemon.kill()  # the store's write-ahead log keeps what RocksDB had not flushed
    fill(disk / "filler", leave=2_000_000)  # a restart used to fail with 17 MB free: "No space left on device"
    daemon.start()
    with connect(daemon.target, warn_every_s=1e9) as c:
        stats = c.stats()
        assert stats.evictions > 0 and stats.entries > 0  # made room, kept the rest
        assert "the disk is nearly full" in daemon.log.read_text()
        assert wait_until(lambda: put_code(c, 1000)[0] is not None, 30), c.last_error


def test_data_folder_stays_within_its_bound_under_churn(start_daemon, tmp_path: Path) -> None:
    """8 writers churn a 50 MiB budget for 20 s (longer, up to 120 s, until they wrote 4 x max_bytes);
    the folder's allocated bytes, sampled every 100 ms, stay within 1.5 x max_bytes + 40 MiB (it used to
    peak at 6.1x: WAL, blob files awaiting garbage collection, compaction)."""
    max_bytes = 50 * MIB
    daemon = start_daemon(max_bytes=max_bytes, scrub_bytes_per_second=0)
    stop = threading.Event()
    puts, failures = [0], []

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        # Patient: a put may wait for compaction (at most 1 s) and a shared machine's disk may be slow;
        # what is checked is the folder's bound, not the put latency.
        with connect(daemon.target, warn_every_s=1e9, timeout_s=30.0, transfer_timeout_s=60.0) as c:
            i = 0
            while not stop.is_set():
                data = rng.integers(0, 255, int(rng.integers(256, 2048)) * 1024, dtype=np.uint8)
                if c.put(f"writer {w} prompt {i}", data, unit(w * 1_000_000 + i)) is None:
                    failures.append(c.last_error)
                puts[0] += 1
                i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    peak, start = 0, time.monotonic()
    try:  # 20 s at least, and on a slow machine on until several turnovers of the budget are written
        while time.monotonic() - start < 20 or (puts[0] * MIB <= 4 * max_bytes and time.monotonic() - start < 120):
            peak = max(peak, folder_bytes(daemon.data_dir))
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    with connect(daemon.target) as c:
        stats = c.stats()
    print(f"\n{puts[0]} puts, peak {peak / MIB:.1f} MiB = {peak / max_bytes:.2f} x max_bytes")
    assert failures == []
    assert puts[0] * MIB > 4 * max_bytes  # it churned: several turnovers of the budget
    assert stats.bytes <= max_bytes and stats.evictions > 0
    assert peak <= 1.5 * max_bytes + 40 * MIB
    assert 0 < stats.disk_bytes <= 1.5 * max_bytes + 40 * MIB
    assert metric(daemon, "flexcache_disk_bytes") > 0


def test_store_reopens_only_with_no_database_use_under_way(tmp_path: Path) -> None:
    """In-process, the last resort of a store whose writes RocksDB keeps failing with space available
    (its background error outlived its own recovery): close and open the database again, but only at a
    moment with no use of the handle under way. A blob stream is not one (its bytes come from a
    segment file it opened): it goes on across the reopen."""
    from flexcache.daemon import store as store_module
    from flexcache.daemon.entries import Usage
    from flexcache.v1 import cache_pb2 as pb

    store = store_module.Store(tmp_path / "store", max_bytes=50 * MIB)
    size = MIB + 100_000  # two chunks
    try:
        pending = store.begin_put("a" * 64, size)
        pending.add_chunk(b"x" * MIB)
        pending.add_chunk(b"y" * 100_000)
        header = pb.PutHeader(prompt="p")
        header.blob.size = size
        store.commit(pending, header, Usage(size=size, blob_size=size, created=0.0, last_access=0.0, step=0,
                                            total_steps=50, step_cost=1.0))
        pending.close()
        stream = store.read_blob("a" * 64)
        assert next(stream) == b"x" * MIB  # a stream under way, between chunks
        old = store._db
        with store._gate.shared():  # a read of the database under way
            start = time.monotonic()
            store._reopen()
            assert store._db is old and time.monotonic() - start >= store_module.REOPEN_GATE_S - 0.1
        store._reopen()
        assert store._db is not old
        assert next(stream) == b"y" * 100_000 and list(stream) == []
        assert b"".join(store.read_blob("a" * 64)) == b"x" * MIB + b"y" * 100_000 and store.exists("a" * 64)
    finally:
        store.close()
