"""Quality of the reference model: probe fidelity, Frechet distance, speed, and cache-start cost.

    .venv/bin/python -m bench.model_quality                # table + K sweep, flow schedule
    .venv/bin/python -m bench.model_quality --schedule ddpm
    .venv/bin/python -m bench.model_quality --grid docs/img/samples.png

Prints markdown tables. Everything is seeded, so numbers repeat run to run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from flexcache_model.reference import world
from flexcache_model.reference.pipeline import Pipeline, load_pipeline
from flexcache_model.reference.quality import QualityMetric, frechet_distance, load_metric
from flexcache_model.text import cosine

KS = (5, 10, 15, 20, 25)


def eval_set(n: int, seed: int) -> tuple[list[world.ClipSpec], list[str], list[int]]:
    """n held-out (spec, caption, seed) triples."""
    rng = np.random.default_rng(seed)
    specs = [world.random_spec(rng) for _ in range(n)]
    caps = [world.caption(s, rng) for s in specs]
    seeds = [int(x) for x in rng.integers(0, 2**31 - 1, n)]
    return specs, caps, seeds


def rendered(specs: list[world.ClipSpec], seeds: list[int]) -> np.ndarray:
    return np.stack([world.render(s, sd)[0] for s, sd in zip(specs, seeds, strict=True)])


def generate(pipe: Pipeline, prompts: list[str], seeds: list[int], batch: int = 64, **kw) -> np.ndarray:
    """Decoded samples [n,T,3,H,W] (batched for speed)."""
    out = []
    for i in range(0, len(prompts), batch):
        x0 = pipe.sample_batch(prompts[i:i + batch], seeds[i:i + batch], **kw)
        out.append(pipe.decode(x0).numpy())
    return np.concatenate(out)


def derange(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (shuffled prompts)."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def pts(x: np.ndarray) -> str:
    """Mean +- 95% CI half-width, in points."""
    x = 100 * np.asarray(x, float)
    x = x[~np.isnan(x)]
    return f"{x.mean():.1f} ± {1.96 * x.std(ddof=1) / np.sqrt(len(x)):.1f}"


def main_table(pipe: Pipeline, metric: QualityMetric, n: int) -> dict:
    """Fidelity on rendered / reconstructed / sampled / shuffled; FD; seconds per clip."""
    specs, caps, seeds = eval_set(n, seed=1234)
    ref_specs, _, ref_seeds = eval_set(n, seed=4321)
    real = rendered(specs, seeds)
    ref = rendered(ref_specs, ref_seeds)
    recon = pipe.decode(pipe.encode(torch.from_numpy(real))).numpy()
    t0 = time.time()
    samp = generate(pipe, caps, seeds)
    batched_s = (time.time() - t0) / n
    perm = derange(n, 7)
    shuffled = [caps[i] for i in perm]
    t0 = time.time()
    for i in range(3):
        pipe.decode(pipe.sample(caps[i], seeds[i]))
    single_s = (time.time() - t0) / 3
    f_ref = metric.features(ref)
    res = {
        "rendered": metric.fidelity(real, caps),
        "rendered, shuffled prompt": metric.fidelity(real, shuffled),
        "VAE reconstruction": metric.fidelity(recon, caps),
        "samples (from scratch)": metric.fidelity(samp, caps),
        "samples, shuffled prompt": metric.fidelity(samp, shuffled),
    }
    fd = {
        "rendered": frechet_distance(metric.features(real), f_ref),
        "VAE reconstruction": frechet_distance(metric.features(recon), f_ref),
        "samples (from scratch)": frechet_distance(metric.features(samp), f_ref),
    }
    print(f"\n### Reference model quality ({pipe.schedule}, {n} held-out prompts, 50 steps, "
          f"guidance {pipe.guidance})\n")
    print("| clips scored | prompt fidelity (points) | Frechet distance to rendered |")
    print("|---|---|---|")
    for k, v in res.items():
        fdv = f"{fd[k]:.1f}" if k in fd else "-"
        print(f"| {k} | {pts(v)} | {fdv} |")
    print(f"\nseconds per sampled clip (50 steps + decode, 2 threads): {single_s:.3f} one at a time, "
          f"{batched_s:.3f} in batches of 64")
    return {"fidelity": {k: float(np.nanmean(v)) for k, v in res.items()}, "fd": fd,
            "s_per_clip_single": single_s, "s_per_clip_batched": batched_s}


def similar(spec: world.ClipSpec, rng: np.random.Generator) -> tuple[world.ClipSpec, str]:
    """A similar spec: the same, or one attribute changed (object colour, motion, background colour)."""
    kind = str(rng.choice(["paraphrase", "obj_color", "motion", "bg_color"]))
    o = spec.objects[0]
    if kind == "obj_color":
        c = [x for x in world.OBJ_COLORS if x not in (o.color, spec.bg_color)]
        spec = replace(spec, objects=(replace(o, color=str(rng.choice(c))), *spec.objects[1:]))
    elif kind == "motion":
        m = [x for x in world.MOTIONS if x != o.motion]
        spec = replace(spec, objects=(replace(o, motion=str(rng.choice(m))), *spec.objects[1:]))
    elif kind == "bg_color":
        if spec.bg_type in world.SCENES:
            kind = "paraphrase"
        else:
            used = {x.color for x in spec.objects}
            c = [x for x in world.BG_COLORS if x != spec.bg_color and x not in used]
            spec = replace(spec, bg_color=str(rng.choice(c)))
    return spec, kind


def k_sweep(pipe: Pipeline, metric: QualityMetric, n: int) -> dict:
    """Start target prompts from a similar donor prompt's latent at K, vs from scratch."""
    rng = np.random.default_rng(99)
    specs = [world.random_spec(rng, p_two=0.0) for _ in range(n)]
    donors = [world.caption(s, rng) for s in specs]
    pairs = [similar(s, rng) for s in specs]
    targets = [world.caption(s, rng) for s, _ in pairs]
    kinds = [k for _, k in pairs]
    seeds = [int(x) for x in rng.integers(0, 2**31 - 1, n)]
    tseeds = [s + 1 for s in seeds]
    sim = np.diag(cosine(pipe.embed(donors), pipe.embed(targets)))
    x0d, traj = pipe.sample_batch(donors, seeds, return_trajectory=True)
    eps = torch.stack([pipe.initial_noise(s) for s in seeds])
    ref_specs, _, ref_seeds = eval_set(n, seed=4321)
    f_ref = metric.features(rendered(ref_specs, ref_seeds))
    rows = []
    scratch = pipe.decode(pipe.sample_batch(targets, tseeds)).numpy()
    rows.append(("0 (from scratch)", metric.fidelity(scratch, targets), None, scratch))
    relerr = {}
    for k in KS:
        hit = pipe.decode(pipe.sample_batch(targets, seeds, start_latents=traj[k], start_step=k)).numpy()
        xk = pipe.add_noise(x0d, eps, k)
        relerr[k] = float(((xk - traj[k]).flatten(1).norm(dim=1) / traj[k].flatten(1).norm(dim=1)).mean())
        reb = pipe.decode(pipe.sample_batch(targets, seeds, start_latents=xk, start_step=k)).numpy()
        rows.append((str(k), metric.fidelity(hit, targets), metric.fidelity(reb, targets), hit))
    donor_v = pipe.decode(x0d).numpy()
    rows.append(("50 (donor's video as is)", metric.fidelity(donor_v, targets), None, donor_v))
    print(f"\n### Starting from a similar prompt's latent at step K of 50 ({pipe.schedule}, {n} pairs)\n")
    print(f"Pairs: same spec reworded or one attribute changed ({', '.join(sorted(set(kinds)))}); "
          f"MiniLM cosine donor/target: mean {sim.mean():.3f}, min {sim.min():.3f}.\n")
    print("| K | fidelity to target prompt, true donor x_K | fidelity, x_K rebuilt by add_noise "
          "| FD (true x_K) | fidelity by pair type (points) |")
    print("|---|---|---|---|---|")
    out = {}
    kinds_a = np.array(kinds)
    for name, fid, reb, vids in rows:
        by = " / ".join(f"{kd} {100 * np.nanmean(fid[kinds_a == kd]):.0f}"
                        for kd in ("paraphrase", "obj_color", "motion", "bg_color") if (kinds_a == kd).any())
        fd = frechet_distance(metric.features(vids), f_ref)
        print(f"| {name} | {pts(fid)} | {pts(reb) if reb is not None else '-'} | {fd:.1f} | {by} |")
        out[name] = {"fidelity": float(np.nanmean(fid)), "fd": fd,
                     "rebuilt": None if reb is None else float(np.nanmean(reb))}
    print("\nadd_noise(x0, eps, K) vs the true trajectory latent x_K, mean relative L2 error: "
          + ", ".join(f"K={k}: {v:.3f}" for k, v in relerr.items()))
    out["relerr"] = relerr
    return out


