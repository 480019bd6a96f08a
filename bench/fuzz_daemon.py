"""Fuzz a real daemon: every CacheService RPC and the data port, with mutated valid requests and garbage
(garbage to NodeService's methods too).

    .venv/bin/python -m bench.fuzz_daemon --cases 20000            # a fresh daemon of its own
    .venv/bin/python -m bench.fuzz_daemon --cases 5000 --seed 7    # another sequence of cases

tests/test_fuzz.py runs the same engine on a few thousand cases in CI; this runs a longer one. Case
INDEX is drawn from `random.Random(f"{seed}:{index}")` and the entries the cases before it stored, so
`--cases INDEX+1` with the same seed reproduces a failure exactly, and `--only INDEX` (that case alone,
on a fresh daemon) usually does. The kinds of case:

- field-level mutation: a valid request (Put header and stream, PutDirect, Lookup, Fetch, FetchDirect,
  Delete, Verify, Stats) with one to three of its fields, nested ones too, set to edge values of their type
  (0, the type's bounds, NaN and infinities, 300 KB strings, 5,000 repeated values, unknown enum
  numbers...), sent with the generated stub; a Put's stream is also reordered, truncated or padded;
- byte-level mutation: such a request serialized, then bits flipped, bytes inserted, deleted,
  duplicated or cut, sent as raw bytes through a generic channel call;
- garbage: random bytes to a random method of CacheService or NodeService;
- the data port: random tickets and bytes, truncated and replayed tickets, and real tickets that must
  bring back exactly the entry's bytes.

What must hold (`Report.failures` lists every breach): every call returns within its deadline; its
status is one of ALLOWED (the daemon decodes requests itself: an undecodable one is
INVALID_ARGUMENT); an answered Fetch or data port transfer carries exactly the bytes its header's
size and checksum describe; a random ticket brings back nothing; and the daemon process is alive.
`check_kept` then checks that entries stored with the normal client before the fuzz are still found
by lookup and fetched bit-exact on both paths (data port and stream), and that Stats answers.
Measurements go in docs/hardening.md.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import crc32c
import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from flexcache.client import CacheClient, Namespace
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import wire
from flexcache.v1.wire import data_hello as hello

NS = Namespace(tenant="fuzz", model="wan2.1-t2v-1.3b", width=832, height=480, frames=81, scheduler="flow",
               total_steps=50)
OTHER_NS = Namespace(tenant="fuzz-other", model="m", width=64, height=64, frames=8, scheduler="ddim", total_steps=20)
DIM = 384
DEADLINE_S = 10.0
"""Every call's deadline: far past any answer the daemon gives (milliseconds); reaching it is a hang."""
ALLOWED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
                     grpc.StatusCode.FAILED_PRECONDITION})
"""The statuses a request of a client's making may get: the daemon's answers to a client's fault, and
gRPC's RESOURCE_EXHAUSTED for a message over the limit. INTERNAL, UNKNOWN (an exception escaped a
handler), UNAVAILABLE and DEADLINE_EXCEEDED are the daemon's fault."""
METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["CacheService"].methods}
GARBAGE_METHODS = {m.full_name: m for service in (pb.DESCRIPTOR.services_by_name["CacheService"],
                                                  npb.DESCRIPTOR.services_by_name["NodeService"])
                   for m in service.methods}
"""Garbage goes to NodeService's methods too: a node's peers and operators call them (node.proto)."""
KINDS = {"Put": 20, "PutDirect": 8, "Lookup": 20, "Fetch": 10, "FetchDirect": 10, "Delete": 6, "Verify": 6,
         "Stats": 3, "SetStepTables": 3, "GetStepTables": 2, "ReportQuality": 4, "garbage": 10, "dataport": 15}
"""Relative weights of the case kinds."""

_INT_RANGES = {FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
               FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
               FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_ENUM: (-2**31, 2**31 - 1)}
_FLOATS = (0.0, -0.0, float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-45, 1e-30, 1.0, -1.0, 0.5,
           3600.0, 3601.0, 1e30)


def _matches(data: bytes, blob: pb.BlobInfo) -> bool:
    """Whether `data` has the checksum its blob info declares: its sha256 if it has one, else its CRC-32C."""
    if blob.sha256:
        return hashlib.sha256(data).digest() == blob.sha256
    return blob.HasField("crc32c") and crc32c.crc32c(data) == blob.crc32c


