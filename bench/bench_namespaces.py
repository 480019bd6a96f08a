"""Many namespaces on one daemon: threads, file descriptors, restart time and lookup latency.

    .venv/bin/python -m bench.bench_namespaces                    # 10 / 300 / 1,000 namespaces, then 100k entries
    .venv/bin/python -m bench.bench_namespaces --levels 10,300 --skip-100k   # a quick look

Part 1, per level N (a fresh daemon each, `flexcache serve` on loopback through the shared launcher):
  * a busy namespace gets BUSY_ENTRIES entries first, then each of N namespaces one small Put
    (32-d vectors, 64-byte blobs), from PUT_THREADS client threads at once: any client can create a
    namespace, so this is what a multi-tenant fleet does to the daemon;
  * threads (`/proc/<pid>/task`) and open file descriptors (`/proc/<pid>/fd`) of the daemon, the
    peak sampled every 20 ms while the puts run, and once they are done;
  * restart: SIGTERM, then `DaemonProcess.start` (exec until the health service says SERVING);
  * after the restart, one lookup per namespace (every entry must be found: "found" counts them),
    with the thread peak sampled meanwhile;
  * lookup p50 / p99 in the busy namespace (raw gRPC Lookup, top_k 1), measured after the sweep
    over every namespace, so the busy namespace's shard was opened again on demand.
Part 2, one namespace of 100k x 384-d entries, loaded as bench/bench_daemon.py loads them (the same
corpus, store and index code): the index lookup in-process (`EdgeIndex.search`, limit 5) with each
shard's search pool at the daemon's size (`edge.SEARCH_THREADS`) and at Qdrant's CPU-derived default
(the layout before, same shard, same queries, interleaved), then end to end through a daemon
(`CacheClient.lookup`), whose first lookup also pays the namespace's reconciliation.
The results go to docs/namespaces.md (between its markers) unless --no-doc.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import crc32c
import grpc
import numpy as np

from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "namespaces.md"
DIM = 32  # the small namespaces' vectors
BUSY_ENTRIES = 2_000
PUT_THREADS = 4
LOOKUPS = 1_000  # timed lookups in the busy namespace


# ---------------------------------------------------------------- helpers (tests/test_many_namespaces.py uses them)
def namespace(i: int) -> pb.Namespace:
    """The i-th small namespace: one tenant each."""
    return pb.Namespace(tenant=f"tenant-{i:05d}", model="bench-ns", width=64, height=64, frames=16,
                        scheduler="flow", total_steps=50)


BUSY = pb.Namespace(tenant="busy", model="bench-ns", width=64, height=64, frames=16, scheduler="flow",
                    total_steps=50)


def vector(i: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def put(stub: pb_grpc.CacheServiceStub, ns: pb.Namespace, prompt: str, vec: np.ndarray,
        timeout: float = 30.0) -> pb.PutResponse:
    """One Put of a 64-byte blob (header, one chunk); raises grpc.RpcError as the daemon answers."""
    blob = hashlib.sha256(prompt.encode()).digest() * 2
    header = pb.PutHeader(namespace=ns, prompt=prompt, vectors=pb.Vectors(full=vec.tolist()),
                          blob=pb.BlobInfo(size=len(blob), sha256=hashlib.sha256(blob).digest(),
                                           crc32c=crc32c.crc32c(blob), codec="raw", dtype="uint8",
                                           shape=[len(blob)]))
    return stub.Put(iter([pb.PutRequest(header=header), pb.PutRequest(chunk=blob)]), timeout=timeout)


def lookup(stub: pb_grpc.CacheServiceStub, ns: pb.Namespace, vec: np.ndarray, timeout: float = 30.0) -> str:
    """The best candidate's entry id ('' on a miss)."""
    answer = stub.Lookup(pb.LookupRequest(namespace=ns, vectors=pb.Vectors(full=vec.tolist()), top_k=1),
                         timeout=timeout)
    return answer.candidates[0].entry_id if answer.candidates else ""


