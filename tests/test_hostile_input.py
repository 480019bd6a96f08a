"""A hostile or careless client cannot store what breaks other clients, nor sizes no video workload has.

Each case sends one request through the raw generated stub (flexcache.v1.cache_pb2_grpc), so that the
client library's own checks never see it, to one real daemon, and expects INVALID_ARGUMENT with a
message naming the field and its limit (docs/hardening.md has the table), nothing stored, and the daemon
still serving. The victim test shows why it matters: an entry whose mask claims 65536^4 cells (0 in
int64 arithmetic, so its empty bits looked exact) would be offered to every similar lookup, and every
client would have to discard it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from flexcache.daemon import validate
from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect
from tests.vectors import unit

BLOB = np.arange(4096, dtype=np.uint8).tobytes()
GOOD_NS = NS.to_proto()
ID = "0" * 64


def namespace(**fields: object) -> pb.Namespace:
    ns = pb.Namespace()
    ns.CopyFrom(GOOD_NS)
    for name, value in fields.items():
        setattr(ns, name, value)
    return ns


def blob_info(**fields: object) -> pb.BlobInfo:
    info = pb.BlobInfo(size=len(BLOB), sha256=hashlib.sha256(BLOB).digest(), codec="raw", dtype="uint8",
                       shape=[len(BLOB)])
    for name, value in fields.items():
        if name == "shape":
            del info.shape[:]
            info.shape.extend(value)  # type: ignore[arg-type]
        elif name == "attrs":
            info.attrs.update(value)  # type: ignore[arg-type]
        else:
            setattr(info, name, value)
    return info


def header(seed: int = 1, **overrides: object) -> pb.PutHeader:
    fields: dict[str, object] = {"namespace": GOOD_NS, "prompt": f"a corgi on a beach {seed}",
                                 "vectors": pb.Vectors(full=unit(seed).tolist()), "blob": blob_info()}
    fields.update(overrides)
    return pb.PutHeader(**fields)


def put_messages(head: pb.PutHeader) -> list[pb.PutRequest]:
    return [pb.PutRequest(header=head), pb.PutRequest(chunk=BLOB)]


def lookup(**overrides: object) -> pb.LookupRequest:
    fields: dict[str, object] = {"namespace": GOOD_NS, "vectors": pb.Vectors(full=unit(1).tolist())}
    fields.update(overrides)
    return pb.LookupRequest(**fields)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module (every case leaves it as it found it); stopped at teardown."""
    process = DaemonProcess(Path(tmp_path_factory.mktemp("hostile")) / "data")
    try:
        yield process.start()
    finally:
        process.close()


@pytest.fixture(scope="module")
def stub(daemon: DaemonProcess) -> Iterator[pb_grpc.CacheServiceStub]:
    with grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.CacheServiceStub(channel)


Call = Callable[[pb_grpc.CacheServiceStub], object]


def put_call(head: pb.PutHeader) -> Call:
    return lambda s: s.Put(iter(put_messages(head)), timeout=10)


def ns_cases(make: Callable[[pb.Namespace], Call]) -> dict[str, tuple[Call, str]]:
    """The namespace limits, which every request that names a namespace gets."""
    return {
        "300 KB tenant": (make(namespace(tenant="t" * 300_000)), "namespace.tenant has 300000 characters"),
        "300 KB model": (make(namespace(model="m" * 300_000)), "namespace.model has 300000 characters"),
        "long scheduler": (make(namespace(scheduler="s" * 257)), "namespace.scheduler has 257 characters"),
        "huge width": (make(namespace(width=2**32 - 1)), "namespace.width 4294967295 is above 65536"),
        "huge height": (make(namespace(height=70_000)), "namespace.height 70000 is above 65536"),
        "huge frames": (make(namespace(frames=2**31)), "namespace.frames 2147483648 is above 65536"),
        "huge total_steps": (make(namespace(total_steps=2**32 - 1)),
                             "namespace.total_steps 4294967295 is above 10000"),
    }


def _fetch(request: pb.FetchRequest) -> Call:
    return lambda s: next(iter(s.Fetch(request, timeout=10)))


