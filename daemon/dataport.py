"""The data port: blobs on a plain (or TLS) TCP connection, beside gRPC.

Python gRPC moves a multi-megabyte blob through HTTP/2 frames, a thread hand-off per message and
several copies, which leaves a Fetch stream behind a Redis GET of the same blob (measured in
docs/bench_daemon.md). The data port carries the bytes as Redis does, on a TCP connection, while
gRPC keeps everything else (validation, accounting, credentials, status codes). A fetch:

1. the client calls FetchDirect; the daemon checks the request and the caller's credential, pins the
   entry and answers with the header, a one-time ticket (16 random bytes) and the data port's number;
2. the client opens a connection to that port, on the host it reached the daemon at (TLS with the
   gRPC port's certificates when the daemon has them), and says who it is: the HELLO frame, MAGIC
   then a 2-byte big-endian length and the bearer token it sends gRPC (length 0 without auth); then
   it sends the ticket (connections are kept open between fetches, one HELLO each);
3. the daemon writes exactly blob.size bytes back, and the client verifies the checksum as for a
   stream.

A put is the same in the other direction: PutDirect takes the Put's header (checked, deduplicated:
an entry already stored needs no ticket), reserves the blob's share of `put_buffer_bytes`, and answers
a ticket; the client sends the ticket and then exactly blob.size bytes; the daemon checks and stores
them as a Put stream's (CRC-32C and sha256 checks, one WriteBatch) and writes the reply frame (wire.PUT_REPLY:
the status code's number, a length, a PutResponse or the error's message). The connection is then
kept, as after a fetch.

A ticket is good for one transfer within TICKET_TTL_S, and only on a connection of the caller it was
issued to (access.Access identifies the HELLO's token or the connection's client certificate as it
identifies a gRPC call: the same `Identity.writer`); an unknown, expired or someone else's ticket, an
unknown credential, or any failure closes the connection, and the client fetches the stream
instead. An unclaimed ticket unpins its entry when it expires, so a client that vanishes cannot hold
an entry against eviction.

No client can hold the port against the others: a connection that completes no TLS handshake, HELLO
or whole ticket within `idle_s` (kept between fetches, or sending a ticket a byte at a time) is
closed, and the client simply reconnects for its next fetch; one client address has at most
`per_client` connections open (more are closed at once, and that fetch streams instead); a transfer
whose reader takes no bytes for `stall_s`, or that runs `max_s` in all, is dropped. Each connection
has a thread, waiting only within those bounds.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from typing import Protocol

from flexcache.v1.wire import CHUNK_BYTES, DATA_HELLO, DATA_MAGIC, MAX_TOKEN_BYTES, PUT_REPLY, TICKET_BYTES

from .access import OPEN, Access
from .auth import Identity
from .errors import Unauthenticated, Unavailable
from .tls import peer_common_name

log = logging.getLogger(__name__)

TICKET_TTL_S = 30.0
IDLE_S = 5.0  # a connection bringing no whole ticket for this long is closed (data_idle_seconds)
STALL_S = 10.0  # a transfer whose reader takes nothing for this long is dropped (stream_idle_seconds)
MAX_S = 300.0  # no transfer lasts longer (stream_max_seconds)
PER_CLIENT = 16  # connections one client address may have open (data_connections_per_client)
MAX_CONNECTIONS = 256


class Chunks(Iterator[bytes], Protocol):
    """A fetched entry's chunks; close() releases the entry (pins.PinnedChunks)."""

    def close(self) -> None: ...


class Sink(Protocol):
    """Where a PutDirect's bytes go (the server's DirectPut): `add_chunk` for each piece of at most
    CHUNK_BYTES, in order; then `finish`, the reply (a gRPC status code's number, 0 for OK, and its
    payload); or `abort` if the transfer failed. Exactly one of `finish` and `abort` is called."""

    def add_chunk(self, data: bytes) -> None: ...

    def finish(self) -> tuple[int, bytes]: ...

    def abort(self) -> None: ...