@dataclass(frozen=True)
class Kept:
    """An entry stored with the normal client before the fuzz, which must come through it intact."""

    entry_id: str
    prompt: str
    vector: np.ndarray
    latent: np.ndarray


@dataclass
class Report:
    cases: Counter[str] = field(default_factory=Counter)  # by kind ("Lookup", "dataport", ...) and mode
    codes: Counter[str] = field(default_factory=Counter)  # status names of every call, data port outcomes
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, index: int, kind: str, what: str) -> None:
        self.failures.append(f"case {index} ({kind}): {what}")

    def summary(self) -> str:
        total = sum(self.cases.values())
        lines = [f"fuzz: {total} cases in {self.seconds:.1f} s, {len(self.failures)} failures"]
        by_kind: Counter[str] = Counter()
        for name, n in self.cases.items():
            by_kind[name.split("/")[0]] += n
        lines.append("  cases: " + ", ".join(f"{k} {n}" for k, n in by_kind.most_common()))
        lines.append("  modes: " + ", ".join(f"{k} {n}" for k, n in sorted(self.cases.items())))
        lines.append("  codes: " + ", ".join(f"{k} {n}" for k, n in self.codes.most_common()))
        lines += [f"  FAIL {f}" for f in self.failures[:20]]
        return "\n".join(lines)


def put_kept(target: str, count: int = 4, seed: int = 0) -> list[Kept]:
    """Entries stored the normal way (CacheClient, lossless), for `check_kept` after the fuzz."""
    rng = np.random.default_rng(seed)
    kept = []
    with CacheClient(target, NS, timeout_s=DEADLINE_S, max_rel_error=0.0) as client:
        for i in range(count):
            vector = _unit(rng)
            latent = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
            prompt = f"kept entry {i}: a red fox in the snow"
            parts = {"object_vector": _unit(rng), "background_vector": _unit(rng)} if i % 2 else {}
            eid = client.put(prompt, latent, vector, seed=i, **parts)
            if eid is None:
                raise RuntimeError(f"storing kept entry {i} failed: {client.last_error}")
            kept.append(Kept(eid, prompt, vector, latent))
    return kept


def check_kept(target: str, kept: list[Kept]) -> list[str]:
    """What is wrong with the kept entries after the fuzz (empty: nothing): each must be found by a
    lookup of its vector and fetched bit-exact over the data port and over the stream; Stats must
    answer and count them."""
    problems = []
    for data_port in (True, False):
        with CacheClient(target, NS, timeout_s=DEADLINE_S, max_rel_error=0.0, data_port=data_port) as client:
            for entry in kept:
                found = client.lookup(entry.vector, top_k=8)
                if found is None or entry.entry_id not in [c.entry_id for c in found.candidates]:
                    problems.append(f"kept entry {entry.entry_id} not found by lookup: {found}")
                fetched = client.fetch(entry.entry_id)
                if fetched is None:
                    problems.append(f"kept entry {entry.entry_id} not fetched (data_port={data_port})")
                elif not np.array_equal(np.asarray(fetched.latent()), entry.latent):
                    problems.append(f"kept entry {entry.entry_id} fetched with other bytes (data_port={data_port})")
            stats = client.stats()
            if stats is None or stats.entries < len(kept):
                problems.append(f"Stats after the fuzz: {stats}")
    return problems


