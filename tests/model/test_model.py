"""Tests for the reference model: world, schedulers, pipeline semantics, metric, CLI, training."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from flexcache_model.reference import world
from flexcache_model.reference.schedulers import DDIMScheduler, FlowMatchScheduler, initial_noise

# One intra-op thread: the tiny tensors here gain nothing from more, and on a shared 2-core machine
# extra OpenMP threads spin against other processes.
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- world
def test_render_shapes_and_determinism() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        spec = world.random_spec(rng)
        v, m = world.render(spec, seed=5)
        assert v.shape == (world.T, 3, world.H, world.W) and v.dtype == np.float32
        assert m.shape == (world.T, world.H, world.W) and m.dtype == bool
        assert v.min() >= 0 and v.max() <= 1
        assert m.any(axis=(1, 2)).all(), "every frame shows the object"
        v2, m2 = world.render(spec, seed=5)
        assert np.array_equal(v, v2) and np.array_equal(m, m2)


def test_caption_parse_roundtrip() -> None:
    rng = np.random.default_rng(1)
    ok = 0
    for _ in range(300):
        spec = world.random_spec(rng)
        parsed = world.parse_caption(world.caption(spec, rng))
        # size may be omitted in a caption; everything else must come back
        strip = [world.ObjectSpec(o.shape, o.color, None, o.motion) for o in spec.objects]
        got = [world.ObjectSpec(o.shape, o.color, None, o.motion) for o in parsed.objects]
        ok += strip == got and (parsed.bg_type, parsed.bg_color) == (spec.bg_type, spec.bg_color)
    assert ok == 300


def test_caption_parts_and_free_text() -> None:
    spec = world.parse_caption("a red circle bouncing over green stripes")
    assert spec.objects == (world.ObjectSpec("circle", "red", None, "bouncing"),)
    assert (spec.bg_type, spec.bg_color) == ("stripes", "green")
    obj, bg = world.caption_parts(world.complete_spec(spec, np.random.default_rng(0)))
    assert "circle" in obj and "stripe" in bg
    assert world.parse_caption("hello world").attributes() == []
    v, _ = world.render(world.parse_caption("a dog on a beach"), seed=0)  # unknown words still render
    assert v.shape[0] == world.T


# ----------------------------------------------------------------------------- schedulers
def test_initial_noise_deterministic() -> None:
    a, b = initial_noise(7, (4, 4, 8, 8)), initial_noise(7, (4, 4, 8, 8))
    assert torch.equal(a, b) and not torch.equal(a, initial_noise(8, (4, 4, 8, 8)))


@pytest.mark.parametrize("sched", [FlowMatchScheduler(), DDIMScheduler("epsilon"), DDIMScheduler("v")])
def test_oracle_sampler_follows_forward_process(sched) -> None:
    """With a perfect model, step k lands exactly on add_noise(x0, eps, k+1): the cache's premise."""
    torch.manual_seed(0)
    x0, eps, n = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 4, 8, 8), 50
    if isinstance(sched, FlowMatchScheduler):
        assert torch.allclose(sched.add_noise(x0, eps, 0, n), eps)
    assert torch.allclose(sched.add_noise(x0, eps, n, n), x0)
    for k in range(n):
        x = sched.add_noise(x0, eps, k, n)
        if isinstance(sched, FlowMatchScheduler):
            out = eps - x0
        else:
            a = sched.abar(k, n)
            out = eps if sched.prediction == "epsilon" else a ** 0.5 * eps - (1 - a) ** 0.5 * x0
        assert torch.allclose(sched.step(out, x, k, n), sched.add_noise(x0, eps, k + 1, n), atol=1e-4)


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe():
    from flexcache_model.reference.pipeline import load_pipeline

    return load_pipeline("flow")


