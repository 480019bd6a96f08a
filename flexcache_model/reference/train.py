"""Training scripts for the autoencoder, the two denoisers and the quality probe.

Deterministic (fixed seeds, fixed thread count) and sized for 2 CPU cores (training time measured in
docs/model.md). `tiny=True` shrinks everything to seconds for tests.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, world
from .denoiser import DiT, DiTConfig
from .schedulers import make_scheduler
from .vae import VAEConfig, VideoAutoencoder


@dataclass
class TrainConfig:
    """Knobs shared by the training commands."""

    out_dir: str = str(checkpoint.CHECKPOINT_DIR)
    seed: int = 0
    threads: int = 2
    tiny: bool = False  # seconds-long configuration for tests


def _setup(cfg: TrainConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)


def _lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warmup then cosine decay to 10%."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip=None) -> None:
    """One optimiser step at learning rate `lr`, optionally clipping the gradient norm of `clip` to 1."""
    for pg in opt.param_groups:
        pg["lr"] = lr
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def _videos_to_tensor(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(v).float().div_(255.0)


def train_vae(cfg: TrainConfig, steps: int = 700, batch: int = 24, n_clips: int = 4000,
              lr: float = 2e-3) -> dict:
    """Train the video autoencoder on rendered clips; fit latent normalisation; save 'vae'."""
    _setup(cfg)
    vcfg = VAEConfig(c1=8, c2=8, c3=8) if cfg.tiny else VAEConfig()
    if cfg.tiny:
        steps, batch, n_clips = 3, 4, 16
    _, _, videos, masks = world.sample_dataset(n_clips, seed=cfg.seed + 1)
    model = VideoAutoencoder(vcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc="vae", mininterval=2)
    for step in bar:
        idx = torch.randint(0, n_clips, (batch,), generator=g).numpy()
        x = _videos_to_tensor(videos[idx])
        m = torch.from_numpy(masks[idx]).float()[:, :, None]
        z = model.encode_raw(x)
        y = model.decode_raw(z)
        err = (y - x).pow(2)
        # objects are small; weight their pixels up so shape/colour survive the bottleneck
        loss = (err * (1 + 4 * m)).mean() + 0.5 * (y - x).abs().mean() + 1e-4 * z.pow(2).mean()
        _optimise(opt, loss, _lr(step, steps, lr))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        zs = torch.cat([model.encode_raw(_videos_to_tensor(videos[i:i + 64]))
                        for i in range(0, min(n_clips, 1024), 64)])
        model.shift.copy_(zs.mean(dim=(0, 2, 3, 4)))
        model.scale.copy_(zs.std(dim=(0, 2, 3, 4)).clamp_min(1e-3))
        xv = _videos_to_tensor(videos[:64])
        mse = float((model.decode(model.encode(xv)) - xv).pow(2).mean())
    info = {"config": asdict(vcfg), "steps": steps, "batch": batch, "n_clips": n_clips, "lr": lr,
            "seed": cfg.seed, "threads": cfg.threads, "train_seconds": round(time.time() - t0, 1), "recon_mse": mse}
    checkpoint.save(model, info, cfg.out_dir, "vae")
    return info


def _denoiser_data(vae: VideoAutoencoder, n_clips: int, captions_per_clip: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [n,C,T,h,w] and caption embeddings [n, k, 384] of freshly rendered clips."""
    from flexcache_model.text import embed

    _, caps, videos, _ = world.sample_dataset(n_clips, seed=seed, captions_per_clip=captions_per_clip)
    with torch.no_grad():
        lat = torch.cat([vae.encode(_videos_to_tensor(videos[i:i + 128])) for i in range(0, n_clips, 128)])
    flat = [c for cs in caps for c in cs]
    emb = torch.from_numpy(embed(flat)).view(n_clips, captions_per_clip, -1)
    return lat, emb


