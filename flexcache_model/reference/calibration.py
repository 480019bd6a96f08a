"""The reference model and its probe metric behind calibration's interfaces (flexcache.client.calibration).

`ReferenceSampler` is the serving worker's pipeline: the same MiniLM vectors it looks up with, the same
forward-process rebuild it starts a hit from (rebuild.py), classifier-free guidance as configured.
`ProbeScorer` is the reference probe's prompt fidelity in points (0-100, quality.py), the figure every
benchmark of this project reports, so a loss budget of 1.0 is one point of fidelity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flexcache.client.calibration.sampler import Generated

from .pipeline import Pipeline, load_pipeline
from .quality import QualityMetric, load_metric
from .rebuild import rebuild_for

__all__ = ["ProbeScorer", "ReferenceSampler"]


class ReferenceSampler:
    def __init__(self, pipeline: Pipeline | None = None, total_steps: int = 50) -> None:
        self.pipeline = pipeline or load_pipeline("flow")
        self.total_steps = total_steps
        self._rebuild = rebuild_for(self.pipeline)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.pipeline.embed(list(texts))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> Generated:
        return self._made(self.pipeline.sample_batch(list(prompts), list(seeds), self.total_steps))

    def rebuild(self, x0: np.ndarray, seed: int, k: int) -> np.ndarray:
        return self._rebuild(x0, seed, k, self.total_steps)

    def resume(self, prompts: Sequence[str], seeds: Sequence[int], starts: np.ndarray, k: int) -> Generated:
        return self._made(self.pipeline.sample_batch(list(prompts), list(seeds), self.total_steps,
                                                     start_latents=torch.from_numpy(np.ascontiguousarray(starts)),
                                                     start_step=k))

    def _made(self, x0: torch.Tensor) -> Generated:
        return Generated(x0.numpy(), self.pipeline.decode(x0).numpy())


class ProbeScorer:
    """score(prompt, video) = the probe's prompt fidelity x 100; `score_batch` scores many at once."""

    def __init__(self, metric: QualityMetric | None = None) -> None:
        self.metric = metric or load_metric()

    def __call__(self, prompt: str, video: np.ndarray) -> float:
        return float(self.score_batch([prompt], np.asarray(video)[None])[0])

    def score_batch(self, prompts: Sequence[str], videos: np.ndarray) -> np.ndarray:
        fidelity = self.metric.fidelity(np.asarray(videos), list(prompts))
        return 100 * np.nan_to_num(fidelity, nan=0.0)
