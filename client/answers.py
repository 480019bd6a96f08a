"""What the daemon's answers must satisfy, and the client's values built from them.

A daemon's answer is checked before the client relies on it: a hostile or buggy daemon can send a
candidate whose mask or blob header does not add up, steps a worker cannot skip, a header for
another entry, a stream longer than it declared. Such an answer is `Malformed`; the caller turns it
into a miss with a warning. Sizes are products of Python ints, bounded (wire.MAX_BLOB_BYTES,
wire.MAX_MASK_CELLS) before anything is allocated. Fetched bytes are verified against the entry's
CRC-32C, or its sha256 when it was stored without one, as they arrive (`BlobCheck`, `receive_blob`).
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import crc32c
import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire
from flexcache.v1.wire import LATENT_CODEC, RAW, blob_problem

from . import codec, tensors

_SIMILARITY_SLACK = 1e-5  # cosine similarity is in [-1, 1]; float32 rounding may step just outside
_TICKET_BYTES = 16  # daemon/dataport.py: TICKET_BYTES
_ENTRY_ID = re.compile(r"[0-9a-f]{64}")

# Blobs from this size on are hashed on a helper thread during the receive; below it the thread's
# start and hand-offs cost more than the overlap gains.
_THREADED_HASH_BYTES = 2 * wire.CHUNK_BYTES


class Malformed(ValueError):
    """The daemon's answer cannot be used as it is (a hostile or buggy daemon): a miss."""


class ChecksumMismatch(Exception):
    """A fetched blob does not match its checksum: a miss, and the daemon is asked to Verify the entry.

    Not a Malformed: the answer is well formed, its bytes were damaged (in transit, or on the daemon's
    disk, which only the daemon can tell)."""


# ---- checksums ----
class _Digest:
    """sha256 on the calling thread, for entries stored without a CRC-32C (the proto makes it optional:
    a client such as the Node.js check may omit it)."""

    def __init__(self, blob: pb.BlobInfo) -> None:
        self._hash = hashlib.sha256()
        self._want = blob.sha256

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def matches(self) -> bool:
        return self._hash.digest() == self._want

    def close(self) -> None:
        pass


class _ThreadedDigest(_Digest):
    """sha256 fed in order through a queue to one helper thread, so hashing overlaps the receive."""

    def __init__(self, blob: pb.BlobInfo) -> None:
        super().__init__(blob)
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flexcache-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: memoryview) -> None:
        self._queue.put(data)

    def matches(self) -> bool:
        self.close()
        return super().matches()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Crc32c(_Digest):
    """CRC-32C, when the entry was stored with one: far faster than sha256, so inline."""

    def __init__(self, blob: pb.BlobInfo) -> None:
        self._crc = 0
        self._want = blob.crc32c

    def update(self, data: memoryview) -> None:
        self._crc = crc32c.crc32c(data, value=self._crc)

    def matches(self) -> bool:
        return self._crc == self._want


def _verifier(blob: pb.BlobInfo) -> _Digest:
    if blob.HasField("crc32c"):
        return _Crc32c(blob)
    return _ThreadedDigest(blob) if blob.size >= _THREADED_HASH_BYTES else _Digest(blob)


class BlobCheck:
    """The checksum of a blob (its CRC-32C, else its sha256) computed as its bytes arrive, so that it
    overlaps the rest of the transfer: `update` with each piece in order, then `finish`, which raises
    ChecksumMismatch unless the whole matches; `close` if the transfer is given up (a large blob
    without a CRC-32C is hashed on a helper thread, which it stops)."""

    def __init__(self, entry_id: str, blob: pb.BlobInfo):
        self._entry_id = entry_id
        self._verifier = _verifier(blob)

    def update(self, piece: memoryview) -> None:
        self._verifier.update(piece)

    def finish(self) -> None:
        try:
            matches = self._verifier.matches()
        finally:
            self._verifier.close()
        if not matches:
            raise ChecksumMismatch(f"entry {self._entry_id}: checksum mismatch, blob discarded")

    def close(self) -> None:
        self._verifier.close()