def test_pipeline_api(pipe) -> None:
    assert pipe.latent_shape[1:] == (4, 8, 8)  # 2x temporal, 4x spatial downsampling
    e = pipe.embed(["a red square", "a blue circle"])
    assert e.shape == (2, 384) and e.dtype == np.float32
    video, _ = world.render(world.parse_caption("a red square over blue stripes"), 0)
    z = pipe.encode(video)
    assert tuple(z.shape) == pipe.latent_shape
    assert pipe.decode(z).shape == (world.T, 3, world.H, world.W)


@pytest.mark.parametrize("schedule", ["flow", "ddpm"])
def test_trajectory_semantics(schedule) -> None:
    from flexcache_model.reference.pipeline import load_pipeline

    p = load_pipeline(schedule)
    n = 10
    x0, traj = p.sample("a red circle bouncing over green stripes", seed=3, steps=n, return_trajectory=True)
    assert len(traj) == n + 1 and torch.equal(traj[0], p.initial_noise(3)) and torch.equal(traj[n], x0)
    assert torch.equal(x0, p.sample("a red circle bouncing over green stripes", seed=3, steps=n))
    x0k, tk = p.sample("a red circle bouncing over green stripes", seed=3, steps=n, start_latent=traj[4],
                       start_step=4, return_trajectory=True)
    assert torch.allclose(x0k, x0, atol=1e-5)
    assert tk[3] is None and torch.equal(tk[4], traj[4])
    emb = p.embed("a red circle bouncing over green stripes")[0]
    assert torch.allclose(p.sample(emb, seed=3, steps=n), x0, atol=1e-5)
    with pytest.raises(ValueError):
        p.sample("x", seed=0, steps=n, start_step=3)


def test_import_is_torch_free() -> None:
    code = "import sys, flexcache_model, flexcache_model.reference.world; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- metric
def test_metric_separates_rendered_clips() -> None:
    from flexcache_model.reference.quality import frechet_distance, load_metric

    m = load_metric()
    rng = np.random.default_rng(3)
    specs = [world.random_spec(rng) for _ in range(48)]
    caps = [world.caption(s, rng) for s in specs]
    vids = np.stack([world.render(s, i)[0] for i, s in enumerate(specs)])
    right = np.nanmean(m.fidelity(vids, caps))
    wrong = np.nanmean(m.fidelity(vids, caps[1:] + caps[:1]))
    assert right > 0.85 and wrong < 0.6
    f = m.features(vids)
    assert abs(frechet_distance(f, f)) < 1e-3


# ----------------------------------------------------------------------------- CLI and training
def test_cli_sample_and_errors(tmp_path) -> None:
    from flexcache_model.reference.cli import main

    out = tmp_path / "a.gif"
    assert main(["sample", "a red circle bouncing over green stripes", "-o", str(out), "--steps", "4"]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", "a red circle", "-o", str(tmp_path / "a.mp3"), "--steps", "2"]) == 2
    assert main(["sample", "   ", "-o", str(out)]) == 2
    assert main(["sample", "x", "-o", str(tmp_path / "missing" / "a.gif")]) == 2
    assert main(["render", "a blue square rising over a starry night", "-o", str(tmp_path / "r.png")]) == 0
    assert main(["parse", "blue stripes behind a small red square moving to the left"]) == 0


def test_tiny_training_runs(tmp_path) -> None:
    from flexcache_model.reference.cli import main
    from flexcache_model.reference.pipeline import load_pipeline
    from flexcache_model.reference.quality import load_metric

    assert main(["train", "all", "--tiny", "--out-dir", str(tmp_path)]) == 0
    for name in ("vae", "probe", "denoiser_flow", "denoiser_ddpm"):
        assert (tmp_path / f"{name}.safetensors").exists() and (tmp_path / f"{name}.json").exists()
    p = load_pipeline("ddpm", tmp_path)
    v = p.generate("a red square", seed=0, steps=3)
    assert v.shape == (world.T, 3, world.H, world.W)
    assert load_metric(tmp_path).fidelity(v[None], ["a red square"]).shape == (1,)
