"""Bad input gets a precise status and message, stores nothing, and the daemon keeps serving."""

from __future__ import annotations

import hashlib

import crc32c
import grpc
import numpy as np
import pytest

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire
from tests.conftest import NS
from tests.vectors import unit

BLOB = np.arange(3 << 19, dtype=np.uint8).tobytes()  # 1.5 MiB: two chunks
GOOD_NS = NS.to_proto()


def header(**overrides) -> pb.PutHeader:
    fields = {
        "namespace": GOOD_NS,
        "prompt": "a corgi on a beach",
        "vectors": pb.Vectors(full=unit(1).tolist()),
        "blob": pb.BlobInfo(size=len(BLOB), sha256=hashlib.sha256(BLOB).digest(), codec="raw", dtype="uint8",
                            shape=[len(BLOB)]),
    }
    fields.update(overrides)
    return pb.PutHeader(**fields)


def chunks(data: bytes = BLOB, size: int = 1 << 20) -> list[pb.PutRequest]:
    return [pb.PutRequest(chunk=data[i:i + size]) for i in range(0, len(data), size)]


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(daemon.target, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        yield pb_grpc.CacheServiceStub(channel)


def put(stub, messages) -> pb.PutResponse:
    return stub.Put(iter(messages), timeout=10)


def expect(code: grpc.StatusCode, fragment: str, call) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()


def assert_nothing_stored_and_serving(stub) -> None:
    assert stub.Stats(pb.StatsRequest(), timeout=5).entries == 0
    response = put(stub, [pb.PutRequest(header=header()), *chunks()])  # a good put still works
    assert response.created


BAD_PUTS = {
    "missing namespace": (lambda: [pb.PutRequest(header=header(namespace=None)), *chunks()],
                          grpc.StatusCode.INVALID_ARGUMENT, "namespace is required"),
    "namespace without tenant": (
        lambda: [pb.PutRequest(header=header(namespace=pb.Namespace(model="m", scheduler="flow", total_steps=50))),
                 *chunks()], grpc.StatusCode.INVALID_ARGUMENT, "tenant and model must be set"),
    "empty prompt": (lambda: [pb.PutRequest(header=header(prompt="   ")), *chunks()],
                     grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    "no vector": (lambda: [pb.PutRequest(header=header(vectors=pb.Vectors())), *chunks()],
                  grpc.StatusCode.INVALID_ARGUMENT, "vectors.full is required"),
    "NaN vector": (lambda: [pb.PutRequest(header=header(vectors=pb.Vectors(full=[float("nan")] * 384))), *chunks()],
                   grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "zero vector": (lambda: [pb.PutRequest(header=header(vectors=pb.Vectors(full=[0.0] * 384))), *chunks()],
                    grpc.StatusCode.INVALID_ARGUMENT, "all zeros"),
    "object vector of another size": (
        lambda: [pb.PutRequest(header=header(vectors=pb.Vectors(full=unit(1).tolist(), object=[1.0] * 10))),
                 *chunks()], grpc.StatusCode.INVALID_ARGUMENT, "vectors.object has dimension 10"),
    "header missing": (lambda: chunks(), grpc.StatusCode.INVALID_ARGUMENT, "first Put message must be a header"),
    "empty stream": (lambda: [], grpc.StatusCode.INVALID_ARGUMENT, "first Put message must be a header"),
    "second header": (lambda: [pb.PutRequest(header=header()), pb.PutRequest(header=header())],
                      grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow"),
    "truncated stream": (lambda: [pb.PutRequest(header=header()), *chunks()[:1]],
                         grpc.StatusCode.INVALID_ARGUMENT, "stream ended after 1048576 of 1572864"),
    "more bytes than declared": (lambda: [pb.PutRequest(header=header()), *chunks(BLOB + b"x")],
                                 grpc.StatusCode.INVALID_ARGUMENT, "more than the declared"),
    "checksum mismatch": (lambda: [pb.PutRequest(header=header()), *chunks(BLOB[:-1] + b"\x00")],
                          grpc.StatusCode.DATA_LOSS, "checksum mismatch"),
    "crc32c mismatch": (lambda: [pb.PutRequest(header=header(blob=pb.BlobInfo(
                            size=len(BLOB), sha256=hashlib.sha256(BLOB).digest(), crc32c=crc32c.crc32c(BLOB) ^ 1))),
                            *chunks()], grpc.StatusCode.DATA_LOSS, "declared crc32c"),
    "short checksum": (lambda: [pb.PutRequest(header=header(blob=pb.BlobInfo(size=len(BLOB), sha256=b"abc"))),
                                *chunks()], grpc.StatusCode.INVALID_ARGUMENT, "sha256 has 3 bytes, not 32"),
    "no checksum": (lambda: [pb.PutRequest(header=header(blob=pb.BlobInfo(size=len(BLOB)))), *chunks()],
                    grpc.StatusCode.INVALID_ARGUMENT, "neither a sha256 nor a crc32c"),
    "chunk over 1 MiB": (lambda: [pb.PutRequest(header=header()), *chunks(size=(1 << 20) + 1)],
                         grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 1 MiB chunk limit"),
    "oversized message": (lambda: [pb.PutRequest(header=header()), pb.PutRequest(chunk=BLOB + BLOB)],
                          grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "step not below total": (lambda: [pb.PutRequest(header=header(blob=pb.BlobInfo(size=1, sha256=b"0" * 32,
                                                                                   step=50))), *chunks()],
                             grpc.StatusCode.INVALID_ARGUMENT, "blob.step 50 must be below total_steps 50"),
}


@pytest.mark.parametrize("case", list(BAD_PUTS))
def test_bad_put(stub, case: str) -> None:
    messages, code, fragment = BAD_PUTS[case]
    expect(code, fragment, lambda: put(stub, messages()))
    assert_nothing_stored_and_serving(stub)


def test_wrong_dimension_after_namespace_fixed_it(stub) -> None:
    put(stub, [pb.PutRequest(header=header()), *chunks()])
    expect(grpc.StatusCode.INVALID_ARGUMENT, "dimension 512, this namespace uses 384",
           lambda: put(stub, [pb.PutRequest(header=header(prompt="x", vectors=pb.Vectors(full=[1.0] * 512))),
                              *chunks()]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "dimension 128, this namespace uses 384",
           lambda: stub.Lookup(pb.LookupRequest(namespace=GOOD_NS, vectors=pb.Vectors(full=[1.0] * 128)), timeout=5))
    assert stub.Stats(pb.StatsRequest(), timeout=5).entries == 1


def test_blob_over_budget(start_daemon) -> None:
    daemon = start_daemon(max_bytes="1MiB", max_blob_bytes="1GiB")
    with grpc.insecure_channel(daemon.target) as channel:
        s = pb_grpc.CacheServiceStub(channel)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "cannot fit the cache budget",
               lambda: put(s, [pb.PutRequest(header=header()), *chunks()]))
    daemon2 = start_daemon("other", max_blob_bytes="1MiB")
    with grpc.insecure_channel(daemon2.target) as channel:
        s = pb_grpc.CacheServiceStub(channel)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds max_blob_bytes",
               lambda: put(s, [pb.PutRequest(header=header()), *chunks()]))


def test_bad_lookup_fetch_delete(stub) -> None:
    expect(grpc.StatusCode.INVALID_ARGUMENT, "namespace is required",
           lambda: stub.Lookup(pb.LookupRequest(vectors=pb.Vectors(full=[1.0])), timeout=5))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "NaN",
           lambda: stub.Lookup(pb.LookupRequest(namespace=GOOD_NS, vectors=pb.Vectors(full=[float("inf")])),
                               timeout=5))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "entry_id must be 64 lowercase hex",
           lambda: next(stub.Fetch(pb.FetchRequest(namespace=GOOD_NS, entry_id="../etc/passwd"), timeout=5)))
    expect(grpc.StatusCode.NOT_FOUND, "no entry",
           lambda: next(stub.Fetch(pb.FetchRequest(namespace=GOOD_NS, entry_id="0" * 64), timeout=5)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "granted_steps must be below total_steps",
           lambda: next(stub.Fetch(pb.FetchRequest(namespace=GOOD_NS, entry_id="0" * 64, granted_steps=50),
                                   timeout=5)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "entry_id must be 64 lowercase hex",
           lambda: stub.FetchDirect(pb.FetchRequest(namespace=GOOD_NS, entry_id="../etc/passwd"), timeout=5))
    expect(grpc.StatusCode.NOT_FOUND, "no entry",
           lambda: stub.FetchDirect(pb.FetchRequest(namespace=GOOD_NS, entry_id="0" * 64), timeout=5))
    expect(grpc.StatusCode.NOT_FOUND, "no entry",
           lambda: stub.Verify(pb.VerifyRequest(namespace=GOOD_NS, entry_id="0" * 64), timeout=5))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "entry_id must be 64 lowercase hex",
           lambda: stub.Verify(pb.VerifyRequest(namespace=GOOD_NS, entry_id="x"), timeout=5))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "entry_id must be",
           lambda: stub.Delete(pb.DeleteRequest(namespace=GOOD_NS, entry_id=""), timeout=5))
    assert_nothing_stored_and_serving(stub)


def test_cancelled_put_stores_nothing(stub) -> None:
    def messages():
        yield pb.PutRequest(header=header())
        yield chunks()[0]
        raise RuntimeError("client crashed mid-stream")

    with pytest.raises(grpc.RpcError):
        put(stub, messages())
    assert_nothing_stored_and_serving(stub)


def test_oversized_messages_are_the_clients_fault(daemon, stub) -> None:
    """A chunk over wire.CHUNK_BYTES, or a message over the gRPC limit, is refused with a status that
    names the client's error, and the daemon logs it without a traceback or an ERROR (no alert fires
    for a client's mistake), then keeps serving."""
    expect(grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 1 MiB chunk limit",
           lambda: put(stub, [pb.PutRequest(header=header()), pb.PutRequest(chunk=BLOB[:wire.CHUNK_BYTES + 1])]))
    oversized = BLOB * ((wire.MAX_MESSAGE_BYTES // len(BLOB)) + 1)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max",
           lambda: put(stub, [pb.PutRequest(header=header()), pb.PutRequest(chunk=oversized)]))
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max",
           lambda: put(stub, [pb.PutRequest(header=header(prompt="x" * wire.MAX_MESSAGE_BYTES))]))
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max",
           lambda: stub.Lookup(pb.LookupRequest(namespace=GOOD_NS, vectors=pb.Vectors(
               full=[1.0] * (wire.MAX_MESSAGE_BYTES // 4 + 1))), timeout=5))
    assert_nothing_stored_and_serving(stub)
    log = daemon.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log