def train_denoiser(cfg: TrainConfig, schedule: str = "flow", steps: int | None = None, batch: int = 128,
                   n_clips: int = 6000, captions_per_clip: int = 2, lr: float = 6e-4,
                   p_uncond: float = 0.1, ema: float = 0.995, prediction: str = "v") -> dict:
    """Train a DiT on VAE latents for one schedule; save 'denoiser_<schedule>' (EMA weights).

    Default steps: 1200 for flow (the main schedule), 600 for DDPM, to fit the CPU budget.
    """
    _setup(cfg)
    if steps is None:
        steps = 1200 if schedule == "flow" else 600
    vae_info = checkpoint.load_config(cfg.out_dir, "vae")
    vae = checkpoint.load_weights(VideoAutoencoder(VAEConfig(**vae_info["config"])), cfg.out_dir, "vae")
    vcfg = VAEConfig(**vae_info["config"])
    if cfg.tiny:
        steps, batch, n_clips, captions_per_clip = 3, 8, 16, 1
        dcfg = DiTConfig(latent_shape=vcfg.latent_shape, width=32, depth=1, heads=2, patch=(2, 2, 2))
    else:
        dcfg = DiTConfig(latent_shape=vcfg.latent_shape, width=128, depth=4, heads=4, patch=(2, 2, 2))
    sched_kw = {"prediction": prediction} if schedule != "flow" else {}
    sched = make_scheduler(schedule, **sched_kw)
    t0 = time.time()
    lat, emb = _denoiser_data(vae, n_clips, captions_per_clip, seed=cfg.seed + 2)
    t_data = time.time() - t0
    model = DiT(dcfg)
    ema_model = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    bar = tqdm(range(steps), desc=f"denoiser[{schedule}]", mininterval=2)
    for step in bar:
        idx = torch.randint(0, n_clips, (batch,), generator=g)
        cap = torch.randint(0, captions_per_clip, (batch,), generator=g)
        x0, e = lat[idx], emb[idx, cap]
        eps = torch.randn(x0.shape, generator=g)
        # flow: logit-normal times (SD3), more weight on mid-noise levels; DDPM: uniform timesteps
        u = torch.sigmoid(torch.randn(batch, generator=g)) if schedule == "flow" else torch.rand(batch, generator=g)
        xt, t, target = sched.training_pair(x0, eps, u)
        uncond = torch.rand(batch, generator=g) < p_uncond
        loss = (model(xt, t, e, uncond) - target).pow(2).mean()
        _optimise(opt, loss, _lr(step, steps, lr, warmup=100), clip=model.parameters())
        with torch.no_grad():
            d = min(ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema_model.parameters(), model.parameters(), strict=True):
                pe.mul_(d).add_(pm, alpha=1 - d)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    info = {"config": asdict(dcfg), "schedule": schedule, "scheduler": sched_kw, "steps": steps,
            "batch": batch, "n_clips": n_clips, "captions_per_clip": captions_per_clip, "lr": lr,
            "p_uncond": p_uncond, "ema": ema, "seed": cfg.seed, "threads": cfg.threads, "guidance": 2.0,
            "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0, 1),
            "final_loss": float(loss.item())}
    checkpoint.save(ema_model, info, cfg.out_dir, f"denoiser_{schedule}")
    return info


def train_probe(cfg: TrainConfig, steps: int = 1500, batch: int = 64, n_clips: int = 8000,
                lr: float = 2e-3) -> dict:
    """Train the quality probe on rendered clips (with blur/noise augmentation); save 'probe'."""
    from .quality import Probe, ProbeConfig, QualityMetric, augment, probe_loss, targets

    _setup(cfg)
    pcfg = ProbeConfig(c1=4, c2=4, c3=4, feat=8) if cfg.tiny else ProbeConfig()
    if cfg.tiny:
        steps, batch, n_clips = 3, 4, 16
    t0 = time.time()
    specs, _caps, videos, _ = world.sample_dataset(n_clips, seed=cfg.seed + 3)
    tgt = targets(specs)
    model = Probe(pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed + 11)
    bar = tqdm(range(steps), desc="probe", mininterval=2)
    for step in bar:
        idx = torch.randint(0, n_clips, (batch,), generator=g)
        x = augment(_videos_to_tensor(videos[idx.numpy()]), g)
        _, logits = model(x)
        loss = probe_loss(logits, {k: v[idx] for k, v in tgt.items()})
        _optimise(opt, loss, _lr(step, steps, lr))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    _vspecs, vcaps, vvideos, _ = world.sample_dataset(256 if not cfg.tiny else 8, seed=cfg.seed + 4)
    acc = float(np.nanmean(QualityMetric(model).fidelity(_videos_to_tensor(vvideos),
                                                          [c[0] for c in vcaps])))
    info = {"config": asdict(pcfg), "steps": steps, "batch": batch, "n_clips": n_clips, "lr": lr,
            "seed": cfg.seed, "threads": cfg.threads, "train_seconds": round(time.time() - t0, 1),
            "heldout_fidelity_rendered": acc}
    checkpoint.save(model, info, cfg.out_dir, "probe")
    return info
