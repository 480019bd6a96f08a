"""A flood of bad requests is counted, answered INVALID_ARGUMENT and logged at most once per client per
interval (`client_log_seconds`), without a traceback; the daemon keeps serving."""

from __future__ import annotations

import logging
import os
import random

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from flexcache.daemon.guard import PeerLog, peer_host
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import wire
from tests.conftest import NS, connect, metric
from tests.vectors import unit

METHOD = f"/{wire.SERVICE_NAME}/"


def decodes(message_type: type, payload: bytes) -> bool:
    try:
        message_type.FromString(payload)
    except DecodeError:
        return False
    return True


def send_all(channel: grpc.Channel, method: str, payloads: list[bytes], *, streaming: bool = False,
             batch: int = 200) -> list[grpc.StatusCode]:
    """Each payload as one raw request to `method` (no serializer), `batch` in flight at a time."""
    if streaming:  # Put: the payload is the stream's first (and only) message
        call = channel.stream_unary(METHOD + method, request_serializer=None, response_deserializer=None)
        invoke = lambda raw: call.future(iter([raw]), timeout=10)  # noqa: E731
    else:
        call = channel.unary_unary(METHOD + method, request_serializer=None, response_deserializer=None)
        invoke = lambda raw: call.future(raw, timeout=10)  # noqa: E731
    codes = []
    for start in range(0, len(payloads), batch):
        futures = [invoke(raw) for raw in payloads[start:start + batch]]
        for future in futures:
            exc = future.exception()
            codes.append(grpc.StatusCode.OK if exc is None else exc.code())
    return codes


def test_a_flood_of_bad_requests_is_counted_not_logged(daemon) -> None:
    rng = random.Random(7)
    garbage = [os.urandom(rng.randrange(1, 200)) for _ in range(2000)]
    undecodable = {name: sum(not decodes(kind, raw) for raw in garbage)
                   for name, kind in (("Lookup", pb.LookupRequest), ("Put", pb.PutRequest))}
    invalid_lookups = [pb.LookupRequest(vectors=pb.Vectors(full=[1.0])).SerializeToString(),  # no namespace
                       pb.LookupRequest(namespace=NS.to_proto(), vectors=pb.Vectors(full=[0.0] * 4))
                       .SerializeToString()] * 250
    invalid_fetches = [pb.FetchRequest(namespace=NS.to_proto(), entry_id="../etc/passwd").SerializeToString()] * 300
    with grpc.insecure_channel(daemon.target) as channel:
        lookup_codes = send_all(channel, "Lookup", garbage + invalid_lookups)
        fetch_codes = send_all(channel, "FetchDirect", invalid_fetches)
        # Put streams fewer at a time than streams_per_client (16): past the share they are refused instead
        put_codes = send_all(channel, "Put", garbage[:500], streaming=True, batch=8)
        assert not decodes(pb.StatsRequest, b"\xff\xff\xff")
        stats_codes = send_all(channel, "Stats", [b"\xff\xff\xff"] * 100)

    assert set(lookup_codes) == set(fetch_codes) == set(stats_codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert set(put_codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert metric(daemon, "flexcache_bad_requests_total", method="Lookup", reason="undecodable") == \
        undecodable["Lookup"]
    assert metric(daemon, "flexcache_bad_requests_total", method="Lookup", reason="invalid") == \
        len(garbage) - undecodable["Lookup"] + len(invalid_lookups)
    assert metric(daemon, "flexcache_bad_requests_total", method="FetchDirect", reason="invalid") == 300
    assert metric(daemon, "flexcache_bad_requests_total", method="Stats", reason="undecodable") == 100
    assert metric(daemon, "flexcache_bad_requests_total", method="Put") == 500
    assert metric(daemon, "flexcache_requests_total", code="INVALID_ARGUMENT") == \
        len(garbage) + len(invalid_lookups) + 300 + 500 + 100

    log = daemon.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-5000:]
    assert len(log.splitlines()) < 50, log[-5000:]
    assert "bad request" in log  # once per client and interval, not never

    latent = np.random.default_rng(3).standard_normal((4, 8, 8)).astype(np.float32)
    with connect(daemon.target) as c:  # the daemon serves on
        entry = c.put("after the flood", latent, unit(3))
        assert c.lookup(unit(3)).best.entry_id == entry
        np.testing.assert_array_equal(c.fetch(entry).latent(), latent)
    with grpc.insecure_channel(daemon.target) as channel:
        assert pb_grpc.CacheServiceStub(channel).Stats(pb.StatsRequest(), timeout=5).entries == 1



def test_peer_log_limits_each_client_and_kind_on_its_own(caplog) -> None:
    """One line per (client address, kind) per interval; the next line says how many were held back;
    a flood from many addresses keeps at most max_peers of them in memory."""
    now = [0.0]
    clients = PeerLog(logging.getLogger("test.peers"), interval_s=60, max_peers=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.peers"):
        assert clients.warn("10.0.0.1", "bad request", "x %d", 1)
        assert not any(clients.warn("10.0.0.1", "bad request", "x %d", 2) for _ in range(99))
        assert clients.warn("10.0.0.2", "bad request", "y")  # another client
        assert clients.warn("10.0.0.1", "cut", "z")  # another kind
        now[0] = 61.0
        assert clients.warn("10.0.0.1", "bad request", "x %d", 3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["client 10.0.0.1: x 1", "client 10.0.0.2: y", "client 10.0.0.1: z",
                     "client 10.0.0.1: x 3 (99 more from this client in the last 60 s)"]
    for i in range(100):
        clients.warn(f"10.1.0.{i}", "bad request", "flood")
    assert len(clients._last) == 3
    assert [peer_host(p) for p in ("ipv4:10.0.0.7:51234", "ipv6:[::1]:5", "unix:/tmp/s")] == \
        ["10.0.0.7", "::1", "unix:/tmp/s"]
