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
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c
import grpc
import numpy as np
from google.protobuf.message import DecodeError

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire

from . import codec, compose, dataport, masks, tensors

log = logging.getLogger("flexcache.client")

RAW, LATENT_CODEC = "raw", "fxlc"  # BlobInfo.codec: plain bytes, or flexcache.client.codec's format
_CODEC_DTYPES = ("float32", "float16", tensors.BF16)
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a daemon restart: a worker should see hits again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


# Blobs from this size on are hashed on a helper thread during the receive; below it a thread costs
# more than the overlap gains (sha256 runs at ~1.5 GB/s here: 1 MiB is well under a millisecond).
_THREADED_HASH_BYTES = 2 * wire.CHUNK_BYTES


DATA_PORT_RETRY_S = 60.0  # how long a client streams after failing to reach the data port


class _Digest:
    """sha256 on the calling thread: entries stored without a CRC-32C (by older clients)."""

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
    """CRC-32C, when the entry was stored with one: ~20 GB/s here, inline."""

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


class _Mismatch(ValueError):
    """A fetched blob does not match its checksum."""


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
        """The stored latent, decoded (raises codec.CodecError for a corrupt or foreign blob)."""
        shape = tuple(self.blob.shape)
        if self.blob.codec == RAW:
            return tensors.from_bytes(self.data, self.blob.dtype, shape, as_torch=as_torch)
        if self.blob.codec == LATENT_CODEC:
            array = codec.decode(self.data)
            if array.shape != shape:
                raise codec.CodecError(f"entry {self.entry_id}: blob holds shape {array.shape}, record says {shape}")
            return tensors.from_numpy(array, self.blob.dtype, as_torch=as_torch)
        raise codec.CodecError(f"entry {self.entry_id} uses unknown codec {self.blob.codec!r}")

    @property
    def seed(self) -> int | None:
        return int(self.blob.attrs["seed"]) if "seed" in self.blob.attrs else None


class Rebuild(Protocol):
    """Rebuilds the latent at step k of `total_steps` from a clean latent x0 and the seed of its noise.

    It is the scheduler's forward process (flow matching: (1 - sigma_k) x0 + sigma_k eps; DDPM/DDIM:
    sqrt(abar) x0 + sqrt(1 - abar) eps) with eps regenerated exactly as the worker's sampler draws it
    from the seed; so it belongs to the worker's model, not to the cache.
    """

    def __call__(self, x0: Any, seed: int, k: int, total_steps: int) -> Any: ...


@dataclass(frozen=True)
class Hit:
    """What `CacheClient.get` serves: start sampling from `latent` at step `steps`."""

    latent: Any
    steps: int
    kind: str  # "full": one entry matched the whole prompt; "composed": object and background donors;
    #            "partial": one donor whose object or background alone matched (get(partial_roles=...))
    sources: list[Candidate]


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


