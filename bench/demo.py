"""`make demo`: a daemon, two diffusion workers, a short real-suite trace, a table and GIFs to look at.

Starts `flexcache serve` on its embedded defaults (RocksDB + Qdrant Edge in a temporary folder, a
free loopback port) with this namespace's steps table (bench_serving's any-K table: NIRVANA's CLIP
thresholds are far too loose for MiniLM on the reference world), serves the same short trace with
no cache, NIRVANA-style and FlexCache (two worker processes each, progress bars), prints the
serving table, and writes side-by-side GIFs:

    demo_out/full_hit.gif      ground truth | from scratch | FlexCache whole-prompt hit
    demo_out/composed_hit.gif  ground truth | from scratch | FlexCache composed hit | object donor | background donor

Every clip is the reference model's 8-frame 32x32 video, upscaled 4x. The trace, grounding and
report are those of bench/bench_serving.py, at a smaller size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.bench_serving import STEPS, Cell, Group, build_workload, main_table, run_cell, score, time_table
from flexcache.client import CacheClient
from flexcache_model.reference import world
from flexcache_model.reference.cli import save_video
from flexcache_model.reference.worker.worker import Outcome, namespace_for

SEPARATOR = 2  # white pixels between clips


def side_by_side(videos: Sequence[np.ndarray]) -> np.ndarray:
    """[T,3,H,W] clips -> one [T,3,H,W'] clip, left to right."""
    t, c, h, _ = videos[0].shape
    gap = np.ones((t, c, h, SEPARATOR), np.float32)
    parts = []
    for v in videos:
        parts += [np.asarray(v, np.float32), gap]
    return np.concatenate(parts[:-1], axis=3)


def _pick(outcomes: Sequence[Outcome], kind: str) -> Outcome | None:
    """The hit of this kind with the largest K (the most visible reuse)."""
    hits = [o for o in outcomes if o.kind == kind]
    return max(hits, key=lambda o: (o.start_step, -o.index)) if hits else None


def write_gifs(flex: Cell, scratch: Cell, workload, target: str, out: Path) -> list[str]:
    from flexcache_model.reference.pipeline import load_pipeline

    pipeline = load_pipeline("flow")
    decode = lambda x0: pipeline.decode(np.asarray(x0, np.float32)).numpy()  # noqa: E731
    everything = {o.index: o for o in flex.run.warmup + flex.run.measured}
    from_scratch = {o.index: o for o in scratch.run.warmup + scratch.run.measured}
    lines = []
    with CacheClient(target, namespace_for(pipeline, STEPS)) as client:
        for kind, name in (("full", "full_hit"), ("composed", "composed_hit")):
            hit = _pick(list(everything.values()), kind)
            if hit is None:
                lines.append(f"no {kind} hit in this trace: {name}.gif not written")
                continue
            job = workload.jobs[hit.index]
            clips = [world.render(workload.specs[hit.index], job.seed)[0], decode(from_scratch[hit.index].x0),
                     decode(hit.x0)]
            donors = []
            for entry_id in hit.sources if kind == "composed" else ():
                fetched = client.fetch(entry_id)  # the donors' own videos, from the daemon's stored x0
                if fetched is not None:
                    clips.append(decode(fetched.latent()))
                    donors.append(fetched.prompt)
            path = save_video(side_by_side(clips), out / f"{name}.gif")
            lines.append(f"{path}: '{job.prompt}' (K = {hit.start_step} of {STEPS}; left to right: ground truth, "
                         f"from scratch, served from the cache{', object donor, background donor' if donors else ''})"
                         + "".join(f"\n    donor: '{d}'" for d in donors))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the GIFs")
    ap.add_argument("--intents", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    args.gpu_hour_usd, args.cpu_hour_usd = 2.50, 0.05
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"building a trace of {args.warmup} + {args.requests} requests from the real prompt suites ...", flush=True)
    workload = build_workload(args.intents, args.warmup, args.requests, zipf_s=0.8, seed=0)
    cells: list[Cell] = []
    gifs: list[str] = []

    def gifs_while_up(cell: Cell, target: str) -> None:  # donors' videos come from the daemon itself
        print("writing GIFs ...", flush=True)
        gifs.extend(write_gifs(cell, cells[0], workload, target, args.out))

    for mode in ("none", "nirvana", "flexcache"):
        print(f"{mode}: serving the trace ...", flush=True)  # the daemon runs on embedded defaults
        cells.append(run_cell(mode, None, 0, "any-k", workload, args.workers, progress=True,
                              while_up=gifs_while_up if mode == "flexcache" else None))
        print(f"{mode}: {cells[-1].throughput:.0f} videos/min", flush=True)
    truth = score(cells, workload)
    print()
    groups = [Group([c]) for c in cells]
    print(main_table(groups, truth, groups[0], args))
    print()
    print(time_table(groups))
    print()
    print("\n".join(gifs))
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; the full benchmark: python -m bench.bench_serving "
          "(docs/bench_serving.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
