"""A dead or slow daemon is a miss with a warning, never an exception; the client recovers by itself."""

from __future__ import annotations

import logging
import socket
import time

import grpc
import numpy as np
import pytest

from flexcache.client import CacheClient, Retry
from flexcache.v1 import cache_pb2 as pb
from tests.conftest import NS, connect
from tests.vectors import unit


def test_killed_daemon_is_a_miss_and_the_client_recovers(daemon, caplog) -> None:
    with connect(daemon.target, timeout_s=2) as c:
        entry_id = c.put("kept across the outage", np.ones(64, np.float32), unit(1))
        daemon.kill()
        with caplog.at_level(logging.WARNING, logger="flexcache.client"):
            started = time.monotonic()
            assert c.lookup(unit(1)) is None
            assert c.fetch(entry_id) is None
            assert c.put("during outage", np.ones(4, np.float32), unit(2)) is None
            assert c.get(unit(1)) is None
            assert c.stats() is None
            assert time.monotonic() - started < 5  # fails fast, does not wait for the daemon
        warnings = [r for r in caplog.records if "treated as a miss" in r.getMessage()]
        assert len(warnings) == 4  # lookup, fetch, put, stats; get's lookup is within the rate limit
        daemon.start()  # same port, same data
        deadline = time.monotonic() + 15
        while (result := c.lookup(unit(1))) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert result is not None and result.best.entry_id == entry_id
        np.testing.assert_array_equal(c.get(unit(1)).latent, np.ones(64, np.float32))


def test_slow_daemon_is_a_miss_within_the_deadline() -> None:
    """A peer that accepts connections but never answers (a hung daemon)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        target = f"127.0.0.1:{server.getsockname()[1]}"
        with CacheClient(target, NS, timeout_s=0.5, transfer_timeout_s=0.5) as c:
            started = time.monotonic()
            assert c.lookup(unit(1)) is None
            assert c.fetch("0" * 64) is None
            assert time.monotonic() - started < 3
            assert c.last_error is not None


def test_never_started_daemon_is_a_miss() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with CacheClient(f"127.0.0.1:{port}", NS, timeout_s=0.5) as c:
        assert c.lookup(unit(1)) is None
        assert c.put("p", np.ones(4, np.float32), unit(1)) is None


# ---- the retry policy and the one call path ----
class Injected(grpc.RpcError):
    """A status as a gRPC call raises it, for the attempts a test makes fail."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "injected by the test"


def test_retry_defaults_are_small() -> None:
    policy = Retry()
    assert policy.attempts == 2 and policy.codes == {grpc.StatusCode.UNAVAILABLE}
    assert Retry.none().attempts == 1 and Retry.none().pause_before_retry(grpc.StatusCode.UNAVAILABLE, 1, 10) is None
    assert policy.pause_before_retry(grpc.StatusCode.UNAVAILABLE, 1, 10) <= policy.backoff_base_s
    assert policy.pause_before_retry(grpc.StatusCode.UNAVAILABLE, 2, 10) is None  # attempts spent
    assert policy.pause_before_retry(grpc.StatusCode.UNAVAILABLE, 1, policy.min_attempt_s / 2) is None  # no time left
    exact = Retry(attempts=5, backoff_base_s=0.1, backoff_cap_s=0.3, jitter=0.0)
    assert [exact.backoff_s(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    jittered = Retry(backoff_base_s=0.1, jitter=0.5)
    assert all(0.05 <= jittered.backoff_s(1) <= 0.1 for _ in range(100))


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL])
def test_retry_refuses_statuses_a_retry_cannot_change(code: grpc.StatusCode) -> None:
    with pytest.raises(ValueError, match=code.name):
        Retry(codes={grpc.StatusCode.UNAVAILABLE, code})
    assert Retry().pause_before_retry(code, 1, 10) is None


def test_every_call_takes_one_path_within_its_deadline(caplog) -> None:
    """CacheBase._call: retried as the policy allows, within one deadline for all attempts, reported once."""
    with CacheClient("127.0.0.1:1", NS, warn_every_s=0, retry=Retry(attempts=3, backoff_base_s=0.01)) as c, \
            caplog.at_level(logging.WARNING, logger="flexcache.client"):
        given: list[float] = []

        def flaky(timeout: float) -> str:
            given.append(timeout)
            if len(given) < 3:
                raise Injected()
            return "answer"

        assert c._call("lookup", flaky, timeout_s=2.0) == "answer"
        assert len(given) == 3 and given[0] <= 2.0 and given[2] < given[0]  # each attempt gets what is left
        assert c.last_error is None and "treated as a miss" not in caplog.text

        attempts = []

        def down(timeout: float) -> str:
            attempts.append(timeout)
            raise Injected()

        assert c._call("lookup", down, timeout_s=2.0) is None
        assert len(attempts) == 3 and caplog.text.count("treated as a miss") == 1  # one warning, not one per attempt
        attempts.clear()
        assert c._call("lookup", down, timeout_s=0.02) is None and len(attempts) == 1  # no time for a retry

        def refused(timeout: float) -> str:
            attempts.append(timeout)
            raise Injected(grpc.StatusCode.INVALID_ARGUMENT)

        attempts.clear()
        assert c._call("put", refused, timeout_s=2.0) is None and len(attempts) == 1
        assert c.last_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):  # a status its caller handles itself
            c._call("fetch", refused, timeout_s=2.0, passthrough={grpc.StatusCode.INVALID_ARGUMENT})


def test_a_put_is_retried_from_its_first_message(daemon) -> None:
    """The Put stream is made again for a retry: a half-sent stream is never resumed. (The stream path:
    blobs this large go over the data port by default, whose failed transfers fall back to it.)"""
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 5)  # four chunks
    info = pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)])
    with connect(daemon.target, data_port=False) as c:
        real_put, streams = c._stub.Put, []

        def put_failing_once(requests, timeout, metadata):
            streams.append(requests)
            if len(streams) == 1:
                next(requests), next(requests)  # the header and a chunk are sent, then the connection drops
                raise Injected()
            return real_put(requests, timeout=timeout, metadata=metadata)

        c._stub.Put = put_failing_once
        entry = c.put_blob("retried put", data, info, unit(3))
        assert entry is not None and len(streams) == 2 and streams[0] is not streams[1]
        c._stub.Put = real_put
        assert bytes(c.fetch(entry).data) == data


def test_a_retried_fetch_credits_its_entry_once(daemon) -> None:
    """A Fetch stream that breaks after its header is tried again as a read: the entry was credited."""
    import urllib.request

    latent = np.random.default_rng(2).standard_normal((4, 8, 16, 16)).astype(np.float32)
    with connect(daemon.target, data_port=False) as c:
        entry = c.put("credited once", latent, unit(4))
        real_fetch, granted = c._fetch_raw, []

        class BreaksAfterHeader:
            def __init__(self, call):
                self.call, self.sent = call, 0

            def __iter__(self):
                return self

            def __next__(self):
                self.sent += 1
                if self.sent > 1:
                    raise Injected()
                return next(self.call)

            def cancel(self) -> None:
                self.call.cancel()

        def fetch_breaking_once(request, timeout, metadata):
            granted.append(request.granted_steps)
            call = real_fetch(request, timeout=timeout, metadata=metadata)
            return BreaksAfterHeader(call) if len(granted) == 1 else call

        c._fetch_raw = fetch_breaking_once
        np.testing.assert_array_equal(c.fetch(entry, granted_steps=10).latent(), latent)
        assert granted == [10, 0]
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("flexcache_hits_total{"))
    assert hits == 1
