"""What both sides of the wire must agree on beyond cache.proto: message limits, role names, the
encoding of a FetchResponse chunk frame that the daemon writes by hand and the client reads without
a copy (`encode_chunk` / `decode_chunk`), the data port's frames (HELLO, a put's reply), the rules
for a usable blob info (`blob_problem`) and object mask (`mask_problem`), and how a step table's
fraction becomes K and its tiers travel (`steps_of`, `decimal`, `step_tables` / `step_table_lists`)."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import cache_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name
FETCH_METHOD = f"/{SERVICE_NAME}/Fetch"
DIRECT_PUT_MIN_BYTES = 256 * 1024
"""A client puts blobs at least this large over the data port (PutDirect), smaller ones in one Put
stream: below it, the second connection's round trip costs more than gRPC's framing."""

CHUNK_BYTES = 1 << 20
"""Most blob bytes in one Put or Fetch message; the daemon refuses larger Put chunks."""
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024
"""gRPC message limit on both sides: one chunk plus its framing."""

# ---- the data port (daemon/dataport.py has the protocol) ----
DATA_MAGIC = b"FCD1"
DATA_HELLO = struct.Struct(">4sH")
"""The frame that opens every data-port connection: DATA_MAGIC, then the length of the caller's bearer
token (0 without auth), then the token's UTF-8 bytes."""
MAX_TOKEN_BYTES = 4096
TICKET_BYTES = 16
PUT_REPLY = struct.Struct(">BI")
"""What the daemon writes after a PutDirect transfer's last byte: the gRPC status code's number (0 for
OK), the payload's length, then the payload: a PutResponse for OK, else the error's message (UTF-8)."""


def data_hello(token: str | None) -> bytes:
    """The HELLO frame for a connection whose caller sends `token` (None: no credential)."""
    raw = (token or "").encode()
    return DATA_HELLO.pack(DATA_MAGIC, len(raw)) + raw


ROLES = ("full", "object", "background")
ROLE_BY_ENUM = {pb.ROLE_FULL: "full", pb.ROLE_OBJECT: "object", pb.ROLE_BACKGROUND: "background"}
ENUM_BY_ROLE = {name: enum for enum, name in ROLE_BY_ENUM.items()}

_CHUNK_FIELD = pb.FetchResponse.DESCRIPTOR.fields_by_name["chunk"].number
_CHUNK_TAG = (_CHUNK_FIELD << 3) | 2  # length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(chunk: bytes) -> bytes:
    """A FetchResponse holding only `chunk`, in wire format: exactly what protobuf writes, without
    building a message per chunk (docs/bench_daemon.md measures the difference)."""
    return b"".join((bytes([_CHUNK_TAG]), _varint(len(chunk)), chunk))


