"""A dead or slow daemon is a miss with a warning, never an exception; the client recovers by itself."""

from __future__ import annotations

import logging
import socket
import time

import numpy as np

from flexcache.client import CacheClient
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
