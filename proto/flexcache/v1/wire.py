"""What both sides of the wire must agree on beyond cache.proto: message limits, role names, and
the encoding of a FetchResponse chunk frame that the daemon writes by hand and the client reads
without a copy (`encode_chunk` / `decode_chunk`)."""

from __future__ import annotations

from . import cache_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name
FETCH_METHOD = f"/{SERVICE_NAME}/Fetch"

CHUNK_BYTES = 1 << 20
"""Most blob bytes in one Put or Fetch message; the daemon refuses larger Put chunks."""
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024
"""gRPC message limit on both sides: one chunk plus its framing."""

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
