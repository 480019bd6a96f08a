"""Fetches and puts over the daemon's data port (daemon/dataport.py, client/dataport.py): tickets, the
client's default path, and every way back to the stream."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from flexcache.daemon.process import free_port
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire
from flexcache.v1.wire import data_hello as hello
from tests.conftest import NS, connect, metric
from tests.vectors import unit


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    """The data port counts a transfer once its thread is done with it, just after the client has the bytes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def put_raw(daemon, data: bytes, prompt: str = "p") -> str:
    with connect(daemon.target) as c:
        info = pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)])
        return c.put_blob(prompt, data, info, unit(len(data) % 50))


def redeem(port: int, ticket: bytes, size: int) -> bytes:
    """What the data port sends back for `ticket` on a fresh connection (b'' if it just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(hello(None) + ticket)
        data = bytearray()
        while len(data) < size and (part := conn.recv(size - len(data))):
            data += part
        return bytes(data)


@pytest.mark.parametrize("size", [1, (1 << 20) + 123, 5 << 20])
def test_client_fetches_over_the_data_port(daemon, size: int) -> None:
    data = os.urandom(size)
    entry = put_raw(daemon, data)
    with connect(daemon.target) as c:
        for _ in range(3):  # one kept connection serves fetch after fetch
            assert bytes(c.fetch(entry, granted_steps=10).data) == data
        assert c.last_error is None
    assert metric(daemon, "flexcache_requests_total", method="FetchDirect", code="OK") == 3
    assert metric(daemon, "flexcache_requests_total", method="Fetch") == 0
    assert metric(daemon, "flexcache_hits_total") == 3
    assert wait_for(lambda: metric(daemon, "flexcache_data_port_transfers_total", outcome="sent") == 3)


def test_a_ticket_is_good_once_and_only_for_its_entry(daemon) -> None:
    data = os.urandom(3 << 20)
    entry = put_raw(daemon, data)
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        answer = stub.FetchDirect(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry), timeout=5)
        assert answer.header.entry_id == entry and answer.header.blob.size == len(data)
        assert len(answer.ticket) == 16
        assert redeem(answer.data_port, os.urandom(16), len(data)) == b""  # a ticket nobody issued
        assert wait_for(lambda: metric(daemon, "flexcache_data_port_transfers_total", outcome="refused") == 1)
        assert redeem(answer.data_port, answer.ticket, len(data)) == data
        assert redeem(answer.data_port, answer.ticket, len(data)) == b""  # spent
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchDirect(pb.FetchRequest(namespace=NS.to_proto(), entry_id="0" * 64), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with connect(daemon.target) as c:  # the daemon serves on
        assert bytes(c.fetch(entry).data) == data


def test_daemon_without_a_data_port_streams(start_daemon) -> None:
    daemon = start_daemon(data_listen="")
    latent = np.random.default_rng(1).standard_normal((4, 8, 16, 16)).astype(np.float32)
    with connect(daemon.target) as c:
        entry = c.put("p", latent, unit(1))
        for _ in range(2):
            np.testing.assert_array_equal(c.fetch(entry).latent(), latent)
        assert c.last_error is None  # not a failure: this client streams from now on
    assert metric(daemon, "flexcache_requests_total", method="FetchDirect", code="FAILED_PRECONDITION") == 1
    assert metric(daemon, "flexcache_requests_total", method="Fetch", code="OK") == 2


def test_unreachable_data_port_falls_back_to_the_stream(start_daemon, caplog) -> None:
    """The data port listens where the client cannot reach it (another loopback address): the ticket's
    transfer fails, the fetch streams with a warning, and the entry is credited once, not twice. The
    client then streams without trying the port again for a while (no connect timeout per fetch)."""
    daemon = start_daemon(data_listen="127.0.0.2:0")
    data = os.urandom(2 << 20)
    entry = put_raw(daemon, data)
    with connect(daemon.target) as c:
        assert bytes(c.fetch(entry, granted_steps=10).data) == data
        assert "cannot connect to the data port" in caplog.text
        assert bytes(c.fetch(entry, granted_steps=10).data) == data
    assert metric(daemon, "flexcache_hits_total") == 2
    assert metric(daemon, "flexcache_requests_total", method="FetchDirect") == 1
    assert metric(daemon, "flexcache_requests_total", method="Fetch", code="OK") == 2


def test_tickets_name_the_advertised_host(start_daemon, caplog) -> None:
    """The same daemon with advertise_host: tickets say where its data port is (a pod behind a Service),
    and the client dials it there, for fetches and puts alike, with no stream fallback."""
    daemon = start_daemon(data_listen="127.0.0.2:0", advertise_host="127.0.0.2")
    data = os.urandom(2 << 20)
    entry = put_raw(daemon, data)
    with connect(daemon.target) as c:
        assert bytes(c.fetch(entry, granted_steps=10).data) == data
        assert c.last_error is None
    assert "cannot connect to the data port" not in caplog.text
    assert metric(daemon, "flexcache_requests_total", method="PutDirect", code="OK") == 1
    assert metric(daemon, "flexcache_requests_total", method="FetchDirect", code="OK") == 1
    assert metric(daemon, "flexcache_requests_total", method="Fetch") == 0
    assert metric(daemon, "flexcache_requests_total", method="Put") == 0


@pytest.mark.parametrize("data_listen", ["fixed", "auto"])
def test_kept_connection_survives_a_daemon_restart(start_daemon, data_listen: str) -> None:
    """With a fixed port the kept connection is dead after the restart; with 'auto' the daemon comes
    back on another port. Either way the ticket is redeemed on a new connection, not streamed."""
    daemon = start_daemon(data_listen=f"127.0.0.1:{free_port()}" if data_listen == "fixed" else "auto")
    data = os.urandom(1 << 20)
    entry = put_raw(daemon, data)
    with connect(daemon.target) as c:
        assert bytes(c.fetch(entry).data) == data
        daemon.terminate()
        daemon.start()
        deadline = time.monotonic() + 10
        fetched = None
        while fetched is None and time.monotonic() < deadline:  # the gRPC channel reconnects first
            fetched = c.fetch(entry)
        assert fetched is not None and bytes(fetched.data) == data
    assert metric(daemon, "flexcache_requests_total", method="Fetch") == 0


def test_sigterm_with_open_data_connections_exits_promptly(daemon) -> None:
    data = os.urandom(1 << 20)
    entry = put_raw(daemon, data)
    with connect(daemon.target) as c:
        assert bytes(c.fetch(entry).data) == data  # leaves a kept connection open
        with grpc.insecure_channel(daemon.target) as channel:  # and an unclaimed ticket, pinning the entry
            pb_grpc.CacheServiceStub(channel).FetchDirect(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry),
                                                          timeout=5)
        start = time.monotonic()
        assert daemon.terminate(timeout=20) == 0
        assert time.monotonic() - start < 5


class Chunks:
    """Stands in for the cache's pinned chunks: records whether the port released them."""

    def __init__(self, parts: list[bytes]):
        self._parts = iter(parts)
        self.closed = threading.Event()

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._parts)

    def close(self) -> None:
        self.closed.set()