def receive_blob(header: pb.FetchHeader, chunks: Iterable[bytes | memoryview]) -> bytearray:
    """The blob `header` declares, from its chunks, verified; a checked header (`check_header`) bounds
    its size. Each chunk is copied once, straight into the result, and checked in place there; a large
    blob without a CRC-32C is hashed on a helper thread while the next chunks arrive (hashlib releases
    the GIL). Raises Malformed (an empty chunk, more or fewer bytes than declared) or ChecksumMismatch."""
    size, entry_id = header.blob.size, header.entry_id
    check = BlobCheck(entry_id, header.blob)
    try:
        data = bytearray(size)
        view = memoryview(data)
        offset = 0
        for chunk in chunks:
            if not len(chunk):
                raise Malformed(f"entry {entry_id}: an empty chunk (or a message that is not one) in the blob")
            end = offset + len(chunk)
            if end > size:
                raise Malformed(f"entry {entry_id}: the daemon sent more than the declared {size} bytes")
            view[offset:end] = chunk
            check.update(view[offset:end])  # check the copy in place; the chunk can be freed
            offset = end
        if offset != size:
            raise Malformed(f"entry {entry_id}: the blob ended after {offset} of {size} bytes")
        check.finish()
    finally:
        check.close()
    return data


# ---- what the daemon's answers must satisfy ----
def _check_blob(blob: pb.BlobInfo, total_steps: int | None, where: str) -> None:
    problem = blob_problem(blob, total_steps)
    if problem is not None:
        raise Malformed(f"{where}: {problem}")


def _checked_mask(mask: pb.Mask, where: str) -> np.ndarray:
    problem = wire.mask_problem(mask)
    if problem is not None:
        raise Malformed(f"{where}: object mask {problem}")
    shape = [int(n) for n in mask.shape]
    return tensors.unpack_mask(shape, mask.bits)


def check_entry_id(value: str, where: str) -> str:
    if not _ENTRY_ID.fullmatch(value):
        raise Malformed(f"{where}: entry id {value[:80]!r} is not 64 lowercase hex characters")
    return value


def check_header(header: pb.FetchHeader, request: pb.FetchRequest, total_steps: int,
                 expect: pb.BlobInfo | None = None) -> None:
    """A Fetch or FetchDirect header fit to receive into: the entry asked for, a usable blob info, and,
    for a fetch of a lookup's candidate, the blob the lookup offered (entries are content-addressed:
    one id, one blob)."""
    if header.entry_id != request.entry_id:
        raise Malformed(f"fetch of {request.entry_id[:80]}: the daemon answered for entry {header.entry_id[:80]!r}")
    _check_blob(header.blob, total_steps, f"entry {request.entry_id}")
    if expect is not None and header.blob != expect:
        raise Malformed(f"entry {request.entry_id}: the fetched blob is not the one the lookup offered")


def check_ticket(answer: pb.FetchTicket, request: pb.FetchRequest, total_steps: int,
                 expect: pb.BlobInfo | None = None) -> None:
    check_header(answer.header, request, total_steps, expect)
    check_data_address(answer, f"entry {request.entry_id}")


_HOST = re.compile(r"[A-Za-z0-9._:\-\[\]]{0,253}")


def check_data_address(answer: pb.FetchTicket | pb.PutTicket, what: str) -> None:
    """A ticket of the right size for a port, and a data_host that is a host name or IP address (or
    empty), not text the daemon made up."""
    if len(answer.ticket) != _TICKET_BYTES or not 1 <= answer.data_port <= 65535:
        raise Malformed(f"{what}: a ticket of {len(answer.ticket)} bytes for data port {answer.data_port}")
    if not _HOST.fullmatch(answer.data_host):
        raise Malformed(f"{what}: data_host {answer.data_host[:80]!r} is not a host name or address")


