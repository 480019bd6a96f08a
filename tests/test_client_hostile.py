"""A hostile or buggy daemon's answers are misses: never an exception into the worker's loop.

The daemon here is a fake: a real gRPC server on loopback implementing flexcache.v1's CacheService
(cache_pb2_grpc's servicer) and a data port, answering with messages the real daemon never sends (a
mask whose cell count wraps in int64, a blob header at odds with itself, steps no worker can skip,
another entry's header, a stream longer than it declared, a data port that sends garbage...). This is
the one place in the suite where a fake daemon is right: the real one cannot be made to send these,
so only a fake can show that the client checks what it relies on. Everything else runs the real one.

Each case asserts that no exception escapes lookup, get, fetch, put, stats or delete, and that each
result is None or well formed; a bounded seeded fuzz mutates valid answers (fields and bytes) the same way.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any

import crc32c
import grpc
import numpy as np
import pytest

from flexcache.client import CacheClient, Fetched, Hit, LookupResult, Retry
from flexcache.client import codec as latent_codec
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire
from flexcache.v1.wire import DATA_HELLO as HELLO
from tests.conftest import NS
from tests.vectors import unit

GRID = (3, 4, 4)
LATENT = np.random.default_rng(0).standard_normal((4, *GRID)).astype(np.float32)
MASK = np.zeros(GRID, bool)
MASK[:, 1:3, 1:3] = True
IDS = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("a", "b")}
OTHER_ID = hashlib.sha256(b"another entry").hexdigest()
Answer = bytes | Any  # a message, or raw bytes sent as they are


def blob_info(data: bytes, **fields: Any) -> pb.BlobInfo:
    info = pb.BlobInfo(size=len(data), sha256=hashlib.sha256(data).digest(), crc32c=crc32c.crc32c(data), codec="raw",
                       dtype="float32", shape=LATENT.shape, attrs={"seed": "7"})
    for name, value in fields.items():
        if name == "shape":
            del info.shape[:]
            info.shape.extend(value)
        elif name == "attrs":
            info.attrs.clear()
            info.attrs.update(value)
        elif value is None:
            info.ClearField(name)
        else:
            setattr(info, name, value)
    return info


DATA = {IDS["a"]: LATENT.tobytes(), IDS["b"]: (LATENT * 2).tobytes()}
BLOBS = {entry: blob_info(data) for entry, data in DATA.items()}


def mask_proto(mask: np.ndarray = MASK) -> pb.Mask:
    return pb.Mask(shape=mask.shape, bits=np.packbits(mask, axis=None).tobytes())


def candidate(entry: str = IDS["a"], role: int = pb.ROLE_FULL, granted: int = 25, similarity: float = 0.97,
              **fields: Any) -> pb.Candidate:
    c = pb.Candidate(entry_id=entry, similarity=similarity, granted_steps=granted, role=role, blob=BLOBS[entry],
                     prompt="a corgi on a beach", object_mask=mask_proto())
    for name, value in fields.items():
        getattr(c, name).CopyFrom(value) if isinstance(value, pb.Mask | pb.BlobInfo) else setattr(c, name, value)
    return c


def donors() -> pb.LookupResponse:
    return pb.LookupResponse(candidates=[candidate(IDS["a"], pb.ROLE_OBJECT, 5, 0.93),
                                         candidate(IDS["b"], pb.ROLE_BACKGROUND, 5, 0.91)])


def stream(request: pb.FetchRequest, header: pb.FetchHeader | None = None, data: bytes | None = None,
           chunk: int = 256) -> list[Answer]:
    """A Fetch stream as the daemon sends it: header, then chunks."""
    data = DATA.get(request.entry_id, b"") if data is None else data
    header = header or pb.FetchHeader(entry_id=request.entry_id, prompt="p", blob=BLOBS.get(request.entry_id))
    return [pb.FetchResponse(header=header)] + [pb.FetchResponse(chunk=data[i:i + chunk])
                                                for i in range(0, len(data), chunk)]


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes([*out, n])


@dataclass(frozen=True)
class Refusal:
    """A status the fake answers a call with (what the real daemon answers an invalid request with)."""

    code: grpc.StatusCode
    details: str


@dataclass
class Script:
    """What the fake daemon answers, per method: a function of the request, returning a message, raw
    bytes, or (Fetch) a list of them. `data_port`: what its data port sends for any ticket (None: it
    has no data port, FetchDirect says FAILED_PRECONDITION)."""

    lookup: Callable[[pb.LookupRequest], Answer] = lambda r: pb.LookupResponse(candidates=[candidate()])
    fetch: Callable[[pb.FetchRequest], list[Answer]] = stream
    ticket: Callable[[pb.FetchRequest, int], Answer] | None = None
    data_port: Callable[[bytes], bytes] | None = None
    put: Callable[[pb.PutHeader], Answer] = lambda h: pb.PutResponse(entry_id=IDS["a"], created=True)
    delete: Callable[[pb.DeleteRequest], Answer] = lambda r: pb.DeleteResponse(deleted=True)
    stats: Callable[[pb.StatsRequest], Answer] = lambda r: pb.StatsResponse(entries=2, bytes=1536)
    verify: Callable[[pb.VerifyRequest], Answer] = lambda r: pb.VerifyResponse(intact=True)


def valid_ticket(request: pb.FetchRequest, port: int) -> pb.FetchTicket:
    return pb.FetchTicket(header=pb.FetchHeader(entry_id=request.entry_id, prompt="p",
                                                blob=BLOBS.get(request.entry_id)),
                          ticket=b"t" * 16, data_port=port)


def serialize(message: Answer) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _recv(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (part := conn.recv(n - len(data))):
        data += part
    return data


class FakeDaemon(pb_grpc.CacheServiceServicer):
    """CacheService answering as `self.script` says, with a data port beside it."""

    def __init__(self) -> None:
        self.script = Script()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_send_message_length", 8 << 20)])
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name["CacheService"].methods:
            kind = {(True, False): grpc.stream_unary_rpc_method_handler,
                    (False, True): grpc.unary_stream_rpc_method_handler}.get(
                (method.client_streaming, method.server_streaming), grpc.unary_unary_rpc_method_handler)
            handlers[method.name] = kind(getattr(self, method.name),
                                         request_deserializer=getattr(pb, method.input_type.name).FromString,
                                         response_serializer=serialize)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self._data = socket.create_server(("127.0.0.1", 0))
        self.data_port = self._data.getsockname()[1]
        threading.Thread(target=self._serve_data, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve_data(self) -> None:
        while True:
            try:
                conn, _ = self._data.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    head = _recv(conn, HELLO.size)  # the client's HELLO frame, then its ticket
                    _recv(conn, HELLO.unpack(head)[1] if len(head) == HELLO.size else 0)
                    ticket = _recv(conn, 16)
                    if self.script.data_port is not None:
                        conn.sendall(self.script.data_port(ticket))
                except OSError:
                    pass

    def stop(self) -> None:
        self.server.stop(grace=None)
        self._data.close()


    # ---- CacheService ----
    def Put(self, request_iterator: Iterator[pb.PutRequest], context: grpc.ServicerContext) -> Answer:
        header = next(request_iterator).header
        for _ in request_iterator:
            pass
        answer = self.script.put(header)
        if isinstance(answer, Refusal):
            context.abort(answer.code, answer.details)
        return answer

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> Answer:
        return self.script.lookup(request)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[Answer]:
        yield from self.script.fetch(request)

    def FetchDirect(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Answer:
        if self.script.ticket is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no data port")
        return self.script.ticket(request, self.data_port)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> Answer:
        return self.script.delete(request)

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> Answer:
        return self.script.verify(request)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> Answer:
        return self.script.stats(request)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDaemon]:
    daemon = FakeDaemon()
    yield daemon
    daemon.stop()


def client_of(fake: FakeDaemon) -> CacheClient:
    return CacheClient(fake.target, NS, timeout_s=2.0, transfer_timeout_s=2.0, warn_every_s=0, max_rel_error=0.0,
                       retry=Retry.none())


# ---- what a well-formed answer is ----
def check_lookup(result: LookupResult | None) -> None:
    if result is None:
        return
    assert isinstance(result, LookupResult)
    roles = [c.role for c in result.candidates]
    assert all(r == "full" for r in roles) or "full" not in roles
    for c in result.candidates:
        assert re.fullmatch(r"[0-9a-f]{64}", c.entry_id)
        assert c.role in wire.ROLES and 1 <= c.granted_steps < NS.total_steps
        assert math.isfinite(c.similarity) and -1.0001 <= c.similarity <= 1.0001
        assert c.object_mask is None or (c.object_mask.dtype == bool and 1 <= c.object_mask.ndim <= 4)


def check_fetched(fetched: Fetched | None, entry_id: str) -> None:
    if fetched is None:
        return
    assert isinstance(fetched, Fetched) and fetched.entry_id == entry_id
    assert len(fetched.data) == fetched.blob.size
    if fetched.blob.HasField("crc32c"):
        assert crc32c.crc32c(bytes(fetched.data)) == fetched.blob.crc32c
    else:
        assert hashlib.sha256(fetched.data).digest() == fetched.blob.sha256


def check_hit(hit: Hit | None) -> None:
    if hit is None:
        return
    assert isinstance(hit, Hit) and hit.kind in ("full", "composed", "partial")
    assert 1 <= hit.steps < NS.total_steps and isinstance(hit.latent, np.ndarray)


def rebuild(x0: np.ndarray, seed: int, k: int, total_steps: int) -> np.ndarray:
    return x0 * (1 - k / total_steps)


def every_call(c: CacheClient) -> dict[str, Any]:
    """Each public call once; any exception escapes to the test."""
    parts = {"object_vector": unit(2), "background_vector": unit(3)}
    results = {"lookup": c.lookup(unit(1), top_k=3, partial_roles=("object",), **parts),
               "get": c.get(unit(1), rebuild=rebuild, noise_seed=3, partial_roles=("object",), **parts),
               "get_direct": c.get(unit(1)),
               "fetch": c.fetch(IDS["a"], granted_steps=25),
               "put": c.put("a corgi", LATENT, unit(1), seed=7),
               "stats": c.stats(),
               "delete": c.delete(IDS["a"])}
    check_lookup(results["lookup"])
    check_hit(results["get"])
    check_hit(results["get_direct"])
    check_fetched(results["fetch"], IDS["a"])
    assert results["put"] is None or re.fullmatch(r"[0-9a-f]{64}", results["put"])
    assert results["stats"] is None or isinstance(results["stats"], pb.StatsResponse)
    assert results["delete"] in (None, True, False)
    return results


def test_the_fake_daemon_answers_well(fake: FakeDaemon) -> None:
    """The valid world the hostile cases start from: every call succeeds, on both fetch paths."""
    for ticket, port in ((None, None), (valid_ticket, lambda t: DATA[IDS["a"]])):
        fake.script = Script(ticket=ticket, data_port=port)
        with client_of(fake) as c:
            results = every_call(c)
            assert c.last_error is None
        assert all(results[name] is not None for name in results)
        np.testing.assert_array_equal(results["fetch"].latent(), LATENT)
        assert results["get_direct"].kind == "full" and results["get_direct"].steps == 25
    fake.script = Script(lookup=lambda r: donors())
    with client_of(fake) as c:
        assert c.get(unit(1), object_vector=unit(2), background_vector=unit(3)).kind == "composed"


def lookup_of(*candidates: pb.Candidate, miss_reason: str = "") -> Callable[[pb.LookupRequest], pb.LookupResponse]:
    return lambda r: pb.LookupResponse(candidates=list(candidates), miss_reason=miss_reason)


def with_raw_field(message: pb.Candidate, number: int, value: int) -> bytes:
    """`message` serialized with a varint field appended (a later scalar wins): values protobuf's
    setters refuse, such as a negative granted_steps sent as a 64-bit varint."""
    return message.SerializeToString() + varint(number << 3) + varint(value)


def raw_lookup(candidate_bytes: bytes) -> bytes:
    return varint(1 << 3 | 2) + varint(len(candidate_bytes)) + candidate_bytes  # LookupResponse.candidates


HOSTILE_LOOKUPS: dict[str, tuple[Callable[[pb.LookupRequest], Answer], str]] = {  # answer, why it is refused
    "mask shape [65536]*4 (its cell count wraps to 0 in int64)": (lookup_of(
        candidate(object_mask=pb.Mask(shape=[65536] * 4, bits=b""))), "cells, above 16777216"),
    "mask of five axes": (lookup_of(candidate(object_mask=pb.Mask(shape=[1] * 5, bits=b"\x80"))),
                          "not 1 to 4 positive sizes"),
    "mask with a zero axis": (lookup_of(candidate(object_mask=pb.Mask(shape=[3, 0, 4], bits=b""))),
                              "not 1 to 4 positive sizes"),
    "mask bits of another length": (lookup_of(candidate(object_mask=pb.Mask(shape=GRID, bits=b"\xff" * 5))),
                                    "bits are 5 bytes"),
    "mask of 2**24 + 1 cells": (lookup_of(candidate(object_mask=pb.Mask(shape=[(1 << 24) + 1], bits=b""))),
                                "cells, above 16777216"),
    "raw blob size at odds with its shape": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], size=100))),
                                             "blob of 100 bytes cannot hold shape"),
    "raw blob of an unknown dtype": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], dtype="object"))),
                                     "dtype 'object'"),
    "blob with a negative axis": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], shape=[-1, 192]))),
                                  "non-negative sizes"),
    "blob whose shape overflows int64": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], shape=[1 << 62] * 4))),
                                         "holds more than"),
    "blob of 2**63 bytes": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], size=1 << 63))), "is outside 1.."),
    "blob without a checksum": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], sha256=None, crc32c=None))),
                                "neither a sha256 nor a crc32c"),
    "blob with a short sha256": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], sha256=b"abc"))),
                                 "sha256 has 3 bytes"),
    "blob seed that is no integer": (lookup_of(candidate(blob=blob_info(DATA[IDS["a"]], attrs={"seed": "1e999"}))),
                                     "is not an integer"),
    "codec blob of a dtype the codec does not store": (lookup_of(candidate(
        blob=blob_info(DATA[IDS["a"]], codec="fxlc", dtype="int64"))), "not one the 'fxlc' codec stores"),
    "granted_steps 0": (lookup_of(candidate(granted=0)), "0 granted steps"),
    "granted_steps of all the steps": (lookup_of(candidate(granted=NS.total_steps)), "50 granted steps of 50"),
    "granted_steps 2**32 - 1": (lookup_of(candidate(granted=(1 << 32) - 1)), "4294967295 granted steps"),
    "negative granted_steps (a 64-bit varint)": (lambda r: raw_lookup(with_raw_field(candidate(), 3, (1 << 64) - 5)),
                                                 "granted steps of 50"),
    "unknown role": (lookup_of(candidate(role=7)), "unknown role 7"),
    "unspecified role": (lookup_of(candidate(role=pb.ROLE_UNSPECIFIED)), "unknown role 0"),
    "negative role": (lambda r: raw_lookup(with_raw_field(candidate(), 4, (1 << 64) - 1)), "unknown role -1"),
    "similarity NaN": (lookup_of(candidate(similarity=float("nan"))), "not a cosine similarity"),
    "similarity 5": (lookup_of(candidate(similarity=5.0)), "not a cosine similarity"),
    "entry id that is not one": (lookup_of(candidate(entry_id="../../etc/passwd")), "not 64 lowercase hex"),
    "intermediate latent as a donor": (lookup_of(candidate(IDS["a"], pb.ROLE_OBJECT, 5, blob=blob_info(
        DATA[IDS["a"]], step=5)), candidate(IDS["b"], pb.ROLE_BACKGROUND, 5)), "offered as a object match"),
    "intermediate latent granted another step": (lookup_of(candidate(granted=25, blob=blob_info(
        DATA[IDS["a"]], step=20))), "offered as a full match for 25 steps"),
    "blob step past the total": (lookup_of(candidate(granted=25, blob=blob_info(DATA[IDS["a"]], step=99))),
                                 "step 99 is not below"),
    "whole-prompt match among donors": (lookup_of(candidate(IDS["a"], pb.ROLE_OBJECT, 5), candidate(IDS["b"])),
                                        "1 whole-prompt matches among 2"),
    "two hundred candidates for top_k 3": (lookup_of(*[candidate()] * 200), "200 candidates for top_k 3"),
    "unparsable bytes": (lambda r: b"\xff\xff\xff", "Exception deserializing response"),
}


@pytest.mark.parametrize("name", HOSTILE_LOOKUPS)
def test_a_hostile_lookup_answer_is_a_miss(fake: FakeDaemon, name: str, caplog) -> None:
    answer, reason = HOSTILE_LOOKUPS[name]
    fake.script = Script(lookup=answer)
    with client_of(fake) as c, caplog.at_level(logging.WARNING, "flexcache.client"):
        assert c.lookup(unit(1), top_k=3) is None
        assert reason in str(c.last_error)
        results = every_call(c)
    assert results["lookup"] is None and results["get"] is None and results["get_direct"] is None
    assert "treated as a miss" in caplog.text and reason in caplog.text


def header_for(request: pb.FetchRequest, **fields: Any) -> pb.FetchHeader:
    return pb.FetchHeader(entry_id=fields.pop("entry_id", request.entry_id), prompt="p",
                          blob=fields.pop("blob", BLOBS.get(request.entry_id)))


HOSTILE_STREAMS: dict[str, tuple[Callable[[pb.FetchRequest], list[Answer]], str]] = {
    "header for another entry": (lambda r: stream(r, header_for(r, entry_id=OTHER_ID)), "answered for entry"),
    "header whose size disagrees with its shape": (lambda r: stream(r, header_for(r, blob=blob_info(
        DATA[IDS["a"]], size=700))), "blob of 700 bytes cannot hold"),
    "header whose dtype disagrees with its size": (lambda r: stream(r, header_for(r, blob=blob_info(
        DATA[IDS["a"]], dtype="float16"))), "cannot hold shape [4, 3, 4, 4] of float16"),
    "header of 2**63 bytes": (lambda r: stream(r, header_for(r, blob=blob_info(DATA[IDS["a"]], size=1 << 63))),
                              "is outside 1.."),
    "header not the blob the lookup offered": (lambda r: stream(
        r, header_for(r, blob=blob_info(DATA[IDS["a"]], attrs={"seed": "8"}))), "not the one the lookup offered"),
    "chunks past the declared size": (lambda r: stream(r, data=DATA.get(r.entry_id, b"") + b"more"),
                                      "more than the declared 768 bytes"),
    "chunks short of the declared size": (lambda r: stream(r, data=DATA.get(r.entry_id, b"")[:-1]),
                                          "ended after 767 of 768 bytes"),
    "bytes that fail the checksum": (lambda r: stream(r, data=bytes(768)), "checksum mismatch"),
    "no header": (lambda r: stream(r)[1:], "did not start with a header"),
    "nothing at all": (lambda r: [], "ended before its header"),
    "a second header among the chunks": (lambda r: [*stream(r)[:2], pb.FetchResponse(header=header_for(r)),
                                                    *stream(r)[2:]], "an empty chunk"),
    "unparsable bytes after the header": (lambda r: [stream(r)[0], b"\xff\xff\xff"], "unparsable Fetch message"),
    "unparsable header": (lambda r: [b"\x0a\xff\xff\xff\x0f", *stream(r)[1:]], "unparsable Fetch header"),
}


@pytest.mark.parametrize("name", HOSTILE_STREAMS)
def test_a_hostile_fetch_stream_is_a_miss(fake: FakeDaemon, name: str, caplog) -> None:
    answer, reason = HOSTILE_STREAMS[name]
    fake.script = Script(fetch=answer)
    with client_of(fake) as c, caplog.at_level(logging.WARNING, "flexcache.client"):
        assert c.get(unit(1)) is None
        assert reason in str(c.last_error) or (reason == "checksum mismatch" and "checksum mismatch" in caplog.text)
        results = every_call(c)
    if name != "header not the blob the lookup offered":  # which fetch() of an id alone cannot know
        assert results["fetch"] is None
    assert results["get"] is None and results["get_direct"] is None
    assert "treated as a miss" in caplog.text


def garbage(ticket: bytes) -> bytes:
    return random.Random(ticket).randbytes(768)


HOSTILE_TICKETS: dict[str, tuple[Callable[[pb.FetchRequest, int], Answer], Callable[[bytes], bytes], str]] = {
    "a data port that sends garbage": (valid_ticket, garbage, "checksum mismatch"),
    "a data port that sends too little": (valid_ticket, lambda t: DATA[IDS["a"]][:100], "after 100 of 768 bytes"),
    "a data port that sends nothing": (valid_ticket, lambda t: b"", "after 0 of 768 bytes"),
    "a data port numbered past 65535": (lambda r, port: replace_ticket(valid_ticket(r, port), data_port=70000),
                                        garbage, "for data port 70000"),
    "a data host that is no host name": (lambda r, port: replace_ticket(valid_ticket(r, port),
                                                                         data_host="evil host\n; rm -rf"),
                                         garbage, "is not a host name or address"),
    "a ticket of a thousand bytes": (lambda r, port: replace_ticket(valid_ticket(r, port), ticket=b"t" * 1000),
                                     garbage, "a ticket of 1000 bytes"),
    "a ticket for another entry": (lambda r, port: replace_ticket(valid_ticket(r, port), header=pb.FetchHeader(
        entry_id=OTHER_ID, blob=BLOBS[IDS["a"]])), garbage, "answered for entry"),
    "a ticket of 2**63 bytes": (lambda r, port: replace_ticket(valid_ticket(r, port), header=pb.FetchHeader(
        entry_id=r.entry_id, blob=blob_info(DATA[IDS["a"]], size=1 << 63))), garbage, "is outside 1.."),
}


def replace_ticket(answer: pb.FetchTicket, **fields: Any) -> pb.FetchTicket:
    for name, value in fields.items():
        getattr(answer, name).CopyFrom(value) if isinstance(value, pb.FetchHeader) else setattr(answer, name, value)
    return answer


@pytest.mark.parametrize("stream_too", [False, True], ids=["stream good", "stream hostile"])
@pytest.mark.parametrize("name", HOSTILE_TICKETS)
def test_a_hostile_data_port_is_a_miss_or_falls_back(fake: FakeDaemon, name: str, stream_too: bool, caplog) -> None:
    """Garbage from the data port falls back to the stream, which serves or is a miss in turn; a ticket
    that does not add up is a miss at once."""
    ticket, port, reason = HOSTILE_TICKETS[name]
    fake.script = Script(ticket=ticket, data_port=port,
                         fetch=HOSTILE_STREAMS["bytes that fail the checksum"][0] if stream_too else stream)
    with client_of(fake) as c, caplog.at_level(logging.WARNING, "flexcache.client"):
        fetched = c.fetch(IDS["a"], granted_steps=25)
        assert reason in caplog.text
        results = every_call(c)
    if stream_too or "data port that sends" not in name:
        assert fetched is None and results["fetch"] is None
    else:
        assert bytes(fetched.data) == DATA[IDS["a"]]


OTHER_ANSWERS: dict[str, dict[str, Callable[..., Answer]]] = {
    "put: an entry id that is not one": {"put": lambda h: pb.PutResponse(entry_id="not hex")},
    "put: unparsable": {"put": lambda h: b"\xff"},
    "stats: unparsable": {"stats": lambda r: b"\x08"},
    "delete: unparsable": {"delete": lambda r: b"\x08\xff"},
    "verify: unparsable, after a checksum failure": {
        "verify": lambda r: b"\xff", "fetch": HOSTILE_STREAMS["bytes that fail the checksum"][0]},
}


@pytest.mark.parametrize("name", OTHER_ANSWERS)
def test_other_hostile_answers_are_misses(fake: FakeDaemon, name: str) -> None:
    fake.script = Script(**OTHER_ANSWERS[name])
    with client_of(fake) as c:
        results = every_call(c)
    method = name.split(":")[0]
    assert results["fetch" if method == "verify" else method] is None


def test_a_daemon_that_requires_sha256_gets_it_from_then_on(fake: FakeDaemon, caplog) -> None:
    """A put carries its CRC-32C alone unless `put_sha256`; a daemon of an earlier release refused
    that, in these words (no earlier release can run here, so the fake answers as it did)."""
    sent: list[bytes] = []

    def put(header: pb.PutHeader) -> Answer:
        sent.append(header.blob.sha256)
        if not header.blob.sha256:
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "blob.sha256 must be 32 bytes, got 0")
        return pb.PutResponse(entry_id=IDS["a"], created=True)

    fake.script = Script(put=put)
    with caplog.at_level(logging.WARNING, logger="flexcache.client"), client_of(fake) as c:
        assert not c.put_sha256
        assert c.put("a corgi", LATENT, unit(1), seed=7) == IDS["a"]
        assert c.put("a corgi", LATENT, unit(1), seed=7) == IDS["a"] and c.put_sha256
    assert len(sent) == 3 and sent[0] == b"" and len(sent[1]) == 32 and sent[2] == sent[1]
    assert "requires each put's sha256" in caplog.text


def test_a_codec_blob_at_odds_with_its_record_is_not_decoded(fake: FakeDaemon) -> None:
    """The record says a small latent; the blob's own header says another shape: refused before the
    decoder allocates what the blob's header asks for."""
    blob = latent_codec.encode(np.zeros((4, 64, 64, 64), np.float32), max_rel_error=0.0)
    info = blob_info(blob, codec="fxlc")  # shape LATENT.shape, as the record says
    entry = IDS["a"]
    fake.script = Script(lookup=lookup_of(candidate(blob=info)),
                         fetch=lambda r: stream(r, header_for(r, blob=info), data=blob, chunk=1 << 20))
    with client_of(fake) as c:
        assert c.get(unit(1)) is None
        assert "record says float32 of shape (4, 3, 4, 4)" in str(c.last_error)
        assert c.fetch(entry) is not None  # the bytes are what was stored; only decoding refuses