def test_unredeemed_tickets_expire_and_release_their_chunks() -> None:
    from flexcache.daemon.dataport import DataPort

    outcomes: list[str] = []
    # The redeemed ticket is redeemed on a fresh connection within the TTL: long enough for a busy machine.
    port = DataPort("127.0.0.1:0", ticket_ttl_s=1.5, count=outcomes.append)
    port.start()
    try:
        kept, redeemed = Chunks([b"ab", b"c"]), Chunks([b"xyz"])
        late = port.issue(kept, 3)
        issued = time.monotonic()
        assert redeem(port.port, port.issue(redeemed, 3), 3) == b"xyz"
        assert redeemed.closed.wait(5)  # released once the transfer ends
        if time.monotonic() - issued < 1.0:  # well inside the TTL: still held (a slow machine may be past it)
            assert not kept.closed.is_set()  # held until it expires...
        assert kept.closed.wait(15), "the unredeemed ticket still holds its entry"  # ...TTL plus the sweep's 1 s
        assert redeem(port.port, late, 3) == b""
        pending = Chunks([b"abc"])
        port.issue(pending, 3)
    finally:
        port.stop(grace_s=1.0)
    assert pending.closed.is_set()  # stop() releases what is still waiting
    assert sorted(outcomes) == ["expired", "expired", "refused", "sent"]  # the late one: expired, then refused


