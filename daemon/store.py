"""RocksDB (rocksdict, raw mode): the source of truth for entries, their blobs and their usage.

Key layout (entry ids are 64 hex characters, so '/' < '0' bounds a prefix):

    n/<namespace key>   JSON {"name", "dim"}       written with the namespace's first entry
    m/<entry id>        PutHeader (deterministic)  the entry's record, without its vectors;
                                                   present <=> the entry exists
    v/<entry id>        packed float16 vectors     entries.split_record: read only to rebuild the index
    u/<entry id>        Usage JSON                 hits and credit, rewritten on each fetch
    b/<entry id>/<i>    blob chunk i (8 hex digits), as the client streamed it (at most 1 MiB)
    s/puts              8-byte little-endian count  puts committed since the store was created
    t/<namespace key>   JSON {"name", "admin",     the namespace's own step tables (steps.TableRegistry):
                        "current", "version"}      those an admin set (null: the flags') and those in
                                                   use (the guard's changes; null after a reset: the
                                                   flags'), and the change's version; absent: the flags'
    g/<namespace key>   JSON {"version", "bins"}   the quality guard's figures (quality.QualityGuard):
                                                   per tier n, mean and M2 of the losses reported
                                                   at the tables of that version

A Put lands as one WriteBatch (chunks, record, vectors, usage, namespace, the put count), so a crash
leaves either the whole entry or nothing. Reads of a blob go through a snapshot, so a concurrent delete
never tears a stream. Large values go to RocksDB blob files, which keeps compaction from rewriting latents.

Disk contract (docs/hardening.md has the measurements and the reasons):

- Bounded disk. RocksDB's sizes follow the byte budget, or the disk when it is smaller
  (`Tuning.for_budget`): memtables of 1/32 of it (2 to 64 MiB), so a small write-ahead log; blob
  files the size of a memtable; compaction after two flushes; blob garbage collection of the oldest
  tenth of blob files. A put waits (`room_for`, at most STALL_S) while the folder is over
  `Tuning.disk_target`, so that writers go at the pace of compaction, and the folder stays within
  `Tuning.disk_bound`: 1.5 x max_bytes plus a few memtables.
- Disk full is a refusal, not a failure. A put that would leave less than `Tuning.reserve` bytes
  free is refused before RocksDB sees it (DiskFull), so RocksDB's own flushes always have room; a
  write RocksDB itself fails for lack of space is DiskFull too, and gives up the BALLAST file so that
  RocksDB can recover. Usage writes are best effort (a read never fails for them); deletes are always
  tried (they free space). While the disk is full, blob garbage collection is off (its rewrite is what
  would run out of space). Once space is back, RocksDB's own recovery resumes writes; a store whose
  writes still fail RECOVERY_WAIT_S later reopens its database (`_reopen`). A start on a nearly full
  disk gives up the ballast first, so RocksDB's log recovery has room.
- Lost writes are counted. Every committed Put bumps `s/puts` in its own batch and then the count in
  the ACKED file beside the database; a put acknowledged but missing after RocksDB's log recovery
  (a damaged or cut write-ahead log) shows as ACKED ahead of `s/puts` at the next open (`lost_puts`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import rocksdict

from flexcache.v1 import cache_pb2 as pb

from .entries import Usage, split_record, unpack_vectors

log = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1 << 20
_PUTS_KEY = b"s/puts"
ACKED_FILE = "ACKED"  # beside RocksDB's files, which RocksDB leaves alone (not names it owns)
BALLAST_FILE = "BALLAST"
_ACKED = struct.Struct("<QI")  # puts acknowledged, crc32 of the count
DISK_FACTOR = 1.5  # the folder's bound: this many max_bytes plus a few memtables (Tuning)
STALL_S = 1.0  # the longest a put waits for compaction to bring the folder back within its bound
DISK_SAMPLE_S = 0.02  # how stale the folder's measured size may be when a put checks it
RECOVERY_WAIT_S = 10.0  # how long RocksDB's own recovery may take, once space is back, before the store reopens
REOPEN_GATE_S = 2.0  # how long a reopen waits for a moment with no read under way


@dataclass(frozen=True)
class NamespaceInfo:
    key: str
    name: str
    dim: int


@dataclass(frozen=True)
class Tuning:
    """RocksDB's sizes for a byte budget.

    Why each: the write-ahead log holds every blob byte until its memtable is flushed, and RocksDB
    preallocates it by 1.1 x the memtable size, so memtables (and with them the log) are a small
    fraction of the budget; a blob file holds one flush, so a deleted entry's bytes are in a small
    file that is freed whole once the entries around it are gone; compaction starts after two
    flushes, so dead blobs do not wait behind a large L0 (a blob file is freed only once compaction
    has dropped every reference to it); blob garbage collection rewrites the live blobs of the oldest
    `gc_age_cutoff` of blob files as compaction passes over them (a larger share rewrote more than
    eviction frees and made the folder bigger, docs/hardening.md), and compaction is forced where
    the oldest files are `gc_force_threshold` garbage.
    `reserve`: the free bytes a write must leave, for RocksDB to flush both memtables, roll its log
    and MANIFEST, and for the garbage collector's rewrite of the oldest files. `ballast`: the size of
    the BALLAST file the store keeps and gives up when RocksDB itself runs out of space or the daemon
    starts on a full disk, so that RocksDB can always flush a memtable and roll its log, and with that
    recover and delete what eviction freed (without it, a disk filled to the last byte by another
    process would need an operator even for the daemon to make room).
    `disk_target`: where puts start to wait for compaction (`Store.room_for`); `disk_bound`: the
    folder's stated bound, the target plus what is written while a put is admitted (its log bytes, a
    flush's blob file beside the log it replaces, a garbage collector's rewrite)."""

    write_buffer: int
    gc_age_cutoff: float
    gc_force_threshold: float
    reserve: int
    ballast: int
    disk_target: int
    disk_bound: int

    @classmethod
    def for_budget(cls, max_bytes: int, disk_size: int | None = None) -> Tuning:
        """`disk_size`: the file system's size; a smaller disk than the budget sizes the memtables
        and the reserve (the budget's bound still counts max_bytes)."""
        sized = max_bytes if disk_size is None else min(max_bytes, disk_size)
        write_buffer = min(64 * MIB, max(2 * MIB, sized // 32))
        ballast = write_buffer + 2 * MIB
        return cls(write_buffer=write_buffer, gc_age_cutoff=0.1, gc_force_threshold=0.75,
                   reserve=3 * write_buffer + 4 * MIB, ballast=ballast,
                   disk_target=int(DISK_FACTOR * max_bytes) + 2 * write_buffer + 8 * MIB + ballast,
                   disk_bound=int(DISK_FACTOR * max_bytes) + 4 * write_buffer + 16 * MIB + ballast)


class PendingPut:
    """A Put being received: chunks accumulate in a WriteBatch that only `Store.commit` applies."""

    def __init__(self, entry_id: str):
        self.entry_id = entry_id
        self.batch = rocksdict.WriteBatch(raw_mode=True)
        self.chunks = 0
        self.bytes = 0

    def add_chunk(self, data: bytes) -> None:
        self.batch.put(_chunk_key(self.entry_id, self.chunks), data)
        self.chunks += 1
        self.bytes += len(data)


class StoreLocked(Exception):
    """Another process (or another Store in this one) has the database open: RocksDB holds `lock`."""

    def __init__(self, lock: Path):
        super().__init__(f"the store is open elsewhere: RocksDB holds its lock {lock}")
        self.lock = lock


class DiskFull(Exception):
    """A write refused for lack of disk space; the message is a sentence for the caller. Nothing of
    that write was stored."""


def _chunk_key(entry_id: str, index: int) -> bytes:
    return f"b/{entry_id}/{index:08x}".encode()


def _blob_range(entry_id: str) -> tuple[bytes, bytes]:
    return f"b/{entry_id}/".encode(), f"b/{entry_id}0".encode()


def folder_bytes(root: Path) -> int:
    """Bytes the files under `root` occupy on disk (allocated blocks, not apparent sizes: a
    preallocated log counts in full). Files that vanish while counted (compaction) are skipped."""
    total = 0
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += folder_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system that holds `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _is_space_error(exc: BaseException) -> bool:
    """RocksDB's words for a write it failed for lack of space, first or remembered (its background
    error, or a log writer poisoned by one: "Writer has previous error")."""
    text = str(exc)
    return "No space left" in text or "NoSpace" in text or "Writer has previous error" in text


class _Gate:
    """Shared use of the database handle, and an exclusive moment to swap it (`_reopen`, `close`).
    Shared use never waits but for an exclusive section under way, so a thread may nest it (a scan
    that reads each entry's vectors) and a blob stream may hold it across threads (its chunks are
    read from whichever thread serves the stream). An exclusive section waits, at most `timeout`,
    for a moment with no user; it says whether it got one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter_shared()
        try:
            yield
        finally:
            self.exit_shared()

    def enter_shared(self) -> None:
        with self._cond:
            self._users += 1

    def exit_shared(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        with self._cond:  # held through the section: shared use waits for it to end
            yield self._cond.wait_for(lambda: self._users == 0, timeout)


class BlobStream:
    """A blob's chunks (Store.read_blob): the snapshot is taken, and the store's handle held (its gate),
    when the stream is made, not at its first chunk; both are let go at its end, on a read error, or at
    close(), whichever comes first."""

    def __init__(self, store: Store, entry_id: str, checked: bool):
        start, self._end = _blob_range(entry_id)
        self._gate = store._gate
        self._gate.enter_shared()  # held until the stream ends: a reopen waits for it
        try:
            snapshot = store._db.snapshot()
            self._it: rocksdict.RdictIter | None = snapshot.iter(store._checked_read if checked else store._blob_read)
            self._it.seek(start)
        except BaseException:
            self._gate.exit_shared()
            raise
        self._open = True

    def __iter__(self) -> BlobStream:
        return self

    def __next__(self) -> bytes:
        if not self._open:
            raise StopIteration
        it = self._it
        assert it is not None
        try:
            if it.valid() and it.key() < self._end:
                value = it.value()
                it.next()
                return value
            it.status()  # a read error ends the stream with an exception, not as if the blob had ended
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        if self._open:
            self._open = False
            self._it = None
            self._gate.exit_shared()


class Store:
    def __init__(self, path: Path, fsync: bool = False, max_bytes: int = 10 << 30, audit: bool = False):
        """Open (or create) the database in `path`; StoreLocked if another process has it open.

        `max_bytes`: the cache's budget, which sizes RocksDB (Tuning). `audit`: opened by `flexcache
        verify`: `lost_puts` is reported but the ACKED record is left as found, for the daemon to
        report again when it starts."""
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        disk = os.statvfs(path)
        disk_size = disk.f_blocks * disk.f_frsize
        self.tuning = Tuning.for_budget(max_bytes, disk_size)
        if self.tuning.disk_bound > disk_size and not audit:
            log.warning("the disk holding %s has %d bytes, less than the store's bound for max_bytes %d (%d): "
                        "the disk, not the budget, will be the limit (puts refused when it fills, entries "
                        "evicted to make room)", path, disk_size, max_bytes, self.tuning.disk_bound)
        self._fsync = fsync
        self._gate = _Gate()
        self._ballast_missing = True  # until _keep_ballast finds or makes it
        if not audit and free_bytes(path) < self.tuning.reserve:  # RocksDB's log recovery needs the room
            self._release_ballast("the daemon starts on a nearly full disk")
        self._count_lock = threading.Lock()  # the put count and its ACKED record
        self._state_lock = threading.Lock()  # the full state
        self._reopen_lock = threading.Lock()
        self._db = self._open()
        self._closed = False  # closed by a reopen that could not open it again
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = fsync
        # Blob chunks are read without RocksDB's per-record checksum: clients verify every fetched blob
        # end to end (CRC-32C or sha256), which covers the same bytes and more, and RocksDB's check
        # dominated the time to fetch an entry flushed to a blob file (measured in docs/bench_daemon.md).
        self._blob_read = rocksdict.ReadOptions()
        self._blob_read.set_verify_checksums(False)
        self._checked_read = rocksdict.ReadOptions()  # for Verify and the scrubber: RocksDB's own checks on
        self._checked_read.set_verify_checksums(True)
        self.full_since: float | None = None  # monotonic time puts began to be refused for space
        self._rocksdb_failed = False  # since then, RocksDB failed a write (not only the store's own check)
        self._space_back_since: float | None = None  # RocksDB failing with space available, since
        self._room = threading.Condition()  # puts admitted within the bound, not yet committed
        self._admitted = 0
        self._disk_sample = (-1.0, 0)  # (monotonic time, folder bytes)
        self.stalled_s = 0.0  # seconds puts have waited for the folder to come back within its bound
        raw = self._db.get(_PUTS_KEY)
        self._puts = 0 if raw is None else int.from_bytes(raw, "little")
        self._acked_fd = os.open(path / ACKED_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        acked = self._read_acked()
        self.lost_puts = max(0, acked - self._puts) if acked is not None else 0
        if not audit:
            self._write_acked()
            free = self.free_bytes()
            if free < self.tuning.reserve:  # a start on a nearly full disk: puts wait for the space
                self._refuse(f"the disk is nearly full at startup: {free} bytes free in {path}, the store keeps "
                             f"{self.tuning.reserve} free for RocksDB's own writes")
            else:
                self._keep_ballast()

    def _open(self) -> rocksdict.Rdict:
        tuning = self.tuning
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(tuning.write_buffer)
        options.set_max_write_buffer_number(2)
        options.set_max_total_wal_size(2 * tuning.write_buffer)
        options.set_enable_blob_files(True)
        options.set_min_blob_size(64 * 1024)
        options.set_blob_file_size(tuning.write_buffer)
        options.set_enable_blob_gc(True)
        options.set_blob_gc_age_cutoff(tuning.gc_age_cutoff)
        options.set_blob_gc_force_threshold(tuning.gc_force_threshold)
        options.set_level_zero_file_num_compaction_trigger(2)
        options.set_manifest_preallocation_size(MIB)
        options.set_max_log_file_size(MIB)  # RocksDB's info LOG: at most 3 files of 1 MiB
        options.set_keep_log_file_num(3)
        options.set_wal_recovery_mode(rocksdict.DBRecoveryMode.point_in_time())
        try:
            return rocksdict.Rdict(str(self.path), options)
        except Exception as exc:  # rocksdict raises plain Exception, RocksDB's status text its message
            # RocksDB's words: "While lock file: <path>/LOCK: Resource temporarily unavailable" when
            # another process holds it, "lock hold by current process" when this one does.
            if "While lock file" in str(exc) or "lock hold by current process" in str(exc):
                raise StoreLocked(self.path / "LOCK") from exc
            raise

    def close(self) -> None:
        with self._gate.exclusive(timeout=30.0):
            self._db.close()
        os.close(self._acked_fd)

    # ---- the ACKED record ----
    def _read_acked(self) -> int | None:
        raw = os.pread(self._acked_fd, _ACKED.size, 0)
        if len(raw) != _ACKED.size:
            return None
        count, crc = _ACKED.unpack(raw)
        return count if zlib.crc32(raw[:8]) == crc else None

    def _write_acked(self) -> None:
        """Rewrite the count in place (one 12-byte write in the file's first block: no new space needed).
        A failure only makes the next start under-report what its log recovery lost."""
        count = self._puts.to_bytes(8, "little")
        try:
            os.pwrite(self._acked_fd, count + zlib.crc32(count).to_bytes(4, "little"), 0)
            if self._fsync:
                os.fdatasync(self._acked_fd)
        except OSError as exc:
            log.warning("store: the ACKED record was not updated (%s)", exc)

    # ---- the ballast ----
    def _keep_ballast(self) -> None:
        """Allocate the BALLAST file if it is missing and the disk has room to spare for it: the reserve,
        two memtables (where the cache stops making room) and the ballast, so that taking it back
        does not make the disk full again."""
        if not self._ballast_missing:
            return
        ballast = self.path / BALLAST_FILE
        try:
            if ballast.exists():
                self._ballast_missing = False
                return
            if self.free_bytes() < self.tuning.reserve + 2 * self.tuning.write_buffer + self.tuning.ballast:
                return
            fd = os.open(ballast.with_suffix(".partial"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(fd, 0, self.tuning.ballast)
            finally:
                os.close(fd)
            ballast.with_suffix(".partial").replace(ballast)
            self._ballast_missing = False
        except OSError as exc:
            ballast.with_suffix(".partial").unlink(missing_ok=True)
            log.warning("store: no ballast file (%s); a disk filled to the last byte waits for an operator", exc)

    def _release_ballast(self, why: str) -> None:
        ballast = self.path / BALLAST_FILE
        self._ballast_missing = True
        if ballast.exists():
            ballast.unlink()
            log.warning("store: %s: released the %d-byte ballast file, so that RocksDB has room to recover",
                        why, self.tuning.ballast)

    # ---- disk ----
    def disk_bytes(self) -> int:
        """Bytes the database folder occupies on disk."""
        return folder_bytes(self.path)

    def free_bytes(self) -> int:
        return free_bytes(self.path)

    def _sampled_disk_bytes(self) -> int:
        at, size = self._disk_sample
        now = time.monotonic()
        if now - at > DISK_SAMPLE_S:
            size = self.disk_bytes()
            self._disk_sample = (now, size)
        return size

    @contextmanager
    def room_for(self, nbytes: int) -> Iterator[int]:
        """Admit a put of `nbytes` (call before taking the cache's lock, commit inside): while the folder
        plus the puts already admitted would exceed `Tuning.disk_target`, flush (the tombstones of
        evicted entries reach compaction only through a flush) and wait, at most STALL_S, for compaction
        to give the space back. A put that waited that long goes ahead: the wait slows writers to the
        pace of compaction, and a disk that really fills is DiskFull's to handle. Yields the bytes the
        folder is still over its target (0 if within it), for the caller to evict."""
        target = self.tuning.disk_target
        over = 0
        with self._room:
            if self._sampled_disk_bytes() + self._admitted + nbytes > target:
                start = time.monotonic()
                self._flush_soon()
                deadline = start + STALL_S
                while (over := self._sampled_disk_bytes() + self._admitted + nbytes - target) > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._room.wait(min(left, DISK_SAMPLE_S))
                over = max(0, over)
                self.stalled_s += time.monotonic() - start
            self._admitted += nbytes
        try:
            yield over
        finally:
            with self._room:
                self._admitted -= nbytes
                self._room.notify_all()

    def _flush_soon(self) -> None:
        try:
            with self._gate.shared():
                self._db.flush(False)
        except Exception:  # a full disk, or closing: the wait ends on its own
            log.debug("store: flush before a stalled put failed", exc_info=True)

    @property
    def full(self) -> bool:
        """Whether puts are refused for lack of space: since a refusal, until a put is stored again or
        (RocksDB writing again) the free space is back above the reserve."""
        if self.full_since is None:
            return False
        if not self._rocksdb_failed and self.free_bytes() >= self.tuning.reserve:
            self._space_back()
            return False
        return True

    def _refuse(self, message: str, rocksdb: bool = False) -> DiskFull:
        """Enter (or stay in) the full state; the error to raise. `rocksdb`: RocksDB failed the write
        (else the store refused it first)."""
        with self._state_lock:
            self._rocksdb_failed = self._rocksdb_failed or rocksdb
            if self.full_since is None:
                self.full_since = time.monotonic()
                log.error("%s; refusing puts until space is back", message)
                self._collect_garbage(False)
        return DiskFull(message)

    def _collect_garbage(self, on: bool) -> None:
        """Blob garbage collection rewrites live blobs into new files before the old ones go: on a nearly
        full disk that rewrite is what runs out of space, and compaction without it still deletes the
        blob files whose entries are all gone. Off while the disk is full, on again once space is back."""
        try:
            with self._gate.shared():
                self._db.set_options({"enable_blob_garbage_collection": "true" if on else "false"})
        except Exception as exc:
            log.warning("store: blob garbage collection not switched %s: %s", "on" if on else "off", exc)

    def _space_back(self) -> None:
        with self._state_lock:
            if self.full_since is not None:
                log.warning("disk space is back: puts accepted again after %.1f s", time.monotonic() - self.full_since)
                self.full_since = self._space_back_since = None
                self._rocksdb_failed = False
                self._collect_garbage(True)
                self._keep_ballast()

    def _write(self, what: str, write: Callable[[rocksdict.Rdict], T], needs: int = 0) -> T:
        """Run one RocksDB write under the gate. `needs`: the bytes it adds (0: a write that frees space
        or is too small to matter), checked against the free space first. DiskFull if refused."""
        if self._closed:  # a reopen that failed: try it again
            self._reopen()
        if needs:
            free = self.free_bytes()
            if free < needs + self.tuning.reserve:
                raise self._refuse(f"the disk is full: {free} bytes free in {self.path}, a {what} of {needs} "
                                   f"bytes needs {needs + self.tuning.reserve} (the store keeps "
                                   f"{self.tuning.reserve} bytes free for RocksDB's own writes)")
        try:
            with self._gate.shared():
                result = write(self._db)
        except Exception as exc:
            if not (_is_space_error(exc) or (self.full and "IO error" in str(exc))):
                raise
            self._release_ballast("RocksDB ran out of space")
            self._recover_later()
            raise self._refuse(f"the disk is full: RocksDB could not write ({exc})", rocksdb=True) from exc
        if self.full_since is not None:
            if needs:
                self._space_back()
            elif self._rocksdb_failed:
                with self._state_lock:
                    self._rocksdb_failed = False  # RocksDB writes again
                    self._space_back_since = None
        return result

    def _recover_later(self) -> None:
        """RocksDB failed a write for lack of space. Once there is space again it recovers by itself
        (its SstFileManager flushes and resumes writes); if writes still fail `RECOVERY_WAIT_S` after
        space came back, its error is not one it recovers from, and the store reopens the database."""
        if self.free_bytes() < self.tuning.reserve:
            self._space_back_since = None
            return
        now = time.monotonic()
        if self._space_back_since is None:
            self._space_back_since = now
        elif now - self._space_back_since >= RECOVERY_WAIT_S:
            self._reopen()

    def _reopen(self) -> None:
        """Close and open the database again (RocksDB forgets its background error). Only when no read
        is under way: a live snapshot keeps the old handle, and its lock, open."""
        with self._reopen_lock, self._gate.exclusive(REOPEN_GATE_S) as alone:
            if not alone:  # blob streams under way: the next failed write tries again
                log.warning("store: waiting for reads under way before reopening the database")
                return
            if not self._closed:
                log.warning("store: writes still fail with space available; reopening the database")
                self._db.close()
                self._closed = True
            try:
                self._db = self._open()
            except Exception:  # reads fail too until a later write's reopen succeeds
                log.exception("store: reopening the database failed; the next write tries again")
                return
            self._closed = False
            self._space_back_since = None

    def reclaim(self) -> None:
        """Flush and compact, so that the space of deleted entries is given back now, not after the
        next flushes (it frees blob files all of whose entries are gone)."""
        with self._gate.shared():
            self._db.flush(True)
            self._db.compact_range(None, None)

    def checkpoint(self, path: Path) -> None:
        """An online, consistent copy of the database in `path`, a folder that must not exist yet (its
        parent must): RocksDB flushes the memtables, then hard-links its immutable files (SST and blob
        files; it copies them where `path` is on another file system) and copies its MANIFEST and live
        log, all as of one moment. Puts go on meanwhile; each is in the copy whole or not at all (one
        WriteBatch). Under the gate, like a write, so that a reopen never swaps the handle under it;
        DiskFull if RocksDB's flush runs out of space. The ACKED and BALLAST files are not part of it."""
        self._write("checkpoint", lambda db: rocksdict.Checkpoint(db).create_checkpoint(str(path)))

    # ---- writes ----
    def begin_put(self, entry_id: str) -> PendingPut:
        return PendingPut(entry_id)

    def commit(self, pending: PendingPut, header: pb.PutHeader, usage: Usage,
               new_namespace: NamespaceInfo | None = None) -> None:
        """Apply the whole Put (DiskFull: nothing of it stored, and the daemon keeps serving reads)."""
        batch = pending.batch
        record, vectors = split_record(header)
        batch.put(f"m/{pending.entry_id}".encode(), record.SerializeToString(deterministic=True))
        batch.put(f"v/{pending.entry_id}".encode(), vectors)
        batch.put(f"u/{pending.entry_id}".encode(), usage.to_bytes())
        if new_namespace is not None:
            value = json.dumps({"name": new_namespace.name, "dim": new_namespace.dim}).encode()
            batch.put(f"n/{new_namespace.key}".encode(), value)
        with self._count_lock:
            count = self._puts + 1
            batch.put(_PUTS_KEY, count.to_bytes(8, "little"))
            self._write("put", lambda db: db.write(batch, self._write_options), needs=pending.bytes + 4096)
            self._puts = count
            self._write_acked()
        self._keep_ballast()

    def put_usage(self, entry_id: str, usage: Usage) -> bool:
        """Persist a fetch's usage, best effort: False (nothing written) while the disk is full or below
        the reserve, so that a read never fails for the bookkeeping it carries, nor pushes RocksDB into
        running out of space."""
        if self.full or self.free_bytes() < self.tuning.reserve:
            return False
        try:
            self._write("usage", lambda db: db.put(f"u/{entry_id}".encode(), usage.to_bytes(), self._write_options))
        except DiskFull:
            return False
        return True

    def put_step_tables(self, ns_key: str, value: bytes) -> None:
        """Write a namespace's step tables (DiskFull if the disk is full)."""
        key = f"t/{ns_key}".encode()
        self._write("step tables", lambda db: db.put(key, value, self._write_options), needs=len(value) + 4096)

    def step_tables(self) -> dict[str, bytes]:
        """Every namespace's persisted step tables, by namespace key."""
        return self._prefixed(b"t/")

    def put_guard_figures(self, ns_key: str, value: bytes | None) -> None:
        """Write (None: delete) the quality guard's figures of a namespace (DiskFull if the disk is full)."""
        key = f"g/{ns_key}".encode()
        if value is None:
            self._write("guard figures", lambda db: db.delete(key, self._write_options))
        else:
            self._write("guard figures", lambda db: db.put(key, value, self._write_options), needs=len(value) + 4096)

    def guard_figures(self) -> dict[str, bytes]:
        """Every namespace's persisted guard figures, by namespace key."""
        return self._prefixed(b"g/")

    def _prefixed(self, prefix: bytes) -> dict[str, bytes]:
        found = {}
        with self._gate.shared():
            for key, value in self._db.items(from_key=prefix):
                if not key.startswith(prefix):
                    break
                found[key[len(prefix):].decode()] = value
        return found

    def delete(self, entry_id: str) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(f"m/{entry_id}".encode())
        batch.delete(f"v/{entry_id}".encode())
        batch.delete(f"u/{entry_id}".encode())
        batch.delete_range(*_blob_range(entry_id))
        self._write("delete", lambda db: db.write(batch, self._write_options))

    # ---- reads ----
    def exists(self, entry_id: str) -> bool:
        with self._gate.shared():
            return self._db.get(f"m/{entry_id}".encode()) is not None

    def record(self, entry_id: str) -> pb.PutHeader | None:
        """The entry's Put header without its vectors (lookups need only the blob info, prompt and mask)."""
        with self._gate.shared():
            raw = self._db.get(f"m/{entry_id}".encode())
        return None if raw is None else pb.PutHeader.FromString(raw)

    def read_blob(self, entry_id: str, checked: bool = False) -> BlobStream:
        """The blob's chunks from one snapshot, taken now: consistent even if the entry is deleted before
        the first chunk is read or meanwhile. `checked`: with RocksDB's per-record checksums (slower;
        fetches leave them to the client). Close the stream if it is not read to its end."""
        return BlobStream(self, entry_id, checked)

    def read_chunk(self, entry_id: str, index: int) -> bytes | None:
        """Chunk `index` of the entry's blob with RocksDB's checksums on, None past the last one. No
        snapshot is held between chunks (the scrubber reads slowly; a concurrent delete ends its read)."""
        with self._gate.shared():
            return self._db.get(_chunk_key(entry_id, index), read_opt=self._checked_read)

    def vectors(self, entry_id: str) -> pb.Vectors:
        """The entry's vectors (to rebuild its index point)."""
        with self._gate.shared():
            raw = self._db[f"v/{entry_id}".encode()]
        return unpack_vectors(raw)

    def entries(self) -> Iterator[tuple[str, pb.PutHeader, Usage | None]]:
        """Every entry with its record (as `record` returns it) and usage: startup rebuilds policy
        state from these and reconciles the index (`vectors` for the entries it must re-index)."""
        with self._gate.shared():
            it = self._db.iter()
            it.seek(b"m/")
            while it.valid() and it.key().startswith(b"m/"):
                entry_id = it.key()[2:].decode()
                raw_usage = self._db.get(f"u/{entry_id}".encode())
                usage = None if raw_usage is None else Usage.from_bytes(raw_usage)
                yield entry_id, pb.PutHeader.FromString(it.value()), usage
                it.next()

    def entry_ids(self, after: str = "", limit: int = 256) -> list[str]:
        """Up to `limit` entry ids in key order, from the first one greater than `after`: a scan in pages
        that holds no iterator between them (an iterator pins files that compaction would delete)."""
        found: list[str] = []
        with self._gate.shared():
            it = self._db.iter()
            it.seek(f"m/{after}".encode() + (b"\0" if after else b""))
            while it.valid() and it.key().startswith(b"m/") and len(found) < limit:
                found.append(it.key()[2:].decode())
                it.next()
        return found

    def namespaces(self) -> dict[str, NamespaceInfo]:
        found = {}
        with self._gate.shared():
            for key, value in self._db.items(from_key=b"n/"):
                if not key.startswith(b"n/"):
                    break
                data = json.loads(value)
                found[key[2:].decode()] = NamespaceInfo(key[2:].decode(), data["name"], data["dim"])
        return found