CASES: dict[str, tuple[Call, str]] = {
    # An entry that breaks its victims: the cell count wraps to 0 in int64, and 0 bits "match" it.
    "mask of 65536^4 cells": (put_call(header(object_mask=pb.Mask(shape=[65536] * 4, bits=b""))),
                              "object_mask has 18446744073709551616 cells, above 16777216"),
    "mask of 2^32-1 x 2^32-1 cells": (put_call(header(object_mask=pb.Mask(shape=[2**32 - 1] * 2, bits=b"\0"))),
                                      "object_mask has 18446744065119617025 cells"),
    "5,000 attrs": (put_call(header(blob=blob_info(attrs={f"k{i}": "v" for i in range(5000)}))),
                    "blob.attrs has 5000 entries, above 64"),
    "long attr key": (put_call(header(blob=blob_info(attrs={"k" * 257: "v"}))),
                      "blob.attrs key of 257 characters"),
    "long attr value": (put_call(header(blob=blob_info(attrs={"seed": "9" * 1025}))),
                        "blob.attrs['seed'] has a value of 1025 characters, above 1024"),
    "long codec": (put_call(header(blob=blob_info(codec="c" * 300_000))), "blob.codec has 300000 characters"),
    "long dtype": (put_call(header(blob=blob_info(dtype="d" * 257))), "blob.dtype has 257 characters"),
    "shape of 2^63 values": (put_call(header(blob=blob_info(shape=[2**62, 2]))),
                             "blob.shape size 4611686018427387904 is above 2147483648"),
    "shape whose product wraps": (put_call(header(blob=blob_info(shape=[2**31] * 3))),
                                  "blob.shape [2147483648, 2147483648, 2147483648] holds 9903520314283042199192993792"
                                  " values"),
    "shape of more values than max_blob_bytes": (put_call(header(blob=blob_info(shape=[2**31, 2**31]))),
                                                 "values, above max_blob_bytes"),
    "negative shape": (put_call(header(blob=blob_info(shape=[-1, 4096]))), "blob.shape size -1 is negative"),
    "rank 17": (put_call(header(blob=blob_info(shape=[1] * 17))), "blob.shape has 17 sizes, above 16"),
    # What the client library refuses in an answer (flexcache.v1.wire.blob_problem) would poison lookups.
    "raw blob whose size is not its shape's": (put_call(header(blob=blob_info(shape=[17, 4]))),
                                               "blob of 4096 bytes cannot hold shape [17, 4] of uint8: no client"),
    "raw blob of an unknown dtype": (put_call(header(blob=blob_info(dtype="complex256"))),
                                     "blob dtype 'complex256' is not one the 'raw' codec stores"),
    "codec blob of an integer dtype": (put_call(header(blob=blob_info(codec="fxlc", dtype="int8"))),
                                       "blob dtype 'int8' is not one the 'fxlc' codec stores"),
    "seed that is not an integer": (put_call(header(blob=blob_info(attrs={"seed": "abc"}))),
                                    "blob seed 'abc' is not an integer"),
    "infinite step_seconds": (put_call(header(step_seconds=float("inf"))),
                              "step_seconds must be a number from 0 to 3600"),
    "huge step_seconds": (put_call(header(step_seconds=1e30)), "step_seconds must be a number from 0 to 3600"),
    **{f"put: {k}": v for k, v in ns_cases(lambda ns: put_call(header(namespace=ns))).items()},
    # Lookup
    "100,000 partial_roles": (lambda s: s.Lookup(lookup(partial_roles=[pb.ROLE_OBJECT] * 100_000), timeout=10),
                              "partial_roles has 100000 entries, above 2"),
    **{f"lookup: {k}": v for k, v in ns_cases(
        lambda ns: lambda s: s.Lookup(lookup(namespace=ns), timeout=10)).items()},
    # Fetch, FetchDirect, Delete, Verify
    "fetch: unknown role": (_fetch(pb.FetchRequest(namespace=GOOD_NS, entry_id=ID, role=1000)),
                            "role 1000 is not a Role"),
    "fetch direct: unknown role": (lambda s: s.FetchDirect(pb.FetchRequest(namespace=GOOD_NS, entry_id=ID, role=-5),
                                                           timeout=10), "role -5 is not a Role"),
    **{f"fetch: {k}": v for k, v in ns_cases(
        lambda ns: _fetch(pb.FetchRequest(namespace=ns, entry_id=ID))).items()},
    "delete: 300 KB tenant": (lambda s: s.Delete(pb.DeleteRequest(namespace=namespace(tenant="t" * 300_000),
                                                                  entry_id=ID), timeout=10),
                              "namespace.tenant has 300000 characters"),
    "verify: 300 KB model": (lambda s: s.Verify(pb.VerifyRequest(namespace=namespace(model="m" * 300_000),
                                                                 entry_id=ID), timeout=10),
                             "namespace.model has 300000 characters"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_is_refused(stub: pb_grpc.CacheServiceStub, case: str) -> None:
    call, fragment = CASES[case]
    before = stub.Stats(pb.StatsRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details(), info.value.details()
    after = stub.Stats(pb.StatsRequest(), timeout=5)
    assert (after.entries, after.bytes, len(after.namespaces)) == (before.entries, before.bytes,
                                                                   len(before.namespaces))


def test_the_largest_allowed_values_are_accepted(stub: pb_grpc.CacheServiceStub) -> None:
    """The largest values a limit allows are accepted: the limits refuse only what no workload sends."""
    n = validate.MAX_NAME_CHARS
    ns = namespace(tenant="t" * n, model="m" * n, scheduler="s" * n, width=validate.MAX_FRAME_SIZE,
                   height=validate.MAX_FRAME_SIZE, frames=validate.MAX_FRAME_SIZE, total_steps=validate.MAX_TOTAL_STEPS)
    attrs = {f"{i:0{validate.MAX_ATTR_KEY_CHARS}d}": "v" * validate.MAX_ATTR_VALUE_CHARS
             for i in range(validate.MAX_ATTRS)}
    blob = blob_info(codec="c" * n, dtype="d" * n, attrs=attrs, shape=[1] * (validate.MAX_SHAPE_RANK - 1) + [4096])
    mask = pb.Mask(shape=[64, 256, 256], bits=bytes(64 * 256 * 256 // 8))  # 512 KiB: within a gRPC message
    head = header(seed=99, namespace=ns, blob=blob, object_mask=mask, step_seconds=validate.MAX_STEP_SECONDS)
    response = stub.Put(iter(put_messages(head)), timeout=30)
    assert response.created
    answer = stub.Lookup(lookup(namespace=ns, vectors=head.vectors, top_k=10_000,
                                partial_roles=[pb.ROLE_OBJECT, pb.ROLE_BACKGROUND]), timeout=10)
    assert [c.entry_id for c in answer.candidates] == [response.entry_id]
    assert stub.Delete(pb.DeleteRequest(namespace=ns, entry_id=response.entry_id), timeout=10).deleted


POISON = {
    "mask of 65536^4 cells": {"object_mask": pb.Mask(shape=[65536] * 4, bits=b"")},
    "raw blob whose size is not its shape's": {"blob": blob_info(shape=[17, 4])},
    "seed that is not an integer": {"blob": blob_info(attrs={"seed": "abc"})},
}


@pytest.mark.parametrize("poison", list(POISON))
def test_a_hostile_entry_cannot_break_its_victims(daemon: DaemonProcess, stub: pb_grpc.CacheServiceStub,
                                                  poison: str) -> None:
    """A victim's lookup with the same vector as a refused hostile entry is served the good entry.
    Stored, the hostile entry was a candidate the client must refuse, which made the whole lookup a miss
    (the client cannot tell which of a daemon's candidates to trust once one is malformed)."""
    good = stub.Put(iter(put_messages(header(seed=7))), timeout=10)
    try:
        hostile = header(seed=7, prompt=f"the same prompt vector, poisoned: {poison}", **POISON[poison])
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(iter(put_messages(hostile)), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with connect(daemon.target) as victim:
            found = victim.lookup(unit(7), top_k=5)
            assert found is not None and [c.entry_id for c in found.candidates] == [good.entry_id]
            fetched = victim.fetch(good.entry_id)
            assert fetched is not None and bytes(fetched.data) == BLOB
    finally:
        stub.Delete(pb.DeleteRequest(namespace=GOOD_NS, entry_id=good.entry_id), timeout=10)


@pytest.mark.parametrize("scale", [3e38, 1e-30])
def test_extreme_vector_magnitudes_are_found_again(stub: pb_grpc.CacheServiceStub, scale: float) -> None:
    """Cosine similarity ignores magnitude, so an entry put with a vector near float32's largest (or
    smallest) values is found by a lookup with the same direction at any scale, and finds it back.
    Before, its float32 norm was infinite (or its squares underflowed to 0) and the entry was stored but
    never found."""
    direction = unit(11)
    extreme = (direction.astype(np.float64) * scale).astype(np.float32)
    assert np.isfinite(extreme).all() and np.any(extreme)
    stored = stub.Put(iter(put_messages(header(seed=11, vectors=pb.Vectors(full=extreme.tolist())))), timeout=10)
    try:
        for query in (direction, extreme):
            answer = stub.Lookup(lookup(vectors=pb.Vectors(full=query.tolist())), timeout=10)
            assert [c.entry_id for c in answer.candidates] == [stored.entry_id], answer.miss_reason
            assert answer.candidates[0].granted_steps == 25
    finally:
        stub.Delete(pb.DeleteRequest(namespace=GOOD_NS, entry_id=stored.entry_id), timeout=10)
