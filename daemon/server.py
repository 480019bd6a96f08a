"""gRPC front end: translates CacheService calls to the cache core and domain errors to status codes.

Also owns the process lifecycle: the health service reports NOT_SERVING until the store and index
are open and reconciled, and SIGTERM drains in-flight calls before closing storage.

Every method, of CacheService, health and reflection alike, is registered to take its request as a
stream of raw bytes, whatever its arity in the proto (the two are the same on the wire). So the
daemon's own code reads and decodes each request: the wait for it is watched (guard.py: a client that
sends no request within stream_idle_seconds is cut, as a stalled stream is), and bytes that do not
decode are the client's mistake (INVALID_ARGUMENT, counted, logged once per client and interval)
rather than gRPC's logged traceback and INTERNAL. Streams (Put, Fetch, health Watch, reflection) run
on a thread pool of their own (stream_workers), apart from the unary calls' (workers).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import closing, contextmanager

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, symbol_database
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import wire

from . import tls
from .access import OPEN, Access, bearer_token
from .auth import AuthConfigError, Credentials, Identity
from .build import open_cache
from .cache import Cache, PutSession
from .cluster import Cluster, node_id_of, open_cluster
from .cluster.node import ClusterNode, ClusterPut
from .cluster.service import SERVICE_NAME as NODE_SERVICE_NAME
from .cluster.service import NodeServicer
from .config import Config
from .dataport import DataPort
from .errors import (
    CacheError,
    Corrupt,
    InvalidRequest,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    WrongPath,
)
from .guard import Guard, PeerLog, Refused, Watch, peer_host
from .index import VectorIndex
from .messages import M, Undecodable, decoded, one_request
from .metrics import Metrics
from .store import StoreLocked

log = logging.getLogger(__name__)

SERVICE_NAME = wire.SERVICE_NAME
_symbol_database = symbol_database.Default()
SIGNAL_POLL_S = 0.2  # how soon the main thread notices a SIGTERM another thread received


def _status_of(exc: CacheError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.code]


def _bad_request_reason(exc: CacheError) -> str | None:
    """The flexcache_bad_requests_total reason when `exc` is the client's mistake, else None. A TooLarge
    that chains another error is about the daemon's state (a full disk), not the request's size."""
    if isinstance(exc, Undecodable):
        return "undecodable"
    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, TooLarge) and exc.__cause__ is None:
        return "too_large"
    if isinstance(exc, Corrupt):
        return "corrupt"
    return None


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


class StartError(Exception):
    """The daemon cannot start for a reason the operator can act on (an address or the data folder is
    taken); the message is the whole sentence, so `flexcache serve` prints it as it is."""


_LISTEN_REASONS = {errno.EADDRINUSE: "the address is in use (is another daemon running?)",
                   errno.EACCES: "permission denied (ports below 1024 need privileges)",
                   errno.EADDRNOTAVAIL: "no interface of this machine has that address"}


def listen_error(address: str, error: OSError, endpoint: str = "") -> StartError:
    """'cannot listen on ADDRESS (endpoint): why', from the OSError a bind raised."""
    reason = _LISTEN_REASONS.get(error.errno or 0, error.strerror or str(error))
    return StartError(f"cannot listen on {address}{f' ({endpoint})' if endpoint else ''}: {reason}")


def check_can_listen(address: str) -> None:
    """Raise StartError if a plain TCP socket cannot bind where the gRPC server is about to.

    gRPC reports a failed bind only as a C-core line on stderr and an error that says 'Failed to bind'.
    A probe bound first, with SO_REUSEADDR and without SO_REUSEPORT as the server binds, fails the same
    way and says why in one sentence. It is closed at once; a process that takes the port in between
    still makes the server fail, in gRPC's words. Unix sockets and port 0 are left to gRPC."""
    host, _, port = address.rpartition(":")
    if address.startswith("unix") or not port.isdigit() or int(port) == 0:
        return
    try:
        resolved = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return  # gRPC resolves the name its own way, and fails on its own if it cannot
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in resolved:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            failures.append(exc)
    for exc in failures:  # a name that resolves to several addresses listens if one of them binds
        if exc.errno in (errno.EADDRINUSE, errno.EACCES) or (len(failures) == len(resolved)
                                                              and exc.errno in _LISTEN_REASONS):
            raise listen_error(address, exc)


