"""The cache as a diffusion worker sees it: one surface (`CacheBase`), two backends.

`CacheBase` holds everything that does not depend on how the daemon is reached: encoding latents
through the codec, checking what comes back, choosing and composing donors, rebuilding a clean
latent at the granted step, and the one failure path every call takes (`_call`). A backend supplies
six transport primitives (`_put_blob`, `_lookup`, `_fetch_blob`, `_verify`, `_delete`, `_stats`) and
`close`: `CacheClient` (client.py) over gRPC to a daemon, `LocalCache` (local.py) over a daemon's
cache core in this process.

The contract, for both (README, "Never a dependency"): every public call returns None (a miss) when
the daemon is down, slow or refuses, when its answer is malformed, or when a blob does not decode,
and logs a warning (at most one per method every `warn_every_s` seconds, so a dead daemon does not
flood the worker's log). Nothing raises into the sampling loop except a programming error in the
arguments (TypeError/ValueError before any I/O).

A daemon's answer is checked before the client relies on it: a hostile or buggy daemon can send a
candidate whose mask or blob header does not add up, steps a worker cannot skip, a header for
another entry, a stream longer than it declared. Such an answer is `Malformed`: a miss with a
warning. Sizes are products of Python ints, bounded (MAX_BLOB_BYTES, MAX_MASK_CELLS) before anything
is allocated.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, TypeVar

import crc32c
import grpc
import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from . import codec, compose, masks, tensors
from .retry import Retry

log = logging.getLogger("flexcache.client")

T = TypeVar("T")

RAW, LATENT_CODEC = "raw", "fxlc"  # BlobInfo.codec: plain bytes, or flexcache.client.codec's format
_CODEC_DTYPES = ("float32", "float16", tensors.BF16)
_ITEMSIZE = {np.dtype(t).name: np.dtype(t).itemsize for t in (
    np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble)} | {tensors.BF16: 2}
"""Bytes per value of every dtype a latent may have (tensors.to_numpy's numeric kinds, and bf16)."""

MAX_BLOB_BYTES = 1 << 32
"""The largest blob, and the largest decoded latent, this client stores or accepts: far past any video
latent, and a bound on what a daemon's answer can make the worker allocate."""
MAX_MASK_CELLS = 1 << 24  # as the daemon's limit: a latent-grid mask, far past any video latent's grid
_MAX_NDIM = 16  # the codec's limit
_SIMILARITY_SLACK = 1e-5  # cosine similarity is in [-1, 1]; float32 rounding may step just outside
_TICKET_BYTES = 16  # daemon/dataport.py: TICKET_BYTES
_ENTRY_ID = re.compile(r"[0-9a-f]{64}")
_SEED = re.compile(r"-?[0-9]{1,40}")

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


def verify_blob(entry_id: str, blob: pb.BlobInfo, data: bytearray) -> None:
    """Raise ChecksumMismatch unless `data` is the blob `blob` describes (its CRC-32C, else sha256). The
    bytes are all there: nothing to overlap a helper thread with."""
    verifier = _Crc32c(blob) if blob.HasField("crc32c") else _Digest(blob)
    verifier.update(memoryview(data))
    if not verifier.matches():
        raise ChecksumMismatch(f"entry {entry_id}: checksum mismatch, blob discarded")


def receive_blob(header: pb.FetchHeader, chunks: Iterable[bytes | memoryview]) -> bytearray:
    """The blob `header` declares, from its chunks, verified; a checked header (`check_header`) bounds
    its size. Each chunk is copied once, straight into the result, and checked in place there; a large
    blob without a CRC-32C is hashed on a helper thread while the next chunks arrive (hashlib releases
    the GIL). Raises Malformed (an empty chunk, more or fewer bytes than declared) or ChecksumMismatch."""
    size, entry_id = header.blob.size, header.entry_id
    verifier = _verifier(header.blob)
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
            verifier.update(view[offset:end])  # check the copy in place; the chunk can be freed
            offset = end
        if offset != size:
            raise Malformed(f"entry {entry_id}: the blob ended after {offset} of {size} bytes")
        if not verifier.matches():
            raise ChecksumMismatch(f"entry {entry_id}: checksum mismatch, blob discarded")
    finally:
        verifier.close()
    return data


# ---- what the daemon's answers must satisfy ----
def blob_problem(blob: pb.BlobInfo, total_steps: int | None = None) -> str | None:
    """Why a blob's info cannot be used as it says (None: it can). Sizes are bounded, and checked
    against the shape and dtype for the codecs this client decodes; other codecs are opaque."""
    if not 1 <= blob.size <= MAX_BLOB_BYTES:
        return f"blob size {blob.size} is outside 1..{MAX_BLOB_BYTES}"
    if len(blob.sha256) != 32:
        return f"blob sha256 has {len(blob.sha256)} bytes, not 32"
    shape = list(blob.shape)
    if len(shape) > _MAX_NDIM or min(shape, default=0) < 0:
        return f"blob shape {shape[:_MAX_NDIM + 1]} is not 0 to {_MAX_NDIM} non-negative sizes"
    if total_steps is not None and blob.step >= total_steps:
        return f"blob step {blob.step} is not below total_steps {total_steps}"
    if "seed" in blob.attrs and not _SEED.fullmatch(blob.attrs["seed"]):
        return f"blob seed {blob.attrs['seed'][:50]!r} is not an integer"
    if blob.codec not in (RAW, LATENT_CODEC) or (blob.codec == RAW and not blob.dtype and not shape):
        return None  # opaque bytes: fetchable as they are, never decoded as a latent
    known = _ITEMSIZE if blob.codec == RAW else _CODEC_DTYPES
    if blob.dtype not in known:
        return f"blob dtype {blob.dtype[:50]!r} is not one the {blob.codec!r} codec stores"
    values = math.prod(shape)  # Python ints: no overflow
    if values * _ITEMSIZE[blob.dtype] > MAX_BLOB_BYTES:
        return f"blob shape {shape} of {blob.dtype} holds more than {MAX_BLOB_BYTES} bytes"
    if blob.codec == RAW and values * _ITEMSIZE[blob.dtype] != blob.size:
        return f"blob of {blob.size} bytes cannot hold shape {shape} of {blob.dtype}"
    return None


def _check_blob(blob: pb.BlobInfo, total_steps: int | None, where: str) -> None:
    problem = blob_problem(blob, total_steps)
    if problem is not None:
        raise Malformed(f"{where}: {problem}")


def _checked_mask(mask: pb.Mask, where: str) -> np.ndarray:
    shape = [int(n) for n in mask.shape]
    if not 1 <= len(shape) <= 4 or min(shape) < 1:
        raise Malformed(f"{where}: object mask shape {shape[:5]} is not 1 to 4 positive sizes")
    cells = math.prod(shape)
    if cells > MAX_MASK_CELLS:
        raise Malformed(f"{where}: object mask of shape {shape} has more than {MAX_MASK_CELLS} cells")
    if len(mask.bits) != (cells + 7) // 8:
        raise Malformed(f"{where}: object mask bits are {len(mask.bits)} bytes, shape {shape} needs {(cells + 7) // 8}")
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
    if len(answer.ticket) != _TICKET_BYTES or not 1 <= answer.data_port <= 65535:
        raise Malformed(f"entry {request.entry_id}: a ticket of {len(answer.ticket)} bytes for data port "
                        f"{answer.data_port}")


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
        return cls(entry_id, float(c.similarity), int(c.granted_steps), role, c.prompt, c.blob, mask)


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
        return int(seed) if seed is not None and _SEED.fullmatch(seed) else None


class Rebuild(Protocol):
    """Rebuilds the latent at step k of `total_steps` from a clean latent x0 and the seed of its noise.

    It is the scheduler's forward process (flow matching: (1 - sigma_k) x0 + sigma_k eps; DDPM/DDIM:
    sqrt(abar) x0 + sqrt(1 - abar) eps) with eps regenerated exactly as the worker's sampler draws it
    from the seed; so it belongs to the worker's model, not to the cache.
    """

    def __call__(self, x0: Any, seed: int, k: int, total_steps: int) -> Any: ...


@dataclass(frozen=True)
class Hit:
    """What `get` serves: start sampling from `latent` at step `steps`."""

    latent: Any
    steps: int
    kind: str  # "full": one entry matched the whole prompt; "composed": object and background donors;
    #            "partial": one donor whose object or background alone matched (get(partial_roles=...))
    sources: list[Candidate]


def _status(error: grpc.RpcError) -> grpc.StatusCode:
    """The status of a failed call (UNKNOWN for an RpcError that carries none)."""
    code = getattr(error, "code", None)
    status = code() if callable(code) else None
    return status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _role(name: str) -> int:
    """"object" -> pb.ROLE_OBJECT (ValueError for a name the API does not have)."""
    if name not in wire.ENUM_BY_ROLE:
        raise ValueError(f"role must be one of {', '.join(wire.ROLES)}, got {name!r}")
    return wire.ENUM_BY_ROLE[name]


def _out(latent: np.ndarray, as_torch: bool) -> Any:
    """A composed latent as the caller asked for it: numpy, or a torch tensor."""
    return tensors.from_numpy(np.ascontiguousarray(latent), latent.dtype.name, as_torch)


def _best_pair(objects: list[Candidate], backgrounds: list[Candidate]) -> tuple[Candidate, Candidate] | None:
    """The (object donor, background donor) pair to compose; see compose.py for the rule."""
    scored = []
    for o in objects:
        for b in backgrounds:
            score = compose.pair_score(o.similarity, b.similarity, o.object_mask, b.object_mask)
            if score is not None:
                scored.append((score, o, b))
    if not scored:
        return None
    _, o, b = max(scored, key=lambda item: item[0])
    return o, b


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


class CacheBase(abc.ABC):
    """What a diffusion worker calls: put, lookup, fetch, get, delete, stats, close (or `with`).

    `namespace`: the generation settings every call is made in. `max_rel_error`: the error budget on
    stored latents (relative RMSE, 0 = lossless): float latents are compressed within it before they
    are stored; None stores raw bytes. `timeout_s`: the deadline of a call, its retries included.
    `retry`: when a failed call is tried again (flexcache.client.retry; the default retries once, on
    UNAVAILABLE only, within the deadline; `Retry.none()` never). `warn_every_s`: at most one warning
    per method in that time. After a failure, `last_error` holds what went wrong (a grpc.RpcError, with
    its status code, for a daemon's refusal).
    """

    def __init__(self, namespace: Namespace, *, target: str, max_rel_error: float | None, timeout_s: float,
                 warn_every_s: float, retry: Retry):
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a flexcache.client.Retry, got {type(retry).__name__}")
        self.target = target
        self.namespace = namespace
        self.max_rel_error = max_rel_error
        self.timeout_s = timeout_s
        self.warn_every_s = warn_every_s
        self.retry = retry
        self.last_error: grpc.RpcError | Exception | None = None
        self._last_warning: dict[str, float] = {}
        self._ns = namespace.to_proto()

    # ---- what a backend provides ----
    @abc.abstractmethod
    def _put_blob(self, header: pb.PutHeader, data: bytes | bytearray | memoryview) -> pb.PutResponse | None:
        """Store `data` under `header` (blob info complete); None after a failure `_call` reported."""

    @abc.abstractmethod
    def _lookup(self, request: pb.LookupRequest) -> pb.LookupResponse | None:
        """The daemon's answer, unchecked; None after a reported failure."""

    @abc.abstractmethod
    def _fetch_blob(self, request: pb.FetchRequest, expect: pb.BlobInfo | None) -> Fetched | None:
        """The entry, its header checked (`check_header`) and its bytes verified; None after a reported
        failure. Raises ChecksumMismatch for bytes that fail their checksum on every path it tried."""

    @abc.abstractmethod
    def _verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse | None: ...

    @abc.abstractmethod
    def _delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse | None: ...

    @abc.abstractmethod
    def _stats(self) -> pb.StatsResponse | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the one failure path ----
    def _call(self, method: str, invoke: Callable[[float], T], *, timeout_s: float,
              passthrough: Collection[grpc.StatusCode] = ()) -> T | None:
        """Run one call of the daemon's API: `invoke(seconds left)` makes one attempt and returns the
        answer, or raises grpc.RpcError (a status) or Malformed (an answer the client cannot use).

        The deadline is `timeout_s` from now for all attempts together; a failed attempt is retried as
        `self.retry` allows, within what is left of it. A status in `passthrough` is not a failure: it
        is raised for the caller, who handles it. Any other failure is reported once, whatever the
        number of attempts (`_failed`: `last_error` and one rate-limited warning), and is None."""
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while True:
            attempts += 1
            try:
                return invoke(max(0.0, deadline - time.monotonic()))
            except grpc.RpcError as exc:
                code = _status(exc)
                if code in passthrough:
                    raise
                pause = self.retry.pause_before_retry(code, attempts, deadline - time.monotonic())
                if pause is None:
                    self._failed(method, exc)
                    return None
                time.sleep(pause)
            except Malformed as exc:
                self._failed(method, exc)
                return None

    def _failed(self, method: str, error: Exception) -> None:
        """Record and (rate-limited) log a failure that the caller sees as a miss."""
        self.last_error = error
        now = time.monotonic()
        if now - self._last_warning.get(method, -1e9) >= self.warn_every_s:
            self._last_warning[method] = now
            detail = (f"{_status(error).name}: {error.details()}" if isinstance(error, grpc.RpcError)
                      and callable(getattr(error, "details", None)) else str(error))
            log.warning("flexcache %s at %s failed (treated as a miss): %s", method, self.target, detail)

    # ---- store ----
    def put(self, prompt: str, latent: Any, vector: Any, *, object_vector: Any = None,
            background_vector: Any = None, object_mask: Any = None, seed: int | None = None, step: int = 0,
            step_seconds: float = 0.0, attrs: Mapping[str, str] | None = None) -> str | None:
        """Store a latent (numpy or torch); returns the entry id, or None on failure.

        Store the clean latent x0 (step 0) with the `seed` of its initial noise, so that a hit can be
        rebuilt at any step; or, NIRVANA-style, an intermediate latent with its `step`. Float latents
        are compressed within the client's error budget. `object_vector`/`background_vector`
        (embeddings of the prompt's two parts) and `object_mask` (bool, on the latent grid) make the
        entry usable as an object or background donor; without a mask, an entry with an object vector
        gets one estimated from the latent (flexcache.client.masks)."""
        array, dtype = tensors.to_numpy(latent)
        if object_mask is None and object_vector is not None and array.ndim == 4 and dtype in _CODEC_DTYPES:
            object_mask = masks.estimate_object_mask(tensors.from_numpy(array, dtype))
        attrs = dict(attrs or {})
        if seed is not None:
            attrs["seed"] = str(int(seed))
        info = pb.BlobInfo(codec=RAW, dtype=dtype, shape=array.shape, step=step, attrs=attrs)
        if self.max_rel_error is not None and dtype in _CODEC_DTYPES and array.ndim >= 1:
            try:
                data = codec.encode(array, max_rel_error=self.max_rel_error, dtype=dtype)
            except codec.CodecError as exc:  # e.g. NaN in the latent: nothing worth caching
                self._failed("put", exc)
                return None
            info.codec = LATENT_CODEC
        else:
            data = array.tobytes()
        return self.put_blob(prompt, data, info, vector, object_vector=object_vector,
                             background_vector=background_vector, object_mask=object_mask,
                             step_seconds=step_seconds)

    def put_blob(self, prompt: str, data: bytes, info: pb.BlobInfo, vector: Any, *, object_vector: Any = None,
                 background_vector: Any = None, object_mask: Any = None, step_seconds: float = 0.0) -> str | None:
        """Store an already-encoded blob; `info` says how to decode it (size and checksums are filled in).
        A blob info that contradicts itself (a "raw" blob whose size is not its shape's, a dtype its codec
        does not store, more than MAX_BLOB_BYTES) is a ValueError: no daemon's answer could use it."""
        blob = pb.BlobInfo()
        blob.CopyFrom(info)
        blob.size = len(data)
        blob.sha256 = hashlib.sha256(data).digest()
        blob.crc32c = crc32c.crc32c(data)
        problem = blob_problem(blob)
        if problem is not None:
            raise ValueError(f"put_blob: {problem}")
        header = pb.PutHeader(namespace=self._ns, prompt=prompt, blob=blob, step_seconds=step_seconds,
                              vectors=_vectors(vector, object_vector, background_vector))
        if object_mask is not None:
            shape, bits = tensors.pack_mask(object_mask)
            header.object_mask.CopyFrom(pb.Mask(shape=shape, bits=bits))
        answer = self._put_blob(header, data)
        return self._checked("put", answer, lambda a: check_entry_id(a.entry_id, "put"))

    def _checked(self, method: str, answer: Any, use: Callable[[Any], T]) -> T | None:
        """`use(answer)`, or None: no answer (a failure already reported), or a Malformed one."""
        if answer is None:
            return None
        try:
            return use(answer)
        except Malformed as exc:
            self._failed(method, exc)
            return None

    # ---- find ----
    def lookup(self, vector: Any, *, object_vector: Any = None, background_vector: Any = None,
               top_k: int = 1, partial_roles: Sequence[str] = ()) -> LookupResult | None:
        """Similar earlier entries with the steps each lets the worker skip; None if the daemon failed.
        `partial_roles` ("object", "background"): parts whose donors may answer alone (a partial hit)."""
        request = pb.LookupRequest(namespace=self._ns, vectors=_vectors(vector, object_vector, background_vector),
                                   top_k=top_k, partial_roles=[_role(r) for r in partial_roles])
        answer = self._lookup(request)
        return self._checked("lookup", answer,
                             lambda a: LookupResult.from_proto(a, self.namespace.total_steps, top_k))

    def fetch(self, entry_id: str, *, role: str = "full", granted_steps: int = 0) -> Fetched | None:
        """Fetch an entry's blob and verify its checksum. `role` and `granted_steps` say how the worker
        uses it (they credit the entry in the replacement policy, once however the bytes travel); leave
        granted_steps 0 to only read. Bytes that fail their checksum are a miss, and the daemon is asked
        to check the entry (Verify: it deletes a corrupt one)."""
        request = pb.FetchRequest(namespace=self._ns, entry_id=entry_id, granted_steps=granted_steps,
                                  role=_role(role))
        return self._fetch(request)

    def _fetch(self, request: pb.FetchRequest, expect: pb.BlobInfo | None = None) -> Fetched | None:
        try:
            return self._fetch_blob(request, expect)
        except ChecksumMismatch as exc:  # on every path: most likely the stored bytes themselves
            self._failed("fetch", exc)
            self._report_corrupt(request.entry_id)
            return None

    def _report_corrupt(self, entry_id: str) -> None:
        """Ask the daemon to check an entry whose bytes failed their checksum; it deletes it if the
        stored bytes are corrupt, so later lookups stop offering it."""
        answer = self._verify(pb.VerifyRequest(namespace=self._ns, entry_id=entry_id))
        if answer is not None and answer.deleted:
            log.warning("flexcache: the daemon found entry %s corrupt on disk and deleted it", entry_id)

    def get(self, vector: Any, *, object_vector: Any = None, background_vector: Any = None,
            rebuild: Rebuild | None = None, noise_seed: int | None = None, as_torch: bool = False,
            top_k: int = 3, partial_roles: Sequence[str] = ()) -> Hit | None:
        """Lookup, fetch and decode: the latent to start sampling from at step `hit.steps`, or None.

        A whole-prompt match comes first. With `object_vector` and `background_vector`, a prompt that
        matches nothing as a whole may still be served by composing the object of one entry with the
        background of another (see compose.py); with `partial_roles`, also from one entry whose object
        (or background) alone matches (a partial hit, compose.one_part). Off by default; on the
        reference model an object-only start cost more than a composed one and a background-only one
        more still (docs/bench_composed.md), so ("object",) is the measured choice.

        Clean latents are rebuilt at the granted step by `rebuild` (without it, the clean latent itself
        is returned) with the noise of the entry's own seed, or of `noise_seed` when given (the
        request's seed: on the reference model that is at least as good, bench/bench_rebuild.py); an
        intermediate latent is returned as stored."""
        result = self.lookup(vector, object_vector=object_vector, background_vector=background_vector, top_k=top_k,
                             partial_roles=partial_roles)
        if result is None:
            return None
        try:
            if result.best is not None:
                latent = self._fetch_at_step(result.best, rebuild, noise_seed, as_torch)
                return None if latent is None else Hit(latent, result.best.granted_steps, "full", [result.best])
            objects, backgrounds = result.donors("object"), result.donors("background")
            if not (objects and backgrounds):
                return self._partial(objects or backgrounds, rebuild, noise_seed, as_torch)
            pair = _best_pair(objects, backgrounds)
            if pair is None:
                return None
            obj, bg = pair
            latents = [self._fetch_at_step(c, rebuild, noise_seed, as_torch=False) for c in pair]
            if latents[0] is None or latents[1] is None:
                return None
            latent, _ = compose.compose(np.asarray(latents[0]), np.asarray(latents[1]), obj.object_mask,
                                        bg.object_mask)
            return Hit(_out(latent, as_torch), obj.granted_steps, "composed", [obj, bg])
        except (codec.CodecError, ValueError) as exc:
            self._failed("decode", exc)
            return None

    def _partial(self, donors: list[Candidate], rebuild: Rebuild | None, noise_seed: int | None,
                 as_torch: bool) -> Hit | None:
        """A start from the best donor of the one part that matched: its other part flattened before
        the rebuild, so the donor's mismatched object or scene does not carry into step K. Donors are
        clean latents (LookupResult.from_proto checks it)."""
        donor = next((c for c in donors if c.object_mask is not None), None)  # the mask says which cells to keep
        if donor is None:
            return None
        fetched = self._fetch_candidate(donor)
        if fetched is None:
            return None
        latent = compose.one_part(np.asarray(fetched.latent()), donor.object_mask, donor.role)
        latent = np.asarray(self._rebuild(latent, fetched, donor, rebuild, noise_seed))
        return Hit(_out(latent, as_torch), donor.granted_steps, "partial", [donor])

    def _fetch_candidate(self, candidate: Candidate) -> Fetched | None:
        request = pb.FetchRequest(namespace=self._ns, entry_id=candidate.entry_id,
                                  granted_steps=candidate.granted_steps, role=_role(candidate.role))
        return self._fetch(request, expect=candidate.blob)

    def _fetch_at_step(self, candidate: Candidate, rebuild: Rebuild | None, noise_seed: int | None,
                       as_torch: bool) -> Any:
        fetched = self._fetch_candidate(candidate)
        if fetched is None:
            return None
        latent = fetched.latent(as_torch=as_torch)
        if fetched.blob.step != 0:  # an intermediate latent is already at its step
            return latent
        return self._rebuild(latent, fetched, candidate, rebuild, noise_seed)

    def _rebuild(self, clean: Any, fetched: Fetched, candidate: Candidate, rebuild: Rebuild | None,
                 noise_seed: int | None) -> Any:
        """x_K from a clean latent, with the request's noise seed or else the entry's own."""
        if rebuild is None:
            return clean
        seed = fetched.seed if noise_seed is None else noise_seed
        if seed is None:
            raise ValueError(f"entry {candidate.entry_id} has no seed to rebuild its noise from")
        return rebuild(clean, seed, candidate.granted_steps, self.namespace.total_steps)

    # ---- admin ----
    def delete(self, entry_id: str) -> bool | None:
        """True if the entry was deleted, False if this namespace has no such entry, None on failure."""
        answer = self._delete(pb.DeleteRequest(namespace=self._ns, entry_id=entry_id))
        return None if answer is None else answer.deleted

    def stats(self) -> pb.StatsResponse | None:
        """The daemon's totals and per-namespace figures (all namespaces), or None on failure."""
        return self._stats()
