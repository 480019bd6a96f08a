"""What calibration needs of a model and of a quality metric: two small protocols.

A `Sampler` is the worker's model seen from the cache: it generates clean latents from scratch,
rebuilds the step-K latent of a clean latent with a request's own noise (the scheduler's forward
process, exactly as the serving worker does on a hit) and resumes sampling from such a latent; each
generation comes back as its clean latent and its video (whatever the scorer reads), since a
pipeline decodes as it generates. Latents cross the interface as numpy float32 arrays
(one leading batch axis), so the calibration code (and client/compose.py, which composes donors)
never needs torch; a sampler converts inside. `flexcache_model.reference.calibration` implements it
for the reference model; `flexcache.client.diffusers.DiffusersSampler` for the pipelines the diffusers
adapter supports.

A `Scorer` is any `score(prompt, video) -> float`, higher is better, in the units the loss budget is
stated in (the reference probe's prompt fidelity in points; a CLIP score for a real pipeline). A
scorer may also offer `score_batch(prompts, videos)`, which calibration then prefers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Generated", "Sampler", "Scorer", "score_all"]


@dataclass(frozen=True)
class Generated:
    x0: np.ndarray  # clean latents [n, ...]
    videos: Sequence[Any]  # the decoded videos, as the scorer takes them


class Sampler(Protocol):
    """A model with a fixed generation setting (resolution, frames, scheduler, `total_steps`)."""

    total_steps: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors [n, d] of the texts, with the embedder the serving workers look up with."""
        ...

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> Generated:
        """Generations from scratch, prompt i from the noise of seeds[i]."""
        ...

    def rebuild(self, x0: np.ndarray, seed: int, k: int) -> np.ndarray:
        """The latent at step k of one clean latent x0 [...], with the noise of `seed`."""
        ...

    def resume(self, prompts: Sequence[str], seeds: Sequence[int], starts: np.ndarray, k: int) -> Generated:
        """Generations from the step-k latents `starts` [n, ...]: steps k..N-1 only."""
        ...


@runtime_checkable
class Scorer(Protocol):
    def __call__(self, prompt: str, video: Any) -> float: ...


def score_all(scorer: Any, prompts: Sequence[str], videos: Sequence[Any]) -> np.ndarray:
    """Scores of videos[i] against prompts[i]: the scorer's `score_batch` when it has one, else one call
    each. A score that is not a finite number is an error with the prompt named (a broken metric must not
    calibrate a table)."""
    batch = getattr(scorer, "score_batch", None)
    scores = np.asarray(batch(prompts, videos) if batch is not None else
                        [scorer(p, v) for p, v in zip(prompts, videos, strict=True)], dtype=np.float64)
    if scores.shape != (len(prompts),):
        raise ValueError(f"the scorer returned {scores.shape[0] if scores.ndim else 'no'} scores for "
                         f"{len(prompts)} videos")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"the scorer returned {scores[bad[0]]} for prompt {prompts[bad[0]]!r}: scores must be "
                         "finite numbers")
    return scores
