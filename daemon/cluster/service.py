"""NodeService's gRPC methods (node.proto): what peers and operators ask of this node alone.

Like CacheService's, each method takes its request as raw bytes and runs inside the CacheServicer's
`call` (watched, decoded, counted, domain errors mapped to statuses). With auth on, every method but
Hello needs an admin credential: peers send peer_token. A daemon outside a cluster serves them too
(Backup is for any daemon); Drain then says there is nowhere to drain to.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from typing import TYPE_CHECKING

import grpc

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import wire

from .. import backup
from ..auth import Identity
from ..errors import InvalidRequest, PermissionDenied, WrongPath
from ..messages import decoded, one_request

if TYPE_CHECKING:
    from ..cache import Cache
    from ..server import CacheServicer
    from . import Cluster

MAX_IDS = 10_000  # entry ids in one Has or Forget
SERVICE_NAME = npb.DESCRIPTOR.services_by_name["NodeService"].full_name


class NodeServicer:
    def __init__(self, front: CacheServicer, node_id: str, on_drain: Callable[[], None], backup_dir: str = ""):
        self.front = front
        self.node_id = node_id
        self.backup_dir = backup_dir  # where Backup may write (backup.within)
        self.on_drain = on_drain  # the daemon's health goes NOT_SERVING
        self.cache: Cache | None = None  # this node's own, once open
        self.cluster: Cluster | None = None  # None outside a cluster

    def _admin(self, who: Identity, method: str) -> None:
        if self.front.access.on and not who.admin:
            raise PermissionDenied(f"NodeService.{method} needs an admin credential (a peer's peer_token)")

    def _ids(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        if len(ids) > MAX_IDS:
            raise InvalidRequest(f"{len(ids)} entry ids in one call, above {MAX_IDS}")
        return ids

    def _unary(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext, kind: type,
               answer: Callable[[Cache, object], object]) -> object:
        with self.front.call(method, context) as (_, watch, who):
            self._admin(who, method)
            request = one_request(watch, requests, kind)
            assert self.cache is not None  # `call` answered UNAVAILABLE while storage was not open
            return answer(self.cache, request)

    def Hello(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.HelloResponse:
        with self.front.call("Hello", context, counted=False, needs_cache=False) as (_, watch, _):
            one_request(watch, requests, npb.HelloRequest)
            if self.cluster is not None:
                return self.cluster.node.hello()
            return npb.HelloResponse(node_id=self.node_id, state=npb.NODE_SERVING if self.cache else npb.NODE_JOINING,
                                     entries=self.cache.entry_count() if self.cache else 0)

    def Gather(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.LookupResponse:
        return self._unary("Gather", requests, context, pb.LookupRequest,
                           lambda cache, r: cache.gather(cache.lookup_query(r)).to_response())  # type: ignore[return-value]

    def Replicate(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutResponse:
        with self.front.call("Replicate", context, stream=True) as (_, watch, who):
            self._admin(who, "Replicate")
            assert self.cache is not None
            messages = decoded(watch, requests, pb.PutRequest)
            first = next(messages, None)
            if first is None or first.WhichOneof("msg") != "header":
                raise InvalidRequest("the first Replicate message must be a header")
            session = self.cache.begin_put(first.header, charge=False)  # the writer as the coordinator stamped it
            if session.existing:
                return pb.PutResponse(entry_id=session.entry_id, created=False)
            self.front.guard.hold(watch, first.header.blob.size)
            with closing(session):  # a copy cut short gives its bytes up at once
                for message in messages:
                    if message.WhichOneof("msg") != "chunk":
                        raise InvalidRequest("only chunks may follow the Replicate header")
                    session.add_chunk(message.chunk)
                return session.finish()

    def FetchLocal(self, requests: Iterator[bytes], context: grpc.ServicerContext
                   ) -> Iterator[pb.FetchResponse | bytes]:
        with self.front.call("FetchLocal", context, stream=True) as (_, watch, who):
            self._admin(who, "FetchLocal")
            assert self.cache is not None
            header, chunks = self.cache.fetch(one_request(watch, requests, pb.FetchRequest), charge=False)
            with closing(chunks):
                yield from watch.sending(itertools.chain((pb.FetchResponse(header=header),),
                                                         map(wire.encode_chunk, chunks)))

    def VerifyLocal(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.VerifyResponse:
        return self._unary("VerifyLocal", requests, context, pb.VerifyRequest,
                           lambda cache, r: cache.verify(r))  # type: ignore[return-value]

    def Has(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.HasResponse:
        def has(cache: Cache, r: npb.HasRequest) -> npb.HasResponse:
            ids = self._ids(r.entry_ids)
            held = cache.held(ids)
            keeps = self.cluster.node.keeps(ids, held) if self.cluster is not None else held
            return npb.HasResponse(held=held, keeps=keeps)
        return self._unary("Has", requests, context, npb.HasRequest, has)  # type: ignore[arg-type,return-value]

    def Forget(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.ForgetResponse:
        def forget(cache: Cache, r: npb.ForgetRequest) -> npb.ForgetResponse:
            namespace = r.namespace if r.HasField("namespace") else None
            return npb.ForgetResponse(forgotten=cache.forget(self._ids(r.entry_ids), namespace))
        return self._unary("Forget", requests, context, npb.ForgetRequest, forget)  # type: ignore[arg-type,return-value]

    def TouchEntries(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.TouchResponse:
        def touch(cache: Cache, r: npb.TouchRequest) -> npb.TouchResponse:
            for t in r.touches[:MAX_IDS]:
                cache.touch(t.entry_id, wire.ROLE_BY_ENUM.get(t.role), t.granted_steps)
            return npb.TouchResponse()
        return self._unary("TouchEntries", requests, context, npb.TouchRequest, touch)  # type: ignore[arg-type,return-value]

    def Drain(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.DrainResponse:
        def drain(cache: Cache, _: object) -> npb.DrainResponse:
            if self.cluster is None:
                raise WrongPath("this daemon is not in a cluster (peers, peers_dns): there is nowhere to drain to")
            if self.cluster.membership.state != npb.NODE_DRAINING:
                self.cluster.drain()
                self.on_drain()
            return npb.DrainResponse(state=npb.NODE_DRAINING, entries=cache.entry_count())
        return self._unary("Drain", requests, context, npb.DrainRequest, drain)  # type: ignore[return-value]

    def CopyStepTables(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.StepTablesResponse:
        def copy(cache: Cache, r: npb.StepTablesCopy) -> pb.StepTablesResponse:
            return cache.copy_step_tables(r.namespace, r.admin if r.HasField("admin") else None,
                                          r.current if r.HasField("current") else None, r.version)
        return self._unary("CopyStepTables", requests, context, npb.StepTablesCopy, copy)  # type: ignore[arg-type,return-value]

    def StepTablesLocal(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.StepTablesResponse:
        return self._unary("StepTablesLocal", requests, context, pb.StepTablesRequest,  # type: ignore[return-value]
                           lambda cache, r: cache.step_tables(r))  # type: ignore[arg-type]

    def SyncStepTables(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.StepTablesSync:
        def sync(cache: Cache, r: npb.StepTablesSync) -> npb.StepTablesSync:
            if self.cluster is None:
                raise WrongPath("this daemon is not in a cluster (peers, peers_dns): it has no members to sync with")
            return self.cluster.node.merge_tables(r)
        return self._unary("SyncStepTables", requests, context, npb.StepTablesSync, sync)  # type: ignore[arg-type,return-value]

    def ReportQualityLocal(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ReportQualityResponse:
        def report(cache: Cache, r: pb.ReportQualityRequest) -> pb.ReportQualityResponse:
            if self.cluster is not None:
                return self.cluster.node.decide_quality(r)
            return cache.report_quality(r, charge=False)
        return self._unary("ReportQualityLocal", requests, context, pb.ReportQualityRequest,  # type: ignore[return-value]
                           report)  # type: ignore[arg-type]

    def Backup(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> npb.BackupResponse:
        return self._unary("Backup", requests, context, npb.BackupRequest,  # type: ignore[return-value]
                           lambda cache, r: backup.backup(cache.store, backup.within(self.backup_dir, r.path),
                                                          entries=cache.entry_count(), node=self.node_id))
