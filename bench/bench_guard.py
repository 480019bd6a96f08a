"""The online quality guard on the reference model: from NIRVANA's table to a loss within budget.

Run:  .venv/bin/python -m bench.bench_guard [--requests 1200] [--shadow 0.2] [--quick]

A daemon starts on its default flags (NIRVANA's similarity -> steps table, which with MiniLM on the
reference world's prompts grants nearly every request and costs several points of fidelity: see
docs/bench_serving.md) with `guard_max_loss` set to the budget. Two FlexCache-mode workers serve a
Zipf trace (s = 0.8, 300 intents of the vendored suites, seed 3, grounded as the serving benchmark
grounds its own); a `--shadow` fraction of their hits is also generated from scratch, scored with the
probe, and reported (ReportQuality). The same trace runs a second time with the guard off and no
shadows, the control.

Afterwards every request is also generated from scratch in this process (same prompt, same seed), so
each served video's loss is known, not only the shadowed ones': per window of `--window` requests the
table reports the hit rate, mean K, steps saved and mean loss ± 95 % CI, for both runs side by side.
Converged: the first window from which every later window's mean loss is within the budget. The shadow
cost is the extra denoising steps the shadow samples ran, against the steps the fleet ran for requests.

Writes docs/bench_guard.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.bench_serving import build_workload
from bench.launch import daemon
from bench.report import ci95
from flexcache.client import CacheClient
from flexcache_model.reference.calibration import ProbeScorer
from flexcache_model.reference.pipeline import load_pipeline
from flexcache_model.reference.worker.fleet import run_fleet
from flexcache_model.reference.worker.worker import namespace_for

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50


def serve(jobs: list, shadow: float, guard: dict[str, object]) -> tuple[list, object, float]:
    with daemon(**guard) as d:
        t0 = time.perf_counter()
        run = run_fleet("flexcache", d.target, jobs, 0, 2, steps=STEPS, progress=False, shadow_fraction=shadow)
        wall = time.perf_counter() - t0
        with CacheClient(d.target, namespace_for(load_pipeline("flow"), STEPS), timeout_s=10.0) as client:
            tables = client.step_tables()
    return run.measured, tables, wall


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--shadow", type=float, default=0.2, help="fraction of hits also generated from scratch")
    ap.add_argument("--max-loss", type=float, default=1.0)
    ap.add_argument("--min-samples", type=int, default=20)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="300 requests: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bench_guard.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = 300
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    jobs = build_workload(300, 0, args.requests, 0.8, 3).jobs
    guard = {"guard_max_loss": args.max_loss, "guard_min_samples": args.min_samples,
             "guard_confidence": args.confidence}
    print("serving with the guard ...", flush=True)
    guarded, tables, wall_g = serve(jobs, args.shadow, guard)
    print("serving without it ...", flush=True)
    control, _, wall_c = serve(jobs, 0.0, {})

    print("generating every request from scratch ...", flush=True)
    pipe, scorer = load_pipeline("flow"), ProbeScorer()
    prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
    scratch = np.concatenate([scorer.score_batch(prompts[i:i + 64], pipe.decode(
        pipe.sample_batch(prompts[i:i + 64], seeds[i:i + 64], STEPS)).numpy()) for i in range(0, len(jobs), 64)])

    def losses(outcomes: list) -> np.ndarray:
        x0 = torch.from_numpy(np.stack([o.x0 for o in outcomes]))
        served = np.concatenate([scorer.score_batch(prompts[i:i + 64], pipe.decode(x0[i:i + 64]).numpy())
                                 for i in range(0, len(outcomes), 64)])
        return scratch - served

    lg, lc = losses(guarded), losses(control)
    rows = ["| requests | guard: hit rate | mean K on hits | steps saved | loss ± 95 % CI | shadow samples | "
            "no guard: hit rate | mean K on hits | steps saved | loss ± 95 % CI |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    within = []
    for a in range(0, len(jobs), args.window):
        b = min(len(jobs), a + args.window)
        cells = []
        for outcomes, loss in ((guarded, lg), (control, lc)):
            part = outcomes[a:b]
            ks = np.array([o.start_step for o in part])
            hits = ks > 0
            cells.append(f"{hits.mean():.0%} | {ks[hits].mean() if hits.any() else 0:.1f} | "
                         f"{ks.sum() / (len(part) * STEPS):.1%} | {loss[a:b].mean():+.2f} ± {ci95(loss[a:b]):.2f}")
            if outcomes is guarded:
                shadows = sum(o.shadow_loss is not None for o in part)
                cells[-1] += f" | {shadows}"
        within.append(lg[a:b].mean() <= args.max_loss)
        rows.append(f"| {a + 1}-{b} | {cells[0]} | {cells[1]} |")
    converged = next((i for i in range(len(within)) if all(within[i:])), None)
    converged_text = ("never, within this trace" if converged is None else
                      f"from request {converged * args.window + 1} on (every later window within the budget)")
    shadowed = [o for o in guarded if o.shadow_loss is not None]
    shadow_steps = len(shadowed) * STEPS
    served_steps = sum(o.steps_run for o in guarded)
    after = slice(converged * args.window, None) if converged is not None else slice(len(jobs), None)
    def whole(outcomes: list, loss: np.ndarray, sl: slice) -> str:
        ks = np.array([o.start_step for o in outcomes[sl]])
        if not len(ks):
            return "-"
        return (f"hit rate {(ks > 0).mean():.0%}, steps saved {ks.sum() / (len(ks) * STEPS):.1%}, "
                f"loss {loss[sl].mean():+.2f} ± {ci95(loss[sl]):.2f}")
    final = "" if tables is None else "; ".join(
        f"{name} {list(getattr(tables, name))}" for name in ("whole", "composed", "partial_object"))
    doc = "\n".join([
        "# The online quality guard on the reference model",
        "",
        f"Command: `.venv/bin/python -m bench.bench_guard --requests {args.requests} --shadow {args.shadow} "
        f"--min-samples {args.min_samples} --confidence {args.confidence}` ({(time.perf_counter() - t0) / 60:.0f} "
        f"min, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, shared 2-core machine).",
        "",
        (__doc__ or "").split("\n\n", 1)[1].split("\n\nWrites")[0],
        "",
        f"Guard settings: guard_max_loss {args.max_loss}, guard_min_samples {args.min_samples}, guard_confidence "
        f"{args.confidence}, guard_step_fraction at its default.",
        "",
        "\n".join(rows),
        "",
        f"- Converged: {converged_text}.",
        f"- After that point, with the guard: {whole(guarded, lg, after)}; without: {whole(control, lc, after)}.",
        f"- Whole run, with the guard: {whole(guarded, lg, slice(None))}; without: "
        f"{whole(control, lc, slice(None))}.",
        f"- Shadow samples: {len(shadowed)} ({len(shadowed) / max(1, sum(o.start_step > 0 for o in guarded)):.0%} "
        f"of hits), {shadow_steps} denoising steps, {shadow_steps / served_steps:.0%} on top of the "
        f"{served_steps} steps the requests ran; {sum(o.shadow_s for o in shadowed):.0f} s of worker time "
        f"against {sum(o.latency_s for o in guarded):.0f} s serving (wall {wall_g:.0f} s with the guard, "
        f"{wall_c:.0f} s without).",
        f"- Guard changes: {tables.guard_changes if tables else '?'}; the tables at the end: {final}.",
        "",
    ])
    args.out.write_text(doc)
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
