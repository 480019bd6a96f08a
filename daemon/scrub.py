"""Finding damaged entries before a client does: the blob check, the background scrubber, and the
offline check behind `flexcache verify`.

Why: blobs live in segment files without a checksum of their own (the client checks every fetch end to
end, daemon/segments.py), so a blob damaged on disk is served until a client notices and asks for Verify.
The scrubber walks every entry at a bounded rate (`scrub_bytes_per_second`), re-reading its chunks and
comparing size and checksum (sha256, else CRC-32C: `blob_problem`) with the entry's record; an entry
that fails goes through the cache's own verify-and-delete path (`Cache.check_entry`: a second read,
then the whole entry deleted under the cache's lock), so a concurrent delete is never taken for
damage and nothing is half deleted.

Contract:
- Bounded: at most `bytes_per_second` blob bytes a second on average, one chunk (at most 1 MiB) in
  memory, no iterator, snapshot or segment file held across its pauses (each would pin files that
  compaction or the segment collector wants to delete); `pause_s` before the first pass and between
  passes.
- Counted: `flexcache_scrubbed_bytes_total`, `flexcache_scrub_passes_total`, and the entries it
  deletes in `flexcache_corrupt_entries_total{found_by="scrubber"}`.
- `verify_store` checks a stopped store the same way, and reports rather than deletes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import crc32c

from flexcache.v1 import cache_pb2 as pb

from .entries import NamespaceKey
from .store import Store

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger(__name__)

PAGE = 256  # entry ids read per scan step


def blob_problem(chunks: Iterable[bytes], blob: pb.BlobInfo) -> str | None:
    """What is wrong with a stored blob read as `chunks` (its segment's read errors included), or None if
    its size and checksum are the ones its record declares: its sha256 when it has one (the stronger),
    else its CRC-32C (a blob has at least one: wire.blob_problem)."""
    digest = hashlib.sha256() if blob.sha256 else None
    crc, size = 0, 0
    try:
        for chunk in chunks:
            if digest is not None:
                digest.update(chunk)
            else:
                crc = crc32c.crc32c(chunk, value=crc)
            size += len(chunk)
    except Exception as exc:  # the segment file missing, cut short, or failing its reads
        return f"reading it failed: {exc}"
    if size != blob.size:
        return f"{size} bytes stored, {blob.size} declared"
    if digest is not None and digest.digest() != blob.sha256:
        return f"sha256 {digest.hexdigest()} read, {blob.sha256.hex()} declared"
    if digest is None and crc != blob.crc32c:
        return f"crc32c {crc:08x} read, {blob.crc32c:08x} declared"
    return None


class Scrubber:
    """A daemon thread over a cache: `start()`, then `stop()` before the cache closes (Cache.close does)."""

    def __init__(self, cache: Cache, bytes_per_second: int, pause_s: float):
        self._cache = cache
        self._rate = float(bytes_per_second)
        self._pause_s = pause_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scrub", daemon=True)
        self._due = 0.0  # monotonic time the next chunk may be read (the pacing)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._pause_s):
            try:
                checked = self.scrub_pass()
            except Exception:  # the store closing under it, or a bug: never the daemon's end
                log.exception("scrubber: the pass failed; the next one starts over")
                continue
            if checked is not None:
                self._cache.metrics.scrub_passes.inc()
                log.info("scrubber: pass over %d entries done", checked)

    def scrub_pass(self) -> int | None:
        """Check every entry once; the number checked, None if stopped first."""
        store, after, checked = self._cache.store, "", 0
        while True:
            page = store.entry_ids(after, PAGE)
            if not page:
                return checked
            for eid in page:
                if self._stop.is_set():
                    return None
                self._scrub(store, eid)
                checked += 1
            after = page[-1]

    def _scrub(self, store: Store, eid: str) -> None:
        header = store.record(eid)
        if header is None:  # deleted since the page was read
            return
        if blob_problem(self._paced_chunks(store, eid), header.blob) is None:
            return
        # A read without a snapshot may also see a delete under way: the cache's path reads again and decides.
        self._cache.check_entry(eid, NamespaceKey.of(header.namespace), found_by="scrubber")

    def _paced_chunks(self, store: Store, eid: str) -> Iterator[bytes]:
        index = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._due > now:
                self._stop.wait(self._due - now)
            chunk = store.read_chunk(eid, index)
            if chunk is None:
                return
            self._due = max(self._due, time.monotonic()) + len(chunk) / self._rate
            self._cache.metrics.scrubbed_bytes.inc(len(chunk))
            yield chunk
            index += 1


@dataclass(frozen=True)
class Damage:
    entry_id: str
    namespace: str
    prompt: str
    problem: str


def verify_store(store: Store) -> Iterator[Damage | tuple[int, int]]:
    """Every damaged entry of a stopped store (its record and vectors with RocksDB's checksums on, its
    blob's size and checksum), then (entries checked, blob bytes checked)."""
    entries = checked = 0
    for eid in _all_ids(store):
        entries += 1
        try:
            header = store.record(eid)
        except Exception as exc:
            yield Damage(eid, "?", "", f"its record cannot be read: {exc}")
            continue
        if header is None:
            continue
        namespace, prompt = _name(header.namespace), header.prompt
        try:
            store.vectors(eid)
        except KeyError:
            yield Damage(eid, namespace, prompt, "its vectors are missing")
            continue
        except Exception as exc:
            yield Damage(eid, namespace, prompt, f"its vectors cannot be read: {exc}")
            continue
        problem = blob_problem(store.read_blob(eid), header.blob)
        if problem is not None:
            yield Damage(eid, namespace, prompt, problem)
        checked += header.blob.size
    yield entries, checked


def _all_ids(store: Store) -> Iterator[str]:
    after = ""
    while page := store.entry_ids(after, PAGE):
        yield from page
        after = page[-1]


def _name(ns: pb.Namespace) -> str:
    try:
        return NamespaceKey.of(ns).name
    except Exception:
        return "?"
