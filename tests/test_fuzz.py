"""Bounded fuzzing of one real daemon: every RPC and the data port, then the data stored before is intact.

Three parts, within about a minute together on the shared 2-core box (docs/hardening.md has timings):

- `test_fuzz_every_rpc_and_the_data_port`: the seeded engine of bench/fuzz_daemon.py (field-level and
  byte-level mutation of valid requests, garbage to every method, random and replayed data port
  tickets) for CASES cases; no crash, no hang, no status outside fuzz_daemon.ALLOWED,
  and the entries stored before are found and fetched bit-exact.
  `python -m bench.fuzz_daemon --cases N` runs the same engine longer.
- `test_what_the_daemon_accepts_every_client_accepts`: hypothesis-built Put headers, every field drawn
  from valid values and edge values, against the same daemon through the raw stub; an accepted entry
  must come back in lookups and fetches that the client library's own answer checks accept, because
  the client treats a lookup with one malformed candidate as a miss (one stored entry would break
  every lookup near it).
- `test_validators_raise_only_domain_errors`: the same strategies, and Lookup and Fetch requests, into
  daemon/validate.py in-process, many more examples: a request is accepted or refused with a domain
  error, never another exception, and an accepted header satisfies every limit with Python-int sizes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bench import fuzz_daemon
from flexcache.client.answers import LookupResult, check_header
from flexcache.daemon import validate
from flexcache.daemon.errors import CacheError
from flexcache.daemon.limits import Limits
from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1.wire import blob_problem
from tests.vectors import unit

CASES = 3000  # about 10 s here; the engine's whole run, kept-entry checks included, well within a minute
LIMITS = Limits(max_bytes=10 << 30, high_watermark=0.95, low_watermark=0.85, max_blob_bytes=1 << 30,
                max_vector_dim=4096, utility_half_life=2.0, utility_prior_steps=1.0)
FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module's fuzzing; stopped at teardown whatever the fuzz did to it."""
    process = DaemonProcess(Path(tmp_path_factory.mktemp("fuzz")) / "data", log_level="WARNING")
    try:
        yield process.start()
    finally:
        process.close()


@pytest.fixture(scope="module")
def stub(daemon: DaemonProcess) -> Iterator[pb_grpc.CacheServiceStub]:
    with grpc.insecure_channel(daemon.target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        yield pb_grpc.CacheServiceStub(channel)


def test_fuzz_every_rpc_and_the_data_port(daemon: DaemonProcess) -> None:
    report, problems = fuzz_daemon.fuzz(daemon.target, daemon.data_port, CASES, seed=0,
                                        alive=lambda: daemon.running)
    summary = report.summary() + "".join(f"\n  AFTER {p}" for p in problems)
    print(summary)
    assert daemon.running, summary
    assert not report.failures and not problems, summary
    assert sum(report.cases.values()) == CASES, summary
    assert daemon.stats().entries >= 4


# ---- strategies: a valid request with a few of its fields set to edge values ----
_UINT32_EDGES = [0, 1, 2, 49, 50, 51, validate.MAX_FRAME_SIZE, validate.MAX_FRAME_SIZE + 1, validate.MAX_TOTAL_STEPS,
                 validate.MAX_TOTAL_STEPS + 1, 2**31, 2**32 - 1]
_UINT32 = st.one_of(st.sampled_from(_UINT32_EDGES), st.integers(0, 2**32 - 1))
_N = validate.MAX_NAME_CHARS
_NAME = st.one_of(st.sampled_from([0, 1, _N, _N + 1, 300_000]).map(lambda n: "x" * n),
                  st.sampled_from(["\x00", "é" * 200, "/", "../etc"]), st.text(max_size=40))
_FLOATS32 = st.floats(width=32)
_SHAPE_SIZES = st.one_of(st.integers(0, 8), st.sampled_from([-1, 2**31, 2**31 + 1, 2**62, 2**63 - 1]),
                         st.integers(-2**63, 2**63 - 1))
_BASE = unit(3, dim=16)
EDGES: dict[str, st.SearchStrategy] = {
    "tenant": _NAME, "model": _NAME, "scheduler": _NAME, "prompt": _NAME,
    "width": _UINT32, "height": _UINT32, "frames": _UINT32, "total_steps": _UINT32, "step": _UINT32,
    "full": st.one_of(st.lists(_FLOATS32, max_size=20), st.just((_BASE * 3e38).tolist()),
                      st.just((_BASE * 1e-30).tolist()), st.just([0.0] * 16),
                      st.integers(17, 4097).map(lambda n: [0.5] * n)),
    "object": st.lists(_FLOATS32, max_size=20),
    "size": st.sampled_from([0, 2**30, 2**30 + 1, 2**32 + 1, 2**64 - 1]),
    "sha256": st.binary(max_size=40),
    "codec": st.one_of(st.sampled_from(["fxlc", "", "zstd", "c" * (_N + 1)]), st.text(max_size=10)),
    "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "int8", "complex256", "", "d" * (_N + 1)]),
                       st.text(max_size=10)),
    "shape": st.lists(_SHAPE_SIZES, max_size=validate.MAX_SHAPE_RANK + 2),
    "attrs": st.one_of(st.dictionaries(st.text(max_size=300), st.text(max_size=1100), max_size=4),
                       st.sampled_from([{"seed": "abc"}, {"seed": "9" * 41}, {"seed": ""},
                                        {f"k{i}": "" for i in range(validate.MAX_ATTRS + 1)},
                                        {"k" * (validate.MAX_ATTR_KEY_CHARS + 1): ""},
                                        {"v": "v" * (validate.MAX_ATTR_VALUE_CHARS + 1)}])),
    "crc32c": st.integers(0, 2**32 - 1),
    "step_seconds": st.one_of(_FLOATS32, st.sampled_from([validate.MAX_STEP_SECONDS, 3601.0, 1e30])),
    "mask": st.builds(pb.Mask, shape=st.lists(_UINT32 | st.integers(1, 8), max_size=5), bits=st.binary(max_size=40)),
}