class Fuzzer:
    """Runs cases against the daemon at `target` (data port `data_port`, None: none). `kept` entries
    are read but never deleted; entries a case stores are fodder for the cases after it."""

    def __init__(self, target: str, data_port: int | None, kept: list[Kept], seed: int = 0):
        self.target = target
        self.host = target.rpartition(":")[0]
        self.data_port = data_port
        self.seed = seed
        self.kept = kept
        self.kept_ids = frozenset(k.entry_id for k in kept)
        self.fodder: list[str] = []  # ids the fuzz stored itself, which it may delete
        self.report = Report()
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20),
                                                               ("grpc.max_receive_message_length", 16 << 20)])
        self._stub = pb_grpc.CacheServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, cases: int, start: int = 0, alive: Callable[[], bool] = lambda: True) -> Report:
        """Cases start..start+cases-1; `alive` says whether the daemon process still runs (checked every
        100 cases and at the end: a dead daemon ends the run)."""
        began = time.perf_counter()
        kinds, weights = zip(*KINDS.items(), strict=True)
        for index in range(start, start + cases):
            rng = random.Random(f"{self.seed}:{index}")
            kind = rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            try:
                getattr(self, f"_case_{kind.lower()}")(rng, index)
            except Exception as exc:  # a bug of the fuzzer, or an answer it could not read: both reported
                self.report.fail(index, kind, f"{type(exc).__name__}: {exc}")
            if time.monotonic() - t0 > DEADLINE_S * 2:
                self.report.fail(index, kind, f"took {time.monotonic() - t0:.1f} s")
            if (index % 100 == 99 or index == start + cases - 1) and not alive():
                self.report.fail(index, kind, "the daemon process is gone")
                break
        self.report.seconds += time.perf_counter() - began
        return self.report

    # ---- outcome bookkeeping ----
    def _outcome(self, index: int, kind: str, error: grpc.RpcError | None, request: object = None) -> None:
        code = grpc.StatusCode.OK if error is None else error.code()
        details = "" if error is None else (error.details() or "")
        self.report.codes[code.name] += 1
        if code not in ALLOWED:
            self.report.fail(index, kind, f"{code.name}: {details[:300]!r} for {_brief(request)}")

    def _call(self, index: int, kind: str, call: Callable[[], Any], request: object = None) -> Any:
        try:
            answer = call()
        except grpc.RpcError as error:
            self._outcome(index, kind, error, request)
            return None
        self._outcome(index, kind, None, request)
        return answer

    # ---- templates: valid requests ----
    def _namespace(self, rng: random.Random) -> pb.Namespace:
        return (NS if rng.random() < 0.85 else OTHER_NS).to_proto()

    def _vectors(self, rng: random.Random, parts: bool) -> pb.Vectors:
        np_rng = np.random.default_rng(rng.getrandbits(32))
        if self.kept and rng.random() < 0.3:  # near a stored entry: lookups that hit
            full = self.kept[rng.randrange(len(self.kept))].vector + 0.05 * _unit(np_rng)
        else:
            full = _unit(np_rng)
        if not parts:
            return pb.Vectors(full=full.tolist())
        return pb.Vectors(full=full.tolist(), object=_unit(np_rng).tolist(), background=_unit(np_rng).tolist())

    def _some_id(self, rng: random.Random, deletable: bool) -> str:
        pool = self.fodder + ([] if deletable else list(self.kept_ids))
        if pool and rng.random() < 0.8:
            return rng.choice(pool)
        return hashlib.sha256(rng.randbytes(8)).hexdigest()

    def _put_template(self, rng: random.Random) -> tuple[pb.PutHeader, bytes]:
        size = rng.choice((1, 17, 4096, rng.randrange(1, 65536))) if rng.random() < 0.97 else 3 << 19
        data = rng.randbytes(size)
        blob = pb.BlobInfo(size=size, sha256=hashlib.sha256(data).digest(), codec="raw", dtype="uint8", shape=[size],
                           step=rng.choice((0, 0, 0, 10)), attrs={"seed": str(rng.randrange(1000))})
        if rng.random() < 0.7:
            blob.crc32c = crc32c.crc32c(data)
        ns = self._namespace(rng)
        if blob.step >= ns.total_steps:
            blob.step = 0
        header = pb.PutHeader(namespace=ns, prompt=f"fuzz prompt {rng.random()}", blob=blob,
                              vectors=self._vectors(rng, parts=rng.random() < 0.4), step_seconds=rng.random())
        if rng.random() < 0.3:
            header.object_mask.CopyFrom(pb.Mask(shape=[2, 4, 4], bits=rng.randbytes(4)))
        return header, data

    def _template(self, rng: random.Random, kind: str) -> Message:
        ns = self._namespace(rng)
        if kind == "Lookup":
            roles = rng.choice(([], [], [pb.ROLE_OBJECT], [pb.ROLE_BACKGROUND], [pb.ROLE_OBJECT, pb.ROLE_BACKGROUND]))
            return pb.LookupRequest(namespace=ns, vectors=self._vectors(rng, parts=rng.random() < 0.5),
                                    top_k=rng.choice((0, 1, 3, 64)), partial_roles=roles)
        if kind in ("Fetch", "FetchDirect"):
            return pb.FetchRequest(namespace=ns, entry_id=self._some_id(rng, deletable=False),
                                   role=rng.choice((0, 1, 2, 3)), granted_steps=rng.choice((0, 5, 15)))
        if kind == "Delete":
            return pb.DeleteRequest(namespace=ns, entry_id=self._some_id(rng, deletable=True))
        if kind == "Verify":
            return pb.VerifyRequest(namespace=ns, entry_id=self._some_id(rng, deletable=False))
        if kind == "SetStepTables":  # never the kept entries' namespace: their lookups must still hit afterwards
            tables = pb.StepTables(whole=[pb.StepTier(min_similarity=0.9, fraction=0.3),
                                          pb.StepTier(min_similarity=0.7, fraction=0.1)],
                                   composed=[pb.ComposedTier(min_object_similarity=0.8, min_background_similarity=0.8,
                                                             fraction=0.1)])
            return pb.SetStepTablesRequest(namespace=OTHER_NS.to_proto(), tables=tables, reset=rng.random() < 0.2)
        if kind == "GetStepTables":
            return pb.StepTablesRequest(namespace=ns)
        if kind == "ReportQuality":
            tables = ("whole", "composed", "partial_object", "partial_background")
            return pb.ReportQualityRequest(namespace=ns, samples=[
                pb.QualitySample(table=rng.choice(tables), similarity=rng.uniform(0.5, 1.0),
                                 background_similarity=rng.uniform(0.5, 1.0), granted_steps=rng.choice((5, 10, 15, 25)),
                                 loss=rng.uniform(-20, 20)) for _ in range(rng.randint(0, 8))])
        return pb.StatsRequest()

    # ---- cases ----
    def _case_put(self, rng: random.Random, index: int) -> None:
        header, data = self._put_template(rng)
        mode = rng.choice(("valid", "fields", "fields", "stream", "bytes"))
        if mode == "fields":
            for _ in range(rng.randint(1, 3)):
                mutate(rng, header)
        messages = [pb.PutRequest(header=header)]
        messages += [pb.PutRequest(chunk=data[i:i + wire.CHUNK_BYTES]) for i in range(0, len(data), wire.CHUNK_BYTES)]
        if mode == "stream":
            messages = _mutate_stream(rng, messages, data)
        self.report.cases[f"Put/{mode}"] += 1
        if mode == "bytes":
            raw = [m.SerializeToString() for m in messages]
            at = rng.randrange(len(raw)) if rng.random() < 0.5 else 0
            raw[at] = mutate_bytes(rng, raw[at])
            call = self._channel.stream_unary(f"/{wire.SERVICE_NAME}/Put")
            self._call(index, "Put", lambda: call(iter(raw), timeout=DEADLINE_S), raw[at])
            return
        answer = self._call(index, "Put", lambda: self._stub.Put(iter(messages), timeout=DEADLINE_S), header)
        if answer is not None and answer.entry_id not in self.kept_ids and answer.entry_id not in self.fodder:
            self.fodder.append(answer.entry_id)

    def _case_putdirect(self, rng: random.Random, index: int) -> None:
        """A PutDirect header (valid or mutated), then, with a ticket, its bytes on the data port: as
        declared, one byte flipped, or cut short. The reply must be a status a client's fault may get,
        OK for the valid bytes; a short transfer must be closed without a reply."""
        header, data = self._put_template(rng)
        mode = rng.choice(("valid", "fields", "flipped", "short"))
        if mode == "fields":
            for _ in range(rng.randint(1, 3)):
                mutate(rng, header)
        self.report.cases[f"PutDirect/{mode}"] += 1
        answer = self._call(index, "PutDirect", lambda: self._stub.PutDirect(header, timeout=DEADLINE_S), header)
        if answer is None or not answer.ticket or self.data_port is None:
            return
        payload = bytearray(data)
        if mode == "flipped":
            payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        elif mode == "short":
            del payload[rng.randrange(len(payload)):]
        try:
            with self._connect() as conn:
                conn.sendall(answer.ticket + payload)
                with suppress(OSError):  # no next ticket: the port closes after its reply
                    conn.shutdown(socket.SHUT_WR)
                received = _read_until_closed(conn)
        except OSError as exc:
            self.report.fail(index, "dataport", f"PutDirect transfer ({mode}): {type(exc).__name__}: {exc}")
            return
        if mode == "short":
            if received:
                self.report.fail(index, "dataport", f"a reply of {len(received)} bytes to a cut-short put")
            return
        if len(received) < wire.PUT_REPLY.size:
            self.report.fail(index, "dataport", f"PutDirect ({mode}): no reply frame ({len(received)} bytes)")
            return
        code, length = wire.PUT_REPLY.unpack_from(received)
        status = next((c for c in grpc.StatusCode if c.value[0] == code), None)
        self.report.codes[f"PutDirect reply {status.name if status else code}"] += 1
        if status not in ALLOWED or len(received) != wire.PUT_REPLY.size + length or \
                (mode == "valid" and status != grpc.StatusCode.OK):
            self.report.fail(index, "dataport", f"PutDirect ({mode}): reply {status or code}, {length} bytes "
                                                f"announced, {len(received) - wire.PUT_REPLY.size} sent")
        elif status == grpc.StatusCode.OK:
            entry_id = pb.PutResponse.FromString(received[wire.PUT_REPLY.size:]).entry_id
            if entry_id not in self.kept_ids and entry_id not in self.fodder:
                self.fodder.append(entry_id)

    def _case_lookup(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "Lookup")

    def _case_delete(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "Delete")

    def _case_verify(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "Verify")

    def _case_stats(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "Stats")

    def _case_setsteptables(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "SetStepTables")

    def _case_getsteptables(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "GetStepTables")

    def _case_reportquality(self, rng: random.Random, index: int) -> None:
        self._unary(rng, index, "ReportQuality")

    def _case_fetchdirect(self, rng: random.Random, index: int) -> None:
        answer = self._unary(rng, index, "FetchDirect")
        if answer is not None and self.data_port is not None and rng.random() < 0.5:
            self._claim(index, answer)

    def _unary(self, rng: random.Random, index: int, kind: str) -> Any:
        request = self._template(rng, kind)
        mode = rng.choice(("valid", "fields", "fields", "bytes"))
        self.report.cases[f"{kind}/{mode}"] += 1
        if mode == "fields":
            for _ in range(rng.randint(1, 3)):
                mutate(rng, request)
            if kind == "Delete":
                _spare(request, self.kept_ids)  # type: ignore[arg-type]
        if mode == "bytes":
            raw = mutate_bytes(rng, request.SerializeToString())
            if kind == "Delete" and _names_kept(raw, self.kept_ids):
                return None
            call = self._channel.unary_unary(f"/{wire.SERVICE_NAME}/{kind}")
            self._call(index, kind, lambda: call(raw, timeout=DEADLINE_S), raw)
            return None
        answer = self._call(index, kind, lambda: getattr(self._stub, kind)(request, timeout=DEADLINE_S), request)
        if kind == "Delete" and answer is not None and answer.deleted:
            entry_id = request.entry_id  # type: ignore[attr-defined]
            if entry_id in self.fodder:
                self.fodder.remove(entry_id)
        return answer

    def _case_fetch(self, rng: random.Random, index: int) -> None:
        request = self._template(rng, "Fetch")
        mode = rng.choice(("valid", "fields", "fields", "bytes"))
        self.report.cases[f"Fetch/{mode}"] += 1
        if mode == "fields":
            for _ in range(rng.randint(1, 3)):
                mutate(rng, request)
        if mode == "bytes":
            raw = mutate_bytes(rng, request.SerializeToString())
            call = self._channel.unary_stream(f"/{wire.SERVICE_NAME}/Fetch")
            self._call(index, "Fetch", lambda: list(call(raw, timeout=DEADLINE_S)), raw)
            return
        responses = self._call(index, "Fetch", lambda: list(self._stub.Fetch(request, timeout=DEADLINE_S)), request)
        if responses:
            head, body = responses[0].header, b"".join(r.chunk for r in responses[1:])
            if len(body) != head.blob.size or not _matches(body, head.blob):
                self.report.fail(index, "Fetch", f"entry {head.entry_id}: {len(body)} bytes streamed, not the "
                                                 f"{head.blob.size} its header describes (or another checksum)")

    def _case_garbage(self, rng: random.Random, index: int) -> None:
        full_name = rng.choice(sorted(GARBAGE_METHODS))
        method = GARBAGE_METHODS[full_name]
        raw = rng.randbytes(rng.choice((0, 1, 2, 7, 64, rng.randrange(4096))))
        path = f"/{method.containing_service.full_name}/{method.name}"
        self.report.cases[f"garbage/{method.containing_service.name}.{method.name}"] += 1
        if method.client_streaming:
            call = self._channel.stream_unary(path)
            self._call(index, "garbage", lambda: call(iter([raw] * rng.randint(1, 3)), timeout=DEADLINE_S), raw)
        elif method.server_streaming:
            stream = self._channel.unary_stream(path)
            self._call(index, "garbage", lambda: list(stream(raw, timeout=DEADLINE_S)), raw)
        else:
            unary = self._channel.unary_unary(path)
            self._call(index, "garbage", lambda: unary(raw, timeout=DEADLINE_S), raw)

    # ---- the data port ----
    def _case_dataport(self, rng: random.Random, index: int) -> None:
        mode = rng.choice(("random", "random", "short", "replay", "real+garbage", "connect-close"))
        self.report.cases[f"dataport/{mode if self.data_port is not None else 'none'}"] += 1
        if self.data_port is None:
            return
        if mode in ("replay", "real+garbage"):
            answer = self._ticket(index, rng)
            if answer is None:
                return
            if mode == "replay":
                self._claim(index, answer)
                self._expect_nothing(index, answer.ticket)
            else:
                self._claim(index, answer, trailing=rng.randbytes(rng.randrange(1, 64)))
            return
        if mode == "connect-close":
            payload = b""
        elif mode == "short":
            payload = rng.randbytes(rng.randrange(1, 16))
        else:
            payload = rng.randbytes(rng.choice((16, 17, 32, 1000, rng.randrange(16, 70_000))))
        self._expect_nothing(index, payload)

    def _ticket(self, index: int, rng: random.Random) -> pb.FetchTicket | None:
        kept = self.kept[rng.randrange(len(self.kept))]  # a kept entry: never deleted under the transfer
        request = pb.FetchRequest(namespace=NS.to_proto(), entry_id=kept.entry_id)
        return self._call(index, "dataport", lambda: self._stub.FetchDirect(request, timeout=DEADLINE_S), request)

    def _connect(self) -> socket.socket:
        assert self.data_port is not None
        conn = socket.create_connection((self.host, self.data_port), timeout=DEADLINE_S)
        conn.settimeout(DEADLINE_S)
        conn.sendall(hello(None))  # who the client is (no auth here): then tickets, or the fuzzer's bytes
        return conn

    def _expect_nothing(self, index: int, payload: bytes) -> None:
        """Send bytes that are no live ticket: the port must send nothing back and close the connection."""
        try:
            with self._connect() as conn:
                conn.sendall(payload)
                with suppress(OSError):  # a short ticket is then a closed connection, not a wait
                    conn.shutdown(socket.SHUT_WR)
                received = _read_until_closed(conn)
        except TimeoutError:
            self.report.fail(index, "dataport", f"no answer within {DEADLINE_S} s to {len(payload)} bytes")
            return
        except OSError as exc:  # a reset is a closed connection too
            self.report.codes[f"dataport {type(exc).__name__}"] += 1
            return
        self.report.codes["dataport closed"] += 1
        if received:
            self.report.fail(index, "dataport", f"{len(received)} bytes sent back for {len(payload)} random bytes")

    def _claim(self, index: int, answer: pb.FetchTicket, trailing: bytes = b"") -> None:
        """Redeem a real ticket: exactly the entry's bytes must come back; `trailing` bytes after it are
        taken for the next ticket, refused, and the connection closed."""
        size = answer.header.blob.size
        try:
            with self._connect() as conn:
                conn.sendall(answer.ticket + trailing)
                data = bytearray()
                while len(data) < size:
                    part = conn.recv(min(1 << 20, size - len(data)))
                    if not part:
                        break
                    data += part
                with suppress(OSError):  # the port may have closed already, refusing `trailing`
                    conn.shutdown(socket.SHUT_WR)
                extra = _read_until_closed(conn)
        except TimeoutError:
            self.report.fail(index, "dataport", f"transfer of {size} bytes did not finish within {DEADLINE_S} s")
            return
        except OSError as exc:
            self.report.fail(index, "dataport", f"transfer of {size} bytes failed: {exc}")
            return
        self.report.codes["dataport transfer"] += 1
        intact = _matches(data, answer.header.blob)
        if len(data) != size or not intact or extra:
            self.report.fail(index, "dataport", f"ticket for {answer.header.entry_id}: {len(data)} of {size} bytes, "
                                                f"checksum {'right' if intact else 'wrong'}, {len(extra)} bytes after")


