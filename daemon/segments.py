"""Blob segments: the latents' bytes, in files of the store's own, outside RocksDB.

A blob is written once, where it stays: at an offset of an append-only segment file
(`<store>/segments/<number>.seg`), in the chunks it arrives in. RocksDB keeps only where it is
(store.py: `b/<entry id>` the Location, `l/<segment>/<offset>` the entry id, both in the Put's batch).
Why not RocksDB's own blob files: RocksDB writes every value to its write-ahead log first and to a
blob file at the next flush, each time with a CRC it computes in software in the rocksdict wheel,
which made an 8 MiB put spend 15 ms in RocksDB against 2 ms for these writes (docs/hardening.md,
"Blob segments"). The entry's own checks stay: the daemon checks the CRC-32C (and the sha256, when a client sends one)
as the bytes arrive, the client checks the CRC-32C of every fetch, the scrubber and `flexcache verify`
the checksum of every stored blob.

The contract:

- A put reserves its blob's bytes in the active segment (`reserve`) and writes them with pwrite, so
  puts run side by side; the segment rolls once it holds `segment_bytes`. A reservation that is never
  committed (a put aborted, refused, or a crash before its batch) is dead bytes, never a torn entry:
  an entry exists only once its batch with the Location is written, after its bytes.
- Bytes at a Location never change until the segment is deleted whole, so a reader holding the
  segment open (`open_blob`) reads what was committed even if the entry is deleted or moved meanwhile.
- Space: the segments' live bytes are counted (`added`, `removed`); a segment left with none is
  deleted at once, unless a writer still holds a reservation in it or a checkpoint holds deletions
  (`hold`); a sealed segment that is mostly dead is collected: its live blobs are copied into the
  active segment and their Locations moved (store.Store's collector), then it is deleted. A
  segment with a writer is never collected, so a put never commits into a deleted file.
- After a crash the live bytes are counted again from RocksDB (`load`), segments without any are
  deleted, and writing starts in a new segment: nothing is appended after a torn tail.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER = "segments"
SUFFIX = ".seg"
_LOCATION = struct.Struct("<QQQ")  # segment, offset, size
# A write's largest piece. On the 6.18 kernel of this project's machines, a page-cache write of 1 MiB or
# more took 10x longer than the same bytes in pieces of 512 KiB or less once memory was fragmented
# (ext4's large folios; docs/hardening.md, "Blob segments").
WRITE_BYTES = 256 << 10


@dataclass(frozen=True)
class Location:
    """Where a blob is: `size` bytes at `offset` of segment number `segment`."""

    segment: int
    offset: int
    size: int

    def pack(self) -> bytes:
        return _LOCATION.pack(self.segment, self.offset, self.size)

    @classmethod
    def unpack(cls, raw: bytes) -> Location:
        return cls(*_LOCATION.unpack(raw))


class _Segment:
    def __init__(self, number: int, path: Path, end: int):
        self.number = number
        self.path = path
        self.end = end  # bytes written or reserved
        self.live = 0  # bytes of committed blobs
        self.writers = 0  # reservations not yet committed or given up
        self.sealed = True


class _Reservation:
    """What a Writer's end gives back (kept apart from the Writer, which its finalizer must not hold)."""

    def __init__(self, segment: _Segment, size: int):
        self.segment = segment
        self.size = size
        self.written = 0


class Writer:
    """One reservation: `write` the blob's bytes in order, `finish` (the Location; synced first when
    the log syncs), then `close` once the Location is committed (or given up). A Writer dropped
    without `close` releases its reservation when it is collected."""

    def __init__(self, log_: SegmentLog, segment: _Segment, offset: int, size: int, fd: int):
        self.location = Location(segment.number, offset, size)
        self._log = log_
        self._fd = fd
        self._reservation = _Reservation(segment, size)
        self._done = weakref.finalize(self, _release, log_, self._reservation, fd)

    def write(self, data: bytes | memoryview) -> None:
        """OSError (ENOSPC, say) if the file system refuses; ValueError past the reserved size."""
        reservation = self._reservation
        if reservation.written + len(data) > reservation.size:
            raise ValueError(f"{reservation.written + len(data)} bytes into a reservation of {reservation.size}")
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view[:WRITE_BYTES], self.location.offset + reservation.written)
                reservation.written += n
                view = view[n:]
        finally:
            self._log._wrote(len(data) - len(view))

    def finish(self, sync: bool) -> Location:
        if self._reservation.written != self.location.size:
            raise ValueError(f"{self._reservation.written} of {self.location.size} reserved bytes written")
        if sync:
            os.fdatasync(self._fd)
        return self.location

    def close(self) -> None:
        self._done()
        self._log._apply_releases()


