"""The client shim that runs inside a diffusion worker.

The cache is an accelerator, never a dependency: every public method returns None (a miss) when the
daemon is down, slow, or answers with an error, and logs a warning (at most one per method every
`warn_every_s` seconds, so a dead daemon does not flood the worker's log). Nothing raises into the
sampling loop except a programming error in the arguments (TypeError/ValueError before any I/O).
The gRPC channel reconnects by itself when the daemon comes back; calls never wait for it
(wait_for_ready is off), so a down daemon costs a fast failure, not a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

from . import tensors

log = logging.getLogger("flexcache.client")

CHUNK_BYTES = 1 << 20  # the daemon's per-message limit for blob chunks
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", CHUNK_BYTES + 64 * 1024),
    ("grpc.max_send_message_length", CHUNK_BYTES + 64 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a daemon restart: a worker should see hits again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Namespace:
    """Generation settings whose latents are interchangeable; see proto/flexcache/v1/cache.proto."""

    tenant: str
    model: str
    width: int = 0
    height: int = 0
    frames: int = 0
    scheduler: str = "flow"
    total_steps: int = 50

    def to_proto(self) -> pb.Namespace:
        return pb.Namespace(tenant=self.tenant, model=self.model, width=self.width, height=self.height,
                            frames=self.frames, scheduler=self.scheduler, total_steps=self.total_steps)


@dataclass(frozen=True)
class Candidate:
    entry_id: str
    similarity: float
    granted_steps: int
    role: str  # "full", "object" or "background"
    prompt: str
    blob: pb.BlobInfo = field(repr=False)
    object_mask: np.ndarray | None = field(default=None, repr=False)  # bool, as stored with the entry

    @classmethod
    def from_proto(cls, c: pb.Candidate) -> Candidate:
        role = pb.Role.Name(c.role).removeprefix("ROLE_").lower()
        mask = tensors.unpack_mask(c.object_mask.shape, c.object_mask.bits) if c.HasField("object_mask") else None
        return cls(c.entry_id, c.similarity, c.granted_steps, role, c.prompt, c.blob, mask)


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


@dataclass(frozen=True)
class Fetched:
    entry_id: str
    prompt: str
    blob: pb.BlobInfo
    data: bytearray  # the verified blob

    def latent(self, as_torch: bool = False):
        """The blob as an array, for entries stored with the raw codec."""
        if self.blob.codec != "raw":
            raise ValueError(f"entry {self.entry_id} uses codec {self.blob.codec!r}; decode it with that codec")
        return tensors.from_bytes(self.data, self.blob.dtype, tuple(self.blob.shape), as_torch=as_torch)


def _vector(value: Any, name: str) -> list[float]:
    if value is None:
        return []
    if tensors.is_torch_tensor(value):
        value = value.detach().to("cpu").float().numpy()
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {array.shape}")
    return array.tolist()


def _vectors(full: Any, obj: Any, background: Any) -> pb.Vectors:
    return pb.Vectors(full=_vector(full, "vector"), object=_vector(obj, "object_vector"),
                      background=_vector(background, "background_vector"))


class CacheClient:
    def __init__(self, target: str, namespace: Namespace, *, timeout_s: float = 1.0,
                 transfer_timeout_s: float = 30.0, warn_every_s: float = 10.0):
        self.target = target
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.warn_every_s = warn_every_s
        self.last_error: grpc.RpcError | Exception | None = None
        self._last_warning: dict[str, float] = {}
        self._ns = namespace.to_proto()
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failed(self, method: str, error: Exception) -> None:
        """Record and (rate-limited) log a failure that the caller sees as a miss."""
        self.last_error = error
        now = time.monotonic()
        if now - self._last_warning.get(method, -1e9) >= self.warn_every_s:
            self._last_warning[method] = now
            detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
            log.warning("flexcache %s at %s failed (treated as a miss): %s", method, self.target, detail)

    # ---- store ----
    def put(self, prompt: str, latent: Any, vector: Any, *, object_vector: Any = None,
            background_vector: Any = None, object_mask: Any = None, step: int = 0, step_seconds: float = 0.0,
            attrs: Mapping[str, str] | None = None) -> str | None:
        """Store a latent (numpy or torch) as raw bytes; returns the entry id, or None on failure.

        `object_vector`/`background_vector` (embeddings of the prompt's two parts) and `object_mask`
        (bool, on the latent grid) make the entry usable as an object or background donor."""
        data, dtype, shape = tensors.to_bytes(latent)
        info = pb.BlobInfo(codec="raw", dtype=dtype, shape=shape, step=step, attrs=dict(attrs or {}))
        return self.put_blob(prompt, data, info, vector, object_vector=object_vector,
                             background_vector=background_vector, object_mask=object_mask,
                             step_seconds=step_seconds)

    def put_blob(self, prompt: str, data: bytes, info: pb.BlobInfo, vector: Any, *, object_vector: Any = None,
                 background_vector: Any = None, object_mask: Any = None, step_seconds: float = 0.0) -> str | None:
        """Store an already-encoded blob; `info` says how to decode it (size and sha256 are filled in)."""
        blob = pb.BlobInfo()
        blob.CopyFrom(info)
        blob.size = len(data)
        blob.sha256 = hashlib.sha256(data).digest()
        header = pb.PutHeader(namespace=self._ns, prompt=prompt, blob=blob, step_seconds=step_seconds,
                              vectors=_vectors(vector, object_vector, background_vector))
        if object_mask is not None:
            shape, bits = tensors.pack_mask(object_mask)
            header.object_mask.CopyFrom(pb.Mask(shape=shape, bits=bits))

        def messages() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=header)
            view = memoryview(data)
            for start in range(0, len(view), CHUNK_BYTES):
                yield pb.PutRequest(chunk=bytes(view[start:start + CHUNK_BYTES]))

        try:
            return self._stub.Put(messages(), timeout=self.transfer_timeout_s).entry_id
        except grpc.RpcError as exc:
            self._failed("put", exc)
            return None

    # ---- find ----
    def lookup(self, vector: Any, *, object_vector: Any = None, background_vector: Any = None,
               top_k: int = 1) -> LookupResult | None:
        """Similar earlier entries with the steps each lets the worker skip; None if the daemon failed."""
        request = pb.LookupRequest(namespace=self._ns, vectors=_vectors(vector, object_vector, background_vector),
                                   top_k=top_k)
        try:
            response = self._stub.Lookup(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            self._failed("lookup", exc)
            return None
        return LookupResult([Candidate.from_proto(c) for c in response.candidates], response.miss_reason)

    def fetch(self, entry_id: str, *, role: str = "full", granted_steps: int = 0) -> Fetched | None:
        """Stream an entry's blob and verify its checksum. `role` and `granted_steps` say how the worker
        uses it (they credit the entry in the replacement policy); leave granted_steps 0 to only read."""
        request = pb.FetchRequest(namespace=self._ns, entry_id=entry_id, granted_steps=granted_steps,
                                  role=pb.Role.Value(f"ROLE_{role.upper()}"))
        try:
            responses = self._stub.Fetch(request, timeout=self.transfer_timeout_s)
            header = next(responses).header
            size = header.blob.size
            data = bytearray(size)
            view = memoryview(data)
            digest = hashlib.sha256()
            offset = 0
            for message in responses:
                chunk = message.chunk
                if offset + len(chunk) > size:
                    raise ValueError(f"entry {entry_id}: daemon sent more than the declared {size} bytes")
                view[offset:offset + len(chunk)] = chunk
                digest.update(chunk)
                offset += len(chunk)
            if offset != size:
                raise ValueError(f"entry {entry_id}: stream ended after {offset} of {size} bytes")
            if digest.digest() != header.blob.sha256:
                raise ValueError(f"entry {entry_id}: checksum mismatch, blob discarded")
        except (grpc.RpcError, ValueError, StopIteration) as exc:
            self._failed("fetch", exc)
            return None
        return Fetched(header.entry_id, header.prompt, header.blob, data)

    def get(self, vector: Any, *, as_torch: bool = False) -> tuple[Any, Candidate] | None:
        """Lookup + fetch of the best full-prompt match: (latent, candidate), or None on a miss."""
        result = self.lookup(vector)
        if result is None or result.best is None:
            return None
        best = result.best
        fetched = self.fetch(best.entry_id, role="full", granted_steps=best.granted_steps)
        if fetched is None:
            return None
        return fetched.latent(as_torch=as_torch), best

    # ---- admin ----
    def delete(self, entry_id: str) -> bool | None:
        try:
            return self._stub.Delete(pb.DeleteRequest(namespace=self._ns, entry_id=entry_id),
                                     timeout=self.timeout_s).deleted
        except grpc.RpcError as exc:
            self._failed("delete", exc)
            return None

    def stats(self) -> pb.StatsResponse | None:
        try:
            return self._stub.Stats(pb.StatsRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            self._failed("stats", exc)
            return None

