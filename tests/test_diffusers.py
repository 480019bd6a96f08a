"""The diffusers adapter (flexcache.client.diffusers) on tiny random-weight WanPipeline and CogVideoXPipeline
models built from config in code, offline, on CPU.

- a miss runs N transformer forward passes, a hit granted K exactly N - K (a forward hook counts them);
- a resume at K from the true x_K of an uncached run reproduces that run's output (the scheduler state is
  right), and the rebuilt x_K is the scheduler's own forward process at step K (Wan: flow matching,
  scale_noise; CogVideoX: DDPM-family, add_noise at the pipeline's own timesteps);
- a dead, frozen or refusing daemon leaves the output identical to the uncached pipeline's, with one
  warning.

Skipped where diffusers is not installed, except under CI (env CI set), where that is a failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest

try:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        AutoencoderKLWan,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
except ModuleNotFoundError as exc:
    if os.environ.get("CI"):
        pytest.fail(f"the diffusers adapter tests cannot run, and CI must not skip them: {exc}", pytrace=False)
    pytest.skip(f"diffusers not installed ({exc}): pip install -e '.[diffusers]'", allow_module_level=True)

from flexcache.client import Namespace
from flexcache.client.base import Hit
from flexcache.client.diffusers import CachedPipeline, DiffusersSampler, cached, ddpm_alphas, flow_sigmas
from tests.conftest import connect

N = 8
NS = Namespace(tenant="acme", model="wan-tiny", width=16, height=16, frames=9, total_steps=N)
CALL = {"height": 16, "width": 16, "num_frames": 9, "num_inference_steps": N, "guidance_scale": 1.0}


def tiny_wan(scheduler: object | None = None, **pipe_kwargs: object) -> WanPipeline:
    """A random-weight Wan 2.1 pipeline built from config in code (no hub): no text encoder or tokenizer,
    the calls pass prompt_embeds."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0), **pipe_kwargs)


