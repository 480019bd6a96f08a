"""`flexcache-model` command line: sample, render, parse, train, calibrate.

Bad input ends with a one-sentence error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def check_output(path: str | Path) -> Path:
    """Reject a bad output path before spending time on generation."""
    p = Path(path)
    if p.suffix.lower() not in (".gif", ".png"):
        raise ValueError(f"output must end in .gif or .png, not {p.name!r}")
    if not p.parent.exists():
        raise ValueError(f"output folder {str(p.parent)!r} does not exist")
    return p


def save_video(video: np.ndarray, path: str | Path, scale: int = 4, fps: float = 8.0) -> Path:
    """Write [T,3,H,W] in [0,1] as an animated .gif or a frame strip .png (nearest upscaled)."""
    from PIL import Image

    p = check_output(path)
    frames = (np.clip(video, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    if p.suffix.lower() == ".png":
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(p)
    else:
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(p, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
    return p


def _cmd_sample(a: argparse.Namespace) -> int:
    from .pipeline import load_pipeline

    if not a.prompt.strip():
        raise ValueError("the prompt is empty")
    if not 1 <= a.steps <= 1000:
        raise ValueError("--steps must be between 1 and 1000")
    if a.scale < 1:
        raise ValueError("--scale must be at least 1")
    check_output(a.output)
    pipe = load_pipeline(a.schedule, a.checkpoint_dir, guidance=a.guidance)
    video = pipe.generate(a.prompt, a.seed, a.steps)
    out = save_video(video, a.output, a.scale)
    print(f"wrote {out} ({a.schedule}, seed {a.seed}, {a.steps} steps)")
    return 0


def _cmd_render(a: argparse.Namespace) -> int:
    from .world import parse_caption, render

    check_output(a.output)
    spec = parse_caption(a.prompt)
    video, _ = render(spec, a.seed)
    out = save_video(video, a.output, a.scale)
    print(f"wrote {out} (ground truth for {spec})")
    return 0


def _cmd_parse(a: argparse.Namespace) -> int:
    from .world import parse_caption

    print(parse_caption(a.prompt))
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    import json

    from . import train

    cfg = train.TrainConfig(out_dir=a.out_dir, seed=a.seed, threads=a.threads, tiny=a.tiny)
    kw = {"steps": a.steps} if a.steps else {}
    results = {}
    parts = ["vae", "probe", "flow", "ddpm"] if a.what == "all" else [a.what]
    for part in parts:
        if part == "vae":
            results[part] = train.train_vae(cfg, **kw)
        elif part == "probe":
            results[part] = train.train_probe(cfg, **kw)
        elif part == "denoiser":
            for s in (["flow", "ddpm"] if a.schedule == "both" else [a.schedule]):
                results[f"denoiser_{s}"] = train.train_denoiser(cfg, s, **kw)
        else:
            results[f"denoiser_{part}"] = train.train_denoiser(cfg, part, **kw)
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "config"} for k, r in results.items()},
                     indent=1))
    return 0


def _cmd_calibrate(a: argparse.Namespace) -> int:
    """flexcache-calibrate with the reference model as the sampler and its probe as the scorer."""
    import logging

    import torch

    from flexcache.client.calibration import cli as calibration

    from .calibration import ProbeScorer, ReferenceSampler
    from .worker.worker import namespace_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    try:
        return calibration.run(a, lambda: ReferenceSampler(total_steps=a.steps), ProbeScorer,
                               lambda s: namespace_for(s.pipeline, s.total_steps))
    except calibration.CalibrationError as e:
        print(f"flexcache-model: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import CHECKPOINT_DIR

    ap = argparse.ArgumentParser(prog="flexcache-model",
                                 description="FlexCache reference text-to-video diffusion model (CPU).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="generate a clip for a prompt")
    s.add_argument("prompt")
    s.add_argument("-o", "--output", default="out.gif", help=".gif (animated) or .png (frame strip)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--schedule", choices=["flow", "ddpm"], default="flow")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--scale", type=int, default=4, help="pixel upscaling of the output")
    s.add_argument("--checkpoint-dir", default=None)
    s.set_defaults(fn=_cmd_sample)
    r = sub.add_parser("render", help="render the ground-truth clip of a prompt (world simulator)")
    r.add_argument("prompt")
    r.add_argument("-o", "--output", default="render.gif")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--scale", type=int, default=4)
    r.set_defaults(fn=_cmd_render)
    p = sub.add_parser("parse", help="print the structured spec parsed from a prompt")
    p.add_argument("prompt")
    p.set_defaults(fn=_cmd_parse)
    t = sub.add_parser("train", help="train checkpoints (docs/model.md says how long 'all' takes)")
    t.add_argument("what", choices=["all", "vae", "probe", "denoiser", "flow", "ddpm"])
    t.add_argument("--schedule", choices=["flow", "ddpm", "both"], default="both",
                   help="for 'denoiser': which schedule(s)")
    t.add_argument("--out-dir", default=str(CHECKPOINT_DIR))
    t.add_argument("--steps", type=int, default=None, help="override the number of optimiser steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    t.set_defaults(fn=_cmd_train)
    c = sub.add_parser("calibrate", help="measure and fit step tables for the reference model (flexcache-calibrate)")
    from flexcache.client.calibration.cli import add_arguments

    add_arguments(c)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--threads", type=int, default=1, help="torch threads")
    c.set_defaults(fn=_cmd_calibrate)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"flexcache-model: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexcache-model: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