# ---- mutation ----
def mutate(rng: random.Random, message: Message) -> None:
    """Set one field of `message`, or of a message inside it, to an edge value of its type."""
    fields = message.DESCRIPTOR.fields
    if not fields:  # StatsRequest
        return
    f = rng.choice(fields)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        _mutate_map(rng, getattr(message, f.name))
    elif f.is_repeated:
        _mutate_repeated(rng, getattr(message, f.name), f)
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        if rng.random() < 0.25:
            message.ClearField(f.name)
        else:
            mutate(rng, getattr(message, f.name))
    else:
        setattr(message, f.name, _scalar(rng, f))


def _scalar(rng: random.Random, f: FieldDescriptor) -> Any:
    if f.type in _INT_RANGES:
        lo, hi = _INT_RANGES[f.type]
        edges = [lo, hi, 0, 1, 2, 4, 16, 49, 50, 51, 64, 65, 10_000, 10_001, 65_536, 65_537, 2**31, 2**32 - 1,
                 2**63 - 1, -1, hi // 2 + 1, rng.randint(lo, hi)]
        return rng.choice([e for e in edges if lo <= e <= hi])
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice((*_FLOATS, rng.gauss(0, 100)))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if f.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 4, 16, 31, 32, 33, 1000)))
    return _string(rng)