def embeds(text: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
    return torch.randn(1, 16, 32, generator=g)


def embed(prompt: str) -> np.ndarray:
    """A deterministic stand-in for MiniLM: the same prompt, the same unit vector."""
    rng = np.random.default_rng(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
    v = rng.normal(size=384).astype(np.float32)
    return v / np.linalg.norm(v)


def request(prompt: str, seed: int, **extra: object) -> dict:
    return {"prompt": prompt, "prompt_embeds": embeds(prompt), "generator": torch.Generator().manual_seed(seed),
            **CALL, **extra}


def uncached(pipe: WanPipeline, prompt: str, seed: int, **extra: object) -> tuple[object, list[torch.Tensor]]:
    """The plain pipeline's output and its latent after every step (index i: x_{i+1})."""
    trajectory: list[torch.Tensor] = []

    def keep(p, i, t, kwargs):
        trajectory.append(kwargs["latents"].clone())
        return {}

    args = request(prompt, seed, **extra)
    args.pop("prompt")
    out = pipe(**args, callback_on_step_end=keep)
    return out, trajectory


class FakeCache:
    """A client that always grants `k` steps from `latent` (or from the rebuild of `x0`)."""

    def __init__(self, k: int, latent: torch.Tensor | None = None, x0: torch.Tensor | None = None):
        self.namespace, self.last_error, self.k, self.latent, self.x0 = NS, None, k, latent, x0
        self.rebuilt: torch.Tensor | None = None
        self.puts: list[dict] = []

    def get(self, vector, *, rebuild=None, noise_seed=None, **_):
        latent = self.latent
        if self.x0 is not None:
            latent = self.rebuilt = rebuild(self.x0.numpy(), noise_seed, self.k, N)
        return Hit(latent, self.k, "full", [SimpleNamespace(entry_id="e" * 32, similarity=1.0)])

    def put(self, prompt, latent, vector, **kw):
        self.puts.append({"prompt": prompt, "latent": latent, **kw})
        return "f" * 32


def test_a_miss_runs_n_transformer_calls_and_a_hit_n_minus_k(daemon) -> None:
    with connect(daemon.target, NS) as client:
        pipe = cached(tiny_wan(), client, embed=embed)
        prompt = "a red fox running through snow"
        _, miss = pipe.run(**request(prompt, 1))
        assert miss.kind == "miss" and miss.start_step == 0
        assert miss.transformer_calls == N and miss.steps_run == N and miss.stored
        pipe.flush()
        _, hit = pipe.run(**request(prompt, 2))
        assert hit.kind == "full" and 0 < hit.start_step < N, hit
        assert hit.transformer_calls == N - hit.start_step == hit.steps_run
        assert len(hit.entry_ids) == 1 and hit.similarity > 0.99
        assert not hit.stored  # a deep hit is not admitted (K > 10 % of N)
        with_cfg = pipe.run(**request(prompt, 3, guidance_scale=5.0, negative_prompt_embeds=embeds("")))[1]
        assert with_cfg.kind == "full" and with_cfg.transformer_calls == 2 * (N - with_cfg.start_step)
        pipe.close()


def test_a_shadowed_hit_is_scored_against_the_uncached_run_and_reported(start_daemon) -> None:
    from flexcache.client.shadow import Shadow

    def score(prompt: str, video: object) -> float:  # a stand-in for a CLIP score: deterministic, video-dependent
        return -float(np.abs(np.asarray(video, dtype=np.float64) - 0.5).mean()) * 100

    daemon = start_daemon(guard_max_loss=1.0)
    with connect(daemon.target, NS) as client:
        pipe = cached(tiny_wan(), client, embed=embed, shadow=Shadow(1.0), score=score)
        prompt = "a red fox running through snow"
        _, miss = pipe.run(**request(prompt, 1, output_type="np"))
        assert miss.kind == "miss" and miss.shadow_loss is None  # only hits have shadows
        pipe.flush()
        served, hit = pipe.run(**request(prompt, 2, output_type="np"))
        assert hit.kind == "full" and hit.shadow_loss is not None and hit.shadow_seconds > 0
        plain, _ = uncached(tiny_wan(), prompt, 2, output_type="np")
        assert hit.shadow_loss == pytest.approx(score(prompt, plain.frames[0]) - score(prompt, served.frames[0]))
        pipe.flush()  # the report goes out on the store thread
        (fig,) = client.step_tables().bins
        assert (fig.table, fig.granted_steps, fig.samples) == ("whole", hit.start_step, 1)
        pipe.close()
    with pytest.raises(ValueError, match="score"):
        cached(tiny_wan(), client, shadow=Shadow(0.5))


def test_a_resume_from_the_true_x_k_reproduces_the_uncached_run() -> None:
    pipe = tiny_wan()
    prompt, seed, k = "a lighthouse at dusk", 7, 3
    plain, trajectory = uncached(pipe, prompt, seed, output_type="latent")
    fake = FakeCache(k, latent=trajectory[k - 1])  # x_K: the latent after K steps
    out, outcome = cached(pipe, fake, embed=embed).run(**request(prompt, seed, output_type="latent"))
    assert outcome.kind == "full" and outcome.start_step == k and outcome.transformer_calls == N - k
    torch.testing.assert_close(out.frames, plain.frames, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outcome.x0, plain.frames.float(), rtol=1e-5, atol=1e-5)


def test_the_rebuilt_x_k_is_the_schedulers_forward_process() -> None:
    pipe = tiny_wan()
    prompt, seed, k = "a lighthouse at dusk", 7, 5
    _, trajectory = uncached(pipe, prompt, seed, output_type="latent")
    x0 = trajectory[-1]
    fake = FakeCache(k, x0=x0)
    cached(pipe, fake, embed=embed, store=False).run(**request(prompt, seed, output_type="latent"))
    eps = pipe.prepare_latents(1, 16, 16, 16, 9, torch.float32, "cpu", torch.Generator().manual_seed(seed), None)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(N)
    expected = scheduler.scale_noise(x0, scheduler.timesteps[k:k + 1], eps)
    torch.testing.assert_close(fake.rebuilt, expected, rtol=1e-6, atol=1e-6)
    sigma = flow_sigmas(pipe.scheduler, N)[k]
    torch.testing.assert_close(fake.rebuilt, (1 - sigma) * x0 + sigma * eps, rtol=1e-6, atol=1e-6)
    assert 0 < float(sigma) < 1 and float(sigma) != pytest.approx(1 - k / N)  # the shifted schedule


def test_a_miss_is_the_uncached_pipeline_and_stores_x0_with_its_seed() -> None:
    pipe = tiny_wan()
    plain, _ = uncached(pipe, "a cat", 11)
    fake = FakeCache(0)
    fake.get = lambda *a, **kw: None
    wrapped = cached(pipe, fake, embed=embed)
    out, outcome = wrapped.run(**request("a cat", 11))
    wrapped.close()
    assert outcome.kind == "miss" and outcome.transformer_calls == N
    np.testing.assert_array_equal(out.frames, plain.frames)
    assert len(fake.puts) == 1 and fake.puts[0]["seed"] == 11 and fake.puts[0]["step_seconds"] > 0
    assert fake.puts[0]["latent"].shape == (1, 16, 3, 2, 2)


def test_unipc_restarts_its_history_at_k() -> None:
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = tiny_wan(unipc)
    _, trajectory = uncached(pipe, "a forest", 4, output_type="latent")
    k = 4
    out, outcome = cached(pipe, FakeCache(k, latent=trajectory[k - 1]), embed=embed, store=False).run(
        **request("a forest", 4, output_type="latent"))
    assert outcome.transformer_calls == N - k and torch.isfinite(out.frames).all()
    assert len(pipe.scheduler.timesteps) == N - k  # the resumed call's schedule: t_K..t_{N-1}
    assert "set_timesteps" not in pipe.scheduler.__dict__  # the patch is gone after the call


def test_other_steps_bypass_and_unsupported_pipelines_are_refused() -> None:
    pipe = tiny_wan()
    _, outcome = cached(pipe, FakeCache(4), embed=embed).run(**request("x", 1, num_inference_steps=N - 2))
    assert outcome.kind == "bypass" and outcome.transformer_calls == N - 2
    with pytest.raises(ValueError, match="not supported"):
        CachedPipeline(tiny_wan(DDIMScheduler()), FakeCache(1), embed=embed)
    wan22 = tiny_wan(transformer_2=tiny_wan().transformer, boundary_ratio=0.875)
    with pytest.raises(ValueError, match=r"Wan 2\.2"):
        cached(wan22, FakeCache(1), embed=embed)


# ---- CogVideoX: DDPM-family (CogVideoXDDIMScheduler, v-prediction), latents (B, F, C, H, W) ----

NS_COG = Namespace(tenant="acme", model="cogvideox-tiny", width=16, height=16, frames=9, scheduler="ddim",
                   total_steps=N)


def cog_scheduler(kind: type = CogVideoXDDIMScheduler) -> object:
    """The CogVideoX-2b scheduler configuration: v-prediction, zero terminal SNR, trailing timesteps."""
    return kind(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                snr_shift_scale=3.0, timestep_spacing="trailing")


def tiny_cog(scheduler: object | None = None) -> CogVideoXPipeline:
    """A random-weight CogVideoX pipeline built from config in code (no hub): no T5 or tokenizer, the calls
    pass prompt_embeds (1, 16, 32)."""
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=scheduler or cog_scheduler())


def cog_fake(k: int, **kw: object) -> FakeCache:
    fake = FakeCache(k, **kw)
    fake.namespace = NS_COG
    return fake


def cog_eps(seed: int) -> torch.Tensor:
    """The pipeline's own initial draw: randn of (1, latent frames, C, h, w), before init_noise_sigma."""
    return torch.randn((1, 3, 4, 2, 2), generator=torch.Generator().manual_seed(seed))


def test_cogvideox_a_miss_runs_n_transformer_calls_and_a_hit_n_minus_k(daemon) -> None:
    with connect(daemon.target, NS_COG) as client:
        pipe = cached(tiny_cog(), client, embed=embed)
        prompt = "a red fox running through snow"
        _, miss = pipe.run(**request(prompt, 1))
        assert miss.kind == "miss" and miss.start_step == 0
        assert miss.transformer_calls == N and miss.steps_run == N and miss.stored
        assert miss.x0.shape == (1, 3, 4, 2, 2)
        pipe.flush()
        _, hit = pipe.run(**request(prompt, 2))
        assert hit.kind == "full" and 0 < hit.start_step < N, hit
        assert hit.transformer_calls == N - hit.start_step == hit.steps_run
        assert len(hit.entry_ids) == 1 and hit.similarity > 0.99 and not hit.stored
        # CogVideoX batches classifier-free guidance: one forward pass (of a batch of 2) per step
        with_cfg = pipe.run(**request(prompt, 3, guidance_scale=6.0, negative_prompt_embeds=embeds("")))[1]
        assert with_cfg.kind == "full" and with_cfg.transformer_calls == N - with_cfg.start_step
        pipe.close()


def test_cogvideox_a_resume_from_the_true_x_k_reproduces_the_uncached_run() -> None:
    pipe = tiny_cog()
    prompt, seed, k = "a lighthouse at dusk", 7, 3
    plain, trajectory = uncached(pipe, prompt, seed, output_type="latent")
    fake = cog_fake(k, latent=trajectory[k - 1])
    out, outcome = cached(pipe, fake, embed=embed).run(**request(prompt, seed, output_type="latent"))
    assert outcome.kind == "full" and outcome.start_step == k and outcome.transformer_calls == N - k
    assert len(pipe.scheduler.timesteps) == N - k and pipe.scheduler.num_inference_steps == N
    torch.testing.assert_close(out.frames, plain.frames, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outcome.x0, plain.frames.float(), rtol=1e-5, atol=1e-5)
    assert "set_timesteps" not in pipe.scheduler.__dict__


def test_cogvideox_the_rebuilt_x_k_is_the_schedulers_add_noise() -> None:
    pipe = tiny_cog()
    prompt, seed, k = "a lighthouse at dusk", 7, 5
    _, trajectory = uncached(pipe, prompt, seed, output_type="latent")
    x0 = trajectory[-1]
    fake = cog_fake(k, x0=x0)
    cached(pipe, fake, embed=embed, store=False).run(**request(prompt, seed, output_type="latent"))
    eps = cog_eps(seed)
    scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(N)
    expected = scheduler.add_noise(x0, eps, scheduler.timesteps[k:k + 1])
    torch.testing.assert_close(fake.rebuilt, expected, rtol=1e-6, atol=1e-6)
    timesteps, alphas = ddpm_alphas(pipe.scheduler, N)
    assert int(timesteps[k]) == 999 - k * (1000 // N)  # the pipeline's own (trailing) timesteps
    torch.testing.assert_close(fake.rebuilt, alphas[k].sqrt() * x0 + (1 - alphas[k]).sqrt() * eps,
                               rtol=1e-6, atol=1e-6)
    assert float(alphas[0]) == 0.0 and 0 < float(alphas[k]) < 1  # zero terminal SNR: x_0 of the run is eps


def test_cogvideox_init_noise_sigma_scales_the_draw_and_not_the_resume() -> None:
    """The pipeline multiplies given latents by init_noise_sigma (1.0 for both CogVideoX schedulers): a miss
    passes the unscaled draw, a resume x_K / init_noise_sigma. Checked with a scheduler reporting 2.0."""
    pipe = tiny_cog()
    pipe.scheduler.init_noise_sigma = 2.0
    prompt, seed, k = "a windmill", 9, 2
    plain, trajectory = uncached(pipe, prompt, seed, output_type="latent")
    miss = FakeCache(0)
    miss.get = lambda *a, **kw: None
    out, outcome = cached(pipe, miss, embed=embed, store=False).run(**request(prompt, seed, output_type="latent"))
    assert outcome.kind == "miss"
    torch.testing.assert_close(out.frames, plain.frames, rtol=0, atol=0)
    out, outcome = cached(pipe, cog_fake(k, latent=trajectory[k - 1]), embed=embed, store=False).run(
        **request(prompt, seed, output_type="latent"))
    assert outcome.kind == "full" and outcome.transformer_calls == N - k
    torch.testing.assert_close(out.frames, plain.frames, rtol=1e-5, atol=1e-5)


def test_cogvideox_dpm_misses_exactly_and_restarts_its_history_at_k() -> None:
    pipe = tiny_cog(cog_scheduler(CogVideoXDPMScheduler))
    plain, trajectory = uncached(pipe, "a forest", 4, output_type="latent")
    miss = FakeCache(0)
    miss.get = lambda *a, **kw: None
    out, _ = cached(pipe, miss, embed=embed, store=False).run(**request("a forest", 4, output_type="latent"))
    torch.testing.assert_close(out.frames, plain.frames, rtol=0, atol=0)  # the same eps and step noise
    k = 4
    out, outcome = cached(pipe, cog_fake(k, latent=trajectory[k - 1]), embed=embed, store=False).run(
        **request("a forest", 4, output_type="latent"))
    assert outcome.transformer_calls == N - k and torch.isfinite(out.frames).all()
    assert len(pipe.scheduler.timesteps) == N - k


def test_schedulers_are_refused_across_families() -> None:
    with pytest.raises(ValueError, match="not supported with WanPipeline"):
        cached(tiny_wan(cog_scheduler()), FakeCache(1), embed=embed)
    with pytest.raises(ValueError, match="not supported with CogVideoXPipeline"):
        cached(tiny_cog(FlowMatchEulerDiscreteScheduler(shift=7.0)), cog_fake(1), embed=embed)


@pytest.mark.parametrize("how", ["dead", "frozen", "refusing"])
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_a_dead_frozen_or_refusing_daemon_is_the_uncached_pipeline_with_one_warning(
        start_daemon, tmp_path, caplog, family: str, how: str) -> None:
    """Nothing listening (dead), a real daemon that answers nothing (SIGSTOP: its socket accepts, the call
    runs into the client's timeout), or one that refuses the call (auth on, no token: UNAUTHENTICATED):
    a miss, the uncached output, one warning, nothing stored."""
    import signal

    from flexcache.daemon import auth

    if how == "dead":
        with socket.socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            target, daemon = f"127.0.0.1:{s.getsockname()[1]}", None
    elif how == "refusing":
        auth.add_token(tmp_path / "tokens.yaml", tenant="acme")
        daemon = start_daemon("refusing", auth_tokens_file=tmp_path / "tokens.yaml")
        target = daemon.target
    else:
        daemon = start_daemon("frozen")
        target = daemon.target
    pipe, ns = (tiny_wan(), NS) if family == "wan" else (tiny_cog(), NS_COG)
    plain, _ = uncached(pipe, "a boat on a lake", 5)
    if how == "frozen":
        os.kill(daemon.pid, signal.SIGSTOP)
    try:
        with connect(target, ns, timeout_s=0.5) as client, caplog.at_level(logging.WARNING):
            wrapped = cached(pipe, client, embed=embed)
            out, outcome = wrapped.run(**request("a boat on a lake", 5))
            wrapped.close()
    finally:
        if how == "frozen":
            os.kill(daemon.pid, signal.SIGCONT)
    assert outcome.kind == "miss" and outcome.transformer_calls == N and not outcome.stored
    np.testing.assert_array_equal(out.frames, plain.frames)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("flexcache")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


# ---- DiffusersSampler: the calibration Sampler over the same machinery ----

def sampler_for(pipe: object, **extra: object) -> DiffusersSampler:
    """The tiny pipelines have no text encoder: prompt_embeds is a provider, called per prompt."""
    return DiffusersSampler(pipe, total_steps=N, embed=embed, prompt_embeds=embeds, height=16, width=16,
                            num_frames=9, guidance_scale=1.0, **extra)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_the_sampler_generates_rebuilds_and_resumes_as_a_cached_call(family: str) -> None:
    """generate is the plain pipeline; resume from the true x_K of a generation reproduces it (flow-matching
    Euler and CogVideoX DDIM resume exactly: the tolerance of the resume tests above); rebuild and resume of
    the generation's own x0 with its own seed are what a cached call granted K computes and outputs. (That
    resume is not the generation itself: the rebuilt x_K is the forward process's, not the trajectory's.)"""
    pipe, ns = (tiny_wan(), NS) if family == "wan" else (tiny_cog(), NS_COG)
    sampler = sampler_for(pipe, output_type="latent")
    prompt, seed, k = "a lighthouse at dusk", 7, 3
    plain, trajectory = uncached(pipe, prompt, seed, output_type="latent")
    made = sampler.generate([prompt], [seed])
    assert made.x0.dtype == np.float32 and made.x0.shape == (1, *trajectory[-1].shape[1:])
    np.testing.assert_array_equal(made.videos[0], plain.frames[0].numpy())
    np.testing.assert_array_equal(made.x0, trajectory[-1].numpy())

    resumed = sampler.resume([prompt], [seed], trajectory[k - 1].numpy(), k)
    np.testing.assert_allclose(resumed.x0, made.x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(resumed.videos[0], made.videos[0], rtol=1e-5, atol=1e-5)

    x_k = sampler.rebuild(made.x0[0], seed, k)
    fake = FakeCache(k, x0=torch.from_numpy(made.x0))
    fake.namespace = ns
    hit, outcome = cached(pipe, fake, embed=embed, store=False).run(**request(prompt, seed, output_type="latent"))
    assert outcome.kind == "full" and outcome.start_step == k
    np.testing.assert_array_equal(x_k, fake.rebuilt[0].numpy())
    again = sampler.resume([prompt], [seed], x_k[None], k)
    np.testing.assert_array_equal(again.videos[0], hit.frames[0].numpy())
    np.testing.assert_array_equal(again.x0, outcome.x0.numpy())


def test_the_sampler_generates_the_plain_pipelines_videos_for_a_batch_of_prompts() -> None:
    pipe = tiny_cog()
    sampler = sampler_for(pipe, output_type="np")
    made = sampler.generate(["a cat", "a boat on a lake"], [11, 5])
    assert made.x0.shape == (2, 3, 4, 2, 2) and len(made.videos) == 2
    for i, (prompt, seed) in enumerate((("a cat", 11), ("a boat on a lake", 5))):
        plain, _ = uncached(pipe, prompt, seed, output_type="np")
        np.testing.assert_array_equal(made.videos[i], plain.frames[0])
    vectors = sampler.embed(["a cat", "a cat", "a dog"])
    assert vectors.shape == (3, 384) and float(vectors[0] @ vectors[1]) == pytest.approx(1.0)


def test_the_sampler_refuses_what_it_sets_itself() -> None:
    pipe = tiny_wan()
    with pytest.raises(ValueError, match="generator"):
        sampler_for(pipe, generator=torch.Generator())
    with pytest.raises(ValueError, match="total_steps"):
        sampler_for(pipe, num_inference_steps=N - 1)
    with pytest.raises(TypeError):
        sampler_for(pipe, no_such_argument=1)
    with pytest.raises(ValueError, match="outside"):
        sampler_for(pipe).rebuild(np.zeros((16, 3, 2, 2), np.float32), 1, N)


def test_calibration_measures_a_diffusers_pipeline() -> None:
    """flexcache.client.calibration.measure end to end over the sampler. The scorer, minus the mean absolute
    pixel difference to a fixed grey video, is a deterministic stand-in for a CLIP score (which cannot be
    downloaded here): it checks the plumbing, not the quality."""
    from flexcache.client.calibration import measure

    def grey_score(prompt: str, video: np.ndarray) -> float:
        return -float(np.abs(np.asarray(video, dtype=np.float64) - 0.5).mean())

    prompts = ["a red fox in snow", "a red fox running in snow", "a boat on a lake"]
    k = N // 2
    m = measure(sampler_for(tiny_cog(), output_type="np"), grey_score, prompts, tables=("whole",),
                ks={"whole": (k,)}, donors=1, min_similarity=-1.0)  # the stand-in embedder's vectors are unrelated
    assert m.total_steps == N and m.scratch.shape == (3,) and np.isfinite(m.scratch).all()
    assert len(m.trials) == 3 and {t.k for t in m.trials} == {k} and {t.table for t in m.trials} == {"whole"}
    assert all(np.isfinite(t.loss) for t in m.trials) and any(t.loss != 0 for t in m.trials)
    assert m.videos_sampled == pytest.approx(3 + 3 * (N - k) / N)
