"""Text-to-video latent diffusion pipeline: the API the cache and the benchmarks build on.

Semantics (the cache depends on these exactly):
- the initial noise of a generation is `scheduler.initial_noise(seed, latent_shape)`;
- `sample(...)` step k of N maps the latent at trajectory index k to k+1; trajectory[0] = eps and
  trajectory[N] = x0; `start_step=K, start_latent=x_K` runs only the N-K remaining steps (a cache hit);
- `scheduler.add_noise(x0, eps, K, steps=N)` is the forward-process latent at index K.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flexcache_model import text

from . import checkpoint
from .denoiser import DiT, DiTConfig
from .schedulers import Scheduler, make_scheduler
from .vae import VAEConfig, VideoAutoencoder

PromptLike = str | np.ndarray | torch.Tensor


class Pipeline:
    """VAE + DiT denoiser + scheduler, with classifier-free guidance. CPU, float32."""

    def __init__(self, vae: VideoAutoencoder, denoiser: DiT, scheduler: Scheduler,
                 guidance: float = 3.0, default_steps: int = 50) -> None:
        self.vae = vae.eval()
        self.denoiser = denoiser.eval()
        self.scheduler = scheduler
        self.guidance = guidance
        self.default_steps = default_steps

    @property
    def schedule(self) -> str:
        """'flow' or 'ddpm'."""
        return self.scheduler.kind

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[C, T, H, W] of one latent."""
        return tuple(self.denoiser.cfg.latent_shape)  # type: ignore[return-value]

    # ------------------------------------------------------------------ text / pixels <-> latents
    def embed(self, prompts: Sequence[str] | str) -> np.ndarray:
        """Caption embeddings float32 [n, 384] (unit norm, cached)."""
        return text.embed(prompts)

    @torch.no_grad()
    def encode(self, video: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Video [T,3,H,W] (or [B,T,3,H,W]) in [0,1] -> normalised latent [C,T',h,w] (or batched)."""
        v = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video).float()
        single = v.dim() == 4
        z = self.vae.encode(v[None] if single else v)
        return z[0] if single else z

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [C,T',h,w] (or batched) -> video float32 [T,3,H,W] in [0,1] (or batched)."""
        z = torch.as_tensor(latent).float()
        single = z.dim() == 4
        v = self.vae.decode(z[None] if single else z)
        return v[0] if single else v

    def initial_noise(self, seed: int) -> torch.Tensor:
        """eps of the generation with this seed."""
        return self.scheduler.initial_noise(seed, self.latent_shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, k: int, steps: int | None = None
                  ) -> torch.Tensor:
        """Forward-process latent at trajectory index k (what a cache rebuilds)."""
        return self.scheduler.add_noise(x0, eps, k, steps=steps or self.default_steps)

    # ------------------------------------------------------------------ sampling
    def _embeddings(self, prompts: Sequence[PromptLike]) -> torch.Tensor:
        strs = [p for p in prompts if isinstance(p, str)]
        table = dict(zip(strs, self.embed(strs), strict=True)) if strs else {}
        rows = []
        for p in prompts:
            e = table[p] if isinstance(p, str) else np.asarray(torch.as_tensor(p).float(), np.float32)
            if e.shape != (text.EMBED_DIM,):
                raise ValueError(f"embedding must have shape ({text.EMBED_DIM},), got {e.shape}")
            rows.append(torch.from_numpy(np.ascontiguousarray(e)))
        return torch.stack(rows)

    @torch.no_grad()
    def sample_batch(self, prompts: Sequence[PromptLike], seeds: Sequence[int], steps: int | None = None,
                     start_latents: torch.Tensor | Sequence[torch.Tensor] | None = None,
                     start_step: int = 0, return_trajectory: bool = False,
                     guidance: float | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Batched `sample`: x0 [B,C,T,H,W]; with return_trajectory also a list indexed by
        trajectory index 0..N of [B,...] latents (None before start_step)."""
        n = self.default_steps if steps is None else int(steps)
        if n < 1:
            raise ValueError("steps must be >= 1")
        if not 0 <= start_step <= n:
            raise ValueError(f"start_step must be in [0, {n}], got {start_step}")
        if len(prompts) != len(seeds):
            raise ValueError("need one seed per prompt")
        g = self.guidance if guidance is None else float(guidance)
        emb = self._embeddings(prompts)
        b = emb.shape[0]
        if start_latents is None:
            if start_step != 0:
                raise ValueError("start_step > 0 needs start_latent")
            x = torch.stack([self.initial_noise(int(s)) for s in seeds])
        else:
            x = torch.stack(list(start_latents)) if not isinstance(start_latents, torch.Tensor) \
                else start_latents.float()
            if x.dim() == 4:
                x = x[None]
            if tuple(x.shape) != (b, *self.latent_shape):
                raise ValueError(f"start latent shape {tuple(x.shape)} != {(b, *self.latent_shape)}")
            x = x.clone()
        traj: list[torch.Tensor | None] = [None] * (n + 1)
        traj[start_step] = x.clone()
        uncond = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
        emb2 = torch.cat([emb, emb])
        for k in range(start_step, n):
            t = torch.full((b,), self.scheduler.model_time(k, n))
            if g == 1.0:
                out = self.denoiser(x, t, emb)
            else:
                o = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), emb2, uncond)
                oc, ou = o[:b], o[b:]
                out = ou + g * (oc - ou)
            x = self.scheduler.step(out, x, k, n)
            if return_trajectory:
                traj[k + 1] = x.clone()
        return (x, traj) if return_trajectory else x

    def sample(self, prompt: PromptLike, seed: int, steps: int | None = None,
               start_latent: torch.Tensor | None = None, start_step: int = 0,
               return_trajectory: bool = False, guidance: float | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Sample one latent x0 [C,T,H,W] for a prompt (string or 384-d embedding) and seed.

        From scratch the trajectory starts at eps = initial_noise(seed); with start_step=K and
        start_latent=x_K only steps K..N-1 run. With return_trajectory, also the list of latents
        indexed by trajectory index 0..N (entries before start_step are None).
        """
        res = self.sample_batch([prompt], [seed], steps, None if start_latent is None else
                                torch.as_tensor(start_latent)[None], start_step, return_trajectory,
                                guidance)
        if return_trajectory:
            x, traj = res  # type: ignore[misc]
            return x[0], [None if t is None else t[0] for t in traj]
        return res[0]  # type: ignore[index]

    def generate(self, prompt: PromptLike, seed: int, steps: int | None = None) -> np.ndarray:
        """Prompt -> decoded video float32 [T,3,H,W] in [0,1]."""
        return self.decode(self.sample(prompt, seed, steps)).numpy()  # type: ignore[arg-type]


def load_pipeline(schedule: str = "flow", checkpoint_dir: str | Path | None = None,
                  guidance: float | None = None) -> Pipeline:
    """Load the shipped checkpoints (or those in checkpoint_dir) for schedule 'flow' or 'ddpm'."""
    if schedule == "ddim":
        schedule = "ddpm"
    if schedule not in ("flow", "ddpm"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'flow' or 'ddpm'")
    d = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint.CHECKPOINT_DIR
    vinfo = checkpoint.load_config(d, "vae")
    vae = checkpoint.load_weights(VideoAutoencoder(VAEConfig(**vinfo["config"])), d, "vae")
    dinfo = checkpoint.load_config(d, f"denoiser_{schedule}")
    dc = dinfo["config"]
    dcfg = DiTConfig(**{**dc, "latent_shape": tuple(dc["latent_shape"]), "patch": tuple(dc["patch"])})
    den = checkpoint.load_weights(DiT(dcfg), d, f"denoiser_{schedule}")
    sched = make_scheduler(schedule, **dinfo.get("scheduler", {}))
    g = dinfo.get("guidance", 3.0) if guidance is None else guidance
    return Pipeline(vae, den, sched, guidance=float(g))