class CacheClient:
    def __init__(self, target: str, namespace: Namespace, *, max_rel_error: float | None = codec.DEFAULT_MAX_REL_ERROR,
                 timeout_s: float = 1.0, transfer_timeout_s: float = 30.0, warn_every_s: float = 10.0,
                 data_port: bool = True):
        """`max_rel_error` is the error budget on stored latents (relative RMSE, 0 = lossless): float
        latents are compressed within it before they leave the worker; None stores raw bytes.
        `data_port`: fetch over the daemon's data port (FetchDirect) when it has one; False always
        streams (Fetch)."""
        self.target = target
        self.max_rel_error = max_rel_error
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.warn_every_s = warn_every_s
        self.last_error: grpc.RpcError | Exception | None = None
        self._last_warning: dict[str, float] = {}
        self._ns = namespace.to_proto()
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        # Fetch with chunk messages as raw bytes (see wire.decode_chunk), not parsed protobuf.
        self._fetch_raw = self._channel.unary_stream(
            wire.FETCH_METHOD, request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None)
        host = dataport.data_host(target) if data_port else None
        self._data = dataport.DataConnections(host, timeout_s) if host else None
        self._data_paused_until = 0.0  # after an unreachable data port, fetches stream until then

    def close(self) -> None:
        self._close_data()
        self._channel.close()

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

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
        """Store an already-encoded blob; `info` says how to decode it (size and sha256 are filled in)."""
        blob = pb.BlobInfo()
        blob.CopyFrom(info)
        blob.size = len(data)
        blob.sha256 = hashlib.sha256(data).digest()
        blob.crc32c = crc32c.crc32c(data)
        header = pb.PutHeader(namespace=self._ns, prompt=prompt, blob=blob, step_seconds=step_seconds,
                              vectors=_vectors(vector, object_vector, background_vector))
        if object_mask is not None:
            shape, bits = tensors.pack_mask(object_mask)
            header.object_mask.CopyFrom(pb.Mask(shape=shape, bits=bits))

        def messages() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=header)
            view = memoryview(data)
            for start in range(0, len(view), wire.CHUNK_BYTES):
                yield pb.PutRequest(chunk=bytes(view[start:start + wire.CHUNK_BYTES]))

        try:
            return self._stub.Put(messages(), timeout=self.transfer_timeout_s).entry_id
        except grpc.RpcError as exc:
            self._failed("put", exc)
            return None

    # ---- find ----
    def lookup(self, vector: Any, *, object_vector: Any = None, background_vector: Any = None,
               top_k: int = 1, partial_roles: Sequence[str] = ()) -> LookupResult | None:
        """Similar earlier entries with the steps each lets the worker skip; None if the daemon failed.
        `partial_roles` ("object", "background"): parts whose donors may answer alone (a partial hit)."""
        request = pb.LookupRequest(namespace=self._ns, vectors=_vectors(vector, object_vector, background_vector),
                                   top_k=top_k, partial_roles=[_role(r) for r in partial_roles])
        try:
            response = self._stub.Lookup(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            self._failed("lookup", exc)
            return None
        return LookupResult([Candidate.from_proto(c) for c in response.candidates], response.miss_reason)

    def fetch(self, entry_id: str, *, role: str = "full", granted_steps: int = 0) -> Fetched | None:
        """Fetch an entry's blob and verify its checksum. `role` and `granted_steps` say how the worker
        uses it (they credit the entry in the replacement policy); leave granted_steps 0 to only read.

        The bytes come over the daemon's data port (FetchDirect, client/dataport.py); from a daemon
        without one, or after a transfer that failed, they stream (Fetch)."""
        request = pb.FetchRequest(namespace=self._ns, entry_id=entry_id, granted_steps=granted_steps,
                                  role=_role(role))
        try:
            fetched = self._fetch_direct(request)
            return fetched if fetched is not None else self._fetch_stream(request)
        except _Mismatch as exc:  # on both paths: most likely the stored bytes themselves
            self._failed("fetch", exc)
            self._report_corrupt(entry_id)
            return None
        except (grpc.RpcError, ValueError, StopIteration, DecodeError) as exc:
            self._failed("fetch", exc)
            return None

    def _report_corrupt(self, entry_id: str) -> None:
        """Ask the daemon to check an entry whose bytes failed their checksum; it deletes it if the
        stored bytes are corrupt, so later lookups stop offering it."""
        try:
            answer = self._stub.Verify(pb.VerifyRequest(namespace=self._ns, entry_id=entry_id),
                                       timeout=self.transfer_timeout_s)
        except grpc.RpcError as exc:
            self._failed("verify", exc)
            return
        if answer.deleted:
            log.warning("flexcache: the daemon found entry %s corrupt on disk and deleted it", entry_id)

    def _fetch_direct(self, request: pb.FetchRequest) -> Fetched | None:
        """Through the daemon's data port (client/dataport.py), or None where it does not apply and
        the caller tries the next path: no data port on this daemon or target (then never again), or
        a transfer that failed (an unreachable port: for DATA_PORT_RETRY_S). The entry was credited by
        FetchDirect, so a stream after a failed transfer only reads."""
        conns = self._data
        if conns is None or time.monotonic() < self._data_paused_until:
            return None
        try:
            answer = self._stub.FetchDirect(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                log.info("flexcache: no data port at %s (%s); fetches stream", self.target, exc.details())
                self._close_data()
                return None
            raise
        header = answer.header
        try:
            data = conns.receive(answer.data_port, answer.ticket, header.blob.size, self.transfer_timeout_s)
            verifier = _verifier(header.blob)
            verifier.update(memoryview(data))
            if not verifier.matches():
                raise _Mismatch(f"entry {request.entry_id}: checksum mismatch, blob discarded")
        except (OSError, ValueError) as exc:
            self._failed("fetch over the data port", exc)
            if isinstance(exc, dataport.Unreachable):  # do not pay a connect timeout on every fetch
                self._data_paused_until = time.monotonic() + DATA_PORT_RETRY_S
            request.granted_steps = 0
            return None
        return Fetched(header.entry_id, header.prompt, header.blob, data)

    def _fetch_stream(self, request: pb.FetchRequest) -> Fetched:
        """One Fetch call. Chunks are read as raw bytes and copied once, straight into the result
        (see wire.decode_chunk); a large blob without a CRC-32C is hashed on a helper thread while the next
        chunks arrive (hashlib releases the GIL)."""
        responses = self._fetch_raw(request, timeout=self.transfer_timeout_s)
        header = pb.FetchResponse.FromString(next(responses)).header
        size, entry_id = header.blob.size, request.entry_id
        verifier = _verifier(header.blob)
        try:
            data = bytearray(size)
            view = memoryview(data)
            offset = 0
            for raw in responses:
                chunk = wire.decode_chunk(raw)
                end = offset + len(chunk)
                if end > size:
                    raise ValueError(f"entry {entry_id}: daemon sent more than the declared {size} bytes")
                view[offset:end] = chunk
                verifier.update(view[offset:end])  # check the copy in place; the chunk can be freed
                offset = end
            if offset != size:
                raise ValueError(f"entry {entry_id}: stream ended after {offset} of {size} bytes")
            if not verifier.matches():
                raise _Mismatch(f"entry {entry_id}: checksum mismatch, blob discarded")
        finally:
            verifier.close()
        return Fetched(header.entry_id, header.prompt, header.blob, data)

    def get(self, vector: Any, *, object_vector: Any = None, background_vector: Any = None,
            rebuild: Rebuild | None = None, noise_seed: int | None = None, as_torch: bool = False,
            top_k: int = 3, partial_roles: Sequence[str] = ()) -> Hit | None:
        """Lookup, fetch and decode: the latent to start sampling from at step `hit.steps`, or None.

        A whole-prompt match comes first. With `object_vector` and `background_vector`, a prompt that
        matches nothing as a whole may still be served by composing the object of one entry with the
        background of another (see compose.py); with `partial_roles`, also from one entry whose object
        (or background) alone matches (a partial hit, compose.one_part). Off by default; on the
        reference model an object-only start cost 1.4 points at K = 5 and a background-only one 2.8
        (docs/bench_composed.md), so ("object",) is the measured choice.

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
        the rebuild, so the donor's mismatched object or scene does not carry into step K."""
        donor = next((c for c in donors if c.object_mask is not None), None)  # the mask says which cells to keep
        if donor is None:
            return None
        fetched = self.fetch(donor.entry_id, role=donor.role, granted_steps=donor.granted_steps)
        if fetched is None:
            return None
        if fetched.blob.step != 0:  # the daemon serves clean latents as donors; anything else is not ours to edit
            raise ValueError(f"donor {donor.entry_id} is not a clean latent (step {fetched.blob.step})")
        latent = compose.one_part(np.asarray(fetched.latent()), donor.object_mask, donor.role)
        latent = np.asarray(self._rebuild(latent, fetched, donor, rebuild, noise_seed))
        return Hit(_out(latent, as_torch), donor.granted_steps, "partial", [donor])

    def _fetch_at_step(self, candidate: Candidate, rebuild: Rebuild | None, noise_seed: int | None,
                       as_torch: bool) -> Any:
        fetched = self.fetch(candidate.entry_id, role=candidate.role, granted_steps=candidate.granted_steps)
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

