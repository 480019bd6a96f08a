"""The cache as a diffusion worker sees it: one surface (`CacheBase`), two backends.

`CacheBase` holds everything that does not depend on how the daemon is reached: encoding latents
through the codec, checking what comes back, choosing and composing donors, rebuilding a clean
latent at the granted step, and the one failure path every call takes (`_call`). A backend supplies
nine transport primitives (`_put_blob`, `_lookup`, `_fetch_blob`, `_verify`, `_delete`, `_stats`,
`_set_step_tables`, `_get_step_tables`, `_report_quality`) and `close`: `CacheClient` (client.py)
over gRPC to a daemon, `LocalCache` (local.py) over a daemon's cache core in this process.

The contract, for both (README, "Never a dependency"): every public call returns None (a miss) when
the daemon is down, slow or refuses, when its answer is malformed, or when a blob does not decode,
and logs a warning (at most one per method every `warn_every_s` seconds, so a dead daemon does not
flood the worker's log). Nothing raises into the sampling loop except a programming error in the
arguments (TypeError/ValueError before any I/O).

A daemon's answer is checked before the client relies on it (answers.py): a malformed one is a miss
with a warning, as a refused call is.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

import crc32c
import grpc
import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire
from flexcache.v1.wire import CODEC_DTYPES, LATENT_CODEC, RAW, blob_problem

from . import codec, compose, masks, tensors
from .answers import Candidate, ChecksumMismatch, Fetched, LookupResult, Malformed, check_entry_id
from .retry import Retry
from .tables import QualitySample, StepTables

log = logging.getLogger("flexcache.client")

T = TypeVar("T")


@dataclass(frozen=True)
class Namespace:
    """Generation settings whose latents are interchangeable; see proto/flexcache/v1/cache.proto.

    `writers`: only entries stored by these credentials (Candidate.writer, e.g. "token:3f2a9c1b7d4e"
    for the tenant's own workers) answer this client's lookups; empty: any writer of the namespace.
    Not part of the namespace on the wire: it filters what the namespace holds."""

    tenant: str
    model: str
    width: int = 0
    height: int = 0
    frames: int = 0
    scheduler: str = "flow"
    total_steps: int = 50
    writers: tuple[str, ...] = ()

    def to_proto(self) -> pb.Namespace:
        return pb.Namespace(tenant=self.tenant, model=self.model, width=self.width, height=self.height,
                            frames=self.frames, scheduler=self.scheduler, total_steps=self.total_steps)


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


REFUSED_CREDENTIAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _status(error: grpc.RpcError) -> grpc.StatusCode:
    """The status of a failed call (UNKNOWN for an RpcError that carries none)."""
    code = getattr(error, "code", None)
    status = code() if callable(code) else None
    return status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _needs_sha256(error: Exception | None) -> bool:
    """Whether a put was refused for the sha256 it did not carry: a daemon of an earlier release, whose
    words for it are "blob.sha256 must be 32 bytes, got 0"."""
    if not isinstance(error, grpc.RpcError) or _status(error) != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return "sha256 must be 32 bytes" in (details or "")


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
    per method in that time. `put_sha256`: also send each put's sha256, which the daemon then checks
    and its scrubber checks instead of the CRC-32C; off, a put's bytes carry their CRC-32C alone, end to
    end (computed here, checked by the daemon as they arrive and by every fetch), which saves the
    third of an 8 MiB put's time that sha256 takes on each side (docs/hardening.md, "Checksums").
    A daemon of an earlier release, which requires sha256, gets it from then on (the put it refused
    is tried once more, with a deadline of its own). After a failure,
    `last_error` holds what went wrong (a grpc.RpcError, with its status code, for a daemon's refusal).
    """

    def __init__(self, namespace: Namespace, *, target: str, max_rel_error: float | None, timeout_s: float,
                 warn_every_s: float, retry: Retry, put_sha256: bool = False):
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a flexcache.client.Retry, got {type(retry).__name__}")
        self.target = target
        self.namespace = namespace
        self.max_rel_error = max_rel_error
        self.timeout_s = timeout_s
        self.warn_every_s = warn_every_s
        self.retry = retry
        self.put_sha256 = put_sha256
        self.last_error: grpc.RpcError | Exception | None = None
        self._this_thread = threading.local()  # .error: this thread's last failure (last_error is everyone's)
        self._last_warning: dict[str, float] = {}
        self._credential_refused = False  # told once that the daemon refuses this client's credential
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
    def _set_step_tables(self, request: pb.SetStepTablesRequest) -> pb.StepTablesResponse | None: ...

    @abc.abstractmethod
    def _get_step_tables(self, request: pb.StepTablesRequest) -> pb.StepTablesResponse | None: ...

    @abc.abstractmethod
    def _report_quality(self, request: pb.ReportQualityRequest) -> pb.ReportQualityResponse | None: ...

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
        """Record and (rate-limited) log a failure that the caller sees as a miss. A refused credential
        is told once, in its own words, whatever the method: it will not fix itself."""
        self.last_error = self._this_thread.error = error
        if isinstance(error, grpc.RpcError) and _status(error) in REFUSED_CREDENTIAL:
            if not self._credential_refused:
                self._credential_refused = True
                log.warning("flexcache: the daemon at %s refused this client's credential (%s: %s); every call "
                            "is a miss until the token or certificate is fixed (this warning is not repeated)",
                            self.target, _status(error).name, error.details() if callable(getattr(
                                error, "details", None)) else error)
            return
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
        if object_mask is None and object_vector is not None and array.ndim == 4 and dtype in CODEC_DTYPES:
            object_mask = masks.estimate_object_mask(tensors.from_numpy(array, dtype))
        attrs = dict(attrs or {})
        if seed is not None:
            attrs["seed"] = str(int(seed))
        info = pb.BlobInfo(codec=RAW, dtype=dtype, shape=array.shape, step=step, attrs=attrs)
        if self.max_rel_error is not None and dtype in CODEC_DTYPES and array.ndim >= 1:
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
        blob.ClearField("sha256")
        if self.put_sha256:
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
        self._this_thread.error = None
        answer = self._put_blob(header, data)
        if answer is None and not header.blob.sha256 and _needs_sha256(self._this_thread.error):
            log.warning("flexcache: the daemon at %s requires each put's sha256 (an earlier release); this client "
                        "sends it from now on", self.target)
            self.put_sha256 = True
            header.blob.sha256 = hashlib.sha256(data).digest()
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
                                   top_k=top_k, partial_roles=[_role(r) for r in partial_roles],
                                   writers=self.namespace.writers)
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

    # ---- step tables and quality reports (docs/step_tables.md) ----
    def step_tables(self) -> StepTables | None:
        """This namespace's effective step tables, where they come from and the quality guard's figures;
        None on failure."""
        answer = self._get_step_tables(pb.StepTablesRequest(namespace=self._ns))
        return None if answer is None else StepTables.from_proto(answer)

    def set_step_tables(self, tables: StepTables) -> StepTables | None:
        """Set this namespace's own tables (an admin's credential only: PERMISSION_DENIED, a None, for
        any other); empty composed or partial lists are derived from `tables.whole`. The effective
        tables, or None on failure (tables the daemon refuses: INVALID_ARGUMENT, in `last_error`)."""
        answer = self._set_step_tables(pb.SetStepTablesRequest(namespace=self._ns, tables=tables.to_proto()))
        return None if answer is None else StepTables.from_proto(answer)

    def reset_step_tables(self) -> StepTables | None:
        """Drop this namespace's own tables (an admin's call): back to the daemon's flags. The effective
        tables, or None on failure."""
        answer = self._set_step_tables(pb.SetStepTablesRequest(namespace=self._ns, reset=True))
        return None if answer is None else StepTables.from_proto(answer)

    def report_quality(self, samples: Sequence[QualitySample]) -> int | None:
        """Report hits' paired quality losses to the daemon's guard (at most 1,024 a call): how many it
        took (the rest were stale: granted steps the tier no longer grants), or None on failure."""
        answer = self._report_quality(pb.ReportQualityRequest(namespace=self._ns,
                                                              samples=[s.to_proto() for s in samples]))
        return None if answer is None else answer.accepted
