"""Calibrated step tables on the reference model: fit on one prompt set, check on held-out prompts.

Run:  .venv/bin/python -m bench.bench_calibrate [--calibrate 500] [--heldout 300] [--quick]

1. Calibration set: `--calibrate` requests of a Zipf (s = 0.8) trace over 300 intents of the vendored
   suites (seed 1), grounded to the reference world as the serving benchmark grounds its own (seed 0),
   so it holds repeats, rewordings and related prompts as a serving trace does. `flexcache-model
   calibrate` measures it and fits the tables (budget `--max-loss`, upper bound at `--confidence`).
2. Held-out set: `--heldout` intents of another sample (seed 2), each asked twice (a paraphrase drawn
   at random each time, so some twice in the same words), grounded the same way. Each request is generated from
   scratch, then started from its most similar other request of the set (its whole-prompt donor) at the
   K each table grants; a request the whole-prompt table does not serve is tried with the composed
   table (best object and background donors, the client's pair rule) and then with the object-only
   partial table. Loss: score from scratch minus score from the start, paired, in probe fidelity points.
   Tables compared: the calibrated ones; NIRVANA's (the daemon's default flags: composed hits capped at
   0.1 N); and the serving benchmark's hand-built any-k table.

Prints per table and tier: requests served, mean K, mean loss ± 95 % CI; and per table the steps saved,
the loss over all served requests, and the share of whole-prompt misses that composed or partial hits
serve. Writes docs/bench_calibrate.md, docs/img/calibration.png and bench/calibrated_tables.json (the
tables the serving benchmark's "measured" cells install).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.bench_serving import TABLES as SERVING_TABLES
from bench.bench_serving import build_workload
from bench.traces import build_trace, load_intents, sample_intents
from flexcache.client import masks
from flexcache.client.calibration.fit import standard_error
from flexcache.client.calibration.measure import best_pair, start_latent
from flexcache.client.calibration.sampler import score_all
from flexcache.client.prompt_split import split_prompt
from flexcache.client.tables import StepTables
from flexcache.daemon.config import NIRVANA_THRESHOLDS, parse_thresholds
from flexcache.daemon.steps import Tables
from flexcache_model.reference import cli
from flexcache_model.reference.calibration import ProbeScorer, ReferenceSampler
from flexcache_model.reference.grounding import Grounder

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
COMPOSED_CAP = 0.1  # the daemon's default composed_max_fraction


def flag_tables(thresholds: str, cap: float = COMPOSED_CAP) -> StepTables:
    """The tables a daemon derives from its flags (docs/step_tables.md): composed and partial from the
    whole table, capped."""
    t = Tables.from_whole(parse_thresholds(thresholds), cap)
    return StepTables(t.whole, t.composed, t.partial_object, t.partial_background)


def trace_prompts(requests: int, seed: int) -> list[str]:
    return [j.prompt for j in build_workload(300, 0, requests, 0.8, seed).jobs]


def twice_each(intents: int, seed: int) -> list[str]:
    """Every intent of a seeded sample asked twice, in a random paraphrase each time (grounded as the
    serving benchmark grounds its trace): a flat set, where no popular prompt dominates a tier."""
    trace = build_trace(sample_intents(load_intents(), intents, seed), 0, 0, 0.0, seed)
    grounder, rng = Grounder(), np.random.default_rng([seed, 7])
    out = []
    for i, intent in enumerate(trace.intents):
        spec = grounder.spec(intent.paraphrases[0])
        out += [Grounder.caption(spec, i * 16 + int(rng.integers(len(intent.paraphrases)))) for _ in range(2)]
    return out


class Evaluation:
    """The held-out set generated once from scratch, with each request's donors (module docstring)."""

    def __init__(self, sampler: ReferenceSampler, scorer: ProbeScorer, prompts: list[str], batch: int = 64):
        self.sampler, self.scorer, self.prompts, self.batch = sampler, scorer, prompts, batch
        n = len(prompts)
        self.seeds = [2_000_000 + i for i in range(n)]
        made = [sampler.generate(prompts[i:i + batch], self.seeds[i:i + batch]) for i in range(0, n, batch)]
        self.x0 = np.concatenate([m.x0 for m in made])
        self.scratch = np.concatenate([score_all(scorer, prompts[i * batch:(i + 1) * batch], m.videos)
                                       for i, m in enumerate(made)])
        self.masks = [masks.estimate_object_mask(x) for x in self.x0]
        full = sampler.embed(prompts)
        splits = [split_prompt(p) for p in prompts]
        self.has_parts = np.array([bool(s.object and s.background) for s in splits])
        part = {}
        for role in ("object", "background"):
            texts = [getattr(s, role) or p for s, p in zip(splits, prompts, strict=True)]
            part[role] = sampler.embed(texts)
        eye = np.eye(n, dtype=bool)
        self.full_sim = np.where(eye, -np.inf, full @ full.T)
        self.obj_sim = np.where(eye, -np.inf, part["object"] @ part["object"].T)
        self.bg_sim = np.where(eye, -np.inf, part["background"] @ part["background"].T)
        self.cache: dict[tuple, float] = {}  # (kind, request, donors, k) -> loss: tables share starts

    def plan(self, tables: StepTables) -> list[tuple[str, int, tuple[int, ...], int, float]]:
        """(kind, request, donors, K, similarity) of every request the tables serve."""
        out = []
        for q in range(len(self.prompts)):
            j = int(np.argmax(self.full_sim[q]))
            k = tables.grant(float(self.full_sim[q, j]), STEPS)
            if k:
                out.append(("whole", q, (j,), k, float(self.full_sim[q, j])))
                continue
            if not self.has_parts[q]:
                continue
            pair = best_pair(self.obj_sim[q], self.bg_sim[q], self.masks)
            if pair is not None:
                o, b = pair
                k = tables.composed_grant(float(self.obj_sim[q, o]), float(self.bg_sim[q, b]), STEPS)
                if k:
                    out.append(("composed", q, (o, b), k, float(self.obj_sim[q, o])))
                    continue
            o = int(np.argsort(-self.obj_sim[q])[0])
            k = tables.grant(float(self.obj_sim[q, o]), STEPS, "partial_object")
            if k:
                out.append(("partial_object", q, (o,), k, float(self.obj_sim[q, o])))
        return out

    def losses(self, plan: list[tuple[str, int, tuple[int, ...], int, float]]) -> np.ndarray:
        todo = [p for p in plan if p[:4] not in self.cache]
        for k in sorted({p[3] for p in todo}):
            group = [p for p in todo if p[3] == k]
            for i in range(0, len(group), self.batch):
                part = group[i:i + self.batch]
                starts = np.stack([start_latent(self.sampler, p[0], self.x0, self.masks, p[2], self.seeds[p[1]], k)
                                   for p in part]).astype(np.float32)
                prompts = [self.prompts[p[1]] for p in part]
                made = self.sampler.resume(prompts, [self.seeds[p[1]] for p in part], starts, k)
                for p, s in zip(part, score_all(self.scorer, prompts, made.videos), strict=True):
                    self.cache[p[:4]] = float(self.scratch[p[1]] - s)
        return np.array([self.cache[p[:4]] for p in plan])