@dataclass
class _Transfer:
    """One ticket's transfer: a fetch sends `chunks`, a put receives into `sink`."""

    size: int
    expires: float
    owner: str  # Identity.writer of the caller it was issued to
    chunks: Chunks | None = None
    sink: Sink | None = None

    def drop(self) -> None:
        """Release what the transfer holds (its entry's pin, or its Put's buffer share)."""
        if self.chunks is not None:
            self.chunks.close()
        elif self.sink is not None:
            self.sink.abort()


class DataPort:
    """Listens on `address` (host:port, port 0 picks one); `port` is the one it got. `count` is told
    each ticket's outcome: sent, expired, failed or refused; `count_connection` each connection's:
    accepted, client_share or full (closed at once), idle_closed, unauthenticated (the daemon's metrics).
    `warn(client, kind, message, *args)` logs a client's refused connections (guard.PeerLog.warn:
    rate-limited). `access` identifies each connection's caller (default: auth off); `tls_context`
    gives the SSLContext in force for a new connection (None: plain TCP)."""

    def __init__(self, address: str, ticket_ttl_s: float = TICKET_TTL_S,
                 count: Callable[[str], None] = lambda outcome: None, *, idle_s: float = IDLE_S,
                 stall_s: float = STALL_S, max_s: float = MAX_S, per_client: int = PER_CLIENT,
                 count_connection: Callable[[str], None] = lambda outcome: None,
                 warn: Callable[..., object] = lambda client, kind, message, *args: None,
                 access: Access | None = None, tls_context: Callable[[], ssl.SSLContext] | None = None):
        self.ticket_ttl_s = ticket_ttl_s
        self._access = access or Access(None)
        self._tls_context = tls_context
        self.idle_s, self.stall_s, self.max_s, self.per_client = idle_s, stall_s, max_s, per_client
        self._count = count
        self._count_connection = count_connection
        self._warn = warn
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, int(port)))
        except (OSError, ValueError) as exc:
            self._listener.close()
            raise OSError(f"data port: cannot listen on {address}: {exc}") from exc
        self._listener.listen(128)
        self._listener.settimeout(min(1.0, ticket_ttl_s))  # the accept loop also expires tickets
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._tickets: dict[bytes, _Transfer] = {}
        self._connections: set[socket.socket] = set()
        self._per_client: Counter[str] = Counter()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="dataport-accept", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def issue(self, chunks: Chunks, size: int, owner: str = OPEN.writer) -> bytes:
        """A ticket for one transfer of `chunks` (`size` bytes in all) to the client, redeemable only on
        a connection whose caller's Identity.writer is `owner`; the port now owns `chunks`."""
        return self._issue(_Transfer(size, time.monotonic() + self.ticket_ttl_s, owner, chunks=chunks))

    def issue_put(self, sink: Sink, size: int, owner: str = OPEN.writer) -> bytes:
        """A ticket for one transfer of `size` bytes from the client into `sink`, answered on the same
        connection (PUT_REPLY); redeemable as `issue`'s. The port now owns `sink`."""
        return self._issue(_Transfer(size, time.monotonic() + self.ticket_ttl_s, owner, sink=sink))

    def _issue(self, transfer: _Transfer) -> bytes:
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            if self._stopping.is_set():
                transfer.drop()
                raise OSError("data port is shutting down")
            self._tickets[ticket] = transfer
        return ticket

    def stop(self, grace_s: float) -> None:
        """No new connections; transfers under way get `grace_s` to finish; unclaimed tickets are
        dropped (their entries unpinned). Call before closing the store: a transfer reads from it."""
        self._stopping.set()
        if self._acceptor.is_alive():  # not started if the daemon failed to start
            self._acceptor.join()
        self._listener.close()
        deadline = time.monotonic() + grace_s
        with self._lock:
            idle = list(self._connections)
        for conn in idle:  # wakes connections blocked waiting for a ticket; a send under way finishes
            _shutdown_read(conn)
        for thread in self._live_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for conn in self._connections:  # transfers past the grace period: their sends fail at once
                _shutdown(conn)
            transfers, self._tickets = list(self._tickets.values()), {}
        for thread in self._live_threads():  # none may still be reading when the store closes
            thread.join(5.0)
        for transfer in transfers:
            transfer.drop()
            self._count("expired")

    def _live_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    # ---- internals ----
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            self._expire()
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.warning("data port: accept failed", exc_info=True)
                time.sleep(0.1)
                continue
            client = str(peer[0])
            with self._lock:
                if len(self._connections) >= MAX_CONNECTIONS:
                    refused = "full"
                elif self._per_client[client] >= self.per_client:
                    refused = "client_share"
                else:
                    refused = ""
                    self._connections.add(conn)
                    self._per_client[client] += 1
                    thread = threading.Thread(target=self._serve, args=(conn, client), name="dataport-conn",
                                              daemon=True)
                    self._threads.add(thread)
            if refused:  # the client streams instead
                conn.close()
                self._count_connection(refused)
                why = (f"the port has {MAX_CONNECTIONS} open" if refused == "full" else
                       f"this address has {self.per_client} open (data_connections_per_client)")
                self._warn(client, "data port refused", "data port connection closed at once: %s", why)
                continue
            self._count_connection("accepted")
            thread.start()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [t for t, transfer in self._tickets.items() if transfer.expires < now]
            transfers = [self._tickets.pop(t) for t in stale]
        for transfer in transfers:
            transfer.drop()
            self._count("expired")

    def _take(self, ticket: bytes, who: Identity) -> _Transfer | None:
        """The ticket's transfer, if `who` may redeem it; someone else's ticket stays for its owner."""
        with self._lock:
            transfer = self._tickets.get(ticket)
            if transfer is not None and transfer.owner == who.writer:
                del self._tickets[ticket]
            else:
                transfer = None
        if transfer is None:
            self._count("refused")
        elif transfer.expires < time.monotonic():
            transfer.drop()
            self._count("expired")
            return None
        return transfer

    def _serve(self, conn: socket.socket, client: str) -> None:
        """One client connection: TLS and HELLO, then ticket in, blob out, until the client closes it,
        brings no whole ticket within idle_s, or something fails."""
        link = conn  # the TLS session over `conn`, once there is one
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                link = self._secure(conn)
                who = self._hello(link, client)
            except TimeoutError:
                self._count_connection("idle_closed")
                return
            if who is None:
                return
            while not self._stopping.is_set():
                try:
                    ticket = _recv_exactly(link, TICKET_BYTES, time.monotonic() + self.idle_s)
                except TimeoutError:
                    self._count_connection("idle_closed")
                    return
                if ticket is None:
                    return  # closed by the client
                transfer = self._take(ticket, who)
                if transfer is None:
                    return  # a ticket we do not hold (any more), or not this caller's: the client streams instead
                done = self._send(link, transfer) if transfer.chunks is not None else self._receive(link, transfer)
                if not done:
                    return
        except OSError:
            pass  # the client went away, a TLS handshake failed, or the daemon is stopping
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._per_client[client] -= 1
                if self._per_client[client] <= 0:
                    del self._per_client[client]
                self._threads.discard(threading.current_thread())
            link.close()
            conn.close()

    def _secure(self, conn: socket.socket) -> socket.socket:
        """The connection after a TLS handshake within idle_s (the certificates in force now), or as it
        is without TLS. A failed handshake raises OSError (ssl.SSLError): the connection closes."""
        if self._tls_context is None:
            return conn
        conn.settimeout(self.idle_s)
        secured = self._tls_context().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        secured.do_handshake()
        return secured

    def _hello(self, conn: socket.socket, client: str) -> Identity | None:
        """The caller, from the connection's HELLO frame (and its client certificate); None when the
        connection closes or brings something else, or the credential is refused (counted, warned)."""
        deadline = time.monotonic() + self.idle_s
        head = _recv_exactly(conn, DATA_HELLO.size, deadline)
        if head is None:
            return None
        magic, length = DATA_HELLO.unpack(head)
        if magic != DATA_MAGIC or length > MAX_TOKEN_BYTES:
            self._count_connection("unauthenticated")
            self._warn(client, "data port hello", "data port connection closed: it did not start with a HELLO "
                       "frame (a client older than this daemon?)")
            return None
        raw = _recv_exactly(conn, length, deadline) if length else b""
        if raw is None:
            return None
        token = raw.decode("utf-8", "replace") if raw else None
        cn = peer_common_name(conn) if isinstance(conn, ssl.SSLSocket) else None
        try:
            return self._access.identify(token, cn)
        except Unauthenticated as exc:
            self._count_connection("unauthenticated")
            self._warn(client, "data port unauthenticated", "data port connection refused: %s", exc)
            return None

    def _receive(self, conn: socket.socket, transfer: _Transfer) -> bool:
        """Read the ticket's `size` bytes into its sink, then write the sink's reply; False (the connection
        must close, the sink aborted) if the bytes did not all come: the client sent nothing for
        stall_s, the transfer ran max_s, or the client went away."""
        sink, size = transfer.sink, transfer.size
        assert sink is not None
        deadline = time.monotonic() + self.max_s
        buffer = bytearray(min(CHUNK_BYTES, size))
        view = memoryview(buffer)
        received = 0
        try:
            while received < size:
                n = min(CHUNK_BYTES, size - received)
                _recv_into_within(conn, view[:n], self.stall_s, deadline)
                sink.add_chunk(bytes(view[:n]))
                received += n
        except OSError:  # the client went away or stalled; it puts over the stream instead
            sink.abort()
            self._count("failed")
            return False
        except Exception:
            log.exception("data port: storing a put's bytes failed")
            sink.abort()
            self._count("failed")
            return False
        code, payload = sink.finish()
        self._count("received" if code == 0 else "refused_put")
        try:
            _send_within(conn, PUT_REPLY.pack(code, len(payload)) + payload, self.stall_s, deadline)
        except OSError:  # the entry is stored (or refused) whatever the client heard
            return False
        return True

    def _send(self, conn: socket.socket, transfer: _Transfer) -> bool:
        """Write the ticket's blob; False (the connection must close) if it could not be sent whole: the
        reader took nothing for stall_s, the transfer ran max_s, or the client went away."""
        deadline = time.monotonic() + self.max_s
        sent = 0
        assert transfer.chunks is not None
        try:
            with closing(transfer.chunks):
                for chunk in transfer.chunks:
                    _send_within(conn, chunk, self.stall_s, deadline)
                    sent += len(chunk)
                    if sent >= transfer.size:  # done: never wait on the source for its end (a peer's stream)
                        break
        except OSError:  # the client went away; it streams instead
            self._count("failed")
            return False
        except Unavailable as exc:  # a cluster peer the blob came from stalled or failed: told, not a bug
            log.warning("data port: %s", exc)
            self._count("failed")
            return False
        except Exception:
            log.exception("data port: reading the entry failed")
            self._count("failed")
            return False
        if sent != transfer.size:
            log.warning("data port: entry held %d bytes, not the declared %d", sent, transfer.size)
            self._count("failed")
            return False
        self._count("sent")
        return True


