"""Rebuild a step-K latent from a cached clean latent x0 and its seed ("store once, rebuild step K").

FlexCache stores one clean latent x0 and the 8-byte seed of its generation instead of the five
intermediate latents a NIRVANA-style cache keeps. On a hit, `CacheClient.get(..., rebuild=...)`
calls a `Rebuild` (client/client.py: ``(x0, seed, k, total_steps) -> x_k``) to recreate the latent
at the granted step. That function belongs to the worker's model, not to the cache: only the
model's scheduler knows its forward process, and only its sampler knows how eps is drawn from the
seed. `rebuild_for(pipeline)` builds it from a `Pipeline`, so the two can never drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .schedulers import Scheduler

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["ForwardRebuild", "rebuild_for"]


class ForwardRebuild:
    """A `Rebuild`: x_k = scheduler.add_noise(x0, initial_noise(seed, x0.shape), k, total_steps).

    eps comes from the scheduler's own ``initial_noise`` (a CPU torch.Generator seeded by the seed
    alone, exactly what the sampler draws at trajectory index 0), so rebuilding from the true x0
    gives the forward-process latent of that very generation. Numpy in, numpy float32 out; torch
    in, torch float32 out (on x0's device), so the client can pass through whatever it decoded.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def noise(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        """eps of the generation with this seed, as the sampler draws it."""
        return self.scheduler.initial_noise(int(seed), shape)

    def __call__(self, x0: Any, seed: int, k: int, total_steps: int) -> Any:
        k, total_steps = int(k), int(total_steps)
        if total_steps < 1 or not 0 <= k <= total_steps:
            raise ValueError(f"step k={k} outside [0, total_steps={total_steps}]")
        is_torch = isinstance(x0, torch.Tensor)
        x = x0.detach().to("cpu", torch.float32) if is_torch else torch.from_numpy(
            np.ascontiguousarray(x0, dtype=np.float32))
        eps = self.noise(seed, tuple(x.shape))
        xk = self.scheduler.add_noise(x, eps, k, steps=total_steps).to(torch.float32)
        if is_torch:
            return xk.to(x0.device)
        return xk.numpy()

    def __repr__(self) -> str:
        return f"ForwardRebuild({type(self.scheduler).__name__}, kind={self.scheduler.kind!r})"


def rebuild_for(pipeline: Pipeline) -> ForwardRebuild:
    """The client's `Rebuild` for this pipeline's scheduler and noise (pass it to `CacheClient.get`)."""
    return ForwardRebuild(pipeline.scheduler)