@dataclass(frozen=True)
class Candidate:
    entry_id: str
    similarity: float
    granted_steps: int
    role: str  # "full", "object" or "background"
    prompt: str
    blob: pb.BlobInfo = field(repr=False)
    object_mask: np.ndarray | None = field(default=None, repr=False)  # bool, as stored with the entry
    writer: str = ""  # the credential that stored the entry ("" from a daemon without auth)

    @classmethod
    def from_proto(cls, c: pb.Candidate, total_steps: int | None = None) -> Candidate:
        """A candidate the client can rely on; Malformed if the daemon's message does not add up: an
        unknown role, a similarity outside [-1, 1], steps that cannot be skipped (none, or not below
        `total_steps`), an intermediate latent offered as a donor or at another step than its own, a
        blob info or mask that does not match itself."""
        entry_id = check_entry_id(c.entry_id, "lookup candidate")
        where = f"lookup candidate {entry_id}"
        role = wire.ROLE_BY_ENUM.get(c.role)
        if role is None:
            raise Malformed(f"{where}: unknown role {c.role}")
        if not -1 - _SIMILARITY_SLACK <= c.similarity <= 1 + _SIMILARITY_SLACK:  # NaN fails too
            raise Malformed(f"{where}: similarity {c.similarity} is not a cosine similarity")
        if c.granted_steps < 1 or (total_steps is not None and c.granted_steps >= total_steps):
            raise Malformed(f"{where}: {c.granted_steps} granted steps of {total_steps}")
        _check_blob(c.blob, total_steps, where)
        if c.blob.step and (role != "full" or c.granted_steps != c.blob.step):
            raise Malformed(f"{where}: an intermediate latent at step {c.blob.step} offered as a {role} "
                            f"match for {c.granted_steps} steps")
        mask = _checked_mask(c.object_mask, where) if c.HasField("object_mask") else None
        return cls(entry_id, float(c.similarity), int(c.granted_steps), role, c.prompt, c.blob, mask, c.writer)


@dataclass(frozen=True)
class LookupResult:
    candidates: list[Candidate]
    miss_reason: str

    @property
    def best(self) -> Candidate | None:
        """The best whole-prompt match, if the prompt matched as a whole."""
        return self.candidates[0] if self.candidates and self.candidates[0].role == "full" else None

    def donors(self, role: str) -> list[Candidate]:
        """Object or background donors of a composed hit, best first."""
        return [c for c in self.candidates if c.role == role]

    @classmethod
    def from_proto(cls, response: pb.LookupResponse, total_steps: int, top_k: int) -> LookupResult:
        """Malformed unless every candidate is (Candidate.from_proto), there are at most top_k per role,
        and they are whole-prompt matches or donors, not both."""
        if len(response.candidates) > 2 * max(1, top_k):
            raise Malformed(f"lookup answered {len(response.candidates)} candidates for top_k {top_k}")
        candidates = [Candidate.from_proto(c, total_steps) for c in response.candidates]
        full = sum(c.role == "full" for c in candidates)
        if full not in (0, len(candidates)) or full > max(1, top_k):
            raise Malformed(f"lookup answered {full} whole-prompt matches among {len(candidates)} candidates")
        return cls(candidates, response.miss_reason)


@dataclass(frozen=True)
class Fetched:
    entry_id: str
    prompt: str
    blob: pb.BlobInfo
    data: bytearray  # the verified blob

    def latent(self, as_torch: bool = False):
        """The stored latent, decoded (raises codec.CodecError for a corrupt or foreign blob)."""
        problem = blob_problem(self.blob)
        if problem is not None:
            raise codec.CodecError(f"entry {self.entry_id}: {problem}")
        if len(self.data) != self.blob.size:
            raise codec.CodecError(f"entry {self.entry_id}: {len(self.data)} bytes, the record says {self.blob.size}")
        shape = tuple(self.blob.shape)
        if self.blob.codec == RAW:
            return tensors.from_bytes(self.data, self.blob.dtype, shape, as_torch=as_torch)
        if self.blob.codec == LATENT_CODEC:
            info = codec.inspect(self.data, verify=False)  # the header only: decode nothing the record denies
            if info.shape != shape or info.dtype != self.blob.dtype:
                raise codec.CodecError(f"entry {self.entry_id}: blob holds {info.dtype} of shape {info.shape}, "
                                       f"record says {self.blob.dtype} of shape {shape}")
            return tensors.from_numpy(codec.decode(self.data), self.blob.dtype, as_torch=as_torch)
        raise codec.CodecError(f"entry {self.entry_id} uses unknown codec {self.blob.codec!r}")

    @property
    def seed(self) -> int | None:
        seed = self.blob.attrs.get("seed")
        return int(seed) if seed is not None and wire.SEED.fullmatch(seed) else None