@st.composite
def put_headers(draw: st.DrawFn) -> tuple[pb.PutHeader, bytes]:
    """A valid Put header with up to three fields (of EDGES) set to edge values, and the blob bytes to
    stream after it. Valid headers stay common, so the checks on what follows an accepted Put run."""
    edge = draw(st.sets(st.sampled_from(sorted(EDGES)), max_size=3))

    def pick(name: str, valid: object) -> object:
        return draw(EDGES[name]) if name in edge else valid

    data = draw(st.binary(min_size=1, max_size=64))
    ns = pb.Namespace(tenant=pick("tenant", "acme"), model=pick("model", "fuzz"), width=pick("width", 832),
                      height=pick("height", 480), frames=pick("frames", 81), scheduler=pick("scheduler", "flow"),
                      total_steps=pick("total_steps", 50))
    seed = draw(st.integers(0, 3))
    vectors = pb.Vectors(full=pick("full", unit(seed, 16).tolist()))
    if draw(st.booleans()):
        vectors.object.extend(pick("object", unit(10 + seed, 16).tolist()))
    blob = pb.BlobInfo(size=pick("size", len(data)), sha256=pick("sha256", hashlib.sha256(data).digest()),
                       codec=pick("codec", "raw"), dtype=pick("dtype", "uint8"), shape=pick("shape", [len(data)]),
                       step=pick("step", 0), attrs=pick("attrs", {"seed": str(seed)}))
    if "crc32c" in edge:
        blob.crc32c = draw(EDGES["crc32c"])
    header = pb.PutHeader(namespace=ns, prompt=pick("prompt", f"a corgi {seed} {data.hex()}"), vectors=vectors,
                          blob=blob, step_seconds=pick("step_seconds", 0.5))
    if "mask" in edge or draw(st.booleans()):
        header.object_mask.CopyFrom(pick("mask", pb.Mask(shape=[2, 4, 4], bits=b"\x0f" * 4)))
    return header, data


NAMESPACES = st.builds(pb.Namespace, tenant=_NAME | st.just("acme"), model=_NAME | st.just("fuzz"),
                       width=_UINT32, height=_UINT32, frames=_UINT32, scheduler=_NAME | st.just("flow"),
                       total_steps=_UINT32 | st.just(50))
VECTORS = st.builds(pb.Vectors, full=EDGES["full"] | st.just(_BASE.tolist()), object=EDGES["object"],
                    background=EDGES["object"])


def _accepted(header: pb.PutHeader, dim: int | None = None) -> bool:
    try:
        validate.namespace_of(header)
        validate.put_header(header, dim, LIMITS)
    except CacheError:
        return False
    return True


