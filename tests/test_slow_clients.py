"""Slow and stalled clients, on gRPC and on the data port, never block the daemon's other clients.

Every call is bounded in time (a client that makes no progress for `stream_idle_seconds` is cut; no
stream outlives `stream_max_seconds`), streams run on threads of their own (`stream_workers`), one
client address holds at most `streams_per_client` streams and half of `put_buffer_bytes`, and the
data port closes idle connections after `data_idle_seconds` and keeps at most
`data_connections_per_client` per address. Real daemons on loopback; 127.0.0.x source addresses stand
for distinct clients (Linux routes all of 127.0.0.0/8 to lo).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1.wire import data_hello as hello
from tests.conftest import NS, connect, metric
from tests.test_data_port import wait_for
from tests.vectors import unit

IDLE_S = 2.0  # stream_idle_seconds in these tests
SLACK_S = 2.5  # the watchdog's tick, thread wake-ups and a shared 2-core machine
BLOB = 16 << 20  # larger than what a stalled reader's transport buffers, so the daemon's send blocks


def put_raw(daemon, data: bytes, seed: int = 1) -> str:
    """Store `data` as a raw entry whose vector is unit(seed)."""
    with connect(daemon.target) as c:
        return c.put_blob(f"blob {seed}", data, pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)]), unit(seed))


def channel(target: str, *, small_window: bool = False) -> grpc.Channel:
    """A channel on a TCP connection of its own (channels with equal options otherwise share one).
    `small_window`: its HTTP/2 window stays at 64 KiB (no BDP probing), so a reader that stops makes
    the daemon's send block at once; otherwise the client's transport may take a whole blob unread."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 8 << 20),
               ("grpc.max_send_message_length", 8 << 20)]
    return grpc.insecure_channel(target, options=[*options, ("grpc.http2.bdp_probe", 0)] if small_window else options)


def put_header(size: int, seed: int) -> pb.PutRequest:
    return pb.PutRequest(header=pb.PutHeader(
        namespace=NS.to_proto(), prompt=f"stalled {seed}", vectors=pb.Vectors(full=unit(seed).tolist()),
        blob=pb.BlobInfo(size=size, sha256=b"\0" * 32, codec="raw", dtype="uint8", shape=[size])))


class Stalled:
    """Clients that stall: Fetch readers that read the header and stop, Puts that send the header (and
    optionally `trickle` chunks, one per `every_s`) and stop. `close()` lets every one of them go."""

    def __init__(self, target: str, connections: int = 4):
        self.channels = [channel(target, small_window=True) for _ in range(connections)]
        self.release = threading.Event()
        self.fetches: list[grpc.Call] = []
        self.puts: list[grpc.Future] = []

    def stub(self, i: int) -> pb_grpc.CacheServiceStub:
        return pb_grpc.CacheServiceStub(self.channels[i % len(self.channels)])

    def fetch(self, entry_id: str, n: int) -> None:
        for i in range(n):
            call = self.stub(i).Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry_id))
            assert next(call).WhichOneof("msg") == "header"
            self.fetches.append(call)

    def put(self, n: int, size: int = 1 << 20, trickle: int = 0, every_s: float = 0.0) -> None:
        def messages(seed: int) -> Iterator[pb.PutRequest]:
            yield put_header(size, seed)
            for _ in range(trickle):
                if self.release.wait(every_s):
                    return
                yield pb.PutRequest(chunk=b"x" * 1024)
            self.release.wait()

        for i in range(n):
            self.puts.append(self.stub(i).Put.future(messages(1000 + len(self.puts))))

    def close(self) -> None:
        self.release.set()
        for call in self.fetches:
            call.cancel()
        for c in self.channels:
            c.close()


@pytest.fixture
def stalled() -> Iterator:
    """Factory: stalled(target) -> a Stalled; all are let go at teardown."""
    made: list[Stalled] = []

    def make(target: str) -> Stalled:
        made.append(Stalled(target))
        return made[-1]

    yield make
    for s in made:
        s.close()


