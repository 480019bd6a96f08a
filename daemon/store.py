"""RocksDB (rocksdict, raw mode): the source of truth for entries, their blobs and their usage.

Key layout (entry ids are 64 hex characters, so '/' < '0' bounds a prefix):

    n/<namespace key>   JSON {"name", "dim"}       written with the namespace's first entry
    m/<entry id>        PutHeader (deterministic)  the entry's record, without its vectors;
                                                   present <=> the entry exists
    v/<entry id>        packed float16 vectors     entries.split_record: read only to rebuild the index
    u/<entry id>        Usage JSON                 hits and credit, rewritten on each fetch
    b/<entry id>        segments.Location          where the blob's bytes are: segment, offset, size
    l/<segment>/<offset> entry id, 8-byte size     the same, by place (16 hex digits each): what a
                                                   segment holds, for counting and collecting it
    s/puts              8-byte little-endian count  puts committed since the store was created
    s/layout            b"2"                       blobs in segment files (an earlier release kept
                                                   them as b/<entry id>/<i> chunk values: moved at open)
    t/<namespace key>   JSON {"name", "admin",     the namespace's own step tables (steps.TableRegistry):
                        "current", "version"}      those an admin set (null: the flags') and those in
                                                   use (the guard's changes; null after a reset: the
                                                   flags'), and the change's version; absent: the flags'
    g/<namespace key>   JSON {"version", "bins"}   the quality guard's figures (quality.QualityGuard):
                                                   per tier n, mean and M2 of the losses reported
                                                   at the tables of that version

A blob's bytes go to the store's segment files as they arrive (segments.py: written once, where they
stay); the Put then lands as one WriteBatch (its Location, record, vectors, usage, namespace, the put
count), so a crash leaves either the whole entry or nothing but dead segment bytes. A blob is read
from the segment file opened when its stream is made, so a concurrent delete or move never tears it.

Disk contract (docs/hardening.md has the measurements and the reasons):

- Bounded disk. Sizes follow the byte budget, or the disk when it is smaller (`Tuning.for_budget`):
  segments and memtables of 1/32 of it (2 to 64 MiB). A segment left without live blobs is deleted
  at once; the collector (`_collect_loop`) copies the live blobs out of the sealed segment with the
  least of them while dead bytes are over COLLECT_DEAD_SHARE of the segments (or the folder is over
  its target), and deletes it. A put waits (`_admit`, at most STALL_S, before its bytes) while the folder is over
  `Tuning.disk_target`, so that writers go at the pace of collection and compaction, and the folder
  stays within `Tuning.disk_bound`: 1.5 x max_bytes plus a few segments.
- Disk full is a refusal, not a failure. A put that would leave less than `Tuning.reserve` bytes
  free is refused before its bytes are written (DiskFull), so RocksDB's own flushes always have
  room; a write that RocksDB or a segment file fails for lack of space is DiskFull too, and gives up
  the BALLAST file so that RocksDB can recover. Usage writes are best effort (a read never fails for
  them); deletes are always tried (they free space). While the disk is full, nothing is collected
  (the copy is what would run out of space). Once space is back, RocksDB's own recovery resumes
  writes; a store whose writes still fail RECOVERY_WAIT_S later reopens its database (`_reopen`).
  A start on a nearly full disk gives up the ballast first, so RocksDB's log recovery has room.
- Lost writes are counted. Every committed Put bumps `s/puts` in its own batch and then the count in
  the ACKED file beside the database; a put acknowledged but missing after RocksDB's log recovery
  (a damaged or cut write-ahead log) shows as ACKED ahead of `s/puts` at the next open (`lost_puts`).
"""

from __future__ import annotations

import errno
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
from flexcache.v1.wire import CHUNK_BYTES

from . import segments
from .entries import Usage, split_record, unpack_vectors

log = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1 << 20
_PUTS_KEY = b"s/puts"
ACKED_FILE = "ACKED"  # beside RocksDB's files, which RocksDB leaves alone (not names it owns)
BALLAST_FILE = "BALLAST"
_ACKED = struct.Struct("<QI")  # puts acknowledged, crc32 of the count
_LAYOUT_KEY = b"s/layout"
_OLD_CHUNK_KEY_BYTES = len("b/") + 64 + len("/") + 8  # b/<entry id>/<chunk index, 8 hex digits>
LAYOUT = b"2"  # blobs in segment files
DISK_FACTOR = 1.5  # the folder's bound: this many max_bytes plus a few segments (Tuning)
STALL_S = 1.0  # the longest a put waits for collection and compaction to bring the folder back within its bound
COLLECT_DEAD_SHARE = 0.2  # collect while dead bytes are over this share of the segments' bytes ...
COLLECT_LIVE_SHARE = 0.5  # ... from sealed segments at most this live (any share, when the folder is over target)
COLLECT_IDLE_S = 1.0  # how often the collector looks when nothing wakes it
COLLECT_RETRY_S = 30.0  # how long the collector waits after the file system failed it
DISK_SAMPLE_S = 0.02  # how stale the folder's measured size may be when a put checks it
RECOVERY_WAIT_S = 10.0  # how long RocksDB's own recovery may take, once space is back, before the store reopens
REOPEN_GATE_S = 2.0  # how long a reopen waits for a moment with no use of the database under way


class OldLayout(Exception):
    """An audit (`flexcache verify`) of a store whose blobs are still in an earlier release's layout."""


@dataclass(frozen=True)
class NamespaceInfo:
    key: str
    name: str
    dim: int


