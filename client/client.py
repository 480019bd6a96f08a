"""The gRPC backend of the cache surface (base.CacheBase): the client a diffusion worker runs.

Every RPC (Put, Lookup, Fetch, FetchDirect, Verify, Delete, Stats, SetStepTables, GetStepTables,
ReportQuality) goes through `CacheBase._call`: one deadline, one retry policy, one way a failure
becomes a miss. The gRPC channel reconnects by
itself when the daemon comes back; calls never wait for it (wait_for_ready is off), so a down daemon
costs a fast failure, not a deadline.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Final, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire

from . import codec, dataport
from .answers import (
    BlobCheck,
    ChecksumMismatch,
    Fetched,
    Malformed,
    check_data_address,
    check_header,
    check_ticket,
    receive_blob,
)
from .base import CacheBase, Namespace
from .retry import Retry
from .tls import ClientTLS

log = logging.getLogger("flexcache.client")
T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a daemon restart: a worker should see hits again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

DATA_PORT_RETRY_S = 60.0  # how long a client streams after failing to reach the data port
_NO_DATA_PORT = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)  # FetchDirect: use Fetch


class _Path(enum.Enum):
    STREAM = "stream"  # the data port does not apply to this fetch: stream it


_STREAM: Final = _Path.STREAM


def _chunks(responses: Iterator[bytes]) -> Iterator[memoryview | bytes]:
    """The blob bytes of raw Fetch messages (wire.decode_chunk: no copy, no protobuf parse)."""
    for raw in responses:
        try:
            yield wire.decode_chunk(raw)
        except DecodeError as exc:
            raise Malformed(f"an unparsable Fetch message: {exc}") from exc


ENV_TOKEN = "FLEXCACHE_CLIENT_TOKEN"  # what a sidecar sets when the arguments are not given
ENV_TLS_CA_FILE = "FLEXCACHE_CLIENT_TLS_CA_FILE"
ENV_TLS_CERT_FILE = "FLEXCACHE_CLIENT_TLS_CERT_FILE"
ENV_TLS_KEY_FILE = "FLEXCACHE_CLIENT_TLS_KEY_FILE"


def _setting(value: str | None, env: str) -> str:
    return os.environ.get(env, "") if value is None else value


class DirectRefusal(grpc.RpcError):
    """The daemon's refusal of a put received on the data port, as an RpcError with its status code
    (`last_error` reads the same whichever path the put took)."""

    def __init__(self, code: int, payload: bytes):
        self._code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        self._details = payload.decode("utf-8", "replace")
        super().__init__(f"{self._code.name}: {self._details}")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class CacheClient(CacheBase):
    """The cache over gRPC, at `target` ('host:port', or any gRPC target).

    `namespace`, `max_rel_error`, `warn_every_s`, `put_sha256`: see CacheBase. `timeout_s`: the deadline of a
    Lookup, Delete, Stats or FetchDirect call, retries included; `transfer_timeout_s`: the same for
    calls that move a blob (Put, Fetch, the data-port transfer, Verify).
    `retry` (flexcache.client.Retry): when a failed RPC is tried again. The default (None, `Retry()`)
    tries once more, on UNAVAILABLE only (no connection yet, a daemon restarting or draining) and only
    if the call's deadline leaves time for it, so a worker never waits on the cache for long;
    `Retry.none()` turns retries off. A Put is retried from its first message (its request stream is
    made again), a Fetch from its header; an entry is credited once however often its fetch is tried.
    `data_port`: fetch (FetchDirect) and put blobs of wire.DIRECT_PUT_MIN_BYTES or more (PutDirect) over
    the daemon's data port when it has one; False always streams (Fetch, Put). A daemon without one,
    an unreachable port or a failed transfer fall back to the stream (client/dataport.py).
    `token`: the bearer token the daemon's tokens file binds to this client's tenant (sent as
    `authorization: Bearer` metadata and on the data port); `tls_ca_file`: the CA that signed the
    daemon's certificate (TLS on; "" with a client certificate: the system's CAs); `tls_cert_file`
    and `tls_key_file`: this client's certificate, for a daemon that requires one (mTLS). Each left
    None is read from its FLEXCACHE_CLIENT_* environment variable (ENV_TOKEN, ...), so a sidecar or a
    pod spec can set them; TLS is on when any of the three files is set. A daemon that refuses the
    credential (UNAUTHENTICATED, PERMISSION_DENIED) is a miss like any failure, with one warning
    that says so.
    """

    def __init__(self, target: str, namespace: Namespace, *, max_rel_error: float | None = codec.DEFAULT_MAX_REL_ERROR,
                 timeout_s: float = 1.0, transfer_timeout_s: float = 30.0, warn_every_s: float = 10.0,
                 data_port: bool = True, retry: Retry | None = None, token: str | None = None,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 put_sha256: bool = False):
        super().__init__(namespace, target=target, max_rel_error=max_rel_error, timeout_s=timeout_s,
                         warn_every_s=warn_every_s, retry=Retry() if retry is None else retry, put_sha256=put_sha256)
        self.transfer_timeout_s = transfer_timeout_s
        token = _setting(token, ENV_TOKEN).strip()  # a Secret file keeps the newline `tokens add` printed
        files = [_setting(f, env) for f, env in ((tls_ca_file, ENV_TLS_CA_FILE), (tls_cert_file, ENV_TLS_CERT_FILE),
                                                 (tls_key_file, ENV_TLS_KEY_FILE))]
        tls = ClientTLS(*files) if any(files) else None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = (grpc.secure_channel(target, tls.channel_credentials(), options=_CHANNEL_OPTIONS)
                         if tls is not None else grpc.insecure_channel(target, options=_CHANNEL_OPTIONS))
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        # Fetch with chunk messages as raw bytes (see wire.decode_chunk), not parsed protobuf.
        self._fetch_raw = self._channel.unary_stream(
            wire.FETCH_METHOD, request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None)
        host = dataport.data_host(target) if data_port else None
        self._data = (dataport.DataConnections(host, timeout_s, token=token or None,
                                               tls_context=tls.data_port_context if tls else None)
                      if host else None)
        self._data_paused_until = 0.0  # after an unreachable data port, transfers stream until then
        self._direct_puts = True  # False once the daemon answered PutDirect with UNIMPLEMENTED

    def close(self) -> None:
        self._close_data()
        self._channel.close()

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    # ---- transport primitives ----
    def _put_blob(self, header: pb.PutHeader, data: bytes | bytearray | memoryview) -> pb.PutResponse | None:
        """Over the daemon's data port (PutDirect) when it has one and the blob is large enough to gain
        from it (wire.DIRECT_PUT_MIN_BYTES); else, or after a transfer that failed, one Put stream."""
        conns = self._data
        if (conns is not None and self._direct_puts and len(data) >= wire.DIRECT_PUT_MIN_BYTES
                and time.monotonic() >= self._data_paused_until):
            answer = self._put_direct(conns, header, data)
            if answer is not _STREAM:
                return answer
        return self._put_stream(header, data)

    def _put_direct(self, conns: dataport.DataConnections, header: pb.PutHeader,
                    data: bytes | bytearray | memoryview) -> pb.PutResponse | _Path | None:
        """The blob through the data port; None after a failed call or a refusal (a miss, reported);
        _STREAM where the data port does not apply (as `_fetch_direct`). A transfer that failed is
        tried again on the stream: entries are content-addressed, so a blob the daemon did store is
        not stored twice."""
        try:
            answer = self._call("put", lambda timeout: self._stub.PutDirect(header, timeout=timeout,
                                                                             metadata=self._metadata),
                                timeout_s=self.timeout_s, passthrough=_NO_DATA_PORT)
        except grpc.RpcError as exc:  # the passthrough statuses only
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older daemon: fetches may still use the port
                log.info("flexcache: the daemon at %s has no PutDirect; puts stream", self.target)
                self._direct_puts = False
            else:
                log.info("flexcache: no data port at %s (%s); transfers stream", self.target, exc.details())
                self._close_data()
            return _STREAM
        if answer is None:
            return None
        if answer.HasField("stored"):
            return answer.stored
        try:
            check_data_address(answer, "put")
            code, payload = conns.send(answer.data_port, answer.ticket, data, self.transfer_timeout_s,
                                       answer.data_host)
        except Malformed as exc:
            self._failed("put", exc)
            return None
        except (OSError, ValueError) as exc:
            self._failed("put over the data port", exc)
            if isinstance(exc, dataport.Unreachable):
                self._data_paused_until = time.monotonic() + DATA_PORT_RETRY_S
            return _STREAM
        if code != 0:
            self._failed("put", DirectRefusal(code, payload))
            return None
        try:
            return pb.PutResponse.FromString(payload)
        except DecodeError:
            self._failed("put", Malformed(f"an unparsable PutDirect reply of {len(payload)} bytes"))
            return None

    def _put_stream(self, header: pb.PutHeader, data: bytes | bytearray | memoryview) -> pb.PutResponse | None:
        def requests() -> Iterator[pb.PutRequest]:  # a factory: each attempt streams from the header again
            yield pb.PutRequest(header=header)
            view = memoryview(data)
            for start in range(0, len(view), wire.CHUNK_BYTES):
                yield pb.PutRequest(chunk=bytes(view[start:start + wire.CHUNK_BYTES]))

        return self._call("put", lambda timeout: self._stub.Put(requests(), timeout=timeout, metadata=self._metadata),
                          timeout_s=self.transfer_timeout_s)

    def _unary(self, method: str, call: Callable[..., T], request: Message, timeout_s: float) -> T | None:
        """One unary RPC through `_call`, with this client's credential."""
        return self._call(method, lambda timeout: call(request, timeout=timeout, metadata=self._metadata),
                          timeout_s=timeout_s)

    def _lookup(self, request: pb.LookupRequest) -> pb.LookupResponse | None:
        return self._unary("lookup", self._stub.Lookup, request, self.timeout_s)

    def _verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse | None:
        return self._unary("verify", self._stub.Verify, request, self.transfer_timeout_s)

    def _delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse | None:
        return self._unary("delete", self._stub.Delete, request, self.timeout_s)

    def _stats(self) -> pb.StatsResponse | None:
        return self._unary("stats", self._stub.Stats, pb.StatsRequest(), self.timeout_s)

    def _set_step_tables(self, request: pb.SetStepTablesRequest) -> pb.StepTablesResponse | None:
        return self._unary("set_step_tables", self._stub.SetStepTables, request, self.timeout_s)

    def _get_step_tables(self, request: pb.StepTablesRequest) -> pb.StepTablesResponse | None:
        return self._unary("step_tables", self._stub.GetStepTables, request, self.timeout_s)

    def _report_quality(self, request: pb.ReportQualityRequest) -> pb.ReportQualityResponse | None:
        return self._unary("report_quality", self._stub.ReportQuality, request, self.timeout_s)

    def _fetch_blob(self, request: pb.FetchRequest, expect: pb.BlobInfo | None) -> Fetched | None:
        """Over the daemon's data port (FetchDirect, client/dataport.py) when it has one; else, or after a
        transfer that failed, one Fetch stream."""
        conns = self._data
        if conns is not None and time.monotonic() >= self._data_paused_until:
            fetched = self._fetch_direct(conns, request, expect)
            if fetched is not _STREAM:
                return fetched
        return self._call("fetch", partial(self._fetch_stream, request, expect), timeout_s=self.transfer_timeout_s)

    def _fetch_direct(self, conns: dataport.DataConnections, request: pb.FetchRequest,
                      expect: pb.BlobInfo | None) -> Fetched | _Path | None:
        """The entry through the data port; None after a failed call (a miss: the daemon answered, or
        could not be reached, the stream would not do better); _STREAM where the data port does not
        apply: no data port on this daemon (then never again), or a transfer that failed (an
        unreachable port: for DATA_PORT_RETRY_S). The entry was credited by FetchDirect, so a stream
        after a failed transfer only reads."""
        total_steps = self.namespace.total_steps

        def invoke(timeout: float) -> pb.FetchTicket:
            answer = self._stub.FetchDirect(request, timeout=timeout, metadata=self._metadata)
            check_ticket(answer, request, total_steps, expect)
            return answer

        try:
            answer = self._call("fetch", invoke, timeout_s=self.timeout_s, passthrough=_NO_DATA_PORT)
        except grpc.RpcError as exc:  # the passthrough statuses only
            log.info("flexcache: no data port at %s (%s); fetches stream", self.target, exc.details())
            self._close_data()
            return _STREAM
        if answer is None:
            return None
        request.granted_steps = 0  # credited
        header = answer.header
        check = BlobCheck(header.entry_id, header.blob)
        try:
            data = conns.receive(answer.data_port, answer.ticket, header.blob.size, self.transfer_timeout_s,
                                  answer.data_host, on_bytes=check.update)
            check.finish()
        except (OSError, ValueError, ChecksumMismatch) as exc:
            self._failed("fetch over the data port", exc)
            if isinstance(exc, dataport.Unreachable):  # do not pay a connect timeout on every fetch
                self._data_paused_until = time.monotonic() + DATA_PORT_RETRY_S
            return _STREAM
        finally:
            check.close()  # a sha256 helper thread stops, whatever ended the transfer
        return Fetched(header.entry_id, header.prompt, header.blob, data)

    def _fetch_stream(self, request: pb.FetchRequest, expect: pb.BlobInfo | None, timeout: float) -> Fetched:
        """One attempt of a Fetch stream: the header, then the chunks, read as raw bytes and copied once,
        straight into the result (answers.receive_blob)."""
        responses = self._fetch_raw(request, timeout=timeout, metadata=self._metadata)
        try:
            first = next(responses, None)
            if first is None:
                raise Malformed(f"entry {request.entry_id}: the Fetch stream ended before its header")
            try:
                message = pb.FetchResponse.FromString(first)
            except DecodeError as exc:
                raise Malformed(f"entry {request.entry_id}: an unparsable Fetch header: {exc}") from exc
            if message.WhichOneof("msg") != "header":
                raise Malformed(f"entry {request.entry_id}: the Fetch stream did not start with a header")
            request.granted_steps = 0  # the daemon credited the entry: another attempt only reads
            header = message.header
            check_header(header, request, self.namespace.total_steps, expect)
            data = receive_blob(header, _chunks(responses))
        finally:
            responses.cancel()  # a no-op once the stream is complete; stops a daemon sending what is refused
        return Fetched(header.entry_id, header.prompt, header.blob, data)
