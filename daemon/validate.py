"""Request checks: what a Put header, Lookup, Fetch, Delete or Verify request must satisfy, as domain errors.

Contract: each function takes a protobuf request and returns the values the cache core works with
(a NamespaceKey, a checked entry id, float32 vectors by role), or raises InvalidRequest or TooLarge
(errors.py) with a message that names the offending field. The functions read and write no state:
the one fact about the cache a check needs, the dimension a namespace's first entry fixed, is passed
in. So the cache runs them before it takes its lock or touches storage, and a rejected request has
no effect at all. Checks run in a fixed order (namespace first), so a request with several faults
always gets the same message.

Every size a request declares is bounded, and every product of sizes is computed in Python ints, so
nothing wraps around (a mask of 65536^4 cells is 0 cells in int64 arithmetic, and its empty bits
looked exact). What the daemon stores it returns to every client whose lookup matches it, so one
hostile entry must not be able to make those answers unusable. The bounds (the MAX_* constants) are
far past any video workload; docs/hardening.md has the table and the reasons, and each refusal names
the field, its value and the limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire
from flexcache.v1.wire import blob_problem

from .entries import NamespaceKey, record_size
from .errors import InvalidRequest, TooLarge
from .limits import Limits

MAX_PROMPT_CHARS = 16_384
MAX_MASK_CELLS = wire.MAX_MASK_CELLS
MAX_TOP_K = 64  # candidates per role a lookup returns; a larger top_k is clamped to it
MAX_NAME_CHARS = 256  # namespace.tenant, .model and .scheduler; blob.codec and .dtype
MAX_FRAME_SIZE = 1 << 16  # namespace.width and .height (pixels), namespace.frames
MAX_TOTAL_STEPS = 10_000  # namespace.total_steps (and so blob.step and granted_steps)
MAX_ATTRS = 64  # blob.attrs entries
MAX_ATTR_KEY_CHARS = 256
MAX_ATTR_VALUE_CHARS = 1024
MAX_SHAPE_RANK = 16  # blob.shape sizes: the client codec's own limit
MAX_SHAPE_SIZE = 1 << 31  # each blob.shape size; their product is bounded by max_blob_bytes
MAX_STEP_SECONDS = 3600.0  # step_seconds weights an entry's credit: unbounded, it could make one immortal
PART_ROLES = frozenset({"object", "background"})  # the roles a lookup may accept alone (partial hits)
MAX_PARTIAL_ROLES = len(PART_ROLES)  # partial_roles entries
MAX_WRITERS = 64  # LookupRequest.writers entries
_ENTRY_ID = re.compile(r"[0-9a-f]{64}")
_ROLE_VALUES = frozenset(pb.Role.values())

Namespaced = (pb.PutHeader | pb.LookupRequest | pb.FetchRequest | pb.DeleteRequest | pb.VerifyRequest
              | pb.SetStepTablesRequest | pb.StepTablesRequest | pb.ReportQualityRequest)
Addressed = pb.FetchRequest | pb.DeleteRequest | pb.VerifyRequest  # requests that name one entry


@dataclass(frozen=True)
class LookupQuery:
    """A checked Lookup: what ranking needs, with nothing left to validate."""

    ns: NamespaceKey
    vectors: dict[str, np.ndarray]  # "full" always; "object" and "background" when the request has them
    top_k: int  # 1..MAX_TOP_K
    partial_roles: frozenset[str]  # a subset of PART_ROLES
    total_steps: int
    writers: frozenset[str] = frozenset()  # only entries stored by these writers answer; empty: any


def namespace_of(request: Namespaced) -> NamespaceKey:
    """The request's namespace, required and complete (NamespaceKey.of checks its fields), its names
    and sizes within the limits. The limits are checked here rather than in NamespaceKey.of, which
    also reads stored records: an entry stored before a limit existed must still load."""
    if not request.HasField("namespace"):
        raise InvalidRequest("namespace is required")
    ns = request.namespace
    key = NamespaceKey.of(ns)
    for name in ("tenant", "model", "scheduler"):
        _name(getattr(ns, name), f"namespace.{name}")
    for name in ("width", "height", "frames"):
        if getattr(ns, name) > MAX_FRAME_SIZE:
            raise InvalidRequest(f"namespace.{name} {getattr(ns, name)} is above {MAX_FRAME_SIZE}")
    if ns.total_steps > MAX_TOTAL_STEPS:
        raise InvalidRequest(f"namespace.total_steps {ns.total_steps} is above {MAX_TOTAL_STEPS}")
    return key


def _name(value: str, field: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise InvalidRequest(f"{field} has {len(value)} characters, above {MAX_NAME_CHARS}")


def vectors(msg: pb.Vectors, dim: int | None, max_dim: int) -> dict[str, np.ndarray]:
    """Validated vectors by role; "full" is required, the two parts optional and of full's dimension.
    `dim`: the namespace's dimension, None while the namespace has no entry.

    Each comes back scaled by a power of two so that its largest component is in [0.5, 1). The
    scaling is exact, so the direction, all that cosine similarity sees, is unchanged bit for bit,
    and no index can overflow or underflow computing the norm: a vector of float32 values near 3e38
    (or near 1e-45) has an infinite (or zero) float32 norm, and was stored but never found again."""
    if not msg.full:
        raise InvalidRequest("vectors.full is required")
    full = _vector(msg.full, "full", dim, max_dim)
    out = {"full": full}
    for name in ("object", "background"):
        values = getattr(msg, name)
        if values:
            out[name] = _vector(values, name, full.size, max_dim)
    return out


def _vector(values: Sequence[float], name: str, dim: int | None, max_dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if dim is not None and v.size != dim:
        raise InvalidRequest(f"vectors.{name} has dimension {v.size}, this namespace uses {dim}")
    if v.size > max_dim:
        raise InvalidRequest(f"vectors.{name} has dimension {v.size}, above the limit of {max_dim}")
    if not np.isfinite(v).all():
        raise InvalidRequest(f"vectors.{name} contains NaN or infinite values")
    if not np.any(v):
        raise InvalidRequest(f"vectors.{name} is all zeros, which has no direction to compare")
    _, exponent = np.frexp(np.max(np.abs(v)))
    return np.ldexp(v, -exponent).astype(np.float32)


def new_namespace(ns: NamespaceKey, known: int, limits: Limits) -> None:
    """A Put that would create namespace `ns` while the daemon holds `known` namespaces: refused
    (TooLarge) at max_namespaces, since any client can create namespaces and each costs the daemon
    index shards on disk and, while in use, memory and a thread."""
    if known >= limits.max_namespaces:
        raise TooLarge(f"namespace {ns.name} is new and the daemon already holds {known} namespaces "
                       f"(max_namespaces = {limits.max_namespaces}); put into an existing namespace, or raise "
                       f"max_namespaces")


def put_header(header: pb.PutHeader, dim: int | None, limits: Limits) -> None:
    """Everything a Put header must satisfy besides its namespace (`namespace_of`, checked first),
    so that nothing is received for an entry the cache would refuse to store."""
    if not header.prompt.strip():
        raise InvalidRequest("prompt is empty")
    if len(header.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt has {len(header.prompt)} characters, above {MAX_PROMPT_CHARS}")
    vectors(header.vectors, dim, limits.max_vector_dim)
    blob = header.blob
    if blob.size < 1:
        raise InvalidRequest("blob.size must be at least 1 byte")
    if blob.size > limits.max_blob_bytes:
        raise TooLarge(f"blob of {blob.size} bytes exceeds max_blob_bytes ({limits.max_blob_bytes})")
    blob_fields(blob, limits.max_blob_bytes)
    if record_size(header) > limits.max_bytes * limits.low_watermark:  # eviction could never make room
        raise TooLarge(f"entry of {record_size(header)} bytes cannot fit the cache budget")
    if blob.step >= header.namespace.total_steps:
        raise InvalidRequest(f"blob.step {blob.step} must be below total_steps {header.namespace.total_steps}")
    if not 0 <= header.step_seconds <= MAX_STEP_SECONDS:  # NaN fails both comparisons
        raise InvalidRequest(f"step_seconds must be a number from 0 to {MAX_STEP_SECONDS:g} (GPU seconds per "
                             f"denoising step), got {header.step_seconds:g}")
    if header.HasField("object_mask"):
        mask(header.object_mask)


def blob_fields(blob: pb.BlobInfo, max_blob_bytes: int) -> None:
    """The blob info a client decodes by, which the daemon returns verbatim to every client it serves:
    names, attrs and shape within the limits (at most MAX_SHAPE_RANK sizes, each from 0 to
    MAX_SHAPE_SIZE, and at most one value per byte that max_blob_bytes allows), and nothing the client
    library would refuse in an answer (wire.blob_problem: a "raw" blob whose size is
    not its shape's, a dtype its codec does not store, a seed that is not an integer). The client
    treats a lookup with one such candidate as a miss, so a stored one would turn every lookup it
    matches into a miss; refusing it here keeps the two sides' rules one function."""
    _name(blob.codec, "blob.codec")
    _name(blob.dtype, "blob.dtype")
    if len(blob.attrs) > MAX_ATTRS:
        raise InvalidRequest(f"blob.attrs has {len(blob.attrs)} entries, above {MAX_ATTRS}")
    for key in sorted(blob.attrs):  # sorted: the same request always gets the same message
        if len(key) > MAX_ATTR_KEY_CHARS:
            raise InvalidRequest(f"blob.attrs key of {len(key)} characters ({key[:40]!r}...) is above "
                                 f"{MAX_ATTR_KEY_CHARS}")
        if len(blob.attrs[key]) > MAX_ATTR_VALUE_CHARS:
            raise InvalidRequest(f"blob.attrs[{key!r}] has a value of {len(blob.attrs[key])} characters, above "
                                 f"{MAX_ATTR_VALUE_CHARS}")
    shape = list(blob.shape)
    if len(shape) > MAX_SHAPE_RANK:
        raise InvalidRequest(f"blob.shape has {len(shape)} sizes, above {MAX_SHAPE_RANK}")
    for size in shape:
        if size < 0:
            raise InvalidRequest(f"blob.shape size {size} is negative")
        if size > MAX_SHAPE_SIZE:
            raise InvalidRequest(f"blob.shape size {size} is above {MAX_SHAPE_SIZE}")
    values = math.prod(shape)  # Python ints: no wrap-around
    if values > max_blob_bytes:
        raise InvalidRequest(f"blob.shape {shape} holds {values} values, above max_blob_bytes ({max_blob_bytes}): "
                             "at most one value per byte the daemon may store")
    problem = blob_problem(blob)
    if problem is not None:
        raise InvalidRequest(f"{problem}: no client could use this entry")


def mask(value: pb.Mask) -> None:
    """A bit-packed mask on the latent grid, by the rule both sides apply (wire.mask_problem)."""
    problem = wire.mask_problem(value)
    if problem is not None:
        raise InvalidRequest(f"object_mask {problem}")


def lookup_query(request: pb.LookupRequest, ns: NamespaceKey, dim: int | None, max_dim: int) -> LookupQuery:
    """A Lookup whose namespace `namespace_of` has checked; `dim` as for `vectors`. A top_k above
    MAX_TOP_K is clamped (it is a wish, not a fault), 0 means 1."""
    checked = vectors(request.vectors, dim, max_dim)
    top_k = max(1, min(request.top_k or 1, MAX_TOP_K))
    if len(request.partial_roles) > MAX_PARTIAL_ROLES:
        raise InvalidRequest(f"partial_roles has {len(request.partial_roles)} entries, above {MAX_PARTIAL_ROLES} "
                             "(ROLE_OBJECT and ROLE_BACKGROUND)")
    partial = frozenset(wire.ROLE_BY_ENUM.get(r, "") for r in request.partial_roles)
    if not partial <= PART_ROLES:
        raise InvalidRequest("partial_roles may name ROLE_OBJECT and ROLE_BACKGROUND only")
    if len(request.writers) > MAX_WRITERS:
        raise InvalidRequest(f"writers has {len(request.writers)} entries, above {MAX_WRITERS}")
    for writer in request.writers:
        _name(writer, "writers entry")
    return LookupQuery(ns, checked, top_k, partial, request.namespace.total_steps, frozenset(request.writers))


def fetch_request(request: pb.FetchRequest) -> tuple[NamespaceKey, str, str | None]:
    """The namespace, entry id and role (None: unspecified) a Fetch names, checked."""
    ns, eid = addressed(request)
    if request.role not in _ROLE_VALUES:
        raise InvalidRequest(f"role {request.role} is not a Role (ROLE_UNSPECIFIED, ROLE_FULL, ROLE_OBJECT or "
                             "ROLE_BACKGROUND)")
    if request.granted_steps >= request.namespace.total_steps:
        raise InvalidRequest("granted_steps must be below total_steps")
    return ns, eid, wire.ROLE_BY_ENUM.get(request.role)


def addressed(request: Addressed) -> tuple[NamespaceKey, str]:
    """The namespace and entry id a request names, checked."""
    return namespace_of(request), entry_id(request.entry_id)


def entry_id(value: str) -> str:
    """An entry id as entries.entry_id makes them: 64 lowercase hex characters."""
    if not _ENTRY_ID.fullmatch(value):
        raise InvalidRequest(f"entry_id must be 64 lowercase hex characters, got {value[:80]!r}")
    return value