@dataclass(frozen=True)
class Tuning:
    """The store's sizes for a byte budget.

    `write_buffer`: the size of a segment file and of a RocksDB memtable. A segment holds a small share
    of the budget, so that deleting entries frees whole files soon and collecting one copies little;
    RocksDB holds only records (the blobs are in segments), so its memtables and write-ahead log stay
    small whatever their limit. `reserve`: the free bytes a write must leave, for RocksDB to flush both
    memtables, roll its log and MANIFEST, and for the collector's copy of a segment. `ballast`: the
    size of the BALLAST file the store keeps and gives up when a write runs out of space or the daemon
    starts on a full disk, so that RocksDB can always flush a memtable and roll its log, and with that
    recover and delete what eviction freed (without it, a disk filled to the last byte by another
    process would need an operator even for the daemon to make room).
    `disk_target`: where puts start to wait for collection and compaction (`Store._admit`);
    `disk_bound`: the folder's stated bound, the target plus what is written while a put is admitted
    (its blob in a segment, the collector's copy of a segment, a memtable's flush)."""

    write_buffer: int
    reserve: int
    ballast: int
    disk_target: int
    disk_bound: int

    @classmethod
    def for_budget(cls, max_bytes: int, disk_size: int | None = None) -> Tuning:
        """`disk_size`: the file system's size; a smaller disk than the budget sizes the segments
        and the reserve (the budget's bound still counts max_bytes)."""
        sized = max_bytes if disk_size is None else min(max_bytes, disk_size)
        write_buffer = min(64 * MIB, max(2 * MIB, sized // 32))
        ballast = write_buffer + 2 * MIB
        return cls(write_buffer=write_buffer, reserve=3 * write_buffer + 4 * MIB, ballast=ballast,
                   disk_target=int(DISK_FACTOR * max_bytes) + 2 * write_buffer + 8 * MIB + ballast,
                   disk_bound=int(DISK_FACTOR * max_bytes) + 4 * write_buffer + 16 * MIB + ballast)


class PendingPut:
    """A Put being received: its blob's bytes go to a reservation in a segment as they come (the
    first chunk makes it, once the store admits the whole blob: `_admit`, `_reserve`); only
    `Store.commit` makes them an entry. A failure to write (the disk full, say) is kept, the rest of
    the bytes dropped, and raised by `commit`. `close` gives the reservation up if it was not committed."""

    def __init__(self, store: Store, entry_id: str, size: int):
        self.entry_id = entry_id
        self.size = size
        self.failed: BaseException | None = None
        self._store = store
        self._writer: segments.Writer | None = None

    def add_chunk(self, data: bytes | memoryview) -> None:
        if self.failed is not None:
            return
        try:
            if self._writer is None:
                self._store._admit(self.size)
                self._writer = self._store._reserve(self.size)
            self._writer.write(data)
        except DiskFull as exc:
            self.failed = exc
        except OSError as exc:
            self.failed = self._store._write_failed("a put's blob", exc)

    def location(self, sync: bool) -> segments.Location:
        if self.failed is not None:
            raise self.failed
        if self._writer is None:
            raise ValueError("a put with no bytes")
        try:
            return self._writer.finish(sync)
        except OSError as exc:
            self.failed = self._store._write_failed("a put's blob", exc)
            raise self.failed  # noqa: B904 (the OSError itself, or DiskFull with it as its context)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class DiskFull(Exception):
    """A write refused for lack of disk space; the message is a sentence for the caller. Nothing of
    that write was stored."""


class StoreLocked(Exception):
    """Another process (or another Store in this one) has the database open: RocksDB holds `lock`."""

    def __init__(self, lock: Path):
        super().__init__(f"the store is open elsewhere: RocksDB holds its lock {lock}")
        self.lock = lock


def _location_key(entry_id: str) -> bytes:
    return f"b/{entry_id}".encode()


def _place_key(loc: segments.Location) -> bytes:
    return f"l/{loc.segment:016x}/{loc.offset:016x}".encode()


def _place_value(entry_id: str, loc: segments.Location) -> bytes:
    return entry_id.encode() + loc.size.to_bytes(8, "little")


def _place(key: bytes, value: bytes) -> tuple[str, segments.Location]:
    """An `l/` key and value: the entry id and its Location."""
    segment, offset = key[2:].split(b"/")
    size = int.from_bytes(value[-8:], "little")
    return value[:-8].decode(), segments.Location(int(segment, 16), int(offset, 16), size)


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
    that reads each entry's vectors). An exclusive section waits, at most `timeout`, for a moment
    with no user; it says whether it got one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        with self._cond:  # held through the section: shared use waits for it to end
            yield self._cond.wait_for(lambda: self._users == 0, timeout)


class BlobStream:
    """A blob's chunks of at most CHUNK_BYTES (Store.read_blob), from the segment file opened when the
    stream is made: what was committed then, whatever happens to the entry meanwhile. The file is
    closed at the stream's end, on a read error, or at close(), whichever comes first. A segment file
    cut short ends the stream with EOFError, never as if the blob had ended; a segment file missing
    (a damaged store) with the OSError of its open, at the first chunk, like any read error."""

    def __init__(self, store: Store, entry_id: str):
        self._loc: segments.Location | None = None
        self._fd: int | None = None
        self._error: OSError | None = None
        self._at = 0
        try:
            opened = store._open_blob(entry_id)
        except OSError as exc:
            self._error = exc
        else:
            if opened is not None:
                self._loc, self._fd = opened

    def __iter__(self) -> BlobStream:
        return self

    def __next__(self) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        loc, fd = self._loc, self._fd
        if fd is None or loc is None or self._at >= loc.size:
            self.close()
            raise StopIteration
        try:
            chunk = segments.SegmentLog.read(fd, loc, self._at, min(CHUNK_BYTES, loc.size - self._at))
        except BaseException:
            self.close()
            raise
        self._at += len(chunk)
        return chunk

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class Store:
    def __init__(self, path: Path, fsync: bool = False, max_bytes: int = 10 << 30, audit: bool = False):
        """Open (or create) the database in `path`; StoreLocked if another process has it open.

        `max_bytes`: the cache's budget, which sizes the store (Tuning). `audit`: opened by `flexcache
        verify`: `lost_puts` is reported but the ACKED record is left as found, for the daemon to
        report again when it starts, no segment is made or deleted, and a store in an earlier
        release's layout is OldLayout (a daemon's open moves its blobs into segments)."""
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
        self._batch_lock = threading.Lock()  # batches that add, move or drop a Location; the put count, ACKED
        self._state_lock = threading.Lock()  # the full state
        self._reopen_lock = threading.Lock()
        self._db = self._open()
        self._closed = False  # closed by a reopen that could not open it again
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = fsync
        self.full_since: float | None = None  # monotonic time puts began to be refused for space
        self._rocksdb_failed = False  # since then, RocksDB failed a write (not only the store's own check)
        self._space_back_since: float | None = None  # RocksDB failing with space available, since
        self._disk_sample = (-1.0, 0)  # (monotonic time, folder bytes)
        raw = self._db.get(_PUTS_KEY)
        self._puts = 0 if raw is None else int.from_bytes(raw, "little")
        self._acked_fd = os.open(path / ACKED_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        acked = self._read_acked()
        self.lost_puts = max(0, acked - self._puts) if acked is not None else 0
        self.segments = segments.SegmentLog(path, self.tuning.write_buffer, fsync, writable=not audit)
        self.on_collected: Callable[[int], None] = lambda nbytes: None  # live blob bytes the collector copied
        self._collect_wake = threading.Event()
        self._stopping = threading.Event()
        self._collector: threading.Thread | None = None
        self._damaged_segments: set[int] = set()  # a blob in them cut short: collecting them would fail again
        try:
            self._load(audit)
        except BaseException:
            self._stopping.set()
            self._db.close()
            os.close(self._acked_fd)
            raise

    def _load(self, audit: bool) -> None:
        """The segments counted, an earlier layout moved (not in an audit), the collector started."""
        new_layout = self._db.get(_LAYOUT_KEY) is not None
        if audit:
            if not new_layout and self._has_old_chunks():
                raise OldLayout(f"the store in {self.path} keeps its blobs in an earlier release's layout; start "
                                "the daemon on it once (it moves them into segment files), then verify it")
            self.segments.load(self._locations())
            return
        self.segments.load(self._locations())
        if not new_layout:  # made by an earlier release, or a move cut short, or a new store (nothing to do)
            self._move_old_chunks()
            self._db.put(_LAYOUT_KEY, LAYOUT, self._write_options)
        self._collector = threading.Thread(target=self._collect_loop, name="segment-collector", daemon=True)
        self._collector.start()
        self._write_acked()
        free = self.free_bytes()
        if free < self.tuning.reserve:  # a start on a nearly full disk: puts wait for the space
            self._refuse(f"the disk is nearly full at startup: {free} bytes free in {self.path}, the store keeps "
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
        self._stopping.set()
        self._collect_wake.set()
        if self._collector is not None:
            self._collector.join(timeout=30.0)
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

    def _admit(self, nbytes: int) -> None:
        """Let a put write its `nbytes` (PendingPut's first chunk): while the folder plus the bytes other
        puts have reserved and not written yet would exceed `Tuning.disk_target`, wake the collector,
        flush (the tombstones of evicted entries reach compaction only through a flush) and wait, at
        most STALL_S, for them to give the space back. A put that waited that long goes ahead: the wait
        slows writers to the pace of collection and compaction, and a disk that really fills is
        DiskFull's to handle; the caller evicts what `over_target` says."""
        target = self.tuning.disk_target
        if self._sampled_disk_bytes() + self.segments.unwritten() + nbytes <= target:
            return
        self._flush_soon()
        deadline = time.monotonic() + STALL_S
        while self._sampled_disk_bytes() + self.segments.unwritten() + nbytes > target:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.wait(min(left, DISK_SAMPLE_S)):
                return

    def over_target(self) -> int:
        """Bytes the folder is over `Tuning.disk_target` (0 within it), for the caller to evict."""
        return max(0, self._sampled_disk_bytes() - self.tuning.disk_target)

    def _flush_soon(self) -> None:
        self._collect_wake.set()
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
        return DiskFull(message)

    def _write_failed(self, what: str, exc: OSError) -> BaseException:
        """What a segment write's OSError is: DiskFull for lack of space (the ballast given up, as for
        RocksDB), else the error itself."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        self._release_ballast("a segment write ran out of space")
        return self._refuse(f"the disk is full: {what} could not be written ({exc.strerror})")

    def _space_back(self) -> None:
        with self._state_lock:
            if self.full_since is not None:
                log.warning("disk space is back: puts accepted again after %.1f s", time.monotonic() - self.full_since)
                self.full_since = self._space_back_since = None
                self._rocksdb_failed = False
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
        """Close and open the database again (RocksDB forgets its background error). Only when no use of
        the handle is under way (an iterator keeps the old handle, and its lock, open)."""
        with self._reopen_lock, self._gate.exclusive(REOPEN_GATE_S) as alone:
            if not alone:  # scans under way: the next failed write tries again
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
        next flushes (it drops the deleted entries' records and tombstones; their segment bytes are the
        collector's)."""
        with self._gate.shared():
            self._db.flush(True)
            self._db.compact_range(None, None)

    def checkpoint(self, path: Path) -> None:
        """An online, consistent copy of the store in `path`, a folder that must not exist yet (its
        parent must): RocksDB flushes the memtables, then hard-links its immutable files (it copies them
        where `path` is on another file system) and copies its MANIFEST and live log, all as of one
        moment; then the segment files go to `path`/segments (SegmentLog.copy_into), none deleted
        meanwhile, so every Location in the copy is in its files. Puts go on meanwhile; each is in the
        copy whole or not at all (its bytes are written before its batch). Under the gate, like a
        write, so that a reopen never swaps the handle under it; DiskFull if RocksDB's flush runs out
        of space. The ACKED and BALLAST files are not part of it."""
        with self.segments.hold():
            self._write("checkpoint", lambda db: rocksdict.Checkpoint(db).create_checkpoint(str(path)))
            self.segments.copy_into(path)

    # ---- writes ----
    def begin_put(self, entry_id: str, size: int) -> PendingPut:
        """A put of a `size`-byte blob: feed it the bytes (PendingPut.add_chunk), then `commit` it or
        close it."""
        return PendingPut(self, entry_id, size)

    def _reserve(self, size: int) -> segments.Writer:
        """A segment reservation of `size` bytes, if the disk has them beside those reserved and not
        written yet and the reserve (else DiskFull)."""
        free = self.free_bytes() - self.segments.unwritten()
        if free < size + self.tuning.reserve:
            raise self._refuse(f"the disk is full: {free} bytes free in {self.path}, a put of {size} bytes needs "
                               f"{size + self.tuning.reserve} (the store keeps {self.tuning.reserve} bytes free "
                               "for RocksDB's own writes)")
        try:
            return self.segments.reserve(size)
        except OSError as exc:
            raise self._write_failed("a new segment file", exc)  # noqa: B904 (as in PendingPut.location)

    def commit(self, pending: PendingPut, header: pb.PutHeader, usage: Usage,
               new_namespace: NamespaceInfo | None = None) -> None:
        """Make the put's bytes an entry (DiskFull: nothing of it stored, and the daemon keeps serving
        reads). The caller closes `pending` after, whatever happened."""
        loc = pending.location(self._fsync)
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(_location_key(pending.entry_id), loc.pack())
        batch.put(_place_key(loc), _place_value(pending.entry_id, loc))
        record, vectors = split_record(header)
        batch.put(f"m/{pending.entry_id}".encode(), record.SerializeToString(deterministic=True))
        batch.put(f"v/{pending.entry_id}".encode(), vectors)
        batch.put(f"u/{pending.entry_id}".encode(), usage.to_bytes())
        if new_namespace is not None:
            value = json.dumps({"name": new_namespace.name, "dim": new_namespace.dim}).encode()
            batch.put(f"n/{new_namespace.key}".encode(), value)
        with self._batch_lock:
            count = self._puts + 1
            batch.put(_PUTS_KEY, count.to_bytes(8, "little"))
            old = self._location(pending.entry_id)  # the same entry put again (content-addressed: the same bytes)
            if old is not None:
                batch.delete(_place_key(old))
            self._write("put", lambda db: db.write(batch, self._write_options), needs=4096)
            self.segments.added(loc)
            if old is not None:
                self.segments.removed(old)
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
        """Delete the entry; its segment bytes become dead (a segment left with none is deleted)."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(f"m/{entry_id}".encode())
        batch.delete(f"v/{entry_id}".encode())
        batch.delete(f"u/{entry_id}".encode())
        batch.delete(_location_key(entry_id))
        with self._batch_lock:
            loc = self._location(entry_id)
            if loc is not None:
                batch.delete(_place_key(loc))
            self._write("delete", lambda db: db.write(batch, self._write_options))
            if loc is not None:
                self.segments.removed(loc)
        if loc is not None:
            self._wake_collector()

    # ---- segment collection ----
    def _wake_collector(self) -> None:
        if self._mostly_dead():
            self._collect_wake.set()

    def _mostly_dead(self) -> bool:
        """Whether dead bytes are over COLLECT_DEAD_SHARE of the segments' bytes."""
        return self.segments.dead_bytes() > COLLECT_DEAD_SHARE * self.segments.bytes()[0]

    def _collect_loop(self) -> None:
        while not self._stopping.is_set():
            self._collect_wake.wait(COLLECT_IDLE_S)
            self._collect_wake.clear()
            try:
                while not self._stopping.is_set() and self._collect_one():
                    pass
            except DiskFull:  # the free space went below what the copy needs: the next wake tries again
                continue
            except Exception as exc:  # the file system failing: said once a retry, no traceback each second
                log.warning("store: collecting a segment failed (%s); the collector tries again in %.0f s",
                            exc, COLLECT_RETRY_S)
                self._stopping.wait(COLLECT_RETRY_S)

    def _collect_one(self) -> bool:
        """Collect one segment if one is due: its live blobs copied into the active segment and their
        Locations moved, each in its own batch; then the segment is deleted with its last live blob.
        Whether its live bytes went down (so that a segment that cannot be emptied is not copied over
        and over). Not while the disk is full or short of the segment's live bytes."""
        urgent = self._sampled_disk_bytes() > self.tuning.disk_target
        if self.segments.dead_bytes() <= 0 or not (urgent or self._mostly_dead()) or self.full_since is not None:
            return False
        number = self.segments.collectable(1.0 if urgent else COLLECT_LIVE_SHARE, skip=self._damaged_segments)
        if number is None:
            return False
        before = self.segments.live_in(number)
        if self.free_bytes() < before + self.tuning.reserve:
            return False
        for entry_id, old in self._places(f"l/{number:016x}/".encode()):
            if self._stopping.is_set():
                break
            self._move(entry_id, old)
        return self.segments.live_in(number) < before

    def _move(self, entry_id: str, old: segments.Location) -> None:
        """Copy one blob to a new reservation and point its entry there, unless the entry changed meanwhile."""
        if not self._still_at(entry_id, old):
            return
        try:
            source = self.segments.open_blob(old)
        except FileNotFoundError:
            return  # its segment went with its last blob, deleted since the listing
        try:
            writer = self._reserve(old.size)
            try:
                try:
                    for start in range(0, old.size, CHUNK_BYTES):
                        writer.write(segments.SegmentLog.read(source, old, start, min(CHUNK_BYTES, old.size - start)))
                except EOFError:  # its file cut short: left where it is, for the scrubber to find and delete
                    log.warning("store: entry %s's blob is cut short in segment %d; the segment is not collected "
                                "until the entry is deleted", entry_id, old.segment)
                    self._damaged_segments.add(old.segment)
                    return
                new = writer.finish(self._fsync)
                with self._batch_lock:
                    if self._location(entry_id) != old:  # deleted or put again during the copy: it is dead
                        return
                    batch = rocksdict.WriteBatch(raw_mode=True)
                    batch.put(_location_key(entry_id), new.pack())
                    batch.put(_place_key(new), _place_value(entry_id, new))
                    batch.delete(_place_key(old))
                    self._write("collection", lambda db: db.write(batch, self._write_options), needs=4096)
                    self.segments.added(new)
                    self.segments.removed(old)
                    self.on_collected(old.size)
            finally:
                writer.close()
        except OSError as exc:
            raise self._write_failed("a collected blob", exc)  # noqa: B904 (as in PendingPut.location)
        finally:
            os.close(source)

    def _still_at(self, entry_id: str, old: segments.Location) -> bool:
        """Whether the entry's blob is still at `old`. An `l/` key whose entry points elsewhere (which no
        write leaves behind) is deleted and its bytes counted dead, so that it cannot keep its segment."""
        with self._batch_lock:
            if self._location(entry_id) == old:
                return True
            with self._gate.shared():
                stale = self._db.get(_place_key(old)) is not None
            if stale:
                log.warning("store: segment %d held a place for entry %s, which is elsewhere; dropped it",
                            old.segment, entry_id)
                self._write("collection", lambda db: db.delete(_place_key(old), self._write_options))
                self.segments.removed(old)
            return False

    # ---- an earlier release's layout ----
    def _has_old_chunks(self) -> bool:
        """Whether any blob is still in an earlier release's layout (a move cut short leaves some)."""
        with self._gate.shared():
            for key in self._db.keys(from_key=b"b/"):
                if not key.startswith(b"b/"):
                    break
                if len(key) == _OLD_CHUNK_KEY_BYTES:
                    return True
        return False

    def _move_old_chunks(self) -> None:
        """Move the blobs of an earlier release's layout (b/<entry id>/<i> chunk values) into segments, an
        entry a batch, so that a start cut short goes on where it stopped. Compacting gives the old
        values' space back (RocksDB deletes a blob file once no table refers to it): at the end, and
        whenever the disk is short of room for the next blob, so that the move needs little more disk
        than the store already holds. DiskFull, with a sentence, if even that leaves no room."""
        moved, since_compaction = 0, 0
        started = time.monotonic()
        after = b"b/"
        while True:
            with self._gate.shared():
                it = self._db.iter()
                it.seek(after)
                entry_id, chunks = None, []
                while it.valid() and it.key().startswith(b"b/"):
                    key = it.key()
                    if len(key) == _OLD_CHUNK_KEY_BYTES:
                        if entry_id is None:
                            entry_id = key[2:66].decode()
                        elif key[2:66].decode() != entry_id:
                            break
                        chunks.append(it.value())
                    it.next()
                del it
            if entry_id is None:
                break
            size = sum(len(c) for c in chunks)
            if since_compaction and self.free_bytes() < size + self.tuning.reserve:
                self._compact()
                since_compaction = 0
            try:
                self._move_one_old(entry_id, chunks)
            except DiskFull as exc:
                raise DiskFull(f"the store in {self.path} is moving its blobs into segment files (this release's "
                               f"layout) and the disk has no room for the next one: {exc}; free some space and start "
                               f"again (the move goes on where it stopped, {moved} entries moved)") from exc
            moved += 1
            since_compaction += 1
            after = f"b/{entry_id}0".encode()
        self._compact()  # also after a move cut short between its last entry and its compaction
        if moved:
            log.warning("store: moved %d entries' blobs into segment files (the layout of this release) in %.1f s",
                        moved, time.monotonic() - started)

    def _compact(self) -> None:
        with self._gate.shared():
            self._db.compact_range(None, None)

    def _move_one_old(self, entry_id: str, chunks: list[bytes]) -> None:
        start, end = f"b/{entry_id}/".encode(), f"b/{entry_id}0".encode()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete_range(start, end)
        writer = None
        if chunks and self._db.get(f"m/{entry_id}".encode()) is not None:
            writer = self._reserve(sum(len(c) for c in chunks))
            for chunk in chunks:
                writer.write(chunk)
            loc = writer.finish(self._fsync)
            batch.put(_location_key(entry_id), loc.pack())
            batch.put(_place_key(loc), _place_value(entry_id, loc))
        try:
            with self._batch_lock:
                self._write("layout change", lambda db: db.write(batch, self._write_options))
                if writer is not None:
                    self.segments.added(loc)
        finally:
            if writer is not None:
                writer.close()

    # ---- reads ----
    def exists(self, entry_id: str) -> bool:
        with self._gate.shared():
            return self._db.get(f"m/{entry_id}".encode()) is not None

    def record(self, entry_id: str) -> pb.PutHeader | None:
        """The entry's Put header without its vectors (lookups need only the blob info, prompt and mask)."""
        with self._gate.shared():
            raw = self._db.get(f"m/{entry_id}".encode())
        return None if raw is None else pb.PutHeader.FromString(raw)

    def read_blob(self, entry_id: str) -> BlobStream:
        """The blob's chunks as committed now: consistent even if the entry is deleted or moved before
        the first chunk is read or meanwhile; no chunk if there is no such entry. Close the stream if
        it is not read to its end."""
        return BlobStream(self, entry_id)

    def read_chunk(self, entry_id: str, index: int) -> bytes | None:
        """Chunk `index` (of CHUNK_BYTES) of the entry's blob, None past the last one or if there is no
        such entry. Nothing is held between chunks (the scrubber reads slowly); a delete or a move
        between two calls makes the next one read the entry's bytes where they are then, or None."""
        opened = self._open_blob(entry_id)
        if opened is None:
            return None
        loc, fd = opened
        if index * CHUNK_BYTES >= loc.size:
            os.close(fd)
            return None
        try:
            start = index * CHUNK_BYTES
            return segments.SegmentLog.read(fd, loc, start, min(CHUNK_BYTES, loc.size - start))
        finally:
            os.close(fd)

    def _open_blob(self, entry_id: str) -> tuple[segments.Location, int] | None:
        """The entry's Location and its segment opened (the caller closes it); None if no such entry.
        A Location read just before the collector moved the blob and deleted its segment is read again."""
        while True:
            loc = self._location(entry_id)
            if loc is None:
                return None
            try:
                return loc, self.segments.open_blob(loc)
            except FileNotFoundError:
                if self._location(entry_id) == loc:  # not moved: the file is gone, a damaged store
                    raise

    def _location(self, entry_id: str) -> segments.Location | None:
        with self._gate.shared():
            raw = self._db.get(_location_key(entry_id))
        return None if raw is None else segments.Location.unpack(raw)

    def _locations(self) -> Iterator[segments.Location]:
        """Every committed blob's Location (by its `l/` key)."""
        with self._gate.shared():
            for key, value in self._db.items(from_key=b"l/"):
                if not key.startswith(b"l/"):
                    break
                yield _place(key, value)[1]

    def _places(self, prefix: bytes) -> list[tuple[str, segments.Location]]:
        found = []
        with self._gate.shared():
            for key, value in self._db.items(from_key=prefix):
                if not key.startswith(prefix):
                    break
                found.append(_place(key, value))
        return found

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
