"""Run a request trace through several worker processes against one daemon.

Arrival model (stated, because throughput depends on it): closed loop with a backlog. Every worker
takes the next request from one shared queue as soon as it finishes the previous one, the way a
serving fleet with a queue of pending jobs runs; throughput is the fleet's capacity, and a request's
latency is its service time (embed, cache, sampling, decode, store) without queueing.

The warm-up requests run first and the fleet waits until all of them are done and stored (a worker
stores on a background thread; a warm-up result is reported only after that store has landed), so the
measured phase starts from a filled cache and its clock excludes process start-up and model loading.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from .modes import MODES
from .worker import Job, Outcome

__all__ = ["FleetRun", "run_fleet"]

_STARTUP_TIMEOUT_S = 300.0


@dataclass
class FleetRun:
    mode: str
    workers: int
    warmup: list[Outcome]
    measured: list[Outcome]
    measured_wall_s: float  # first measured request handed out -> last one finished


def _serve(mode_name: str, target: str | None, steps: int, schedule: str, threads: int, shadow: float,
           timeout_s: float, seed: int, jobs: mp.Queue, results: mp.Queue) -> None:
    """A worker process: load the model once, then serve `(job, flush)` pairs until a None arrives;
    with `flush` the result is reported only once the job's store has landed. `shadow`: the fraction
    of hits also generated from scratch for the daemon's quality guard (scored by the probe)."""
    import torch

    from flexcache.client.shadow import Shadow
    from flexcache_model.reference.calibration import ProbeScorer
    from flexcache_model.reference.pipeline import load_pipeline

    from .worker import DiffusionWorker

    torch.set_num_threads(threads)
    try:
        pipeline = load_pipeline(schedule)
        guard = (Shadow(shadow, seed=seed), ProbeScorer()) if shadow else (None, None)
        worker = DiffusionWorker.connect(pipeline, MODES[mode_name], target, steps, *guard, timeout_s=timeout_s)
        pipeline.embed(["warm up the text encoder"])
    except Exception:  # reported to the parent, which raises
        results.put(("error", traceback.format_exc()))
        return
    results.put(("ready", None))
    try:
        while (item := jobs.get()) is not None:
            job, flush = item
            try:
                outcome = worker.run(job)
                if flush:
                    worker.flush()
                results.put(("done", outcome))
            except Exception:  # a bug in the worker: the parent raises it
                results.put(("error", traceback.format_exc()))
    finally:
        worker.close()


def _wait_ready(results: mp.Queue, procs: Sequence[mp.Process]) -> None:
    ready = 0
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while ready < len(procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {_STARTUP_TIMEOUT_S:.0f} s")
        try:
            kind, payload = results.get(timeout=1.0)
        except queue.Empty:
            if dead := [p.name for p in procs if not p.is_alive()]:
                raise RuntimeError(f"worker processes exited while starting: {', '.join(dead)}") from None
            continue
        if kind == "error":
            raise RuntimeError(f"worker failed to start:\n{payload}")
        ready += 1


def _collect(results: mp.Queue, count: int, procs: Sequence[mp.Process], progress) -> list[Outcome]:
    out: list[Outcome] = []
    while len(out) < count:
        try:
            kind, payload = results.get(timeout=5.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("every worker process exited before the trace was done") from None
            continue
        if kind == "error":
            raise RuntimeError(f"worker failed:\n{payload}")
        out.append(payload)
        if progress is not None:
            progress.update(1)
    return sorted(out, key=lambda o: o.index)


def run_fleet(mode: str, target: str | None, jobs: Sequence[Job], warmup: int, workers: int = 2, *,
              steps: int = 50, schedule: str = "flow", threads_per_worker: int = 1,
              progress: bool = True, shadow_fraction: float = 0.0, timeout_s: float = 1.0) -> FleetRun:
    """Serve `jobs[:warmup]`, wait for them, then serve and time `jobs[warmup:]`. With `shadow_fraction`,
    that share of hits is also generated from scratch and reported to the daemon's quality guard.
    `timeout_s`: each worker's client deadline (DiffusionWorker.connect)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch or gRPC state
    job_q: mp.Queue = ctx.Queue()
    result_q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(mode, target, steps, schedule, threads_per_worker, shadow_fraction,
                                              timeout_s, i, job_q, result_q),
                         name=f"flexcache-worker-{i}", daemon=True) for i in range(workers)]
    bar = None
    for p in procs:
        p.start()
    try:
        _wait_ready(result_q, procs)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc=f"{mode:>15}", unit="video", leave=False)
        for job in jobs[:warmup]:
            job_q.put((job, True))
        warm = _collect(result_q, min(warmup, len(jobs)), procs, bar)
        t0 = time.perf_counter()
        for job in jobs[warmup:]:
            job_q.put((job, False))
        measured = _collect(result_q, len(jobs) - len(warm), procs, bar)
        wall = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        for _ in procs:
            job_q.put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return FleetRun(mode, workers, warm, measured, wall)
