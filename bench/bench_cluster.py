"""Cluster mode on loopback: 1 vs 3 vs 5 nodes with the same logical budget on the same trace, a node
killed and a node frozen mid-run, and the inputs of the scaling model (docs/bench_cluster.md).

    .venv/bin/python -m bench.bench_cluster            # full run (~3 min on the shared 2-core box)
    .venv/bin/python -m bench.bench_cluster --quick    # smoke run (~1 min): shorter trace and phases
    .venv/bin/python -m bench.bench_cluster --no-doc   # print only, leave docs/bench_cluster.md alone

Every daemon is a real `flexcache serve` subprocess started by the shared launcher
(flexcache.daemon.process): the 1-node row is one plain DaemonProcess (no peers: the single-daemon
deployment), the others a DaemonCluster (static peers, node ids n0..), replication_factor R = 2.

Part 1, same trace, same logical budget. A Zipf trace over the real prompt suites (bench/traces.py),
embedded with the offline MiniLM (bench.bench_traces.embed_texts, cached in bench/out/), latents small
random float16 arrays of one shape (deterministic per prompt, so every deployment stores the same
entry ids), stored raw. The trace is replayed sequentially through the nodes round-robin: Lookup; on a
hit Fetch (crediting its granted steps); on a miss Put. One node gets max_bytes = B; N nodes each
B * R / N, because R copies of every entry are stored and the cluster then holds N * max_bytes / R = B
of distinct entries. B is a fraction of the bytes of every distinct prompt of the trace, so eviction
runs. Measured part only: hit rate, steps saved (sum of the hits' granted steps), Lookup p50/p99.
Before the replay, on each deployment (empty): the put-cost entries of part 3, then 4 MiB blobs put
through node 0 and fetched (the client's default path, FetchDirect + data port) through a node that
holds a copy and through one that does not (the node fetches from an owner, hedged); each deleted
again, so the replay starts empty.

Part 2, on the 3-node cluster. Before the replay: a blob fetched through the node that holds no copy,
its source owner SIGSTOPped halfway through the transfer. After it (the cluster warm): a freeze, then
the failover. The freeze: SIGSTOP of n2 while a worker looks up (and fetches) through n0 and n1;
latency before, while frozen (before and after the survivors see n2 down) and after SIGCONT. The
failover: one worker thread per node replays the trace again; 4 s in (3 s with --quick) node n2 is
SIGKILLed. Per second: requests, errors (None from a Lookup,
from the Fetch of an entry a Lookup had just returned, or from a Put) through the survivors and through
the killed node (its worker moves to n0 after its first error, as a load balancer would), hit rate.
Time until the survivors see n2 down, and until every entry that existed at the kill is on both
survivors again (NodeService.Has) or on neither (evicted).

Part 3, the scaling model's inputs: per Lookup, the daemons' CPU summed over all nodes and the wait
for the peers' Gathers (flexcache_cluster_fanout_seconds); one Gather's round trip and CPU timed
directly (NodeService.Gather from here); per Put, latency and CPU at R = 1 vs R = 2 on 3 nodes (and on
1 and 5); per Fetch, CPU through an owner vs through a non-owner. Aggregate throughput is not measured:
every daemon shares the same 2 cores, so it cannot scale here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.bench_daemon import machine_note
from bench.bench_load import pct
from bench.bench_traces import embed_texts
from bench.report import replace_results
from bench.traces import Trace, build_trace, describe, load_intents, sample_intents
from flexcache.client import CacheClient, Namespace
from flexcache.daemon.cluster import placement
from flexcache.daemon.cluster.node import STALL_MIN_S, STALL_PEER_TIMEOUTS
from flexcache.daemon.entries import record_size
from flexcache.daemon.process import DaemonCluster, DaemonProcess, copies, wait_members
from flexcache.daemon.process import metric as scrape
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import node_pb2_grpc as npb_grpc

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bench_cluster.md"
MiB = 1 << 20
MB = 1e6
STEPS = 50
SHAPE = (16, 4, 32, 32)  # float16: 128 KiB a latent, raw
R = 2  # replication_factor of every cluster but the R = 1 put-cost row
SIZES = (1, 3, 5)
NS = Namespace(tenant="bench", model="cluster-trace", width=256, height=256, frames=16, scheduler="flow",
               total_steps=STEPS)
SIDE_NS = Namespace(tenant="bench", model="cluster-side", width=256, height=256, frames=16, scheduler="flow",
                    total_steps=STEPS)  # fetch-throughput blobs and put-cost entries: never seen by the trace
COMMON: dict[str, object] = {"scrub_bytes_per_second": 0, "log_level": "WARNING"}
# The tests' fast cluster settings, peer_timeout_seconds left at its default (a loaded 2-core box answers a
# Gather in well under 0.5 s, not always under the tests' 0.3 s).
CLUSTER: dict[str, object] = {"peer_probe_seconds": 0.25, "peer_timeout_seconds": 0.5,
                              "repair_interval_seconds": 1.0, "hedge_seconds": 0.05}


# ---------------------------------------------------------------- deployments
class Deployment:
    """`n` daemons through the shared launcher: one plain DaemonProcess for n = 1, else a DaemonCluster."""

    def __init__(self, root: Path, n: int, per_node_bytes: int, replicas: int = R):
        self.n, self.replicas, self.per_node_bytes = n, replicas, per_node_bytes
        self.label = "1 node" if n == 1 else f"{n} nodes, R = {replicas}"
        self.cluster: DaemonCluster | None = None
        self.single: DaemonProcess | None = None
        if n == 1:
            self.single = DaemonProcess(root / "single", max_bytes=per_node_bytes, **COMMON)
        else:
            self.cluster = DaemonCluster(root / f"c{n}r{replicas}", n, max_bytes=per_node_bytes,
                                         replication_factor=replicas, **COMMON, **CLUSTER)

    @property
    def nodes(self) -> list[DaemonProcess]:
        return self.cluster.members if self.cluster is not None else [self.single]  # type: ignore[list-item]

    @property
    def targets(self) -> list[str]:
        return [n.target for n in self.nodes]

    def start(self) -> Deployment:
        if self.cluster is not None:
            self.cluster.start()
            wait_members(self.nodes, self.n, 30.0)
        else:
            self.single.start()  # type: ignore[union-attr]
        return self

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        elif self.single is not None:
            self.single.close()


def client(target: str, namespace: Namespace = NS, timeout_s: float = 5.0, transfer_s: float = 60.0) -> CacheClient:
    """Latents travel raw (max_rel_error None): every entry's size is known before it is stored."""
    return CacheClient(target, namespace, timeout_s=timeout_s, transfer_timeout_s=transfer_s, max_rel_error=None,
                       warn_every_s=3600)


def gone(c: CacheClient) -> bool:
    """The call that just returned None was answered NOT_FOUND: the entry a lookup had just returned was
    evicted (or forgotten with its other copy) before the fetch reached it: a race, not a failure."""
    error = c.last_error
    return isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)) and \
        error.code() == grpc.StatusCode.NOT_FOUND






def cpu(nodes: Sequence[DaemonProcess]) -> float:
    return sum(n.cpu_seconds() for n in nodes if n.running)


def idle_cpu(nodes: Sequence[DaemonProcess], seconds: float) -> float:
    """CPU seconds per second the idle deployment spends (probes, repair passes, the notifier)."""
    c0, t0 = cpu(nodes), time.perf_counter()
    time.sleep(seconds)
    return (cpu(nodes) - c0) / (time.perf_counter() - t0)


