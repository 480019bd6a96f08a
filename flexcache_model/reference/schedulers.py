"""Noise schedules with the exact trajectory semantics the cache relies on.

Trajectory index k in 0..N: index 0 is the initial noise eps, index N the clean latent x0; sampling
step k maps index k to k+1. `add_noise(x0, eps, K, steps)` is the forward-process latent at index K,
which is what a cache rebuilds from a stored x0 and seed. Both samplers are deterministic
(Euler for flow matching, DDIM eta=0 for DDPM), so a trajectory is a function of (prompt, seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """eps for a generation: float32 standard normal drawn from a torch.Generator seeded by seed alone."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


class FlowMatchScheduler:
    """Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps; the model predicts v = eps - x0."""

    kind = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    initial_noise = staticmethod(initial_noise)

    def _shifted(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, steps: int) -> torch.Tensor:
        """sigma at every trajectory index 0..N (1 -> 0)."""
        return self._shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, k: int, steps: int = 50) -> torch.Tensor:
        """Forward-process latent at trajectory index k."""
        s = float(self.sigmas(steps)[k])
        return (1 - s) * x0 + s * eps

    def model_time(self, k: int, steps: int) -> float:
        """Time value fed to the denoiser at index k (sigma * 1000)."""
        return float(self.sigmas(steps)[k]) * self.num_train_timesteps

    def step(self, out: torch.Tensor, x: torch.Tensor, k: int, steps: int) -> torch.Tensor:
        """Euler step from index k to k+1 given the model's velocity prediction."""
        sig = self.sigmas(steps)
        return x + (float(sig[k + 1]) - float(sig[k])) * out

    # training
    def training_pair(self, x0: torch.Tensor, eps: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, model time, target) for uniform u in [0,1] per sample."""
        s = self._shifted(u).view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * eps, s.flatten() * self.num_train_timesteps, eps - x0


class DDIMScheduler:
    """DDPM noise schedule (scaled-linear betas, 1000 steps), DDIM eta=0 sampling, trailing spacing.

    prediction: "epsilon" or "v". Index k < N sits at timestep t_k = round(1000 - k*1000/N) - 1;
    index N is clean (abar = 1).
    """

    kind = "ddpm"

    def __init__(self, prediction: str = "v", beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = 1000) -> None:
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', not {prediction!r}")
        self.prediction = prediction
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                               dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    initial_noise = staticmethod(initial_noise)

    def timestep(self, k: int, steps: int) -> int:
        """Training timestep of trajectory index k (k < steps)."""
        return round(self.num_train_timesteps - k * self.num_train_timesteps / steps) - 1

    def abar(self, k: int, steps: int) -> float:
        """alpha-bar at trajectory index k; 1.0 at k = steps (clean)."""
        return 1.0 if k >= steps else float(self.alphas_cumprod[self.timestep(k, steps)])

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, k: int, steps: int = 50) -> torch.Tensor:
        """Forward-process latent at trajectory index k: sqrt(abar) x0 + sqrt(1-abar) eps."""
        a = self.abar(k, steps)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps

    def model_time(self, k: int, steps: int) -> float:
        return float(self.timestep(k, steps))

    def _split(self, out: torch.Tensor, x: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the model output at alpha-bar a."""
        sa, sb = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction == "epsilon":
            eps = out
            x0 = (x - sb * eps) / sa
        else:
            x0 = sa * x - sb * out
            eps = sb * x + sa * out
        return x0, eps

    def step(self, out: torch.Tensor, x: torch.Tensor, k: int, steps: int) -> torch.Tensor:
        """Deterministic DDIM step from index k to k+1."""
        x0, eps = self._split(out, x, self.abar(k, steps))
        a_next = self.abar(k + 1, steps)
        return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps

    def training_pair(self, x0: torch.Tensor, eps: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, timestep, target) for uniform u in [0,1] per sample."""
        t = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        a = self.alphas_cumprod[t].float().view(-1, *[1] * (x0.dim() - 1))
        sa, sb = a.sqrt(), (1 - a).sqrt()
        xt = sa * x0 + sb * eps
        target = eps if self.prediction == "epsilon" else sa * eps - sb * x0
        return xt, t.float(), target


Scheduler = FlowMatchScheduler | DDIMScheduler


def make_scheduler(schedule: str, **kw: object) -> Scheduler:
    """'flow' -> FlowMatchScheduler, 'ddpm'/'ddim' -> DDIMScheduler."""
    if schedule == "flow":
        return FlowMatchScheduler(**kw)  # type: ignore[arg-type]
    if schedule in ("ddpm", "ddim"):
        return DDIMScheduler(**kw)  # type: ignore[arg-type]
    raise ValueError(f"unknown schedule {schedule!r}; use 'flow' or 'ddpm'")
