"""Calibration on the reference model: `flexcache-model calibrate` end to end on a handful of prompts, and
the sampler behind it (flexcache_model/reference/calibration.py) against the pipeline it wraps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from flexcache.client.calibration import measure
from flexcache_model.reference.calibration import ProbeScorer, ReferenceSampler
from flexcache_model.reference.pipeline import load_pipeline

torch.set_num_threads(1)

PROMPTS = ["a small red circle moving left on a blue background",
           "a small red circle moving left on a blue background",
           "a small red circle drifting to the left over a blue background",
           "a big green square moving up on a striped yellow background",
           "a big green square moving up on a striped yellow background",
           "a tiny white triangle moving right in the sky"]


def test_sampler_is_the_pipeline_and_a_start_is_paired_with_its_request() -> None:
    pipe = load_pipeline("flow")
    sampler = ReferenceSampler(pipe, total_steps=10)
    made = sampler.generate(PROMPTS[:2], [7, 8])
    assert made.x0.shape == (2, *pipe.latent_shape) and len(made.videos) == 2
    assert np.allclose(made.x0[0], pipe.sample(PROMPTS[0], 7, 10).numpy(), atol=1e-5)
    # a resume from the forward-process latent of the request's own clean latent, with its own noise
    x5 = sampler.rebuild(made.x0[0], 7, 5)
    assert np.allclose(x5, pipe.add_noise(torch.from_numpy(made.x0[0]), pipe.initial_noise(7), 5, 10).numpy())
    again = sampler.resume(PROMPTS[:1], [7], x5[None], 5)
    assert np.abs(again.x0[0] - made.x0[0]).mean() < 0.5 * np.abs(made.x0[1] - made.x0[0]).mean()
    scores = ProbeScorer().score_batch(PROMPTS[:2], np.asarray(made.videos))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()


def test_measure_pairs_every_start_with_its_own_request() -> None:
    sampler = ReferenceSampler(total_steps=10)
    m = measure(sampler, ProbeScorer(), PROMPTS, ks={"whole": (5,), "composed": (2,), "partial_object": (2,),
                                                     "partial_background": (2,)}, donors=2, min_similarity=-1)
    whole = [t for t in m.trials if t.table == "whole"]
    assert len(whole) == 2 * len(PROMPTS) and all(t.k == 5 for t in whole)
    assert all(t.request not in t.donors for t in m.trials)  # never its own donor
    repeat = next(t for t in whole if t.request == 1 and t.donors == (0,))
    assert repeat.similarity > 0.999  # the same text, another seed
    assert {t.table for t in m.trials} <= {"whole", "composed", "partial_object", "partial_background"}
    assert all(np.isfinite(t.loss) and -100 <= t.loss <= 100 for t in m.trials)
    assert m.videos_sampled > len(PROMPTS)


def test_cli_calibrates_and_writes_its_outputs(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "flexcache_model.reference.cli", "calibrate", "--prompts",
                             str(prompts), "--steps", "10", "--whole-ks", "0.5", "--part-ks", "0.2",
                             "--min-trials", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    tables = json.loads((out / "tables.json").read_text())
    assert set(tables) == {"whole", "composed", "partial_object", "partial_background", "max_loss"}
    assert "| table | similarity |" in (out / "calibration.md").read_text()
    assert (out / "calibration.png").stat().st_size > 1000
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["total_steps"] == 10 and len(lines) > len(PROMPTS)
