"""RocksDB (rocksdict, raw mode): the source of truth for entries, their blobs and their usage.

Key layout (entry ids are 64 hex characters, so '/' < '0' bounds a prefix):

    n/<namespace key>   JSON {"name", "dim"}       written with the namespace's first entry
    m/<entry id>        PutHeader (deterministic)  the entry's record, without its vectors;
                                                   present <=> the entry exists
    v/<entry id>        packed float16 vectors     entries.split_record: read only to rebuild the index
    u/<entry id>        Usage JSON                 hits and credit, rewritten on each fetch
    b/<entry id>/<i>    blob chunk i (8 hex digits), as the client streamed it (at most 1 MiB)

A Put lands as one WriteBatch (chunks, record, vectors, usage, namespace), so a crash leaves either the
whole entry or nothing. Reads of a blob go through a snapshot, so a concurrent delete never tears a
stream. Large values go to RocksDB blob files, which keeps compaction from rewriting latents.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import rocksdict

from flexcache.v1 import cache_pb2 as pb

from .entries import Usage, split_record, unpack_vectors


@dataclass(frozen=True)
class NamespaceInfo:
    key: str
    name: str
    dim: int


def _chunk_key(entry_id: str, index: int) -> bytes:
    return f"b/{entry_id}/{index:08x}".encode()


def _blob_range(entry_id: str) -> tuple[bytes, bytes]:
    return f"b/{entry_id}/".encode(), f"b/{entry_id}0".encode()


class PendingPut:
    """A Put being received: chunks accumulate in a WriteBatch that only `Store.commit` applies."""

    def __init__(self, entry_id: str):
        self.entry_id = entry_id
        self.batch = rocksdict.WriteBatch(raw_mode=True)
        self.chunks = 0

    def add_chunk(self, data: bytes) -> None:
        self.batch.put(_chunk_key(self.entry_id, self.chunks), data)
        self.chunks += 1


class StoreLocked(Exception):
    """Another process (or another Store in this one) has the database open: RocksDB holds `lock`."""

    def __init__(self, lock: Path):
        super().__init__(f"the store is open elsewhere: RocksDB holds its lock {lock}")
        self.lock = lock


class Store:
    def __init__(self, path: Path, fsync: bool = False):
        """Open (or create) the database in `path`; StoreLocked if another process has it open."""
        path.mkdir(parents=True, exist_ok=True)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_enable_blob_files(True)
        options.set_min_blob_size(64 * 1024)
        options.set_enable_blob_gc(True)
        try:
            self._db = rocksdict.Rdict(str(path), options)
        except Exception as exc:  # rocksdict raises plain Exception, RocksDB's status text its message
            # RocksDB's words: "While lock file: <path>/LOCK: Resource temporarily unavailable" when
            # another process holds it, "lock hold by current process" when this one does.
            if "While lock file" in str(exc) or "lock hold by current process" in str(exc):
                raise StoreLocked(path / "LOCK") from exc
            raise
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = fsync
        # Blob chunks are read without RocksDB's per-record checksum: clients verify every fetched blob
        # end to end (CRC-32C or sha256), which covers the same bytes and more, and RocksDB's check
        # dominated the time to fetch an entry flushed to a blob file (measured in docs/bench_daemon.md).
        self._blob_read = rocksdict.ReadOptions()
        self._blob_read.set_verify_checksums(False)
        self._checked_read = rocksdict.ReadOptions()  # for Verify: RocksDB's own checks on
        self._checked_read.set_verify_checksums(True)

    def close(self) -> None:
        self._db.close()

    # ---- writes ----
    def begin_put(self, entry_id: str) -> PendingPut:
        return PendingPut(entry_id)

    def commit(self, pending: PendingPut, header: pb.PutHeader, usage: Usage,
               new_namespace: NamespaceInfo | None = None) -> None:
        batch = pending.batch
        record, vectors = split_record(header)
        batch.put(f"m/{pending.entry_id}".encode(), record.SerializeToString(deterministic=True))
        batch.put(f"v/{pending.entry_id}".encode(), vectors)
        batch.put(f"u/{pending.entry_id}".encode(), usage.to_bytes())
        if new_namespace is not None:
            value = json.dumps({"name": new_namespace.name, "dim": new_namespace.dim}).encode()
            batch.put(f"n/{new_namespace.key}".encode(), value)
        self._db.write(batch, self._write_options)

    def put_usage(self, entry_id: str, usage: Usage) -> None:
        self._db.put(f"u/{entry_id}".encode(), usage.to_bytes(), self._write_options)

    def delete(self, entry_id: str) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(f"m/{entry_id}".encode())
        batch.delete(f"v/{entry_id}".encode())
        batch.delete(f"u/{entry_id}".encode())
        batch.delete_range(*_blob_range(entry_id))
        self._db.write(batch, self._write_options)

    # ---- reads ----
    def exists(self, entry_id: str) -> bool:
        return self._db.get(f"m/{entry_id}".encode()) is not None

    def record(self, entry_id: str) -> pb.PutHeader | None:
        """The entry's Put header without its vectors (lookups need only the blob info, prompt and mask)."""
        raw = self._db.get(f"m/{entry_id}".encode())
        return None if raw is None else pb.PutHeader.FromString(raw)

    def read_blob(self, entry_id: str, checked: bool = False) -> Generator[bytes, None, None]:
        """The blob's chunks from one snapshot: consistent even if the entry is deleted meanwhile.
        `checked`: with RocksDB's per-record checksums (slower; fetches leave them to the client)."""
        start, end = _blob_range(entry_id)
        snapshot = self._db.snapshot()
        it = snapshot.iter(self._checked_read if checked else self._blob_read)
        it.seek(start)
        while it.valid() and it.key() < end:
            yield it.value()
            it.next()

    def vectors(self, entry_id: str) -> pb.Vectors:
        """The entry's vectors (to rebuild its index point)."""
        return unpack_vectors(self._db[f"v/{entry_id}".encode()])

    def entries(self) -> Iterator[tuple[str, pb.PutHeader, Usage | None]]:
        """Every entry with its record (as `record` returns it) and usage: startup rebuilds policy
        state from these and reconciles the index (`vectors` for the entries it must re-index)."""
        it = self._db.iter()
        it.seek(b"m/")
        while it.valid() and it.key().startswith(b"m/"):
            entry_id = it.key()[2:].decode()
            raw_usage = self._db.get(f"u/{entry_id}".encode())
            usage = None if raw_usage is None else Usage.from_bytes(raw_usage)
            yield entry_id, pb.PutHeader.FromString(it.value()), usage
            it.next()

    def namespaces(self) -> dict[str, NamespaceInfo]:
        found = {}
        for key, value in self._db.items(from_key=b"n/"):
            if not key.startswith(b"n/"):
                break
            data = json.loads(value)
            found[key[2:].decode()] = NamespaceInfo(key[2:].decode(), data["name"], data["dim"])
        return found