def decode_chunk(raw: bytes) -> memoryview | bytes:
    """The blob bytes of one serialized FetchResponse chunk, without copying them.

    Only the exact single-field encoding `encode_chunk` writes takes the fast path; anything else (a
    header, unknown fields) goes through the protobuf parser, which is always right."""
    view = memoryview(raw)
    if len(view) > 1 and view[0] == _CHUNK_TAG:
        length, shift, pos = 0, 0, 1
        while pos < len(view) and shift < 64:
            byte = view[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                if pos + length == len(view):
                    return view[pos:]
                break
    return pb.FetchResponse.FromString(raw).chunk


# ---- the blob info rule ----
RAW, LATENT_CODEC = "raw", "fxlc"
"""BlobInfo.codec: plain bytes, or the client's latent codec (flexcache.client.codec)."""
BF16 = "bfloat16"
CODEC_DTYPES = ("float32", "float16", BF16)
"""The dtypes the latent codec stores."""
ITEMSIZE = {np.dtype(t).name: np.dtype(t).itemsize for t in (
    np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble)} | {BF16: 2}
"""Bytes per value of every dtype a raw latent may have (numpy's numeric kinds, and bf16)."""
MAX_BLOB_BYTES = 1 << 32
"""The largest blob, and the largest decoded latent, a client stores or accepts: far past any video
latent, and a bound on what an answer can make a worker allocate."""
MAX_NDIM = 16
"""Most dimensions of a latent (the codec's limit)."""
SEED = re.compile(r"-?[0-9]{1,40}")
"""What a blob's `seed` attr must look like: an integer."""


def blob_problem(blob: pb.BlobInfo, total_steps: int | None = None) -> str | None:
    """Why a blob info cannot be used as it says (None: it can). One rule for both sides: the daemon
    refuses to store what a client would refuse in an answer, since one such entry would make every
    lookup near it a miss. Sizes are bounded and products are Python ints (no overflow); the shape
    and dtype are checked for the codecs a client decodes, other codecs are opaque bytes."""
    if not 1 <= blob.size <= MAX_BLOB_BYTES:
        return f"blob size {blob.size} is outside 1..{MAX_BLOB_BYTES}"
    if len(blob.sha256) not in (0, 32):
        return f"blob sha256 has {len(blob.sha256)} bytes, not 32"
    if not blob.sha256 and not blob.HasField("crc32c"):
        return "blob has neither a sha256 nor a crc32c: nothing could check its bytes"
    shape = list(blob.shape)
    if len(shape) > MAX_NDIM or min(shape, default=0) < 0:
        return f"blob shape {shape[:MAX_NDIM + 1]} is not 0 to {MAX_NDIM} non-negative sizes"
    if total_steps is not None and blob.step >= total_steps:
        return f"blob step {blob.step} is not below total_steps {total_steps}"
    if "seed" in blob.attrs and not SEED.fullmatch(blob.attrs["seed"]):
        return f"blob seed {blob.attrs['seed'][:50]!r} is not an integer"
    if blob.codec not in (RAW, LATENT_CODEC) or (blob.codec == RAW and not blob.dtype and not shape):
        return None  # opaque bytes: fetchable as they are, never decoded as a latent
    known = ITEMSIZE if blob.codec == RAW else CODEC_DTYPES
    if blob.dtype not in known:
        return f"blob dtype {blob.dtype[:50]!r} is not one the {blob.codec!r} codec stores"
    values = math.prod(shape)
    if values * ITEMSIZE[blob.dtype] > MAX_BLOB_BYTES:
        return f"blob shape {shape} of {blob.dtype} holds more than {MAX_BLOB_BYTES} bytes"
    if blob.codec == RAW and values * ITEMSIZE[blob.dtype] != blob.size:
        return f"blob of {blob.size} bytes cannot hold shape {shape} of {blob.dtype}"
    return None


MAX_MASK_CELLS = 1 << 24
"""Most cells of an object mask on the latent grid: far past any video latent's grid."""


def mask_problem(mask: pb.Mask) -> str | None:
    """Why an object mask cannot be used (None: it can): 1 to 4 positive sizes, at most MAX_MASK_CELLS
    cells counted in Python ints (65536^4 is 0 in int64), and exactly the bytes those cells need."""
    shape = [int(n) for n in mask.shape]
    if not 1 <= len(shape) <= 4 or min(shape) < 1:
        return f"shape {shape[:5]} is not 1 to 4 positive sizes"
    cells = math.prod(shape)
    if cells > MAX_MASK_CELLS:
        return f"has {cells} cells, above {MAX_MASK_CELLS}"
    if len(mask.bits) != (cells + 7) // 8:
        return f"bits are {len(mask.bits)} bytes, shape {shape} needs {(cells + 7) // 8}"
    return None


# ---- step tables (docs/step_tables.md) ----
STEP_TABLES = ("whole", "composed", "partial_object", "partial_background")  # also QualitySample.table


def steps_of(fraction: float, total_steps: int) -> int:
    """K for a fraction of N steps: round(fraction x N), at most N - 1 (a hit leaves a step to run)."""
    return max(0, min(total_steps - 1, round(fraction * total_steps)))


def decimal(value: float) -> float:
    """A float32 off the wire as the decimal it was written as (0.1, not 0.10000000149): what both sides
    hold and compare, so a fraction sent as 0.3 grants what 0.3 of the flags would, and a sample at 0.95
    meets a 0.95 tier."""
    return float(f"{value:.7g}")


def step_tables(whole: Sequence[Sequence[float]], composed: Sequence[Sequence[float]],
                partial_object: Sequence[Sequence[float]], partial_background: Sequence[Sequence[float]],
                max_loss: float) -> pb.StepTables:
    """Tier lists -> the message: (min_similarity, fraction) and, composed, (min_object, min_background, fraction)."""
    def tiers(values: Sequence[Sequence[float]]) -> list[pb.StepTier]:
        return [pb.StepTier(min_similarity=s, fraction=f) for s, f in values]
    return pb.StepTables(whole=tiers(whole), partial_object=tiers(partial_object),
                         partial_background=tiers(partial_background), max_loss=max_loss,
                         composed=[pb.ComposedTier(min_object_similarity=o, min_background_similarity=b, fraction=f)
                                   for o, b, f in composed])


STEP_TABLES_JSON = ("whole", "composed", "partial_object", "partial_background")


def step_tables_json(whole: Sequence[Sequence[float]], composed: Sequence[Sequence[float]],
                     partial_object: Sequence[Sequence[float]], partial_background: Sequence[Sequence[float]],
                     max_loss: float) -> dict[str, object]:
    """Tier lists -> the tables' JSON form: the four lists by name, and max_loss. One form for the
    tables.json flexcache-calibrate writes and the daemon's stored tables."""
    return {"whole": whole, "composed": composed, "partial_object": partial_object,
            "partial_background": partial_background, "max_loss": max_loss}


def step_table_lists_json(data: Mapping[str, object], *, required: bool) -> tuple[tuple, tuple, tuple, tuple, float]:
    """`step_tables_json`'s form -> (whole, composed, partial_object, partial_background, max_loss).
    `required`: every key must be there (KeyError if not); else a missing list is empty, max_loss 0."""
    def value(name: str, default: object) -> Any:
        return data[name] if required else data.get(name) or default
    lists = tuple(tuple(tuple(float(x) for x in tier) for tier in value(name, ())) for name in STEP_TABLES_JSON)
    return (*lists, float(value("max_loss", 0.0)))  # type: ignore[return-value]


def step_table_lists(message: pb.StepTables) -> tuple[tuple, tuple, tuple, tuple, float]:
    """The message -> (whole, composed, partial_object, partial_background, max_loss), numbers as `decimal`s."""
    def tiers(values: Sequence[pb.StepTier]) -> tuple[tuple[float, float], ...]:
        return tuple((decimal(v.min_similarity), decimal(v.fraction)) for v in values)
    composed = tuple((decimal(v.min_object_similarity), decimal(v.min_background_similarity), decimal(v.fraction))
                     for v in message.composed)
    return (tiers(message.whole), composed, tiers(message.partial_object), tiers(message.partial_background),
            decimal(message.max_loss))
