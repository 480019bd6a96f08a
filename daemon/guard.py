"""What a client can hold of the daemon, bounded: time, streams, Put buffer bytes and log lines.

A gRPC call waits on its client at known points: for its request message, for a Put's next message,
for a Fetch reader to take the message just sent (the sync server's send blocks until the transport
has written it). `Guard` watches every call: a watchdog thread cancels (`context.cancel()`: the client
sees CANCELLED, and the thread blocked in the send or receive is released at once) any call that has
waited on its client for `idle_s` at a stretch, or that has run for `max_s` in all. Time the daemon
itself spends (reading a blob, storing an entry) is not waiting. A client address may have at most
`streams_per_client` streams open, and the Puts being received may hold at most `put_buffer_bytes` of
declared blob bytes (one address at most half), because the daemon keeps a Put's blob in memory until
it stores it whole. A call past either is refused before any work.

Why the sync server and a watchdog rather than grpc.aio: an aio handler cannot cancel its own call, and
`abort()` queues its status behind a message the client does not read, so a stalled Fetch reader kept
its stream (and the message) until it went away; the sync server's `cancel()` resets the stream from
any thread. Streams get a thread pool of their own (server.py), so however many of them wait on slow
clients, unary calls (Lookup, Stats, ...) find a thread. docs/under_pressure.md has the measurements.

`PeerLog` keeps one client's mistakes from flooding the log: at most one line per client address and
kind per interval, with the count of lines it held back; metrics count every one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from .errors import CacheError

T = TypeVar("T")


class Refused(CacheError):
    """The call is refused before any work: the client holds its share already. `reason` is the
    metric's label: client_streams or put_buffer."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Cancellable(Protocol):
    """What the guard needs of a gRPC ServicerContext."""

    def peer(self) -> str: ...

    def cancel(self) -> None: ...


def peer_host(peer: str) -> str:
    """The client address of a gRPC peer string: 'ipv4:10.0.0.7:51234' -> '10.0.0.7', 'ipv6:[::1]:5' ->
    '::1'; other kinds (a unix socket) are returned whole: all their clients count as one."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return address.rpartition(":")[0].strip("[]")
    return peer


class PeerLog:
    """`warn(peer, kind, ...)` logs at most once per (peer, kind) per `interval_s`; the next line that is
    logged says how many were held back. Remembers at most `max_peers` keys (old ones are forgotten
    first), so a flood from many addresses cannot grow it without bound."""

    def __init__(self, logger: logging.Logger, interval_s: float, max_peers: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval_s = interval_s
        self.max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (logged at, held back since)

    def warn(self, peer: str, kind: str, message: str, *args: object) -> bool:
        """Log `message % args` prefixed by the peer, unless (peer, kind) was logged within the interval;
        True if it was logged."""
        now = self._clock()
        key = (peer, kind)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return False
            held = last[1] if last is not None else 0
            self._last.pop(key, None)
            self._last[key] = (now, 0)  # re-inserted: the dict's order is the order logged
            while len(self._last) > self.max_peers:
                del self._last[next(iter(self._last))]
        suffix = f" ({held} more from this client in the last {self.interval_s:g} s)" if held else ""
        self.logger.warning("client %s: " + message + suffix, peer, *args)
        return True


class Watch:
    """One call's clocks. The call marks when it waits on its client (`receive`, `received`, `sending`)
    and the watchdog reads the marks; `cut` is the reason it was cancelled, None while it was not."""

    __slots__ = ("context", "cut", "held_bytes", "method", "peer", "started", "stream", "waiting_since")

    def __init__(self, method: str, context: Cancellable, peer: str, stream: bool):
        self.method = method
        self.context = context
        self.peer = peer
        self.stream = stream
        self.started = time.monotonic()
        self.waiting_since: float | None = None
        self.cut: str | None = None
        self.held_bytes = 0

    def receive(self, requests: Iterator[T]) -> T | None:
        """The next message from the client, or None at the end of its stream."""
        self.waiting_since = time.monotonic()
        try:
            return next(requests, None)
        finally:
            self.waiting_since = None

    def received(self, requests: Iterator[T]) -> Iterator[T]:
        """The client's messages, the wait for each watched."""
        while (message := self.receive(requests)) is not None:
            yield message

    def sending(self, messages: Iterable[T]) -> Iterator[T]:
        """`messages`, each watched while the server sends it: the sync server resumes a response
        generator only once the transport has taken the message it yielded."""
        for message in messages:
            self.waiting_since = time.monotonic()
            yield message
            self.waiting_since = None


