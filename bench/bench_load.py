"""Lookup latency, errors and each client's share under 32 concurrent clients, with and without 16 slow
clients connected (docs/under_pressure.md, "Measured: 32 clients at once").

    .venv/bin/python -m bench.bench_load                  # ~2.5 min
    .venv/bin/python -m bench.bench_load --rate 10         # each client 10 calls/s instead of flat out
    .venv/bin/python -m bench.bench_load --seconds 10 --entries 1000

Three phases, each against a fresh daemon on loopback holding `--entries` entries (384-d vectors,
64 KiB raw blobs; one 16 MiB entry more for the stalled readers):

  * unloaded: one CacheClient makes `--lookups` Lookups of stored vectors;
  * 32 clients: `--clients` CacheClients (`--procs` processes of threads, so the clients' own GIL
    does not set the pace) each loop for `--seconds` over a fixed mix, 20 % Put of a new 64 KiB entry,
    60 % Lookup of a stored vector (every one should hit), 20 % Fetch of a stored entry (the data
    port), with no pause between calls (or `--rate` calls per second each);
  * 32 clients + 16 slow: the same while 8 Fetch readers that read the header of the 16 MiB entry and
    stop (HTTP/2 window held at 64 KiB) and 8 Puts that send their header and stop are connected; the
    daemon cuts each after `stream_idle_seconds` (10 s, its default) and the benchmark re-opens it at
    once, so 16 stay connected throughout.

An error is a None from the client (the call failed after its retries), or a Lookup that found no
entry although it asked for a stored vector. All clients share 127.0.0.1, so the per-address shares
apply to them together: the daemon runs with `streams_per_client` 128 (default 16) and
`data_connections_per_client` 128 (default 16), so the 32 well-behaved clients and the 16 slow ones
are not refused as one address; everything else, `workers` 16, `stream_workers` 64 and
`stream_idle_seconds` 10 included, is the default.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from flexcache.client import CacheClient, Namespace
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

from .launch import daemon as launch

NS = Namespace(tenant="bench", model="load", width=64, height=64, frames=8, scheduler="flow", total_steps=50)
DIM = 384
BLOB = 64 << 10
SETTINGS: dict[str, object] = {"streams_per_client": 128, "data_connections_per_client": 128,
                               "metrics_listen": "127.0.0.1:0"}
INFO = pb.BlobInfo(codec="raw", dtype="uint8", shape=[BLOB])
MIX = (("put", 0.2), ("lookup", 0.6), ("fetch", 0.2))


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def populate(target: str, entries: int, threads: int = 4) -> tuple[list[str], str]:
    """`entries` 64 KiB entries (vector unit(i)) and one 16 MiB one; their ids."""
    def put(seeds: range) -> list[str]:
        with CacheClient(target, NS, timeout_s=10.0, max_rel_error=0.0) as c:
            out = []
            for i in seeds:
                entry = c.put_blob(f"entry {i}", os.urandom(BLOB), INFO, unit(i))
                assert entry is not None, c.last_error
                out.append(entry)
            return out

    with ThreadPoolExecutor(threads) as pool:
        ids = [e for part in pool.map(put, [range(k, entries, threads) for k in range(threads)]) for e in part]
    # put_blob's seeds are interleaved per thread: sort the ids back into seed order
    order = [i for k in range(threads) for i in range(k, entries, threads)]
    by_seed = [""] * entries
    for seed, entry in zip(order, ids, strict=True):
        by_seed[seed] = entry
    with CacheClient(target, NS, timeout_s=10.0, max_rel_error=0.0) as c:
        big = c.put_blob("big", os.urandom(16 << 20), pb.BlobInfo(codec="raw", dtype="uint8", shape=[16 << 20]),
                         unit(10_000_000))
        assert big is not None
    return by_seed, big


def is_hit(answer: Any) -> bool:
    return answer is not None and answer.best is not None


def run_client(target: str, ids: list[str], vectors: np.ndarray, client_no: int, ready: threading.Barrier,
               go: threading.Event, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    rng = np.random.default_rng(client_no)
    lat: dict[str, list[float]] = {op: [] for op, _ in MIX}
    errors: dict[str, int] = {op: 0 for op, _ in MIX}
    reasons: dict[str, int] = {}
    cum = np.cumsum([p for _, p in MIX])
    with CacheClient(target, NS, timeout_s=2.0, max_rel_error=0.0, warn_every_s=3600) as c:
        c.lookup(vectors[0])  # connect before the clock starts
        ready.wait()
        go.wait()
        begin, phase = time.perf_counter(), rng.random()  # each client's own phase: no bursts in step
        end = begin + seconds
        n = 0
        while time.perf_counter() < end:
            if rate:  # paced: the n-th call starts at begin + (n + phase) / rate (a late call starts at once)
                time.sleep(max(0.0, begin + (n + phase) / rate - time.perf_counter()))
            op = MIX[int(np.searchsorted(cum, rng.random(), side="right"))][0]
            k = int(rng.integers(len(ids)))
            t0 = time.perf_counter()
            if op == "put":
                ok = c.put_blob(f"load {client_no} {n}", os.urandom(BLOB), INFO,
                                unit(20_000_000 + client_no * 1_000_000 + n)) is not None
            elif op == "lookup":
                ok = is_hit(c.lookup(vectors[k]))
            else:
                ok = c.fetch(ids[k]) is not None
            lat[op].append((time.perf_counter() - t0) * 1000)
            if not ok:
                errors[op] += 1
                why = str(getattr(c, "last_error", "") or "miss")[:120]
                reasons[why] = reasons.get(why, 0) + 1
            n += 1
    return {"lat": lat, "errors": errors, "reasons": reasons}


def worker(target: str, ids: list[str], first: int, threads: int, seconds: float, rate: float, barrier: Any,
           results: Any) -> None:
    """One process of `threads` clients; starts with the others at `barrier`."""
    vectors = np.stack([unit(i) for i in range(len(ids))])
    ready, go = threading.Barrier(threads + 1), threading.Event()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run_client, target, ids, vectors, first + t, ready, go, seconds, rate)
                   for t in range(threads)]
        ready.wait()  # every client connected
        barrier.wait()  # and every other process's
        go.set()
        results.put([f.result() for f in futures])


def _channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                  ("grpc.max_receive_message_length", 8 << 20),
                                                  ("grpc.http2.bdp_probe", 0)])


class SlowClients:
    """`fetches` stalled Fetch readers of `entry_id` and `puts` stalled Puts on 4 connections, each
    re-opened as soon as the daemon ends it."""

    def __init__(self, target: str, entry_id: str, fetches: int = 8, puts: int = 8):
        self.target, self.entry_id = target, entry_id
        self.release, self.stop = threading.Event(), threading.Event()
        self.channels = [_channel(target) for _ in range(4)]
        self.calls: list[Any] = [None] * (fetches + puts)
        self.fetches = fetches
        self.opened = 0
        self.min_open = fetches + puts
        self.thread = threading.Thread(target=self._keep, daemon=True)

    def _messages(self, seed: int) -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(header=pb.PutHeader(namespace=NS.to_proto(), prompt=f"stalled {seed}",
                                                vectors=pb.Vectors(full=unit(seed).tolist()),
                                                blob=pb.BlobInfo(size=1 << 20, sha256=b"\0" * 32, codec="raw")))
        self.release.wait()

    def _open(self, i: int) -> Any:
        stub = pb_grpc.CacheServiceStub(self.channels[i % 4])
        self.opened += 1
        if i < self.fetches:
            call = stub.Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=self.entry_id))
            with contextlib.suppress(grpc.RpcError):
                next(call)  # the header; then stop reading
            return call
        return stub.Put.future(self._messages(30_000_000 + self.opened))

    def _keep(self) -> None:
        while not self.stop.is_set():
            open_now = 0
            for i, call in enumerate(self.calls):
                if call is None or call.done():
                    self.calls[i] = self._open(i)
                open_now += not self.calls[i].done()
            self.min_open = min(self.min_open, open_now)
            self.stop.wait(0.1)

    def __enter__(self) -> SlowClients:
        for i in range(len(self.calls)):
            self.calls[i] = self._open(i)
        self.thread.start()
        time.sleep(0.5)
        self.min_open = len(self.calls)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.release.set()
        for call in self.calls:
            call.cancel()
        for c in self.channels:
            c.close()


def counters(metrics_port: int | None, prefix: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def loaded(target: str, ids: list[str], clients: int, procs: int, seconds: float, rate: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    per = [clients // procs + (p < clients % procs) for p in range(procs)]
    firsts = np.cumsum([0, *per[:-1]])
    ps = [ctx.Process(target=worker, args=(target, ids, int(f), n, seconds, rate, barrier, results))
          for f, n in zip(firsts, per, strict=True)]
    for p in ps:
        p.start()
    barrier.wait(timeout=120)
    out = [r for _ in ps for r in results.get(timeout=seconds + 120)]
    for p in ps:
        p.join(30)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=3000)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="calls per second per client (0: each client calls again as soon as it has its answer)")
    args = parser.parse_args(argv)
    began = time.time()
    phases: dict[str, dict[str, Any]] = {}

    with launch(**SETTINGS) as d:
        ids, _ = populate(d.target, args.entries)
        times, errors = [], 0
        with CacheClient(d.target, NS, timeout_s=2.0, max_rel_error=0.0, warn_every_s=3600) as c:
            c.lookup(unit(0))
            for i in range(args.lookups):
                v = unit(i * 7919 % args.entries)
                t0 = time.perf_counter()
                ok = is_hit(c.lookup(v))
                times.append((time.perf_counter() - t0) * 1000)
                errors += not ok
        phases["unloaded"] = {"lat": {"lookup": times}, "errors": {"lookup": errors}, "shares": None,
                              "reasons": {}, "extra": ""}

    for name, slow in ((f"{args.clients} clients", False), (f"{args.clients} clients + 16 slow", True)):
        with launch(**SETTINGS) as d:
            ids, big = populate(d.target, args.entries)
            before = counters(d.metrics_port, "flexcache_calls_")
            if slow:
                with SlowClients(d.target, big) as s:
                    results = loaded(d.target, ids, args.clients, args.procs, args.seconds, args.rate)
                extra = (f"slow clients opened {s.opened} times (16 at the start, the rest within 0.1 s of the daemon "
                         f"cutting one), at least {s.min_open} of 16 open after each check")
            else:
                results = loaded(d.target, ids, args.clients, args.procs, args.seconds, args.rate)
                extra = ""
            after = counters(d.metrics_port, "flexcache_calls_")
        delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
        lat = {op: [x for r in results for x in r["lat"][op]] for op, _ in MIX}
        errs = {op: sum(r["errors"][op] for r in results) for op, _ in MIX}
        reasons: dict[str, int] = {}
        for r in results:
            for k, v in r["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        shares = [sum(len(v) for v in r["lat"].values()) for r in results]
        phases[name] = {"lat": lat, "errors": errs, "shares": shares, "reasons": reasons,
                        "extra": extra, "metrics": delta}

    print(f"\n{args.entries} entries of 64 KiB, 384-d vectors; {args.clients} clients in {args.procs} processes, "
          f"{args.seconds:g} s, mix 20 % put / 60 % lookup / 20 % fetch, "
          f"{f'{args.rate:g} calls/s per client' if args.rate else 'no pause between calls'}; "
          f"{time.time() - began:.0f} s in all\n")
    print("| phase | operation | ops | ops/s | p50 ms | p99 ms | errors | ops per client min / median / max |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, ph in phases.items():
        secs = args.seconds if ph["shares"] is not None else None
        share = "-"
        if ph["shares"] is not None:
            s = ph["shares"]
            share = f"{min(s)} / {statistics.median(s):.0f} / {max(s)}"
        for op, xs in ph["lat"].items():
            rate = f"{len(xs) / secs:.0f}" if secs else "-"
            print(f"| {name} | {op} | {len(xs)} | {rate} | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} | "
                  f"{ph['errors'][op]} | {share} |")
            share = ""
        if ph["shares"] is not None:
            total = sum(len(x) for x in ph["lat"].values())
            print(f"| {name} | all | {total} | {total / secs:.0f} | | | {sum(ph['errors'].values())} | |")
    print()
    for name, ph in phases.items():
        if ph.get("metrics"):
            print(f"{name}: daemon counters during the phase: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in sorted(ph["metrics"].items())))
        if ph["extra"]:
            print(f"{name}: {ph['extra']}")
        if ph["reasons"]:
            print(f"{name}: errors: {ph['reasons']}")
    names = list(phases)
    p99 = {n: pct(phases[n]["lat"]["lookup"], 99) for n in names}
    ratio_loaded, ratio_slow = p99[names[1]] / p99[names[0]], p99[names[2]] / p99[names[0]]
    err = sum(sum(phases[n]["errors"].values()) for n in names)
    print(f"\nlookup p99: unloaded {p99[names[0]]:.2f} ms, {names[1]} {p99[names[1]]:.2f} ms ({ratio_loaded:.1f}x), "
          f"{names[2]} {p99[names[2]]:.2f} ms ({ratio_slow:.1f}x; {p99[names[2]] / p99[names[1]]:.2f}x the run "
          f"without slow clients)")
    print(f"verdict: errors {err} (target 0): {'met' if err == 0 else 'NOT met'}; lookup p99 with slow clients / "
          f"unloaded {ratio_slow:.1f} (target <= 10): {'met' if ratio_slow <= 10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