def read_rest(call: grpc.Call) -> tuple[int, grpc.StatusCode | None]:
    """Resume a stalled Fetch: the messages still buffered for it, then how the stream ended."""
    n = 0
    try:
        for _ in call:
            n += 1
    except grpc.RpcError as exc:
        return n, exc.code()
    return n, None


def lookup_ms(client, n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        assert client.lookup(unit(1 + i % 2)) is not None, client.last_error
        times.append((time.perf_counter() - start) * 1000)
    return times


def test_stalled_streams_do_not_starve_other_calls(start_daemon, stalled) -> None:
    """16 Fetch readers that stop after the header and 20 Puts that stop after it: Stats and Lookup from
    another client answer within their usual deadline, and every stalled stream is cut once it has
    been idle for stream_idle_seconds (the client sees CANCELLED)."""
    daemon = start_daemon(stream_idle_seconds=IDLE_S, streams_per_client=64)
    entry = put_raw(daemon, os.urandom(BLOB))
    with connect(daemon.target, timeout_s=2.0) as good:
        unloaded = lookup_ms(good, 30)
        slow = stalled(daemon.target)

        def streams_seen() -> float:  # already cut for idling or open now (in this order: none counted twice)
            cut = metric(daemon, "flexcache_calls_cut_total", reason="idle")
            return cut + metric(daemon, "flexcache_open_streams")

        streams_before = streams_seen()
        slow.fetch(entry, 16)
        slow.put(20)
        # Every stalled stream has reached the daemon and blocks there (idle from then on).
        assert wait_for(lambda: streams_seen() >= streams_before + 36, timeout_s=30), streams_seen() - streams_before
        all_open = time.monotonic()
        assert good.stats() is not None, good.last_error
        loaded = lookup_ms(good, 30)
        with channel(daemon.target) as other:
            stub = pb_grpc.CacheServiceStub(other)
            assert stub.Stats(pb.StatsRequest(), timeout=2).entries == 1
            assert stub.Lookup(pb.LookupRequest(namespace=NS.to_proto(), vectors=pb.Vectors(
                full=unit(1).tolist())), timeout=2).candidates[0].entry_id == entry
        # Loose on purpose (a shared machine): correctness under load, not a latency claim (bench/ has that).
        assert np.percentile(loaded, 99) < 2000, (np.percentile(unloaded, 99), np.percentile(loaded, 99))

        def cuts_and_completions() -> dict[str, tuple[float, float]]:  # for the message, if it fails
            return {m: (metric(daemon, "flexcache_calls_cut_total", method=m),
                        metric(daemon, "flexcache_requests_total", method=m, code="OK")) for m in ("Fetch", "Put")}

        assert wait_for(lambda: metric(daemon, "flexcache_calls_cut_total", reason="idle") >= 36,
                        timeout_s=IDLE_S + SLACK_S + 1), cuts_and_completions()
        cut_after = time.monotonic() - all_open  # each was idle by then: cut within IDLE_S and the watchdog's slack
        assert cut_after < IDLE_S + SLACK_S + 1, cut_after
        assert metric(daemon, "flexcache_calls_cut_total", method="Fetch", reason="idle") == 16
        assert metric(daemon, "flexcache_calls_cut_total", method="Put", reason="idle") == 20
        for call in slow.fetches:  # what was buffered, never the whole blob, then CANCELLED
            got, code = read_rest(call)
            assert code == grpc.StatusCode.CANCELLED and got < BLOB >> 20
        for future in slow.puts:
            assert future.exception(timeout=5).code() == grpc.StatusCode.CANCELLED
        assert good.stats().entries == 1  # the stalled Puts stored nothing
        assert len(good.fetch(entry).data) == BLOB
    log = daemon.log.read_text()
    assert "Traceback" not in log and len(log.splitlines()) < 20, log  # cut streams: one line per client


def test_a_stream_that_keeps_moving_is_cut_at_stream_max_seconds(start_daemon, stalled) -> None:
    """A reader that takes a message every 0.5 s and a Put that sends a chunk every 0.5 s are never
    idle, but no stream outlives stream_max_seconds."""
    daemon = start_daemon(stream_idle_seconds=IDLE_S, stream_max_seconds=3)
    entry = put_raw(daemon, os.urandom(BLOB))
    slow = stalled(daemon.target)
    started = time.monotonic()
    slow.put(1, size=1 << 20, trickle=100, every_s=0.5)
    call = slow.stub(0).Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry))
    got, code = 0, None
    try:
        for _ in call:
            got += 1
            time.sleep(0.5)
    except grpc.RpcError as exc:
        code = exc.code()
    assert code == grpc.StatusCode.CANCELLED and got < (BLOB >> 20) + 1
    assert slow.puts[0].exception(timeout=5).code() == grpc.StatusCode.CANCELLED
    assert time.monotonic() - started < 3 + SLACK_S + 1
    assert wait_for(lambda: metric(daemon, "flexcache_calls_cut_total", reason="too_long") == 2)
    assert metric(daemon, "flexcache_calls_cut_total", reason="idle") == 0