def is_loopback(address: str) -> bool:
    """Whether a listen address ('host:port', '[v6]:port', 'unix:...') is reachable from this machine only."""
    if address.startswith("unix"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to may be reachable
        return False


def warn_if_exposed(listen: str, tls_on: bool, auth_on: bool) -> None:
    """A daemon listening beyond loopback without TLS (or without auth) starts, with a loud warning
    once at start: anyone who reaches the port can read and write every tenant's entries, and a
    token sent in plain text can be read off the network (docs/security.md says why it warns
    rather than refuses)."""
    if is_loopback(listen):
        return
    if not tls_on:
        log.error("SECURITY: listening on %s without TLS (tls_cert_file, tls_key_file): requests, tokens and "
                  "latents cross the network in plain text; set up TLS, or keep the daemon on a private network "
                  "behind a NetworkPolicy (docs/security.md)", listen)
    if not auth_on:
        log.error("SECURITY: listening on %s without auth (auth_tokens_file): any client that reaches the port "
                  "can read, overwrite and delete every tenant's entries (docs/security.md)", listen)


def _add_v1_reflection_file(pool: descriptor_pool.DescriptorPool) -> None:
    """Put grpc/reflection/v1/reflection.proto into `pool`, so that reflection can describe its own v1
    service too. grpcio-reflection ships only v1alpha's file; v1 is the same file in another package
    (the same messages, fields and numbers), so this is v1alpha's, renamed."""
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return  # another library registered it already
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{REFLECTION_V1.rpartition('.')[0]}."
    proto.name, proto.package = _REFLECTION_V1_FILE, new.strip(".")
    proto.ClearField("options")  # v1alpha's are deprecated: true and its java and go packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):  # message-typed fields only: setting "" would add one
                field.type_name = new + field.type_name.removeprefix(old)
    for method in proto.service[0].method:
        method.input_type, method.output_type = (t.replace(old, new, 1) for t in (method.input_type,
                                                                                method.output_type))
    pool.AddSerializedFile(proto.SerializeToString())


def _add(server: grpc.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _handler(behavior: Callable[[Iterator[bytes], grpc.ServicerContext], object], server_streaming: bool,
             serializer: Callable[..., bytes], pool: futures.ThreadPoolExecutor | None = None) -> grpc.RpcMethodHandler:
    """A handler that takes its request as a stream of raw bytes (the module docstring says why); with a
    `pool`, the call runs on that pool's threads instead of the server's (gRPC's experimental_thread_pool)."""

    def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> object:
        return behavior(requests, context)

    if pool is not None:
        run.experimental_thread_pool = pool  # type: ignore[attr-defined]
    kind = grpc.stream_stream_rpc_method_handler if server_streaming else grpc.stream_unary_rpc_method_handler
    return kind(run, request_deserializer=None, response_serializer=serializer)


def enable_reflection(service_names: tuple[str, ...], server: grpc.Server, servicer: CacheServicer,
                      pool: futures.ThreadPoolExecutor | None = None) -> None:
    """Serve server reflection as grpc.reflection.v1, which current clients (grpcurl, grpc-go's) ask for
    first, and as v1alpha, which older ones ask for. grpcio-reflection has only a v1alpha servicer; the
    two protocols are the same on the wire, so that one servicer answers under both names. Its streams
    are watched like the cache's (`servicer.call`)."""
    _add_v1_reflection_file(descriptor_pool.Default())
    reflecting = reflection.ReflectionServicer((*service_names, reflection.SERVICE_NAME, REFLECTION_V1))

    def info(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Message]:
        with servicer.call("ServerReflectionInfo", context, stream=True, counted=False, needs_cache=False) as (_, w, _):
            yield from w.sending(reflecting.ServerReflectionInfo(
                decoded(w, requests, reflection_pb2.ServerReflectionRequest), context))

    handlers = {"ServerReflectionInfo": _handler(info, True, reflection_pb2.ServerReflectionResponse.SerializeToString,
                                                 pool)}
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        _add(server, name, handlers)


def add_health(checker: health.HealthServicer, server: grpc.Server, servicer: CacheServicer,
               pool: futures.ThreadPoolExecutor | None = None) -> None:
    """grpc.health.v1.Health from `checker`, its calls watched like the cache's: Check is a unary call,
    Watch a stream (so stream_max_seconds ends it; a watcher watches again)."""

    def check(requests: Iterator[bytes], context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with servicer.call("Check", context, counted=False, needs_cache=False) as (_, w, _):
            return checker.Check(one_request(w, requests, health_pb2.HealthCheckRequest), context)

    def watch(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        with servicer.call("Watch", context, stream=True, counted=False, needs_cache=False) as (_, w, _):
            yield from w.sending(checker.Watch(one_request(w, requests, health_pb2.HealthCheckRequest), context))

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    _add(server, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         {"Check": _handler(check, False, serialize), "Watch": _handler(watch, True, serialize, pool)})


def _serialize_fetch(message: pb.FetchResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(servicer: object, server: grpc.Server, stream_pool: futures.ThreadPoolExecutor | None = None,
                 service: ServiceDescriptor = pb.DESCRIPTOR.services_by_name["CacheService"]) -> None:
    """Register `service` (CacheService; NodeService with a NodeServicer): each method takes raw request
    bytes (the servicer decodes them), a fetch may yield wire bytes, and streaming methods run on
    `stream_pool`."""
    handlers = {}
    for method in service.methods:
        response = _symbol_database.GetSymbol(method.output_type.full_name)
        serializer = _serialize_fetch if method.output_type.name == "FetchResponse" else response.SerializeToString
        streams = method.client_streaming or method.server_streaming
        handlers[method.name] = _handler(getattr(servicer, method.name), method.server_streaming, serializer,
                                         stream_pool if streams else None)
    _add(server, service.full_name, handlers)


def _clip(exc: BaseException, limit: int = 300) -> str:
    """An error's message on one line and at most `limit` characters: it may quote the client's bytes."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


class CacheServicer:
    """CacheService's methods. Each takes its request as raw bytes (`add_servicer`) and runs inside
    `call`, which watches it (guard.py), decodes and counts, and maps domain errors to statuses."""

    def __init__(self, metrics: Metrics, guard: Guard, clients: PeerLog, dataport: DataPort | None = None,
                 access: Access | None = None, client_certificates: bool = False, advertise_host: str = ""):
        self.metrics = metrics
        self.guard = guard
        self.clients = clients  # the log of client mistakes, rate-limited per client address
        self.dataport = dataport  # fetched blobs on a TCP connection (FetchDirect)
        self.access = access or Access(None)
        self.client_certificates = client_certificates  # mTLS: every caller has a verified certificate
        self.advertise_host = advertise_host  # where clients dial the data port ("": where they reached us)
        self.cache: Cache | ClusterNode | None = None  # set once storage is open: the cluster's front, in one

    def identify(self, context: grpc.ServicerContext) -> Identity:
        """The caller (access.Access.identify): its bearer token, else its verified certificate's CN."""
        if not self.access.on:
            return OPEN
        cn = tls.grpc_peer_common_name(context) if self.client_certificates else None
        return self.access.identify(bearer_token(context.invocation_metadata() or ()), cn)

    @contextmanager
    def call(self, method: str, context: grpc.ServicerContext, *, stream: bool = False, counted: bool = True,
             needs_cache: bool = True) -> Iterator[tuple[Cache | ClusterNode, Watch, Identity]]:
        """Watch the call (a stream past its client's share is refused), identify its caller, time it and
        count it by status (`counted`), and turn domain errors into gRPC statuses; the client's mistakes
        are counted and logged at most once per client and interval, never with a traceback. Yields the
        cache, the call's watch and its caller. Calls that do not `needs_cache` (health, reflection)
        need no credential either: the cache is None and the caller OPEN."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        watch: Watch | None = None
        try:
            with self.guard.watch(method, context, stream) as watch:
                who = self.identify(context) if needs_cache else OPEN
                if needs_cache and self.cache is None:
                    code = grpc.StatusCode.UNAVAILABLE
                    context.abort(code, "daemon is starting: storage is not open yet")
                yield self.cache, watch, who  # type: ignore[misc]
        except GeneratorExit:  # a streaming call whose client went away, or that the guard cut
            code = grpc.StatusCode.CANCELLED
            raise
        except CacheError as exc:
            code = _status_of(exc)
            self._client_mistake(method, peer_host(context.peer()), exc)
            context.abort(code, str(exc))
        except grpc.RpcError:
            # Raised by the request iterator: gRPC already ended the call with its own status (a
            # message over the limit is RESOURCE_EXHAUSTED to the client). A client's doing, not the
            # daemon's: no traceback, no ERROR. Re-raised unchanged, so gRPC does not log it either.
            code = grpc.StatusCode.CANCELLED
            if watch is None or watch.cut is None:  # a cut call was logged when it was cut
                self.clients.warn(peer_host(context.peer()), "ended", "%s: the call ended before its request "
                                  "stream did: the client cancelled, its deadline passed or it sent a message over "
                                  "%d bytes", method, wire.MAX_MESSAGE_BYTES)
            raise
        except Exception:
            if context.code() not in (None, grpc.StatusCode.OK):  # context.abort() already chose a status
                code = context.code()
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            context.abort(code, f"internal error in {method}; see the daemon log")
        finally:
            if watch is not None and watch.cut is not None:
                code = grpc.StatusCode.CANCELLED
            if counted:
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    def _client_mistake(self, method: str, peer: str, exc: CacheError) -> None:
        if isinstance(exc, Unauthenticated | PermissionDenied):
            reason = "unauthenticated" if isinstance(exc, Unauthenticated) else "permission_denied"
            self.metrics.calls_refused.labels(method, reason).inc()
            self.clients.warn(peer, reason, "%s refused: %s", method, _clip(exc))
        elif isinstance(exc, Refused):
            self.metrics.calls_refused.labels(method, exc.reason).inc()
            self.clients.warn(peer, "refused", "%s refused: %s", method, _clip(exc))
        elif (reason := _bad_request_reason(exc)) is not None:
            self.metrics.bad_requests.labels(method, reason).inc()
            self.clients.warn(peer, "bad request", "bad request to %s (%s): %s", method, reason,
                              _clip(exc))

    def _begin_put(self, cache: Cache | ClusterNode, who: Identity, header: pb.PutHeader) -> PutSession | ClusterPut:
        """A Put (stream or PutDirect) of `who`'s: its tenant checked, its writer stamped, its header
        checked by the cache."""
        self.access.check(who, header.namespace.tenant)
        header.writer = who.writer  # the daemon's to say, never the client's
        return cache.begin_put(header)

    def Put(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutResponse:
        with self.call("Put", context, stream=True) as (cache, watch, who):
            messages = decoded(watch, requests, pb.PutRequest)
            first = next(messages, None)
            if first is None or first.WhichOneof("msg") != "header":
                raise InvalidRequest("the first Put message must be a header")
            session = self._begin_put(cache, who, first.header)
            if session.existing:  # content-addressed: the same entry is already stored, skip the upload
                return pb.PutResponse(entry_id=session.entry_id, created=False)
            self.guard.hold(watch, first.header.blob.size)  # its share of the Put buffer until it is stored
            with closing(session):  # a stream cut short, refused or cancelled gives its bytes up at once
                for message in messages:
                    if message.WhichOneof("msg") != "chunk":
                        raise InvalidRequest("only chunks may follow the Put header")
                    session.add_chunk(message.chunk)
                if not context.is_active():
                    raise InvalidRequest("client cancelled the Put")
                return session.finish()

    def Lookup(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.LookupResponse:
        with self.call("Lookup", context) as (cache, watch, who):
            return cache.lookup(self._allowed(who, one_request(watch, requests, pb.LookupRequest)))

    def Fetch(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.FetchResponse | bytes]:
        with self.call("Fetch", context, stream=True) as (cache, watch, who):  # times the whole stream
            header, chunks = cache.fetch(self._allowed(who, one_request(watch, requests, pb.FetchRequest)))
            with closing(chunks):  # unpins the entry even when the client goes away mid-stream
                messages: Iterable[pb.FetchResponse | bytes] = itertools.chain(
                    (pb.FetchResponse(header=header),),
                    map(wire.encode_chunk, chunks))  # FetchResponse(chunk=...), pre-encoded: see add_servicer
                yield from watch.sending(messages)

    def FetchDirect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.FetchTicket:
        with self.call("FetchDirect", context) as (cache, watch, who):
            request = self._allowed(who, one_request(watch, requests, pb.FetchRequest))
            if self.dataport is None:
                raise WrongPath("this daemon has no data port (data_listen): use Fetch")
            header, chunks = cache.fetch(request)
            try:
                ticket = self.dataport.issue(chunks, header.blob.size, owner=who.writer)
            except OSError as exc:  # shutting down
                raise Unavailable(str(exc)) from exc
            return pb.FetchTicket(header=header, ticket=ticket, data_port=self.dataport.port,
                                  data_host=self.advertise_host)

    def PutDirect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutTicket:
        with self.call("PutDirect", context) as (cache, watch, who):
            header = one_request(watch, requests, pb.PutHeader)
            if self.dataport is None:
                raise WrongPath("this daemon has no data port (data_listen): use Put")
            session = self._begin_put(cache, who, header)
            if session.existing:  # content-addressed: nothing to send
                return pb.PutTicket(stored=pb.PutResponse(entry_id=session.entry_id, created=False))
            release = self.guard.reserve(watch.peer, header.blob.size)  # held until the transfer ends
            put = DirectPut(session, release, lambda exc: self._client_mistake("PutDirect", watch.peer, exc))
            try:
                ticket = self.dataport.issue_put(put, header.blob.size, owner=who.writer)
            except OSError as exc:  # shutting down
                raise Unavailable(str(exc)) from exc
            return pb.PutTicket(ticket=ticket, data_port=self.dataport.port, data_host=self.advertise_host)

    def Delete(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.DeleteResponse:
        with self.call("Delete", context) as (cache, watch, who):
            return pb.DeleteResponse(deleted=cache.delete(self._allowed(who, one_request(watch, requests,
                                                                                      pb.DeleteRequest))))

    def Verify(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.VerifyResponse:
        with self.call("Verify", context) as (cache, watch, who):
            return cache.verify(self._allowed(who, one_request(watch, requests, pb.VerifyRequest)))

    def Stats(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.StatsResponse:
        with self.call("Stats", context) as (cache, watch, who):
            one_request(watch, requests, pb.StatsRequest)
            return own_stats(cache.stats(), who)

    def SetStepTables(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.StepTablesResponse:
        with self.call("SetStepTables", context) as (cache, watch, who):
            request = one_request(watch, requests, pb.SetStepTablesRequest)
            if not who.admin:
                raise PermissionDenied("SetStepTables needs an admin credential (`flexcache tokens add --admin`): "
                                       "a namespace's step tables decide what every tenant's hits may cost")
            return cache.set_step_tables(request)

    def GetStepTables(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.StepTablesResponse:
        with self.call("GetStepTables", context) as (cache, watch, who):
            return cache.step_tables(self._allowed(who, one_request(watch, requests, pb.StepTablesRequest)))

    def ReportQuality(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ReportQualityResponse:
        with self.call("ReportQuality", context) as (cache, watch, who):
            return cache.report_quality(self._allowed(who, one_request(watch, requests, pb.ReportQualityRequest)))

    def _allowed(self, who: Identity, request: M) -> M:
        """`request`, if its Namespace names a tenant `who` may use (PermissionDenied otherwise)."""
        self.access.check(who, request.namespace.tenant)  # type: ignore[attr-defined]
        return request


class DirectPut:
    """A PutDirect's entry, fed by the data port (dataport.Sink): the bytes as a Put stream's chunks,
    then the reply, a domain error answered with its status and message as `call` answers one."""

    def __init__(self, session: PutSession | ClusterPut, release: Callable[[], None],
                 mistake: Callable[[CacheError], None]):
        self._session = session
        self._release = release  # the Put buffer share PutDirect reserved
        self._mistake = mistake

    def add_chunk(self, data: bytes) -> None:
        self._session.add_chunk(data)

    def finish(self) -> tuple[int, bytes]:
        try:
            return 0, self._session.finish().SerializeToString()
        except CacheError as exc:
            self._mistake(exc)
            return _status_of(exc).value[0], str(exc).encode()
        except Exception:
            log.exception("PutDirect failed")
            return grpc.StatusCode.INTERNAL.value[0], b"internal error in PutDirect; see the daemon log"
        finally:
            self._release()

    def abort(self) -> None:
        try:
            self._session.close()
        finally:
            self._release()


def own_stats(stats: pb.StatsResponse, who: Identity) -> pb.StatsResponse:
    """What `who` may see of the daemon's Stats: everything for an admin; for a tenant, its own
    namespaces and the totals over them, with the daemon-wide budget, policy and disk state (its
    capacity, not anyone's entries). Namespace names begin with the tenant and a '/', and a tenant
    name that a credential binds has no '/' (auth.tenant_problem)."""
    if who.admin:
        return stats
    own = [ns for ns in stats.namespaces if ns.name.startswith(who.tenant + "/")]
    mine = pb.StatsResponse(max_bytes=stats.max_bytes, eviction_policy=stats.eviction_policy,
                            index_backend=stats.index_backend, disk_full=stats.disk_full,
                            entries=sum(ns.entries for ns in own), bytes=sum(ns.bytes for ns in own),
                            blob_bytes=sum(ns.blob_bytes for ns in own))
    mine.namespaces.extend(own)
    return mine


class Daemon:
    """The whole process: gRPC server, health, metrics endpoint, storage. `index` replaces the
    configured index backend (as build.open_cache's: several in-process daemons sharing one
    qdrant-client local-mode index, which only one process may open, stand in for a cluster over one
    Qdrant server in tests)."""

    def __init__(self, config: Config, index: VectorIndex | None = None):
        self.config = config
        self._index = index
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        self.clients = PeerLog(log, config.client_log_seconds)
        self.guard = Guard(config.stream_idle_seconds, config.stream_max_seconds, config.streams_per_client,
                           config.put_buffer_bytes, on_cut=self._cut)
        self.metrics.open_streams.set_function(lambda: self.guard.open_streams)
        self.metrics.put_buffer.set_function(lambda: self.guard.held_bytes)
        check_can_listen(config.listen)
        try:
            credentials = Credentials(config.auth_tokens_file) if config.auth_tokens_file else None
            self.certificates = (tls.ServerCertificates(config.tls_cert_file, config.tls_key_file,
                                                        config.tls_client_ca_file) if config.tls_cert_file else None)
        except (AuthConfigError, tls.TLSConfigError) as exc:
            raise StartError(str(exc)) from exc
        self.access = Access(credentials)
        warn_if_exposed(config.listen, self.certificates is not None, self.access.on)
        try:
            self.dataport = (DataPort(config.data_address, count=lambda outcome: self.metrics.data_transfers.labels(
                outcome).inc(), idle_s=config.data_idle_seconds, stall_s=config.stream_idle_seconds,
                max_s=config.stream_max_seconds, per_client=config.data_connections_per_client,
                count_connection=lambda outcome: self.metrics.data_connections.labels(outcome).inc(),
                warn=self.clients.warn, access=self.access,
                tls_context=self.certificates.ssl_context if self.certificates else None)
                if config.data_address else None)
        except OSError as exc:  # DataPort's error wraps the bind's, which has the errno
            bind_error = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise listen_error(config.data_address, bind_error, "data port") from exc
        if self.dataport is not None:
            dataport = self.dataport
            self.metrics.data_open.set_function(lambda: dataport.open_connections)
        self.servicer = CacheServicer(self.metrics, self.guard, self.clients, self.dataport, self.access,
                                      client_certificates=bool(self.certificates and self.certificates.client_auth),
                                      advertise_host=config.advertise_host)
        self._stream_pool = futures.ThreadPoolExecutor(max_workers=config.stream_workers, thread_name_prefix="stream")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            options=[
                ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share it
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        add_servicer(self.servicer, self.server, self._stream_pool)
        self.nodes = NodeServicer(self.servicer, node_id_of(config),
                                  on_drain=lambda: self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING),
                                  backup_dir=config.backup_dir)
        add_servicer(self.nodes, self.server, self._stream_pool, npb.DESCRIPTOR.services_by_name["NodeService"])
        add_health(self.health, self.server, self.servicer, self._stream_pool)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        enable_reflection((SERVICE_NAME, NODE_SERVICE_NAME, health_name), self.server, self.servicer, self._stream_pool)
        try:
            if self.certificates is not None:
                self.port = self.server.add_secure_port(config.listen, self.certificates.grpc_credentials())
            else:
                self.port = self.server.add_insecure_port(config.listen)
        except RuntimeError:  # newer gRPC raises where older ones returned 0; its log line says why
            self.port = 0
        if self.port == 0:
            if self.dataport is not None:
                self.dataport.stop(grace_s=0)
            self._stream_pool.shutdown(wait=False)
            raise StartError(f"cannot listen on {config.listen}: gRPC could not bind it (its log line above says why)")
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self.cache: Cache | None = None
        self.cluster: Cluster | None = None

    def _cut(self, watch: Watch) -> None:
        """The guard cut a call (from its watchdog thread): count it, and tell the log once per client."""
        self.metrics.calls_cut.labels(watch.method, watch.cut).inc()
        why = (f"it waited {self.config.stream_idle_seconds:g} s on the client (stream_idle_seconds)"
               if watch.cut == "idle" else f"it ran {self.config.stream_max_seconds:g} s (stream_max_seconds)")
        self.clients.warn(watch.peer, "cut", "%s cancelled: %s", watch.method, why)

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        """Listen first (NOT_SERVING, so probes get an answer), then open storage, then SERVING."""
        c = self.config
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.guard.start()
        self.server.start()
        if self.dataport is not None:
            self.dataport.start()
        try:
            if c.metrics_listen:
                try:
                    self.metrics_port = self.metrics.serve(c.metrics_listen)
                except OSError as exc:
                    raise listen_error(c.metrics_listen, exc, "metrics") from exc
            try:
                self.cache = open_cache(c, self.metrics, self._index)
            except StoreLocked as exc:
                raise StartError(f"the data folder {c.data_dir} is in use by another daemon "
                                 f"(RocksDB lock held: {exc.lock})") from exc
        except BaseException:  # what did start (gRPC, the data port) closes, quietly, before the error is told
            self.server.stop(grace=None)
            if self.dataport is not None:
                self.dataport.stop(grace_s=0)
            self.guard.stop()
            self._stream_pool.shutdown(wait=False)
            raise
        self.nodes.cache = self.cache
        if c.clustered:
            self.cluster = self.nodes.cluster = open_cluster(c, self.cache, self.metrics)
            self.servicer.cache = self.cluster.node
            self.cluster.start(join_timeout_s=2 * c.peer_timeout_seconds + 1)
        else:
            self.servicer.cache = self.cache
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("flexcache serving on port %d (data port %s, index %s, policy %s, budget %d bytes)", self.port,
                 self.dataport.port if self.dataport else "off", c.index_backend, c.eviction_policy, c.max_bytes)

    def ports(self) -> dict[str, int | None]:
        """The ports this daemon got (None: that endpoint is off)."""
        return {"grpc": self.port, "data": self.dataport.port if self.dataport else None,
                "metrics": self.metrics_port}

    def stop(self) -> None:
        """Drain: refuse new calls, let in-flight ones finish (up to drain_seconds; the guard still cuts
        stalled ones), close storage."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace=self.config.drain_seconds).wait()
        if self.dataport is not None:  # before the store closes: transfers read from it
            self.dataport.stop(grace_s=self.config.drain_seconds)
        self.guard.stop()
        self._stream_pool.shutdown(wait=False)
        if self.cluster is not None:
            self.cluster.stop()
        if self.cache is not None:
            self.cache.close()
        log.info("flexcache stopped")

    def run_until_signal(self) -> None:
        done = threading.Event()
        handler: Callable[[int, object], None] = lambda signum, frame: done.set()  # noqa: E731
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # Python runs a signal's handler in the main thread, when that thread next runs bytecode; the
        # kernel may deliver SIGTERM to any of the daemon's threads (gRPC's, RocksDB's), which does not
        # wake a main thread blocked without a timeout. So the wait wakes up to look.
        while not done.wait(SIGNAL_POLL_S):
            pass
        log.info("signal received: draining in-flight calls")
        self.stop()