def _string(rng: random.Random) -> str:
    choices = ("", " ", "a", "/", "x" * 256, "x" * 257, "x" * 16_385, "t" * 300_000, "\x00", "\n\r\t", "é" * 300,
               "🙂" * 100, "../../etc/passwd", "0" * 64, "F" * 64, hashlib.sha256(rng.randbytes(4)).hexdigest(),
               "".join(rng.choice("abc/\\%:.* \x01") for _ in range(rng.randrange(40))))
    return rng.choice(choices)


def _mutate_repeated(rng: random.Random, values: Any, f: FieldDescriptor) -> None:
    if f.type == FieldDescriptor.TYPE_MESSAGE:  # a step table's tiers, a report's samples
        _mutate_repeated_messages(rng, values)
        return
    op = rng.choice(("clear", "append", "many", "edge", "truncate", "double"))
    if op == "clear":
        del values[:]
    elif op == "append":
        values.append(_scalar(rng, f))
    elif op == "many":
        n = rng.choice((2, 3, 5, 17, 65, 385, 4097, 5000, 100_000, 300_000))
        value = _scalar(rng, f)
        if isinstance(value, str | bytes) and value:  # a few times the message limit at most, not 90 GB
            n = min(n, max(2, 4 * wire.MAX_MESSAGE_BYTES // len(value)))
        values.extend([value] * n)
    elif op == "edge" and len(values):
        values[rng.randrange(len(values))] = _scalar(rng, f)
    elif op == "truncate" and len(values):
        del values[rng.randrange(len(values)):]
    elif op == "double":
        values.extend(list(values))


def _mutate_repeated_messages(rng: random.Random, values: Any) -> None:
    op = rng.choice(("clear", "append", "many", "edge", "truncate", "double"))
    if op == "clear":
        del values[:]
    elif op == "append":
        mutate(rng, values.add())
    elif op == "many" and len(values):
        for _ in range(rng.choice((65, 1025, 5000))):
            values.add().CopyFrom(values[0])
    elif op == "edge" and len(values):
        mutate(rng, values[rng.randrange(len(values))])
    elif op == "truncate" and len(values):
        del values[rng.randrange(len(values)):]
    elif op == "double":
        values.extend(list(values))


def _mutate_map(rng: random.Random, attrs: Any) -> None:
    op = rng.choice(("clear", "one", "many", "long key", "long value"))
    if op == "clear":
        attrs.clear()
    elif op == "one":
        attrs[_string(rng)[:1000]] = _string(rng)
    elif op == "many":
        attrs.update({f"k{i}": "v" for i in range(rng.choice((63, 64, 65, 5000)))})
    elif op == "long key":
        attrs["k" * rng.choice((256, 257, 100_000))] = "v"
    else:
        attrs["seed"] = "9" * rng.choice((1024, 1025, 100_000))


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """`data` with one to four random edits: a bit flipped, a byte set, bytes inserted, deleted,
    duplicated, or the end cut off."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "set", "insert", "delete", "duplicate", "cut"))
        at = rng.randrange(len(out) + 1)
        if op == "flip" and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == "set" and out:
            out[rng.randrange(len(out))] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == "insert":
            out[at:at] = rng.randbytes(rng.choice((1, 2, 5, 10)))
        elif op == "delete" and out:
            del out[at:at + rng.randint(1, 8)]
        elif op == "duplicate" and out:
            out[at:at] = out[max(0, at - 16):at]
        elif op == "cut":
            del out[at:]
    return bytes(out)


def _mutate_stream(rng: random.Random, messages: list[pb.PutRequest], data: bytes) -> list[pb.PutRequest]:
    """A Put stream out of order: no header, two headers, a chunk first, an empty or oversized chunk,
    extra or missing bytes, an empty message."""
    op = rng.choice(("no header", "two headers", "chunk first", "empty chunk", "oversized chunk", "extra bytes",
                     "missing bytes", "header only", "empty message"))
    header, chunks = messages[0], messages[1:]
    if op == "no header":
        return chunks
    if op == "two headers":
        return [header, header, *chunks]
    if op == "chunk first":
        return [*chunks[:1], header, *chunks[1:]]
    if op == "empty chunk":
        return [header, pb.PutRequest(chunk=b""), *chunks]
    if op == "oversized chunk":
        return [header, pb.PutRequest(chunk=data * ((wire.CHUNK_BYTES // len(data)) + 1))]
    if op == "extra bytes":
        return [*messages, pb.PutRequest(chunk=rng.randbytes(rng.randint(1, 100)))]
    if op == "missing bytes":
        return [header, pb.PutRequest(chunk=data[:-1])] if len(data) > 1 else [header]
    if op == "header only":
        return [header]
    return [header, pb.PutRequest(), *chunks]


# ---- helpers ----
def _unit(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _spare(request: pb.DeleteRequest, kept: frozenset[str]) -> None:
    """A mutated Delete never names a kept entry (they must survive the fuzz)."""
    if request.entry_id in kept:
        request.entry_id = "f" * 64


def _names_kept(raw: bytes, kept: frozenset[str]) -> bool:
    return any(entry_id.encode() in raw for entry_id in kept)


def _read_until_closed(conn: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            part = conn.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data)
        if not part:
            return bytes(data)
        data += part


def _brief(request: object) -> str:
    if isinstance(request, bytes):
        return f"{len(request)} raw bytes {request[:40].hex()}"
    text = str(request).replace("\n", " ")
    return text[:300] + ("..." if len(text) > 300 else "")


def fuzz(target: str, data_port: int | None, cases: int, seed: int = 0, start: int = 0,
         alive: Callable[[], bool] = lambda: True) -> tuple[Report, list[str]]:
    """Store the kept entries, run `cases` cases, check the kept entries: the report and the problems
    `check_kept` found."""
    kept = put_kept(target, seed=seed)
    with Fuzzer(target, data_port, kept, seed) as fuzzer:
        report = fuzzer.run(cases, start, alive)
    return report, check_kept(target, kept) if alive() else ["the daemon process is gone"]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_daemon", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, default=None, help="run only this case index (to reproduce a failure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.launch import daemon

    args = _args(argv)
    start, cases = (args.only, 1) if args.only is not None else (0, args.cases)
    with daemon(log_level="WARNING") as process:
        report, problems = fuzz(process.target, process.data_port, cases, args.seed, start,
                                alive=lambda: process.running)
        alive = process.running
    print(report.summary())
    for problem in problems:
        print(f"  AFTER {problem}")
    print(f"  daemon alive at the end: {alive}; kept entries intact: {not problems}")
    return 0 if alive and not report.failures and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