@settings(FUZZ_SETTINGS, max_examples=250)
@given(case=put_headers())
def test_what_the_daemon_accepts_every_client_accepts(stub: pb_grpc.CacheServiceStub,
                                                      case: tuple[pb.PutHeader, bytes]) -> None:
    header, data = case
    messages = [pb.PutRequest(header=header), pb.PutRequest(chunk=data)]
    try:
        put = stub.Put(iter(messages), timeout=fuzz_daemon.DEADLINE_S)
    except grpc.RpcError as error:
        assert error.code() in fuzz_daemon.ALLOWED, (error.code(), error.details())
        event(f"refused: {error.code().name}")
        return
    event("stored")
    assert _accepted(header, len(header.vectors.full))  # the daemon stores only what its checks accept
    total_steps = header.namespace.total_steps
    answer = stub.Lookup(pb.LookupRequest(namespace=header.namespace, vectors=header.vectors, top_k=64),
                         timeout=fuzz_daemon.DEADLINE_S)
    result = LookupResult.from_proto(answer, total_steps, 64)  # Malformed: the entry would poison lookups
    request = pb.FetchRequest(namespace=header.namespace, entry_id=put.entry_id)
    responses = list(stub.Fetch(request, timeout=fuzz_daemon.DEADLINE_S))
    check_header(responses[0].header, request, total_steps)
    assert b"".join(r.chunk for r in responses[1:]) == data
    # Similarity 1 grants 25 of 50 steps (a smaller N may grant none). Not when the entry existed: entry
    # ids cover namespace, prompt and blob, not vectors, so it may have been stored with other vectors.
    if put.created and total_steps == 50 and not header.blob.step:
        assert put.entry_id in [c.entry_id for c in result.candidates]


@settings(FUZZ_SETTINGS, max_examples=1000)
@given(case=put_headers(), dim=st.sampled_from([None, 16]))
def test_validators_raise_only_domain_errors(case: tuple[pb.PutHeader, bytes], dim: int | None) -> None:
    header, _ = case
    if not _accepted(header, dim):
        return
    event("accepted")
    blob, ns = header.blob, header.namespace
    assert blob_problem(blob, ns.total_steps) is None
    assert 1 <= blob.size <= LIMITS.max_blob_bytes and math.prod(blob.shape) <= LIMITS.max_blob_bytes
    assert len(blob.shape) <= validate.MAX_SHAPE_RANK and all(0 <= n <= validate.MAX_SHAPE_SIZE for n in blob.shape)
    assert len(blob.attrs) <= validate.MAX_ATTRS
    assert max(len(s) for s in (ns.tenant, ns.model, ns.scheduler, blob.codec, blob.dtype)) <= validate.MAX_NAME_CHARS
    assert max(ns.width, ns.height, ns.frames) <= validate.MAX_FRAME_SIZE and ns.total_steps <= validate.MAX_TOTAL_STEPS
    assert 0 <= header.step_seconds <= validate.MAX_STEP_SECONDS
    if header.HasField("object_mask"):
        cells = math.prod(header.object_mask.shape)
        assert 1 <= cells <= validate.MAX_MASK_CELLS and len(header.object_mask.bits) == (cells + 7) // 8
    for v in validate.vectors(header.vectors, dim, LIMITS.max_vector_dim).values():
        assert v.dtype == np.float32 and 0.5 <= np.max(np.abs(v)) < 1  # a finite, nonzero float32 norm
        assert np.isfinite(np.linalg.norm(v)) and np.linalg.norm(v) > 0


@settings(FUZZ_SETTINGS, max_examples=600)
@given(ns=NAMESPACES, vecs=VECTORS, top_k=_UINT32,
       roles=st.lists(st.integers(-2**31, 2**31 - 1) | st.sampled_from([1, 2, 3]), max_size=4),
       entry_id=st.one_of(st.just("a" * 64), st.text(max_size=70)), role=st.integers(-2**31, 2**31 - 1),
       granted=_UINT32)
def test_lookup_and_fetch_validators_raise_only_domain_errors(ns: pb.Namespace, vecs: pb.Vectors, top_k: int,
                                                              roles: list[int], entry_id: str, role: int,
                                                              granted: int) -> None:
    lookup = pb.LookupRequest(namespace=ns, vectors=vecs, top_k=top_k, partial_roles=roles)
    try:
        query = validate.lookup_query(lookup, validate.namespace_of(lookup), None, LIMITS.max_vector_dim)
    except CacheError:
        pass
    else:
        assert 1 <= query.top_k <= validate.MAX_TOP_K and query.partial_roles <= validate.PART_ROLES
    fetch = pb.FetchRequest(namespace=ns, entry_id=entry_id, role=role, granted_steps=granted)
    try:
        _, _, checked_role = validate.fetch_request(fetch)
    except CacheError:
        pass
    else:
        assert checked_role in (None, "full", "object", "background") and granted < ns.total_steps
