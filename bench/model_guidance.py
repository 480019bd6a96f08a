"""Pick the classifier-free guidance scale: prompt fidelity of samples vs guidance, on a tuning set
disjoint from the one bench/model_quality.py reports on (different seed).

    .venv/bin/python -m bench.model_guidance --schedule flow
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from flexcache_model.reference import world
from flexcache_model.reference.pipeline import load_pipeline
from flexcache_model.reference.quality import frechet_distance, load_metric


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", choices=["flow", "ddpm"], default="flow")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--scales", default="1,2,3,4.5,6")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(555)
    specs = [world.random_spec(rng) for _ in range(a.n)]
    caps = [world.caption(s, rng) for s in specs]
    seeds = [int(x) for x in rng.integers(0, 2**31 - 1, a.n)]
    metric = load_metric()
    ref = metric.features(np.stack([world.render(s, sd)[0] for s, sd in zip(specs, seeds, strict=True)]))
    pipe = load_pipeline(a.schedule)
    print(f"| guidance ({a.schedule}) | prompt fidelity (points) | Frechet distance |\n|---|---|---|")
    for g in [float(x) for x in a.scales.split(",")]:
        vids = np.concatenate([pipe.decode(pipe.sample_batch(caps[i:i + 64], seeds[i:i + 64], guidance=g)).numpy()
                               for i in range(0, a.n, 64)])
        fid = 100 * np.nanmean(metric.fidelity(vids, caps))
        print(f"| {g} | {fid:.1f} | {frechet_distance(metric.features(vids), ref):.1f} |")


if __name__ == "__main__":
    main()