def grid(pipe: Pipeline, path: str) -> None:
    """PNG grid: each row a prompt, its 8 sampled frames, then 3 frames of a rendered reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = [
        "a red circle bouncing over green stripes",
        "a large yellow square moving to the right on a plain blue background",
        "a small white triangle falling in front of a purple checkerboard",
        "a starry night with a red cross spinning",
        "sky over grass behind a large purple circle drifting left",
        "a green square growing over an orange gradient",
        "a blue triangle rising over a noisy yellow texture",
        "a white circle moving left and a red square moving right over gray stripes",
    ]
    x0 = pipe.sample_batch(prompts, list(range(len(prompts))))
    vids = pipe.decode(x0).numpy()
    fig, axes = plt.subplots(len(prompts), 1, figsize=(12, 1.55 * len(prompts)))
    for ax, p, v, sd in zip(axes, prompts, vids, range(len(prompts)), strict=True):
        ref, _ = world.render(world.parse_caption(p), seed=sd)
        gap = np.ones((3, 32, 6), np.float32)
        strip = np.concatenate([*v, gap, ref[0], ref[3], ref[7]], axis=2).transpose(1, 2, 0)
        ax.imshow(strip, interpolation="nearest")
        ax.set_title(f"\"{p}\"  (sample frames 0-7 | rendered reference frames 0, 3, 7)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", choices=["flow", "ddpm", "both"], default="flow")
    ap.add_argument("-n", type=int, default=256, help="held-out prompts for the main table")
    ap.add_argument("--pairs", type=int, default=128, help="prompt pairs for the K sweep")
    ap.add_argument("--grid", default=None, help="also write a PNG grid of samples here")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--skip-k", action="store_true")
    ap.add_argument("--json", default=None, help="also write raw numbers here")
    a = ap.parse_args()
    torch.set_num_threads(2)
    metric = load_metric()
    results = {}
    for s in (["flow", "ddpm"] if a.schedule == "both" else [a.schedule]):
        pipe = load_pipeline(s)
        r: dict = {}
        if not a.skip_table:
            r["table"] = main_table(pipe, metric, a.n)
        if not a.skip_k:
            r["k_sweep"] = k_sweep(pipe, metric, a.pairs)
        if a.grid and s == "flow":
            grid(pipe, a.grid)
        results[s] = r
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
