"""gRPC front end: translates CacheService calls to the cache core and domain errors to status codes.

Also owns the process lifecycle: the health service reports NOT_SERVING until the store and index
are open and reconciled, and SIGTERM drains in-flight calls before closing storage.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import closing, contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire

from .build import open_cache
from .cache import Cache
from .config import Config
from .dataport import DataPort
from .errors import CacheError, Corrupt, InvalidRequest, NotFound, TooLarge, Unavailable, WrongPath
from .metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = wire.SERVICE_NAME
_STATUS = {InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
           TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED, Corrupt: grpc.StatusCode.DATA_LOSS,
           Unavailable: grpc.StatusCode.UNAVAILABLE, WrongPath: grpc.StatusCode.FAILED_PRECONDITION}


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
        self.dataport = (DataPort(config.data_address, count=lambda outcome: self.metrics.data_transfers.labels(
            outcome).inc()) if config.data_address else None)
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
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.listen}")
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
        if c.metrics_listen:
            self.metrics_port = self.metrics.serve(c.metrics_listen)
        self.cache = open_cache(c, self.metrics)
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