def test_concurrent_fetches_each_get_their_blob(daemon) -> None:
    blobs = [os.urandom((1 << 20) + i) for i in range(4)]
    entries = [put_raw(daemon, blob, f"p{i}") for i, blob in enumerate(blobs)]
    failures: list[str] = []
    with connect(daemon.target) as c:

        def worker(i: int) -> None:
            for _ in range(8):
                got = c.fetch(entries[i])
                if got is None or bytes(got.data) != blobs[i]:
                    failures.append(f"worker {i}: {c.last_error}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
    assert metric(daemon, "flexcache_requests_total", method="Fetch") == 0


def test_blob_corrupt_on_disk_is_reported_and_deleted(daemon, caplog) -> None:
    """Fetches read blobs without a check of the daemon's (the client checks end to end). A client that
    gets bad bytes asks the daemon to Verify the entry; the daemon re-reads it and deletes it."""
    good, bad = os.urandom(2 << 20), os.urandom(2 << 20)
    good_id, bad_id = put_raw(daemon, good, "good"), put_raw(daemon, bad, "bad")
    daemon.terminate()
    # Flip bytes in the middle of the bad one's blob, where its segment file holds it.
    offsets = {}
    for segment in (daemon.data_dir / "store" / "segments").glob("*.seg"):
        offsets[segment] = segment.read_bytes().find(bad[1 << 20:(1 << 20) + 64])
    ((segment, at),) = [(f, at) for f, at in offsets.items() if at >= 0]
    with segment.open("r+b") as f:
        f.seek(at + 1000)
        f.write(bytes(b ^ 0xFF for b in bad[(1 << 20) + 1000:(1 << 20) + 1016]))
    daemon.start()

    with connect(daemon.target) as c:
        assert bytes(c.fetch(good_id).data) == good
        assert c.fetch(bad_id) is None  # a miss, with a warning, never an exception
        assert "checksum mismatch" in caplog.text and "corrupt on disk and deleted" in caplog.text
        assert c.fetch(bad_id) is None and c.lookup(unit(len(bad) % 50)).best.entry_id == good_id
        with grpc.insecure_channel(daemon.target) as channel:
            answer = pb_grpc.CacheServiceStub(channel).Verify(
                pb.VerifyRequest(namespace=NS.to_proto(), entry_id=good_id), timeout=10)
        assert answer.intact and not answer.deleted
    assert metric(daemon, "flexcache_corrupt_entries_total") == 1


# ---- puts over the data port (PutDirect) ----
def put_header(data: bytes, prompt: str, *, sha256: bytes | None = None) -> pb.PutHeader:
    import crc32c

    blob = pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)], size=len(data),
                       sha256=sha256 or hashlib.sha256(data).digest(), crc32c=crc32c.crc32c(data))
    return pb.PutHeader(namespace=NS.to_proto(), prompt=prompt, blob=blob, vectors=pb.Vectors(full=unit(7).tolist()))


def put_direct(daemon, header: pb.PutHeader) -> pb.PutTicket:
    with grpc.insecure_channel(daemon.target) as channel:
        return pb_grpc.CacheServiceStub(channel).PutDirect(header, timeout=10)


