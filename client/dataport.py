"""The client's side of the daemon's data port (the protocol: daemon/dataport.py).

Connections are opened on first use and kept between fetches, one per fetch in flight, so a
multi-threaded worker never shares a socket between two transfers. Each new connection makes its TLS
handshake (when the client has a TLS context: the daemon's data port uses the gRPC port's
certificates) and sends its HELLO frame with the client's bearer token before its first ticket.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from collections.abc import Callable

MAGIC = b"FCD1"  # the HELLO frame: the daemon's dataport.MAGIC and HELLO
HELLO = struct.Struct(">4sH")


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


def hello(token: str | None) -> bytes:
    """The HELLO frame that starts every data-port connection: who the client is (its bearer token)."""
    raw = (token or "").encode()
    return HELLO.pack(MAGIC, len(raw)) + raw


class DataConnections:
    """Kept connections to one daemon's data port. `tls_context`: the SSLContext in force for a new
    connection (None: plain TCP); `token`: the bearer token the HELLO frame carries."""

    def __init__(self, host: str, connect_timeout_s: float, *, token: str | None = None,
                 tls_context: Callable[[], ssl.SSLContext] | None = None):
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self._hello = hello(token)
        self._tls_context = tls_context
        self._port = 0  # the daemon's data port as last announced; kept connections go there
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def receive(self, port: int, ticket: bytes, size: int, timeout_s: float) -> bytearray:
        """Redeem `ticket` on the daemon's data port: exactly `size` bytes. Raises Unreachable (no
        connection), another OSError (the connection is dropped) or ValueError (the daemon closed it
        early: an expired ticket, say)."""
        with self._lock:
            if port != self._port:  # a restarted daemon with a new port: drop connections to the old one
                stale, self._idle, self._port = self._idle, [], port
            else:
                stale = []
            conn = self._idle.pop() if self._idle else None
        for old in stale:
            old.close()
        if conn is not None:
            try:
                return self._receive(conn, port, ticket, size, timeout_s)
            except (_Unused, ConnectionError):  # the daemon closed the kept connection: the ticket is unspent
                pass
        return self._receive(self._connect(port), port, ticket, size, timeout_s)

    def _connect(self, port: int) -> socket.socket:
        try:
            conn = socket.create_connection((self.host, port), timeout=self.connect_timeout_s)
        except OSError as exc:
            raise Unreachable(f"cannot connect to the data port {self.host}:{port}: {exc}") from exc
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                conn = self._tls_context().wrap_socket(conn, server_hostname=self.host)
            conn.sendall(self._hello)
        except (OSError, ValueError) as exc:  # a failed handshake (ssl.SSLError is an OSError)
            conn.close()
            raise Unreachable(f"cannot open a data-port connection to {self.host}:{port}: {exc}") from exc
        return conn

    def _receive(self, conn: socket.socket, port: int, ticket: bytes, size: int, timeout_s: float) -> bytearray:
        offset = 0
        try:
            conn.settimeout(timeout_s)
            conn.sendall(ticket)
            data = bytearray(size)
            view = memoryview(data)
            while offset < size:
                n = conn.recv_into(view[offset:])
                if n == 0:
                    raise (_Unused if offset == 0 else ValueError)(
                        f"data port closed the connection after {offset} of {size} bytes")
                offset += n
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if port == self._port:
                self._idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        return data

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
