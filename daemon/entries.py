"""What the daemon knows about an entry besides its blob: identity, namespace, usage.

An entry's durable record is the `PutHeader` it was stored with (namespace, prompt, vectors, blob
info), serialized deterministically; its usage (hits, steps saved, credit) is a separate small record
that changes on every fetch. Both are plain data so that the store, the eviction policies and the
server can share them without reaching into each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass, field

import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from .errors import InvalidRequest


@dataclass(frozen=True)
class NamespaceKey:
    """A namespace in canonical form: `name` for people and metrics, `key` for storage and filters."""

    name: str
    key: str

    @classmethod
    def of(cls, ns: pb.Namespace) -> NamespaceKey:
        if not ns.tenant or not ns.model:
            raise InvalidRequest("namespace is required: tenant and model must be set")
        if not ns.scheduler:
            raise InvalidRequest("namespace.scheduler must be set (e.g. 'flow' or 'ddim')")
        if ns.total_steps < 1:
            raise InvalidRequest("namespace.total_steps must be at least 1")
        parts = (ns.tenant, ns.model, f"{ns.width}x{ns.height}x{ns.frames}", ns.scheduler, str(ns.total_steps))
        name = "/".join(parts)
        # Length-prefixed fields so that no two namespaces share an encoding, whatever their text.
        canonical = b"".join(struct.pack(">I", len(p.encode())) + p.encode() for p in parts)
        return cls(name=name, key=hashlib.sha256(b"flexcache.ns.v1\0" + canonical).hexdigest()[:32])


def entry_id(ns: NamespaceKey, prompt: str, blob: pb.BlobInfo, writer: str = "") -> str:
    """Content address of an entry: the same latent put twice for the same prompt is one entry. With
    auth on, the writer (PutHeader.writer) is part of it: two credentials storing the same content
    make two entries, so no writer can pre-empt another's entry (which, stored first under a
    hostile writer, a lookup restricted to trusted writers would then skip)."""
    digest = hashlib.sha256(b"flexcache.entry.v1\0")
    parts = [ns.key.encode(), prompt.encode(), blob.SerializeToString(deterministic=True)]
    if writer:  # entries stored without auth keep the ids they always had
        parts.append(writer.encode())
    for part in parts:
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    return digest.hexdigest()


_VECTORS_FORMAT = struct.Struct("<B3I")  # version, then the sizes of the full, object and background vectors


def split_record(header: pb.PutHeader) -> tuple[pb.PutHeader, bytes]:
    """What the store keeps of a Put header: the header without its vectors, and the vectors packed.

    The vectors are only read again to rebuild the index, so they are kept as unit-length float16,
    half the bytes of the request's float32: an entry's vectors are a fixed cost beside its latent,
    and on a small latent they outweigh it (measured in docs/bench_serving.md). Cosine similarity is
    unchanged by the scaling, and float16 rounding moves it by less than 1e-5 (tests/test_entries.py)."""
    parts = []
    for values in (header.vectors.full, header.vectors.object, header.vectors.background):
        v = np.asarray(values, dtype=np.float64)
        norm = float(np.linalg.norm(v)) if v.size else 0.0
        parts.append((v / norm if norm > 0 else v).astype("<f2"))
    packed = _VECTORS_FORMAT.pack(1, *(p.size for p in parts)) + b"".join(p.tobytes() for p in parts)
    return _without_vectors(header), packed


def _without_vectors(header: pb.PutHeader) -> pb.PutHeader:
    record = pb.PutHeader()
    record.CopyFrom(header)
    record.ClearField("vectors")
    return record


def unpack_vectors(data: bytes) -> pb.Vectors:
    version, *sizes = _VECTORS_FORMAT.unpack_from(data)
    if version != 1 or len(data) != _VECTORS_FORMAT.size + 2 * sum(sizes):
        raise ValueError(f"stored vectors: unknown format (version {version}, {len(data)} bytes)")
    values = np.frombuffer(data, "<f2", offset=_VECTORS_FORMAT.size).astype(np.float32)
    full, obj, background = np.split(values, np.cumsum(sizes)[:2])
    return pb.Vectors(full=full.tolist(), object=obj.tolist(), background=background.tolist())


def record_size(header: pb.PutHeader) -> int:
    """Bytes an entry costs in the budget: its blob, its record and its vectors, as the store keeps them
    (split_record's sizes, without packing the vectors)."""
    v = header.vectors
    stored_vectors = _VECTORS_FORMAT.size + 2 * (len(v.full) + len(v.object) + len(v.background))
    return header.blob.size + _without_vectors(header).ByteSize() + stored_vectors


@dataclass
class Usage:
    """How much an entry has been worth. Persisted, so policies can be rebuilt after a restart.

    `log2_credit` is log2 of the entry's decayed credit in steps, measured against the cache's
    turnover clock at 0: credit(clock) = 2 ** (log2_credit - clock / half_life). Every entry decays
    by the same factor, so comparing log2_credit compares current credit without rescoring every
    entry, and the log keeps the numbers finite however long the daemon runs. `credit_clock` is the
    clock at the last credit, so a restarted daemon resumes its clock from the newest one.
    """

    size: int  # blob + record: what the entry costs in the budget
    blob_size: int  # the latent blob alone
    created: float
    last_access: float
    step: int = 0  # the blob's own step K (NIRVANA-style intermediate latent), 0 for x0
    total_steps: int = 1
    step_cost: float = 1.0  # GPU seconds per denoising step of this entry's model
    step_seconds: float = 0.0  # the worker's measured GPU seconds per step (PutHeader.step_seconds); 0: unknown
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(wire.ROLES, 0))
    steps_saved: dict[str, float] = field(default_factory=lambda: dict.fromkeys(wire.ROLES, 0.0))
    log2_credit: float = -math.inf
    credit_clock: float = 0.0

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["log2_credit"] = None if self.log2_credit == -math.inf else self.log2_credit
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Usage:
        data = json.loads(raw)
        data["log2_credit"] = -math.inf if data["log2_credit"] is None else data["log2_credit"]
        return cls(**data)

    def add_credit(self, steps: float, clock: float, half_life: float) -> None:
        """Add `steps` of credit earned at turnover `clock` (log-sum-exp, in base 2)."""
        self.credit_clock = max(self.credit_clock, clock)
        if steps <= 0:
            return
        term = math.log2(steps) + clock / half_life
        high, low = max(self.log2_credit, term), min(self.log2_credit, term)
        self.log2_credit = high + math.log2(1.0 + 2.0 ** (low - high)) if low > -math.inf else high

    def record_hit(self, role: str, steps: int) -> None:
        self.hits[role] += 1
        self.steps_saved[role] += steps