def _ci(x: np.ndarray, clusters: Sequence[str] | None = None) -> str:
    """mean ± 95 % CI, clustered by prompt text when `clusters` is given (fit.standard_error)."""
    if len(x) < 2:
        return f"{x.mean():+.2f}" if len(x) else "-"
    half = 1.96 * standard_error(x, None if clusters is None else np.asarray(clusters))
    return f"{x.mean():+.2f} ± {half:.2f}"


def tier_of(tables: StepTables, kind: str, similarity: float) -> str:
    tiers = tables.whole if kind == "whole" else tables.partial_object if kind == "partial_object" else None
    if tiers is None:
        return "composed"
    return f">= {next(s for s, f in tiers if similarity >= s):.3g}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", type=int, default=500)
    ap.add_argument("--heldout", type=int, default=300, help="intents, each asked twice")
    ap.add_argument("--refit", action="store_true", help="reuse the workdir's trials.jsonl: evaluate only")
    ap.add_argument("--max-loss", type=float, default=1.0)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--quick", action="store_true", help="100 + 60 requests, a coarse K grid: minutes")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bench_calibrate.md")
    ap.add_argument("--workdir", type=Path, default=ROOT / "calibration_out")
    args = ap.parse_args(argv)
    if args.quick:
        args.calibrate, args.heldout = 100, 60
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cal_file = args.workdir / "calibration_prompts.txt"
    cal_file.write_text("\n".join(trace_prompts(args.calibrate, 1)) + "\n")
    command = ["calibrate", "--prompts", str(cal_file), "--max-loss", str(args.max_loss),
               "--confidence", str(args.confidence), "--out", str(args.workdir),
               "--whole-ks", "0.2,0.5,0.7,0.9", "--part-ks", "0.1,0.2"]
    if args.refit:
        command = ["calibrate", "--trials", str(args.workdir / "trials.jsonl"), *command[3:]]
    code = cli.main(command)
    if code:
        return code
    if not args.quick:  # what the serving benchmark's "measured" table installs
        (ROOT / "bench/calibrated_tables.json").write_text((args.workdir / "tables.json").read_text())
    calibrated = StepTables.from_json(json.loads((args.workdir / "tables.json").read_text()))
    t_cal = time.perf_counter() - t0

    print(f"held-out set: {args.heldout} intents, twice each, generating ...", flush=True)
    ev = Evaluation(ReferenceSampler(total_steps=STEPS), ProbeScorer(), twice_each(args.heldout, 2))
    candidates = {"calibrated": calibrated, "nirvana": flag_tables(NIRVANA_THRESHOLDS),
                  "any-k": flag_tables(SERVING_TABLES["any-k"])}
    tier_rows = ["| tables | served as | tier | requests | mean K | loss (points) ± 95 % CI | within budget |",
                 "|---|---|---|---:|---:|---:|---|"]
    summary = ["| tables | requests served | steps saved | loss over served ± 95 % CI | whole-prompt misses "
               "served by composed or partial hits | their loss |", "|---|---:|---:|---:|---:|---:|"]
    n = len(ev.prompts)
    for name, tables in candidates.items():
        plan = ev.plan(tables)
        losses = ev.losses(plan)
        kinds = np.array([p[0] for p in plan])
        ks = np.array([p[3] for p in plan])
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(plan):
            groups.setdefault((p[0], tier_of(tables, p[0], p[4])), []).append(i)
        for (kind, tier), idx in sorted(groups.items()):
            x = losses[idx]
            verdict = "yes" if x.mean() <= args.max_loss else "NO"
            texts = [ev.prompts[plan[i][1]] for i in idx]
            tier_rows.append(f"| {name} | {kind} | {tier} | {len(idx)} | {ks[idx].mean():.1f} | {_ci(x, texts)} | "
                             f"{verdict} |")
        whole_misses = n - int((kinds == "whole").sum())
        parts = kinds != "whole"
        share = f"{parts.sum() / whole_misses:.0%} ({parts.sum()} of {whole_misses})" if whole_misses else "-"
        texts = np.array([ev.prompts[p[1]] for p in plan])
        summary.append(f"| {name} | {len(plan)} of {n} | {ks.sum() / (n * STEPS):.1%} | {_ci(losses, texts)} | "
                       f"{share} | {_ci(losses[parts], texts[parts])} |")
    report = (args.workdir / "calibration.md").read_text().split("\n", 2)[2]
    png = ROOT / "docs/img/calibration.png"
    if (args.workdir / "calibration.png").exists():
        png.write_bytes((args.workdir / "calibration.png").read_bytes())
    doc = "\n".join([
        "# Calibrated step tables on the reference model",
        "",
        f"Command: `.venv/bin/python -m bench.bench_calibrate --calibrate {args.calibrate} --heldout {args.heldout}"
        f"{' --quick' if args.quick else ''}{' --refit' if args.refit else ''}` "
        f"({(time.perf_counter() - t0) / 60:.0f} min, calibration "
        f"{t_cal / 60:.0f} min, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, shared 2-core machine).",
        "",
        (__doc__ or "").split("\n\n", 1)[1].split("\n\nPrints")[0],
        "",
        "## Held-out evaluation",
        "",
        "\n".join(summary),
        "",
        "\n".join(tier_rows),
        "",
        f"Held-out: {n} requests ({len(set(ev.prompts))} distinct prompts), score from scratch "
        f"{ev.scratch.mean():.1f} points on average. A tier is within budget when its mean loss is at most "
        f"{args.max_loss:g} point(s); the CI (95 %, clustered by prompt text) says how sure that is.",
        "",
        "## What calibration measured (calibration set)",
        "",
        "![calibration](img/calibration.png)",
        "",
        report,
    ])
    args.out.write_text(doc)
    print(doc)
    if math.isnan(ev.scratch.mean()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