def send_put(port: int, ticket: bytes, data: bytes) -> tuple[int, bytes]:
    """Redeem a put ticket as a client does: HELLO, ticket, the bytes; the daemon's reply frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(hello(None) + ticket + data)
        head = b""
        while len(head) < wire.PUT_REPLY.size and (part := conn.recv(wire.PUT_REPLY.size - len(head))):
            head += part
        code, length = wire.PUT_REPLY.unpack(head)
        payload = b""
        while len(payload) < length and (part := conn.recv(length - len(payload))):
            payload += part
        return code, payload


@pytest.mark.parametrize("size", [wire.DIRECT_PUT_MIN_BYTES, (3 << 20) + 5])
def test_client_puts_over_the_data_port(daemon, size: int) -> None:
    data = os.urandom(size)
    with connect(daemon.target) as c:
        info = pb.BlobInfo(codec="raw", dtype="uint8", shape=[size])
        entry = c.put_blob("a direct put", data, info, unit(1))
        assert entry is not None and c.last_error is None
        assert c.put_blob("a direct put", data, info, unit(1)) == entry  # stored already: nothing sent
        assert bytes(c.fetch(entry).data) == data
        small = c.put_blob("a small put", b"x" * 1000, pb.BlobInfo(codec="raw", dtype="uint8", shape=[1000]), unit(2))
        assert small is not None
    assert metric(daemon, "flexcache_requests_total", method="PutDirect", code="OK") == 2
    assert metric(daemon, "flexcache_requests_total", method="Put") == 1  # the small one streams
    assert wait_for(lambda: metric(daemon, "flexcache_data_port_transfers_total", outcome="received") == 1)
    assert metric(daemon, "flexcache_put_buffer_bytes") == 0


def test_a_direct_put_is_checked_like_a_stream(daemon) -> None:
    data = os.urandom(1 << 20)
    wrong = put_direct(daemon, put_header(data, "lying about its sha256", sha256=hashlib.sha256(b"other").digest()))
    code, message = send_put(wrong.data_port, wrong.ticket, data)
    assert grpc.StatusCode.DATA_LOSS.value[0] == code and b"checksum mismatch" in message
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.CacheServiceStub(channel).PutDirect(pb.PutHeader(namespace=NS.to_proto(), prompt=""), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    right = put_direct(daemon, put_header(data, "honest"))
    code, payload = send_put(right.data_port, right.ticket, data)
    assert code == 0 and pb.PutResponse.FromString(payload).created
    assert daemon.stats().entries == 1  # only the honest one
    with socket.create_connection(("127.0.0.1", right.data_port), timeout=10) as conn:
        conn.sendall(hello(None) + right.ticket)  # spent: the connection closes without a reply
        with contextlib.suppress(ConnectionResetError):
            assert conn.recv(16) == b""


def test_a_direct_put_that_stalls_is_dropped_and_releases_its_buffer(start_daemon) -> None:
    daemon = start_daemon(stream_idle_seconds=1.0)
    data = os.urandom(2 << 20)
    answer = put_direct(daemon, put_header(data, "stalls"))
    assert metric(daemon, "flexcache_put_buffer_bytes") == len(data)  # reserved until the transfer ends
    with socket.create_connection(("127.0.0.1", answer.data_port), timeout=10) as conn:
        conn.sendall(hello(None) + answer.ticket + data[:1000])  # then nothing
        assert wait_for(lambda: metric(daemon, "flexcache_data_port_transfers_total", outcome="failed") == 1)
    assert metric(daemon, "flexcache_put_buffer_bytes") == 0
    assert daemon.stats().entries == 0  # nothing half-written
    with connect(daemon.target) as c:  # and the daemon serves on
        assert c.put_blob("next", data, pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)]), unit(3))


def test_an_unredeemed_put_ticket_releases_its_buffer_when_it_expires() -> None:
    from flexcache.daemon.dataport import DataPort

    released = []

    class Sink:
        def add_chunk(self, data: bytes) -> None: ...

        def finish(self) -> tuple[int, bytes]:
            return 0, b""

        def abort(self) -> None:
            released.append(True)

    port = DataPort("127.0.0.1:0", ticket_ttl_s=0.2)
    port.start()
    try:
        port.issue_put(Sink(), 100)
        assert wait_for(lambda: released == [True], timeout_s=3)
    finally:
        port.stop(grace_s=0)