class Busy:
    """The daemons' CPU over a block of work, less what they spend idle in as long (`idle` CPU s/s)."""

    def __init__(self, nodes: Sequence[DaemonProcess], idle: float):
        self.nodes, self.idle = nodes, idle
        self.c0, self.t0 = cpu(nodes), time.perf_counter()

    def ms(self) -> float:
        return (cpu(self.nodes) - self.c0 - self.idle * (time.perf_counter() - self.t0)) * 1e3


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------- the trace
@dataclass
class Workload:
    trace: Trace
    texts: list[str]  # per request
    vectors: np.ndarray  # per request, MiniLM
    embed_s: float

    @property
    def warmup(self) -> int:
        return self.trace.warmup

    @staticmethod
    def seed_of(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")

    def latent(self, text: str) -> np.ndarray:
        """The same random latent for the same prompt, in every deployment (so the same entry ids)."""
        return np.random.default_rng(self.seed_of(text)).standard_normal(SHAPE, dtype=np.float32).astype(np.float16)

    def entry_bytes(self, text: str, vector: np.ndarray) -> int:
        """What one entry costs in the daemon's budget (blob + record + vectors: entries.record_size)."""
        blob = pb.BlobInfo(size=int(np.prod(SHAPE)) * 2, sha256=bytes(32), crc32c=1, codec="raw", dtype="float16",
                           shape=SHAPE, attrs={"seed": str(self.seed_of(text))})
        return record_size(pb.PutHeader(namespace=NS.to_proto(), prompt=text, blob=blob,
                                        vectors=pb.Vectors(full=vector.tolist())))

    def distinct_bytes(self) -> int:
        """Bytes of every distinct prompt of the trace stored once: what no eviction at all would need."""
        first = {t: i for i, t in reversed(list(enumerate(self.texts)))}
        return sum(self.entry_bytes(t, self.vectors[i]) for t, i in first.items())


def build_workload(intents: int, warmup: int, requests: int, zipf_s: float, seed: int) -> Workload:
    trace = build_trace(sample_intents(load_intents(), intents, seed), requests, warmup, zipf_s, seed)
    t0 = time.monotonic()
    vectors = embed_texts(trace.unique_texts())
    texts = [r.text for r in trace.requests]
    return Workload(trace, texts, np.stack([vectors[t] for t in texts]).astype(np.float32), time.monotonic() - t0)


# ---------------------------------------------------------------- part 1: the replay
@dataclass
class Replay:
    label: str
    n: int
    per_node_bytes: int
    measured: int = 0
    hits: int = 0
    steps: int = 0
    errors: int = 0
    gone: int = 0  # a hit's fetch answered NOT_FOUND: evicted since the lookup
    puts: int = 0
    put_bytes: int = 0
    lookup_ms: list[float] = field(default_factory=list)
    put_ms: list[float] = field(default_factory=list)
    fetch_ms: list[float] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    evictions: int = 0
    stored_bytes: int = 0
    distinct_held: int = 0  # entries of the replay on at least one node at the end
    copies_held: int = 0  # their copies
    gather_errors: float = 0.0
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.measured if self.measured else float("nan")

    @property
    def steps_fraction(self) -> float:
        """Steps saved as a fraction of the steps the measured requests asked for."""
        return self.steps / (self.measured * STEPS) if self.measured else float("nan")


def replay(dep: Deployment, work: Workload) -> Replay:
    out = Replay(dep.label, dep.n, dep.per_node_bytes)
    clients = [client(t) for t in dep.targets]
    began = time.perf_counter()
    try:
        for i, (text, vector) in enumerate(zip(work.texts, work.vectors, strict=True)):
            c = clients[i % len(clients)]
            measured = i >= work.warmup
            t0 = time.perf_counter()
            found = c.lookup(vector)
            if measured:
                out.lookup_ms.append((time.perf_counter() - t0) * 1e3)
                out.measured += 1
            if found is None:
                out.errors += 1
            best = found.best if found is not None else None
            if best is not None:
                t0 = time.perf_counter()
                got = c.fetch(best.entry_id, granted_steps=best.granted_steps)
                out.fetch_ms.append((time.perf_counter() - t0) * 1e3)
                if got is not None:
                    if measured:
                        out.hits += 1
                        out.steps += best.granted_steps
                    continue
                if gone(c):
                    out.gone += 1
                else:
                    out.errors += 1  # the lookup had just returned it
            t0 = time.perf_counter()
            eid = c.put(text, work.latent(text), vector, seed=work.seed_of(text))
            out.put_ms.append((time.perf_counter() - t0) * 1e3)
            out.puts += 1
            out.put_bytes += work.entry_bytes(text, vector)
            if eid is None:
                out.errors += 1
            else:
                out.ids.add(eid)
    finally:
        for c in clients:
            c.close()
    out.seconds = time.perf_counter() - began
    counts = copies(dep.nodes, sorted(out.ids))
    out.distinct_held = sum(1 for c in counts.values() if c)
    out.copies_held = sum(counts.values())
    for node in dep.nodes:
        stats = node.stats()
        out.evictions += stats.evictions
        out.stored_bytes += stats.bytes
        if dep.n > 1:
            out.gather_errors += scrape(node.metrics_port, "flexcache_cluster_peer_errors_total", method="Gather")
    return out


# ---------------------------------------------------------------- part 1: fetch throughput
@dataclass
class FetchRow:
    label: str
    path: str
    mbs: list[float] = field(default_factory=list)
    cpu_ms: float = 0.0  # the daemons' CPU over all these fetches, all nodes, less idle

    @property
    def cpu_per_fetch(self) -> float:
        return self.cpu_ms / len(self.mbs) if self.mbs else float("nan")


def fetch_throughput(dep: Deployment, blobs: int, reps: int, size: int, idle: float
                     ) -> tuple[list[FetchRow], list[float]]:
    """One blob of `size` at a time (so the smallest budget holds it): put through node 0, fetched `reps`
    times through a node that holds a copy and (in a cluster) `reps` times through one that does not,
    deleted. Blob 0 only warms the connections up. Returns the fetch rows and the puts' MB/s."""
    rng = np.random.default_rng(11)
    clients = [client(t, SIDE_NS, timeout_s=10.0) for t in dep.targets]
    info = pb.BlobInfo(codec="raw", dtype="uint8", shape=[size])
    nodes = dep.nodes
    rows = {"owner": FetchRow(dep.label, "through an owner")}
    if dep.n > dep.replicas:
        rows["other"] = FetchRow(dep.label, "through a non-owner")
    put_mbs: list[float] = []
    try:
        for b in range(blobs + 1):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            t0 = time.perf_counter()
            eid = clients[0].put_blob(f"fetch blob {b}", data, info, unit(rng))
            dt = time.perf_counter() - t0
            if eid is None:
                raise RuntimeError(f"{dep.label}: a {size} B put failed: {clients[0].last_error}")
            if b == 0:
                for c in clients:
                    c.fetch(eid)
                clients[0].delete(eid)
                continue
            put_mbs.append(size / MB / dt)
            holders = {k for k, node in enumerate(nodes) if eid in node.held([eid])}  # stored once acknowledged
            paths = {"owner": min(holders)}
            if "other" in rows:
                paths["other"] = min(set(range(len(nodes))) - holders)
            for path, k in paths.items():
                busy = Busy(nodes, idle)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    got = clients[k].fetch(eid)
                    dt = time.perf_counter() - t0
                    if got is None or len(got.data) != size:
                        raise RuntimeError(f"{dep.label}: fetch {path} failed: {clients[k].last_error}")
                    rows[path].mbs.append(size / MB / dt)
                rows[path].cpu_ms += busy.ms()
            clients[0].delete(eid)
    finally:
        for c in clients:
            c.close()
    return list(rows.values()), put_mbs


# ---------------------------------------------------------------- part 3: put and lookup cost
@dataclass
class Cost:
    label: str
    n: int
    replicas: int
    put_ms: list[float] = field(default_factory=list)
    put_cpu_ms: float = float("nan")  # per put, all nodes
    put_copy_bytes: float = float("nan")  # bytes sent to peers per put
    lookup_ms: list[float] = field(default_factory=list)
    lookup_cpu_ms: float = float("nan")
    fanout_ms: float = float("nan")  # mean wait for the peers' Gathers per lookup (the daemon's histogram)
    gather_ms: list[float] = field(default_factory=list)  # one Gather from here, timed directly
    gather_cpu_ms: float = float("nan")  # the answering daemon's CPU per Gather
    idle_ms_per_s: float = float("nan")  # all nodes, idle with the trace's entries (probes, repair passes)
    leftover_bytes: int = 0


def put_cost(dep: Deployment, count: int, cost: Cost, idle: float) -> None:
    """`count` entries of the trace's latent size put round-robin into an empty deployment, then deleted."""
    rng = np.random.default_rng(5)
    clients = [client(t, SIDE_NS) for t in dep.targets]
    nodes = dep.nodes
    ids = []
    try:
        for c in clients:  # connect before the clock starts
            c.stats()
        sent0 = sum(scrape(n.metrics_port, "flexcache_cluster_replication_bytes_total", reason="put") for n in nodes) \
            if dep.n > 1 else 0.0
        busy = Busy(nodes, idle)
        for i in range(count):
            latent = rng.standard_normal(SHAPE, dtype=np.float32).astype(np.float16)
            vector = unit(rng)
            t0 = time.perf_counter()
            eid = clients[i % len(clients)].put(f"put cost {i}", latent, vector, seed=i)
            cost.put_ms.append((time.perf_counter() - t0) * 1e3)
            if eid is None:
                raise RuntimeError(f"{dep.label}: a put failed: {clients[i % len(clients)].last_error}")
            ids.append(eid)
        cost.put_cpu_ms = busy.ms() / count
        sent1 = sum(scrape(n.metrics_port, "flexcache_cluster_replication_bytes_total", reason="put") for n in nodes) \
            if dep.n > 1 else 0.0
        cost.put_copy_bytes = (sent1 - sent0) / count
        for eid in ids:
            clients[0].delete(eid)
        cost.leftover_bytes = sum(n.stats().bytes for n in nodes)
    finally:
        for c in clients:
            c.close()


def lookup_cost(dep: Deployment, work: Workload, count: int, cost: Cost, idle: float) -> None:
    """`count` lookups of the trace's vectors round-robin (CPU over all nodes, the fan-out histogram),
    then `count` Gathers sent to node 0 directly."""
    nodes = dep.nodes
    vectors = work.vectors[work.warmup:]
    clients = [client(t) for t in dep.targets]
    try:
        for c in clients:
            c.lookup(vectors[0])
        fan0 = [(scrape(n.metrics_port, "flexcache_cluster_fanout_seconds_sum", method="Lookup"),
                 scrape(n.metrics_port, "flexcache_cluster_fanout_seconds_count", method="Lookup")) for n in nodes]
        busy = Busy(nodes, idle)
        for i in range(count):
            t0 = time.perf_counter()
            if clients[i % len(clients)].lookup(vectors[i % len(vectors)]) is None:
                raise RuntimeError(f"{dep.label}: a lookup failed: {clients[i % len(clients)].last_error}")
            cost.lookup_ms.append((time.perf_counter() - t0) * 1e3)
        cost.lookup_cpu_ms = busy.ms() / count
        if dep.n > 1:
            fan1 = [(scrape(n.metrics_port, "flexcache_cluster_fanout_seconds_sum", method="Lookup"),
                     scrape(n.metrics_port, "flexcache_cluster_fanout_seconds_count", method="Lookup")) for n in nodes]
            waited = sum(b[0] - a[0] for a, b in zip(fan0, fan1, strict=True))
            lookups = sum(b[1] - a[1] for a, b in zip(fan0, fan1, strict=True))
            cost.fanout_ms = waited / lookups * 1e3 if lookups else float("nan")
    finally:
        for c in clients:
            c.close()
    with nodes[0].channel() as channel:
        stub = npb_grpc.NodeServiceStub(channel)
        requests = [pb.LookupRequest(namespace=NS.to_proto(), vectors=pb.Vectors(full=v.tolist()), top_k=1)
                    for v in vectors[:min(count, len(vectors))]]
        stub.Gather(requests[0], timeout=5)
        busy = Busy(nodes[:1], idle / len(nodes))
        for i in range(count):
            t0 = time.perf_counter()
            stub.Gather(requests[i % len(requests)], timeout=5)
            cost.gather_ms.append((time.perf_counter() - t0) * 1e3)
        cost.gather_cpu_ms = busy.ms() / count


# ---------------------------------------------------------------- part 2: freeze and failover
@dataclass
class Call:
    t0: float  # perf_counter at the start
    t1: float
    kind: str  # "lookup" or "fetch"
    ok: bool
    hit: bool = False

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1e3


@dataclass
class Freeze:
    seconds: float  # how long the node was stopped
    calls: list[Call]
    paused_at: float
    resumed_at: float
    detected_s: float  # after the pause: every survivor sees it down
    rejoin_s: float = float("nan")
    settle_s: float = float("nan")

    def window(self, kind: str, name: str) -> list[Call]:
        seen = self.paused_at + (self.detected_s if self.detected_s == self.detected_s else math.inf)
        def where(c: Call) -> str:
            if c.t1 <= self.paused_at:
                return "before"
            if c.t0 >= self.resumed_at:
                return "after"
            return "late" if c.t0 >= seen else "early"
        return [c for c in self.calls if c.kind == kind and where(c) == name]


def watch_down(nodes: Sequence[DaemonProcess], since: float, until: threading.Event, into: list[float]) -> None:
    """Append the seconds from `since` until every node in `nodes` sees a member down."""
    while not until.is_set():
        with contextlib.suppress(OSError):
            if all(scrape(n.metrics_port, "flexcache_cluster_members", state="down") >= 1 for n in nodes):
                into.append(time.perf_counter() - since)
                return
        time.sleep(0.05)


def freeze(dep: Deployment, work: Workload, before_s: float, frozen_s: float, after_s: float, victim: int,
           known: set[str]) -> Freeze:
    """A worker looks up the trace's vectors (and fetches the hits) through the other nodes, in turn, while
    `victim` is SIGSTOPped for `frozen_s` (the pause and the resume are timed here, not by the worker)."""
    assert dep.cluster is not None
    survivors = [n for k, n in enumerate(dep.nodes) if k != victim]
    calls: list[Call] = []
    stop = threading.Event()

    def worker() -> None:
        clients = [client(n.target, timeout_s=10.0, transfer_s=30.0) for n in survivors]
        i = 0
        try:
            while not stop.is_set():
                c = clients[i % len(clients)]
                t0 = time.perf_counter()
                found = c.lookup(work.vectors[i % len(work.vectors)])
                calls.append(Call(t0, time.perf_counter(), "lookup", found is not None,
                                  found is not None and found.best is not None))
                i += 1
                if found is not None and found.best is not None:
                    t0 = time.perf_counter()
                    got = c.fetch(found.best.entry_id)
                    calls.append(Call(t0, time.perf_counter(), "fetch", got is not None or gone(c)))
        finally:
            for c in clients:
                c.close()

    detected: list[float] = []
    done = threading.Event()
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    paused_at = resumed_at = math.inf
    try:
        time.sleep(before_s)
        dep.cluster.pause(victim)
        paused_at = time.perf_counter()
        threading.Thread(target=watch_down, args=(survivors, paused_at, done, detected), daemon=True).start()
        time.sleep(frozen_s)
    finally:
        if paused_at < math.inf:
            dep.cluster.resume(victim)
            resumed_at = time.perf_counter()
        done.set()
    time.sleep(after_s)
    stop.set()
    thread.join(60)
    out = Freeze(resumed_at - paused_at, list(calls), paused_at, resumed_at, detected[0] if detected else float("nan"))
    out.rejoin_s = wait_members(dep.nodes, dep.n, 30.0)
    out.settle_s = settle(dep.nodes, sorted(known), 30.0)
    return out


def settle(nodes: Sequence[DaemonProcess], ids: Sequence[str], timeout: float) -> float:
    """Seconds until every id is on exactly R nodes or on none (the repair passes and handoffs done)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(c in (0, R) for c in copies(nodes, ids).values()):
            return time.monotonic() - start
        time.sleep(0.2)
    return float("nan")


@dataclass
class Op:
    t: float  # seconds since the run began
    via_killed: bool  # sent to the node that was killed (before its worker moved)
    error: bool
    gone: bool  # the hit's fetch answered NOT_FOUND (evicted since the lookup): a race, not an error
    looked: bool  # the Lookup answered
    hit: bool
    lookup_ms: float


@dataclass
class Failover:
    seconds: float
    kill_at: float
    ops: list[Op]
    detected_s: float  # after the kill
    replicated_s: float  # after the kill; nan: not within the wait
    at_kill: int  # entries held anywhere just before the kill
    on_victim: int
    only_on_victim: int  # in the snapshot just before the kill (puts and evictions in flight included)
    only_on_victim_twice: int  # also in the one 0.5 s earlier: a single copy that stayed single (lost with it)
    recopied: int  # of those on the victim: on both survivors at the end
    evicted: int  # on neither survivor at the end
    repair_bytes: float
    moved_after: int  # errors the killed node's worker saw before it moved


def failover(dep: Deployment, work: Workload, seconds: float, kill_at: float, victim: int, known: set[str],
             wait_s: float) -> Failover:
    nodes = dep.nodes
    survivors = [n for k, n in enumerate(nodes) if k != victim]
    ops: list[Op] = []
    lock = threading.Lock()
    stop, killed = threading.Event(), threading.Event()
    moved_after: list[int] = []
    acked = set(known)
    began = time.perf_counter()

    def work_loop(w: int) -> None:
        c = client(nodes[w].target, timeout_s=2.0)
        on_victim = w == victim
        errors_there = 0
        j = w
        try:
            while not stop.is_set():
                text, vector = work.texts[j % len(work.texts)], work.vectors[j % len(work.texts)]
                j += len(nodes)
                t = time.perf_counter() - began
                t0 = time.perf_counter()
                found = c.lookup(vector)
                ms = (time.perf_counter() - t0) * 1e3
                error = found is None
                hit = evicted = False
                if found is not None and found.best is not None:
                    best = found.best
                    hit = c.fetch(best.entry_id, granted_steps=best.granted_steps) is not None
                    evicted = not hit and gone(c)
                    error = not hit and not evicted
                elif found is not None:
                    eid = c.put(text, work.latent(text), vector, seed=work.seed_of(text))
                    error = eid is None
                    if eid is not None:
                        with lock:
                            acked.add(eid)
                with lock:
                    ops.append(Op(t, on_victim, error, evicted, found is not None, hit, ms))
                if error and on_victim:
                    errors_there += 1
                    if killed.is_set():  # the load balancer takes the dead node out
                        c.close()
                        c = client(nodes[(victim + 1) % len(nodes)].target, timeout_s=2.0)
                        on_victim = False
                        moved_after.append(errors_there)
        finally:
            c.close()

    threads = [threading.Thread(target=work_loop, args=(w,), daemon=True) for w in range(len(nodes))]
    for t in threads:
        t.start()
    def snapshot() -> dict[int, set[str]]:
        with lock:
            ids = sorted(acked)
        return {k: n.held(ids) for k, n in enumerate(nodes)}

    def single(snap: dict[int, set[str]]) -> set[str]:
        return snap[victim] - set().union(*(snap[k] for k in snap if k != victim))

    time.sleep(max(0.0, kill_at - 0.5 - (time.perf_counter() - began)))
    earlier = snapshot()
    time.sleep(max(0.0, kill_at - (time.perf_counter() - began)))
    before = snapshot()
    repair0 = sum(scrape(n.metrics_port, "flexcache_cluster_replication_bytes_total", reason="repair")
                  for n in survivors)
    nodes[victim].kill()
    t_kill = time.perf_counter()
    killed.set()
    detected: list[float] = []
    done = threading.Event()
    threading.Thread(target=watch_down, args=(survivors, t_kill, done, detected), daemon=True).start()
    anywhere = set().union(*before.values())
    pending = sorted(anywhere)
    replicated_s = float("nan")
    end_workers = began + seconds
    final: dict[str, int] = {}
    while time.perf_counter() - t_kill < wait_s:
        if time.perf_counter() >= end_workers and not stop.is_set():
            stop.set()
        final = copies(survivors, pending)
        if all(c in (0, len(survivors)) for c in final.values()):
            replicated_s = time.perf_counter() - t_kill
            break
        time.sleep(0.2)
    time.sleep(max(0.0, end_workers - time.perf_counter()))
    stop.set()
    done.set()
    for t in threads:
        t.join(30)
    repair1 = sum(scrape(n.metrics_port, "flexcache_cluster_replication_bytes_total", reason="repair")
                  for n in survivors)
    on_victim = before[victim]
    return Failover(
        seconds, kill_at, sorted(ops, key=lambda o: o.t), detected[0] if detected else float("nan"), replicated_s,
        len(anywhere), len(on_victim), len(single(before)), len(single(before) & single(earlier)),
        sum(1 for e in on_victim if final.get(e) == len(survivors)),
        sum(1 for e in anywhere if final.get(e) == 0), repair1 - repair0, moved_after[0] if moved_after else 0)


@dataclass
class RelayFreeze:
    size: int
    relay: int  # the node the client fetches through (holds no copy)
    source: int  # the owner it fetches from first (placement's order)
    rejoin_s: float  # after SIGCONT, until all see 3 serving
    unfrozen_ms: list[float]
    frozen_ms: float
    ok: bool
    error: str  # what the client reported, if anything


def relay_freeze(dep: Deployment, size: int, transfer_s: float) -> RelayFreeze:
    """On the empty cluster: a blob fetched through the node that holds no copy of it, and the owner that
    streams it to that node SIGSTOPped halfway through the transfer; then the blob is deleted again."""
    assert dep.cluster is not None
    nodes = dep.nodes
    rng = np.random.default_rng(17)
    with client(nodes[0].target, SIDE_NS, timeout_s=10.0) as writer:
        eid = writer.put_blob("relayed blob", rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
                              pb.BlobInfo(codec="raw", dtype="uint8", shape=[size]), unit(rng))
        if eid is None:
            raise RuntimeError(f"the relayed blob's put failed: {writer.last_error}")
    holders = {k for k, node in enumerate(nodes) if eid in node.held([eid])}
    relay = min(set(range(len(nodes))) - holders)
    source = int(placement.ranked(eid, [f"n{k}" for k in holders])[0][1:])
    reader = client(nodes[relay].target, SIDE_NS, timeout_s=5.0, transfer_s=transfer_s)
    result: dict[str, object] = {}
    try:
        unfrozen = []
        for _ in range(3):
            t0 = time.perf_counter()
            if reader.fetch(eid) is None:
                raise RuntimeError(f"the relayed fetch failed: {reader.last_error}")
            unfrozen.append((time.perf_counter() - t0) * 1e3)
        reader.last_error = None

        def fetch() -> None:
            t = time.perf_counter()
            result["ok"] = reader.fetch(eid) is not None
            result["ms"] = (time.perf_counter() - t) * 1e3
            result["error"] = "" if reader.last_error is None else f"{type(reader.last_error).__name__}: " + \
                (reader.last_error.details() if isinstance(reader.last_error, grpc.RpcError) else
                 str(reader.last_error))[:160]

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        time.sleep(statistics.median(unfrozen) / 2e3)
        dep.cluster.pause(source)
        try:
            thread.join(3 * transfer_s + 10)
        finally:
            dep.cluster.resume(source)
        thread.join(30)
        t0 = time.perf_counter()
        wait_members(nodes, dep.n, 30.0)
        rejoin = time.perf_counter() - t0
        reader.delete(eid)
    finally:
        reader.close()
    return RelayFreeze(size, relay, source, rejoin, unfrozen, float(result.get("ms", float("nan"))),  # type: ignore[arg-type]
                       bool(result.get("ok")), str(result.get("error", "")))


# ---------------------------------------------------------------- report
def md(header: Sequence[str], rows: Sequence[Sequence[object]], right_from: int = 1) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def f2(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def mib(x: float) -> str:
    return f"{x / MiB:.1f} MiB"


def replay_table(rows: Sequence[Replay]) -> str:
    out = []
    for r in rows:
        out.append([r.label, mib(r.per_node_bytes), mib(r.per_node_bytes * r.n / (R if r.n > 1 else 1)),
                    r.measured, f"{100 * r.hit_rate:.1f} %", r.steps, f"{100 * r.steps_fraction:.1f} %",
                    f2(pct(r.lookup_ms, 50)), f2(pct(r.lookup_ms, 99)), f2(pct(r.fetch_ms, 50)), f2(pct(r.put_ms, 50)),
                    r.puts, r.evictions, mib(r.stored_bytes), f"{r.distinct_held} / {r.copies_held}", r.errors, r.gone,
                    f"{r.gather_errors:.0f}",
                    f"{r.seconds:.0f}"])
    return md(["deployment", "max_bytes per node", "logical capacity", "measured requests", "hit rate",
               "steps saved", "of steps asked", "lookup p50 ms", "lookup p99 ms", "fetch p50 ms", "put p50 ms",
               "puts", "evictions (all nodes)", "stored at the end (all copies)", "entries / copies at the end",
               "errors", "hit gone before its fetch", "Gathers missed", "replay s"], out)


def fetch_table(rows: Sequence[FetchRow], puts: dict[str, list[float]], size: int) -> str:
    out = []
    for r in rows:
        put = puts.get(r.label, []) if r.path == "through an owner" else []
        out.append([r.label, f"{size // MiB} MiB {r.path}", len(r.mbs), f"{statistics.median(r.mbs):.0f}",
                    f"{min(r.mbs):.0f}-{max(r.mbs):.0f}", f"{r.cpu_per_fetch:.1f}",
                    f"{statistics.median(put):.0f}" if put else ""])
    return md(["deployment", "fetch", "fetches", "MB/s median", "MB/s range", "daemon CPU ms per fetch (all nodes)",
               "put MB/s median (through n0)"], out)


def cost_table(rows: Sequence[Cost]) -> str:
    out = []
    for c in rows:
        looked = bool(c.lookup_ms)
        out.append([c.label, f"{f2(pct(c.put_ms, 50))} / {f2(pct(c.put_ms, 99))}", f2(c.put_cpu_ms),
                    f"{c.put_copy_bytes / 1024:.0f} KiB" if c.put_copy_bytes == c.put_copy_bytes else "-",
                    f"{f2(pct(c.lookup_ms, 50))} / {f2(pct(c.lookup_ms, 99))}" if looked else "-",
                    f2(c.lookup_cpu_ms) if looked else "-", f2(c.fanout_ms) if looked else "-",
                    f"{f2(pct(c.gather_ms, 50))} / {f2(pct(c.gather_ms, 99))}" if looked else "-",
                    f2(c.gather_cpu_ms) if looked else "-", f"{c.idle_ms_per_s:.0f}" if looked else "-"])
    return md(["deployment", "put p50 / p99 ms", "daemon CPU ms per put", "copies sent per put",
               "lookup p50 / p99 ms", "daemon CPU ms per lookup (all nodes)", "fan-out wait ms (mean)",
               "one Gather p50 / p99 ms", "CPU ms per Gather (answering node)", "idle CPU ms/s (all nodes)"], out)


def timeline_table(fo: Failover) -> tuple[str, dict[str, float]]:
    rows, summary = [], {}
    seconds = math.ceil(fo.seconds)
    before_hits = [o.hit for o in fo.ops if o.t < fo.kill_at and o.looked]
    summary["hit_before"] = float(np.mean(before_hits)) if before_hits else float("nan")
    after_rates = []
    for s in range(seconds):
        ops = [o for o in fo.ops if s <= o.t < s + 1]
        survivors = [o for o in ops if not o.via_killed]
        killed = [o for o in ops if o.via_killed]
        looked = [o for o in ops if o.looked]
        rate = float(np.mean([o.hit for o in looked])) if looked else float("nan")
        if s >= fo.kill_at:
            after_rates.append(rate)
        events = []
        if s <= fo.kill_at < s + 1:
            events.append(f"n2 SIGKILL at {fo.kill_at:.1f} s")
        for name, at in (("survivors see n2 down", fo.detected_s), ("every entry on 2 nodes again", fo.replicated_s)):
            if at == at and s <= fo.kill_at + at < s + 1:
                events.append(f"{name} ({fo.kill_at + at:.1f} s)")
        rows.append([f"{s}-{s + 1}", len(ops), len(survivors), sum(o.error for o in survivors), len(killed),
                     sum(o.error for o in killed), sum(o.gone for o in ops),
                     f"{100 * rate:.0f} %" if rate == rate else "-",
                     f2(pct([o.lookup_ms for o in looked], 50)), f2(pct([o.lookup_ms for o in looked], 99)),
                     "; ".join(events)])
    summary["hit_after_min"] = float(np.nanmin(after_rates)) if after_rates else float("nan")
    after_hits = [o.hit for o in fo.ops if o.t >= fo.kill_at and o.looked]
    summary["hit_after"] = float(np.mean(after_hits)) if after_hits else float("nan")
    summary["survivor_errors"] = sum(o.error for o in fo.ops if not o.via_killed)
    summary["killed_errors"] = sum(o.error for o in fo.ops if o.via_killed)
    summary["gone"] = sum(o.gone for o in fo.ops)
    return md(["second", "requests", "via survivors", "errors via survivors", "via the killed node",
               "errors via the killed node", "hit gone before its fetch", "hit rate", "lookup p50 ms",
               "lookup p99 ms", "events"], rows), summary


def failover_summary(fo: Failover) -> str:
    rows = [["entries held anywhere just before the kill", fo.at_kill],
            ["of them with a copy on n2", fo.on_victim],
            ["of them only on n2 (puts and evictions in flight included)", fo.only_on_victim],
            ["of those, only on n2 in a snapshot 0.5 s earlier too (lost with it)", fo.only_on_victim_twice],
            ["n2's entries on both survivors at the end", fo.recopied],
            ["entries evicted from both survivors meanwhile", fo.evicted],
            ["repair copies sent by the survivors", mib(fo.repair_bytes)],
            ["time until both survivors see n2 down", f"{f2(fo.detected_s)} s"],
            ["time until every entry is on both survivors (or on neither)",
             f"{f2(fo.replicated_s)} s" if fo.replicated_s == fo.replicated_s else "not within the wait"],
            ["errors the killed node's worker saw before it moved to n0", fo.moved_after]]
    return md(["failover", "value"], rows)


def freeze_table(fz: Freeze) -> str:
    rows = []
    for kind in ("lookup", "fetch"):
        for name, label in (("before", "before the freeze"), ("early", "frozen, not yet seen down by both survivors"),
                            ("late", "frozen, seen down"), ("after", "after SIGCONT")):
            calls = fz.window(kind, name)
            xs = [c.ms for c in calls]
            rows.append([f"{kind}, {label}", len(xs), f2(pct(xs, 50)), f2(pct(xs, 99)),
                         f2(max(xs) if xs else float("nan")), sum(not c.ok for c in calls)])
    return md(["n2 SIGSTOPped; calls through n0 and n1 in turn", "calls", "p50 ms", "p99 ms", "max ms", "errors"],
              rows)


def model_lines(costs: dict[str, Cost], fetches: Sequence[FetchRow]) -> list[str]:
    """The scaling model's inputs as this run measured them, and what they imply (not measured here)."""
    lines = []
    one = costs.get("1 node")
    looked = [c for c in costs.values() if c.lookup_ms and c.n > 1]
    if one is not None and looked:
        c1 = one.lookup_cpu_ms
        steps = []
        for c in looked:
            m = (c.lookup_cpu_ms - c1) / (c.n - 1)
            steps.append((c.n, m))
            lines.append(f"- Lookup, {c.label}: {c.lookup_cpu_ms:.2f} ms CPU over all daemons vs {c1:.2f} ms on one "
                         f"node: {m:.2f} ms more per extra member; answering one Gather cost that member "
                         f"{c.gather_cpu_ms:.2f} ms (timed directly), so the coordinator's side of each peer call "
                         f"(stub, future, decoding, merge) cost about {m - c.gather_cpu_ms:.2f} ms. Lookup latency "
                         f"p50 {pct(c.lookup_ms, 50):.2f} ms vs {pct(one.lookup_ms, 50):.2f} ms; the wait for the "
                         f"peers averaged {c.fanout_ms:.2f} ms.")
        # c(N) = c1 + (N - 1) * m, m fitted through (1, c1) over the measured N
        m = sum((n - 1) ** 2 * x for n, x in steps) / sum((n - 1) ** 2 for n, _ in steps)
        lines.append(f"- Model: CPU per lookup c(N) = c(1) + (N - 1) * m with c(1) = {c1:.2f} ms and m = {m:.2f} ms "
                     f"(fitted to the rows above). With one core per node and lookups the only load, the cluster "
                     f"would answer at most N / c(N) lookups per second (a prediction from measured inputs, not a "
                     f"measurement):")
        for n in (1, 3, 5, 10, 20):
            per = c1 + (n - 1) * m
            lines.append(f"  - N = {n}: c = {per:.2f} ms -> {1e3 * n / per:.0f} lookups/s for the cluster, "
                         f"{1e3 / per:.0f} per node")
        if m > 0:
            lines.append(f"  - as N grows the cluster's lookup rate tends to 1 / m = {1e3 / m:.0f}/s, however many "
                         f"nodes (one core each): every member works on every lookup, so lookup capacity does not "
                         f"scale out; more nodes hold more bytes and serve more puts and fetches, not more lookups.")
    puts = {c.label: c for c in costs.values() if c.put_ms}
    r1, r2, single = puts.get("3 nodes, R = 1"), puts.get("3 nodes, R = 2"), puts.get("1 node")
    if r1 and r2 and single:
        lines.append(f"- Put of a {int(np.prod(SHAPE)) * 2 // 1024} KiB latent: {single.put_cpu_ms:.2f} ms CPU on one "
                     f"node; on 3 nodes {r1.put_cpu_ms:.2f} ms at R = 1 ({r1.put_copy_bytes / 1024:.0f} KiB sent to "
                     f"a peer per put: the coordinator is not the owner 2 times in 3) and {r2.put_cpu_ms:.2f} ms at "
                     f"R = 2 ({r2.put_copy_bytes / 1024:.0f} KiB); latency p50 {pct(single.put_ms, 50):.2f} / "
                     f"{pct(r1.put_ms, 50):.2f} / {pct(r2.put_ms, 50):.2f} ms. Each copy is stored once on "
                     f"one node, so put capacity grows as N / R of one node's, less the forwarding.")
    owner = {f.label: f for f in fetches if f.path == "through an owner"}
    for f in fetches:
        if f.path != "through a non-owner":
            continue
        w = owner[f.label]
        lines.append(f"- Fetch of a 4 MiB blob, {f.label}: {w.cpu_per_fetch:.1f} ms CPU and "
                     f"{statistics.median(w.mbs):.0f} MB/s through an owner, {f.cpu_per_fetch:.1f} ms and "
                     f"{statistics.median(f.mbs):.0f} MB/s through a non-owner (it relays the bytes from an "
                     f"owner); a client that reaches nodes at random lands on a non-owner (N - R) / N of the time.")
    return lines


@dataclass
class Refill:
    rate: int  # repair_bytes_per_second (0: unpaced)
    copies: int  # entries the replaced node owns
    nbytes: int  # their blob bytes
    rejoin_s: float  # from the kill to the new empty node serving
    refill_s: float  # from serving to holding its whole share again


def refill(root: Path, rate: int, blobs: int, size: int) -> Refill:
    """A node replaced with an empty disk (same node id) in a 3-node cluster holding `blobs` blobs of
    `size` bytes: how long until its share is back, copied by the other two's repair passes at `rate`."""
    with DaemonCluster(root / f"refill-{rate}", 3, max_bytes=4 * blobs * size, replication_factor=R,
                       repair_bytes_per_second=rate, **COMMON, **CLUSTER) as cluster:
        nodes = cluster.members
        wait_members(nodes, 3, 30.0)
        rng = np.random.default_rng(23)
        ids = []
        with client(nodes[0].target, SIDE_NS, timeout_s=10.0) as writer:
            for i in range(blobs):
                eid = writer.put_blob(f"refill {i}", rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
                                      pb.BlobInfo(codec="raw", dtype="uint8", shape=[size]), unit(rng))
                if eid is None:
                    raise RuntimeError(f"a refill put failed: {writer.last_error}")
                ids.append(eid)
        owned = nodes[1].held(ids)
        t0 = time.perf_counter()
        cluster.replace(1)
        wait_members(nodes, 3, 30.0)
        t1 = time.perf_counter()
        deadline = t1 + 600
        while nodes[1].held(ids) != owned:
            if time.perf_counter() > deadline:
                raise RuntimeError("the replaced node did not get its share back within 600 s")
            time.sleep(0.05)
        return Refill(rate, len(owned), len(owned) * size, t1 - t0, time.perf_counter() - t1)


def refill_table(rows: list[Refill]) -> str:
    return md(["repair_bytes_per_second", "copies to refill", "bytes", "kill to serving s", "refill s",
                  "MB/s", "s per GiB"],
                 [[mib(r.rate) + "/s" if r.rate else "0 (unpaced)", r.copies, mib(r.nbytes), f2(r.rejoin_s),
                   f2(r.refill_s), f"{r.nbytes / 1e6 / r.refill_s:.0f}", f"{r.refill_s * (1 << 30) / r.nbytes:.1f}"]
                  for r in rows])


def relay_table(rf: RelayFreeze) -> str:
    rows = [[f"source n{rf.source} running", len(rf.unfrozen_ms), f2(statistics.median(rf.unfrozen_ms)), "ok", ""],
            [f"source n{rf.source} SIGSTOPped halfway", 1, f2(rf.frozen_ms), "ok" if rf.ok else "failed (None)",
             rf.error.replace("|", "/")]]
    return md([f"fetch of {rf.size // MiB} MiB through n{rf.relay} (no copy)", "fetches", "ms (median)", "outcome",
               "what the client reported"], rows)


def verdict_lines(replays: Sequence[Replay], fo: Failover | None, summary: dict[str, float],
                  fz: Freeze | None, rf: RelayFreeze | None) -> list[str]:
    base = replays[0]
    lines = []
    for r in replays[1:]:
        dh = 100 * (r.hit_rate - base.hit_rate)
        ds = 100 * (r.steps_fraction - base.steps_fraction)
        lines.append(f"- {r.label} vs 1 node: hit rate {100 * r.hit_rate:.1f} % vs {100 * base.hit_rate:.1f} % "
                     f"({dh:+.1f} points), steps saved {r.steps} vs {base.steps} ({ds:+.1f} points of the steps "
                     f"asked): within a point {'met' if abs(dh) <= 1 and abs(ds) <= 1 else 'NOT met'}")
    if fo is not None:
        se = int(summary["survivor_errors"])
        lines.append(f"- failover: errors seen through the survivors {se} (target 0): "
                     f"{'met' if se == 0 else 'NOT met'}; through the killed node {int(summary['killed_errors'])} "
                     f"before its worker moved; hits gone before their fetch (evicted since the lookup) "
                     f"{int(summary['gone'])}")
        lines.append(f"- failover: hit rate {100 * summary['hit_before']:.1f} % before the kill, "
                     f"{100 * summary['hit_after']:.1f} % after it, lowest second after it "
                     f"{100 * summary['hit_after_min']:.0f} %; n2 seen "
                     f"down after {f2(fo.detected_s)} s; every "
                     f"entry on both survivors again after "
                     f"{f2(fo.replicated_s) + ' s' if fo.replicated_s == fo.replicated_s else 'more than the wait'}; "
                     f"entries lost with n2 (a single copy, there in two snapshots 0.5 s apart): "
                     f"{fo.only_on_victim_twice}")
    if fz is not None:
        before = [c.ms for c in fz.window("lookup", "before")]
        frozen = [c.ms for c in fz.window("lookup", "early") + fz.window("lookup", "late")]
        fetch_frozen = [c.ms for c in fz.window("fetch", "early") + fz.window("fetch", "late")]
        lines.append(f"- freeze: lookup p99 {f2(pct(before, 99))} ms before, {f2(pct(frozen, 99))} ms while n2 was "
                     f"stopped ({len(frozen)} lookups in {fz.seconds:.1f} s); slowest fetch while stopped "
                     f"{f2(max(fetch_frozen) if fetch_frozen else float('nan'))} ms")
    if rf is not None:
        stall_s = max(STALL_MIN_S, STALL_PEER_TIMEOUTS * float(CLUSTER["peer_timeout_seconds"]))  # type: ignore[arg-type]
        bound_ms = 1000 * (stall_s + 1.0)  # the relay's stall deadline, then the fallback through another owner
        bounded = rf.ok and rf.frozen_ms <= bound_ms
        lines.append(f"- a relayed fetch whose source froze mid-transfer took {rf.frozen_ms:.0f} ms "
                     f"({'ok' if rf.ok else 'failed'}) against {statistics.median(rf.unfrozen_ms):.0f} ms unfrozen: "
                     f"a bounded wait (the relay's {stall_s:g} s stall deadline plus 1 s for the fallback, not the "
                     f"client's transfer timeout) {'met' if bounded else 'NOT met'}"
                     + (" (the transfer ended before the freeze took hold: this run did not test the stall)"
                        if rf.frozen_ms < 3 * statistics.median(rf.unfrozen_ms) else ""))
    return lines


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a shorter trace and shorter phases")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite {DOC.relative_to(ROOT)}")
    parser.add_argument("--budget", type=float, default=0.6,
                        help="B as a fraction of the bytes of every distinct prompt of the trace")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        intents, warmup, requests = 300, 50, 250
        cost_puts, cost_lookups, blobs, reps, idle_s = 40, 100, 2, 3, 1.0
        fo_seconds, kill_at, freeze_s = 8.0, 3.0, (1.0, 2.0, 1.0)
    else:
        intents, warmup, requests = 600, 100, 500
        cost_puts, cost_lookups, blobs, reps, idle_s = 100, 300, 4, 5, 2.0
        fo_seconds, kill_at, freeze_s = 14.0, 4.0, (2.0, 3.0, 2.0)
    blob_size = 4 * MiB
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    work = build_workload(intents, warmup, requests, 0.8, args.seed)
    facts = describe(work.trace)
    distinct = work.distinct_bytes()
    budget = int(args.budget * distinct)
    print(f"trace: {facts['warmup_requests']} warm-up + {facts['measured_requests']} measured requests, "
          f"{facts['distinct_texts_requested']} distinct prompts ({mib(distinct)} stored once each); "
          f"B = {args.budget:g} x that = {mib(budget)}; embedding {work.embed_s:.0f} s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="flexcache-bench-cluster-"))
    replays: list[Replay] = []
    fetch_rows: list[FetchRow] = []
    put_mbs: dict[str, list[float]] = {}
    costs: dict[str, Cost] = {}
    fo: Failover | None = None
    fz: Freeze | None = None
    rf: RelayFreeze | None = None
    refills: list[Refill] = []
    refill_blobs = 16 if args.quick else 48
    relay_transfer_s = 5.0 if args.quick else 10.0
    deployments: list[Deployment] = []
    try:
        for n in SIZES:
            per_node = budget if n == 1 else math.ceil(budget * R / n)
            dep = Deployment(tmp, n, per_node)
            deployments.append(dep)
            t0 = time.monotonic()
            dep.start()
            print(f"{dep.label}: started in {time.monotonic() - t0:.1f} s, max_bytes {per_node} per node", flush=True)
            cost = costs[dep.label] = Cost(dep.label, n, R)
            time.sleep(0.5)
            idle = idle_cpu(dep.nodes, idle_s)  # empty
            put_cost(dep, cost_puts, cost, idle)
            rows, put_mbs[dep.label] = fetch_throughput(dep, blobs, reps, blob_size, idle)
            fetch_rows += rows
            if n == 3:
                relay_size = min(16 * MiB, int(0.8 * per_node) // MiB * MiB)
                rf = relay_freeze(dep, relay_size, relay_transfer_s)
                print(f"  relayed fetch: {statistics.median(rf.unfrozen_ms):.0f} ms, {rf.frozen_ms:.0f} ms with its "
                      f"source frozen halfway ({'ok' if rf.ok else 'failed'}; {rf.error})", flush=True)
            left = sum(node.stats().bytes for node in dep.nodes)
            result = replay(dep, work)
            replays.append(result)
            print(f"  replay: hit rate {100 * result.hit_rate:.1f} %, steps {result.steps}, {result.puts} puts "
                  f"({mib(result.put_bytes)}), {result.evictions} evictions, {result.errors} errors, "
                  f"{result.seconds:.0f} s (bytes left by the side phases: {left})", flush=True)
            idle = idle_cpu(dep.nodes, idle_s)  # holding the trace's entries
            cost.idle_ms_per_s = idle * 1e3
            lookup_cost(dep, work, cost_lookups, cost, idle)
            print(f"  lookups: p50 {pct(cost.lookup_ms, 50):.2f} ms, {cost.lookup_cpu_ms:.2f} ms CPU each; "
                  f"puts: p50 {pct(cost.put_ms, 50):.2f} ms, {cost.put_cpu_ms:.2f} ms CPU each", flush=True)
            if n == 3:
                fz = freeze(dep, work, *freeze_s, victim=2, known=result.ids)
                print(f"  freeze: n2 stopped {fz.seconds:.1f} s, seen down after {f2(fz.detected_s)} s; "
                      f"settled {f2(fz.settle_s)} s after rejoining", flush=True)
                fo = failover(dep, work, fo_seconds, kill_at, 2, result.ids, wait_s=30.0)
                print(f"  failover: seen down after {f2(fo.detected_s)} s, fully replicated after "
                      f"{f2(fo.replicated_s)} s", flush=True)
            dep.close()
            if n == 3:
                r1 = Deployment(tmp, 3, per_node, replicas=1)
                deployments.append(r1)
                r1.start()
                costs[r1.label] = Cost(r1.label, 3, 1)
                time.sleep(0.5)
                put_cost(r1, cost_puts, costs[r1.label], idle_cpu(r1.nodes, idle_s))
                print(f"{r1.label}: puts p50 {pct(costs[r1.label].put_ms, 50):.2f} ms, "
                      f"{costs[r1.label].put_cpu_ms:.2f} ms CPU each", flush=True)
                r1.close()
        for rate in (64 * MiB, 0):  # the default pace, and none
            refills.append(refill(tmp, rate, refill_blobs, 4 * MiB))
            print(f"refill at {mib(rate) if rate else 'no pace'}: {mib(refills[-1].nbytes)} in "
                  f"{refills[-1].refill_s:.1f} s after the new node served", flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping the daemons", file=sys.stderr)
        return 130
    finally:
        for dep in deployments:
            with contextlib.suppress(Exception):
                dep.close()
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    command = ".venv/bin/python -m bench.bench_cluster" + (" --quick" if args.quick else "") + \
        (f" --budget {args.budget:g}" if args.budget != 0.6 else "")
    order = ["1 node", "3 nodes, R = 1", "3 nodes, R = 2", "5 nodes, R = 2"]
    cost_rows = [costs[k] for k in order if k in costs]
    timeline, summary = timeline_table(fo) if fo is not None else ("", {})
    settings = ", ".join(f"{k} {v}" for k, v in CLUSTER.items())
    sections = [
        f"Trace: {trace_line(work, facts)}. Latents {SHAPE} float16, raw ({int(np.prod(SHAPE)) * 2 // 1024} KiB). "
        f"Every distinct prompt stored once would take {mib(distinct)}; B = {args.budget:g} x that = {mib(budget)}. "
        f"One node: max_bytes = B; N nodes with replication_factor R = {R}: max_bytes = B * R / N each, so that "
        f"N * max_bytes / R = B distinct entries fit in every deployment. Cluster settings: {settings} "
        f"(the rest default).",
        "**Part 1: the same trace, the same logical budget** (replayed sequentially, request i through node "
        "i mod N; hit rate, steps and lookup latency over the measured requests; errors: a None from the client, "
        "but for a hit's fetch answered NOT_FOUND, counted apart: evicted since its lookup)",
        replay_table(replays),
        f"**Part 1: fetch throughput** ({blobs} blobs of {blob_size // MiB} MiB put through n0, each fetched {reps} "
        f"times per path with the client's default path, FetchDirect and the data port; MB = 10^6 bytes)",
        fetch_table(fetch_rows, put_mbs, blob_size),
    ]
    if fo is not None and fz is not None:
        sections += [
            f"**Part 2: failover on 3 nodes** (one worker per node replays the trace again on the warm cluster; "
            f"n2 SIGKILLed at {fo.kill_at:g} s; workers ran {fo.seconds:g} s; client timeout 2 s)",
            timeline, failover_summary(fo),
            f"**Part 2: a frozen node** (before the failover, on the same cluster: one worker looks up the trace's "
            f"vectors through n0 and n1 in turn and fetches the hits; n2 SIGSTOPped for {fz.seconds:.1f} s, both "
            f"survivors saw it down after {f2(fz.detected_s)} s; after SIGCONT all three saw 3 serving again within "
            f"{f2(fz.rejoin_s)} s and every entry was on 2 nodes or none {f2(fz.settle_s)} s later; client timeout "
            f"10 s, transfer timeout 30 s; errors: a None from the client, a fetch answered NOT_FOUND not counted)",
            freeze_table(fz),
        ]
    if rf is not None:
        sections += [
            f"**Part 2: the source of a relayed fetch frozen mid-transfer** (on the empty 3-node cluster, before the "
            f"replay: a {rf.size // MiB} MiB blob put through n0, fetched through n{rf.relay}, which holds no copy "
            f"and relays it from n{rf.source}, the first owner in placement order; n{rf.source} SIGSTOPped halfway "
            f"through the transfer, SIGCONT once the fetch returned (all three saw 3 serving {rf.rejoin_s:.1f} s "
            f"later); the client's default path (FetchDirect + data port), transfer timeout {relay_transfer_s:g} s)",
            relay_table(rf),
        ]
    if refills:
        sections += [
            f"**Part 2: a node replaced with an empty disk** (a fresh 3-node cluster, R = {R}, {refill_blobs} blobs of "
            f"4 MiB put through n0; n1 SIGKILLed, its data folder emptied, started again with the same node id; "
            f"the other two's repair passes copy its share back, paced at repair_bytes_per_second; refill s: from "
            f"the new node serving to its holding every entry it owns; s per GiB: refill s over the bytes it owns)",
            refill_table(refills),
        ]
    sections += [
        f"**Part 3: the scaling model's inputs** ({cost_puts} puts of a {int(np.prod(SHAPE)) * 2 // 1024} KiB "
        f"latent into an empty deployment, round-robin; {cost_lookups} lookups of the trace's vectors on the "
        f"replayed deployment, round-robin; {cost_lookups} Gathers sent to n0 directly; CPU from /proc, every daemon "
        f"of the deployment summed, less the idle deployment's CPU over as long (probes, repair passes: the last "
        f"column, measured holding the trace's entries))",
        cost_table(cost_rows),
        "\n".join(model_lines(costs, fetch_rows)),
    ]
    checks = "\n".join(verdict_lines(replays, fo, summary, fz, rf))
    report = "\n\n".join(sections)
    print("\n" + report + "\n\nVerdicts:\n\n" + checks + f"\n\n({elapsed:.0f} s)\ncommand: {command}")
    if not args.no_doc:
        replace_results(DOC, "Cluster benchmark", [
            f"Command: `{command}`  ",
            f"Date: {started:%Y-%m-%d %H:%M %Z}, {elapsed:.0f} s wall  ",
            f"Machine: {machine_note()}",
            "",
            report,
            "",
            "Verdicts, checked against this run:",
            "",
            checks,
        ])
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


def trace_line(work: Workload, facts: dict[str, float]) -> str:
    return (f"{work.trace.label} over {facts['intents_in_pool']} intents of the prompt suites (bench/traces.py), "
            f"{facts['warmup_requests']} warm-up + {facts['measured_requests']} measured requests, "
            f"{facts['distinct_texts_requested']} distinct prompts, seed {work.trace.seed}; MiniLM embeddings")


if __name__ == "__main__":
    sys.exit(main())
