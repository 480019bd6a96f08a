"""Similarity -> how many denoising steps a hit may skip (a whole-prompt match, or a composite).

NIRVANA's table (for 50 steps: >=0.95 -> 25, >=0.90 -> 20, >=0.85 -> 15, >=0.75 -> 10, >=0.65 -> 5)
is kept as fractions of the total, so a 30-step namespace gets 15, 12, 9, 6, 3. Namespaces can
override the table by a glob over their name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

Thresholds = tuple[tuple[float, float], ...]  # (min similarity, fraction of steps), best first


class StepTable:
    def __init__(self, default: Thresholds, overrides: Mapping[str, Thresholds] | None = None,
                 composed_max_fraction: float = 1.0):
        self._default = default
        self._overrides = dict(overrides or {})
        self._composed_max_fraction = composed_max_fraction

    def thresholds_for(self, namespace_name: str) -> Thresholds:
        for pattern, table in self._overrides.items():
            if fnmatch.fnmatchcase(namespace_name, pattern):
                return table
        return self._default

    def granted_steps(self, similarity: float, total_steps: int, namespace_name: str) -> int:
        """Steps K a worker may skip; 0 is a miss."""
        for min_similarity, fraction in self.thresholds_for(namespace_name):
            if similarity >= min_similarity:
                return max(0, min(total_steps - 1, round(fraction * total_steps)))
        return 0

    def composed_steps(self, object_steps: int, background_steps: int, total_steps: int) -> int:
        """Steps a composite of two donors may skip: no more than either part allows, and at most
        `composed_max_fraction` of the total (the daemon's default 0.1). A composed start costs prompt
        fidelity against sampling from scratch, and the cost grows fast with K; the default cap is the
        largest K of the reference model's tested ones whose cost stays within the 2 points a composed
        hit may cost (measured in docs/bench_composed.md). A partial hit (one part's donor alone) is
        granted as the composite of that part with itself."""
        cap = round(self._composed_max_fraction * total_steps)
        return max(0, min(object_steps, background_steps, cap, total_steps - 1))