def _recv_exactly(conn: socket.socket, n: int, deadline: float) -> bytes | None:
    """`n` bytes, all of them before `deadline` (TimeoutError otherwise), or None if the peer closes first."""
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        part = conn.recv(n - len(data))
        if not part:
            return None
        data += part
    return bytes(data)


def _recv_into_within(conn: socket.socket, view: memoryview, stall_s: float, deadline: float) -> None:
    """Fill `view`; TimeoutError if the sender sends nothing for `stall_s` or `deadline` passes,
    ConnectionError if it closes first."""
    filled = 0
    while filled < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the transfer ran past its deadline")
        conn.settimeout(min(stall_s, left))
        n = conn.recv_into(view[filled:])
        if n == 0:
            raise ConnectionError(f"the client closed the connection after {filled} of {len(view)} bytes")
        filled += n


def _send_within(conn: socket.socket, data: bytes, stall_s: float, deadline: float) -> None:
    """Send all of `data`; TimeoutError if the reader takes nothing for `stall_s` or `deadline` passes."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the transfer ran past its deadline")
        conn.settimeout(min(stall_s, left))
        view = view[conn.send(view):]


def _shutdown_read(conn: socket.socket) -> None:
    with suppress(OSError):
        conn.shutdown(socket.SHUT_RD)


def _shutdown(conn: socket.socket) -> None:
    with suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
