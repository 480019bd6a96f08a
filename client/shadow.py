"""Shadow samples: the worker's half of the daemon's online quality guard (docs/step_tables.md).

A worker that serves a hit may also generate the same request from scratch, score both videos and
report the paired loss (score from scratch minus score from the cache) to the daemon, whose guard keeps
per-tier statistics and lowers a tier's K when its loss is shown to exceed the namespace's budget.
`Shadow` decides which hits get a shadow sample (a seeded random `fraction` of them, so a fleet's
shadow cost is that fraction of its hits' from-scratch generations) and turns a hit and its loss into
the `QualitySample` the daemon expects. The worker does the sampling and the scoring: only it has the
model; reporting (CacheBase.report_quality) is best effort like every cache call.
"""

from __future__ import annotations

import random

from .base import Hit
from .tables import QualitySample

__all__ = ["Shadow", "quality_sample"]


def quality_sample(hit: Hit, loss: float) -> QualitySample:
    """The guard's sample for a hit served with this paired loss: which table granted it and at what
    similarities (a composite's object donor first, background donor second)."""
    if hit.kind == "full":
        return QualitySample("whole", hit.sources[0].similarity, 0.0, hit.steps, loss)
    if hit.kind == "composed":
        return QualitySample("composed", hit.sources[0].similarity, hit.sources[1].similarity, hit.steps, loss)
    return QualitySample(f"partial_{hit.sources[0].role}", hit.sources[0].similarity, 0.0, hit.steps, loss)


class Shadow:
    """Which hits also run from scratch: each with probability `fraction` (0 never, 1 every hit)."""

    def __init__(self, fraction: float, seed: int | None = None):
        if not 0 <= fraction <= 1:
            raise ValueError(f"shadow fraction must be between 0 and 1, not {fraction}")
        self.fraction = fraction
        self._rng = random.Random(seed)

    def wants(self, hit: Hit | None) -> bool:
        return hit is not None and self.fraction > 0 and self._rng.random() < self.fraction
