"""gRPC front end: translates CacheService calls to the cache core and domain errors to status codes.

Also owns the process lifecycle: the health service reports NOT_SERVING until the store and index
are open and reconciled, and SIGTERM drains in-flight calls before closing storage.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import closing, contextmanager

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire

from .build import open_cache
from .cache import Cache
from .config import Config
from .dataport import DataPort
from .errors import CacheError, Corrupt, InvalidRequest, NotFound, TooLarge, Unavailable, WrongPath
from .metrics import Metrics
from .store import StoreLocked

log = logging.getLogger(__name__)

SERVICE_NAME = wire.SERVICE_NAME
_STATUS = {InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
           TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED, Corrupt: grpc.StatusCode.DATA_LOSS,
           Unavailable: grpc.StatusCode.UNAVAILABLE, WrongPath: grpc.StatusCode.FAILED_PRECONDITION}


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


def enable_reflection(service_names: tuple[str, ...], server: grpc.Server) -> None:
    """Serve server reflection as grpc.reflection.v1, which current clients (grpcurl, grpc-go's) ask for
    first, and as v1alpha, which older ones ask for. grpcio-reflection has only a v1alpha servicer; the
    two protocols are the same on the wire, so that one servicer answers under both names."""
    _add_v1_reflection_file(descriptor_pool.Default())
    servicer = reflection.ReflectionServicer((*service_names, reflection.SERVICE_NAME, REFLECTION_V1))
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)


def _serialize_fetch(message: pb.FetchResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(servicer: CacheServicer, server: grpc.Server) -> None:
    """Register CacheService like the generated code does, except that Fetch may yield wire bytes."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["CacheService"].methods:
        request, response = (getattr(pb, m.name) for m in (method.input_type, method.output_type))
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        serializer = _serialize_fetch if method.name == "Fetch" else response.SerializeToString
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=request.FromString,
                                     response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class CacheServicer(pb_grpc.CacheServiceServicer):
    def __init__(self, metrics: Metrics, dataport: DataPort | None = None):
        self.metrics = metrics
        self.dataport = dataport  # fetched blobs on a TCP connection (FetchDirect)
        self.cache: Cache | None = None  # set once storage is open

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext):
        """Time the call, count it by status, and turn domain errors into gRPC statuses."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if self.cache is None:
                code = grpc.StatusCode.UNAVAILABLE
                context.abort(code, "daemon is starting: storage is not open yet")
            yield self.cache
        except GeneratorExit:  # a streaming call whose client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except CacheError as exc:
            code = _STATUS[type(exc)]
            context.abort(code, str(exc))
        except grpc.RpcError:
            # Raised by the request iterator: gRPC already ended the call with its own status (a
            # message over the limit is RESOURCE_EXHAUSTED to the client). A client's doing, not the
            # daemon's: no traceback, no ERROR. Re-raised unchanged, so gRPC does not log it either.
            code = grpc.StatusCode.CANCELLED
            log.warning("%s: the call ended before its request stream did: the client cancelled, its deadline "
                        "passed or it sent a message over %d bytes", method, wire.MAX_MESSAGE_BYTES)
            raise
        except Exception:
            if context.code() not in (None, grpc.StatusCode.OK):  # context.abort() already chose a status
                code = context.code()
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            context.abort(code, f"internal error in {method}; see the daemon log")
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    def Put(self, request_iterator: Iterator[pb.PutRequest], context: grpc.ServicerContext) -> pb.PutResponse:
        with self._call("Put", context) as cache:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("msg") != "header":
                raise InvalidRequest("the first Put message must be a header")
            session = cache.begin_put(first.header)
            if session.existing:  # content-addressed: the same entry is already stored, skip the upload
                return pb.PutResponse(entry_id=session.entry_id, created=False)
            for message in request_iterator:
                if message.WhichOneof("msg") != "chunk":
                    raise InvalidRequest("only chunks may follow the Put header")
                session.add_chunk(message.chunk)
            if not context.is_active():
                raise InvalidRequest("client cancelled the Put")
            return session.finish()

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        with self._call("Lookup", context) as cache:
            return cache.lookup(request)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchResponse | bytes]:
        with self._call("Fetch", context) as cache:  # times the whole stream, not just its start
            header, chunks = cache.fetch(request)
            with closing(chunks):  # unpins the entry even when the client goes away mid-stream
                yield pb.FetchResponse(header=header)
                for chunk in chunks:
                    yield wire.encode_chunk(chunk)  # FetchResponse(chunk=...), pre-encoded: see add_servicer

    def FetchDirect(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> pb.FetchTicket:
        with self._call("FetchDirect", context) as cache:
            if self.dataport is None:
                raise WrongPath("this daemon has no data port (data_listen): use Fetch")
            header, chunks = cache.fetch(request)
            try:
                ticket = self.dataport.issue(chunks, header.blob.size)
            except OSError as exc:  # shutting down
                raise Unavailable(str(exc)) from exc
            return pb.FetchTicket(header=header, ticket=ticket, data_port=self.dataport.port)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        with self._call("Delete", context) as cache:
            return pb.DeleteResponse(deleted=cache.delete(request))

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        with self._call("Verify", context) as cache:
            return cache.verify(request)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        with self._call("Stats", context) as cache:
            return cache.stats()


class Daemon:
    """The whole process: gRPC server, health, metrics endpoint, storage."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        check_can_listen(config.listen)
        try:
            self.dataport = (DataPort(config.data_address, count=lambda outcome: self.metrics.data_transfers.labels(
                outcome).inc()) if config.data_address else None)
        except OSError as exc:  # DataPort's error wraps the bind's, which has the errno
            bind_error = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise listen_error(config.data_address, bind_error, "data port") from exc
        self.servicer = CacheServicer(self.metrics, self.dataport)
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
        add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.server)
        try:
            self.port = self.server.add_insecure_port(config.listen)
        except RuntimeError:  # newer gRPC raises where older ones returned 0; its log line says why
            self.port = 0
        if self.port == 0:
            if self.dataport is not None:
                self.dataport.stop(grace_s=0)
            raise StartError(f"cannot listen on {config.listen}: gRPC could not bind it (its log line above says why)")
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self.cache: Cache | None = None

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        """Listen first (NOT_SERVING, so probes get an answer), then open storage, then SERVING."""
        c = self.config
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
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
                self.cache = open_cache(c, self.metrics)
            except StoreLocked as exc:
                raise StartError(f"the data folder {c.data_dir} is in use by another daemon "
                                 f"(RocksDB lock held: {exc.lock})") from exc
        except BaseException:  # what did start (gRPC, the data port) closes, quietly, before the error is told
            self.server.stop(grace=None)
            if self.dataport is not None:
                self.dataport.stop(grace_s=0)
            raise
        self.servicer.cache = self.cache
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("flexcache serving on port %d (data port %s, index %s, policy %s, budget %d bytes)", self.port,
                 self.dataport.port if self.dataport else "off", c.index_backend, c.eviction_policy, c.max_bytes)

    def ports(self) -> dict[str, int | None]:
        """The ports this daemon got (None: that endpoint is off)."""
        return {"grpc": self.port, "data": self.dataport.port if self.dataport else None,
                "metrics": self.metrics_port}

    def stop(self) -> None:
        """Drain: refuse new calls, let in-flight ones finish (up to drain_seconds), close storage."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace=self.config.drain_seconds).wait()
        if self.dataport is not None:  # before the store closes: transfers read from it
            self.dataport.stop(grace_s=self.config.drain_seconds)
        if self.cache is not None:
            self.cache.close()
        log.info("flexcache stopped")

    def run_until_signal(self) -> None:
        done = threading.Event()
        handler: Callable[[int, object], None] = lambda signum, frame: done.set()  # noqa: E731
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        done.wait()
        log.info("signal received: draining in-flight calls")
        self.stop()