def test_one_client_address_holds_at_most_its_streams(start_daemon, stalled) -> None:
    """Past streams_per_client, a client address's next stream is refused at once (RESOURCE_EXHAUSTED);
    once its stalled streams are cut, it streams again."""
    daemon = start_daemon(stream_idle_seconds=IDLE_S, streams_per_client=4)
    entry = put_raw(daemon, os.urandom(BLOB))
    slow = stalled(daemon.target)
    slow.fetch(entry, 4)
    with pytest.raises(grpc.RpcError) as refused:
        slow.fetch(entry, 1)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "streams_per_client" in refused.value.details()
    assert metric(daemon, "flexcache_calls_refused_total", method="Fetch", reason="client_streams") == 1
    with connect(daemon.target, timeout_s=2.0) as c:
        assert c.stats() is not None and c.lookup(unit(1)) is not None  # unary calls are not streams
        assert wait_for(lambda: metric(daemon, "flexcache_calls_cut_total", reason="idle") == 4,
                        timeout_s=IDLE_S + SLACK_S)
        assert bytes(c.fetch(entry).data)[:4] != b""  # the data port
    with channel(daemon.target) as ch:  # and the stream
        stream = pb_grpc.CacheServiceStub(ch).Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry),
                                                    timeout=10)
        assert sum(1 for _ in stream) == 1 + (BLOB >> 20)


