"""Pins: entries being read out, which eviction must skip until the read is over.

Contract: a fetch pins its entry (`Pins.pin`) before it hands out the chunks, and hands them out in
a PinnedChunks that releases that pin exactly once: when the chunks run out, when reading one fails,
or when it is closed, whichever comes first. An entry is pinned while any fetch of it holds a pin;
eviction asks (`eid in pins`) and passes over it, so a stream or a data-port transfer is never cut
short by eviction. (Delete and Verify's deletion do not wait: the store reads a blob from a snapshot,
so a read already under way still completes.)

Why a class of its own: a pin is released from whichever thread ends the read (a gRPC stream, the
data port's sender, its ticket expiry), long after the cache's call returned. Its lock guards only
the counts and is never held while taking another, so releasing a pin cannot deadlock with the
cache's lock, which is held when pins are taken and checked.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol


class Pins:
    """Pin counts by entry id; an entry absent from the counts is not pinned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def pin(self, eid: str) -> None:
        with self._lock:
            self._counts[eid] += 1

    def unpin(self, eid: str) -> None:
        with self._lock:
            self._counts[eid] -= 1
            if self._counts[eid] <= 0:
                del self._counts[eid]

    def __contains__(self, eid: str) -> bool:
        with self._lock:
            return self._counts[eid] > 0


class Closable(Iterator[bytes], Protocol):
    """Chunks whose source must be let go when they are not read to the end (store.BlobStream)."""

    def close(self) -> None: ...


class PinnedChunks:
    """A fetched entry's chunks. The entry stays pinned (never evicted) until this is exhausted or
    closed, whichever comes first; unlike a generator's `finally`, close() releases the pin even if
    no chunk was ever read (a client that went away after the header, a ticket never redeemed)."""

    def __init__(self, chunks: Closable, release: Callable[[], None]):
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> PinnedChunks:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:  # the end, or a read error: either way this fetch is over
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            try:
                self._chunks.close()
            finally:
                release()