# ---- a bounded seeded fuzz over valid answers ----
HOSTILE_INTS = [0, 1, 2, 5, 24, 25, 49, 50, 65535, 65536, (1 << 31) - 1, (1 << 32) - 1]
HOSTILE_FLOATS = [float("nan"), float("inf"), -float("inf"), 1.5, -1.0, 0.0, 1e30, 0.97]
HOSTILE_STRINGS = ["", "float32", "float16", "bfloat16", "int64", "object", "V8", "<M8", "raw", "fxlc", "lz4",
                   "x" * 300, "\x00", IDS["a"], IDS["b"], OTHER_ID, "-1", "1e999"]


@dataclass
class Mutator:
    rng: random.Random
    applied: list[str] = field(default_factory=list)

    def shape(self) -> list[int]:
        return [self.rng.choice([0, 1, 3, 4, 16, 192, 65536, 1 << 40, -1]) for _ in range(self.rng.randrange(7))]

    def blob(self, blob: pb.BlobInfo) -> None:
        name = self.rng.choice(["size", "sha256", "codec", "dtype", "shape", "step", "seed", "crc32c"])
        self.applied.append(f"blob.{name}")
        if name == "size":
            blob.size = self.rng.choice([0, 1, 767, 769, 1 << 40, 1 << 63, (1 << 64) - 1])
        elif name == "sha256":
            blob.sha256 = self.rng.randbytes(self.rng.choice([0, 31, 32, 33]))
        elif name in ("codec", "dtype"):
            setattr(blob, name, self.rng.choice(HOSTILE_STRINGS))
        elif name == "shape":
            del blob.shape[:]
            blob.shape.extend(self.shape())
        elif name == "step":
            blob.step = self.rng.choice(HOSTILE_INTS)
        elif name == "seed":
            blob.attrs["seed"] = self.rng.choice(HOSTILE_STRINGS)
        else:
            blob.crc32c = self.rng.getrandbits(32)

    def candidate(self, c: pb.Candidate) -> None:
        name = self.rng.choice(["entry_id", "similarity", "granted_steps", "role", "blob", "blob", "mask", "mask"])
        self.applied.append(f"candidate.{name}")
        if name == "entry_id":
            c.entry_id = self.rng.choice(HOSTILE_STRINGS)
        elif name == "similarity":
            c.similarity = self.rng.choice(HOSTILE_FLOATS)
        elif name == "granted_steps":
            c.granted_steps = self.rng.choice(HOSTILE_INTS)
        elif name == "role":
            c.role = self.rng.choice([-1, 0, 1, 2, 3, 4, 1 << 20])
        elif name == "blob":
            self.blob(c.blob)
        else:
            shape = [self.rng.choice([1, 3, 4, 65536, (1 << 32) - 1]) for _ in range(self.rng.randrange(6))]
            cells = math.prod(shape) if shape else 0
            length = self.rng.choice([0, 1, (cells + 7) // 8 if cells < 1 << 20 else 3, 6])
            c.object_mask.CopyFrom(pb.Mask(shape=shape, bits=self.rng.randbytes(length)))

    def raw(self, data: bytes) -> bytes:
        """Flip, cut or pad the serialized message."""
        how = self.rng.choice(["flip", "cut", "pad"])
        self.applied.append(f"bytes.{how}")
        if how == "cut" or not data:
            return data[:self.rng.randrange(len(data) + 1)]
        if how == "pad":
            return data + self.rng.randbytes(self.rng.randrange(1, 9))
        out = bytearray(data)
        for _ in range(self.rng.randrange(1, 4)):
            out[self.rng.randrange(len(out))] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def message(self, message: Any, fields: Callable[[Any], None]) -> Answer:
        if self.rng.random() < 0.25:
            return self.raw(message.SerializeToString())
        for _ in range(self.rng.randrange(1, 3)):
            fields(message)
        return message


def fuzz_script(rng: random.Random, mutator: Mutator) -> Script:
    """A valid world with one to three of its answers mutated."""
    def lookup_answer(_request: pb.LookupRequest) -> Answer:
        response = donors() if whole_or_parts else pb.LookupResponse(candidates=[candidate(), candidate(IDS["b"])])
        return mutator.message(response, lambda m: mutator.candidate(rng.choice(m.candidates)))

    def fetch_answer(request: pb.FetchRequest) -> list[Answer]:
        messages = stream(request)
        if rng.random() < 0.5:
            header = messages[0]
            messages[0] = mutator.message(header, lambda m: mutator.blob(m.header.blob) if rng.random() < 0.8
                                          else setattr(m.header, "entry_id", rng.choice(HOSTILE_STRINGS)))
        else:
            i = rng.randrange(1, len(messages))
            messages[i] = mutator.raw(messages[i].SerializeToString())
            if rng.random() < 0.3:
                messages.insert(i, messages[i])
        return messages

    def ticket_answer(request: pb.FetchRequest, port: int) -> Answer:
        ticket = valid_ticket(request, port)
        return mutator.message(ticket, lambda m: rng.choice([
            lambda: mutator.blob(m.header.blob), lambda: setattr(m, "data_port", rng.choice(HOSTILE_INTS)),
            lambda: setattr(m, "ticket", rng.randbytes(rng.choice([0, 15, 16, 17]))),
            lambda: setattr(m.header, "entry_id", rng.choice(HOSTILE_STRINGS))])())

    def data_answer(ticket: bytes) -> bytes:
        return mutator.raw(DATA[IDS["a"]])

    def unary(valid: Any) -> Callable[[Any], Answer]:
        return lambda _request: mutator.raw(valid.SerializeToString())

    whole_or_parts = rng.random() < 0.5
    script = Script(ticket=valid_ticket if rng.random() < 0.5 else None, data_port=lambda t: DATA[IDS["a"]])
    hostile = {"lookup": lookup_answer, "fetch": fetch_answer, "ticket": ticket_answer, "data_port": data_answer,
               "put": unary(pb.PutResponse(entry_id=IDS["a"], created=True)),
               "stats": unary(pb.StatsResponse(entries=3, bytes=100, namespaces=[pb.NamespaceStats(name="n")])),
               "delete": unary(pb.DeleteResponse(deleted=True)), "verify": unary(pb.VerifyResponse(deleted=True))}
    chosen = rng.sample(sorted(hostile), rng.randrange(1, 4))
    mutator.applied.append(f"answers {chosen}")
    return replace(script, **{name: hostile[name] for name in chosen})


FUZZ_CASES = 300


def test_fuzzed_answers_never_raise(fake: FakeDaemon) -> None:
    misses = 0
    for case in range(FUZZ_CASES):
        rng = random.Random(case)
        mutator = Mutator(rng)
        fake.script = fuzz_script(rng, mutator)
        with client_of(fake) as c:
            try:
                results = every_call(c)
            except Exception as exc:  # report the case, so it can be replayed by its seed
                raise AssertionError(f"fuzz case {case} ({', '.join(mutator.applied)}): {exc!r}") from exc
        misses += any(value is None for value in results.values())
    assert misses > FUZZ_CASES // 2  # the mutations do reach the client's checks
