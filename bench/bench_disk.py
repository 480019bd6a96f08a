"""The data folder's bound under churn, at several budgets: does it stay within 1.5 x max_bytes plus a
fixed few tens of MiB (issue 16, item 3) as the budget grows?

Run:  .venv/bin/python -m bench.bench_disk [--budgets 64,256,1024] [--turnovers 12] [--policies utility,lru]

For each policy and budget (MiB), a fresh daemon (flexcache.daemon.process, through bench.launch) takes
puts from 8 writer threads, each a CacheClient putting random blobs of 256 KiB to 2 MiB (unique bytes,
so no put is deduplicated) until the bytes put reach `--turnovers` times the budget. The data folder's
allocated bytes (store and index, `st_blocks`) are sampled every 100 ms while the puts run. Printed per
cell: the peak, the peak over max_bytes, the peak's excess over 1.5 x max_bytes, and the bound the
store states for that budget (`Tuning.disk_bound`: 1.5 x max_bytes, four memtables, 16 MiB and the
ballast). Puts slow down near the bound on purpose (they wait for compaction); the put rate is printed
so that a bound kept by stalling shows.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np

from bench.launch import daemon as launch_daemon
from flexcache.client import CacheClient, Namespace
from flexcache.daemon.store import DISK_FACTOR, MIB, Tuning, folder_bytes

NS = Namespace(tenant="bench", model="disk", width=64, height=64, frames=8, scheduler="flow", total_steps=50)
WRITERS = 8


@dataclass
class Cell:
    policy: str
    max_bytes: int
    puts: int
    put_bytes: int
    seconds: float
    peak: int
    failures: int
    stated_bound: int

    @property
    def excess_mib(self) -> float:
        return (self.peak - DISK_FACTOR * self.max_bytes) / MIB


def churn(policy: str, max_bytes: int, turnovers: float, time_limit_s: float) -> Cell:
    """One cell: a fresh daemon, WRITERS writers until `turnovers` x max_bytes were put (or the limit)."""
    with launch_daemon(max_bytes=max_bytes, eviction_policy=policy, scrub_bytes_per_second=0) as d:
        stop = threading.Event()
        lock = threading.Lock()
        totals = {"puts": 0, "bytes": 0, "failures": 0}
        target = turnovers * max_bytes

        def writer(w: int) -> None:
            rng = np.random.default_rng(w)
            pool = rng.integers(0, 255, 2 * MIB, dtype=np.uint8)
            with CacheClient(d.target, NS, timeout_s=60.0, transfer_timeout_s=120.0, warn_every_s=1e9) as c:
                i = 0
                while not stop.is_set():
                    size = int(rng.integers(256, 2048)) * 1024
                    data = pool[:size].copy()
                    data[:8] = np.frombuffer(np.int64(w * 10**9 + i).tobytes(), np.uint8)  # unique content
                    vector = rng.standard_normal(384).astype(np.float32)
                    ok = c.put(f"writer {w} prompt {i}", data, vector / np.linalg.norm(vector)) is not None
                    with lock:
                        totals["puts"] += 1
                        totals["bytes"] += size
                        totals["failures"] += not ok
                        if totals["bytes"] >= target:
                            stop.set()
                    i += 1

        threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        peak = 0
        while not stop.is_set() and time.monotonic() - start < time_limit_s:
            peak = max(peak, folder_bytes(d.data_dir))
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(120)
        seconds = time.monotonic() - start
        peak = max(peak, folder_bytes(d.data_dir))
        disk = shutil.disk_usage(d.data_dir).total
        return Cell(policy, max_bytes, totals["puts"], totals["bytes"], seconds, peak, totals["failures"],
                    Tuning.for_budget(max_bytes, disk).disk_bound)


def table(cells: list[Cell]) -> str:
    lines = ["| policy | max_bytes MiB | puts | turnovers | put MB/s | peak MiB | peak / max_bytes "
             "| peak - 1.5 x max_bytes, MiB | stated bound MiB | failed puts |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c.policy} | {c.max_bytes // MIB} | {c.puts} | {c.put_bytes / c.max_bytes:.1f} "
                     f"| {c.put_bytes / c.seconds / 1e6:.0f} | {c.peak / MIB:.0f} | {c.peak / c.max_bytes:.2f} "
                     f"| {c.excess_mib:+.0f} | {c.stated_bound / MIB:.0f} | {c.failures} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="64,256,1024", help="max_bytes values in MiB, comma-separated")
    ap.add_argument("--turnovers", type=float, default=12.0, help="bytes put per cell, in budgets")
    ap.add_argument("--policies", default="utility,lru")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per cell at most")
    args = ap.parse_args(argv)
    cells = []
    for policy in args.policies.split(","):
        for mib in (int(b) for b in args.budgets.split(",")):
            cell = churn(policy, mib * MIB, args.turnovers, args.time_limit)
            print(f"  {policy} {mib} MiB: {cell.puts} puts in {cell.seconds:.0f} s, peak {cell.peak / MIB:.0f} MiB "
                  f"({cell.peak / cell.max_bytes:.2f}x, {cell.excess_mib:+.0f} MiB over 1.5x)", flush=True)
            cells.append(cell)
    print()
    print(table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
