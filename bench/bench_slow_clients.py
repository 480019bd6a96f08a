"""Lookup latency and fetch success while slow and stalled clients hold a daemon (docs/under_pressure.md).

    .venv/bin/python -m bench.bench_slow_clients             # ~1 min
    .venv/bin/python -m bench.bench_slow_clients --lookups 2000

One real daemon on loopback. Each scenario first connects its slow clients, then a good client (its
own TCP connection) makes `--lookups` Lookups (CacheClient, 2 s deadline) and `--fetches` 1 MiB
fetches (the data port, falling back to the stream), and the table reports the Lookups' median and
p99, how many of them failed, and how many fetches went over the data port:

  * unloaded: nobody else;
  * stalled streams: 16 Fetch readers that read the header of a 16 MiB entry and stop (their HTTP/2
    window kept at 64 KiB), 20 Puts that send a header and stop (the issue's load), on 4 connections;
  * idle data connections: 300 data-port connections from 127.0.0.2 that send nothing (the port
    keeps at most 256 open);
  * both.

The daemon runs on its defaults except `streams_per_client` 64 (so every stalled stream is admitted:
all clients here share 127.0.0.1) and `stream_idle_seconds` 60 (so none is cut during the
measurement); the bounds that cut them are tested in tests/test_slow_clients.py, not timed here.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc
import numpy as np

from flexcache.client import CacheClient, Namespace
from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

from .launch import daemon as launch

NS = Namespace(tenant="bench", model="slow-clients", width=64, height=64, frames=8, scheduler="flow",
               total_steps=50)
DIM = 384


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _channel(target: str) -> grpc.Channel:
    """A connection of its own whose HTTP/2 window stays at 64 KiB (no BDP probing): a reader that stops
    makes the daemon's send block at once, as a slow network does, instead of its transport taking
    the whole blob unread."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                  ("grpc.max_receive_message_length", 8 << 20),
                                                  ("grpc.http2.bdp_probe", 0)])


@contextmanager
def stalled_streams(target: str, entry_id: str, fetches: int = 16, puts: int = 20) -> Iterator[None]:
    release = threading.Event()
    channels = [_channel(target) for _ in range(4)]
    calls = []

    def messages(seed: int) -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(header=pb.PutHeader(namespace=NS.to_proto(), prompt=f"stalled {seed}",
                                                vectors=pb.Vectors(full=unit(seed).tolist()),
                                                blob=pb.BlobInfo(size=1 << 20, sha256=b"\0" * 32, codec="raw")))
        release.wait()

    try:
        for i in range(fetches):
            call = pb_grpc.CacheServiceStub(channels[i % 4]).Fetch(
                pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry_id))
            next(call)
            calls.append(call)
        for i in range(puts):
            calls.append(pb_grpc.CacheServiceStub(channels[i % 4]).Put.future(messages(1000 + i)))
        time.sleep(0.5)
        yield
    finally:
        release.set()
        for call in calls:
            call.cancel()
        for c in channels:
            c.close()


@contextmanager
def idle_data_connections(port: int, n: int = 300, source: str = "127.0.0.2") -> Iterator[None]:
    conns = []
    try:
        for _ in range(n):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)))
        time.sleep(0.5)
        yield
    finally:
        for c in conns:
            c.close()


def sent_over_data_port(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("flexcache_data_port_transfers_total{") and 'outcome="sent"' in line)


def measure(d: DaemonProcess, entry_id: str, lookups: int, fetches: int) -> dict[str, float]:
    with CacheClient(d.target, NS, timeout_s=2.0, max_rel_error=0.0, warn_every_s=3600) as client:
        times, failed = [], 0
        for i in range(lookups):
            start = time.perf_counter()
            if client.lookup(unit(i % 7)) is None:
                failed += 1
            times.append((time.perf_counter() - start) * 1000)
        assert d.metrics_port is not None
        before = sent_over_data_port(d.metrics_port)
        fetched = sum(client.fetch(entry_id) is not None for _ in range(fetches))
        time.sleep(0.2)  # the data port counts a transfer just after the client has its bytes
        direct = sent_over_data_port(d.metrics_port) - before
    return {"median": statistics.median(times), "p99": float(np.percentile(times, 99)), "failed": failed,
            "fetched": fetched, "direct": direct}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--fetches", type=int, default=20)
    args = parser.parse_args(argv)
    rows = []
    with launch(streams_per_client=64, stream_idle_seconds=60, metrics_listen="127.0.0.1:0") as d:
        with CacheClient(d.target, NS, timeout_s=10.0, max_rel_error=0.0) as c:
            def put(prompt: str, size: int, seed: int) -> str:
                return c.put_blob(prompt, os.urandom(size), pb.BlobInfo(codec="raw", dtype="uint8", shape=[size]),
                                  unit(seed))

            big, small = put("big", 16 << 20, 100), put("small", 1 << 20, 101)
            for i in range(7):
                put(f"entry {i}", 4096, i)
        assert d.data_port is not None
        data_port = d.data_port
        scenarios = {"unloaded": [], "stalled streams": [lambda: stalled_streams(d.target, big)],
                     "idle data connections": [lambda: idle_data_connections(data_port)],
                     "both": [lambda: stalled_streams(d.target, big), lambda: idle_data_connections(data_port)]}
        for name, loads in scenarios.items():
            with ExitStack() as stack:
                for load in loads:
                    stack.enter_context(load())
                rows.append((name, measure(d, small, args.lookups, args.fetches)))
    print(f"| load | lookup median ms | lookup p99 ms | lookups failed (of {args.lookups}) | "
          f"fetches served (of {args.fetches}) | of them over the data port |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['median']:.2f} | {r['p99']:.2f} | {r['failed']:.0f} | {r['fetched']:.0f} | "
              f"{r['direct']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