def _release(log_: SegmentLog, reservation: _Reservation, fd: int) -> None:
    """A Writer's end, from `close` or from the garbage collector, which may run it in any thread at any
    allocation, in one holding the log's lock too: so it only queues the change, and applies it if the
    lock is free (else the log's next use does)."""
    try:
        os.close(fd)
    finally:
        log_._releases.append(reservation)
        log_._apply_releases(blocking=False)


class SegmentLog:
    """The segment files of one store (see the module's docstring). Thread-safe. Not `writable` (an
    audit of a stopped store): nothing is made or deleted, and `reserve` is not for it."""

    def __init__(self, root: Path, segment_bytes: int, fsync: bool = False, writable: bool = True):
        self.root = root / FOLDER
        self.writable = writable
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._releases: deque[_Reservation] = deque()  # Writers ended, not yet applied (`_release`)
        self._unwritten = 0  # bytes reserved and not yet written, of all Writers
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._holds = 0  # checkpoints under way: deletions wait
        self._next = 1  # segment numbers are never used twice
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                number = int(path.stem, 16)
            except ValueError:
                continue
            if path.name == self.path(number).name:  # not another file's name that parses (a copy's, say)
                self._segments[number] = _Segment(number, path, path.stat().st_size)

    def path(self, number: int) -> Path:
        return self.root / f"{number:016x}{SUFFIX}"

    def load(self, live: Iterable[Location]) -> None:
        """Count the committed blobs (from RocksDB, at open); if writable, delete the segments holding
        none and start a new segment for writes. Locations in a segment whose file is missing are
        counted (reads of them fail: the scrubber deletes those entries, `verify` reports them)."""
        with self._locked():
            for loc in live:
                segment = self._segments.get(loc.segment)
                if segment is None:
                    segment = self._segments[loc.segment] = _Segment(loc.segment, self.path(loc.segment), 0)
                segment.live += loc.size
            self._next = max(self._segments, default=0) + 1
            if not self.writable:
                return
            for segment in list(self._segments.values()):
                if segment.live == 0:
                    self._delete(segment)
            self._roll()

    def _roll(self) -> None:
        number, self._next = self._next, self._next + 1
        path = self.path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        if self.fsync:
            fsync_path(self.root)
        if self._active is not None:
            self._active.sealed = True
            self._maybe_delete(self._active)
        self._active = self._segments[number] = _Segment(number, path, 0)
        self._active.sealed = False

    def reserve(self, size: int) -> Writer:
        """Room for a blob of `size` bytes (OSError if a new segment file cannot be made)."""
        with self._locked():
            active = self._active
            assert active is not None, "load() first"
            if active.end and active.end + size > self.segment_bytes:
                self._roll()
                active = self._active
                assert active is not None
            offset = active.end
            active.end += size
            active.writers += 1
            self._unwritten += size
            try:
                fd = os.open(active.path, os.O_WRONLY)
            except BaseException:
                active.writers -= 1
                self._unwritten -= size
                raise
        return Writer(self, active, offset, size, fd)

    def unwritten(self) -> int:
        """Bytes reserved that no Writer has written yet: space the file system has not given yet."""
        with self._locked():
            return self._unwritten

    def _wrote(self, nbytes: int) -> None:
        with self._locked():
            self._unwritten -= nbytes

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, with the Writers' ends queued while it was taken (`_release`) applied."""
        with self._lock:
            self._drain()
            try:
                yield
            finally:
                self._drain()

    def _apply_releases(self, blocking: bool = True) -> None:
        if not self._lock.acquire(blocking):
            return
        try:
            self._drain()
        finally:
            self._lock.release()

    def _drain(self) -> None:
        """Apply the Writers' ends queued by `_release` (with the lock held)."""
        while self._releases:
            reservation = self._releases.popleft()
            reservation.segment.writers -= 1
            self._unwritten -= reservation.size - reservation.written
            self._maybe_delete(reservation.segment)

    def added(self, loc: Location) -> None:
        """A blob at `loc` is committed (call before the Writer's close)."""
        with self._locked():
            self._segments[loc.segment].live += loc.size

    def removed(self, loc: Location) -> None:
        """The blob at `loc` is no longer referenced (its entry deleted, or moved)."""
        with self._locked():
            segment = self._segments.get(loc.segment)
            if segment is not None:
                segment.live -= loc.size
                self._maybe_delete(segment)

    def _maybe_delete(self, segment: _Segment) -> None:
        if segment.live <= 0 and segment.writers == 0 and segment.sealed and not self._holds:
            self._delete(segment)

    def _delete(self, segment: _Segment) -> None:
        self._segments.pop(segment.number, None)
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("segments: %s not deleted (%s); the next start tries again", segment.path, exc)

    def open_blob(self, loc: Location) -> int:
        """A read-only descriptor of the segment holding `loc`, for `read`s (the caller closes it).
        The segment is opened under the lock that deletes segments, so a Location read from RocksDB
        just before stays readable: FileNotFoundError only if the file is gone for another reason."""
        with self._locked():
            return os.open(self.path(loc.segment), os.O_RDONLY)

    @staticmethod
    def read(fd: int, loc: Location, start: int, n: int) -> bytes:
        """`n` bytes of the blob at `loc` from `start` (OSError, EOFError if the file ends first)."""
        data = os.pread(fd, n, loc.offset + start)
        if len(data) != n:
            raise EOFError(f"segment file ends {len(data)} bytes into a read of {n} at {loc.offset + start}")
        return data

    # ---- collection ----
    def bytes(self) -> tuple[int, int]:
        """(bytes in segment files, bytes of committed blobs)."""
        with self._locked():
            return sum(s.end for s in self._segments.values()), sum(s.live for s in self._segments.values())

    def dead_bytes(self) -> int:
        """Bytes of segment files no committed blob holds (a segment whose file is missing or cut
        short counts none)."""
        with self._locked():
            return sum(max(0, s.end - s.live) for s in self._segments.values())

    def collectable(self, max_live_share: float, skip: Collection[int] = ()) -> int | None:
        """The number of the sealed segment, with no writer and some dead bytes, whose live share of its
        bytes is the smallest and at most `max_live_share`, not one of `skip`; None if there is none."""
        with self._locked():
            best, best_share = None, max_live_share
            for segment in self._segments.values():
                if not segment.sealed or segment.writers or segment.live >= segment.end or segment.number in skip:
                    continue
                share = segment.live / segment.end
                if share <= best_share:
                    best, best_share = segment, share
            return None if best is None else best.number

    def live_in(self, number: int) -> int:
        with self._locked():
            segment = self._segments.get(number)
            return segment.live if segment is not None else 0

    # ---- checkpoints ----
    @contextmanager
    def hold(self) -> Iterator[None]:
        """No segment is deleted inside (a checkpoint's Locations stay valid until its files are
        linked); what became deletable meanwhile is deleted at the end."""
        with self._locked():
            self._holds += 1
        try:
            yield
        finally:
            with self._locked():
                self._holds -= 1
                for segment in list(self._segments.values()):
                    self._maybe_delete(segment)

    def copy_into(self, root: Path) -> None:
        """The segment files, into `root`/segments (call inside `hold`, after RocksDB's checkpoint):
        hard links of sealed segments without writers (they never change again), copies of the others
        (the active segment, one a put still writes into: what the checkpoint holds of them is
        already written). Copies where `root` is on another file system."""
        with self._locked():
            self._roll()
            segments = [(s.path, s.sealed and s.writers == 0) for s in self._segments.values() if s.end]
        target = root / FOLDER
        target.mkdir()
        for path, frozen in segments:
            destination = target / path.name
            try:
                if frozen:
                    try:
                        os.link(path, destination)
                        continue
                    except OSError:  # another file system, or no hard links there
                        pass
                shutil.copyfile(path, destination)
                fsync_path(destination)
            except FileNotFoundError:  # deleted empty before the hold (its blobs in no checkpoint)
                continue
        fsync_path(target)


def fsync_path(path: Path) -> None:
    """Sync a file, or a folder's entries (through a read-only descriptor of it, as for a file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