def parallel(target: str, count: int, work: Callable[[pb_grpc.CacheServiceStub, int], object],
             threads: int = PUT_THREADS) -> list[object]:
    """work(stub, i) for i in range(count), from `threads` client threads (a channel each); results in order."""
    channels = [grpc.insecure_channel(target) for _ in range(threads)]
    stubs = [pb_grpc.CacheServiceStub(c) for c in channels]
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda i: work(stubs[i % threads], i), range(count)))
    finally:
        for channel in channels:
            channel.close()


def put_namespaces(target: str, count: int, threads: int = PUT_THREADS) -> list[str]:
    """One entry in each of namespaces 0..count-1; their entry ids."""
    return parallel(target, count, lambda stub, i: put(stub, namespace(i), f"prompt {i}", vector(i)).entry_id,
                    threads)


def find_namespaces(target: str, count: int, threads: int = PUT_THREADS) -> list[str]:
    """Each namespace's best entry for its own vector ('' where none)."""
    return parallel(target, count, lambda stub, i: lookup(stub, namespace(i), vector(i)), threads)


def census(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a live process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def peak_census(pid: int, every_s: float = 0.02) -> Iterator[list[int]]:
    """Samples `census(pid)` until the block ends; yields [peak threads, peak fds], filled in as it runs."""
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while True:
            try:
                threads, fds = census(pid)
            except FileNotFoundError:  # the process is gone (or a task ended while listed)
                threads, fds = 0, 0
            peak[:] = [max(peak[0], threads), max(peak[1], fds)]
            if stop.wait(every_s):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def timed_restart(daemon: DaemonProcess) -> float:
    """SIGTERM, then start until SERVING; the seconds `start` took."""
    daemon.terminate()
    t0 = time.perf_counter()
    daemon.start()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- part 1
@dataclass
class Level:
    namespaces: int
    put_s: float
    threads_peak: int
    fds_peak: int
    threads_after: int
    fds_after: int
    restart_s: float
    threads_restarted: int
    found: int
    sweep_s: float
    threads_sweep_peak: int
    threads_end: int
    fds_end: int
    p50_ms: float
    p99_ms: float


def _percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def busy_latency(target: str, count: int = LOOKUPS, warmup: int = 50) -> list[float]:
    """Lookup wall times (ms) in the busy namespace, one client, queries near stored vectors."""
    rng = np.random.default_rng(1)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        samples = []
        for k in range(warmup + count):
            q = vector(1_000_000 + int(rng.integers(BUSY_ENTRIES)), DIM) + rng.standard_normal(DIM) * 0.03
            t0 = time.perf_counter()
            lookup(stub, BUSY, q.astype(np.float32))
            if k >= warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def bench_level(tmp: Path, n: int) -> Level:
    daemon = DaemonProcess(tmp / f"ns{n}" / "data", metrics_listen="", log_level="WARNING")
    with daemon:
        parallel(daemon.target, BUSY_ENTRIES,
                 lambda stub, i: put(stub, BUSY, f"busy {i}", vector(1_000_000 + i, DIM)))
        t0 = time.perf_counter()
        with peak_census(daemon.pid) as peak:
            ids = put_namespaces(daemon.target, n)
        put_s = time.perf_counter() - t0
        threads_after, fds_after = census(daemon.pid)
        restart_s = timed_restart(daemon)
        threads_restarted, _ = census(daemon.pid)
        t0 = time.perf_counter()
        with peak_census(daemon.pid) as sweep_peak:
            found = sum(a == b for a, b in zip(find_namespaces(daemon.target, n), ids, strict=True))
        sweep_s = time.perf_counter() - t0
        samples = busy_latency(daemon.target)
        threads_end, fds_end = census(daemon.pid)
    shutil.rmtree(tmp / f"ns{n}", ignore_errors=True)
    return Level(n, put_s, peak[0], peak[1], threads_after, fds_after, restart_s, threads_restarted, found,
                 sweep_s, sweep_peak[0], threads_end, fds_end, _percentile(samples, 50), _percentile(samples, 99))


def levels_table(rows: Sequence[Level]) -> str:
    out = ["| namespaces | puts s | threads peak (puts) | fds peak (puts) | threads after puts | restart s | "
           "threads after restart | lookup sweep s | found after restart | threads peak (sweep) | "
           f"threads / fds at end | busy-namespace lookup p50 / p99 ms ({BUSY_ENTRIES:,} entries) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.namespaces:,} | {r.put_s:.1f} | {r.threads_peak} | {r.fds_peak} | {r.threads_after} | "
                   f"{r.restart_s:.1f} | {r.threads_restarted} | {r.sweep_s:.1f} | {r.found:,} / {r.namespaces:,} | "
                   f"{r.threads_sweep_peak} | {r.threads_end} / {r.fds_end} | {r.p50_ms:.2f} / {r.p99_ms:.2f} |")
    return "\n".join(out)


# ---------------------------------------------------------------- part 2
@dataclass
class Big:
    entries: int
    load_note: str
    index_rows: list[tuple[str, float, float, float]]  # (search pool, p50, p99, recall@1)
    e2e: tuple[float, float, float]  # p50, p99, recall@1
    first_lookup_ms: float
    restart_s: float


def bench_big(tmp: Path, n: int, queries: int) -> Big:
    """100k entries in one namespace: in-process index lookups (the daemon's search pool vs Qdrant's
    default, interleaved), then end to end through a daemon."""
    from bench import bench_daemon as bd
    from flexcache.client import CacheClient, Namespace
    from flexcache.daemon.index import edge

    corpus = bd.Corpus(n)
    data_dir = tmp / "big"
    data_dir.mkdir()
    t_store = bd.fill_store(data_dir, corpus, 0, n)
    index = edge.EdgeIndex(data_dir / "index")
    try:
        t_index = bd.fill_index(index, corpus, 0, n)
        index.optimize()
    finally:
        index.close()
    note = f"store filled in {t_store:.0f} s, index in {t_index:.0f} s"
    qs, src = corpus.queries(n, queries, seed=n)
    expect = [corpus.ids[i] for i in src]
    default = qdrant_default_search_threads(tmp)
    pools = {"the daemon's (edge.SEARCH_THREADS)": edge.SEARCH_THREADS, "Qdrant's default (the layout before)": default}
    opened: dict[str, edge.EdgeIndex] = {}
    try:
        for k, (label, threads) in enumerate(pools.items()):  # the same shard files, a copy each
            shutil.copytree(data_dir / "index", data_dir / f"index-{k}")
            idx = edge.EdgeIndex(data_dir / f"index-{k}", search_threads=threads)
            before = census(os.getpid())[0]
            idx.search(corpus.ns_key.key, "full", qs[0].tolist(), limit=5)  # loads the shard: its pool starts
            started = census(os.getpid())[0] - before
            opened[f"{label}: {started} thread{'' if started == 1 else 's'}"] = idx
        samples: dict[str, list[float]] = {label: [] for label in opened}
        right: dict[str, int] = dict.fromkeys(opened, 0)
        for rep, (q, want) in enumerate(zip(qs, expect, strict=True)):
            for label, idx in (opened.items() if rep % 2 else reversed(opened.items())):
                t0 = time.perf_counter()
                hits = idx.search(corpus.ns_key.key, "full", q.tolist(), limit=5)
                samples[label].append((time.perf_counter() - t0) * 1e3)
                right[label] += bool(hits) and hits[0].entry_id == want
        rows = [(label, _percentile(s[20:], 50), _percentile(s[20:], 99), right[label] / len(expect))
                for label, s in samples.items()]
    finally:
        for idx in opened.values():
            idx.close()
    ns = corpus.ns
    client_ns = Namespace(ns.tenant, ns.model, ns.width, ns.height, ns.frames, ns.scheduler, ns.total_steps)
    t0 = time.perf_counter()
    with DaemonProcess(data_dir, metrics_listen="", log_level="WARNING") as daemon:
        restart_s = time.perf_counter() - t0
        with CacheClient(daemon.target, client_ns, timeout_s=60.0) as client:
            t0 = time.perf_counter()
            client.lookup(qs[0])
            first_ms = (time.perf_counter() - t0) * 1e3
            e2e, hits = [], 0
            for q, want in zip(qs, expect, strict=True):
                t0 = time.perf_counter()
                result = client.lookup(q)
                e2e.append((time.perf_counter() - t0) * 1e3)
                hits += result is not None and result.best is not None and result.best.entry_id == want
    shutil.rmtree(data_dir, ignore_errors=True)
    return Big(n, note, rows, (_percentile(e2e[20:], 50), _percentile(e2e[20:], 99), hits / len(expect)),
               first_ms, restart_s)


def qdrant_default_search_threads(tmp: Path) -> int:
    """The search pool Qdrant Edge starts for a shard whose configuration names no size (derived from
    the CPUs), counted on a scratch shard. A shard persists the size it was created or last loaded
    with, and loading with None keeps that, so the old layout's pool must be asked for by number."""
    import qdrant_edge as qe

    from flexcache.daemon.index import edge

    before = census(os.getpid())[0]
    shard = qe.EdgeShard.create(str(tmp / "scratch-shard"), edge.shard_config(8, "full", search_threads=None))
    try:
        return census(os.getpid())[0] - before
    finally:
        shard.close()
        shutil.rmtree(tmp / "scratch-shard", ignore_errors=True)


def big_table(big: Big) -> str:
    out = [f"| path ({big.entries:,} x 384-d, one namespace) | search pool per shard | p50 ms | p99 ms | recall@1 |",
           "|---|---|---:|---:|---:|"]
    for label, p50, p99, recall in big.index_rows:
        out.append(f"| index (in-process) | {label} | {p50:.2f} | {p99:.2f} | {recall:.3f} |")
    p50, p99, recall = big.e2e
    out.append(f"| e2e (CacheClient.lookup) | the daemon's | {p50:.2f} | {p99:.2f} | {recall:.3f} |")
    return "\n".join(out)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="10,300,1000", help="namespace counts, comma-separated")
    parser.add_argument("--big", type=int, default=100_000, help="entries in the one-namespace part")
    parser.add_argument("--queries", type=int, default=2_000, help="timed queries in the one-namespace part")
    parser.add_argument("--skip-100k", action="store_true", help="only part 1")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    logging.getLogger("flexcache").setLevel(logging.ERROR)
    started = datetime.datetime.now().astimezone()
    tmp = Path(tempfile.mkdtemp(prefix="flexcache-bench-ns-"))
    rows: list[Level] = []
    big: Big | None = None
    try:
        for n in (int(x) for x in args.levels.split(",")):
            rows.append(bench_level(tmp, n))
            print(levels_table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.skip_100k:
            big = bench_big(tmp, args.big, args.queries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
    report = levels_table(rows)
    if big is not None:
        report += "\n\n" + big_table(big)
        report += (f"\n\nThe daemon over that namespace: SERVING {big.restart_s:.1f} s after exec; its first lookup "
                   f"(which reconciles the namespace's shard with the store) took {big.first_lookup_ms:.0f} ms; "
                   f"{big.load_note}.")
    print("\n" + report + f"\n\n({elapsed:.0f} s)")
    if not args.no_doc:
        command = ".venv/bin/python -m bench.bench_namespaces" + ("" if argv is None else " " + " ".join(argv))
        write_doc(command, started, elapsed, report)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


def write_doc(command: str, started: datetime.datetime, elapsed: float, report: str) -> None:
    """Replace the generated part of docs/namespaces.md (between the markers), keep the prose."""
    from bench.bench_daemon import machine_note
    from bench.report import replace_results

    replace_results(DOC, "Many namespaces", [f"Command: `{command}`  ",
                                             f"Date: {started:%Y-%m-%d %H:%M %Z}, {elapsed:.0f} s wall  ",
                                             f"Machine: {machine_note()}", "", report])


if __name__ == "__main__":
    sys.exit(main())
