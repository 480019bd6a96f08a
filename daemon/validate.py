"""Request checks: what a Put header, Lookup, Fetch, Delete or Verify request must satisfy, as domain errors.

Contract: each function takes a protobuf request and returns the values the cache core works with
(a NamespaceKey, a checked entry id, float32 vectors by role), or raises InvalidRequest or TooLarge
(errors.py) with a message that names the offending field. The functions read and write no state:
the one fact about the cache a check needs, the dimension a namespace's first entry fixed, is passed
in. So the cache runs them before it takes its lock or touches storage, and a rejected request has
no effect at all. Checks run in a fixed order (namespace first), so a request with several faults
always gets the same message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from .entries import NamespaceKey, record_size
from .errors import InvalidRequest, TooLarge
from .limits import Limits

MAX_PROMPT_CHARS = 16_384
MAX_MASK_CELLS = 1 << 24  # cells of a latent-grid mask: far past any video latent's grid
MAX_TOP_K = 64  # candidates per role a lookup may ask for
PART_ROLES = frozenset({"object", "background"})  # the roles a lookup may accept alone (partial hits)
_ENTRY_ID = re.compile(r"[0-9a-f]{64}")

Namespaced = pb.PutHeader | pb.LookupRequest | pb.FetchRequest | pb.DeleteRequest | pb.VerifyRequest
Addressed = pb.FetchRequest | pb.DeleteRequest | pb.VerifyRequest  # requests that name one entry


@dataclass(frozen=True)
class LookupQuery:
    """A checked Lookup: what ranking needs, with nothing left to validate."""

    ns: NamespaceKey
    vectors: dict[str, np.ndarray]  # "full" always; "object" and "background" when the request has them
    top_k: int  # 1..MAX_TOP_K
    partial_roles: frozenset[str]  # a subset of PART_ROLES
    total_steps: int


def namespace_of(request: Namespaced) -> NamespaceKey:
    """The request's namespace, required and complete (NamespaceKey.of checks its fields)."""
    if not request.HasField("namespace"):
        raise InvalidRequest("namespace is required")
    return NamespaceKey.of(request.namespace)


def vectors(msg: pb.Vectors, dim: int | None, max_dim: int) -> dict[str, np.ndarray]:
    """Validated vectors by role; "full" is required, the two parts optional and of full's dimension.
    `dim`: the namespace's dimension, None while the namespace has no entry."""
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
    return v


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
    if len(blob.sha256) != 32:
        raise InvalidRequest(f"blob.sha256 must be 32 bytes, got {len(blob.sha256)}")
    if blob.size > limits.max_blob_bytes:
        raise TooLarge(f"blob of {blob.size} bytes exceeds max_blob_bytes ({limits.max_blob_bytes})")
    if record_size(header) > limits.max_bytes * limits.low_watermark:  # eviction could never make room
        raise TooLarge(f"entry of {record_size(header)} bytes cannot fit the cache budget")
    if blob.step >= header.namespace.total_steps:
        raise InvalidRequest(f"blob.step {blob.step} must be below total_steps {header.namespace.total_steps}")
    if header.step_seconds < 0 or header.step_seconds != header.step_seconds:
        raise InvalidRequest("step_seconds must be a non-negative number")
    if header.HasField("object_mask"):
        mask(header.object_mask)


def mask(value: pb.Mask) -> None:
    """A bit-packed mask on the latent grid: 1 to 4 positive sizes, exactly enough bytes for them."""
    if not 1 <= len(value.shape) <= 4 or min(value.shape) < 1:
        raise InvalidRequest(f"object_mask.shape must have 1 to 4 positive sizes, got {list(value.shape)}")
    cells = int(np.prod(np.asarray(value.shape, dtype=np.int64)))
    if cells > MAX_MASK_CELLS:
        raise InvalidRequest(f"object_mask has {cells} cells, above {MAX_MASK_CELLS}")
    if len(value.bits) != (cells + 7) // 8:
        raise InvalidRequest(f"object_mask.bits has {len(value.bits)} bytes, shape {list(value.shape)} needs "
                             f"{(cells + 7) // 8}")


def lookup_query(request: pb.LookupRequest, ns: NamespaceKey, dim: int | None, max_dim: int) -> LookupQuery:
    """A Lookup whose namespace `namespace_of` has checked; `dim` as for `vectors`."""
    checked = vectors(request.vectors, dim, max_dim)
    top_k = max(1, min(request.top_k or 1, MAX_TOP_K))
    partial = frozenset(wire.ROLE_BY_ENUM.get(r, "") for r in request.partial_roles)
    if not partial <= PART_ROLES:
        raise InvalidRequest("partial_roles may name ROLE_OBJECT and ROLE_BACKGROUND only")
    return LookupQuery(ns, checked, top_k, partial, request.namespace.total_steps)


def fetch_request(request: pb.FetchRequest) -> tuple[NamespaceKey, str, str | None]:
    """The namespace, entry id and role (None: unspecified) a Fetch names, checked."""
    ns, eid = addressed(request)
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