def test_stalled_puts_hold_at_most_half_the_put_buffer(start_daemon, stalled) -> None:
    """A Put holds its declared blob size of put_buffer_bytes while it is received (the daemon buffers
    an entry whole before storing it); one client address may hold at most half of it."""
    daemon = start_daemon(stream_idle_seconds=IDLE_S, put_buffer_bytes="64MiB", max_blob_bytes="32MiB")
    slow = stalled(daemon.target)
    slow.put(1, size=32 << 20)
    assert wait_for(lambda: metric(daemon, "flexcache_put_buffer_bytes") == 32 << 20)  # its header is in
    data = os.urandom(1 << 20)
    info = pb.BlobInfo(size=len(data), sha256=hashlib.sha256(data).digest(), codec="raw", dtype="uint8",
                       shape=[len(data)])
    messages = [pb.PutRequest(header=pb.PutHeader(namespace=NS.to_proto(), prompt="small", blob=info,
                                                  vectors=pb.Vectors(full=unit(5).tolist()))),
                pb.PutRequest(chunk=data)]
    with channel(daemon.target) as ch:
        stub = pb_grpc.CacheServiceStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Put(iter(messages), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "put_buffer_bytes" in refused.value.details()
        assert metric(daemon, "flexcache_calls_refused_total", method="Put", reason="put_buffer") == 1
        assert slow.puts[0].exception(timeout=IDLE_S + SLACK_S).code() == grpc.StatusCode.CANCELLED
        assert stub.Put(iter(messages), timeout=5).created  # the stalled Put's share is free again


# ----------------------------------------------------------------------------- the data port
def open_idle(port: int, n: int, source: str) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        conns.append(conn)
    return conns


def closed_by_daemon(conn: socket.socket, within_s: float) -> bool:
    """True if the daemon closes `conn` (EOF or reset) within `within_s` seconds."""
    conn.settimeout(within_s)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_data_connections_are_closed_within_data_idle_seconds(start_daemon) -> None:
    daemon = start_daemon(data_idle_seconds=1)
    conns = open_idle(daemon.data_port, 5, "127.0.0.2")
    half = socket.create_connection(("127.0.0.1", daemon.data_port), timeout=10, source_address=("127.0.0.3", 0))
    try:
        started = time.monotonic()
        for _ in range(3):  # half a ticket, a byte at a time: the whole ticket must come within the bound
            half.sendall(b"\x01")
            time.sleep(0.3)
        assert all(closed_by_daemon(c, 1 + SLACK_S) for c in [*conns, half])
        assert time.monotonic() - started < 1 + SLACK_S
        assert wait_for(lambda: metric(daemon, "flexcache_data_port_connections_total", outcome="idle_closed") == 6)
    finally:
        for c in [*conns, half]:
            c.close()
    data = os.urandom(1 << 20)
    entry = put_raw(daemon, data)
    with connect(daemon.target) as c:  # a kept connection the daemon closed is reopened, not streamed
        assert bytes(c.fetch(entry).data) == data
        time.sleep(1 + SLACK_S)
        assert bytes(c.fetch(entry).data) == data
    assert metric(daemon, "flexcache_requests_total", method="Fetch") == 0


def test_one_address_cannot_take_the_data_port(start_daemon) -> None:
    """300 idle connections from one address (more than the port's 256): past data_connections_per_client
    they are closed at once, and another address still fetches over the data port."""
    daemon = start_daemon(data_idle_seconds=10, data_connections_per_client=8)
    data = os.urandom(1 << 20)
    entry = put_raw(daemon, data)
    conns = open_idle(daemon.data_port, 300, "127.0.0.2")
    try:
        assert wait_for(lambda: metric(daemon, "flexcache_data_port_connections_total", outcome="client_share")
                        == 300 - 8)
        assert sum(closed_by_daemon(c, 0.05) for c in conns) == 300 - 8
        with connect(daemon.target) as c:
            assert bytes(c.fetch(entry).data) == data and c.last_error is None
        assert wait_for(lambda: metric(daemon, "flexcache_data_port_transfers_total", outcome="sent") == 1)
        assert metric(daemon, "flexcache_requests_total", method="Fetch") == 0  # not the stream fallback
    finally:
        for c in conns:
            c.close()


def test_a_data_port_reader_that_stops_reading_is_dropped(start_daemon) -> None:
    """A client redeems a ticket and never reads: the daemon's send stalls and is dropped after
    stream_idle_seconds, releasing the entry; other fetches go on meanwhile."""
    daemon = start_daemon(stream_idle_seconds=IDLE_S)
    big, small = os.urandom(BLOB), os.urandom(1 << 20)
    big_id, small_id = put_raw(daemon, big, 1), put_raw(daemon, small, 2)
    with channel(daemon.target) as ch:
        answer = pb_grpc.CacheServiceStub(ch).FetchDirect(pb.FetchRequest(namespace=NS.to_proto(), entry_id=big_id),
                                                          timeout=5)
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.connect(("127.0.0.1", answer.data_port))
    try:
        conn.sendall(hello(None) + answer.ticket)
        with connect(daemon.target) as c:
            assert bytes(c.fetch(small_id).data) == small
        assert wait_for(lambda: metric(daemon, "flexcache_data_port_transfers_total", outcome="failed") == 1,
                        timeout_s=IDLE_S + SLACK_S + 1)
    finally:
        conn.close()