class Guard:
    """Watches calls (`watch`), holds Put buffer bytes for them (`hold`), and cuts the ones past their
    time from a watchdog thread (`start` / `stop`). `on_cut(watch)` is told each cut, from that thread."""

    def __init__(self, idle_s: float, max_s: float, streams_per_client: int, put_buffer_bytes: int,
                 on_cut: Callable[[Watch], None] = lambda watch: None):
        self.idle_s = idle_s
        self.max_s = max_s
        self.streams_per_client = streams_per_client
        self.put_buffer_bytes = put_buffer_bytes
        self._on_cut = on_cut
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._streams: Counter[str] = Counter()
        self._held: Counter[str] = Counter()
        self._held_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="call-watchdog", daemon=True)
        self._tick_s = min(0.5, max(0.05, min(idle_s, max_s) / 8))

    @property
    def open_streams(self) -> int:
        with self._lock:
            return sum(self._streams.values())

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held_total

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @contextmanager
    def watch(self, method: str, context: Any, stream: bool = False) -> Iterator[Watch]:
        """Watch one call while the block runs. A stream from an address that has streams_per_client
        open already is Refused."""
        peer = peer_host(context.peer())
        with self._lock:
            if stream and self._streams[peer] >= self.streams_per_client:
                raise Refused("client_streams", f"this client address has {self._streams[peer]} streams open, "
                                                f"the daemon's limit (streams_per_client)")
            watch = Watch(method, context, peer, stream)
            self._watches.add(watch)
            if stream:
                self._streams[peer] += 1
        try:
            yield watch
        finally:
            with self._lock:
                self._watches.discard(watch)
                if stream:
                    self._streams[peer] -= 1
                    if self._streams[peer] <= 0:
                        del self._streams[peer]
                if watch.held_bytes:
                    self._release(watch)

    def hold(self, watch: Watch, size: int) -> None:
        """Hold `size` bytes of the Put buffer for `watch`'s call until it ends; Refused if the buffer, or
        this address's half of it, has not that much left."""
        with self._lock:
            self._take(watch.peer, size)
            watch.held_bytes += size

    def reserve(self, peer: str, size: int) -> Callable[[], None]:
        """Hold `size` bytes of the Put buffer for `peer` beyond any one call (a PutDirect's bytes arrive
        on the data port after the call ended); Refused as `hold`. Returns the release, which frees them
        once, however often it is called."""
        with self._lock:
            self._take(peer, size)
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._give(peer, size)
        return release

    def _take(self, peer: str, size: int) -> None:
        mine = self._held[peer]
        if mine + size > self.put_buffer_bytes // 2 or self._held_total + size > self.put_buffer_bytes:
            raise Refused("put_buffer", f"Puts being received hold {self._held_total} bytes ({mine} of them "
                                        f"this client's), no room for {size} more (put_buffer_bytes "
                                        f"{self.put_buffer_bytes}, half of it per client): try again later")
        self._held[peer] += size
        self._held_total += size

    def _give(self, peer: str, size: int) -> None:
        self._held[peer] -= size
        if self._held[peer] <= 0:
            del self._held[peer]
        self._held_total -= size

    def _release(self, watch: Watch) -> None:
        self._give(watch.peer, watch.held_bytes)
        watch.held_bytes = 0

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._watches if w.cut is None and self._reason(w, now)]
                for w in due:
                    w.cut = self._reason(w, now)
            for w in due:
                w.context.cancel()
                self._on_cut(w)

    def _reason(self, watch: Watch, now: float) -> str | None:
        if now - watch.started > self.max_s:
            return "too_long"
        since = watch.waiting_since
        if since is not None and now - since > self.idle_s:
            return "idle"
        return None
