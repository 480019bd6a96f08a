"""The client's side of the daemon's data port (the protocol: daemon/dataport.py).

Connections are opened on first use and kept between transfers (fetches and puts), one per transfer in
flight, so a multi-threaded worker never shares a socket between two transfers. Each new connection makes its TLS
handshake (when the client has a TLS context: the daemon's data port uses the gRPC port's
certificates) and sends its HELLO frame with the client's bearer token before its first ticket.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from typing import TypeVar

from flexcache.v1.wire import PUT_REPLY, data_hello

T = TypeVar("T")
MAX_REPLY_BYTES = 1 << 16  # a PutResponse or an error's sentence


def data_host(target: str) -> str | None:
    """The host a gRPC target names ('host:port', '[v6]:port', 'dns:///host:port'), or None for targets
    that name no TCP host (unix sockets): the data port is on the host the client reached the daemon at."""
    if target.startswith("dns:"):
        target = target.split("/")[-1]
    if target.startswith(("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:")):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]")


class Unreachable(OSError):
    """No connection to the data port could be made (a firewall, a Service without the port...)."""


class _Unused(ValueError):
    """The connection closed before a byte came back: the ticket may be unspent."""


class DataConnections:
    """Kept connections to one daemon's data port, or to several (a ticket may name the host to dial:
    FetchTicket.data_host). `host`: the host the client reached the daemon at, dialled when a ticket
    names none, and the name a TLS connection checks the certificate against either way (the daemons
    behind one address share its certificate). `tls_context`: the SSLContext in force for a new
    connection (None: plain TCP); `token`: the bearer token the HELLO frame carries."""

    def __init__(self, host: str, connect_timeout_s: float, *, token: str | None = None,
                 tls_context: Callable[[], ssl.SSLContext] | None = None):
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self._hello = data_hello(token)
        self._tls_context = tls_context
        self._ports: dict[str, int] = {}  # host -> its data port as last announced; kept connections go there
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()

    def receive(self, port: int, ticket: bytes, size: int, timeout_s: float, host: str = "",
                on_bytes: Callable[[memoryview], None] | None = None) -> bytearray:
        """Redeem a FetchDirect `ticket` on the data port `port` of `host` (empty: `self.host`): exactly
        `size` bytes, each piece handed to `on_bytes` as it arrives (a checksum, while the daemon sends
        the next). Raises Unreachable (no connection), another OSError (the connection is dropped) or
        ValueError (the daemon closed it early: an expired ticket, say)."""
        return self._redeem(host or self.host, port, lambda conn: _receive(conn, ticket, size, timeout_s, on_bytes))

    def send(self, port: int, ticket: bytes, data: bytes | bytearray | memoryview,
             timeout_s: float, host: str = "") -> tuple[int, bytes]:
        """Redeem a PutDirect `ticket`: send `data`, then the daemon's reply (wire.PUT_REPLY): the status
        code's number (0: stored) and its payload (a PutResponse, or the error's message). Raises as
        `receive` does."""
        return self._redeem(host or self.host, port, lambda conn: _send(conn, ticket, data, timeout_s))

    def _redeem(self, host: str, port: int, exchange: Callable[[socket.socket], T]) -> T:
        """`exchange` on a kept connection to `host`:`port`, or on a new one if there is none or the
        daemon had closed the kept one (its ticket then is unspent); the connection is kept afterwards."""
        with self._lock:
            old_port = self._ports.get(host)
            stale = self._idle.pop((host, old_port), []) if old_port not in (None, port) else []
            self._ports[host] = port  # a restarted daemon with a new port: drop connections to the old one
            idle = self._idle.setdefault((host, port), [])
            conn = idle.pop() if idle else None
        for old in stale:
            old.close()
        if conn is not None:
            try:
                return self._exchange(host, port, conn, exchange)
            except (_Unused, ConnectionError):  # the daemon closed the kept connection: the ticket is unspent
                pass
        return self._exchange(host, port, self._connect(host, port), exchange)

    def _connect(self, host: str, port: int) -> socket.socket:
        try:
            conn = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        except OSError as exc:
            raise Unreachable(f"cannot connect to the data port {host}:{port}: {exc}") from exc
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                conn = self._tls_context().wrap_socket(conn, server_hostname=self.host)
            conn.sendall(self._hello)
        except (OSError, ValueError) as exc:  # a failed handshake (ssl.SSLError is an OSError)
            conn.close()
            raise Unreachable(f"cannot open a data-port connection to {host}:{port}: {exc}") from exc
        return conn

    def _exchange(self, host: str, port: int, conn: socket.socket, exchange: Callable[[socket.socket], T]) -> T:
        try:
            result = exchange(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._ports.get(host) == port:
                self._idle.setdefault((host, port), []).append(conn)
                conn = None
        if conn is not None:
            conn.close()
        return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _receive(conn: socket.socket, ticket: bytes, size: int, timeout_s: float,
             on_bytes: Callable[[memoryview], None] | None) -> bytearray:
    conn.settimeout(timeout_s)
    conn.sendall(ticket)
    data = bytearray(size)
    _fill(conn, memoryview(data), on_bytes)
    return data


def _send(conn: socket.socket, ticket: bytes, data: bytes | bytearray | memoryview,
          timeout_s: float) -> tuple[int, bytes]:
    conn.settimeout(timeout_s)
    conn.sendall(ticket)
    conn.sendall(data)
    head = bytearray(PUT_REPLY.size)
    _fill(conn, memoryview(head))
    code, length = PUT_REPLY.unpack(head)
    if length > MAX_REPLY_BYTES:
        raise ValueError(f"data port announced a put reply of {length} bytes")
    payload = bytearray(length)
    _fill(conn, memoryview(payload))
    return code, bytes(payload)


def _fill(conn: socket.socket, view: memoryview, on_bytes: Callable[[memoryview], None] | None = None) -> None:
    """Read exactly len(view) bytes, each piece to `on_bytes` once read; _Unused (or a ConnectionError)
    if the connection closes before the first, ValueError after (the ticket is spent: no retry)."""
    offset = 0
    while offset < len(view):
        try:
            n = conn.recv_into(view[offset:])
        except ConnectionError as exc:
            if offset == 0:
                raise  # a kept connection the daemon had closed: `_redeem` tries a new one
            raise ValueError(f"data port connection lost after {offset} of {len(view)} bytes: {exc}") from exc
        if n == 0:
            raise (_Unused if offset == 0 else ValueError)(
                f"data port closed the connection after {offset} of {len(view)} bytes")
        if on_bytes is not None:
            on_bytes(view[offset:offset + n])
        offset += n
